//! Condition helpers shared by the Share and TrustGrant status code: the
//! Ready / Progressing / Degraded triple, transition times that only move
//! when a status flips, and the Events a change deserves. Pure.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Condition types (Agents, Shares and TrustGrants).
pub const READY: &str = "Ready";
/// See [`READY`].
pub const PROGRESSING: &str = "Progressing";
/// See [`READY`].
pub const DEGRADED: &str = "Degraded";
/// An Agent with `spec.scaleToZero`: True while the pod runs, False while
/// scaled to zero.
pub const AWAKE: &str = "Awake";

/// An Event to publish because something changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// Warning (needs a human) or Normal.
    pub warning: bool,
    /// PascalCase reason.
    pub reason: String,
    /// Human-readable note.
    pub note: String,
}

/// One condition.
pub fn make(
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(now),
    }
}

/// Which of the three conditions are true, with one reason and message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Summary {
    /// Ready=True.
    Ready,
    /// Progressing=True, Ready=False.
    Progressing,
    /// Degraded=True, Ready=False: a human (or a fix elsewhere) is needed.
    Degraded,
}

/// The triple for a summary. Unchanged conditions keep the transition time
/// of `previous`, so a no-op reconcile computes an identical status.
pub fn triple(
    previous: &[Condition],
    summary: Summary,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let (r, p, d) = match summary {
        Summary::Ready => (true, false, false),
        Summary::Progressing => (false, true, false),
        Summary::Degraded => (false, false, true),
    };
    let calm = |ok: bool| if ok { reason } else { "AsExpected" };
    let mut out = vec![
        make(READY, r, reason, message, generation, now),
        make(
            PROGRESSING,
            p,
            if p || summary == Summary::Degraded {
                reason
            } else {
                "Idle"
            },
            message,
            generation,
            now,
        ),
        make(
            DEGRADED,
            d,
            calm(d),
            if d { message } else { "no problems found" },
            generation,
            now,
        ),
    ];
    for c in &mut out {
        if let Some(old) = previous.iter().find(|o| o.type_ == c.type_)
            && old.status == c.status
        {
            c.last_transition_time = old.last_transition_time.clone();
        }
    }
    out
}

fn find<'a>(cs: &'a [Condition], t: &str) -> Option<&'a Condition> {
    cs.iter().find(|c| c.type_ == t)
}

/// Events for the move from `old` to `new`: a Warning when Degraded turns
/// true or changes reason, `Recovered` when it clears, a Normal event with
/// Progressing's reason when it starts or changes reason (waiting for the
/// Agent, fetching…), and one with Ready's reason when Ready turns true.
pub fn transitions(old: &[Condition], new: &[Condition]) -> Vec<Transition> {
    let mut out = Vec::new();
    if let Some(nd) = find(new, DEGRADED) {
        let od = find(old, DEGRADED);
        let was = od.is_some_and(|o| o.status == "True");
        if nd.status == "True" && (!was || od.is_some_and(|o| o.reason != nd.reason)) {
            out.push(Transition {
                warning: true,
                reason: nd.reason.clone(),
                note: nd.message.clone(),
            });
        } else if nd.status == "False" && was {
            out.push(Transition {
                warning: false,
                reason: "Recovered".into(),
                note: "the problem is gone".into(),
            });
        }
    }
    if let Some(np) = find(new, PROGRESSING)
        && np.status == "True"
        && find(old, PROGRESSING).is_none_or(|o| o.status != "True" || o.reason != np.reason)
    {
        out.push(Transition {
            warning: false,
            reason: np.reason.clone(),
            note: np.message.clone(),
        });
    }
    if let Some(nr) = find(new, READY)
        && nr.status == "True"
        && find(old, READY).is_none_or(|o| o.status != "True" || o.reason != nr.reason)
    {
        out.push(Transition {
            warning: false,
            reason: nr.reason.clone(),
            note: nr.message.clone(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    #[test]
    fn unchanged_statuses_keep_their_time() {
        let a = triple(&[], Summary::Progressing, "Fetching", "m", Some(1), t(0));
        let b = triple(&a, Summary::Progressing, "Fetching", "m", Some(1), t(5));
        assert_eq!(a, b);
        let c = triple(&b, Summary::Ready, "Synced", "v1", Some(1), t(9));
        assert_eq!(find(&c, READY).unwrap().last_transition_time, Time(t(9)));
        assert_eq!(find(&c, DEGRADED).unwrap().last_transition_time, Time(t(0)));
    }

    #[test]
    fn events_follow_real_transitions_only() {
        let p = triple(&[], Summary::Progressing, "Fetching", "m", Some(1), t(0));
        let ev = transitions(&[], &p);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].reason, "Fetching");
        assert!(transitions(&p, &p).is_empty());
        let d = triple(&p, Summary::Degraded, "TrustRevoked", "gone", Some(1), t(1));
        let ev = transitions(&p, &d);
        assert_eq!(ev.len(), 1);
        assert!(ev[0].warning);
        assert_eq!(ev[0].reason, "TrustRevoked");
        assert!(transitions(&d, &d).is_empty());
        let r = triple(&d, Summary::Ready, "Synced", "v2", Some(1), t(2));
        let reasons: Vec<_> = transitions(&d, &r).into_iter().map(|e| e.reason).collect();
        assert_eq!(reasons, ["Recovered", "Synced"]);
    }
}
