//! Fetching a share: find its newest manifest, then pull every chunk from
//! every peer that holds it — in parallel, pipelined, each chunk verified —
//! and write each file into the user's storage so it appears only when
//! complete. Verified progress is kept in storage, so a fetch interrupted by
//! a crash picks up where it stopped, and data already present locally (an
//! earlier version, a finished file) is reused instead of downloaded.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::stream::{FuturesOrdered, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::chunk::{self, ChunkKeyer, ChunkRef};
use crate::crypto::Key;
use crate::error::{Context, Error, Result};
use crate::identity::AgentId;
use crate::manifest::{EntryKind, KeyRelease, Manifest, ManifestRecord, ShareId, Ticket};
use crate::metrics::Metrics;
use crate::node::Agent;
use crate::publish::normalize;
use crate::record::SignedRecord;
use crate::share::{HeldShare, Role};
use crate::wire::client::PeerConn;

/// Connections opened to each peer (spreads TLS work over cores).
fn conns_per_peer() -> usize {
    tuning("CARAVAN_CONNS_PER_PEER", 2)
}
/// Chunks requested ahead within one file.
fn window() -> usize {
    tuning("CARAVAN_WINDOW", 16)
}
/// Files written at once.
fn file_concurrency() -> usize {
    tuning("CARAVAN_FILE_CONCURRENCY", 4)
}

/// Reads a positive tuning knob from the environment (for benchmarking).
fn tuning(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0)
        .unwrap_or(default)
}
/// Corrupt chunks after which a peer is no longer asked.
const BAN_AFTER: u32 = 8;

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

/// Where a fetch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FetchState {
    /// Looking for peers and the manifest.
    Starting,
    /// Moving bytes.
    Transferring,
    /// Every file is in place and verified.
    Done,
    /// Stopped with an error (see `error`).
    Failed,
}

/// Live progress of one fetch, readable while it runs.
#[derive(Debug)]
pub struct FetchProgress {
    /// The share.
    pub share_id: ShareId,
    /// Destination directory.
    pub dest: String,
    started: Instant,
    state: Mutex<(FetchState, Option<String>)>,
    seq: AtomicU64,
    bytes_total: AtomicU64,
    bytes_done: AtomicU64,
    chunks_total: AtomicU64,
    chunks_done: AtomicU64,
    chunks_fetched: AtomicU64,
    chunks_reused: AtomicU64,
    files_total: AtomicU64,
    files_done: AtomicU64,
    bytes_received: AtomicU64,
    peers: Mutex<Vec<String>>,
    finished_secs: Mutex<Option<f64>>,
}

/// A copy of [`FetchProgress`] for the admin API and the CLI.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgressSnapshot {
    /// The share.
    pub share_id: String,
    /// Destination directory.
    pub dest: String,
    /// State.
    pub state: FetchState,
    /// Error message when failed.
    pub error: Option<String>,
    /// Version being fetched.
    pub seq: u64,
    /// Bytes in the share.
    pub bytes_total: u64,
    /// Bytes verified and written (or verified in place).
    pub bytes_done: u64,
    /// Chunks in the share.
    pub chunks_total: u64,
    /// Chunks verified and written.
    pub chunks_done: u64,
    /// Chunks downloaded from peers.
    pub chunks_fetched: u64,
    /// Chunks found locally and not downloaded.
    pub chunks_reused: u64,
    /// Files in the share.
    pub files_total: u64,
    /// Files complete.
    pub files_done: u64,
    /// Ciphertext bytes received from peers.
    pub bytes_received: u64,
    /// Peers in use (agent ids).
    pub peers: Vec<String>,
    /// Seconds since start (or total when finished).
    pub seconds: f64,
}

impl FetchProgress {
    fn new(share_id: ShareId, dest: String) -> Self {
        FetchProgress {
            share_id,
            dest,
            started: Instant::now(),
            state: Mutex::new((FetchState::Starting, None)),
            seq: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            bytes_done: AtomicU64::new(0),
            chunks_total: AtomicU64::new(0),
            chunks_done: AtomicU64::new(0),
            chunks_fetched: AtomicU64::new(0),
            chunks_reused: AtomicU64::new(0),
            files_total: AtomicU64::new(0),
            files_done: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            peers: Mutex::new(Vec::new()),
            finished_secs: Mutex::new(None),
        }
    }

