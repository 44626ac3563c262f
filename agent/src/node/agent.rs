//! The agent itself: its key, its storage, the shares it holds, and the
//! answers it gives peers. The daemon, the admin API and the demo all drive
//! this one type, so the demo exercises exactly what a deployed agent runs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use opendal::Operator;

use crate::chunk::{self, ChunkId};
use crate::declare::activity;
use crate::error::{Context, Error, Result};
use crate::identity::{AgentId, SecretKey, wrap_key};
use crate::manifest::{Access, KeyRelease, ShareId};
use crate::node::activity::Activity;
use crate::node::fetch::progress::FetchProgress;
use crate::node::live::{LIVE_POLL, LiveShare, SealedCache};
use crate::node::metrics::Metrics;
use crate::node::share::{self, ChunkLocation, HeldShare, Role};
use crate::node::trust::AgentTrust;
use crate::record::SignedRecord;
use crate::wire::channel::Body;
use crate::wire::server::Service;

/// Grant records a peer presented, verified once when presented.
type Proof = Arc<Vec<SignedRecord>>;

/// (share, peer) proofs remembered at most (each at most
/// [`crate::wire::MAX_PROOF_BYTES`], so about 32 MiB in all); past it the
/// memory is cleared and peers simply present their proof again.
pub const MAX_REMEMBERED_PROOFS: usize = 1024;

/// Records whose signatures were checked (valid or not), remembered at
/// most; past it the memory is cleared. A record sent again, as every
/// subscriber's poll does and as a flood of GetKey requests would, costs
/// a hash rather than a signature check.
pub const MAX_CHECKED_RECORDS: usize = 4096;

/// Settings of an agent that are not its key or storage.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// Prefix for the agent's own state in its storage (ends in `/`).
    pub state_prefix: String,
    /// Addresses peers can dial (put into tickets).
    pub advertise: Vec<String>,
    /// Repository URLs (put into tickets).
    pub repositories: Vec<String>,
    /// For `fs` storage: the root directory, to read real file modes.
    pub fs_root: Option<PathBuf>,
    /// For `fs` storage: the most bytes `fs_root` may hold, below what its
    /// filesystem says ([`crate::config::StorageConfig::size_limit`]).
    pub size_limit: Option<u64>,
    /// Test-only fault injection: serve corrupted chunks.
    pub corrupt_chunks: bool,
    /// For azblob storage with an account key: signs the read-only URLs of
    /// offline seeding (OpenDAL's azblob presign grants write and delete).
    pub azblob_signer: Option<crate::store::sas::AzblobSigner>,
}

/// A running agent.
pub struct Agent {
    pub(crate) key: SecretKey,
    /// This agent's id.
    pub id: AgentId,
    pub(crate) op: Operator,
    pub(crate) opts: AgentOptions,
    pub(crate) shares: RwLock<HashMap<ShareId, Arc<HeldShare>>>,
    /// Metrics exported on `/metrics`.
    pub metrics: Metrics,
    /// When it last served, fetched, published or was told something new
    /// (the operator's scale-to-zero decision reads it).
    pub activity: Activity,
    pub(crate) fetches: Mutex<HashMap<ShareId, Arc<FetchProgress>>>,
    /// One fetch of a share at a time (see [`Agent::fetch_turn`]).
    pub(crate) fetch_turns: Mutex<HashMap<ShareId, Arc<tokio::sync::Mutex<()>>>>,
    /// The agent's trust state (engine, repositories), when installed;
    /// without it only explicitly named recipients are served.
    pub(crate) trust: RwLock<Option<Arc<AgentTrust>>>,
    /// The proof each peer presented with its last successful GetKey, per
    /// share: manifest and chunk requests carry none, so it is re-checked
    /// against the current engine on every one of them (a revocation then
    /// cuts the peer off at once).
    presented: Mutex<HashMap<(ShareId, AgentId), Proof>>,
    /// Records whose signatures were checked, by the hash of their bytes
    /// (see [`MAX_CHECKED_RECORDS`]): the record, or `None` if it failed.
    checked_records: Mutex<HashMap<[u8; 32], Option<SignedRecord>>>,
    /// Signature checks made by [`Agent::checked`] (tests count them).
    #[cfg(test)]
    records_checked: std::sync::atomic::AtomicU64,
    /// Shares whose publish pass is running (or ended less than
    /// [`crate::node::live::LIVE_LINGER`] ago): recipients may start on them.
    pub(crate) live: Arc<RwLock<HashMap<ShareId, Arc<LiveShare>>>>,
    /// Chunks the publish pass sealed, served from memory once.
    pub(crate) sealed: Arc<SealedCache>,
    /// Streams of files in object storage that chunks are served from.
    readahead: crate::store::ReadAhead,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Agent({})", self.id)
    }
}

