//! Pure logic of the Share controller: checking the spec, turning it into
//! the agent's declared share, and computing status from what was observed.
//! No I/O, so every bad input and every status is a unit test.

use caravan_agent::identity::AgentId;
use caravan_agent::ticket::{ShareId, Ticket};
use k8s_openapi::jiff::Timestamp;

use crate::agent_api::{
    DeclaredPublish, DeclaredShare, DeclaredShareStatus, DeclaredState, DeclaredSubscribe, bounded,
};
use crate::conditions::{self, Summary};
use crate::crd::share::{RecipientTicket, ShareSpec, SubscribeSpec};
use crate::crd::{SharePhase, ShareStatus};

/// Shortest rescan or poll interval accepted.
pub const MIN_INTERVAL_SECS: u64 = 5;
/// Longest rescan or poll interval accepted (a day).
pub const MAX_INTERVAL_SECS: u64 = 86_400;
/// Longest path accepted.
pub const MAX_PATH: usize = 1024;

/// A problem with what the tenant wrote (or a missing referenced object);
/// reported as a condition and an Event, fixed by editing the input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShareInputError {
    /// Both or neither of publish/subscribe, bad interval, bad recipient…
    #[error("{0}")]
    InvalidSpec(String),
    /// `path` or `destination` leaves the storage root or enters `.caravan/`.
    #[error("{0}")]
    InvalidPath(String),
    /// `spec.agent` names no Agent in this namespace.
    #[error("Agent {0} not found in this namespace; create it or fix spec.agent")]
    AgentNotFound(String),
    /// The ticket Secret or its key is missing.
    #[error("{0}")]
    SecretNotFound(String),
    /// The ticket does not parse or verify.
    #[error("the ticket is not valid: {0}")]
    TicketInvalid(String),
    /// The ticket's key is wrapped for another agent.
    #[error("{0}")]
    NotARecipient(String),
}

impl ShareInputError {
    /// Condition and Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            ShareInputError::InvalidSpec(_) => "InvalidSpec",
            ShareInputError::InvalidPath(_) => "InvalidPath",
            ShareInputError::AgentNotFound(_) => "AgentNotFound",
            ShareInputError::SecretNotFound(_) => "SecretNotFound",
            ShareInputError::TicketInvalid(_) => "TicketInvalid",
            ShareInputError::NotARecipient(_) => "NotARecipient",
        }
    }
}

/// Parses `30s`, `5m`, `1h` into seconds.
pub fn parse_interval(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn interval(field: &str, s: &str) -> Result<u64, ShareInputError> {
    match parse_interval(s) {
        Some(n) if (MIN_INTERVAL_SECS..=MAX_INTERVAL_SECS).contains(&n) => Ok(n),
        _ => Err(ShareInputError::InvalidSpec(format!(
            "{field} {s:?} must be a duration like 30s, 5m or 1h, between {MIN_INTERVAL_SECS}s and 24h"
        ))),
    }
}

/// Normalises a folder inside the agent's storage: relative, no `.`/`..`
/// components, not in the agent's `.caravan/` state. `""` is the root.
pub fn storage_path(field: &str, p: &str) -> Result<String, ShareInputError> {
    let bad = |why: &str| {
        Err(ShareInputError::InvalidPath(format!(
            "{field} {p:?} {why}; use a folder relative to the storage root such as photos/2026"
        )))
    };
    if p.len() > MAX_PATH {
        return bad("is too long");
    }
    if p.starts_with('/') || p.starts_with('\\') {
        return bad("is absolute");
    }
    if p.chars().any(|c| c.is_control() || c == '\\') {
        return bad("contains control characters or backslashes");
    }
    let mut parts = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => return bad("leaves the storage root"),
            x => parts.push(x),
        }
    }
    if parts.first().is_some_and(|f| *f == ".caravan") {
        return bad("is inside the agent's state folder .caravan/");
    }
    Ok(parts.join("/"))
}

/// What kind of share the spec declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `spec.publish`.
    Publish,
    /// `spec.subscribe`.
    Subscribe,
}

/// Where the subscribe ticket comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TicketSource {
    /// Inline in the spec.
    Inline(String),
    /// A Secret key to read.
    Secret { name: String, key: String },
    /// No ticket: share id + publisher.
    None,
}