    fn set_state(&self, s: FetchState, err: Option<String>) {
        if let Ok(mut g) = self.state.lock() {
            *g = (s, err);
        }
        if matches!(s, FetchState::Done | FetchState::Failed)
            && let Ok(mut f) = self.finished_secs.lock()
        {
            *f = Some(self.started.elapsed().as_secs_f64());
        }
    }

    /// A consistent-enough copy for reporting.
    pub fn snapshot(&self) -> ProgressSnapshot {
        let (state, error) = self
            .state
            .lock()
            .map(|g| g.clone())
            .unwrap_or((FetchState::Failed, Some("progress lock poisoned".into())));
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProgressSnapshot {
            share_id: self.share_id.to_string(),
            dest: self.dest.clone(),
            state,
            error,
            seq: l(&self.seq),
            bytes_total: l(&self.bytes_total),
            bytes_done: l(&self.bytes_done),
            chunks_total: l(&self.chunks_total),
            chunks_done: l(&self.chunks_done),
            chunks_fetched: l(&self.chunks_fetched),
            chunks_reused: l(&self.chunks_reused),
            files_total: l(&self.files_total),
            files_done: l(&self.files_done),
            bytes_received: l(&self.bytes_received),
            peers: self.peers.lock().map(|p| p.clone()).unwrap_or_default(),
            seconds: self
                .finished_secs
                .lock()
                .ok()
                .and_then(|f| *f)
                .unwrap_or_else(|| self.started.elapsed().as_secs_f64()),
        }
    }
}

/// The peers serving one fetch, and what we think of them.
struct Swarm {
    share: ShareId,
    conns: Vec<Arc<PeerConn>>,
    strikes: Mutex<HashMap<AgentId, u32>>,
    metrics: Metrics,
    progress: Arc<FetchProgress>,
}

impl Swarm {
    async fn connect(
        agent: &Agent,
        addrs: &[String],
        share: ShareId,
        progress: Arc<FetchProgress>,
    ) -> Result<Swarm> {
        let attempts: Vec<_> = addrs
            .iter()
            .flat_map(|a| std::iter::repeat_n(a.clone(), conns_per_peer()))
            .map(|addr| {
                let key = agent.key.clone();
                async move {
                    let r = PeerConn::connect(&addr, &key, None).await;
                    (addr, r)
                }
            })
            .collect();
        let results: Vec<(String, Result<PeerConn>)> = futures::stream::iter(attempts)
            .buffer_unordered(8)
            .collect()
            .await;
        let mut conns = Vec::new();
        let mut errors = Vec::new();
        for (addr, r) in results {
            match r {
                Ok(c) if c.peer == agent.id => {}
                Ok(c) => conns.push(Arc::new(c)),
                Err(e) => {
                    agent.metrics.error("connect");
                    tracing::warn!(%addr, error = %e, "peer unreachable");
                    errors.push(format!("{addr}: {e}"));
                }
            }
        }
        if conns.is_empty() {
            errors.dedup();
            return Err(Error::Protocol(format!(
                "no peer reachable for share {share}{}",
                if errors.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", errors.join("; "))
                }
            )));
        }
        let mut ids: Vec<String> = conns.iter().map(|c| c.peer.to_string()).collect();
        ids.sort();
        ids.dedup();
        if let Ok(mut p) = progress.peers.lock() {
            *p = ids;
        }
        Ok(Swarm {
            share,
            conns,
            strikes: Mutex::new(HashMap::new()),
            metrics: agent.metrics.clone(),
            progress,
        })
    }

    /// One connection per distinct peer.
    fn distinct(&self) -> Vec<Arc<PeerConn>> {
        let mut seen = HashSet::new();
        self.conns
            .iter()
            .filter(|c| seen.insert(c.peer))
            .cloned()
            .collect()
    }

    fn banned(&self, peer: &AgentId) -> bool {
        self.strikes
            .lock()
            .map(|s| s.get(peer).copied().unwrap_or(0) >= BAN_AFTER)
            .unwrap_or(false)
    }

    fn pick(&self, avoid: &HashSet<AgentId>) -> Option<Arc<PeerConn>> {
        self.conns
            .iter()
            .filter(|c| !c.is_closed() && !avoid.contains(&c.peer) && !self.banned(&c.peer))
            .min_by_key(|c| c.in_flight())
            .cloned()
    }

    /// Gets one chunk, verified, trying other peers when one fails or lies.
    async fn get(&self, r: ChunkRef) -> Result<Vec<u8>> {
        let mut avoid = HashSet::new();
        let mut last = None;
        for _ in 0..(self.conns.len() + 2) {
            let Some(conn) = self.pick(&avoid) else { break };
            match conn.chunk(&self.share, &r.id).await {
                Ok(ct) => {
                    let n = ct.len() as u64;
                    self.metrics.bytes_received.inc_by(n);
                    self.progress.bytes_received.fetch_add(n, Ordering::Relaxed);
                    match chunk::open(&r, ct) {
                        Ok(plain) => {
                            self.metrics.chunks_received.inc();
                            self.progress.chunks_fetched.fetch_add(1, Ordering::Relaxed);
                            return Ok(plain);
                        }
                        Err(e) => {
                            self.metrics.chunks_rejected.inc();
                            tracing::warn!(peer = %conn.peer.short(), error = %e, "rejected a corrupt chunk; asking another peer");
                            if let Ok(mut s) = self.strikes.lock() {
                                *s.entry(conn.peer).or_default() += 1;
                            }
                            avoid.insert(conn.peer);
                            last = Some(e);
                        }
                    }
                }
                Err(e) => {
                    self.metrics.error("peer_request");
                    tracing::debug!(peer = %conn.peer.short(), error = %e, "chunk request failed; asking another peer");
                    avoid.insert(conn.peer);
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Protocol(format!("no usable peer has chunk {}", r.id))))
    }
}

