//! Declared grants without an expiry stay in effect for as long as they
//! are declared, yet each signature lapses soon on its own.
//!
//! Why: a grant is a signed record in repositories and in other agents'
//! trust state; only its issuer can revoke it. When the issuer goes without
//! revoking (its Agent deleted with its namespace, its pod and key gone
//! before the operator could ask for the revocation), a grant signed for a
//! year kept vouching for its subject for up to a year. A declared grant
//! with no `not_after` (a TrustGrant without `expires`) is therefore signed
//! for [`DECLARED_GRANT_SECS`] (30 days) and signed again, replacing it
//! (the newest grant per issuer and subject is the one in effect), once
//! less than [`RENEW_BEFORE_SECS`] (15 days) remain. Before, it was signed
//! once for a year and then lapsed silently, though still declared.
//!
//! The renewal runs in the daemon (an hourly look, or at the first due
//! time), and the due time is in the activity report's schedule, so an
//! operator that scales the agent to zero wakes it to renew. A grant with
//! an expiry of its own is the user's choice and is never renewed; a
//! revoked one is not either.

use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;
use crate::identity::AgentId;
use crate::node::declared::{Declarations, SavedGrant};
use crate::node::trust::{DECLARED_GRANT_SECS, GrantRequest};
use crate::util::unix_now;

/// Such a grant is signed again once less than this remains (15 days):
/// half its validity, so an agent asleep or down for two weeks still
/// renews in time.
pub const RENEW_BEFORE_SECS: u64 = DECLARED_GRANT_SECS / 2;
/// Longest wait between two looks at the grants.
const LOOK_EVERY: Duration = Duration::from_secs(3600);
/// Shortest wait (a renewal that keeps failing is not retried in a loop).
const LOOK_AT_MOST_EVERY: Duration = Duration::from_secs(60);

/// When `g` is due for renewal (unix seconds), if it is ever renewed.
fn due_at(g: &SavedGrant) -> Option<u64> {
    (g.spec.not_after.is_none() && !g.revoked)
        .then(|| g.not_after.saturating_sub(RENEW_BEFORE_SECS))
}

