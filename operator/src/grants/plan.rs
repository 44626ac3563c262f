//! Pure logic of the TrustGrant controller: checks, the declared grant, and
//! status from what was observed.

use caravan_agent::identity::AgentId;
use k8s_openapi::jiff::Timestamp;

use crate::agent_api::{DeclaredGrant, DeclaredGrantStatus, bounded};
use crate::conditions::{self, Summary};
use crate::crd::{TrustGrantSpec, TrustGrantStatus};

/// Deepest delegation a grant may allow.
pub const MAX_DEPTH: u8 = 8;

/// A problem with what the tenant wrote, or a missing issuer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GrantInputError {
    /// `spec.subject` is not a valid agent id, or is the issuer itself.
    #[error("{0}")]
    InvalidSubject(String),
    /// `spec.depth` above [`MAX_DEPTH`].
    #[error("spec.depth {0} is out of range: 0 (the subject only) to 8")]
    DepthOutOfRange(u8),
    /// `spec.expires` is in the past.
    #[error("spec.expires {0} is in the past; a grant must still be valid when signed")]
    Expired(String),
    /// Anything else (empty issuer, scope).
    #[error("{0}")]
    InvalidSpec(String),
    /// `spec.issuer` names no Agent in this namespace.
    #[error("issuer Agent {0} not found in this namespace; create it or fix spec.issuer")]
    IssuerNotFound(String),
}

impl GrantInputError {
    /// Condition and Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            GrantInputError::InvalidSubject(_) => "InvalidSubject",
            GrantInputError::DepthOutOfRange(_) => "DepthOutOfRange",
            GrantInputError::Expired(_) => "Expired",
            GrantInputError::InvalidSpec(_) => "InvalidSpec",
            GrantInputError::IssuerNotFound(_) => "IssuerNotFound",
        }
    }
}

/// Checks the spec (no API call) and builds the declared grant. `now` is
/// unix seconds.
pub fn declared(spec: &TrustGrantSpec, now: u64) -> Result<DeclaredGrant, GrantInputError> {
    crate::names::check_object_name("spec.issuer", &spec.issuer)
        .map_err(GrantInputError::InvalidSpec)?;
    let subject: AgentId = spec.subject.parse().map_err(|e| {
        GrantInputError::InvalidSubject(format!(
            "spec.subject {:?} is not an agent id (cv1-… with a valid checksum): {e}",
            bounded(&spec.subject)
        ))
    })?;
    if spec.depth > MAX_DEPTH {
        return Err(GrantInputError::DepthOutOfRange(spec.depth));
    }
    if spec.scope.is_empty()
        || spec.scope.len() > 128
        || spec
            .scope
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(GrantInputError::InvalidSpec(
            "spec.scope must be `all` or a scope name (1–128 characters, no spaces; only `all` lets the subject fetch shares)".into(),
        ));
    }
    let not_after = match &spec.expires {
        Some(t) => {
            let secs = t.0.as_second();
            if secs <= now as i64 {
                return Err(GrantInputError::Expired(t.0.to_string()));
            }
            Some(secs as u64)
        }
        None => None,
    };
    Ok(DeclaredGrant {
        subject: subject.to_string(),
        depth: spec.depth,
        scope: (spec.scope != "all").then(|| spec.scope.clone()),
        not_after,
    })
}

/// Whether the grant is signed, published and describes its current spec:
/// its issuer need not be awake for it (scale to zero).
pub fn settled(g: &crate::crd::TrustGrant) -> bool {
    g.status.as_ref().is_some_and(|st| {
        st.observed_generation == g.metadata.generation
            && st.published
            && st
                .conditions
                .iter()
                .any(|c| c.type_ == crate::status::READY && c.status == "True")
    })
}