/// Checks everything that needs no API call. Returns the mode.
pub fn check_spec(spec: &ShareSpec) -> Result<Mode, ShareInputError> {
    crate::names::check_object_name("spec.agent", &spec.agent)
        .map_err(ShareInputError::InvalidSpec)?;
    match (&spec.publish, &spec.subscribe) {
        (Some(_), Some(_)) | (None, None) => Err(ShareInputError::InvalidSpec(
            "set exactly one of spec.publish or spec.subscribe".into(),
        )),
        (Some(p), None) => {
            storage_path("spec.publish.path", &p.path)?;
            interval("spec.publish.rescanInterval", &p.rescan_interval)?;
            for id in &p.recipients.agent_ids {
                id.parse::<AgentId>().map_err(|e| {
                    ShareInputError::InvalidSpec(format!(
                        "spec.publish.recipients.agentIds entry {id:?} is not an agent id: {e}"
                    ))
                })?;
            }
            if p.recipients.trusted_within_depth.is_some_and(|d| d > 8) {
                return Err(ShareInputError::InvalidSpec(
                    "spec.publish.recipients.trustedWithinDepth must be between 0 and 8".into(),
                ));
            }
            if p.recipients.agent_ids.is_empty()
                && p.recipients.trusted_within_depth.unwrap_or(0) == 0
            {
                return Err(ShareInputError::InvalidSpec(
                    "spec.publish.recipients names nobody: list agentIds and/or set trustedWithinDepth ≥ 1"
                        .into(),
                ));
            }
            Ok(Mode::Publish)
        }
        (None, Some(s)) => {
            storage_path("spec.subscribe.destination", &s.destination)?;
            interval("spec.subscribe.pollInterval", &s.poll_interval)?;
            ticket_source(s)?;
            Ok(Mode::Subscribe)
        }
    }
}

/// Which ticket source the subscribe spec uses (exactly one).
pub fn ticket_source(s: &SubscribeSpec) -> Result<TicketSource, ShareInputError> {
    let by_id = s.share_id.is_some() || s.publisher.is_some();
    let n = usize::from(s.ticket.is_some())
        + usize::from(s.ticket_secret_ref.is_some())
        + usize::from(by_id);
    if n != 1 {
        return Err(ShareInputError::InvalidSpec(
            "spec.subscribe: set exactly one of ticket, ticketSecretRef, or shareId with publisher"
                .into(),
        ));
    }
    if let Some(t) = &s.ticket {
        return Ok(TicketSource::Inline(t.clone()));
    }
    if let Some(r) = &s.ticket_secret_ref {
        crate::names::check_object_name("spec.subscribe.ticketSecretRef.name", &r.name)
            .map_err(ShareInputError::InvalidSpec)?;
        return Ok(TicketSource::Secret {
            name: r.name.clone(),
            key: r.key.clone(),
        });
    }
    let (Some(id), Some(publisher)) = (&s.share_id, &s.publisher) else {
        return Err(ShareInputError::InvalidSpec(
            "spec.subscribe.shareId and spec.subscribe.publisher go together".into(),
        ));
    };
    id.parse::<ShareId>().map_err(|e| {
        ShareInputError::InvalidSpec(format!(
            "spec.subscribe.shareId {id:?} is not a share id: {e}"
        ))
    })?;
    publisher.parse::<AgentId>().map_err(|e| {
        ShareInputError::InvalidSpec(format!(
            "spec.subscribe.publisher {publisher:?} is not an agent id: {e}"
        ))
    })?;
    Ok(TicketSource::None)
}

/// Parses and verifies a ticket, and checks it is usable by `me` (the
/// subscribing agent's id, when known). A ticket without a key (a share for
/// the publisher's trusted agents) is usable by anyone the publisher trusts,
/// which only the publisher can tell.
pub fn check_ticket(text: &str, me: Option<&str>) -> Result<(), ShareInputError> {
    if text.len() > 65_536 {
        return Err(ShareInputError::TicketInvalid("longer than 64 KiB".into()));
    }
    let t = Ticket::parse(text).map_err(|e| ShareInputError::TicketInvalid(e.to_string()))?;
    if let Some(me) = me
        && !t.wrapped_key.is_empty()
        && t.recipient.to_string() != me
    {
        return Err(ShareInputError::NotARecipient(format!(
            "the ticket is for agent {}, but this Share's Agent is {me}; ask the publisher for a ticket for {me}",
            t.recipient
        )));
    }
    Ok(())
}

