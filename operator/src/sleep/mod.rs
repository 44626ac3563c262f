//! Scale to zero (`spec.scaleToZero`): whether an Agent's pod should run,
//! and why. Pure: the reconciler gathers the inputs (the Agent's status, the
//! Shares and TrustGrants in the cluster, the agent's `GET /v1/activity`)
//! and applies the [`Decision`] as the Deployment's replicas, the `Awake`
//! condition, `status.wakeAt` and a requeue.
//!
//! The rules (docs/operator.md, "Scale to zero"):
//! - **Work in the cluster wakes it** ([`cluster_work`]): a Share or
//!   TrustGrant of this Agent that is new, changed, being deleted or not
//!   settled; a subscribe Share anywhere whose publisher is this agent and
//!   that is not synced (unless this agent's share is offline-seeded, so
//!   the bucket serves it); a subscribe Share of this Agent whose publisher
//!   Share in the cluster has a newer version.
//! - **Scheduled work wakes it**: at `wakeAt` (the agent's next rescan or
//!   URL refresh, as it reported before sleeping).
//! - **Idleness puts it to sleep**: awake, reachable, nothing pending, and
//!   no fetch, serve, publish or declared change for `idleAfter`. A fresh
//!   process counts as active when it started, except when it was woken
//!   only for scheduled work: then it sleeps again as soon as that work is
//!   done and brought nothing new.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::agent_api::ActivityReport;
use crate::conditions;
use crate::crd::{AgentStatus, ScaleToZeroSpec};

mod work;
pub use work::{Work, cluster_work, subscription, up_to_date};

pub use crate::conditions::AWAKE;
/// Shortest `idleAfter`.
pub const MIN_IDLE_SECS: u64 = 10;
/// Longest `idleAfter` (a day).
pub const MAX_IDLE_SECS: u64 = 86_400;
/// How often a busy agent is asked again.
pub const BUSY_POLL: Duration = Duration::from_secs(10);
/// How often an agent that cannot answer yet (starting) is asked again.
pub const START_POLL: Duration = Duration::from_secs(5);
/// Longest wait between two looks at an agent (awake or asleep).
pub const MAX_POLL: Duration = Duration::from_secs(60);
/// Longest requeue of a sleeping agent (Share and TrustGrant changes
/// trigger a reconcile at once; this only bounds drift).
pub const SLEEP_RESYNC: Duration = Duration::from_secs(300);

/// Reasons of the Awake condition.
pub mod reasons {
    /// Asleep: nothing to do for `idleAfter`.
    pub const IDLE: &str = "Idle";
    /// Awake: a Share of this Agent is new or changed.
    pub const SHARE_CHANGED: &str = "ShareChanged";
    /// Awake: a Share of this Agent is publishing or fetching.
    pub const SHARE_IN_PROGRESS: &str = "ShareInProgress";
    /// Awake: a Share of this Agent is being deleted (the agent must stop).
    pub const SHARE_DELETING: &str = "ShareDeleting";
    /// Awake: a Share of this Agent retries an unreachable peer.
    pub const SHARE_RETRYING: &str = "ShareRetrying";
    /// Awake: a TrustGrant issued by this Agent is new, changed or unpublished.
    pub const GRANT_CHANGED: &str = "GrantChanged";
    /// Awake: a TrustGrant issued by this Agent is being deleted (revocation).
    pub const GRANT_DELETING: &str = "GrantDeleting";
    /// Awake: a subscribe Share in the cluster needs this agent as publisher.
    pub const FETCH_NEEDS_PUBLISHER: &str = "FetchNeedsPublisher";
    /// Awake: the publisher of a share this Agent follows has a newer version.
    pub const NEW_VERSION: &str = "NewVersion";
    /// Awake: a rescan or URL refresh was due.
    pub const SCHEDULED: &str = "ScheduledWork";
    /// Awake: the agent reports work in progress.
    pub const BUSY: &str = "Busy";
    /// Awake: recent activity; sleeps after `idleAfter` without any.
    pub const ACTIVE: &str = "Active";
    /// Awake: the pod is starting and has not reported yet.
    pub const STARTING: &str = "Starting";
}

