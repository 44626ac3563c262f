//! Fetching a share: find its newest manifest, then pull every chunk from
//! every peer that holds it — in parallel, pipelined, each chunk verified —
//! and write each file into the user's storage so it appears only when
//! complete. Verified progress is kept in storage, so a fetch interrupted by
//! a crash picks up where it stopped, and data already present locally (an
//! earlier version, a finished file) is reused instead of downloaded.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::stream::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkKeyer, ChunkRef};
use crate::crypto::Key;
use crate::error::{Context, Error, Result};
use crate::identity::AgentId;
use crate::manifest::{EntryKind, KeyRelease, Manifest, ManifestHead, ShareId, Ticket};
use crate::node::agent::Agent;
use crate::node::fetch::live::{ChunkSource, LiveFeed};
use crate::node::fetch::progress::{FetchProgress, FetchState, ProgressSnapshot};
use crate::node::fetch::repeats::Repeats;
use crate::node::fetch::seed::SeedSource;
use crate::node::fetch::swarm::Swarm;
use crate::node::fetch::writer::{Job, LocalIndex};
use crate::node::live::{LiveAnswer, LiveEnd};
use crate::node::share::{HeldShare, Role};
use crate::node::{state, tuning};
use crate::record::SignedRecord;

mod beneath;
mod direct;
pub mod leftovers;
pub mod live;
mod local;
pub mod progress;
mod repeats;
pub mod seed;
pub mod swarm;
mod tree;
pub mod writer;

/// What to fetch and where to put it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FetchRequest {
    /// The ticket text (`caravan-ticket-v1:…`).
    pub ticket: String,
    /// Destination directory in this agent's storage.
    pub dest: String,
    /// Extra peer addresses (host:port) to pull from.
    #[serde(default)]
    pub peers: Vec<String>,
}

/// Times a fetch follows its publisher's pass again after losing it (each
/// waits for the publisher to be dialled again, within the swarm's rounds).
const REFOLLOWS: u32 = 16;

/// What asking the publisher about its running pass found.
enum Live {
    /// The pass runs: follow it.
    Following(Arc<LiveFeed>),
    /// The publisher's connection closed: it may come back (a restarted
    /// daemon resumes its pass).
    Lost,
    /// No pass of a newer version runs (it finished, or never ran, or the
    /// answer was unusable): take the signed manifest.
    Finished,
}

/// The files the previous version of a share put at `dest` (none when it
/// was fetched elsewhere).
fn files_here<'p>(previous: Option<&'p HeldShare>, dest: &str) -> HashSet<&'p str> {
    previous
        .filter(|p| p.root == dest)
        .map(|p| p.manifest.files().map(|f| f.0).collect())
        .unwrap_or_default()
}

/// The folders the previous version listed at this destination (a
/// version may turn one, emptied or not, into a file: `tree::Reshape`).
fn folders_here<'p>(previous: Option<&'p HeldShare>, dest: &str) -> HashSet<&'p str> {
    previous
        .filter(|p| p.root == dest)
        .map(|p| manifest_dirs(&p.manifest).collect())
        .unwrap_or_default()
}

/// How long a resumed fetch that reached no peer waits before its
/// attempt `attempt` (1, 2, …): 15 s, doubling, at most 5 minutes.
/// Addresses announced by holders other than the publisher dialled per
/// fetch, at most.
const MAX_ANNOUNCED: usize = 32;

/// Most objects a fetch into object storage lists under its destination
/// to see what a change of the tree's shape must remove first.
const OBJECTS_LISTED_MAX: usize = 64 << 10;

/// Peers asked for the manifest at once (a swarm holds at most a few
/// dozen).
const MANIFEST_ASKS_AT_ONCE: usize = 32;

/// How long the other peers' manifests are waited for once the
/// publisher's has come.
const MANIFEST_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

fn retry_wait(attempt: u32) -> Duration {
    let first = tuning::fetch_retry_first();
    first
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(Duration::from_secs(300).max(first))
}

impl Agent {
    /// Starts a fetch in the background and returns its progress handle.
    /// The request is persisted first, so a restarted agent resumes it.
    pub async fn start_fetch(self: &Arc<Self>, req: FetchRequest) -> Result<Arc<FetchProgress>> {
        self.start_fetch_since(req, crate::util::unix_now(), None)
            .await
    }

    /// [`Agent::start_fetch`] of a fetch first asked for at `since` (unix
    /// seconds): a resumed one keeps its age (see `leftovers`). `retry` is
    /// the attempt number of a fetch the daemon resumed on its own: when
    /// no peer can be reached (the publisher not back yet after a reboot),
    /// it is tried again later ([`Agent::retry_later`]) instead of staying
    /// failed until someone runs `fetch` again; a command's fetch fails at
    /// once and says so.
    pub(crate) async fn start_fetch_since(
        self: &Arc<Self>,
        req: FetchRequest,
        since: u64,
        retry: Option<u32>,
    ) -> Result<Arc<FetchProgress>> {
        let ticket = Ticket::parse(&req.ticket)?;
        // A keyless ticket carries no secret: whoever the publisher trusts
        // may use it (the key is released only after checking the chain).
        if !ticket.wrapped_key.is_empty() && ticket.recipient != self.id {
            return Err(Error::Rejected(format!(
                "this ticket is for agent {}, but this agent is {}",
                ticket.recipient, self.id
            )));
        }
        self.check_same_publisher(&ticket).await?;
        let dest = state::user_folder(&self.opts.state_prefix, &req.dest)?;
        if let Some(root) = &self.opts.fs_root {
            tree::check_dest(root, &dest)?;
        }
        // A malformed peer address is the request's fault, said now, not
        // a failed dial saved and retried at every start.
        if let Some(bad) = req.peers.iter().find(|p| !crate::config::is_host_port(p)) {
            return Err(Error::Rejected(format!(
                "peer {bad:?} is not host:port (e.g. 10.0.0.5:7400 or peer.example:7400)"
            )));
        }
        // A share is fetched by one fetch at a time: its part files and its
        // saved request are the share's. Asked again for the same
        // destination while it runs (`fetch --detach`, then `fetch` to
        // watch it), the running one is joined; for another destination,
        // refused until it ends.
        let progress = {
            let mut m = self
                .fetches
                .lock()
                .map_err(|_| Error::Protocol("fetch table poisoned".into()))?;
            if let Some(running) = m.get(&ticket.share_id).filter(|p| p.running()) {
                if running.dest == dest {
                    return Ok(running.clone());
                }
                return Err(Error::Rejected(format!(
                    "share {} is being fetched into {:?} now; fetch it into {dest:?} once that \
                     has ended (`caravan-agent status` shows it)",
                    ticket.share_id, running.dest
                )));
            }
            let progress = Arc::new(FetchProgress::new(ticket.share_id, dest));
            m.insert(ticket.share_id, progress.clone());
            progress
        };
        let path = self.pending_path(&ticket.share_id);
        let record = leftovers::PendingFetch {
            request: req.clone(),
            since: Some(since),
        };
        let saved = match serde_json::to_vec(&record) {
            Ok(json) => self
                .op
                .write(&path, json)
                .await
                .context(|| format!("saving {path}")),
            Err(e) => Err(Error::Config(e.to_string())),
        };
        if let Err(e) = saved {
            progress.set_state(FetchState::Failed, Some(e.to_string()));
            return Err(e);
        }
        let agent = self.clone();
        let p = progress.clone();
        tokio::spawn(async move {
            agent.metrics.fetches_active.inc();
            // A cancel drops the attempt where it is (`cancel_fetch`
            // forgets its state once it has stopped).
            let result = tokio::select! {
                r = agent.clone().run_fetch(req.clone(), p.clone()) => r,
                () = p.cancel.cancelled() => Err(Error::Rejected("cancelled".into())),
            };
            agent.metrics.fetches_active.dec();
            if p.cancel.is_cancelled() {
                p.set_state(FetchState::Failed, Some("cancelled".into()));
                return;
            }
            if let Err(e) = result {
                agent.metrics.error("fetch");
                tracing::error!(share = %p.share_id, error = %e, "fetch failed");
                // Refused for cause (hostile or forged data): forgotten with
                // its half-written files, so a restart does not resume it
                // and dial the attacker again.
                if matches!(e, Error::Refused(_) | Error::Record(_) | Error::Crypto(_)) {
                    agent.forget_fetch(&p.share_id).await;
                }
                let mut said = e.to_string();
                if let (Some(attempt), Error::Unreachable(_)) = (retry, &e) {
                    let wait = retry_wait(attempt);
                    // A time, not only "in N s": `status` shows this
                    // message for as long as the wait lasts.
                    let at = crate::util::unix_now() + wait.as_secs();
                    said = format!(
                        "{said} (the daemon tries again in {} s, at {:02}:{:02}:{:02} UTC)",
                        wait.as_secs(),
                        at % 86_400 / 3600,
                        at % 3600 / 60,
                        at % 60
                    );
                    agent.retry_later(req, since, attempt + 1, wait);
                }
                p.set_state(FetchState::Failed, Some(said));
            }
        });
        Ok(progress)
    }

    /// Starts a resumed fetch again after `wait`, unless by then another
    /// fetch of the share runs (a command's: it reports for itself), its
    /// request is gone (done, or forgotten), or it is older than the
    /// give-up time (`leftovers`).
    fn retry_later(self: &Arc<Self>, req: FetchRequest, since: u64, attempt: u32, wait: Duration) {
        let agent = self.clone();
        // Boxed: this future starts the fetch that may call this again.
        let again: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = Box::pin(
            async move {
                tokio::time::sleep(wait).await;
                let Ok(ticket) = Ticket::parse(&req.ticket) else {
                    return;
                };
                let age = crate::util::unix_now().saturating_sub(since);
                if agent.fetch_running(&ticket.share_id)
                    || age > tuning::fetch_give_up_after().as_secs()
                    || !agent
                        .op
                        .exists(&agent.pending_path(&ticket.share_id))
                        .await
                        .unwrap_or(false)
                {
                    return;
                }
                tracing::info!(share = %ticket.share_id, attempt, "trying an unreachable fetch again");
                if let Err(e) = agent.start_fetch_since(req, since, Some(attempt)).await {
                    tracing::warn!(share = %ticket.share_id, error = %e, "cannot start the fetch again; it stays for the next start");
                }
            },
        );
        tokio::spawn(again);
    }