impl Agent {
    /// Opens an agent on its storage and loads the shares it held before.
    pub async fn open(key: SecretKey, op: Operator, mut opts: AgentOptions) -> Result<Arc<Agent>> {
        crate::config::check_state_prefix(&opts.state_prefix)?;
        if !opts.state_prefix.ends_with('/') {
            opts.state_prefix.push('/');
        }
        let metrics = Metrics::new().map_err(|e| Error::Config(format!("metrics: {e}")))?;
        crate::wire::channel::keep_buffers(crate::node::tuning::chunks_in_memory());
        let held = share::load_all(&op, &opts.state_prefix, &key).await?;
        let mut shares = HashMap::new();
        for s in held {
            shares.insert(s.id, Arc::new(s));
        }
        metrics.shares_held.set(shares.len() as i64);
        let id = key.agent_id();
        let readahead = crate::store::ReadAhead::new(op.clone());
        Ok(Arc::new(Agent {
            key,
            id,
            op,
            opts,
            shares: RwLock::new(shares),
            metrics,
            activity: Activity::new(),
            fetches: Mutex::new(HashMap::new()),
            fetch_turns: Mutex::new(HashMap::new()),
            trust: RwLock::new(None),
            presented: Mutex::new(HashMap::new()),
            checked_records: Mutex::new(HashMap::new()),
            #[cfg(test)]
            records_checked: Default::default(),
            live: Arc::default(),
            sealed: Arc::default(),
            readahead,
        }))
    }

    /// The records of `proof` whose signatures hold (those that do not
    /// are left out, and so is a record repeated within it), each checked
    /// once: a record seen before, valid or not, is looked up by the hash
    /// of its bytes. So a proof made of one signed record many times, or
    /// sent again and again, costs hashes, not signature checks.
    fn checked(&self, proof: &[Vec<u8>]) -> Proof {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for b in proof {
            let digest: [u8; 32] = blake3::hash(b).into();
            if !seen.insert(digest) {
                continue;
            }
            let known = self
                .checked_records
                .lock()
                .ok()
                .and_then(|m| m.get(&digest).cloned());
            let rec = match known {
                Some(r) => r,
                None => {
                    #[cfg(test)]
                    self.records_checked
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let r = SignedRecord::from_bytes(b).ok();
                    if let Ok(mut m) = self.checked_records.lock() {
                        if m.len() >= MAX_CHECKED_RECORDS {
                            m.clear();
                        }
                        m.insert(digest, r.clone());
                    }
                    r
                }
            };
            out.extend(rec);
        }
        Arc::new(out)
    }

    /// Installs the agent's trust state: it decides trust-depth shares, and
    /// is the source of proofs this agent presents and of peers found in
    /// repositories.
    pub fn set_trust(&self, trust: Arc<AgentTrust>) {
        if let Ok(mut t) = self.trust.write() {
            *t = Some(trust);
        }
    }

    /// The agent's trust state, when installed.
    pub fn trust(&self) -> Option<Arc<AgentTrust>> {
        self.trust.read().ok().and_then(|t| t.clone())
    }