/// `spec.scaleToZero.idleAfter` as a duration, or why it is wrong.
pub fn idle_after(spec: &ScaleToZeroSpec) -> Result<Duration, String> {
    match crate::shares::plan::parse_interval(&spec.idle_after) {
        Some(n) if (MIN_IDLE_SECS..=MAX_IDLE_SECS).contains(&n) => Ok(Duration::from_secs(n)),
        _ => Err(format!(
            "spec.scaleToZero.idleAfter {:?} must be a duration like 30s, 15m or 1h, between \
             {MIN_IDLE_SECS}s and 24h",
            spec.idle_after
        )),
    }
}

/// What the reconciler knows when it decides.
#[derive(Clone, Debug)]
pub struct Inputs<'a> {
    /// Now.
    pub now: Timestamp,
    /// `spec.scaleToZero.idleAfter`.
    pub idle_after: Duration,
    /// The Agent's stored status.
    pub previous: Option<&'a AgentStatus>,
    /// Work in the cluster ([`cluster_work`]).
    pub work: Option<&'a Work>,
    /// The agent's report; `None` when it was not asked (asleep) or did
    /// not answer (starting, unreachable).
    pub report: Option<&'a ActivityReport>,
}

/// Whether the pod should run, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// One replica (true) or none.
    pub awake: bool,
    /// Reason of the Awake condition (one of [`reasons`]).
    pub reason: &'static str,
    /// Message of the Awake condition (stable while nothing changes, so a
    /// no-op reconcile patches nothing).
    pub message: String,
    /// `status.wakeAt`.
    pub wake_at: Option<Timestamp>,
    /// When to look again.
    pub requeue: Duration,
}

impl Decision {
    /// The Deployment's replicas.
    pub fn replicas(&self) -> i32 {
        i32::from(self.awake)
    }
}

fn awake_condition(s: Option<&AgentStatus>) -> Option<&Condition> {
    s?.conditions.iter().find(|c| c.type_ == AWAKE)
}

/// Whether the stored status says the agent sleeps.
pub fn sleeping(s: Option<&AgentStatus>) -> bool {
    awake_condition(s).is_some_and(|c| c.status == "False")
}

/// `30s`, `15m`, `2h` (the largest unit that divides it), for messages.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s >= 60 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

fn until(now: Timestamp, at: Timestamp) -> Duration {
    let d = at.duration_since(now);
    if d.is_negative() {
        Duration::ZERO
    } else {
        d.unsigned_abs()
    }
}

fn clamp(d: Duration, lo: Duration, hi: Duration) -> Duration {
    d.max(lo).min(hi)
}