impl Declarations {
    /// Renews the declared grants due at `now` (see the module doc) and
    /// notes when the next one is due. Returns how many were signed again.
    pub(crate) async fn renew_due_grants(&self, now: u64) -> Result<usize> {
        let _guard = self.grants.lock().await;
        let Some(trust) = self.agent.trust() else {
            return Ok(0);
        };
        let saved = crate::node::state::read_each(
            &self.agent.op,
            &self.grants_dir(),
            ".json",
            "declared grant",
            |b| serde_json::from_slice::<SavedGrant>(b),
        )
        .await?;
        let mut next: Option<u64> = None;
        let mut renewed = 0;
        for (path, mut g) in saved {
            let Some(due) = due_at(&g) else { continue };
            if due > now {
                next = Some(next.map_or(due, |n| n.min(due)));
                continue;
            }
            let subject: AgentId = g.spec.subject.parse()?;
            let info = trust
                .grant_queued(&GrantRequest {
                    subject,
                    depth: g.spec.depth,
                    expires_secs: Some(DECLARED_GRANT_SECS),
                    scope: g.spec.scope.clone(),
                })
                .await?;
            tracing::info!(
                subject = %g.spec.subject,
                old = %g.grant_id,
                new = %info.grant_id,
                not_after = info.not_after,
                "declared trust grant renewed"
            );
            g.grant_id = info.grant_id;
            g.not_after = info.not_after;
            g.published = !info.published_to.is_empty() || trust.repositories().is_none();
            self.save_grant(&path, &g).await?;
            renewed += 1;
            if let Some(due) = due_at(&g) {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        if let Ok(mut n) = self.next_renewal.lock() {
            *n = next;
        }
        Ok(renewed)
    }

    /// Keeps the next renewal time no later than `g`'s (after a `PUT`).
    pub(crate) fn note_renewal(&self, g: &SavedGrant) {
        if let (Some(due), Ok(mut n)) = (due_at(g), self.next_renewal.lock()) {
            *n = Some(n.map_or(due, |t| t.min(due)));
        }
    }

    /// The daemon's renewal loop, until shutdown.
    pub(crate) async fn run_grant_renewal(self: Arc<Self>) {
        loop {
            let now = unix_now();
            if let Err(e) = self.renew_due_grants(now).await {
                self.agent.metrics.error("grant_renewal");
                tracing::warn!(error = %e, "renewing declared trust grants failed; trying again later");
            }
            let until_due = self
                .next_renewal
                .lock()
                .ok()
                .and_then(|n| *n)
                .map_or(LOOK_EVERY, |t| {
                    Duration::from_secs(t.saturating_sub(unix_now()))
                });
            let wait = until_due.clamp(LOOK_AT_MOST_EVERY, LOOK_EVERY);
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::declare::DeclaredGrant;
    use crate::identity::SecretKey;
    use crate::node::Agent;
    use crate::node::trust::AgentTrust;

    /// A declared grant without an expiry is signed for 30 days and signed
    /// again once less than 15 remain: a new grant replaces it, which its
    /// key's DELETE still revokes; one with its own expiry is left as the
    /// user set it, and the next renewal is in the activity schedule.
    #[tokio::test]
    async fn grants_without_an_expiry_are_renewed_before_they_lapse() {
        let tmp = tempfile::tempdir().unwrap();
        let op = crate::store::open_local(tmp.path()).unwrap();
        let agent = Agent::for_test(op.clone(), Some(tmp.path().to_path_buf())).await;
        let trust = AgentTrust::open(agent.secret_key(), op, ".caravan/", &[])
            .await
            .unwrap();
        agent.set_trust(trust.clone());
        let shutdown = tokio_util::sync::CancellationToken::new();
        let d = Declarations::open(agent.clone(), shutdown.clone())
            .await
            .unwrap();
        let (bob, carol) = (
            SecretKey::generate().unwrap().agent_id(),
            SecretKey::generate().unwrap().agent_id(),
        );
        let now = unix_now();
        let to_bob = DeclaredGrant {
            subject: bob.to_string(),
            depth: 1,
            scope: None,
            not_after: None,
        };
        let open = d.put_grant("bob", to_bob.clone()).await.unwrap();
        assert!(
            (now + DECLARED_GRANT_SECS..=now + DECLARED_GRANT_SECS + 60).contains(&open.not_after)
        );
        let fixed_end = now + 20 * 86_400;
        let fixed = DeclaredGrant {
            subject: carol.to_string(),
            depth: 0,
            scope: None,
            not_after: Some(fixed_end),
        };
        d.put_grant("carol", fixed.clone()).await.unwrap();
        let due = open.not_after - RENEW_BEFORE_SECS;
        let schedule = d.schedule();
        assert_eq!(
            schedule.next.as_ref().map(|(t, _)| *t),
            Some(due),
            "{schedule:?}"
        );

        assert_eq!(d.renew_due_grants(due - 1).await.unwrap(), 0);
        assert_eq!(d.renew_due_grants(due).await.unwrap(), 1, "bob's only");
        let listing = trust.listing().await;
        let to = |who: AgentId| -> Vec<_> {
            listing.issued.iter().filter(|g| g.subject == who).collect()
        };
        let bobs = to(bob);
        assert_eq!(bobs.len(), 1, "the renewed grant replaced the first");
        assert_ne!(bobs[0].grant_id, open.grant_id);
        assert_eq!(bobs[0].depth, 1);
        assert!(trust.trusts(&agent.id, &bob, 1, &[]));
        assert_eq!(to(carol)[0].not_after, fixed_end, "its own expiry is kept");
        // The saved grant follows: the same spec PUT again answers the new
        // grant, and deleting it revokes the renewed one.
        let again = d.put_grant("bob", to_bob).await.unwrap();
        assert_eq!(again.grant_id, bobs[0].grant_id);
        d.delete_grant("bob").await.unwrap();
        assert!(!trust.trusts(&agent.id, &bob, 1, &[]));
        assert_eq!(
            d.renew_due_grants(u64::MAX / 2).await.unwrap(),
            0,
            "revoked: never renewed"
        );
        assert_eq!(*d.next_renewal.lock().unwrap(), None);
        shutdown.cancel();
    }
}
