//! Forgetting a share: the way to stop serving a share published by
//! mistake (the wrong folder, the wrong recipients) or one fetched and no
//! longer wanted seeded, without stopping the agent or touching its state
//! by hand.
//!
//! What goes: the share's record, index and tags (its state folder), its
//! live share if a finished pass still lingers, its sealed chunks cached
//! for followers, its offline seed (index, policy, staged chunks no other
//! seeded share uses) and the peers learned for it. From then on a peer
//! asking for it gets the answer of a share that never existed, and the
//! agent no longer announces it. What stays: the files in storage, which
//! are the user's (so are the files a fetch placed: a later fetch of the
//! share into the same folder treats them as the user's own and refuses to
//! replace them, unless they are exactly the share's).
//!
//! Refused, so that nothing half-forgotten is left behind: a share whose
//! publish pass is running (its tickets are out, followers are reading
//! it), one with an unfinished fetch (`cancel` decides about its
//! half-written files), and one a declaration converges (a
//! Kubernetes Share: deleting the declaration is what stops it, or it
//! would publish or fetch it again; the admin API checks that).

use serde::{Deserialize, Serialize};

use crate::error::{Context, Error, Result};
use crate::manifest::ShareId;
use crate::node::agent::Agent;
use crate::node::share::Role;
use crate::node::state;

/// What [`Agent::forget`] dropped.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Forgotten {
    /// The share forgotten.
    pub share_id: String,
    /// Its version held when forgotten (0: only a lingering pass).
    pub seq: u64,
    /// Whether this agent published it or fetched it.
    pub role: Role,
    /// Whether it was seeded offline (its seed index and URLs are gone).
    pub was_seeded: bool,
}

impl Agent {
    /// Stops holding and serving share `id` (see the module doc): refused
    /// while a publish pass of it runs or a fetch of it is unfinished;
    /// `NotFound` when this agent holds nothing of it.
    pub async fn forget(&self, id: &ShareId) -> Result<Forgotten> {
        let running = |seq: u64| {
            Error::Rejected(format!(
                "a publish pass of share {id} (version {seq}) is running: forget it once the pass has ended"
            ))
        };
        if let Some(seq) = self.pass_running(id) {
            return Err(running(seq));
        }
        let pending = state::fetch_file(&self.opts.state_prefix, id);
        if self.fetch_running(id) || self.op.exists(&pending).await.unwrap_or(false) {
            return Err(Error::Rejected(format!(
                "a fetch of share {id} is unfinished here: `caravan-agent cancel {id}` stops it (and removes its half-written files) first"
            )));
        }
        let held = self.share(id);
        // Taken out under the lock that starts a pass, so one started
        // since the check above is never dropped.
        let live = match self.live.write() {
            Ok(mut m) => {
                if let Some(l) = m.get(id).filter(|l| l.running()) {
                    return Err(running(l.seq));
                }
                m.remove(id)
            }
            Err(_) => None,
        };
        self.sealed.clear_share(id);
        let (seq, role) = match (&held, &live) {
            (Some(s), _) => (s.seq(), s.role),
            (None, Some(_)) => (0, Role::Published),
            (None, None) => return Err(Error::NotFound(format!("no share {id} here"))),
        };
        let was_seeded = self.seed_policy(id).await.is_some();
        if was_seeded {
            self.stop_seeding(id).await?;
        }
        self.forget_share(id).await?;
        let peers = state::trust_peers_file(&self.opts.state_prefix, &id.0);
        self.op
            .delete(&peers)
            .await
            .context(|| format!("removing {peers}"))?;
        tracing::info!(share = %id, seq, ?role, was_seeded, "share forgotten: no longer served");
        Ok(Forgotten {
            share_id: id.to_string(),
            seq,
            role,
            was_seeded,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Access;
    use crate::node::live::{LiveEnd, LiveShare};
    use std::sync::Arc;

    /// A pass still running is never forgotten (its tickets are out); once
    /// it has ended, its lingering live share goes at once, and a share
    /// held nowhere is not found.
    #[tokio::test]
    async fn a_running_pass_is_refused_and_an_ended_one_goes_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let op = crate::store::open_local(tmp.path()).unwrap();
        let agent = Agent::for_test(op, Some(tmp.path().to_path_buf())).await;
        let id = ShareId([7; 32]);
        let live = Arc::new(LiveShare::new(id, 2, agent.id, Access::default(), [1; 8]));
        agent.set_live_unless_running(live.clone()).unwrap();
        let e = agent.forget(&id).await.unwrap_err();
        assert!(
            matches!(&e, Error::Rejected(m) if m.contains("version 2") && m.contains("running")),
            "{e}"
        );
        assert!(agent.live.read().unwrap().contains_key(&id));
        live.end(LiveEnd::Failed("stopped".into()));
        let done = agent.forget(&id).await.unwrap();
        assert_eq!(
            (done.seq, done.role, done.was_seeded),
            (0, Role::Published, false)
        );
        assert!(!agent.live.read().unwrap().contains_key(&id));
        assert!(matches!(agent.forget(&id).await, Err(Error::NotFound(_))));
    }
}