/// The decision (see the module docs).
pub fn decide(i: &Inputs<'_>) -> Decision {
    let prev = i.previous;
    let prev_awake = awake_condition(prev);
    let was_sleeping = sleeping(prev);
    let stored_wake = prev.and_then(|p| p.wake_at.as_ref()).map(|t| t.0);
    let awake = |reason, message, wake_at, requeue| Decision {
        awake: true,
        reason,
        message,
        wake_at,
        requeue,
    };
    if let Some(w) = i.work {
        return awake(w.reason, w.message.clone(), None, BUSY_POLL);
    }
    if was_sleeping {
        return match stored_wake {
            Some(at) if at <= i.now => awake(
                reasons::SCHEDULED,
                format!(
                    "woken for scheduled work due at {at}: {}",
                    prev_awake
                        .and_then(|c| c.message.split_once("; next: "))
                        .map(|(_, w)| w)
                        .unwrap_or("a rescan or URL refresh")
                ),
                Some(at),
                START_POLL,
            ),
            _ => Decision {
                awake: false,
                reason: reasons::IDLE,
                message: prev_awake
                    .map(|c| c.message.clone())
                    .unwrap_or_else(|| "idle".into()),
                wake_at: stored_wake,
                requeue: stored_wake
                    .map(|at| clamp(until(i.now, at), Duration::from_secs(1), SLEEP_RESYNC))
                    .unwrap_or(SLEEP_RESYNC),
            },
        };
    }
    // Awake: woken for scheduled work (and nothing else since)?
    let scheduled = prev_awake.is_some_and(|c| c.status == "True") && stored_wake.is_some();
    let keep = |fallback_reason, fallback: String| match prev_awake {
        Some(c) if c.status == "True" => (
            reason_of(&c.reason).unwrap_or(fallback_reason),
            c.message.clone(),
        ),
        _ => (fallback_reason, fallback),
    };
    let Some(r) = i.report else {
        let (reason, message) = keep(
            reasons::STARTING,
            "waiting for the agent to report its activity".into(),
        );
        return awake(reason, message, stored_wake, START_POLL);
    };
    if let Some(p) = r.pending.first() {
        return awake(
            reasons::BUSY,
            format!("pending: {p}"),
            stored_wake.filter(|_| scheduled),
            BUSY_POLL,
        );
    }
    let idle = match r.idle_secs {
        Some(s) => s,
        None if scheduled => u64::MAX,
        None => r.uptime_secs,
    };
    let limit = i.idle_after.as_secs();
    if idle >= limit {
        let wake_at = r
            .next_wake_unix
            .and_then(|u| i64::try_from(u).ok())
            .and_then(|u| Timestamp::from_second(u).ok());
        let mut message = format!(
            "no fetch, serve or pending work for {}",
            human(i.idle_after)
        );
        if let (Some(at), Some(what)) = (wake_at, r.next_wake_reason.as_deref()) {
            message.push_str(&format!(
                "; next: {} at {at}",
                crate::agent_api::bounded(what)
            ));
        }
        return Decision {
            awake: false,
            reason: reasons::IDLE,
            message,
            wake_at,
            requeue: wake_at
                .map(|at| clamp(until(i.now, at), Duration::from_secs(1), SLEEP_RESYNC))
                .unwrap_or(SLEEP_RESYNC),
        };
    }
    let message = format!(
        "last activity: {}; sleeps after {} without fetch, serve or pending work",
        r.last_activity
            .as_deref()
            .map(crate::agent_api::bounded)
            .unwrap_or_else(|| "the agent started".into()),
        human(i.idle_after)
    );
    awake(
        reasons::ACTIVE,
        message,
        stored_wake.filter(|_| scheduled),
        clamp(
            Duration::from_secs(limit.saturating_sub(idle)),
            Duration::from_secs(1),
            MAX_POLL,
        ),
    )
}

/// A stored reason as one of ours (a status written by hand keeps nothing).
fn reason_of(r: &str) -> Option<&'static str> {
    [
        reasons::IDLE,
        reasons::SHARE_CHANGED,
        reasons::SHARE_IN_PROGRESS,
        reasons::SHARE_DELETING,
        reasons::SHARE_RETRYING,
        reasons::GRANT_CHANGED,
        reasons::GRANT_DELETING,
        reasons::FETCH_NEEDS_PUBLISHER,
        reasons::NEW_VERSION,
        reasons::SCHEDULED,
        reasons::BUSY,
        reasons::ACTIVE,
        reasons::STARTING,
    ]
    .into_iter()
    .find(|x| *x == r)
}