    /// Syncs revocations and renews this agent's announcement every
    /// `interval`, until `shutdown` (nothing to do without trust state).
    pub async fn run_trust_sync(
        self: Arc<Self>,
        interval: std::time::Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let Some(trust) = self.trust() else { return };
        loop {
            trust.refresh().await;
            // Grants and revocations made while a repository was down.
            trust.publish_pending().await;
            for _ in 0..trust.take_dropped() {
                self.metrics.error("trust_record_refused");
            }
            let shares: Vec<ShareId> = self.held_shares().iter().map(|s| s.id).collect();
            trust.announce(self.advertise(), &shares).await;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// The storage operator.
    pub fn storage(&self) -> &Operator {
        &self.op
    }

    /// The state prefix (ends in `/`).
    pub fn state_prefix(&self) -> &str {
        &self.opts.state_prefix
    }

    /// The secret key (for signing records in the same process).
    pub fn secret_key(&self) -> &SecretKey {
        &self.key
    }

    /// Addresses this agent advertises.
    pub fn advertise(&self) -> &[String] {
        &self.opts.advertise
    }

    /// A held share.
    pub fn share(&self, id: &ShareId) -> Option<Arc<HeldShare>> {
        self.shares.read().ok().and_then(|m| m.get(id).cloned())
    }

    /// All held shares.
    pub fn held_shares(&self) -> Vec<Arc<HeldShare>> {
        self.shares
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Progress of a fetch started in this process.
    pub fn fetch_progress(&self, id: &ShareId) -> Option<Arc<FetchProgress>> {
        self.fetches.lock().ok().and_then(|m| m.get(id).cloned())
    }

    /// All fetches started in this process.
    pub fn all_fetches(&self) -> Vec<Arc<FetchProgress>> {
        self.fetches
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Stops holding a share: it is no longer served and its state under
    /// the state prefix goes (the files in storage stay).
    pub async fn forget_share(&self, id: &ShareId) -> Result<()> {
        if let Ok(mut m) = self.shares.write() {
            m.remove(id);
            self.metrics.shares_held.set(m.len() as i64);
        }
        let dir = crate::node::state::share_dir(&self.opts.state_prefix, id);
        self.op
            .delete_with(&dir)
            .recursive(true)
            .await
            .context(|| format!("removing {dir}"))?;
        Ok(())
    }

    pub(crate) async fn install_share(&self, s: Arc<HeldShare>) -> Result<Arc<HeldShare>> {
        self.install_share_with(s, share::TagsFile::Write).await
    }

    /// [`Agent::install_share`], its tags file already written or not.
    pub(crate) async fn install_share_with(
        &self,
        s: Arc<HeldShare>,
        tags: share::TagsFile,
    ) -> Result<Arc<HeldShare>> {
        if !s.has_record() {
            return Err(Error::Protocol(format!(
                "share {} has no signed record to install",
                s.id
            )));
        }
        if let Err(e) = share::save(&self.op, &self.opts.state_prefix, &self.key, &s, tags).await {
            self.reload_share(&s.id).await;
            return Err(e);
        }
        if let Ok(mut m) = self.shares.write() {
            m.insert(s.id, s.clone());
            self.metrics.shares_held.set(m.len() as i64);
        }
        Ok(s)
    }

    /// Loads a held share again from its state, as a restart would, after
    /// a save of a newer version failed part-way: its manifest record may
    /// be the newer one on storage while what is held is the older, whose
    /// large record is read back from there (and would be refused as not
    /// the share's). What is held then follows the storage; when it cannot
    /// be read, the older share stays.
    async fn reload_share(&self, id: &ShareId) {
        if self.share(id).is_none() {
            return;
        }
        match share::load(&self.op, &self.opts.state_prefix, &self.key, id).await {
            Ok(s) => {
                if let Ok(mut m) = self.shares.write() {
                    m.insert(*id, Arc::new(s));
                }
            }
            Err(e) => {
                tracing::warn!(share = %id, error = %e, "cannot load the share's state again after a failed save")
            }
        }
    }

    /// May `peer` have anything of this share? The answer for a stranger is
    /// indistinguishable from "no such share".
    pub fn authorized(&self, s: &HeldShare, peer: &AgentId, proof: &[SignedRecord]) -> bool {
        self.allowed(&s.publisher, &s.manifest.access, peer, proof)
    }

    /// The one access rule, for held and live shares alike.
    fn allowed(
        &self,
        publisher: &AgentId,
        access: &Access,
        peer: &AgentId,
        proof: &[SignedRecord],
    ) -> bool {
        if *peer == *publisher || *peer == self.id || access.names(peer) {
            return true;
        }
        if let Some(depth) = access.trust_depth
            && let Ok(guard) = self.trust.read()
            && let Some(trust) = guard.as_ref()
        {
            return trust.trusts(publisher, peer, depth, proof);
        }
        false
    }

    /// The proof `peer` last presented for a share (empty if none).
    fn proof_of(&self, peer: &AgentId, id: &ShareId) -> Proof {
        self.presented
            .lock()
            .ok()
            .and_then(|m| m.get(&(*id, *peer)).cloned())
            .unwrap_or_default()
    }

    /// A live share `peer` may read (the same rule as for a held share).
    fn authorized_live(&self, peer: &AgentId, id: &ShareId) -> Option<Arc<LiveShare>> {
        let live = self.live.read().ok()?.get(id).cloned()?;
        let proof = self.proof_of(peer, id);
        self.allowed(&live.publisher, &live.access, peer, &proof)
            .then_some(live)
    }

    /// Where a chunk `peer` may have lives: in a held share, or in one
    /// whose publish pass is running.
    fn locate_for(&self, peer: &AgentId, share: &ShareId, id: &ChunkId) -> Result<ChunkLocation> {
        match self.find_for(peer, share, id) {
            Ok(loc) => Ok(loc),
            Err(Miss::Refused) => Err(self.refused(peer)),
            Err(Miss::NoChunk) => Err(Error::NotFound(format!("chunk {id}"))),
        }
    }

    /// [`Agent::locate_for`] without counting or logging a refusal.
    fn find_for(
        &self,
        peer: &AgentId,
        share: &ShareId,
        id: &ChunkId,
    ) -> std::result::Result<ChunkLocation, Miss> {
        if let Some(live) = self.authorized_live(peer, share) {
            if let Some(s) = self.share(share)
                && self.authorized(&s, peer, &self.proof_of(peer, share))
                && let Some(loc) = s.locate(id)
            {
                return Ok(loc);
            }
            return live.locate(id).ok_or(Miss::NoChunk);
        }
        let s = self.share_for(peer, share).ok_or(Miss::Refused)?;
        s.locate(id).ok_or(Miss::NoChunk)
    }

    /// The version whose pass is running for share `id`, if one is.
    pub(crate) fn pass_running(&self, id: &ShareId) -> Option<u64> {
        let live = self.live.read().ok()?.get(id).cloned()?;
        live.running().then_some(live.seq)
    }

    /// Installs `live` unless a pass of its share is still running; the
    /// error is the running pass's version.
    pub(crate) fn set_live_unless_running(
        &self,
        live: Arc<LiveShare>,
    ) -> std::result::Result<(), u64> {
        let Ok(mut m) = self.live.write() else {
            return Ok(());
        };
        if let Some(old) = m.get(&live.id).filter(|old| old.running()) {
            return Err(old.seq);
        }
        m.insert(live.id, live);
        Ok(())
    }

    /// After a pass: the live share still answers a while (recipients learn
    /// it ended), its sealed chunks stay cached a while (recipients right
    /// behind the pass), then both go, unless a newer pass replaced it. A
    /// failed pass, or one nobody is following as it ends, drops its cached
    /// chunks at once: they are the share's last ones, which a recipient
    /// starting now asks for last, long after they would have gone (and
    /// they pin the pass's blocks: 48 MiB of them after a pass of 1 GiB on
    /// S3).
    pub(crate) fn linger(&self, live: Arc<LiveShare>, ok: bool) {
        use crate::node::live::{LIVE_LINGER, SEALED_LINGER};
        if !ok || !self.sealed.followed() {
            self.sealed.clear_share(&live.id);
        }
        let (sealed, all) = (self.sealed.clone(), self.live.clone());
        tokio::spawn(async move {
            tokio::time::sleep(SEALED_LINGER).await;
            let current = |m: &HashMap<ShareId, Arc<LiveShare>>| {
                m.get(&live.id).is_some_and(|l| Arc::ptr_eq(l, &live))
            };
            if all.read().is_ok_and(|m| current(&m)) {
                sealed.clear_share(&live.id);
            }
            tokio::time::sleep(LIVE_LINGER.saturating_sub(SEALED_LINGER)).await;
            if let Ok(mut m) = all.write()
                && current(&m)
            {
                m.remove(&live.id);
            }
        });
    }

    /// The one answer to a peer that may not know a share exists: counted
    /// under one label and logged at debug, whether the share exists or not.
    fn refused(&self, peer: &AgentId) -> Error {
        self.metrics.error("refused");
        tracing::debug!(peer = %peer.short(), "refused a request (unknown share or not authorized)");
        Error::NotFound("unknown share".into())
    }

    fn authorized_share(&self, peer: &AgentId, id: &ShareId) -> Result<Arc<HeldShare>> {
        // An unauthorized peer is counted and logged exactly like one
        // asking for an unknown share: no oracle.
        self.share_for(peer, id).ok_or_else(|| self.refused(peer))
    }

    /// A held share `peer` may read, without counting a refusal.
    fn share_for(&self, peer: &AgentId, id: &ShareId) -> Option<Arc<HeldShare>> {
        let s = self.share(id)?;
        let proof = self.proof_of(peer, id);
        let proof: &[SignedRecord] = &proof;
        self.authorized(&s, peer, proof).then_some(s)
    }
}

/// Why a chunk is not found for a peer.
enum Miss {
    /// The share is unknown or the peer may not have it.
    Refused,
    /// The share has no such chunk.
    NoChunk,
}

impl Service for Agent {
    async fn manifest(&self, peer: AgentId, share: ShareId, have_seq: u64) -> Result<bytes::Bytes> {
        // Not activity: subscribers poll the manifest for new versions, and
        // a publisher they only poll may sleep (they wake it when behind).
        let s = self.authorized_share(&peer, &share)?;
        // Nothing newer than what the asker holds: an empty answer, not the
        // whole record again (a subscriber's poll of a share of 250,000
        // files took 26 MB each time).
        if have_seq > 0 && s.seq() <= have_seq {
            return Ok(bytes::Bytes::new());
        }
        s.record(&self.op, &self.opts.state_prefix).await
    }

    fn chunk_asked(&self, peer: AgentId, share: ShareId, id: ChunkId) {
        // Only storage read over the network streams files; a local disk
        // is read where each chunk is. An unauthorized request notes
        // nothing (and is refused when answered).
        if self.opts.fs_root.is_some() || self.sealed.contains(&share, &id) {
            return;
        }
        if let Ok(loc) = self.find_for(&peer, &share, &id) {
            self.readahead.expect(&loc.path, loc.offset);
        }
    }

    async fn chunk(&self, peer: AgentId, share: ShareId, id: ChunkId) -> Result<Vec<u8>> {
        self.chunk_hashed(peer, share, id)
            .await
            .map(|(ct, _)| ct.into_vec())
    }

    async fn chunk_hashed(
        &self,
        peer: AgentId,
        share: ShareId,
        id: ChunkId,
    ) -> Result<(Body, [u8; 32])> {
        let corrupt = self.opts.corrupt_chunks;
        let loc = self.locate_for(&peer, &share, &id)?;
        // Sealed by the publish pass moments ago: served as sealed then
        // (its hash is the id by construction), no second read or seal.
        if let Some(mut ct) = self.sealed.take(&share, &id) {
            let mut hash = id.0;
            if corrupt {
                let mut v = ct.into_vec();
                if let Some(b) = v.first_mut() {
                    *b ^= 0xff;
                }
                hash = *blake3::hash(&v).as_bytes();
                ct = v.into();
            }
            self.metrics.chunks_sent.inc();
            self.metrics.chunks_sent_sealed.inc();
            self.metrics.bytes_sent.inc_by(ct.len() as u64);
            self.activity.touch(activity::SERVE);
            return Ok((ct, hash));
        }
        // Verify on serve: the bytes go out only if they are the chunk
        // asked for. A file edited since publishing (or a fetched path that
        // now holds other data) is never sealed under a chunk key that past
        // recipients know. With the chunk's tag recorded (when it was sealed
        // or received), the fresh encryption's tag is compared with it: the id
        // is the hash of ciphertext and tag, and the tag of a changed
        // plaintext under a key only the share's members know matches
        // with negligible odds, so the ciphertext is not hashed again (a
        // fifth of a serving holder's CPU). Without a tag, or when it
        // differs, the ciphertext is hashed and compared with the id.
        let source = loc.path.clone();
        // The hash is handed to the channel, which MACs it instead of
        // encrypting the chunk a second time.
        let seal = move |plain: Vec<u8>| -> Result<(Vec<u8>, [u8; 32])> {
            let mut ct = chunk::encrypt(&loc.chunk, plain)?;
            let tagged = loc.tag.is_some_and(|t| {
                let at = ct.len().saturating_sub(t.len());
                aws_lc_rs::constant_time::verify_slices_are_equal(&ct[at..], &t).is_ok()
            });
            let mut hash = if tagged {
                id.0
            } else {
                *blake3::hash(&ct).as_bytes()
            };
            if hash != id.0 {
                return Err(Error::NotFound(format!(
                    "chunk {id}: {source} changed since it was published (edited in place, \
                     not published again)"
                )));
            }
            if corrupt && let Some(b) = ct.first_mut() {
                *b ^= 0xff;
                hash = *blake3::hash(&ct).as_bytes();
            }
            Ok((ct, hash))
        };
        let sealed = match &self.opts.fs_root {
            // A local file is read straight into the buffer the chunk is
            // sealed in: no zero-filled read buffer, no copy, one task.
            Some(root) => {
                let full = root.join(&loc.path);
                let (offset, len, path) = (loc.offset, loc.chunk.len as usize, loc.path.clone());
                tokio::task::spawn_blocking(move || {
                    let plain = read_range(&full, offset, len)
                        .context(|| format!("reading {path} for chunk {id}"))?;
                    seal(plain)
                })
                .await
            }
            None => {
                let len = loc.chunk.len as usize;
                let mut plain = crate::wire::channel::chunk_buffer(len + crate::crypto::TAG_LEN);
                let range = loc.offset..loc.offset + len as u64;
                let (_, streamed) = self
                    .readahead
                    .read_into(&loc.path, loc.file_len, range, &mut plain)
                    .await
                    .context(|| format!("reading {} for chunk {id}", loc.path))?;
                if streamed {
                    self.metrics.chunks_sent_streamed.inc();
                }
                tokio::task::spawn_blocking(move || seal(plain)).await
            }
        };
        let ct = sealed
            .map_err(|e| Error::Protocol(format!("encrypt task: {e}")))?
            .inspect_err(|e| {
                self.metrics.error("stale_chunk");
                tracing::warn!(error = %e, "not serving a chunk whose source changed");
            })?;
        self.metrics.chunks_sent.inc();
        self.metrics.bytes_sent.inc_by(ct.0.len() as u64);
        // Serving chunks is activity (manifest and key requests are part of
        // every subscriber's poll and are not).
        self.activity.touch(activity::SERVE);
        Ok((ct.0.into(), ct.1))
    }

    async fn key(&self, peer: AgentId, share: ShareId, proof: Vec<Vec<u8>>) -> Result<Vec<u8>> {
        let unknown = || Error::NotFound("unknown share".into());
        // The proof (already bounded in size and count by the wire layer) is
        // verified before the share is looked up: the same work whether the
        // share exists or not. Once per distinct proof: the same bytes sent
        // again are looked up by their hash.
        let proof = self.checked(&proof);
        let Some(s) = self.share(&share) else {
            return Err(self.refused(&peer));
        };
        if !self.authorized(&s, &peer, &proof) {
            return Err(self.refused(&peer));
        }
        if !proof.is_empty()
            && let Ok(mut m) = self.presented.lock()
        {
            if m.len() >= MAX_REMEMBERED_PROOFS {
                m.clear();
            }
            m.insert((share, peer), proof);
        }
        if s.role != Role::Published {
            return Err(unknown());
        }
        let rel = KeyRelease {
            share_id: share,
            recipient: peer,
            seq: s.seq(),
            wrapped_key: wrap_key(&peer, &s.key)?,
        };
        Ok(SignedRecord::seal(&self.key, &rel)?.to_bytes())
    }

    async fn live(&self, peer: AgentId, share: ShareId, from: u64) -> Result<bytes::Bytes> {
        // Authorized first (the same answer as an unknown share), then at
        // most [`crate::node::live::MAX_LIVE_CHUNKS`] entries after a wait
        // of at most [`LIVE_POLL`].
        let Some(live) = self.authorized_live(&peer, &share) else {
            return Err(self.refused(&peer));
        };
        live.answer(from, LIVE_POLL).await
    }

    fn peer_connected(&self, _peer: AgentId, connected: bool) {
        if connected {
            self.metrics.peers_connected.inc();
        } else {
            self.metrics.peers_connected.dec();
        }
    }
}

/// Reads `len` bytes of a local file at `offset` into a buffer with room
/// for an AEAD tag (fewer bytes when the file is shorter: the caller's
/// length check reports it).
fn read_range(path: &std::path::Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    // A FIFO put where a published file was is refused, not waited on
    // (each request held a blocking thread for ever).
    let mut f = crate::util::open_regular(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = crate::wire::channel::chunk_buffer(len + crate::crypto::TAG_LEN);
    f.take(len as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
impl Agent {
    /// An agent over `op` for unit tests: a fresh identity, no peers or
    /// repositories, state under `.caravan/`; `fs_root` when `op` is a
    /// local folder.
    pub(crate) async fn for_test(op: Operator, fs_root: Option<PathBuf>) -> Arc<Agent> {
        let key = SecretKey::generate().expect("a fresh key");
        let opts = AgentOptions {
            state_prefix: ".caravan/".into(),
            advertise: vec![],
            repositories: vec![],
            fs_root,
            size_limit: None,
            corrupt_chunks: false,
            azblob_signer: None,
        };
        Agent::open(key, op, opts)
            .await
            .expect("an agent over the test storage")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A save of a newer version that wrote its manifest record but not
    /// the rest leaves the agent holding what its storage says (as a
    /// restart would), not an older share whose large record, read back
    /// from storage, is refused as not the share's.
    #[tokio::test]
    async fn a_failed_save_over_a_large_record_leaves_what_the_storage_holds() {
        use crate::chunk::ChunkRef;
        use crate::crypto::Key;
        use crate::manifest::{Entry, EntryKind, Manifest};
        let tmp = tempfile::tempdir().unwrap();
        let op = crate::store::open_local(tmp.path()).unwrap();
        let agent = Agent::for_test(op.clone(), Some(tmp.path().to_path_buf())).await;
        let key = Key::random().unwrap();
        let share_id = ShareId::random().unwrap();
        // 15,000 files of one chunk each: a record over 1 MiB.
        let version = |seq: u64| {
            let entries = (0..15_000u32)
                .map(|i| Entry {
                    path: format!("f{i:05}"),
                    mode: 0o644,
                    kind: EntryKind::File {
                        size: 10,
                        chunks: vec![ChunkRef {
                            id: ChunkId([seq as u8; 32]),
                            key: [i as u8; 32],
                            len: 10,
                        }],
                    },
                })
                .collect();
            let m = Manifest {
                share_id,
                seq,
                created_at: 0,
                access: Access::default(),
                entries,
            };
            let record = bytes::Bytes::from(m.seal(&agent.key, &key).unwrap().into_bytes());
            assert!(record.len() > crate::node::record_hold::IN_MEMORY_MAX);
            (m, record)
        };
        let (m1, r1) = version(1);
        let v1 = HeldShare::new(agent.id, key.clone(), Role::Published, "".into(), m1, r1);
        agent.install_share(Arc::new(v1)).await.unwrap();
        let prefix = agent.opts.state_prefix.clone();
        // Version 2's record lands; its save fails after it.
        let (_, r2) = version(2);
        let dir = crate::node::state::share_dir(&prefix, &share_id);
        op.write(&format!("{dir}manifest"), r2.clone())
            .await
            .unwrap();
        let held = agent.share(&share_id).unwrap();
        assert!(
            held.record(&op, &prefix).await.is_err(),
            "the older share's record is not on storage any more"
        );
        agent.reload_share(&share_id).await;
        let held = agent.share(&share_id).unwrap();
        assert_eq!(held.seq(), 2);
        assert_eq!(held.record(&op, &prefix).await.unwrap(), r2);
    }

    /// A record's signature is checked once: the same record again (in
    /// the same proof or another) gets the remembered result, so a flood
    /// of proofs made of one signed record costs hashes, not signature
    /// checks; a record whose signature fails is left out either way.
    #[tokio::test]
    async fn a_record_sent_again_is_not_checked_again() {
        let tmp = tempfile::tempdir().unwrap();
        let op = crate::store::open_local(tmp.path()).unwrap();
        let agent = Agent::for_test(op, Some(tmp.path().to_path_buf())).await;
        let signer = SecretKey::generate().unwrap();
        let rel = KeyRelease {
            share_id: ShareId::random().unwrap(),
            recipient: agent.id,
            seq: 1,
            wrapped_key: vec![7; 80],
        };
        let good = SignedRecord::seal(&signer, &rel).unwrap().to_bytes();
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let checks = || {
            agent
                .records_checked
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        // One record 63 times, and one forged: two checks, one record.
        let mut proof = vec![good.clone(); 63];
        proof.push(bad.clone());
        assert_eq!(agent.checked(&proof).len(), 1);
        assert_eq!(checks(), 2);
        // Sent again, with something new in front: one check more.
        for i in 0..10u8 {
            let mut again = vec![vec![i; 32]];
            again.extend(proof.iter().cloned());
            assert_eq!(agent.checked(&again).len(), 1);
        }
        assert_eq!(checks(), 12);
    }
}
