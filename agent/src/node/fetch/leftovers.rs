//! What unfinished fetches leave in the agent's state, and when it goes.
//!
//! A fetch writes its request to `fetches/<id>.json` before it starts and
//! its half-written files under `partial/<id>/`; both go when it ends well.
//! A fetch that fails keeps them, so a restart resumes it and refetches
//! nothing verified. Kept forever, that is a leak anyone can cause in a
//! recipient's storage: a publisher that never comes back, a live share
//! whose pass died with its publisher (a new publish is a new share, so
//! nothing ever finishes it), a fetch a user gave up on. So:
//!
//! - a fetch refused for cause (forged or hostile data) forgets its request
//!   and its half-written files at once (`Agent::forget_fetch`);
//! - half-written files with no request (a fetch refused before this rule,
//!   a declared subscription removed mid-fetch) go once none of them was
//!   written within the same time (a declared subscription keeps no
//!   request: its declaration is one, and its recent files stay);
//! - a fetch not finished [`tuning::fetch_give_up_after`] (7 days) after it
//!   was first asked for is forgotten, at the next start or at the daily
//!   sweep when it is not running, with a WARN and
//!   `caravan_errors_total{kind="fetch_given_up"}`. Asking for it again
//!   starts the clock again (and reuses nothing: its files are gone).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::manifest::{ShareId, Ticket};
use crate::node::agent::Agent;
use crate::node::fetch::FetchRequest;
use crate::node::fetch::progress::FetchState;
use crate::node::{state, tuning};
use crate::util::unix_now;

/// The record of an unfinished fetch: the request, and when it was first
/// made (records written before this field existed read as "now").
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PendingFetch {
    #[serde(flatten)]
    pub(crate) request: FetchRequest,
    /// Unix seconds of the first request of this fetch.
    #[serde(default)]
    pub(crate) since: Option<u64>,
}

/// What a sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Fetches resumed (at start only).
    pub resumed: usize,
    /// Fetches forgotten for their age.
    pub given_up: usize,
    /// Folders of half-written files without a request, untouched for the
    /// give-up time, removed.
    pub orphans: usize,
}

/// How long `cancel` waits for a running fetch to stop.
const CANCEL_WAIT: Duration = Duration::from_secs(10);

impl Agent {
    /// Forgets a fetch: its request and its half-written files.
    pub(crate) async fn forget_fetch(&self, id: &ShareId) {
        let pending = state::fetch_file(&self.opts.state_prefix, id);
        if let Err(e) = self.op.delete(&pending).await {
            tracing::warn!(%pending, error = %e, "could not forget a fetch's request");
        }
        let partial = state::partial_dir(&self.opts.state_prefix, id);
        if let Err(e) = self.op.delete_with(&partial).recursive(true).await {
            tracing::warn!(%partial, error = %e, "could not remove a fetch's half-written files");
        }
    }