/// Writes the decision into a computed status: the Awake condition (its
/// transition time kept while its status holds) and `wakeAt`.
pub fn apply(
    status: &mut AgentStatus,
    previous: Option<&AgentStatus>,
    d: &Decision,
    generation: Option<i64>,
    now: Timestamp,
) {
    let mut c = conditions::make(AWAKE, d.awake, d.reason, d.message.clone(), generation, now);
    if let Some(old) = awake_condition(previous)
        && old.status == c.status
    {
        c.last_transition_time = old.last_transition_time.clone();
    }
    status.conditions.retain(|c| c.type_ != AWAKE);
    status.conditions.push(c);
    status.wake_at = d.wake_at.map(Time);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    const IDLE: Duration = Duration::from_secs(900);

    fn report(idle: Option<u64>, uptime: u64) -> ActivityReport {
        ActivityReport {
            uptime_secs: uptime,
            idle_secs: idle,
            last_activity: idle.map(|_| "serve".into()),
            ..Default::default()
        }
    }

    fn status_after(prev: Option<&AgentStatus>, d: &Decision, now: Timestamp) -> AgentStatus {
        let mut s = prev.cloned().unwrap_or_default();
        apply(&mut s, prev, d, Some(1), now);
        s
    }

    fn decide_at(
        prev: Option<&AgentStatus>,
        work: Option<&Work>,
        r: Option<&ActivityReport>,
        now: Timestamp,
    ) -> Decision {
        decide(&Inputs {
            now,
            idle_after: IDLE,
            previous: prev,
            work,
            report: r,
        })
    }

    #[test]
    fn idle_after_is_a_bounded_duration() {
        let s = |v: &str| ScaleToZeroSpec {
            idle_after: v.into(),
        };
        assert_eq!(idle_after(&s("15m")), Ok(Duration::from_secs(900)));
        assert_eq!(idle_after(&s("20s")), Ok(Duration::from_secs(20)));
        for bad in [
            "5s",
            "25h",
            "15",
            "m",
            "",
            "1d",
            "-5m",
            "99999999999999999999h",
        ] {
            let e = idle_after(&s(bad)).unwrap_err();
            assert!(e.contains("spec.scaleToZero.idleAfter"), "{bad}: {e}");
        }
        assert_eq!(ScaleToZeroSpec::default().idle_after, "15m");
    }

    #[test]
    fn a_fresh_agent_stays_up_for_idle_after_then_sleeps() {
        // Just started, no activity: counts as active since it started.
        let d = decide_at(None, None, Some(&report(None, 10)), t(0));
        assert!(d.awake);
        assert_eq!(d.reason, reasons::ACTIVE);
        assert!(d.message.contains("the agent started"), "{}", d.message);
        assert_eq!(d.requeue, MAX_POLL);
        let d = decide_at(None, None, Some(&report(Some(10), 10)), t(0));
        let s = status_after(None, &d, t(0));
        // Recent serve: awake, asked again when idleAfter would be reached.
        let d = decide_at(Some(&s), None, Some(&report(Some(880), 2000)), t(5));
        assert!(d.awake);
        assert_eq!(d.requeue, Duration::from_secs(20));
        assert_eq!(status_after(Some(&s), &d, t(5)), s, "no-op: same status");
        // Idle long enough: sleeps, woken at its next rescan.
        let mut r = report(Some(900), 2000);
        r.next_wake_unix = Some(1_800_000_600);
        r.next_wake_reason = Some("rescan of share photos".into());
        let d = decide_at(Some(&s), None, Some(&r), t(25));
        assert!(!d.awake);
        assert_eq!(d.replicas(), 0);
        assert_eq!(d.reason, reasons::IDLE);
        assert_eq!(d.wake_at, Some(t(600)));
        assert_eq!(d.requeue, SLEEP_RESYNC, "long waits are bounded");
        assert!(d.message.contains("15m"), "{}", d.message);
        assert!(
            d.message.contains("rescan of share photos"),
            "{}",
            d.message
        );
        let asleep = status_after(Some(&s), &d, t(25));
        assert!(sleeping(Some(&asleep)));
        assert_eq!(asleep.wake_at, Some(Time(t(600))));
        let c = asleep.conditions.iter().find(|c| c.type_ == AWAKE).unwrap();
        assert_eq!(
            (c.status.as_str(), c.last_transition_time.clone()),
            ("False", Time(t(25)))
        );
    }

    #[test]
    fn pending_work_and_an_unanswered_agent_keep_it_awake() {
        let mut r = report(Some(5000), 6000);
        r.pending = vec!["fetch of share x running".into()];
        let d = decide_at(None, None, Some(&r), t(0));
        assert!(d.awake);
        assert_eq!(d.reason, reasons::BUSY);
        assert_eq!(d.message, "pending: fetch of share x running");
        assert_eq!(d.requeue, BUSY_POLL);
        let d = decide_at(None, None, None, t(0));
        assert!(d.awake);
        assert_eq!(d.reason, reasons::STARTING);
        assert_eq!(d.requeue, START_POLL);
    }

    #[test]
    fn a_sleeping_agent_wakes_for_work_or_when_scheduled_work_is_due() {
        let mut r = report(Some(900), 2000);
        r.next_wake_unix = Some(1_800_000_600);
        r.next_wake_reason = Some("rescan of share photos".into());
        let d = decide_at(None, None, Some(&r), t(0));
        let asleep = status_after(None, &d, t(0));
        // Nothing to do: stays asleep, no new status, requeued for wakeAt.
        let d2 = decide_at(Some(&asleep), None, None, t(400));
        assert!(!d2.awake);
        assert_eq!(d2.requeue, Duration::from_secs(200));
        assert_eq!(status_after(Some(&asleep), &d2, t(400)), asleep);
        // A Share change wakes it at once.
        let w = Work {
            reason: reasons::SHARE_CHANGED,
            message: "Share photos changed".into(),
        };
        let d3 = decide_at(Some(&asleep), Some(&w), None, t(401));
        assert!(d3.awake);
        assert_eq!(
            (d3.reason, d3.message.as_str()),
            (reasons::SHARE_CHANGED, "Share photos changed")
        );
        assert_eq!(d3.wake_at, None);
        // The rescan comes due: woken for it.
        let d4 = decide_at(Some(&asleep), None, None, t(600));
        assert!(d4.awake);
        assert_eq!(d4.reason, reasons::SCHEDULED);
        assert!(
            d4.message.contains("rescan of share photos"),
            "{}",
            d4.message
        );
        let woke = status_after(Some(&asleep), &d4, t(600));
        // It rescans (busy), then found nothing new: sleeps again at once,
        // without waiting idleAfter.
        let mut busy = report(None, 3);
        busy.pending = vec!["declared share photos is not settled yet".into()];
        let d5 = decide_at(Some(&woke), None, Some(&busy), t(605));
        assert!(d5.awake);
        let s5 = status_after(Some(&woke), &d5, t(605));
        let mut done = report(None, 8);
        done.next_wake_unix = Some(1_800_000_900);
        done.next_wake_reason = Some("rescan of share photos".into());
        let d6 = decide_at(Some(&s5), None, Some(&done), t(610));
        assert!(!d6.awake, "{d6:?}");
        assert_eq!(d6.wake_at, Some(t(900)));
        // Had the rescan published a new version, it would stay up.
        let mut published = report(Some(2), 8);
        published.last_activity = Some("publish".into());
        let d7 = decide_at(Some(&s5), None, Some(&published), t(610));
        assert!(d7.awake);
        assert_eq!(d7.reason, reasons::ACTIVE);
    }

    #[test]
    fn woken_for_a_share_change_it_stays_up_for_idle_after() {
        let asleep = status_after(
            None,
            &decide_at(None, None, Some(&report(Some(900), 900)), t(0)),
            t(0),
        );
        let w = Work {
            reason: reasons::SHARE_CHANGED,
            message: "Share photos changed".into(),
        };
        let woke = status_after(
            Some(&asleep),
            &decide_at(Some(&asleep), Some(&w), None, t(10)),
            t(10),
        );
        // New pod, nothing recorded yet: active since it started.
        let d = decide_at(Some(&woke), None, Some(&report(None, 30)), t(40));
        assert!(d.awake);
        assert_eq!(d.requeue, MAX_POLL);
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_secs(900)), "15m");
        assert_eq!(human(Duration::from_secs(7200)), "2h");
        assert_eq!(human(Duration::from_secs(90)), "90s");
    }
}
