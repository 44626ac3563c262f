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

use caravan_agent::ticket::Ticket;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::agent_api::ActivityReport;
use crate::conditions;
use crate::crd::share::ShareSpec;
use crate::crd::{AgentStatus, ScaleToZeroSpec, Share, SharePhase, TrustGrant};

/// The condition type: True while the pod runs, False while scaled to zero.
pub const AWAKE: &str = "Awake";
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

/// Something in the cluster the agent must be awake for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Work {
    /// One of [`reasons`].
    pub reason: &'static str,
    /// For people: which object and why.
    pub message: String,
}

fn work(reason: &'static str, message: String) -> Option<Work> {
    Some(Work { reason, message })
}

/// Degraded reasons that the agent retries by itself (it must be awake to).
const RETRIED: &[&str] = &["PublisherUnreachable", "AgentUnreachable"];

fn degraded_reason(s: &Share) -> Option<&str> {
    s.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == crate::status::DEGRADED && c.status == "True")
        .map(|c| c.reason.as_str())
}

/// Why a Share needs its own agent awake, if it does.
fn share_needs_agent(s: &Share) -> Option<(&'static str, &'static str)> {
    if s.metadata.deletion_timestamp.is_some() {
        return Some((reasons::SHARE_DELETING, "is being deleted"));
    }
    let Some(st) = s.status.as_ref() else {
        return Some((reasons::SHARE_CHANGED, "is new"));
    };
    if st.observed_generation != s.metadata.generation {
        return Some((reasons::SHARE_CHANGED, "changed"));
    }
    match st.phase {
        None | Some(SharePhase::Pending) | Some(SharePhase::Progressing) => {
            Some((reasons::SHARE_IN_PROGRESS, "is not settled"))
        }
        Some(SharePhase::Degraded) if degraded_reason(s).is_some_and(|r| RETRIED.contains(&r)) => {
            Some((reasons::SHARE_RETRYING, "retries an unreachable peer"))
        }
        Some(SharePhase::Ready) | Some(SharePhase::Degraded) => None,
    }
}

/// Why a TrustGrant needs its issuer awake, if it does.
fn grant_needs_issuer(g: &TrustGrant) -> Option<(&'static str, &'static str)> {
    if g.metadata.deletion_timestamp.is_some() {
        return Some((
            reasons::GRANT_DELETING,
            "is being deleted (its revocation is signed)",
        ));
    }
    let Some(st) = g.status.as_ref() else {
        return Some((reasons::GRANT_CHANGED, "is new"));
    };
    if st.observed_generation != g.metadata.generation {
        return Some((reasons::GRANT_CHANGED, "changed"));
    }
    let ready = st
        .conditions
        .iter()
        .any(|c| c.type_ == crate::status::READY && c.status == "True");
    let progressing = st
        .conditions
        .iter()
        .any(|c| c.type_ == crate::status::PROGRESSING && c.status == "True");
    (!ready && progressing).then_some((reasons::GRANT_CHANGED, "is not published yet"))
}

/// The publisher and share id a subscribe Share names, as far as known
/// (spec, status, or its inline ticket); `None` for a publish Share.
pub fn subscription(spec: &ShareSpec, s: &Share) -> Option<(Option<String>, Option<String>)> {
    let sub = spec.subscribe.as_ref()?;
    let st = s.status.as_ref();
    let ticket = sub
        .ticket
        .as_deref()
        .filter(|t| t.len() <= 65_536)
        .and_then(|t| Ticket::parse(t.trim()).ok());
    let publisher = sub
        .publisher
        .clone()
        .or_else(|| st.and_then(|s| s.publisher.clone()))
        .or_else(|| ticket.as_ref().map(|t| t.publisher.to_string()));
    let share_id = sub
        .share_id
        .clone()
        .or_else(|| st.and_then(|s| s.share_id.clone()))
        .or_else(|| ticket.as_ref().map(|t| t.share_id.to_string()));
    Some((publisher, share_id))
}