/// The declared share sent to the agent (spec already checked).
pub fn declared(
    spec: &ShareSpec,
    ticket: Option<String>,
    generation: i64,
) -> Result<DeclaredShare, ShareInputError> {
    let publish = match &spec.publish {
        Some(p) => Some(DeclaredPublish {
            path: storage_path("spec.publish.path", &p.path)?,
            recipients: p.recipients.agent_ids.clone(),
            trust_depth: p.recipients.trusted_within_depth.filter(|d| *d > 0),
            rescan_secs: interval("spec.publish.rescanInterval", &p.rescan_interval)?,
            offline_seeding: p.offline_seeding,
        }),
        None => None,
    };
    let subscribe = match &spec.subscribe {
        Some(s) => Some(DeclaredSubscribe {
            ticket,
            share_id: s.share_id.clone(),
            publisher: s.publisher.clone(),
            destination: storage_path("spec.subscribe.destination", &s.destination)?,
            poll_secs: interval("spec.subscribe.pollInterval", &s.poll_interval)?,
        }),
        None => None,
    };
    Ok(DeclaredShare {
        generation,
        publish,
        subscribe,
    })
}

/// Whether the Share's status describes its current spec and the agent has
/// nothing left to do for it (Ready, or Degraded until a human acts): such
/// a share needs no awake agent, and its status is kept while the Agent
/// sleeps (scale to zero).
pub fn settled(share: &crate::crd::Share) -> bool {
    share.status.as_ref().is_some_and(|st| {
        st.observed_generation == share.metadata.generation
            && matches!(st.phase, Some(SharePhase::Ready | SharePhase::Degraded))
    })
}

/// Refuses a change of `spec.agent` once an Agent holds the share.
///
/// Why refuse rather than move the share: a move must first stop the share
/// on the old Agent (a `DELETE` it has to answer), and the operator would
/// have to remember every former Agent until each one did (an Agent edited
/// twice while the first is asleep or down leaves two). Refusing keeps
/// exactly one holder, recorded in `status.agent` before the first `PUT`:
/// it keeps serving or following the share as declared, its status is never
/// mixed with another Agent's, and deleting the Share stops it there. No
/// edit of the spec can leave an Agent serving a share nobody manages.
///
/// There is deliberately no CEL rule for it: one cannot see whether an Agent
/// holds the share yet, so it would also refuse correcting a misspelt
/// `spec.agent` that nothing was declared on; this check behaves the same
/// on every Kubernetes version.
pub fn check_holder(share: &crate::crd::Share) -> Result<(), ShareInputError> {
    let holder = share.holder();
    if holder != share.spec.agent {
        return Err(ShareInputError::InvalidSpec(format!(
            "spec.agent cannot change from {holder:?} to {:?}: Agent {holder} holds this share \
             and keeps {} it. Set spec.agent back to {holder:?}, or delete this Share ({holder} \
             then stops it) and create a new one for the other Agent",
            bounded(&share.spec.agent),
            if share.spec.publish.is_some() {
                "serving"
            } else {
                "following"
            }
        )));
    }
    Ok(())
}

/// Whether the Share may have been declared on an Agent: its holder is
/// recorded before the first declaration (`status.agent`), and a Share an
/// older operator declared shows a share id, publisher or version. One
/// with none of them was never declared: deleting it has nothing to stop.
pub fn ever_declared(share: &crate::crd::Share) -> bool {
    share.status.as_ref().is_some_and(|s| {
        s.agent.is_some() || s.share_id.is_some() || s.publisher.is_some() || s.version.is_some()
    })
}

/// The agent id publishing a publish Share whose holder was never recorded
/// (declared by an operator before `status.agent` existed):
/// `status.publisher`, which for a publish Share is its own agent's id.
pub fn unrecorded_publisher(share: &crate::crd::Share) -> Option<&str> {
    share
        .status
        .as_ref()
        .filter(|s| s.agent.is_none() && share.spec.publish.is_some())
        .and_then(|s| s.publisher.as_deref())
}