/// Refuses a change of `spec.issuer` once an issuer holds the grant.
///
/// Why refuse rather than move the grant to the new issuer: a move needs
/// the old issuer to sign and publish a revocation first, and the operator
/// would have to remember every former issuer until each revocation is
/// published (an issuer edited twice while the first is asleep or down
/// leaves two). Refusing keeps exactly one holder, recorded in
/// `status.issuer` before the first `PUT`, whose grant stays managed and is
/// revoked on delete: no edit of the spec can ever orphan a signed grant.
/// On Kubernetes ≥ 1.25 the CRD's CEL rule refuses every edit of
/// `spec.issuer` at the API server already (also before anything was
/// signed); below 1.25 this check is what keeps the grant with its signer.
pub fn check_holder(g: &crate::crd::TrustGrant) -> Result<(), GrantInputError> {
    let holder = g.holder();
    if holder != g.spec.issuer {
        return Err(GrantInputError::InvalidSpec(format!(
            "spec.issuer cannot change from {holder:?} to {:?}: Agent {holder} signed this \
             grant and still vouches for the subject. Set spec.issuer back to {holder:?}, or \
             delete this TrustGrant ({holder} then publishes the revocation) and create a new \
             one for the other issuer",
            bounded(&g.spec.issuer)
        )));
    }
    Ok(())
}

/// The agent id that signed a grant whose holder was never recorded (signed
/// by an operator before `status.issuer` existed): `status.issuerId`.
pub fn unrecorded_signer(g: &crate::crd::TrustGrant) -> Option<&str> {
    g.status
        .as_ref()
        .filter(|s| s.issuer.is_none())
        .and_then(|s| s.issuer_id.as_deref())
}

/// For such a grant, refuses a `spec.issuer` whose agent id (`issuer_id`)
/// is not the signer's, so the wrong Agent is never recorded as holder.
pub fn check_signer(g: &crate::crd::TrustGrant, issuer_id: &str) -> Result<(), GrantInputError> {
    match unrecorded_signer(g) {
        Some(signer) if signer != issuer_id => Err(GrantInputError::InvalidSpec(format!(
            "spec.issuer {:?} (agent id {issuer_id}) is not the Agent that signed this grant \
             (agent id {}): set spec.issuer back to that Agent, or delete this TrustGrant \
             (the signer then publishes the revocation) and create a new one",
            bounded(&g.spec.issuer),
            bounded(signer)
        ))),
        _ => Ok(()),
    }
}

/// Refuses a grant from an agent to itself.
pub fn check_not_self(subject: &str, issuer_id: &str) -> Result<(), GrantInputError> {
    if subject == issuer_id {
        return Err(GrantInputError::InvalidSubject(
            "spec.subject is the issuer's own agent id; an agent cannot vouch for itself".into(),
        ));
    }
    Ok(())
}