    /// Fetches and waits for the result.
    pub async fn fetch(self: &Arc<Self>, req: FetchRequest) -> Result<ProgressSnapshot> {
        let p = self.start_fetch(req).await?;
        loop {
            let s = p.snapshot();
            match s.state {
                FetchState::Done => return Ok(s),
                FetchState::Failed => {
                    return Err(Error::Protocol(
                        s.error.unwrap_or_else(|| "fetch failed".into()),
                    ));
                }
                _ => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    }

    /// Restarts fetches that were in progress when the agent stopped
    /// (and clears what unfinished fetches left: see `leftovers`).
    pub async fn resume_fetches(self: &Arc<Self>) -> Result<usize> {
        Ok(self.sweep_fetches(true).await?.resumed)
    }

    /// Waits until no other fetch of share `id` runs in this agent and
    /// holds the turn until the guard is dropped. Two fetches of one share
    /// (a subscription's and a command's, or two commands) would write the
    /// same part files and the same saved request: interleaved, a file
    /// could be moved into place from another fetch's half-written part.
    async fn fetch_turn(&self, id: &ShareId) -> tokio::sync::OwnedMutexGuard<()> {
        let turn = {
            let mut m = self
                .fetch_turns
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Turns nobody holds or waits for go, so the table stays as
            // small as the fetches running.
            m.retain(|_, t| Arc::strong_count(t) > 1);
            m.entry(*id).or_default().clone()
        };
        turn.lock_owned().await
    }

    /// Refuses a ticket for a share this agent already has from another
    /// publisher: held (fetched, or published by this agent), being
    /// published, or an earlier fetch of it pending. A share id is no
    /// secret (repositories and tickets carry it) and anyone may sign a
    /// manifest with any id, so without this a stranger's "version 1000"
    /// of someone's share would replace it here, lock its real versions
    /// out as "older", or overwrite its files; one share id, one publisher.
    async fn check_same_publisher(&self, ticket: &Ticket) -> Result<()> {
        let id = &ticket.share_id;
        let mut known = self.share(id).map(|s| s.publisher);
        if known.is_none() {
            known = self
                .live
                .read()
                .ok()
                .and_then(|m| m.get(id).map(|l| l.publisher));
        }
        if known.is_none()
            && let Ok(saved) = self.op.read(&self.pending_path(id)).await
            && let Ok(p) = serde_json::from_slice::<leftovers::PendingFetch>(&saved.to_vec())
            && let Ok(t) = Ticket::parse(&p.request.ticket)
        {
            known = Some(t.publisher);
        }
        match known {
            Some(p) if p != ticket.publisher => Err(Error::Rejected(format!(
                "share {id} here is {}; this ticket is signed by {}, another agent: refused, \
                 nothing was changed (one share id has one publisher)",
                describe(&p, &self.id),
                ticket.publisher
            ))),
            _ => Ok(()),
        }
    }

    fn pending_path(&self, id: &ShareId) -> String {
        state::fetch_file(&self.opts.state_prefix, id)
    }

    async fn run_fetch(
        self: Arc<Self>,
        req: FetchRequest,
        progress: Arc<FetchProgress>,
    ) -> Result<()> {
        let ticket = Ticket::parse(&req.ticket)?;
        let res = self
            .fetch_ticket(&ticket, &req.dest, &req.peers, progress)
            .await;
        // An agent between fetches holds no receive buffers.
        crate::wire::channel::release_buffers();
        res
    }

    /// Fetches the newest version of the share `ticket` names into `dest`,
    /// reporting into `progress`. A ticket without a key (a share for the
    /// publisher's trusted agents, or one built from a share id and
    /// publisher id) makes this agent present its trust chain. When the
    /// newest version is the one already held at `dest`, nothing is read or
    /// written. Used by the one-shot fetch and by declared subscriptions.
    pub async fn fetch_ticket(
        self: Arc<Self>,
        ticket: &Ticket,
        dest: &str,
        peers: &[String],
        progress: Arc<FetchProgress>,
    ) -> Result<()> {
        let ticket = ticket.clone();
        let dest = state::user_folder(&self.opts.state_prefix, dest)?;
        let _turn = self.fetch_turn(&ticket.share_id).await;
        // A ticket for "agents the publisher trusts" carries no key: the
        // publisher releases it after checking our chain (see `present_proof`).
        let key = if ticket.wrapped_key.is_empty() {
            None
        } else {
            Some(self.key.unwrap_key(&ticket.wrapped_key)?)
        };
        // Who is dialled, most trusted first: the ticket's addresses (the
        // publisher's), `--peer`, the publisher's own announcement (which
        // no sybil can crowd out); then at most `MAX_ANNOUNCED` addresses
        // other holders announced. Anyone may announce any address for a
        // share: silent ones must not hold the fetch up (`Swarm::connect`
        // goes once one peer answers), nor be dialled by the thousand.
        let mut addrs = ticket.addresses.clone();
        addrs.extend(peers.iter().cloned());
        let mut announced = Vec::new();
        if let Some(web) = self.trust() {
            addrs.extend(web.addresses_of(&ticket.publisher).await);
            // Peers from every repository (union, verified); a repository
            // that is down answers from the client's cache or is skipped.
            match web.peers_for(&ticket.share_id.0).await {
                Ok(found) => announced.extend(found.into_iter().flat_map(|(_, a)| a)),
                Err(e) => tracing::warn!(error = %e, "no repository answered; using known peers"),
            }
        }
        let mut seen = HashSet::new();
        addrs.retain(|a| seen.insert(a.clone()));
        announced.retain(|a| seen.insert(a.clone()));
        if announced.len() > MAX_ANNOUNCED {
            tracing::info!(
                announced = announced.len(),
                dialled = MAX_ANNOUNCED,
                "more holders announced than are dialled"
            );
            announced.truncate(MAX_ANNOUNCED);
        }
        addrs.extend(announced);
        // A keyless ticket (trusted agents, declared subscriptions) of a
        // share already held: its key opens the offline seed of the same
        // key's versions while the publisher sleeps (a rotated key does not).
        let held_key = self.share(&ticket.share_id).map(|s| s.key.clone());
        let seed = self
            .find_seed(&ticket, key.as_ref().or(held_key.as_ref()))
            .await;
        let swarm =
            Arc::new(Swarm::connect(&self, &addrs, ticket.share_id, progress.clone(), seed).await?);
        let key = match key {
            Some(k) => Some(k),
            None if swarm.distinct().is_empty() && held_key.is_some() => held_key,
            None => Some(self.present_proof(&swarm, &ticket).await?),
        };
        // The publisher's pass may still be running: start on what it
        // sealed so far. When the publisher goes away meanwhile (its daemon
        // stopped: a restarted one resumes the pass, `publish_intent`), its
        // connection is dialled again like any lost peer's (bounded per
        // fetch) and the pass followed again from what is in place.
        if let Some(k) = &key {
            let mut tries = 0;
            loop {
                let lost = match self.open_live(&swarm, &ticket, k).await {
                    Live::Finished => break,
                    Live::Lost => {
                        tracing::info!(share = %ticket.share_id, "the publisher is unreachable; dialling it again");
                        None
                    }
                    Live::Following(feed) => {
                        // Not the feed itself: it goes before the manifest
                        // is taken (`fetch_live`).
                        let lost = feed.lost_flag();
                        let r = self
                            .fetch_live(
                                &ticket,
                                dest.clone(),
                                swarm.clone(),
                                k.clone(),
                                feed,
                                progress.clone(),
                            )
                            .await;
                        match r {
                            Err(e) if lost.load(Ordering::Relaxed) => Some(e),
                            r => return r,
                        }
                    }
                };
                tries += 1;
                if tries > REFOLLOWS || !swarm.revive_peer(ticket.publisher).await {
                    match lost {
                        Some(e) => return Err(e),
                        None => break,
                    }
                }
                tracing::info!(share = %ticket.share_id, "lost the publisher during its pass; following it again");
                progress.recount();
            }
        }
        // The version held here, if any: peers are asked only for a newer
        // one (a subscriber's poll then moves no manifest).
        let here = self
            .share(&ticket.share_id)
            .filter(|h| h.role == Role::Fetched && h.root == dest);
        let have = here.as_ref().map_or(0, |h| h.seq());
        let (record, manifest, key) = match self.newest_manifest(&swarm, &ticket, key, have).await?
        {
            Some(newest) => newest,
            None => {
                // Nobody has a version newer than the one held here.
                let Some(held) = here else {
                    return Err(Error::Protocol(
                        "peers answered \"nothing newer\" to a fetch of a share not held".into(),
                    ));
                };
                if self.done_in_place(&ticket, &dest, &held, &progress).await {
                    return Ok(());
                }
                // Files of it missing or changed here: that version again.
                let mut record = held
                    .record(&self.op, &self.opts.state_prefix)
                    .await?
                    .to_vec();
                let head = ManifestHead::open(&record, Some(&ticket.publisher))?;
                let manifest = head.manifest_in(&mut record, &held.key)?;
                (record, manifest, held.key.clone())
            }
        };
        self.fetch_manifest(&ticket, dest, swarm, record, manifest, key, progress)
            .await
    }

    /// When the version `held` (fetched here) is in place at `dest`, every
    /// file at its size: the fetch is done (its request, if a restart left
    /// one, too), and says so in `progress`. Otherwise (a file missing or of
    /// another size: removed or edited by hand) the caller fetches it again,
    /// the rest verified in place and reused.
    async fn done_in_place(
        &self,
        ticket: &Ticket,
        dest: &str,
        held: &HeldShare,
        progress: &FetchProgress,
    ) -> bool {
        if held.role != Role::Fetched || held.root != dest || !self.in_place(held).await {
            return false;
        }
        let pending = self.pending_path(&ticket.share_id);
        if let Err(e) = self.op.delete(&pending).await {
            tracing::warn!(path = %pending, error = %e, "cannot remove the fetch's pending state");
        }
        progress.seq.store(held.seq(), Ordering::Relaxed);
        progress.already_in_place.store(true, Ordering::Relaxed);
        let total = held.manifest.total_bytes();
        let chunks = held.manifest.total_chunks();
        let files = held.manifest.files().count() as u64;
        progress.bytes_total.store(total, Ordering::Relaxed);
        progress.bytes_done.store(total, Ordering::Relaxed);
        progress.chunks_total.store(chunks, Ordering::Relaxed);
        progress.chunks_done.store(chunks, Ordering::Relaxed);
        progress.files_total.store(files, Ordering::Relaxed);
        progress.files_done.store(files, Ordering::Relaxed);
        progress.set_state(FetchState::Done, None);
        true
    }

    /// Fetches one signed version of a share into `dest` (the manifest was
    /// verified: signed by the publisher, for this share, opened with `key`).
    #[allow(clippy::too_many_arguments)]
    async fn fetch_manifest(
        self: &Arc<Self>,
        ticket: &Ticket,
        dest: String,
        swarm: Arc<Swarm>,
        record: Vec<u8>,
        manifest: Manifest,
        key: Key,
        progress: Arc<FetchProgress>,
    ) -> Result<()> {
        let keyer = ChunkKeyer::new(&key);
        let seq = manifest.seq;
        // Versions only move forward: a replayed (older) or forked (same
        // version, other bytes) manifest is refused before anything changes.
        if let Some(held) = self.share(&ticket.share_id) {
            if held.publisher != ticket.publisher {
                return Err(Error::Rejected(format!(
                    "share {} here is {}; this manifest is signed by {}, another agent: \
                     refused, nothing was changed (one share id has one publisher)",
                    ticket.share_id,
                    describe(&held.publisher, &self.id),
                    ticket.publisher
                )));
            }
            if seq < held.seq() {
                return Err(Error::Refused(format!(
                    "version {seq} of share {} is older than version {} already held \
                     (a replayed manifest); nothing was changed",
                    ticket.share_id,
                    held.seq()
                )));
            }
            if seq == held.seq() && !held.record_is(&record) {
                return Err(Error::Refused(format!(
                    "a forked manifest: version {seq} of share {} differs from the version {seq} \
                     already held; nothing was changed",
                    ticket.share_id
                )));
            }
            // Already holding exactly this version here: nothing to fetch.
            if held.seq() >= seq && self.done_in_place(ticket, &dest, &held, &progress).await {
                return Ok(());
            }
        }
        progress.seq.store(seq, Ordering::Relaxed);
        progress
            .bytes_total
            .store(manifest.total_bytes(), Ordering::Relaxed);
        progress
            .chunks_total
            .store(manifest.total_chunks(), Ordering::Relaxed);
        progress
            .files_total
            .store(manifest.files().count() as u64, Ordering::Relaxed);
        progress.set_state(FetchState::Transferring, None);

        let previous = self.previous_version(&ticket.share_id);
        let already = previous
            .as_ref()
            .filter(|p| p.root == dest)
            .map(|p| p.manifest.total_bytes())
            .unwrap_or(0);
        let held = self
            .held_bytes(
                &ticket.share_id,
                &dest,
                manifest.files().map(|f| (f.0, f.1)),
            )
            .await;
        self.check_room(
            &ticket.share_id,
            manifest.total_bytes(),
            Some(manifest.total_chunks()),
            already.max(held),
        )
        .await?;
        self.check_fits(
            &ticket.share_id,
            &dest,
            manifest.entries.iter().map(|e| e.path.as_str()),
        )?;
        self.check_no_other_share(&ticket.share_id, &dest, manifest.files().map(|f| f.0))
            .await?;
        let repeats = Repeats::of_whole(|| manifest.files().flat_map(|(_, _, c)| c));
        let older = self
            .older_parts(&ticket.share_id, seq, manifest.files().map(|f| f.2))
            .await;
        let job = self.new_job(
            swarm,
            keyer,
            &dest,
            previous.as_deref(),
            older,
            &ticket.share_id,
            seq,
            &progress,
            manifest.files().map(|(p, s, _)| (p, s)),
            Arc::new(repeats),
        )?;
        let placed = self.placed_here(&ticket.share_id, &dest).await;
        let mut ours = files_here(previous.as_deref(), &dest);
        ours.extend(
            placed
                .iter()
                .filter(|p| !p.ends_with('/'))
                .map(String::as_str),
        );
        job.check_own_files(
            &ticket.share_id,
            &ours,
            &folders_here(previous.as_deref(), &dest),
            &manifest
                .files()
                .map(|(p, s, c)| (p, s, Some(c)))
                .collect::<Vec<_>>(),
        )
        .await?;
        self.make_room(
            &dest,
            previous.as_deref(),
            seq,
            manifest.files().map(|f| f.0),
            manifest_dirs(&manifest),
        )
        .await?;
        // The destination itself too, so an empty share fetched is an
        // empty folder there (not nothing); on object storage, where a
        // marker costs a request, only then.
        let whole = (self.opts.fs_root.is_some() || manifest.entries.is_empty()).then_some("");
        self.make_folders(
            &ticket.share_id,
            &dest,
            whole.into_iter().chain(manifest_dirs(&manifest)),
        )
        .await?;
        // The files are written straight from the manifest's entries (a
        // copy of every path and chunk list, kept for the whole fetch, was
        // a fifth of a 150,000-file recipient's memory).
        // (By entry index: a closure taking the borrowed entry itself is
        // not `Send` enough for the spawned fetch, rust-lang/rust#102211.)
        let files: Vec<usize> = manifest
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e.kind, EntryKind::File { .. }))
            .map(|(k, _)| k)
            .collect();
        let entries = &manifest.entries;
        futures::stream::iter(files.into_iter().enumerate())
            .map(|(i, k)| {
                let job = job.clone();
                async move {
                    match entries.get(k).map(|e| (e.path.as_str(), &e.kind)) {
                        Some((path, EntryKind::File { size, chunks })) => {
                            job.file(i, path, *size, ChunkSource::Fixed(chunks)).await
                        }
                        _ => Ok(()),
                    }
                }
            })
            .buffer_unordered(tuning::file_concurrency())
            .try_collect::<Vec<()>>()
            .await?;
        self.finish_fetch(
            &job,
            ticket,
            &dest,
            previous.as_deref(),
            record,
            manifest,
            key,
            &progress,
        )
        .await
    }