/// Local data that may already hold chunks: key → (path, offset).
type LocalIndex = HashMap<[u8; 32], (String, u64)>;

struct Job {
    agent: Arc<Agent>,
    swarm: Swarm,
    keyer: ChunkKeyer,
    dest: String,
    local: LocalIndex,
    partial: String,
    append: bool,
    progress: Arc<FetchProgress>,
}

impl Agent {
    /// Starts a fetch in the background and returns its progress handle.
    /// The request is persisted first, so a restarted agent resumes it.
    pub async fn start_fetch(self: &Arc<Self>, req: FetchRequest) -> Result<Arc<FetchProgress>> {
        let ticket = Ticket::parse(&req.ticket)?;
        if ticket.recipient != self.id {
            return Err(Error::Config(format!(
                "this ticket is for agent {}, but this agent is {}",
                ticket.recipient, self.id
            )));
        }
        let path = self.pending_path(&ticket.share_id);
        let json = serde_json::to_vec(&req).map_err(|e| Error::Config(e.to_string()))?;
        self.op
            .write(&path, json)
            .await
            .context(|| format!("saving {path}"))?;
        let progress = Arc::new(FetchProgress::new(
            ticket.share_id,
            normalize_dir(&req.dest),
        ));
        if let Ok(mut m) = self.fetches.lock() {
            m.insert(ticket.share_id, progress.clone());
        }
        let agent = self.clone();
        let p = progress.clone();
        tokio::spawn(async move {
            if let Err(e) = agent.clone().run_fetch(req, p.clone()).await {
                agent.metrics.error("fetch");
                tracing::error!(share = %p.share_id, error = %e, "fetch failed");
                p.set_state(FetchState::Failed, Some(e.to_string()));
            }
        });
        Ok(progress)
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

    /// Restarts fetches that were in progress when the agent stopped.
    pub async fn resume_fetches(self: &Arc<Self>) -> Result<usize> {
        let dir = format!("{}fetches/", self.opts.state_prefix);
        let entries = crate::store::list_or_empty(&self.op, &dir).await?;
        let mut n = 0;
        for e in entries {
            if !e.path().ends_with(".json") {
                continue;
            }
            let bytes = self
                .op
                .read(e.path())
                .await
                .context(|| format!("reading {}", e.path()))?;
            match serde_json::from_slice::<FetchRequest>(&bytes.to_vec()) {
                Ok(req) => {
                    tracing::info!(path = e.path(), "resuming an interrupted fetch");
                    self.start_fetch(req).await?;
                    n += 1;
                }
                Err(err) => {
                    tracing::warn!(path = e.path(), error = %err, "ignoring unreadable fetch state")
                }
            }
        }
        Ok(n)
    }

    fn pending_path(&self, id: &ShareId) -> String {
        format!("{}fetches/{}.json", self.opts.state_prefix, id.hex())
    }

    async fn run_fetch(
        self: Arc<Self>,
        req: FetchRequest,
        progress: Arc<FetchProgress>,
    ) -> Result<()> {
        let ticket = Ticket::parse(&req.ticket)?;
        let dest = normalize_dir(&req.dest);
        if dest.starts_with(&self.opts.state_prefix) {
            return Err(Error::Config(
                "the destination cannot be inside the agent's state prefix".into(),
            ));
        }
        // A ticket for "agents the publisher trusts" carries no key: the
        // publisher releases it after checking our chain (see `present_proof`).
        let key = if ticket.wrapped_key.is_empty() {
            None
        } else {
            Some(self.key.unwrap_key(&ticket.wrapped_key)?)
        };
        let mut addrs = ticket.addresses.clone();
        addrs.extend(req.peers.iter().cloned());
        if let Some(web) = self.web() {
            // Peers from every repository (union, verified); a repository
            // that is down answers from the client's cache or is skipped.
            match web.peers_for(&ticket.share_id.0).await {
                Ok(found) => addrs.extend(found.into_iter().flat_map(|(_, a)| a)),
                Err(e) => tracing::warn!(error = %e, "no repository answered; using known peers"),
            }
        }
        addrs.sort();
        addrs.dedup();
        let swarm = Swarm::connect(&self, &addrs, ticket.share_id, progress.clone()).await?;
        let key = match key {
            Some(k) => Some(k),
            None => Some(self.present_proof(&swarm, &ticket).await?),
        };
        let (record, manifest, key) = self.newest_manifest(&swarm, &ticket, key).await?;
        let keyer = ChunkKeyer::new(&key);
        let seq = manifest.seq;
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

        // What an earlier version left locally can be reused.
        let previous = self
            .share(&ticket.share_id)
            .filter(|s| s.role == Role::Fetched);
        let mut local = LocalIndex::new();
        if let Some(prev) = &previous {
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
        let cap = self.op.info().capability();
        let append = cap.write_can_append && cap.rename;
        let job = Arc::new(Job {
            agent: self.clone(),
            swarm,
            keyer,
            dest: dest.clone(),
            local,
            partial: format!(
                "{}partial/{}/{seq}/",
                self.opts.state_prefix,
                ticket.share_id.hex()
            ),
            append,
            progress: progress.clone(),
        });

        for e in &manifest.entries {
            if matches!(e.kind, EntryKind::Dir) {
                let p = format!("{dest}{}/", e.path);
                self.op
                    .create_dir(&p)
                    .await
                    .context(|| format!("creating {p}"))?;
            }
        }
        let files: Vec<(usize, String, u64, Vec<ChunkRef>)> = manifest
            .files()
            .enumerate()
            .map(|(i, (p, s, c))| (i, p.to_string(), s, c.to_vec()))
            .collect();
        futures::stream::iter(files)
            .map(|(i, path, size, chunks)| {
                let job = job.clone();
                async move { job.file(i, &path, size, &chunks).await }
            })
            .buffer_unordered(file_concurrency())
            .try_collect::<Vec<()>>()
            .await?;
        self.apply_modes(&dest, &manifest);

        // Files the previous version had and this one dropped go away too.
        if let Some(prev) = &previous
            && prev.root == dest
        {
            let now: HashSet<&str> = manifest.files().map(|(p, _, _)| p).collect();
            for (p, _, _) in prev.manifest.files() {
                if !now.contains(p) {
                    let path = format!("{dest}{p}");
                    self.op
                        .delete(&path)
                        .await
                        .context(|| format!("removing {path}"))?;
                }
            }
        }
        let held = HeldShare::new(ticket.publisher, key, Role::Fetched, dest, manifest, record);
        self.install_share(held).await?;
        let partial_root = format!(
            "{}partial/{}/",
            self.opts.state_prefix,
            ticket.share_id.hex()
        );
        let _ = self.op.delete_with(&partial_root).recursive(true).await;
        let pending = self.pending_path(&ticket.share_id);
        self.op
            .delete(&pending)
            .await
            .context(|| format!("removing {pending}"))?;
        progress.set_state(FetchState::Done, None);
        let s = progress.snapshot();
        tracing::info!(share = %ticket.share_id, seq, bytes = s.bytes_total, fetched = s.chunks_fetched, reused = s.chunks_reused, seconds = s.seconds, "fetch complete");
        Ok(())
    }

    /// Asks every peer for the manifest and keeps the newest one that the
    /// publisher signed; fetches a fresh key when the share key was rotated.
    async fn newest_manifest(
        &self,
        swarm: &Swarm,
        ticket: &Ticket,
        key: Option<Key>,
    ) -> Result<(Vec<u8>, Manifest, Key)> {
        let mut best: Option<(Vec<u8>, ManifestRecord)> = None;
        let mut errors = Vec::new();
        for conn in swarm.distinct() {
            let bytes = match conn.manifest(&ticket.share_id, 0).await {
                Ok(b) => b,
                Err(e) => {
                    errors.push(format!("{}: {e}", conn.addr));
                    continue;
                }
            };
            match SignedRecord::open_from::<ManifestRecord>(&bytes, Some(&ticket.publisher)) {
                Ok((_, mr)) if mr.share_id == ticket.share_id => {
                    if best.as_ref().is_none_or(|(_, b)| mr.seq > b.seq) {
                        best = Some((bytes, mr));
                    }
                }
                Ok(_) => errors.push(format!("{}: manifest for another share", conn.addr)),
                Err(e) => {
                    self.metrics.error("bad_manifest");
                    errors.push(format!("{}: {e}", conn.addr));
                }
            }
        }
        let (bytes, mr) = best.ok_or_else(|| {
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
        let manifest = mr.open(&key)?;
        Ok((bytes, manifest, key))
    }

    /// Gives files and directories the permission bits the publisher had,
    /// where the storage is a local filesystem (object stores have none).
    /// A failure is logged, never fatal: the bytes are what matter.
    fn apply_modes(&self, dest: &str, manifest: &Manifest) {
        #[cfg(unix)]
        if let Some(root) = &self.opts.fs_root {
            use std::os::unix::fs::PermissionsExt;
            for e in &manifest.entries {
                let path = root.join(format!("{dest}{}", e.path));
                let mode = e.mode & 0o7777;
                if mode == 0 {
                    continue;
                }
                if let Err(err) =
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                {
                    tracing::warn!(path = %path.display(), error = %err, "could not set file mode");
                }
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
        match self.web() {
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

impl Job {
    /// Fetches one file. Writes to a part file in the state prefix when the
    /// storage can append and rename (resumable per chunk), else streams
    /// straight to the destination (object stores make it appear atomically).
    async fn file(
        self: &Arc<Self>,
        index: usize,
        path: &str,
        size: u64,
        chunks: &[ChunkRef],
    ) -> Result<()> {
        let op = &self.agent.op;
        let final_path = format!("{}{path}", self.dest);
        let existing = match op.stat(&final_path).await {
            Ok(m) if m.is_file() => Some(m.content_length()),
            _ => None,
        };
        // An identical file already in place is verified, not re-downloaded.
        if existing == Some(size) && self.verify_in_place(&final_path, chunks).await? {
            self.file_already_in_place(chunks);
            return Ok(());
        }
        let (write_path, mut start) = if self.append {
            let part = format!("{}{index}", self.partial);
            (part.clone(), self.resume_point(&part, chunks).await?)
        } else {
            (final_path.clone(), 0)
        };
        let mut writer = op
            .writer_with(&write_path)
            .append(self.append && start > 0)
            .await
            .context(|| format!("opening {write_path}"))?;
        let mut offsets = Vec::with_capacity(chunks.len());
        let mut off = 0u64;
        for c in chunks {
            offsets.push(off);
            off += c.len as u64;
        }
        if start > 0 {
            self.progress
                .chunks_done
                .fetch_add(start as u64, Ordering::Relaxed);
            self.progress.bytes_done.fetch_add(
                offsets.get(start).copied().unwrap_or(size),
                Ordering::Relaxed,
            );
        }
        let same_size = existing == Some(size);
        let window = window();
        let mut inflight = FuturesOrdered::new();
        let mut next = start;
        while start < chunks.len() {
            while next < chunks.len() && inflight.len() < window {
                let job = self.clone();
                let c = chunks[next];
                let at = same_size.then(|| (final_path.clone(), offsets[next]));
                inflight.push_back(tokio::spawn(async move { job.chunk(c, at).await }));
                next += 1;
            }
            let Some(res) = inflight.next().await else {
                break;
            };
            let plain = res.map_err(|e| Error::Protocol(format!("chunk task: {e}")))??;
            let n = plain.len() as u64;
            writer
                .write(plain)
                .await
                .context(|| format!("writing {write_path}"))?;
            self.progress.chunks_done.fetch_add(1, Ordering::Relaxed);
            self.progress.bytes_done.fetch_add(n, Ordering::Relaxed);
            start += 1;
        }
        writer
            .close()
            .await
            .context(|| format!("finishing {write_path}"))?;
        if self.append {
            op.rename(&write_path, &final_path)
                .await
                .context(|| format!("moving {write_path} to {final_path}"))?;
        }
        self.progress.files_done.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Counts a file found complete and verified at its destination.
    fn file_already_in_place(&self, chunks: &[ChunkRef]) {
        let bytes: u64 = chunks.iter().map(|c| c.len as u64).sum();
        let n = chunks.len() as u64;
        self.progress.bytes_done.fetch_add(bytes, Ordering::Relaxed);
        self.progress.chunks_done.fetch_add(n, Ordering::Relaxed);
        self.progress.chunks_reused.fetch_add(n, Ordering::Relaxed);
        self.agent.metrics.chunks_reused.inc_by(n);
        self.progress.files_done.fetch_add(1, Ordering::Relaxed);
    }

    /// How many whole chunks an interrupted part file already holds; a part
    /// file that ends mid-chunk is discarded (it was torn by the crash).
    async fn resume_point(&self, part: &str, chunks: &[ChunkRef]) -> Result<usize> {
        let op = &self.agent.op;
        let have = match op.stat(part).await {
            Ok(m) => m.content_length(),
            Err(e) if e.kind() == opendal::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e).context(|| format!("stat {part}")),
        };
        let mut off = 0u64;
        for (i, c) in chunks.iter().enumerate() {
            if off == have {
                return Ok(i);
            }
            off += c.len as u64;
        }
        if off == have {
            return Ok(chunks.len());
        }
        op.delete(part)
            .await
            .context(|| format!("discarding torn {part}"))?;
        Ok(0)
    }

    async fn verify_in_place(&self, path: &str, chunks: &[ChunkRef]) -> Result<bool> {
        let mut off = 0u64;
        for c in chunks {
            let Some(plain) = self.read_local(path, off, c).await else {
                return Ok(false);
            };
            drop(plain);
            off += c.len as u64;
        }
        Ok(true)
    }

    async fn read_local(&self, path: &str, offset: u64, c: &ChunkRef) -> Option<Vec<u8>> {
        let buf = self
            .agent
            .op
            .read_with(path)
            .range(offset..offset + c.len as u64)
            .await
            .ok()?
            .to_vec();
        let keyer = self.keyer.clone();
        let c = *c;
        tokio::task::spawn_blocking(move || keyer.matches(&c, &buf).then_some(buf))
            .await
            .ok()
            .flatten()
    }

    /// One chunk's plaintext: from the same place in the old file, from
    /// anywhere an earlier version had it, or from the swarm.
    async fn chunk(&self, c: ChunkRef, same_place: Option<(String, u64)>) -> Result<Vec<u8>> {
        let candidates = same_place
            .into_iter()
            .chain(self.local.get(&c.key).cloned());
        for (path, off) in candidates {
            if let Some(plain) = self.read_local(&path, off, &c).await {
                self.progress.chunks_reused.fetch_add(1, Ordering::Relaxed);
                self.agent.metrics.chunks_reused.inc();
                return Ok(plain);
            }
        }
        self.swarm.get(c).await
    }
}

fn normalize_dir(dest: &str) -> String {
    let d = normalize(dest);
    if d.is_empty() || d.ends_with('/') {
        d
    } else {
        format!("{d}/")
    }
}