/// For such a Share, refuses a `spec.agent` whose agent id (`agent_id`) is
/// not the publisher's, so the wrong Agent is never recorded as holder.
pub fn check_publisher(share: &crate::crd::Share, agent_id: &str) -> Result<(), ShareInputError> {
    match unrecorded_publisher(share) {
        Some(p) if p != agent_id => Err(ShareInputError::InvalidSpec(format!(
            "spec.agent {:?} (agent id {agent_id}) is not the Agent that publishes this share \
             (agent id {}): set spec.agent back to that Agent, or delete this Share (that \
             Agent then stops serving it) and create a new one",
            bounded(&share.spec.agent),
            bounded(p)
        ))),
        _ => Ok(()),
    }
}

/// What the reconciler found, reduced to what status depends on.
#[derive(Clone, Debug)]
pub enum Observation<'a> {
    /// The input is wrong; nothing was sent to the agent.
    BadInput(&'a ShareInputError),
    /// The Agent exists but cannot take calls yet.
    AgentNotReady(&'a str),
    /// The agent's admin API did not answer.
    AgentUnreachable(&'a str),
    /// The agent refused the declaration.
    AgentRefused(&'a str),
    /// The agent's report.
    Reported(&'a DeclaredShareStatus),
    /// Subscribe: the agent could not reach the publisher, which is an
    /// Agent of this cluster scaled to zero (named here); the version held
    /// is the newest it published, so this is not a failure.
    PublisherAsleep(&'a DeclaredShareStatus, &'a str),
}

fn reason_code(r: Option<&str>) -> String {
    match r {
        Some(r)
            if !r.is_empty() && r.len() <= 64 && r.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            r.to_string()
        }
        _ => "AgentError".to_string(),
    }
}

fn human_bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Degraded reasons that say the publisher refused this subscriber.
const REFUSALS: &[&str] = &[
    caravan_agent::declare::reasons::NOT_A_RECIPIENT,
    caravan_agent::declare::reasons::TRUST_REVOKED,
];

/// The whole desired status.
pub fn compute(
    previous: Option<&ShareStatus>,
    generation: Option<i64>,
    mode: Option<Mode>,
    obs: &Observation<'_>,
    now: Timestamp,
) -> ShareStatus {
    let prev_conds = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    let mut st = previous.cloned().unwrap_or_default();
    let publish = mode == Some(Mode::Publish);
    let (summary, reason, message) = match obs {
        Observation::BadInput(e) => (Summary::Degraded, e.reason().to_string(), e.to_string()),
        Observation::AgentNotReady(m) => (
            Summary::Progressing,
            "WaitingForAgent".to_string(),
            m.to_string(),
        ),
        Observation::AgentUnreachable(m) => (
            Summary::Progressing,
            "AgentUnreachable".to_string(),
            bounded(m),
        ),
        Observation::AgentRefused(m) => (Summary::Degraded, "AgentRefused".to_string(), bounded(m)),
        Observation::Reported(r) | Observation::PublisherAsleep(r, _) => {
            // Another share now (the spec names another, or the Share
            // turned from publishing to subscribing): the version held was
            // the other share's, not this one's.
            let reported = r.share_id.clone().map(|s| bounded(&s));
            if reported.is_some() && reported != st.share_id {
                st.version = None;
            }
            st.share_id = reported.or(st.share_id);
            st.publisher = r.publisher.clone().map(|s| bounded(&s)).or(st.publisher);
            if r.version > 0 {
                st.version = Some(r.version);
            }
            st.bytes_done = Some(r.bytes_done);
            st.bytes_total = Some(r.bytes_total);
            st.chunks_done = Some(r.chunks_done);
            st.chunks_total = Some(r.chunks_total);
            st.files_done = Some(r.files_done);
            st.files_total = Some(r.files_total);
            st.peers = Some(r.peers);
            st.bytes_received = (!publish).then_some(r.bytes_received);
            st.tickets = r
                .tickets
                .iter()
                .take(1000)
                .map(|t| RecipientTicket {
                    agent_id: bounded(&t.agent_id),
                    ticket: t.ticket.chars().take(65_536).collect(),
                })
                .collect();
            st.keyless_ticket = r
                .keyless_ticket
                .as_ref()
                .map(|t| t.chars().take(65_536).collect());
            let what = |verb: &str| {
                format!(
                    "{verb} version {}: {} files, {}",
                    r.version,
                    r.files_total,
                    human_bytes(r.bytes_total)
                )
            };
            match r.state {
                DeclaredState::Ready if publish => {
                    (Summary::Ready, "Published".to_string(), what("published"))
                }
                DeclaredState::Ready => (Summary::Ready, "Synced".to_string(), what("fetched")),
                DeclaredState::Pending => (
                    Summary::Progressing,
                    "Accepted".to_string(),
                    "the agent accepted the share".to_string(),
                ),
                DeclaredState::Progressing => (
                    Summary::Progressing,
                    if publish { "Publishing" } else { "Fetching" }.to_string(),
                    format!(
                        "{} of {} ({} of {} chunks)",
                        human_bytes(r.bytes_done),
                        human_bytes(r.bytes_total),
                        r.chunks_done,
                        r.chunks_total
                    ),
                ),
                DeclaredState::Failed => (
                    Summary::Degraded,
                    reason_code(r.reason.as_deref()),
                    bounded(
                        r.message
                            .as_deref()
                            .unwrap_or("the agent reported a failure"),
                    ),
                ),
            }
        }
    };
    let (summary, reason, message) = match obs {
        Observation::PublisherAsleep(r, who) => (
            Summary::Ready,
            "PublisherAsleep".to_string(),
            format!(
                "holding version {}: the publisher, {who}, is scaled to zero and \
                 published nothing newer; it is woken when a fetch needs it",
                r.version
            ),
        ),
        _ => (summary, reason, message),
    };
    // A subscription the publisher refused stays refused while the
    // publisher cannot be reached (asleep, scaled to zero): "unreachable"
    // is a reason to wake the publisher, and a subscriber the publisher
    // refuses (any tenant may name any share) woke it again and again,
    // every half minute, for nothing. Cleared by any answer of the
    // publisher (a fetch, another refusal) or a change of the Share.
    let refused_before = prev_conds.iter().find(|c| {
        c.type_ == crate::status::DEGRADED
            && c.status == "True"
            && REFUSALS.contains(&c.reason.as_str())
    });
    let (reason, message) = match refused_before {
        Some(c)
            if summary == Summary::Degraded
                && reason == caravan_agent::declare::reasons::PUBLISHER_UNREACHABLE
                && previous.is_some_and(|p| p.observed_generation == generation) =>
        {
            let first = c
                .message
                .split(" (the publisher was unreachable")
                .next()
                .unwrap_or("");
            (
                c.reason.clone(),
                format!("{first} (the publisher was unreachable at the last try)"),
            )
        }
        _ => (reason, message),
    };
    st.conditions = conditions::triple(prev_conds, summary, &reason, &message, generation, now);
    st.phase = Some(match (summary, obs) {
        (Summary::Ready, _) => SharePhase::Ready,
        (Summary::Degraded, _) => SharePhase::Degraded,
        (Summary::Progressing, Observation::AgentNotReady(_)) => SharePhase::Pending,
        (Summary::Progressing, _) => SharePhase::Progressing,
    });
    st.observed_generation = generation;
    st
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::share::{PublishSpec, RecipientsSpec, SecretKeyRef};
    use caravan_agent::crypto::Key;
    use caravan_agent::identity::SecretKey;

    fn id(seed: u8) -> String {
        SecretKey::from_seed([seed; 32]).agent_id().to_string()
    }

    fn publish_spec() -> ShareSpec {
        ShareSpec {
            agent: "alice".into(),
            publish: Some(PublishSpec {
                path: "photos/2026/".into(),
                recipients: RecipientsSpec {
                    agent_ids: vec![id(2)],
                    trusted_within_depth: Some(2),
                },
                offline_seeding: false,
                rescan_interval: "30s".into(),
            }),
            subscribe: None,
        }
    }

    fn subscribe_spec() -> ShareSpec {
        ShareSpec {
            agent: "bob".into(),
            publish: None,
            subscribe: Some(SubscribeSpec {
                ticket: None,
                ticket_secret_ref: None,
                share_id: Some(ShareId([9; 32]).to_string()),
                publisher: Some(id(1)),
                destination: "inbox/alice".into(),
                poll_interval: "10s".into(),
            }),
        }
    }

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    #[test]
    fn paths_stay_inside_the_storage_root() {
        assert_eq!(storage_path("p", "photos/2026/").unwrap(), "photos/2026");
        assert_eq!(storage_path("p", "./a//b").unwrap(), "a/b");
        assert_eq!(storage_path("p", ".").unwrap(), "");
        for bad in ["../x", "a/../../x", "/etc", "\\x", ".caravan/keys", "a\nb"] {
            assert!(
                matches!(storage_path("p", bad), Err(ShareInputError::InvalidPath(_))),
                "{bad:?} accepted"
            );
        }
        assert!(storage_path("p", &"a/".repeat(600)).is_err());
    }

    #[test]
    fn exactly_one_mode() {
        assert_eq!(check_spec(&publish_spec()).unwrap(), Mode::Publish);
        assert_eq!(check_spec(&subscribe_spec()).unwrap(), Mode::Subscribe);
        let mut both = publish_spec();
        both.subscribe = subscribe_spec().subscribe;
        assert_eq!(check_spec(&both).unwrap_err().reason(), "InvalidSpec");
        let mut neither = publish_spec();
        neither.publish = None;
        assert_eq!(check_spec(&neither).unwrap_err().reason(), "InvalidSpec");
    }

    #[test]
    fn bad_fields_are_refused_with_a_reason() {
        let mut s = publish_spec();
        s.publish.as_mut().unwrap().path = "../x".into();
        assert_eq!(check_spec(&s).unwrap_err().reason(), "InvalidPath");
        let mut s = publish_spec();
        s.publish.as_mut().unwrap().rescan_interval = "1s".into();
        assert_eq!(check_spec(&s).unwrap_err().reason(), "InvalidSpec");
        let mut s = publish_spec();
        s.publish.as_mut().unwrap().recipients.agent_ids = vec!["cv1-nope".into()];
        assert_eq!(check_spec(&s).unwrap_err().reason(), "InvalidSpec");
        let mut s = publish_spec();
        s.publish.as_mut().unwrap().recipients = RecipientsSpec::default();
        assert_eq!(check_spec(&s).unwrap_err().reason(), "InvalidSpec");
        let mut s = subscribe_spec();
        s.subscribe.as_mut().unwrap().destination = "/abs".into();
        assert_eq!(check_spec(&s).unwrap_err().reason(), "InvalidPath");
        let mut s = subscribe_spec();
        s.subscribe.as_mut().unwrap().ticket = Some("x".into());
        assert_eq!(check_spec(&s).unwrap_err().reason(), "InvalidSpec");
        let mut s = subscribe_spec();
        s.subscribe.as_mut().unwrap().publisher = None;
        assert_eq!(check_spec(&s).unwrap_err().reason(), "InvalidSpec");
        let mut s = subscribe_spec();
        s.subscribe.as_mut().unwrap().share_id = Some("zz".into());
        assert_eq!(check_spec(&s).unwrap_err().reason(), "InvalidSpec");
        let mut s = subscribe_spec();
        let sub = s.subscribe.as_mut().unwrap();
        sub.share_id = None;
        sub.publisher = None;
        sub.ticket_secret_ref = Some(SecretKeyRef {
            name: "t".into(),
            key: "ticket".into(),
        });
        assert_eq!(
            ticket_source(s.subscribe.as_ref().unwrap()).unwrap(),
            TicketSource::Secret {
                name: "t".into(),
                key: "ticket".into()
            }
        );
    }

    #[test]
    fn tickets_are_verified_and_bound_to_the_agent() {
        let publisher = SecretKey::from_seed([1; 32]);
        let bob = SecretKey::from_seed([2; 32]).agent_id();
        let key = Key::random().unwrap();
        let ticket =
            Ticket::issue(&publisher, ShareId([3; 32]), bob, &key, vec![], vec![]).unwrap();
        check_ticket(&ticket, Some(&bob.to_string())).unwrap();
        check_ticket(&ticket, None).unwrap();
        let e = check_ticket(&ticket, Some(&id(5))).unwrap_err();
        assert_eq!(e.reason(), "NotARecipient");
        for bad in [
            "garbage".to_string(),
            ticket[..ticket.len() / 2].to_string(),
            format!("{ticket}AA"),
            "x".repeat(70_000),
        ] {
            assert_eq!(
                check_ticket(&bad, Some(&bob.to_string()))
                    .unwrap_err()
                    .reason(),
                "TicketInvalid",
                "{}",
                &bad[..bad.len().min(40)]
            );
        }
        let keyless =
            Ticket::issue_keyless(&publisher, ShareId([3; 32]), bob, vec![], vec![]).unwrap();
        check_ticket(&keyless, Some(&id(5))).unwrap();
    }

    #[test]
    fn declared_share_carries_the_normalised_spec() {
        let d = declared(&publish_spec(), None, 4).unwrap();
        assert_eq!(d.generation, 4);
        let p = d.publish.unwrap();
        assert_eq!(p.path, "photos/2026");
        assert_eq!(p.rescan_secs, 30);
        assert_eq!(p.trust_depth, Some(2));
        let d = declared(&subscribe_spec(), None, 1).unwrap();
        let s = d.subscribe.unwrap();
        assert_eq!((s.destination.as_str(), s.poll_secs), ("inbox/alice", 10));
        assert!(s.share_id.is_some() && s.publisher.is_some() && s.ticket.is_none());
        assert_eq!(parse_interval("2h"), Some(7200));
        assert_eq!(parse_interval("5"), None);
        assert_eq!(parse_interval(""), None);
        assert_eq!(parse_interval("99999999999999999999h"), None);
    }

    fn reported(state: DeclaredState) -> DeclaredShareStatus {
        DeclaredShareStatus {
            name: "s".into(),
            generation: 1,
            state,
            reason: None,
            message: None,
            share_id: Some("sh".into()),
            publisher: Some(id(1)),
            version: 2,
            files_done: 3,
            files_total: 3,
            bytes_done: 10,
            bytes_total: 10,
            chunks_done: 1,
            chunks_total: 1,
            bytes_received: 10,
            peers: 1,
            tickets: vec![],
            keyless_ticket: None,
        }
    }

    fn cond<'a>(
        s: &'a ShareStatus,
        t: &str,
    ) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    /// A Share with no holder recorded and nothing reported was never
    /// declared: its deletion does not wait for its Agent (it hung in
    /// Terminating while the Agent was never Ready).
    #[test]
    fn a_share_never_declared_has_nothing_to_stop() {
        let mut share = crate::crd::Share::new(
            "p2",
            serde_json::from_value(serde_json::json!({
                "agent": "down",
                "publish": {"path": "docs", "recipients": {"trustedWithinDepth": 1}}
            }))
            .unwrap(),
        );
        assert!(!ever_declared(&share));
        share.status = Some(ShareStatus::default());
        assert!(!ever_declared(&share));
        share.status.as_mut().unwrap().agent = Some("down".into());
        assert!(ever_declared(&share));
        share.status = Some(ShareStatus {
            version: Some(1),
            ..Default::default()
        });
        assert!(ever_declared(&share));
    }

    #[test]
    fn status_follows_the_agent_report() {
        let r = reported(DeclaredState::Ready);
        let s = compute(
            None,
            Some(1),
            Some(Mode::Subscribe),
            &Observation::Reported(&r),
            t(0),
        );
        assert_eq!(s.phase, Some(SharePhase::Ready));
        assert_eq!(cond(&s, "Ready").reason, "Synced");
        assert_eq!(s.version, Some(2));
        assert_eq!(s.bytes_received, Some(10));
        let again = compute(
            Some(&s),
            Some(1),
            Some(Mode::Subscribe),
            &Observation::Reported(&r),
            t(9),
        );
        assert_eq!(s, again, "no-op reconcile, identical status");

        let mut f = reported(DeclaredState::Failed);
        f.reason = Some("TrustRevoked".into());
        f.message = Some("the publisher refused".into());
        let d = compute(
            Some(&s),
            Some(1),
            Some(Mode::Subscribe),
            &Observation::Reported(&f),
            t(10),
        );
        assert_eq!(d.phase, Some(SharePhase::Degraded));
        assert_eq!(cond(&d, "Degraded").reason, "TrustRevoked");
        assert_eq!(d.version, Some(2), "the version held stays visible");
        // Refused by the publisher, then the publisher unreachable
        // (asleep): still refused (an unreachable publisher is woken for
        // its subscribers, and a refused one woke it every half minute).
        let mut refused = reported(DeclaredState::Failed);
        refused.reason = Some("NotARecipient".into());
        refused.message = Some("not a recipient".into());
        let r1 = compute(
            Some(&d),
            Some(1),
            Some(Mode::Subscribe),
            &Observation::Reported(&refused),
            t(12),
        );
        let mut gone = reported(DeclaredState::Failed);
        gone.reason = Some("PublisherUnreachable".into());
        gone.message = Some("offline".into());
        let r2 = compute(
            Some(&r1),
            Some(1),
            Some(Mode::Subscribe),
            &Observation::Reported(&gone),
            t(13),
        );
        assert_eq!(cond(&r2, "Degraded").reason, "NotARecipient", "{r2:?}");
        assert!(
            cond(&r2, "Degraded")
                .message
                .starts_with("not a recipient (the publisher was unreachable")
        );
        let r3 = compute(
            Some(&r2),
            Some(1),
            Some(Mode::Subscribe),
            &Observation::Reported(&gone),
            t(14),
        );
        assert_eq!(
            cond(&r3, "Degraded").message,
            cond(&r2, "Degraded").message,
            "no growing message"
        );
        // A changed Share starts afresh.
        let r4 = compute(
            Some(&r2),
            Some(2),
            Some(Mode::Subscribe),
            &Observation::Reported(&gone),
            t(15),
        );
        assert_eq!(cond(&r4, "Degraded").reason, "PublisherUnreachable");
        // Another share (the spec now names another): not its version.
        let mut other = reported(DeclaredState::Failed);
        other.share_id = Some("sh1-other".into());
        other.version = 0;
        let o = compute(
            Some(&d),
            Some(2),
            Some(Mode::Subscribe),
            &Observation::Reported(&other),
            t(11),
        );
        assert_eq!(o.share_id.as_deref(), Some("sh1-other"));
        assert_eq!(o.version, None, "another share's version was kept");

        f.reason = Some("<script>".into());
        let d = compute(
            Some(&s),
            Some(1),
            Some(Mode::Subscribe),
            &Observation::Reported(&f),
            t(10),
        );
        assert_eq!(cond(&d, "Degraded").reason, "AgentError");
    }

    #[test]
    fn a_sleeping_publisher_is_not_a_failure() {
        let mut f = reported(DeclaredState::Failed);
        f.reason = Some("PublisherUnreachable".into());
        let s = compute(
            None,
            Some(1),
            Some(Mode::Subscribe),
            &Observation::PublisherAsleep(&f, "Agent alice"),
            t(0),
        );
        assert_eq!(s.phase, Some(SharePhase::Ready));
        let c = cond(&s, "Ready");
        assert_eq!(c.reason, "PublisherAsleep");
        assert!(
            c.message.contains("version 2") && c.message.contains("the publisher, Agent alice,")
        );
        assert_eq!(cond(&s, "Degraded").status, "False");
    }

    #[test]
    fn bad_input_keeps_what_was_known() {
        let r = reported(DeclaredState::Ready);
        let s = compute(
            None,
            Some(1),
            Some(Mode::Publish),
            &Observation::Reported(&r),
            t(0),
        );
        assert_eq!(cond(&s, "Ready").reason, "Published");
        let e = ShareInputError::AgentNotFound("alice".into());
        let d = compute(
            Some(&s),
            Some(2),
            Some(Mode::Publish),
            &Observation::BadInput(&e),
            t(1),
        );
        assert_eq!(d.phase, Some(SharePhase::Degraded));
        assert_eq!(cond(&d, "Degraded").reason, "AgentNotFound");
        assert_eq!(d.share_id.as_deref(), Some("sh"));
        assert_eq!(d.observed_generation, Some(2));
        let w = compute(
            Some(&d),
            Some(2),
            Some(Mode::Publish),
            &Observation::AgentNotReady("x"),
            t(2),
        );
        assert_eq!(w.phase, Some(SharePhase::Pending));
    }
}