    /// What follows writing every file: durability, modes, files the new
    /// version dropped, the share installed and the fetch's state cleared.
    #[allow(clippy::too_many_arguments)]
    async fn finish_fetch(
        &self,
        job: &Job,
        ticket: &Ticket,
        dest: &str,
        previous: Option<&HeldShare>,
        record: Vec<u8>,
        manifest: Manifest,
        key: Key,
        progress: &FetchProgress,
    ) -> Result<()> {
        let seq = manifest.seq;
        job.sync_written().await?;
        self.apply_modes(dest, &manifest);

        // Files the previous version had and this one dropped go away too.
        if let Some(prev) = written_over(previous, dest, seq) {
            let reshape = reshape(prev, &manifest);
            // A dropped file where the new version has a folder, or under
            // a folder that is a file now, is gone already (`make_room`):
            // what is at its path now is the new version's.
            let mut now: HashSet<&str> = manifest.files().map(|(p, _, _)| p).collect();
            now.extend(reshape.files_to_folders.iter().map(String::as_str));
            now.extend(
                reshape
                    .folders_to_files
                    .iter()
                    .flat_map(|f| f.1.iter())
                    .map(String::as_str),
            );
            let gone: Vec<String> = prev
                .manifest
                .files()
                .filter(|(p, _, _)| !now.contains(p))
                .map(|(p, _, _)| format!("{dest}{p}"))
                .collect();
            match self.opts.fs_root.clone() {
                // Never through a link swapped in meanwhile (`beneath`).
                Some(root) => tokio::task::spawn_blocking(move || {
                    beneath::remove_files(&root, gone.iter().map(String::as_str))
                })
                .await
                .map_err(|e| Error::Protocol(format!("removing task: {e}")))?
                .context(|| "removing the files the new version dropped".to_string())?,
                None => {
                    for path in gone {
                        self.op
                            .delete(&path)
                            .await
                            .context(|| format!("removing {path}"))?;
                    }
                }
            }
            // And its folders, those left empty. An object store has no
            // folders, only the marker objects (`dir/`) a fetch wrote for
            // the ones listed: those of dropped folders go (a marker holds
            // nothing, and whatever else lies under its prefix stays);
            // those of folders that are files now went before the fetch
            // wrote (`make_room`).
            if let Some(root) = self.opts.fs_root.clone() {
                let dest = dest.to_string();
                let _ =
                    tokio::task::spawn_blocking(move || reshape.drop_folders(&root, &dest)).await;
            } else {
                for d in &reshape.dropped_folders {
                    let marker = format!("{dest}{d}/");
                    if let Err(e) = self.op.delete(&marker).await {
                        tracing::warn!(path = %marker, error = %e, "could not remove a dropped folder's marker");
                    }
                }
            }
        }
        // Files an unfinished earlier fetch of this share put here (an
        // older version's) that this version does not have: the share's,
        // so they go like its dropped files.
        // And the folders it made that this version does not have, once
        // empty (deepest first; what the user put in one keeps it).
        // Looked up in the manifest's entries, sorted by path
        // (`Manifest::validate`), not in sets of every path and folder
        // (about 50 MiB at the end of a fetch of 250,000 files: its peak),
        // and read line by line: the log notes every file this fetch placed.
        let placed = self
            .placed_here_but(&ticket.share_id, dest, |p| match p.strip_suffix('/') {
                Some(f) => f.is_empty() || manifest.lists_or_holds(f),
                None => manifest.lists_file(p),
            })
            .await;
        if let Some(root) = self.opts.fs_root.clone()
            && !placed.is_empty()
        {
            let (folders, files): (Vec<String>, Vec<String>) =
                placed.into_iter().partition(|p| p.ends_with('/'));
            let gone: Vec<String> = files.iter().map(|p| format!("{dest}{p}")).collect();
            let mut empty: Vec<String> = folders
                .iter()
                .map(|f| format!("{dest}{}", f.trim_end_matches('/')))
                .collect();
            empty.sort_by_key(|f| std::cmp::Reverse(f.matches('/').count()));
            tokio::task::spawn_blocking(move || {
                beneath::remove_files(&root, gone.iter().map(String::as_str))?;
                let _ = beneath::remove_empty_dirs(&root, empty.iter().map(String::as_str));
                Ok::<_, std::io::Error>(())
            })
            .await
            .map_err(|e| Error::Protocol(format!("removing task: {e}")))?
            .context(|| {
                "removing the files an unfinished earlier version put in place".to_string()
            })?;
        }
        // Tags of the chunks received now and of those an earlier version
        // held (reused chunks were not received again).
        let mut tags = job
            .tags
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        tags.sort_unstable_by_key(|t| t.0);
        tags.dedup_by_key(|t| t.0);
        let tag_of = |id: &crate::chunk::ChunkId| {
            tags.binary_search_by_key(id, |t| t.0)
                .ok()
                .and_then(|i| tags.get(i))
                .map(|t| t.1)
        };
        let held = HeldShare::new(
            ticket.publisher,
            key,
            Role::Fetched,
            dest.to_string(),
            manifest,
            record,
        )
        .with_tags(|id| tag_of(id).or_else(|| previous.and_then(|p| p.tag(id))));
        drop(tags);
        self.install_share(Arc::new(held)).await?;
        let partial_root = state::partial_dir(&self.opts.state_prefix, &ticket.share_id);
        let _ = self.op.delete_with(&partial_root).recursive(true).await;
        let pending = self.pending_path(&ticket.share_id);
        if let Err(e) = self.op.delete(&pending).await {
            tracing::warn!(path = %pending, error = %e, "cannot remove the fetch's pending state");
        }
        progress.set_state(FetchState::Done, None);
        let s = progress.snapshot();
        self.metrics.fetch_done(s.bytes_total, s.seconds);
        tracing::info!(share = %ticket.share_id, seq, bytes = s.bytes_total, fetched = s.chunks_fetched, reused = s.chunks_reused, seconds = s.seconds, "fetch complete");
        Ok(())
    }