/// Whether a subscribe Share already holds the newest version that a
/// publish Share in the cluster reports for its share: then a failed poll
/// (publisher unreachable, e.g. asleep) misses nothing, and waking anyone
/// for it would be wasted. Unknown publishers (outside the cluster): false.
pub fn up_to_date(s: &Share, shares: &[Share]) -> bool {
    let Some(st) = s.status.as_ref().filter(|_| s.spec.subscribe.is_some()) else {
        return false;
    };
    if st.observed_generation != s.metadata.generation
        || !matches!(st.phase, Some(SharePhase::Ready | SharePhase::Degraded))
    {
        return false;
    }
    let (Some(id), Some(held)) = (st.share_id.as_deref(), st.version) else {
        return false;
    };
    shares
        .iter()
        .filter(|p| p.spec.publish.is_some())
        .filter_map(|p| p.status.as_ref())
        .find(|ps| ps.share_id.as_deref() == Some(id))
        .and_then(|ps| ps.version)
        .is_some_and(|v| held >= v)
}

/// The first piece of work in the cluster for Agent `name` in `ns` (agent
/// id `agent_id` once it has one), given every Share and the TrustGrants of
/// its namespace. Checked in the order of the module docs.
pub fn cluster_work(
    ns: &str,
    name: &str,
    agent_id: Option<&str>,
    shares: &[Share],
    grants: &[TrustGrant],
) -> Option<Work> {
    let in_ns = |o: &Option<String>| o.as_deref() == Some(ns);
    let mine: Vec<&Share> = shares
        .iter()
        .filter(|s| in_ns(&s.metadata.namespace) && s.spec.agent == name)
        .collect();
    for s in &mine {
        if let Some((reason, why)) = share_needs_agent(s) {
            if reason == reasons::SHARE_RETRYING && up_to_date(s, shares) {
                continue;
            }
            return work(reason, format!("Share {} {why}", s.name_any()));
        }
    }
    for g in grants
        .iter()
        .filter(|g| in_ns(&g.metadata.namespace) && g.spec.issuer == name)
    {
        if let Some((reason, why)) = grant_needs_issuer(g) {
            return work(reason, format!("TrustGrant {} {why}", g.name_any()));
        }
    }
    // Subscribers anywhere in the cluster fetching from this agent.
    if let Some(me) = agent_id {
        let my_publish: Vec<(&Share, Option<&str>)> = mine
            .iter()
            .filter(|s| s.spec.publish.is_some())
            .map(|s| (*s, s.status.as_ref().and_then(|st| st.share_id.as_deref())))
            .collect();
        let offline = |s: &Share| s.spec.publish.as_ref().is_some_and(|p| p.offline_seeding);
        for s in shares {
            let Some((Some(publisher), share_id)) = subscription(&s.spec, s) else {
                continue;
            };
            if publisher != me || s.metadata.deletion_timestamp.is_some() {
                continue;
            }
            if share_needs_agent(s).is_none() || up_to_date(s, shares) {
                continue;
            }
            let seeded = match share_id.as_deref() {
                Some(id) => my_publish
                    .iter()
                    .any(|(p, pid)| *pid == Some(id) && offline(p)),
                // Unknown share: only when everything this agent publishes
                // is offline-seeded can the bucket serve it for sure.
                None => !my_publish.is_empty() && my_publish.iter().all(|(p, _)| offline(p)),
            };
            if !seeded {
                return work(
                    reasons::FETCH_NEEDS_PUBLISHER,
                    format!(
                        "Share {}/{} fetches from this agent, which has no offline seeding for it",
                        s.namespace().unwrap_or_default(),
                        s.name_any()
                    ),
                );
            }
        }
    }
    // Shares this Agent follows whose publisher (in the cluster) is ahead.
    for s in mine.iter().filter(|s| s.spec.subscribe.is_some()) {
        let Some(st) = s.status.as_ref() else {
            continue;
        };
        let (Some(id), Some(held)) = (st.share_id.as_deref(), st.version) else {
            continue;
        };
        let newer = shares.iter().find(|p| {
            p.spec.publish.is_some()
                && p.status.as_ref().is_some_and(|ps| {
                    ps.share_id.as_deref() == Some(id) && ps.version.is_some_and(|v| v > held)
                })
        });
        if let Some(p) = newer {
            return work(
                reasons::NEW_VERSION,
                format!(
                    "Share {} holds version {held}; its publisher's Share {}/{} has version {}",
                    s.name_any(),
                    p.namespace().unwrap_or_default(),
                    p.name_any(),
                    p.status
                        .as_ref()
                        .and_then(|ps| ps.version)
                        .unwrap_or_default()
                ),
            );
        }
    }
    None
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
    use crate::crd::share::{PublishSpec, RecipientsSpec, ShareStatus, SubscribeSpec};
    use crate::crd::trust_grant::{TrustGrantSpec, TrustGrantStatus};
    use caravan_agent::identity::SecretKey;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn id(seed: u8) -> String {
        SecretKey::from_seed([seed; 32]).agent_id().to_string()
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

    fn share(ns: &str, name: &str, agent: &str) -> Share {
        let mut s = Share::new(
            name,
            ShareSpec {
                agent: agent.into(),
                publish: None,
                subscribe: None,
            },
        );
        s.metadata.namespace = Some(ns.into());
        s.metadata.generation = Some(1);
        s
    }

    fn settled(mut s: Share, share_id: &str, version: u64) -> Share {
        s.status = Some(ShareStatus {
            share_id: Some(share_id.into()),
            version: Some(version),
            phase: Some(SharePhase::Ready),
            observed_generation: Some(1),
            ..Default::default()
        });
        s
    }

    fn publish(ns: &str, name: &str, agent: &str, offline: bool) -> Share {
        let mut s = share(ns, name, agent);
        s.spec.publish = Some(PublishSpec {
            path: "photos".into(),
            recipients: RecipientsSpec {
                agent_ids: vec![id(2)],
                trusted_within_depth: None,
            },
            offline_seeding: offline,
            rescan_interval: "5m".into(),
        });
        s
    }

    fn subscribe(ns: &str, name: &str, agent: &str, publisher: &str) -> Share {
        let mut s = share(ns, name, agent);
        s.spec.subscribe = Some(SubscribeSpec {
            ticket: None,
            ticket_secret_ref: None,
            share_id: Some("sh-1".into()),
            publisher: Some(publisher.into()),
            destination: "in".into(),
            poll_interval: "30s".into(),
        });
        s
    }

    fn grant(ns: &str, issuer: &str) -> TrustGrant {
        let mut g = TrustGrant::new(
            "g",
            TrustGrantSpec {
                issuer: issuer.into(),
                subject: id(3),
                depth: 0,
                scope: String::new(),
                expires: None,
            },
        );
        g.metadata.namespace = Some(ns.into());
        g.metadata.generation = Some(1);
        g
    }

    #[test]
    fn cluster_work_finds_what_needs_the_agent() {
        let alice = id(1);
        let w = |shares: &[Share], grants: &[TrustGrant]| {
            cluster_work("t-a", "alice", Some(&alice), shares, grants).map(|w| w.reason)
        };
        let ready = settled(publish("t-a", "photos", "alice", false), "sh-1", 1);
        assert_eq!(
            w(std::slice::from_ref(&ready), &[]),
            None,
            "settled: no work"
        );
        // Same name in another namespace, or another Agent: not ours.
        assert_eq!(w(&[publish("t-b", "photos", "alice", false)], &[]), None);
        assert_eq!(w(&[publish("t-a", "photos", "bob", false)], &[]), None);
        // New, changed, being deleted.
        assert_eq!(
            w(&[publish("t-a", "photos", "alice", false)], &[]),
            Some(reasons::SHARE_CHANGED)
        );
        let mut changed = ready.clone();
        changed.metadata.generation = Some(2);
        assert_eq!(w(&[changed], &[]), Some(reasons::SHARE_CHANGED));
        let mut deleting = ready.clone();
        deleting.metadata.deletion_timestamp = Some(Time(t(0)));
        assert_eq!(w(&[deleting], &[]), Some(reasons::SHARE_DELETING));
        // Pending (e.g. WaitingForAgent while asleep) or retrying.
        let mut pending = ready.clone();
        pending.status.as_mut().unwrap().phase = Some(SharePhase::Pending);
        assert_eq!(w(&[pending], &[]), Some(reasons::SHARE_IN_PROGRESS));
        let degraded = |reason: &str| {
            let mut d = ready.clone();
            let st = d.status.as_mut().unwrap();
            st.phase = Some(SharePhase::Degraded);
            st.conditions = conditions::triple(
                &[],
                conditions::Summary::Degraded,
                reason,
                "m",
                Some(1),
                t(0),
            );
            d
        };
        assert_eq!(
            w(&[degraded("PublisherUnreachable")], &[]),
            Some(reasons::SHARE_RETRYING)
        );
        assert_eq!(
            w(&[degraded("PathNotFound")], &[]),
            None,
            "needs a human, not the pod"
        );
        // Grants it issued.
        assert_eq!(
            w(&[], &[grant("t-a", "alice")]),
            Some(reasons::GRANT_CHANGED)
        );
        assert_eq!(w(&[], &[grant("t-a", "bob")]), None);
        let mut published = grant("t-a", "alice");
        published.status = Some(TrustGrantStatus {
            published: true,
            conditions: conditions::triple(
                &[],
                conditions::Summary::Ready,
                "Published",
                "m",
                Some(1),
                t(0),
            ),
            observed_generation: Some(1),
            ..Default::default()
        });
        assert_eq!(w(&[], std::slice::from_ref(&published)), None);
        let mut revoking = published.clone();
        revoking.metadata.deletion_timestamp = Some(Time(t(0)));
        assert_eq!(w(&[], &[revoking]), Some(reasons::GRANT_DELETING));
    }

    #[test]
    fn subscribers_wake_a_publisher_without_offline_seeding() {
        let alice = id(1);
        let w = |shares: &[Share]| {
            cluster_work("t-a", "alice", Some(&alice), shares, &[]).map(|w| (w.reason, w.message))
        };
        let photos = settled(publish("t-a", "photos", "alice", false), "sh-1", 1);
        let fetching = subscribe("t-b", "from-alice", "bob", &alice);
        let (reason, message) = w(&[photos.clone(), fetching.clone()]).unwrap();
        assert_eq!(reason, reasons::FETCH_NEEDS_PUBLISHER);
        assert!(message.contains("t-b/from-alice"), "{message}");
        // Synced: nothing needed.
        let synced = settled(fetching.clone(), "sh-1", 1);
        assert_eq!(w(&[photos.clone(), synced.clone()]), None);
        // A poll that found the publisher asleep while holding its newest
        // version needs nobody; one that is behind wakes the publisher.
        let mut polled = synced;
        {
            let st = polled.status.as_mut().unwrap();
            st.phase = Some(SharePhase::Degraded);
            st.conditions = conditions::triple(
                &[],
                conditions::Summary::Degraded,
                "PublisherUnreachable",
                "m",
                Some(1),
                t(0),
            );
        }
        assert_eq!(w(&[photos.clone(), polled.clone()]), None);
        let at_v2 = settled(publish("t-a", "photos", "alice", false), "sh-1", 2);
        assert_eq!(
            w(&[at_v2, polled]).map(|x| x.0),
            Some(reasons::FETCH_NEEDS_PUBLISHER)
        );
        // Another publisher: not alice's business.
        assert_eq!(
            w(&[photos.clone(), subscribe("t-b", "x", "bob", &id(9))]),
            None
        );
        // Offline-seeded: the bucket serves it, alice sleeps on.
        let seeded = settled(publish("t-a", "photos", "alice", true), "sh-1", 1);
        assert_eq!(w(&[seeded.clone(), fetching.clone()]), None);
        // ... but not a share of alice that is not seeded.
        let mut other = fetching.clone();
        other.spec.subscribe.as_mut().unwrap().share_id = Some("sh-2".into());
        let plain = settled(publish("t-a", "docs", "alice", false), "sh-2", 1);
        assert_eq!(
            w(&[seeded, plain, other]).map(|x| x.0),
            Some(reasons::FETCH_NEEDS_PUBLISHER)
        );
        // Without an id yet, alice's publishers are not asked for anything.
        assert_eq!(
            cluster_work("t-a", "alice", None, &[photos, fetching], &[]),
            None
        );
    }

    #[test]
    fn a_newer_version_in_the_cluster_wakes_a_subscriber() {
        let alice = id(1);
        let follows = settled(subscribe("t-b", "from-alice", "bob", &alice), "sh-1", 1);
        let at_v2 = settled(publish("t-a", "photos", "alice", true), "sh-1", 2);
        let w = cluster_work("t-b", "bob", Some(&id(2)), &[follows.clone(), at_v2], &[]).unwrap();
        assert_eq!(w.reason, reasons::NEW_VERSION);
        assert!(w.message.contains("version 2"), "{}", w.message);
        let at_v1 = settled(publish("t-a", "photos", "alice", true), "sh-1", 1);
        assert_eq!(
            cluster_work("t-b", "bob", Some(&id(2)), &[follows, at_v1], &[]),
            None
        );
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_secs(900)), "15m");
        assert_eq!(human(Duration::from_secs(7200)), "2h");
        assert_eq!(human(Duration::from_secs(90)), "90s");
    }
}