/// What the reconciler found.
#[derive(Clone, Debug)]
pub enum Observation<'a> {
    /// Bad input; nothing sent to the agent.
    BadInput(&'a GrantInputError),
    /// The issuer Agent exists but cannot sign yet.
    IssuerNotReady(&'a str),
    /// The issuer's admin API did not answer.
    AgentUnreachable(&'a str),
    /// The issuer refused to sign.
    AgentRefused(&'a str),
    /// The issuer's report.
    Reported(&'a DeclaredGrantStatus),
}

/// The whole desired status.
pub fn compute(
    previous: Option<&TrustGrantStatus>,
    generation: Option<i64>,
    obs: &Observation<'_>,
    now: Timestamp,
) -> TrustGrantStatus {
    let prev_conds = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    let mut st = previous.cloned().unwrap_or_default();
    let (summary, reason, message) = match obs {
        Observation::BadInput(e) => (Summary::Degraded, e.reason().to_string(), e.to_string()),
        Observation::IssuerNotReady(m) => {
            (Summary::Progressing, "IssuerNotReady".into(), m.to_string())
        }
        Observation::AgentUnreachable(m) => {
            (Summary::Progressing, "AgentUnreachable".into(), bounded(m))
        }
        Observation::AgentRefused(m) => (Summary::Degraded, "AgentRefused".into(), bounded(m)),
        Observation::Reported(r) => {
            st.grant_id = Some(bounded(&r.grant_id));
            st.issuer_id = Some(bounded(&r.issuer));
            st.not_after = Some(r.not_after);
            st.published = r.published;
            if r.published {
                (
                    Summary::Ready,
                    "Published".into(),
                    format!(
                        "grant {} signed and published to {} repositories",
                        bounded(&r.grant_id),
                        r.published_to.len()
                    ),
                )
            } else {
                (
                    Summary::Progressing,
                    "Publishing".into(),
                    "signed; no repository has stored it yet (retrying)".into(),
                )
            }
        }
    };
    st.conditions = conditions::triple(prev_conds, summary, &reason, &message, generation, now);
    st.observed_generation = generation;
    st
}

#[cfg(test)]
mod tests {
    use super::*;
    use caravan_agent::identity::SecretKey;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn spec() -> TrustGrantSpec {
        TrustGrantSpec {
            issuer: "alice".into(),
            subject: SecretKey::from_seed([2; 32]).agent_id().to_string(),
            depth: 1,
            scope: "all".into(),
            expires: None,
        }
    }

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn a_good_spec_becomes_a_declared_grant() {
        let d = declared(&spec(), NOW).unwrap();
        assert_eq!(d.depth, 1);
        assert_eq!(d.scope, None);
        assert_eq!(d.not_after, None);
        let mut s = spec();
        s.expires = Some(Time(Timestamp::from_second(NOW as i64 + 60).unwrap()));
        s.scope = "photos".into();
        let d = declared(&s, NOW).unwrap();
        assert_eq!(d.not_after, Some(NOW + 60));
        assert_eq!(d.scope.as_deref(), Some("photos"));
    }

    #[test]
    fn every_bad_input_has_its_reason() {
        let mut s = spec();
        s.subject = "cv1-aaaaaaaa".into();
        assert_eq!(declared(&s, NOW).unwrap_err().reason(), "InvalidSubject");
        let mut s = spec();
        // A well-formed id with a wrong checksum character.
        let id = s.subject.clone();
        let last = if id.ends_with('a') { 'b' } else { 'a' };
        s.subject = format!("{}{last}", &id[..id.len() - 1]);
        assert_eq!(declared(&s, NOW).unwrap_err().reason(), "InvalidSubject");
        let mut s = spec();
        s.depth = 9;
        assert_eq!(declared(&s, NOW).unwrap_err().reason(), "DepthOutOfRange");
        let mut s = spec();
        s.expires = Some(Time(Timestamp::from_second(NOW as i64 - 1).unwrap()));
        assert_eq!(declared(&s, NOW).unwrap_err().reason(), "Expired");
        let mut s = spec();
        s.scope = "a b".into();
        assert_eq!(declared(&s, NOW).unwrap_err().reason(), "InvalidSpec");
        let id = spec().subject;
        assert_eq!(
            check_not_self(&id, &id).unwrap_err().reason(),
            "InvalidSubject"
        );
    }

    #[test]
    fn status_from_reports() {
        let t = Timestamp::from_second(NOW as i64).unwrap();
        let mut r = DeclaredGrantStatus {
            grant_id: "ab".into(),
            issuer: "cv1-i".into(),
            subject: "cv1-s".into(),
            depth: 1,
            not_after: NOW + 10,
            published: false,
            published_to: vec![],
        };
        let s = compute(None, Some(1), &Observation::Reported(&r), t);
        assert!(!s.published);
        assert_eq!(s.conditions[0].status, "False");
        assert_eq!(s.conditions[1].reason, "Publishing");
        r.published = true;
        r.published_to = vec!["http://repo".into()];
        let s2 = compute(Some(&s), Some(1), &Observation::Reported(&r), t);
        assert!(s2.published);
        assert_eq!(s2.conditions[0].reason, "Published");
        assert_eq!(s2.grant_id.as_deref(), Some("ab"));
        let e = GrantInputError::IssuerNotFound("x".into());
        let s3 = compute(Some(&s2), Some(2), &Observation::BadInput(&e), t);
        assert_eq!(s3.conditions[2].reason, "IssuerNotFound");
        assert_eq!(s3.grant_id.as_deref(), Some("ab"), "keeps what it knew");
    }
}