    /// [`Agent::placed_here`] without the paths `kept` keeps (folders end
    /// in `/`), sorted, read a line at a time (the log of a fetch that
    /// placed 250,000 files is 11 MB, and was held whole, with a string per
    /// line, at the fetch's peak).
    async fn placed_here_but(
        &self,
        id: &ShareId,
        dest: &str,
        kept: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        use tokio::io::AsyncBufReadExt;
        let Some(root) = &self.opts.fs_root else {
            return Vec::new();
        };
        let log = root.join(state::placed_log(&self.opts.state_prefix, id));
        let Ok(file) = tokio::fs::File::open(&log).await else {
            return Vec::new();
        };
        let mut lines = tokio::io::BufReader::with_capacity(64 << 10, file).lines();
        let mut placed = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(p) = line.strip_prefix(dest)
                && !p.is_empty()
                && !kept(p)
            {
                placed.push(p.to_string());
            }
        }
        placed.sort_unstable();
        placed.dedup();
        placed
    }

    /// The files (relative to `dest`) an unfinished fetch of `id` put in
    /// place there, of whatever version ([`state::placed_log`]; local disk
    /// only): the share's, not the user's.
    async fn placed_here(&self, id: &ShareId, dest: &str) -> Vec<String> {
        self.placed_here_but(id, dest, |_| false).await
    }

    /// Before a version is written on a local disk: refuses, with nothing
    /// written, a destination whose folders pass through a link or meet a
    /// file that is not the share's (`tree::check_folders`); then, over the
    /// previous version, removes its files where folders go and its folders
    /// where files go (`tree.rs`), refused if such a folder holds files
    /// that are not the share's.
    async fn make_room<'a>(
        &self,
        dest: &str,
        previous: Option<&HeldShare>,
        seq: u64,
        files: impl Iterator<Item = &'a str>,
        dirs: impl Iterator<Item = &'a str>,
    ) -> Result<()> {
        // Files of the previous version here: replaced or removed by this
        // fetch, so a folder may take the place of one.
        let here = previous.filter(|p| p.root == dest);
        let old_files: Vec<&str> = here
            .map(|p| p.manifest.files().map(|f| f.0).collect())
            .unwrap_or_default();
        let new_files: Vec<&str> = files.collect();
        let new_dirs: Vec<&str> = dirs.collect();
        let reshape = written_over(previous, dest, seq).map(|prev| {
            tree::Reshape::between(
                &old_files,
                manifest_dirs(&prev.manifest),
                &new_files,
                new_dirs.iter().copied(),
            )
        });
        let Some(root) = self.opts.fs_root.clone() else {
            return match reshape.filter(|r| !r.before_is_empty()) {
                Some(r) => self.make_room_in_objects(dest, &r).await,
                None => Ok(()),
            };
        };
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<String>>();
        let (old_files, new_files, new_dirs) =
            (owned(&old_files), owned(&new_files), owned(&new_dirs));
        let dest = dest.to_string();
        tokio::task::spawn_blocking(move || {
            let old: HashSet<&str> = old_files.iter().map(String::as_str).collect();
            tree::check_folders(
                &root,
                &dest,
                new_files.iter().map(String::as_str),
                new_dirs.iter().map(String::as_str),
                &old,
            )?;
            match reshape.filter(|r| !r.before_is_empty()) {
                Some(r) => r.make_room(&root, &dest, seq),
                None => Ok(()),
            }
        })
        .await
        .map_err(|e| Error::Protocol(format!("making room task: {e}")))?
    }

    /// [`Agent::make_room`] on an object store. Keys `x` and `x/y` coexist
    /// on most (S3, GCS, Azure), but not on those that keep objects as
    /// files (s3s-fs, MinIO, WebDAV): there writing `x/y` over the previous
    /// version's file `x`, or `x` over its `x/…`, fails, on every resume.
    /// So before anything is written, the previous version's objects in
    /// the way go: its files where folders go, its files under (and the
    /// marker of) folders where files go. Only the share's own objects; a
    /// delete of one already gone is no error, so a resumed fetch does the
    /// rest.
    async fn make_room_in_objects(&self, dest: &str, r: &tree::Reshape) -> Result<()> {
        // What is there now, as files: an earlier attempt may have done
        // part of this already (`x` deleted and `x/in` written), and a
        // delete of `x` where the server now has a folder `x` fails (500,
        // retried for a minute and a half on s3s-fs). Unknown (too many
        // to list, or the listing failed): every delete is tried.
        let there: Option<HashSet<String>> = async {
            use futures::TryStreamExt;
            let mut l = self.op.lister_with(dest).recursive(true).await.ok()?;
            let mut out = HashSet::new();
            while let Some(e) = l.try_next().await.ok()? {
                if out.len() >= OBJECTS_LISTED_MAX {
                    return None;
                }
                if e.metadata().is_file() {
                    out.insert(e.path().to_string());
                }
            }
            Some(out)
        }
        .await;
        let is_there = |p: &str| there.as_ref().is_none_or(|t| t.contains(p));
        let mut files: Vec<String> = r
            .files_to_folders
            .iter()
            .map(|f| format!("{dest}{f}"))
            .filter(|p| is_there(p))
            .collect();
        // Then the folders where files go: the previous version's files in
        // them, then every folder below (deepest first) and the folder
        // itself as markers, which is what removes an emptied directory on
        // servers that keep objects as files. Not once the new file is
        // written (a marker delete of a file fails there).
        let mut markers: Vec<String> = Vec::new();
        for (d, held) in &r.folders_to_files {
            let file = format!("{dest}{d}");
            if there.as_ref().is_some_and(|t| t.contains(&file)) {
                continue;
            }
            files.extend(
                held.iter()
                    .map(|h| format!("{dest}{h}"))
                    .filter(|p| is_there(p)),
            );
            let mut below: Vec<String> = held
                .iter()
                .flat_map(|h| {
                    let mut up = Vec::new();
                    let mut at = h.as_str();
                    while let Some(i) = at.rfind('/') {
                        at = &at[..i];
                        if at.len() <= d.len() {
                            break;
                        }
                        up.push(format!("{dest}{at}/"));
                    }
                    up
                })
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            below.sort_by_key(|m| std::cmp::Reverse(m.matches('/').count()));
            markers.extend(below);
            markers.push(format!("{file}/"));
        }
        for path in files {
            self.op
                .delete(&path)
                .await
                .context(|| format!("removing {path}, in the new version's way"))?;
        }
        for marker in markers {
            if let Err(e) = self.op.delete(&marker).await {
                tracing::warn!(path = %marker, error = %e, "could not remove a folder in the new version's way");
            }
        }
        Ok(())
    }

    /// Whether every file of `held` is at its place at its size and
    /// unchanged since the version was installed (on a local disk;
    /// elsewhere assumed: a HEAD per file costs a request). Unchanged: its
    /// `ctime` (which no one can set back, unlike `mtime`) is not later
    /// than the held manifest's save, the fetch's last step; so a file
    /// edited by hand at the same size is looked at too. When one is not,
    /// the fetch goes the whole way: every file verified in place, what
    /// does not match fetched again.
    async fn in_place(&self, held: &HeldShare) -> bool {
        let Some(root) = self.opts.fs_root.clone() else {
            return true;
        };
        let saved = format!(
            "{}manifest",
            state::share_dir(&self.opts.state_prefix, &held.id)
        );
        let files: Vec<(String, u64)> = held
            .manifest
            .files()
            .map(|(p, size, _)| (format!("{}{p}", held.root), size))
            .collect();
        tokio::task::spawn_blocking(move || {
            let meta = |p: &str| {
                local::confined(&root, p)
                    .ok()
                    .and_then(|at| std::fs::symlink_metadata(at).ok())
            };
            let Some(saved) = meta(&saved) else {
                return false;
            };
            files.iter().all(|(p, size)| {
                meta(p)
                    .is_some_and(|m| m.is_file() && m.len() == *size && !changed_since(&m, &saved))
            })
        })
        .await
        .unwrap_or(false)
    }

    /// Where chunks of this version may lie in the part files an
    /// interrupted fetch of an older version left (`partial/<id>/<older
    /// seq>/<file index>`), so they are read back rather than fetched again
    /// when a new version comes between two attempts: file `i`'s chunks at
    /// their offsets in the older attempt's part file `i`, those within its
    /// size. Only candidates: each is verified when read (`Job::chunk`),
    /// so a file that moved to another index costs a read, never a wrong
    /// byte. Local disk only (part files elsewhere are not appended to).
    async fn older_parts<'c>(
        &self,
        id: &ShareId,
        seq: u64,
        files: impl Iterator<Item = &'c [ChunkRef]>,
    ) -> Vec<([u8; 32], String, u64)> {
        let Some(root) = self.opts.fs_root.clone() else {
            return Vec::new();
        };
        let dir = state::partial_dir(&self.opts.state_prefix, id);
        let older = move |name: &std::ffi::OsStr| {
            name.to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|s| s < seq)
        };
        // Most fetches have no older attempt: the chunk lists are copied
        // (for the blocking task) only when there is one (250,000 files:
        // 30 MiB at the start of the fetch, its peak).
        let any = {
            let (root, dir) = (root.clone(), dir.clone());
            tokio::task::spawn_blocking(move || {
                std::fs::read_dir(root.join(&dir))
                    .map(|seqs| seqs.flatten().any(|e| older(&e.file_name())))
                    .unwrap_or(false)
            })
            .await
            .unwrap_or(false)
        };
        if !any {
            return Vec::new();
        }
        let files: Vec<Vec<ChunkRef>> = files.map(<[ChunkRef]>::to_vec).collect();
        tokio::task::spawn_blocking(move || {
            let Ok(seqs) = std::fs::read_dir(root.join(&dir)) else {
                return Vec::new();
            };
            let mut out = Vec::new();
            for e in seqs.flatten() {
                if !older(&e.file_name()) {
                    continue;
                }
                let name = e.file_name().to_string_lossy().to_string();
                for (i, chunks) in files.iter().enumerate() {
                    let part = format!("{dir}{name}/{i}");
                    let Ok(m) = std::fs::symlink_metadata(root.join(&part)) else {
                        continue;
                    };
                    let mut off = 0u64;
                    for c in chunks {
                        let end = off + u64::from(c.len);
                        if !m.is_file() || end > m.len() {
                            break;
                        }
                        out.push((c.key, part.clone(), off));
                        off = end;
                    }
                }
            }
            out
        })
        .await
        .unwrap_or_default()
    }

    /// The version of a share this agent fetched before, if any.
    fn previous_version(&self, id: &ShareId) -> Option<Arc<HeldShare>> {
        self.share(id).filter(|s| s.role == Role::Fetched)
    }

    /// The writing side of a fetch: what an earlier version left locally
    /// (reusable), how the storage takes files, the memory budget. Refuses
    /// a file over the one-shot limit before anything is written.
    #[allow(clippy::too_many_arguments)]
    fn new_job<'a>(
        self: &Arc<Self>,
        swarm: Arc<Swarm>,
        keyer: ChunkKeyer,
        dest: &str,
        previous: Option<&HeldShare>,
        older: Vec<([u8; 32], String, u64)>,
        share: &ShareId,
        seq: u64,
        progress: &Arc<FetchProgress>,
        files: impl Iterator<Item = (&'a str, u64)>,
        repeats: Arc<Repeats>,
    ) -> Result<Arc<Job>> {
        let mut local = LocalIndex::new();
        if let Some(prev) = previous {
            for (path, _, chunks) in prev.manifest.files() {
                let mut off = 0;
                for c in chunks {
                    local
                        .entry(c.key)
                        .or_insert_with(|| (format!("{}{path}", prev.root), off));
                    off += c.len as u64;
                }
            }
        }
        for (key, part, off) in older {
            local.entry(key).or_insert((part, off));
        }
        let cap = self.op.info().capability();
        let append = cap.write_can_append && cap.rename;
        // WebDAV, Google Drive, Dropbox, OneDrive (OpenDAL 0.59): one PUT per
        // file. Refuse a file over the memory limit before anything is written.
        let one_shot = (!append && !cap.write_can_multi)
            .then(|| writer::OneShot::new(tuning::one_shot_max_bytes()));
        let streamed_puts = !append
            && one_shot.is_none()
            && tuning::streamed_put_max_bytes() > 0
            && crate::store::streamed_put::supported(&self.op);
        let mut big_files = 0;
        for (path, size) in files {
            if let Some(one) = &one_shot
                && size > one.max_bytes
            {
                return Err(writer::one_shot_refusal(path, size, one.max_bytes));
            }
            let streamed = streamed_puts && size <= tuning::streamed_put_max_bytes();
            if size > tuning::object_part_bytes() as u64 && !streamed {
                big_files += 1;
            }
        }
        Ok(Arc::new(Job {
            agent: self.clone(),
            swarm,
            keyer,
            dest: dest.to_string(),
            local,
            repeats,
            partial: state::partial_seq_dir(&self.opts.state_prefix, share, seq),
            placed_log: self
                .opts
                .fs_root
                .as_ref()
                .map(|root| root.join(state::placed_log(&self.opts.state_prefix, share))),
            may_replace: Default::default(),
            verified: Default::default(),
            append,
            one_shot,
            part_uploads: writer::part_uploads(big_files),
            streamed_puts,
            multipart_files: Arc::new(tokio::sync::Semaphore::new(writer::MULTIPART_FILES)),
            progress: progress.clone(),
            slots: Arc::new(tokio::sync::Semaphore::new(tuning::chunks_in_memory())),
            unsynced: Default::default(),
            unsynced_small: Default::default(),
            syncing: Default::default(),
            sync_slots: Arc::new(tokio::sync::Semaphore::new(writer::SYNC_CONCURRENCY)),
            buffers: Arc::new(direct::Pool::new(writer::staging_kept())),
            write_slots: Arc::new(tokio::sync::Semaphore::new(writer::WRITE_SLOTS)),
            listed: Default::default(),
            tags: Default::default(),
            local_listing: Default::default(),
        }))
    }

    /// Asks the publisher whether its pass for this share is running; if
    /// so (a newer version than held, under the key we hold), follows it.
    async fn open_live(&self, swarm: &Swarm, ticket: &Ticket, key: &Key) -> Live {
        let Some(conn) = swarm.open_to(&ticket.publisher) else {
            return if swarm.reached(&ticket.publisher) {
                Live::Lost
            } else {
                Live::Finished
            };
        };
        let held = self.share(&ticket.share_id).map(|s| s.seq()).unwrap_or(0);
        let since = std::time::Instant::now();
        let stall = tuning::live_stall();
        loop {
            let asked = std::time::Instant::now();
            let bytes = match conn.live(&ticket.share_id, 0).await {
                Ok(b) => b,
                Err(_) if conn.is_closed() => return Live::Lost,
                Err(_) => return Live::Finished,
            };
            let a = match LiveAnswer::from_bytes(&bytes) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable live answer; fetching the manifest");
                    return Live::Finished;
                }
            };
            if a.end != LiveEnd::Running
                || a.seq <= held
                || a.key_check != crate::manifest::key_check(key)
            {
                return Live::Finished;
            }
            // The walk is still going: ask again (each ask waits a while;
            // a publisher that answers at once is asked once a second),
            // for as long as a pass may take to list nothing; then the
            // manifest decides.
            if a.listing.is_none() {
                if since.elapsed() > stall {
                    tracing::warn!(share = %ticket.share_id, seconds = stall.as_secs(),
                        "the publisher's pass listed no files in time; fetching the manifest");
                    return Live::Finished;
                }
                live::pace(asked).await;
                continue;
            }
            return match LiveFeed::start(conn.clone(), ticket.share_id, a) {
                Ok(f) => Live::Following(f),
                Err(e) => {
                    tracing::warn!(error = %e, "bad live answer; fetching the manifest");
                    Live::Finished
                }
            };
        }
    }

    /// Fetches a share whose publish pass is running: each file is written
    /// as its chunks are listed (every chunk verified against its id); at
    /// the end the signed manifest must list exactly what was written, or
    /// the manifest is fetched as usual (reusing what is in place).
    async fn fetch_live(
        self: &Arc<Self>,
        ticket: &Ticket,
        dest: String,
        swarm: Arc<Swarm>,
        key: Key,
        feed: Arc<LiveFeed>,
        progress: Arc<FetchProgress>,
    ) -> Result<()> {
        let seq = feed.seq;
        let files = &feed.listing.files;
        // Bounded when the listing was taken (`live::check_listing`).
        let total: u64 = files.iter().fold(0u64, |t, f| t.saturating_add(f.1));
        tracing::info!(share = %ticket.share_id, seq, files = files.len(), bytes = total, "fetching while the publisher's pass runs");
        progress.seq.store(seq, Ordering::Relaxed);
        progress.bytes_total.store(total, Ordering::Relaxed);
        progress
            .files_total
            .store(files.len() as u64, Ordering::Relaxed);
        progress.set_state(FetchState::Transferring, None);
        let previous = self.previous_version(&ticket.share_id);
        let already = previous
            .as_ref()
            .filter(|p| p.root == dest)
            .map(|p| p.manifest.total_bytes())
            .unwrap_or(0);
        let held = self
            .held_bytes(
                &ticket.share_id,
                &dest,
                files.iter().map(|f| (f.0.as_str(), f.1)),
            )
            .await;
        self.check_room(&ticket.share_id, total, None, already.max(held))
            .await?;
        self.check_fits(
            &ticket.share_id,
            &dest,
            files
                .iter()
                .map(|f| f.0.as_str())
                .chain(feed.listing.dirs.iter().map(|d| d.0.as_str())),
        )?;
        self.check_no_other_share(&ticket.share_id, &dest, files.iter().map(|f| f.0.as_str()))
            .await?;
        let job = self.new_job(
            swarm.clone(),
            ChunkKeyer::new(&key),
            &dest,
            previous.as_deref(),
            Vec::new(),
            &ticket.share_id,
            seq,
            &progress,
            files.iter().map(|f| (f.0.as_str(), f.1)),
            feed.repeats.clone(),
        )?;
        // The pass has not listed every chunk yet: sizes only.
        let placed = self.placed_here(&ticket.share_id, &dest).await;
        let mut ours = files_here(previous.as_deref(), &dest);
        ours.extend(
            placed
                .iter()
                .filter(|p| !p.ends_with('/'))
                .map(String::as_str),
        );
        job.check_own_files(
            &ticket.share_id,
            &ours,
            &folders_here(previous.as_deref(), &dest),
            &files
                .iter()
                .map(|f| (f.0.as_str(), f.1, None))
                .collect::<Vec<_>>(),
        )
        .await?;
        self.make_room(
            &dest,
            previous.as_deref(),
            seq,
            files.iter().map(|f| f.0.as_str()),
            feed.listing.dirs.iter().map(|d| d.0.as_str()),
        )
        .await?;
        self.make_folders(
            &ticket.share_id,
            &dest,
            feed.listing.dirs.iter().map(|(d, _)| d.as_str()),
        )
        .await?;
        // By index into the listing (a list of the paths to stream held a
        // copy of every one: 18 MB for 250,000 files).
        futures::stream::iter(0..files.len())
            .map(|i| {
                let job = job.clone();
                let feed = feed.clone();
                async move {
                    let (path, size, _) = &feed.listing.files[i];
                    job.file(i, path, *size, ChunkSource::Live(&feed, i)).await
                }
            })
            .buffer_unordered(tuning::file_concurrency())
            .try_collect::<Vec<()>>()
            .await?;
        feed.ended().await?;
        // What was followed goes before the signed manifest comes, its
        // digest kept: the listing and every chunk list (44 MB for 250,000
        // files) held beside the record and the manifest that replace them
        // were the peak.
        let followed = feed.digest();
        drop(feed);
        // The signed manifest decides: it must list exactly what was written.
        let (record, manifest, key) = self
            .newest_manifest(&swarm, ticket, Some(key), 0)
            .await?
            .ok_or_else(|| Error::Protocol("no peer gave the manifest".into()))?;
        let same = manifest.seq == seq && followed == Some(live::files_digest(manifest.files()));
        if !same {
            tracing::warn!(share = %ticket.share_id, seq, signed = manifest.seq, "the signed manifest differs from the live listing; fetching it as usual");
            drop(job);
            progress.recount();
            return self
                .fetch_manifest(ticket, dest, swarm, record, manifest, key, progress)
                .await;
        }
        progress
            .chunks_total
            .store(manifest.total_chunks(), Ordering::Relaxed);
        self.finish_fetch(
            &job,
            ticket,
            &dest,
            previous.as_deref(),
            record,
            manifest,
            key,
            &progress,
        )
        .await
    }

    /// Asks every peer for the manifest and keeps the newest one that the
    /// publisher signed; fetches a fresh key when the share key was rotated.
    /// With `have` (a version held, else 0), peers answer only with a newer
    /// one; `None` when every answer was "nothing newer".
    async fn newest_manifest(
        &self,
        swarm: &Swarm,
        ticket: &Ticket,
        key: Option<Key>,
        have: u64,
    ) -> Result<Option<(Vec<u8>, Manifest, Key)>> {
        let mut best: Option<(Vec<u8>, ManifestHead)> = None;
        let mut not_newer = false;
        let mut errors = Vec::new();
        // The manifest in the publisher's bucket (offline seeding) counts
        // like one more peer's: verified the same way, the newest wins.
        if let Some(seed) = &swarm.seed {
            let (bytes, _) = seed.manifest().await;
            match ManifestHead::open(&bytes, Some(&ticket.publisher)) {
                Ok(mr) if mr.share_id == ticket.share_id => best = Some((bytes, mr)),
                Ok(_) => errors.push("bucket: manifest for another share".into()),
                Err(e) => errors.push(format!("bucket: {e}")),
            }
        }
        // Every peer is asked at once: one after another, peers that take
        // the connection and never answer (anyone may announce a share)
        // held the fetch for a minute each. Once the publisher has given
        // its manifest, the others get a short grace only (only the
        // publisher makes versions).
        let share = ticket.share_id;
        let mut asks = futures::stream::iter(swarm.distinct().into_iter().map(|conn| async move {
            let r = conn.manifest(&share, have).await;
            (conn, r)
        }))
        .buffer_unordered(MANIFEST_ASKS_AT_ONCE);
        let mut grace: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            let next = match grace.as_mut() {
                Some(g) => tokio::select! {
                    n = asks.next() => n,
                    _ = g => break,
                },
                None => asks.next().await,
            };
            let Some((conn, answer)) = next else {
                break;
            };
            let bytes = match answer {
                Ok(b) => b,
                Err(e) => {
                    errors.push(format!("{}: {e}", conn.addr));
                    continue;
                }
            };
            if bytes.is_empty() && have > 0 {
                not_newer = true;
                if conn.peer == ticket.publisher && grace.is_none() {
                    grace = Some(Box::pin(tokio::time::sleep(MANIFEST_GRACE)));
                }
                continue;
            }
            match ManifestHead::open(&bytes, Some(&ticket.publisher)) {
                Ok(mr) if mr.share_id == ticket.share_id => {
                    if best.as_ref().is_none_or(|(_, b)| mr.seq > b.seq) {
                        best = Some((bytes, mr));
                    }
                    if conn.peer == ticket.publisher && grace.is_none() {
                        grace = Some(Box::pin(tokio::time::sleep(MANIFEST_GRACE)));
                    }
                }
                Ok(_) => errors.push(format!("{}: manifest for another share", conn.addr)),
                Err(e) => {
                    self.metrics.error("bad_manifest");
                    errors.push(format!("{}: {e}", conn.addr));
                }
            }
        }
        if best.is_none() && not_newer {
            return Ok(None);
        }
        let (mut bytes, mr) = best.ok_or_else(|| {
            Error::NotFound(format!(
                "no peer would give the manifest of share {} ({})",
                ticket.share_id,
                errors.join("; ")
            ))
        })?;
        let key = match key {
            Some(k) if mr.key_check == crate::manifest::key_check(&k) => k,
            _ => self.request_key(swarm, ticket).await?,
        };
        let manifest = mr.manifest_in(&mut bytes, &key)?;
        Ok(Some((bytes, manifest, key)))
    }

    /// The publisher's bucket as a source, when the share is seeded offline
    /// and a repository (the ticket's or ours) has its seed record. Needs the
    /// share key (a keyed ticket); a failure only means "peers only".
    async fn find_seed(&self, ticket: &Ticket, key: Option<&Key>) -> Option<Arc<SeedSource>> {
        let key = key?;
        let mut repos = ticket.repositories.clone();
        repos.extend(self.opts.repositories.iter().cloned());
        repos.sort();
        repos.dedup();
        match SeedSource::discover(&repos, ticket.publisher, ticket.share_id, key).await {
            Ok(Some(s)) => {
                tracing::info!(share = %ticket.share_id, "the share is seeded offline: fetching from the publisher's bucket too");
                Some(Arc::new(s))
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(share = %ticket.share_id, error = %e, "the share's offline seed is unusable; peers only");
                None
            }
        }
    }

    /// On a local disk, the bytes of a share this agent already holds for
    /// a fetch into `dest`: its half-written part files, and its files
    /// already in place at their size (an interrupted fetch moved them
    /// there). They are reused or freed, so they count against the space
    /// a fetch needs: a resumed fetch of a share that filled the disk
    /// needs room for what is missing only, not for the whole share.
    async fn held_bytes<'f>(
        &self,
        id: &ShareId,
        dest: &str,
        files: impl Iterator<Item = (&'f str, u64)>,
    ) -> u64 {
        let Some(root) = self.opts.fs_root.clone() else {
            return 0;
        };
        let partial = root.join(state::partial_dir(&self.opts.state_prefix, id));
        let dest = root.join(dest);
        // A destination not made yet holds none of the files: they are not
        // listed (a copy of every path, 16 MiB for 250,000 files).
        let dest_made = {
            let dest = dest.clone();
            tokio::task::spawn_blocking(move || std::fs::symlink_metadata(dest).is_ok())
                .await
                .unwrap_or(true)
        };
        let files: Vec<(String, u64)> = match dest_made {
            true => files.map(|(p, n)| (p.to_string(), n)).collect(),
            false => Vec::new(),
        };
        tokio::task::spawn_blocking(move || {
            let mut held = 0u64;
            let mut dirs = vec![partial];
            while let Some(d) = dirs.pop() {
                for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                    match e.file_type() {
                        Ok(t) if t.is_dir() => dirs.push(e.path()),
                        Ok(t) if t.is_file() => {
                            held += e.metadata().map(|m| m.len()).unwrap_or(0);
                        }
                        _ => {}
                    }
                }
            }
            for (path, size) in files {
                if size > 0
                    && std::fs::symlink_metadata(dest.join(&path))
                        .is_ok_and(|m| m.is_file() && m.len() == size)
                {
                    held += size;
                }
            }
            held
        })
        .await
        .unwrap_or(0)
    }

    /// Refuses a share whose declared size is over the limit (for cause:
    /// forgotten) or, on a local filesystem, needs more than the free
    /// space (less what this agent already holds of it at the same
    /// destination), before anything more is written. Out of space is not
    /// the share's fault: the fetch and what it verified are kept, to go on
    /// once there is room.
    async fn check_room(
        &self,
        id: &ShareId,
        declared: u64,
        chunks: Option<u64>,
        already: u64,
    ) -> Result<()> {
        let limit = tuning::max_share_bytes();
        let in_chunks = chunks
            .map(|n| format!(" in {n} chunks"))
            .unwrap_or_default();
        if declared > limit {
            return Err(Error::Refused(format!(
                "share {id} declares {declared} bytes{in_chunks}, over the limit of {limit} \
                 bytes (CARAVAN_MAX_SHARE_BYTES); nothing was written"
            )));
        }
        let needed = declared.saturating_sub(already);
        let Some(root) = self.opts.fs_root.clone() else {
            return Ok(());
        };
        let Ok(disk) = rustix::fs::statvfs(root.as_path()) else {
            return Ok(());
        };
        let (mut free, mut size) = (
            disk.f_bavail.saturating_mul(disk.f_frsize),
            disk.f_blocks.saturating_mul(disk.f_frsize),
        );
        // A volume smaller than its filesystem (an emptyDir with a
        // sizeLimit: the kubelet evicts the pod past it, and the fetch
        // would start over and be evicted again): what it has left.
        if let Some(limit) = self.opts.size_limit {
            let used = tokio::task::spawn_blocking(move || crate::util::allocated_bytes(&root))
                .await
                .unwrap_or(limit);
            free = free.min(limit.saturating_sub(used));
            size = size.min(limit);
        }
        // What the other fetches running here have still to write: the
        // space each found free is theirs until they write it.
        let promised: u64 = self
            .all_fetches()
            .iter()
            .filter(|p| p.share_id != *id)
            .map(|p| p.still_to_write())
            .sum();
        check_free(id, (declared, &in_chunks, needed), (free, size), promised)
    }

    /// Refuses a share holding a path longer than this storage can write
    /// under `dest`, before anything is written, rather than failing on it
    /// halfway through the fetch (and on every retry). Names are bounded
    /// for every storage by [`crate::manifest::check_path`]; whole paths
    /// differ: a local disk's path (`PATH_MAX`) includes the storage's root
    /// folder, an object store's key (1,024 bytes on S3, GCS and Azure Blob)
    /// its root prefix. Other services are left to answer for themselves.
    ///
    /// Also refuses a share with a path inside this agent's state folder
    /// under `dest` (a `state_prefix` of `st/` and a share holding
    /// `st/trust/…` fetched into the root): `manifest::check_path` knows
    /// only the default `.caravan`, and a hostile publisher must not write
    /// the recipient's state.
    fn check_fits<'p>(
        &self,
        id: &ShareId,
        dest: &str,
        paths: impl Iterator<Item = &'p str> + Clone,
    ) -> Result<()> {
        check_outside_state(&self.opts.state_prefix, id, dest, paths.clone())?;
        if let Some(root) = &self.opts.fs_root {
            let dirs = paths
                .clone()
                .filter_map(|p| p.rsplit_once('/').map(|(d, _)| d));
            check_same_filesystem(root, &self.opts.state_prefix, id, dest, dirs)?;
        }
        let info = self.op.info();
        check_fits(info.scheme(), &info.root(), id, dest, paths)
    }

    /// Refuses a share that would write a file where another share fetched
    /// into this storage keeps one (two shares fetched into one folder with
    /// a file in common), before anything is written. Either would
    /// overwrite the other's file at each version, and a version of one that
    /// dropped it would remove the other's. Shares with no file in common
    /// share a folder freely; shares this agent publishes are not looked
    /// at (fetching into a folder one republishes is the user's choice).
    /// On a local filesystem, a file of the other share that is no longer
    /// there (its folder deleted by hand) keeps nothing: the new share may
    /// write it (the other share's next fetch is then the one refused,
    /// while this one's file is there). Object stores are not asked.
    async fn check_no_other_share<'p>(
        &self,
        id: &ShareId,
        dest: &str,
        paths: impl Iterator<Item = &'p str>,
    ) -> Result<()> {
        let others: Vec<Arc<HeldShare>> = match self.shares.read() {
            Ok(m) => m
                .values()
                .filter(|s| s.id != *id && s.role == Role::Fetched)
                .filter(|s| s.root.starts_with(dest) || dest.starts_with(s.root.as_str()))
                .cloned()
                .collect(),
            Err(_) => return Ok(()),
        };
        if others.is_empty() {
            return Ok(());
        }
        let mine: HashSet<String> = paths.map(|p| format!("{dest}{p}")).collect();
        let mut common: Vec<(String, ShareId, String)> = Vec::new();
        for other in &others {
            common.extend(
                other
                    .manifest
                    .files()
                    .map(|(p, _, _)| format!("{}{p}", other.root))
                    .filter(|p| mine.contains(p))
                    .map(|p| (p, other.id, other.root.clone())),
            );
        }
        drop(mine);
        let Some(first) = common.first().cloned() else {
            return Ok(());
        };
        let kept = match self.opts.fs_root.clone() {
            None => Some(first),
            Some(root) => {
                let n = common.len();
                let kept = tokio::task::spawn_blocking(move || {
                    common.into_iter().find(|(p, _, _)| {
                        beneath::confined(&root, p)
                            .map_or(true, |full| std::fs::symlink_metadata(full).is_ok())
                    })
                })
                .await
                .map_err(|e| Error::Protocol(format!("checking task: {e}")))?;
                if kept.is_none() {
                    tracing::info!(share = %id, other = %first.1, files = n,
                        "the files another share fetched here that this one has too are gone (removed by hand): this share takes their place");
                }
                kept
            }
        };
        match kept {
            Some((p, other, root)) => Err(Error::Rejected(format!(
                "share {id} would write {p}, a file of share {other} fetched into {root:?}: fetch \
                 it into another folder (nothing was written)"
            ))),
            None => Ok(()),
        }
    }

    /// Gives files and directories the permission bits the publisher had,
    /// where the storage is a local filesystem (object stores have none),
    /// without setuid, setgid, sticky or world-writable bits (`& 0o775`),
    /// and with what the agent itself needs kept: a folder stays readable,
    /// enterable and writable by its owner (`| 0o700`: the next version
    /// adds, replaces and deletes files in it, as an ordinary user), a file
    /// readable (`| 0o400`: it is served to other recipients and reused by
    /// the next version; files are replaced by rename, never written in
    /// place). A failure is logged, never fatal: the bytes are what matter.
    fn apply_modes(&self, dest: &str, manifest: &Manifest) {
        if let Some(root) = &self.opts.fs_root {
            // One path at a time (a list of every path, made up front,
            // was part of a many-file recipient's peak).
            let modes = manifest.entries.iter().map(|e| {
                // Mode 0 is a file closed to everyone (object stores list
                // 0o644/0o755), not "unknown": it stays closed but to the
                // agent's user.
                let mode = match e.kind {
                    EntryKind::Dir => (e.mode & 0o775) | 0o700,
                    EntryKind::File { .. } => (e.mode & 0o775) | 0o400,
                };
                (format!("{dest}{}", e.path), mode)
            });
            let failed = beneath::set_modes(root, modes);
            // The first few named, the rest counted (a folder moved aside
            // meanwhile fails thousands the same way).
            for (path, err) in failed.iter().take(5) {
                tracing::warn!(%path, error = %err, "could not set file mode");
            }
            if failed.len() > 5 {
                tracing::warn!(
                    more = failed.len() - 5,
                    "could not set the mode of more files"
                );
            }
        }
    }

    /// Makes the share's folders under `dest` (empty ones included); on a
    /// local disk never through a link (`beneath`), and those it makes are
    /// noted as placed first ([`state::placed_log`]), so that if this
    /// fetch does not finish, the version that follows removes those it
    /// does not have, as it removes the files this one placed.
    async fn make_folders<'d>(
        &self,
        id: &ShareId,
        dest: &str,
        dirs: impl Iterator<Item = &'d str>,
    ) -> Result<()> {
        // "" is the destination itself (none when it is the root).
        let paths: Vec<String> = dirs
            .map(|d| match d {
                "" => dest.to_string(),
                d => format!("{dest}{d}/"),
            })
            .filter(|p| !p.is_empty())
            .collect();
        match self.opts.fs_root.clone() {
            Some(root) => {
                let log = root.join(state::placed_log(&self.opts.state_prefix, id));
                tokio::task::spawn_blocking(move || {
                    let new: Vec<&str> = paths
                        .iter()
                        .map(String::as_str)
                        .filter(|p| {
                            local::confined(&root, p)
                                .is_ok_and(|at| std::fs::symlink_metadata(at).is_err())
                        })
                        .collect();
                    if !new.is_empty() {
                        local::note_placed_all(&log, &new)?;
                    }
                    paths.iter().try_for_each(|p| {
                        beneath::make_folder(&root, p).map_err(|e| {
                            std::io::Error::new(e.kind(), format!("creating {p}: {e}"))
                        })
                    })
                })
            }
            .await
            .map_err(|e| Error::Protocol(format!("folders task: {e}")))?
            .context(|| "creating the share's folders".to_string()),
            None => {
                for p in paths {
                    self.op
                        .create_dir(&p)
                        .await
                        .context(|| format!("creating {p}"))?;
                }
                Ok(())
            }
        }
    }

    /// Asks the publisher for the current share key (it re-checks our right to it).
    async fn request_key(&self, swarm: &Swarm, ticket: &Ticket) -> Result<Key> {
        let proof = self.proof_for(&ticket.publisher).await;
        if let Some(conn) = swarm
            .distinct()
            .into_iter()
            .find(|c| c.peer == ticket.publisher)
        {
            let bytes = conn.key(&ticket.share_id, &proof).await.map_err(|e| {
                Error::NotFound(format!(
                    "the publisher refused the new share key (access withdrawn or no valid trust chain): {e}"
                ))
            })?;
            let (_, rel): (_, KeyRelease) =
                SignedRecord::open_from(&bytes, Some(&ticket.publisher))?;
            if rel.recipient != self.id || rel.share_id != ticket.share_id {
                return Err(Error::Record("key release is for someone else".into()));
            }
            return self.key.unwrap_key(&rel.wrapped_key);
        }
        Err(Error::NotFound(
            "the share key changed and the publisher is not reachable to hand out the new one"
                .into(),
        ))
    }

    /// Proof records to present to `publisher`: the grants linking it to
    /// this agent, found by the trust state (empty without one).
    async fn proof_for(&self, publisher: &AgentId) -> Vec<Vec<u8>> {
        match self.trust() {
            Some(w) => w.proof_for(publisher).await,
            None => Vec::new(),
        }
    }

    /// Presents our proof chain to every peer of the swarm (each remembers
    /// it and re-checks it on every manifest and chunk request) and returns
    /// the key the publisher released. Holders other than the publisher
    /// answer "not found" to the key itself, which is expected.
    async fn present_proof(&self, swarm: &Swarm, ticket: &Ticket) -> Result<Key> {
        let proof = self.proof_for(&ticket.publisher).await;
        let asks = swarm.distinct().into_iter().map(|conn| {
            let proof = proof.clone();
            async move {
                let r = conn.key(&ticket.share_id, &proof).await;
                (conn.peer, r)
            }
        });
        let mut refusal = None;
        let mut key = None;
        for (peer, r) in futures::future::join_all(asks).await {
            if peer != ticket.publisher {
                continue;
            }
            match r {
                Ok(bytes) => {
                    let (_, rel): (_, KeyRelease) =
                        SignedRecord::open_from(&bytes, Some(&ticket.publisher))?;
                    if rel.recipient != self.id || rel.share_id != ticket.share_id {
                        return Err(Error::Record("key release is for someone else".into()));
                    }
                    key = Some(self.key.unwrap_key(&rel.wrapped_key)?);
                }
                Err(e) => refusal = Some(e),
            }
        }
        key.ok_or_else(|| match refusal {
            Some(e) => {
                tracing::debug!(error = %e, "key refused");
                Error::NotFound(if proof.is_empty() {
                    "the publisher refused the share key: this agent found no valid grant chain from the publisher (see `trust why`)".to_string()
                } else {
                    format!(
                        "the publisher refused the share key: the {} grant(s) presented hold no valid chain for it (revoked, expired or too deep)",
                        proof.len()
                    )
                })
            }
            None => {
                Error::NotFound("the publisher is not reachable to release the share key".into())
            }
        })
    }
}