    /// Cancels the unfinished fetch of `id`: a running attempt is stopped
    /// where it is (and waited for, up to [`CANCEL_WAIT`]), then its
    /// request and its half-written files go, and it is not resumed or
    /// retried. Files it already put in place stay. (A write already on
    /// its way to a part file may land after the folder went: the sweep of
    /// orphaned half-written files removes it.)
    pub async fn cancel_fetch(&self, id: &ShareId) -> Result<()> {
        let running = self
            .fetches
            .lock()
            .ok()
            .and_then(|m| m.get(id).cloned())
            .filter(|_| self.fetch_running(id));
        if let Some(p) = running {
            p.cancel.cancel();
            let deadline = tokio::time::Instant::now() + CANCEL_WAIT;
            while self.fetch_running(id) {
                if tokio::time::Instant::now() > deadline {
                    return Err(Error::Protocol(format!(
                        "the fetch of share {id} did not stop within {} s; try again",
                        CANCEL_WAIT.as_secs()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let pending = state::fetch_file(&self.opts.state_prefix, id);
        if !self.op.exists(&pending).await.unwrap_or(false) {
            // A failed fetch with no request kept (refused for cause: too
            // big for the storage, a file of the user's in the way) is
            // still listed by `status`: cancelling it clears that entry.
            let failed = self.fetches.lock().ok().and_then(|mut m| {
                m.get(id)
                    .is_some_and(|p| p.snapshot().state == FetchState::Failed)
                    .then(|| m.remove(id))
                    .flatten()
            });
            if failed.is_some() {
                tracing::info!(share = %id, "failed fetch cleared");
                return Ok(());
            }
            return Err(Error::NotFound(format!(
                "no unfinished fetch of share {id} here"
            )));
        }
        self.forget_fetch(id).await;
        if let Ok(mut m) = self.fetches.lock() {
            m.remove(id);
        }
        tracing::info!(share = %id, "fetch cancelled");
        Ok(())
    }

    /// True while a fetch of `id` runs in this process.
    pub(crate) fn fetch_running(&self, id: &ShareId) -> bool {
        self.fetches.lock().is_ok_and(|m| {
            m.get(id).is_some_and(|p| {
                matches!(
                    p.snapshot().state,
                    FetchState::Starting | FetchState::Transferring
                )
            })
        })
    }

    /// True when `dir` holds files and none was modified after `cutoff`
    /// (unix seconds). Unknown times (a listing error, a service that
    /// reports none) count as recent: nothing is removed on a guess.
    async fn untouched_since(&self, dir: &str, cutoff: u64) -> bool {
        let Ok(mut lister) = self.op.lister_with(dir).recursive(true).await else {
            return false;
        };
        let mut files = 0;
        while let Ok(Some(entry)) = futures::TryStreamExt::try_next(&mut lister).await {
            if entry.metadata().is_dir() {
                continue;
            }
            let modified = match entry.metadata().last_modified() {
                Some(t) => Some(t),
                None => self
                    .op
                    .stat(entry.path())
                    .await
                    .ok()
                    .and_then(|m| m.last_modified()),
            };
            let Some(t) = modified else { return false };
            if u64::try_from(t.into_inner().as_second()).unwrap_or(u64::MAX) > cutoff {
                return false;
            }
            files += 1;
        }
        files > 0
    }

    /// Goes through the records of unfinished fetches and the half-written
    /// files: forgets what is too old, removes what has no fetch, and (with
    /// `resume`, at start) restarts the rest.
    pub async fn sweep_fetches(self: &Arc<Self>, resume: bool) -> Result<Swept> {
        let prefix = &self.opts.state_prefix;
        let pending = state::read_each(
            &self.op,
            &state::fetches_dir(prefix),
            ".json",
            "fetch state",
            |b| serde_json::from_slice::<PendingFetch>(b),
        )
        .await?;
        let give_up = tuning::fetch_give_up_after().as_secs();
        let now = unix_now();
        let mut out = Swept::default();
        let mut kept = std::collections::HashSet::new();
        for (path, p) in pending {
            let id = match Ticket::parse(&p.request.ticket) {
                Ok(t) => t.share_id,
                Err(e) => {
                    tracing::warn!(%path, error = %e, "ignoring an unreadable fetch record");
                    continue;
                }
            };
            kept.insert(id.hex());
            if self.fetch_running(&id) {
                continue;
            }
            let since = p.since.unwrap_or(now);
            let age = now.saturating_sub(since);
            if age > give_up {
                tracing::warn!(share = %id, dest = %p.request.dest, days = age / 86_400, "giving up an unfinished fetch: forgetting it and its half-written files");
                self.metrics.error("fetch_given_up");
                self.forget_fetch(&id).await;
                kept.remove(&id.hex());
                out.given_up += 1;
            } else if resume {
                tracing::info!(%path, "resuming an interrupted fetch");
                // One record that cannot start (a destination no longer
                // valid, a storage error) does not keep the others, or the
                // daemon, from starting.
                let dest = p.request.dest.clone();
                match self.start_fetch_since(p.request, since, Some(1)).await {
                    Ok(_) => out.resumed += 1,
                    Err(e) => {
                        self.metrics.error("fetch");
                        tracing::warn!(%path, error = %e, "cannot resume an interrupted fetch; it stays for the next start");
                        // Shown by `status` as failed, with the reason
                        // (it was only in the log), and `cancel` drops it.
                        let shown = crate::node::fetch::progress::FetchProgress::new(id, dest);
                        shown.set_state(
                            FetchState::Failed,
                            Some(format!(
                                "cannot resume this interrupted fetch: {e}; it is tried again at \
                                 the next start (`caravan-agent cancel {id}` drops it)"
                            )),
                        );
                        if let Ok(mut m) = self.fetches.lock() {
                            m.entry(id).or_insert_with(|| Arc::new(shown));
                        }
                    }
                }
            }
        }
        // Half-written files with no request: a declared subscription's
        // fetch keeps none (its declaration is its request), so files
        // written within the give-up time are theirs to resume, and stay.
        let partials = format!("{prefix}partial/");
        let cutoff = now.saturating_sub(give_up);
        for dir in state::sub_dirs(&self.op, &partials).await? {
            let name = dir
                .strip_prefix(&partials)
                .unwrap_or_default()
                .trim_end_matches('/');
            if kept.contains(name) || !self.untouched_since(&dir, cutoff).await {
                continue;
            }
            tracing::warn!(%dir, "removing half-written files no fetch has touched within the give-up time");
            if let Err(e) = self.op.delete_with(&dir).recursive(true).await {
                tracing::warn!(%dir, error = %e, "could not remove half-written files");
                continue;
            }
            out.orphans += 1;
        }
        Ok(out)
    }
}

/// The daily sweep (after the one at start), until shutdown.
pub async fn run_sweeps(agent: Arc<Agent>, shutdown: tokio_util::sync::CancellationToken) {
    let every = tuning::fetch_sweep_interval();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match agent.sweep_fetches(false).await {
            Ok(s) if s.given_up + s.orphans > 0 => {
                tracing::info!(
                    given_up = s.given_up,
                    orphans = s.orphans,
                    "swept unfinished fetches"
                );
            }
            Ok(_) => {}
            Err(e) => {
                agent.metrics.error("fetch_sweep");
                tracing::warn!(error = %e, "sweeping unfinished fetches failed; retrying later");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Part files without a request stay while recent (a declared
    /// subscription's, resumable) and go once untouched for the give-up
    /// time.
    #[tokio::test]
    async fn part_files_without_a_request_go_only_when_old() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let op = crate::store::open_local(root).unwrap();
        for (share, age_days) in [("recent", 0u64), ("old", 8), ("mixed", 8), ("mixed", 0)] {
            let dir = root.join(format!(".caravan/partial/{share}/1"));
            std::fs::create_dir_all(&dir).unwrap();
            let f = dir.join(format!("f{age_days}.part"));
            std::fs::write(&f, b"half").unwrap();
            let when =
                std::time::SystemTime::now() - std::time::Duration::from_secs(age_days * 86_400);
            std::fs::File::options()
                .write(true)
                .open(&f)
                .unwrap()
                .set_modified(when)
                .unwrap();
        }
        let agent = Agent::for_test(op, Some(root.to_path_buf())).await;
        let swept = agent.sweep_fetches(false).await.unwrap();
        assert_eq!(swept.orphans, 1);
        let mut left: Vec<_> = std::fs::read_dir(root.join(".caravan/partial"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["mixed", "recent"]);
    }
}
