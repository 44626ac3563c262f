//! Work in the cluster that needs an Agent awake (scale to zero): its own
//! Shares and TrustGrants that are not settled, subscribers in the cluster
//! that fetch from it, and publishers in the cluster that are ahead of it.
//! Pure: the reconciler lists the Shares and TrustGrants.

use caravan_agent::ticket::Ticket;
use kube::ResourceExt;

use super::reasons;
use crate::crd::share::ShareSpec;
use crate::crd::{Share, SharePhase, TrustGrant};

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
        .filter(|s| in_ns(&s.metadata.namespace) && s.holder() == name)
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
        .filter(|g| in_ns(&g.metadata.namespace) && g.holder() == name)
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
            // A subscriber whose own Agent has not taken the declaration
            // (no status yet, or Pending: not Ready, unschedulable, asleep)
            // cannot fetch anything: waking the publisher for it would only
            // let a Share that never runs keep it awake.
            if s.status
                .as_ref()
                .is_none_or(|st| matches!(st.phase, None | Some(SharePhase::Pending)))
            {
                continue;
            }
            // Only a subscription to one of this Agent's own publish Shares
            // (by the share id its status reports) wakes it: any tenant can
            // write a subscribe Share naming any agent id and a made-up (or
            // unknown) share id, and must not keep another tenant's agent
            // awake with it.
            let Some(id) = share_id.as_deref() else {
                continue;
            };
            let needed = my_publish
                .iter()
                .any(|(p, pid)| *pid == Some(id) && !offline(p));
            if needed {
                // The subscriber may be another tenant's: its namespace and
                // name are not this tenant's business (status, Events).
                return work(
                    reasons::FETCH_NEEDS_PUBLISHER,
                    format!(
                        "a subscriber in the cluster fetches share {} from this agent, \
                         which has no offline seeding for it",
                        crate::agent_api::bounded(id)
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
            // The publisher's Share is named only when it is this tenant's.
            let publisher = if p.namespace().as_deref() == Some(ns) {
                format!("its publisher's Share {}", p.name_any())
            } else {
                "its publisher".to_string()
            };
            return work(
                reasons::NEW_VERSION,
                format!(
                    "Share {} holds version {held}; {publisher} has version {}",
                    s.name_any(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions;
    use crate::crd::share::{PublishSpec, RecipientsSpec, ShareStatus, SubscribeSpec};
    use crate::crd::trust_grant::{TrustGrantSpec, TrustGrantStatus};
    use caravan_agent::identity::SecretKey;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn id(seed: u8) -> String {
        SecretKey::from_seed([seed; 32]).agent_id().to_string()
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

    /// Its Agent took the declaration and is fetching.
    fn fetching_now(mut s: Share) -> Share {
        s.status = Some(ShareStatus {
            phase: Some(SharePhase::Progressing),
            observed_generation: Some(1),
            ..Default::default()
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
        let fetching = fetching_now(subscribe("t-b", "from-alice", "bob", &alice));
        let (reason, message) = w(&[photos.clone(), fetching.clone()]).unwrap();
        assert_eq!(reason, reasons::FETCH_NEEDS_PUBLISHER);
        assert!(
            message.contains("a subscriber in the cluster") && message.contains("sh-1"),
            "{message}"
        );
        assert!(
            !message.contains("t-b") && !message.contains("from-alice"),
            "another tenant's namespace and Share name stay private: {message}"
        );
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
    fn only_a_subscription_to_one_of_its_own_shares_wakes_an_agent() {
        let alice = id(1);
        let w = |shares: &[Share]| {
            cluster_work("t-a", "alice", Some(&alice), shares, &[]).map(|w| w.reason)
        };
        let photos = settled(publish("t-a", "photos", "alice", false), "sh-1", 1);
        // Another tenant names alice as publisher with a made-up share id
        // (its Agent fetching, so the Share never settles): alice sleeps.
        let mut made_up = fetching_now(subscribe("t-f", "keep-awake", "frank", &alice));
        made_up.spec.subscribe.as_mut().unwrap().share_id = Some("sh-made-up".into());
        assert_eq!(w(&[photos.clone(), made_up.clone()]), None);
        // ... also when alice publishes nothing at all.
        assert_eq!(w(std::slice::from_ref(&made_up)), None);
        // An unknown share id (a ticket that does not parse): no wake-up.
        let mut unknown = made_up.clone();
        unknown.spec.subscribe.as_mut().unwrap().share_id = None;
        assert_eq!(w(&[photos.clone(), unknown]), None);
        // A publish Share without a share id yet cannot be the one asked for.
        let fresh = publish("t-a", "photos", "alice", false);
        let fetching = fetching_now(subscribe("t-f", "from-alice", "frank", &alice));
        assert_eq!(w(&[fresh, fetching.clone()]), Some(reasons::SHARE_CHANGED));
        // The right share id, but on an Agent that never takes it (not
        // Ready, unschedulable): it cannot fetch, alice sleeps on.
        let never_runs = subscribe("t-f", "from-alice", "unschedulable", &alice);
        assert_eq!(w(&[photos.clone(), never_runs.clone()]), None);
        let mut pending = fetching_now(never_runs);
        pending.status.as_mut().unwrap().phase = Some(SharePhase::Pending);
        assert_eq!(w(&[photos.clone(), pending]), None);
        // The share alice does publish, fetched by a running Agent: woken.
        assert_eq!(w(&[photos, fetching]), Some(reasons::FETCH_NEEDS_PUBLISHER));
    }

    #[test]
    fn a_newer_version_in_the_cluster_wakes_a_subscriber() {
        let alice = id(1);
        let follows = settled(subscribe("t-b", "from-alice", "bob", &alice), "sh-1", 1);
        let at_v2 = settled(publish("t-a", "photos", "alice", true), "sh-1", 2);
        let w = cluster_work("t-b", "bob", Some(&id(2)), &[follows.clone(), at_v2], &[]).unwrap();
        assert_eq!(w.reason, reasons::NEW_VERSION);
        assert!(w.message.contains("version 2"), "{}", w.message);
        assert!(
            !w.message.contains("t-a") && !w.message.contains("photos"),
            "another tenant's Share stays private: {}",
            w.message
        );
        let at_v1 = settled(publish("t-a", "photos", "alice", true), "sh-1", 1);
        assert_eq!(
            cluster_work("t-b", "bob", Some(&id(2)), &[follows, at_v1], &[]),
            None
        );
    }
}