/// Refuses paths that `dest` + path puts inside the state folder
/// `prefix` (`dest` is a checked folder: `""` or ending in `/`, itself
/// outside the state folder).
fn check_outside_state<'p>(
    prefix: &str,
    id: &ShareId,
    dest: &str,
    mut paths: impl Iterator<Item = &'p str>,
) -> Result<()> {
    let state = prefix.trim_end_matches('/');
    let Some(inside) = state.strip_prefix(dest).filter(|s| !s.is_empty()) else {
        return Ok(());
    };
    match paths.find(|p| *p == inside || p.strip_prefix(inside).is_some_and(|r| r.starts_with('/')))
    {
        Some(p) => Err(Error::Refused(format!(
            "share {id} holds {p:?}, which would land in this agent's state folder {prefix:?} \
             under {dest:?}: fetch it to another folder (nothing was written)"
        ))),
        None => Ok(()),
    }
}

/// [`Agent::check_room`] against a disk of `size` bytes with `free` free,
/// `promised` of them to other fetches running: refuses a share that needs
/// more than the disk's whole size for cause, and one that needs more than
/// what is free and not promised as out of space (kept, to go on later).
fn check_free(
    id: &ShareId,
    (declared, in_chunks, needed): (u64, &str, u64),
    (free, size): (u64, u64),
    promised: u64,
) -> Result<()> {
    if needed > size {
        // Never fits, whatever is freed: refused for cause, like a share
        // over the limit.
        return Err(Error::Refused(format!(
            "share {id} declares {declared} bytes{in_chunks}, over the whole size of this \
             storage ({size} bytes: its disk's, or its size_limit); nothing was written"
        )));
    }
    let room = free.saturating_sub(promised);
    if needed <= room {
        return Ok(());
    }
    let others = match promised {
        0 => String::new(),
        p => format!(" ({p} of them still to be written by other fetches running)"),
    };
    Err(Error::Io {
        context: format!(
            "fetching share {id}: it declares {declared} bytes{in_chunks}, of which {needed} \
             are not held here yet, over the {free} bytes free{others}; nothing more was \
             written, and what was verified is kept: free some space and fetch it again"
        ),
        source: std::io::Error::from(std::io::ErrorKind::StorageFull),
    })
}

/// [`Agent::check_fits`] for a storage of `scheme` whose root is `root`.
/// Refuses a destination on another mount than the agent's state folder
/// (a mount point inside the storage, at the destination or at one of the
/// share's folders already there), before anything is fetched: fetched
/// files are written under the state folder and moved into place, and a
/// move cannot cross mounts, even two of one filesystem (a bind mount).
/// The whole share was downloaded, then every move failed with "Invalid
/// cross-device link", at every attempt. Where a path is missing, the
/// nearest folder above it counts; mounts are told apart by their mount id
/// (Linux 5.8), else by their device.
fn check_same_filesystem<'d>(
    root: &std::path::Path,
    state: &str,
    id: &ShareId,
    dest: &str,
    dirs: impl Iterator<Item = &'d str>,
) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mount = |p: &std::path::Path| -> Option<(u64, u64)> {
        let m = std::fs::metadata(p).ok()?;
        let mnt = rustix::fs::statx(
            rustix::fs::CWD,
            p,
            rustix::fs::AtFlags::empty(),
            rustix::fs::StatxFlags::MNT_ID,
        )
        .ok()
        .filter(|x| x.stx_mask & rustix::fs::StatxFlags::MNT_ID.bits() != 0)
        .map_or(0, |x| x.stx_mnt_id);
        Some((m.dev(), mnt))
    };
    let nearest = |p: &std::path::Path| p.ancestors().find_map(&mount);
    let state_at = root.join(state.trim_end_matches('/'));
    let Some(home) = nearest(&state_at) else {
        return Ok(());
    };
    let refuse = |at: &str| {
        Error::Rejected(format!(
            "share {id} cannot be fetched into {dest:?}: {at:?} is on another filesystem or \
             mount than the agent's state folder {state:?} (a mount point inside the \
             storage), and fetched files are moved into place from there; fetch into a \
             folder on the storage's own mount, or make the mount the agent's storage \
             (nothing was written)"
        ))
    };
    let at = local::confined(root, dest).map_err(|e| Error::Rejected(e.to_string()))?;
    if nearest(&at).is_some_and(|m| m != home) {
        return Err(refuse(dest));
    }
    // Each folder once (the paths come sorted: a folder's files are
    // together), a new one by the nearest folder above it.
    let mut last = None;
    for d in dirs {
        if last == Some(d) {
            continue;
        }
        last = Some(d);
        let rel = format!("{dest}{d}");
        let Ok(p) = local::confined(root, &rel) else {
            continue;
        };
        if nearest(&p).is_some_and(|m| m != home) {
            return Err(refuse(&rel));
        }
    }
    Ok(())
}

fn check_fits<'p>(
    scheme: &str,
    root: &str,
    id: &ShareId,
    dest: &str,
    paths: impl Iterator<Item = &'p str>,
) -> Result<()> {
    let (prefix, max) = match scheme {
        "fs" => (root.len(), 4095),
        "s3" | "gcs" | "azblob" => (root.trim_start_matches('/').len(), 1024),
        _ => return Ok(()),
    };
    let Some(longest) = paths.max_by_key(|p| p.len()) else {
        return Ok(());
    };
    let len = prefix + dest.len() + longest.len();
    if len > max {
        return Err(Error::Refused(format!(
            "share {id} holds {dest}{longest}, a path of {len} bytes with the storage's root; \
             this storage ({scheme}) holds at most {max}: fetch it to a shorter destination or \
             other storage (nothing was written)"
        )));
    }
    Ok(())
}

/// Whether a file's inode changed (written, truncated, its mode set)
/// after `saved` was last written: both stamps come from the same clock.
#[cfg(unix)]
fn changed_since(file: &std::fs::Metadata, saved: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    (file.ctime(), file.ctime_nsec()) > (saved.mtime(), saved.mtime_nsec())
}

#[cfg(not(unix))]
fn changed_since(_: &std::fs::Metadata, _: &std::fs::Metadata) -> bool {
    false
}

/// The publisher of a share as a refusal names it.
fn describe(agent: &AgentId, me: &AgentId) -> String {
    match agent == me {
        true => format!("published by this agent ({agent})"),
        false => format!("published by {agent}"),
    }
}

/// The folders a manifest lists.
fn manifest_dirs(m: &Manifest) -> impl Iterator<Item = &str> {
    m.entries.iter().filter_map(|e| match e.kind {
        EntryKind::Dir => Some(e.path.as_str()),
        EntryKind::File { .. } => None,
    })
}

/// The earlier version a fetch of version `seq` into `dest` replaces: the
/// one fetched there before, if older. Its files where this version has
/// none, and its folders where this one has files, are this fetch's to
/// remove; nothing else is.
fn written_over<'a>(
    previous: Option<&'a HeldShare>,
    dest: &str,
    seq: u64,
) -> Option<&'a HeldShare> {
    previous.filter(|p| p.root == dest && p.seq() < seq)
}

/// The shape changes from the version `prev` holds to `next`.
fn reshape(prev: &HeldShare, next: &Manifest) -> tree::Reshape {
    let old_files: Vec<&str> = prev.manifest.files().map(|f| f.0).collect();
    let new_files: Vec<&str> = next.files().map(|f| f.0).collect();
    tree::Reshape::between(
        &old_files,
        manifest_dirs(&prev.manifest),
        &new_files,
        manifest_dirs(next),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share() -> ShareId {
        ShareId([7; 32])
    }

    /// Free space counted on by the fetches running is theirs: a second
    /// fetch that fits in what is free, but not in what the first has
    /// still to write, is refused as out of space (kept, to go on later),
    /// saying why; one larger than the whole disk is refused for cause.
    #[test]
    fn the_space_other_fetches_still_need_is_not_counted_free() {
        let id = share();
        let fits = |needed, promised| check_free(&id, (needed, "", needed), (1000, 5000), promised);
        assert!(fits(900, 0).is_ok());
        assert!(fits(900, 100).is_ok());
        let e = fits(900, 101).unwrap_err();
        assert!(
            matches!(&e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("101 of them still to be written by other fetches"),
            "{e}"
        );
        assert!(fits(1001, 0).is_err());
        assert!(matches!(fits(5001, 0), Err(Error::Refused(_))));
    }

    /// Guarantee: a destination on another filesystem than the agent's
    /// state (a mount point inside the storage) is refused before anything
    /// is fetched, saying why (the whole share was downloaded, then every
    /// move into place failed with EXDEV). Here the storage is `/`, its
    /// state under /tmp, and /proc another filesystem.
    #[test]
    fn a_destination_on_another_filesystem_is_refused_before_fetching() {
        use std::os::unix::fs::MetadataExt;
        let root = std::path::Path::new("/");
        let dev = |p: &str| std::fs::metadata(p).unwrap().dev();
        assert_ne!(dev("/proc"), dev("/tmp"), "the test needs /proc apart");
        let none = || std::iter::empty();
        let e = check_same_filesystem(root, "tmp/caravan-state/", &share(), "proc/x/", none())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("another filesystem") && e.contains("nothing was written"),
            "{e}"
        );
        assert!(
            check_same_filesystem(root, "tmp/caravan-state/", &share(), "tmp/d/", none()).is_ok()
        );
        // A mount at one of the share's folders already in the destination
        // (the storage `/`, the destination its top, the share's folder `proc`).
        let dirs = ["proc"].into_iter();
        let e = check_same_filesystem(root, "tmp/caravan-state/", &share(), "", dirs)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"proc\""), "{e}");
    }

    /// Only a fetch that is transferring holds space: what it has not
    /// written yet.
    #[test]
    fn a_fetch_holds_what_it_has_still_to_write_while_it_transfers() {
        let p = progress::FetchProgress::new(share(), "d/".into());
        p.bytes_total.store(1000, Ordering::Relaxed);
        p.bytes_done.store(300, Ordering::Relaxed);
        assert_eq!(p.still_to_write(), 0, "not started");
        p.set_state(FetchState::Transferring, None);
        assert_eq!(p.still_to_write(), 700);
        p.set_state(FetchState::Failed, Some("gone".into()));
        assert_eq!(p.still_to_write(), 0);
    }

    /// A key of an object store holds 1,024 bytes with the storage's root
    /// prefix; a longer one is refused before anything is written, naming
    /// the path. Other services answer for themselves.
    #[test]
    fn paths_longer_than_an_object_store_key_are_refused_before_writing() {
        let fits = "a".repeat(1024 - "prefix/".len() - "dest/".len());
        let over = format!("{fits}b");
        for scheme in ["s3", "gcs", "azblob"] {
            check_fits(
                scheme,
                "/prefix/",
                &share(),
                "dest/",
                ["x", &fits].into_iter(),
            )
            .unwrap();
            let e = check_fits(
                scheme,
                "/prefix/",
                &share(),
                "dest/",
                ["x", &over].into_iter(),
            )
            .unwrap_err();
            assert!(matches!(e, Error::Refused(_)), "{e}");
            assert!(e.to_string().contains("1025 bytes"), "{e}");
        }
        check_fits(
            "webdav",
            "/",
            &share(),
            "dest/",
            [over.as_str()].into_iter(),
        )
        .unwrap();
    }

    /// On a local disk the whole path, the storage's folder included, is
    /// what the kernel takes (`PATH_MAX`).
    #[tokio::test]
    async fn paths_longer_than_a_disk_takes_are_refused_before_writing() {
        let tmp = tempfile::tempdir().unwrap();
        let op = crate::store::open(&crate::config::StorageConfig {
            scheme: "fs".into(),
            options: [("root".to_string(), tmp.path().display().to_string())].into(),
            credentials: None,
            size_limit: None,
        })
        .unwrap();
        let agent = Agent::for_test(op, Some(tmp.path().to_path_buf())).await;
        let deep = format!("{}/{}", vec!["d".repeat(200); 20].join("/"), "f".repeat(70));
        crate::manifest::check_path(&deep).unwrap();
        let e = agent
            .check_fits(&share(), "dest/", [deep.as_str()].into_iter())
            .unwrap_err();
        assert!(matches!(e, Error::Refused(_)), "{e}");
        agent
            .check_fits(&share(), "dest/", ["a/b.txt"].into_iter())
            .unwrap();
    }
}
