//! Live shares: a share whose publish pass is still running. Its id, key
//! and tickets are fixed before the pass, so recipients may start at once:
//! the publisher answers `GetLive` requests (only its own, over the
//! authenticated channel, so the entries need no signature of their own)
//! with the walk's file list first, then each file's chunk references as
//! its blocks are sealed. At the end the recipient still takes the signed
//! manifest and checks it lists exactly the chunks it wrote.
//!
//! Also the publisher's cache of sealed chunks: the publish pass keeps the
//! ciphertexts it sealed (bounded), so serving a chunk a recipient asks for
//! right behind the pass costs no second read, encryption and hash.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkId, ChunkRef};
use crate::crypto::TAG_LEN;
use crate::error::{Error, Result};
use crate::identity::AgentId;
use crate::manifest::{Access, EntryKind, ShareId};
use crate::node::share::{ChunkLocation, HeldShare};
use crate::wire::channel::Body;

/// Chunk references in one live answer at most (about 1.2 MiB encoded).
pub const MAX_LIVE_CHUNKS: usize = 16 << 10;
/// How long a live request waits for news before answering with none.
pub const LIVE_POLL: Duration = Duration::from_secs(2);
/// How long a finished live share still answers (a recipient learns it is
/// done, then takes the signed manifest).
pub const LIVE_LINGER: Duration = Duration::from_secs(60);
/// How long the publish pass waits for room in a full cache while a
/// recipient is taking chunks from it (then it evicts the oldest).
const ROOM_WAIT: Duration = Duration::from_millis(500);
/// How long after a chunk was taken a recipient counts as following the pass.
const FOLLOWING: Duration = Duration::from_millis(500);
/// How long from its first sealed block a pass whose recipient is
/// expected (its ticket went out before the pass) keeps its sealed chunks
/// for it before the recipient takes any: time to connect and ask. Past
/// it, with no recipient taking, the pass keeps none (a recipient fetching
/// after the pass held the cache's 32 MiB through the whole pass).
const EXPECTED_WITHIN: Duration = if cfg!(test) {
    Duration::from_millis(300)
} else {
    Duration::from_secs(2)
};
/// How long a finished share's sealed chunks stay cached.
pub const SEALED_LINGER: Duration = Duration::from_secs(30);

/// How a live publish stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LiveEnd {
    /// Still running.
    Running,
    /// Done: the signed manifest of this version is served.
    Done,
    /// Failed (a file changed size, storage error): no manifest of this version.
    Failed(String),
}

/// The walk's result: files (path, size, mode) and directories (path, mode).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveListing {
    /// Files in manifest order (sorted by path).
    pub files: Vec<(String, u64, u32)>,
    /// Directories.
    pub dirs: Vec<(String, u32)>,
}

/// One answer to a `GetLive` request (postcard).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveAnswer {
    /// The version being published.
    pub seq: u64,
    /// Fingerprint of the share key of this version.
    pub key_check: [u8; 8],
    /// The listing, in the answer to a request from position 0 once known.
    pub listing: Option<LiveListing>,
    /// Position of the first entry of `chunks` in the share's chunk log.
    pub from: u64,
    /// (file index, chunk) in the order sealed; each file's chunks in file order.
    pub chunks: Vec<(u32, ChunkRef)>,
    /// Whether the pass is over.
    pub end: LiveEnd,
}

impl LiveAnswer {
    /// Decodes (network input: the size was bounded by the wire layer).
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        postcard::from_bytes(b).map_err(|e| Error::Protocol(format!("live answer: {e}")))
    }
}

/// One chunk sealed by the pass: its file (an index into the listing),
/// reference, offset in the file and AEAD tag.
struct Sealed {
    file: u32,
    chunk: ChunkRef,
    offset: u64,
    tag: [u8; TAG_LEN],
}

/// The borrowed form of a [`LiveAnswer`], encoded the same (postcard): an
/// answer is encoded without copying the listing first.
#[derive(Serialize)]
struct LiveAnswerRef<'a> {
    seq: u64,
    key_check: [u8; 8],
    listing: Option<&'a LiveListing>,
    from: u64,
    chunks: &'a [(u32, ChunkRef)],
    end: &'a LiveEnd,
}

struct LiveState {
    /// Shared with the pass, which reads its files from it.
    listing: Option<Arc<LiveListing>>,
    /// The answer to position 0 (the listing, no chunks), encoded once
    /// and shared by every asker until the pass ends: the listing of a
    /// pass of 250,000 files is about 10 MB encoded, and an authorized
    /// peer asking for it on every request turn of every connection had
    /// a copy made each time (the wire layer shares it too:
    /// `wire::server::MANIFESTS_PER_PEER`).
    listed: Option<bytes::Bytes>,
    /// Every chunk sealed, in the order sealed.
    log: Vec<Sealed>,
    /// A recipient was given the listing, and so may be reading the log:
    /// else the log goes with the pass (96 bytes a chunk, 24 MiB for
    /// 250,000, held through [`LIVE_LINGER`] beside the manifest served).
    listed_to_someone: bool,
    /// Each distinct chunk's first place in the log, keyed by the id in
    /// that log entry: paths stay in the listing alone (an index of
    /// [`ChunkLocation`]s held a path per chunk: about 100 MiB for 250,000
    /// small files), ids in the log alone (a map of id to position held
    /// 40 bytes a slot, 21 MiB for 250,000 chunks; this table 5).
    index: hashbrown::HashTable<u32>,
    /// Next plaintext offset of each file (for the index).
    offsets: Vec<u64>,
    /// Every chunk is sealed ([`LiveShare::let_go`]): the listing is given
    /// to no one more.
    sealed_all: bool,
    /// The share the pass built, not yet signed nor installed
    /// ([`LiveShare::hand_over`]): chunks are located through it.
    successor: Option<Arc<HeldShare>>,
    /// The log once handed over: each entry's file and place in that
    /// file's chunk list, its chunk reference read from the successor's
    /// manifest (8 bytes an entry where [`Sealed`] takes 96).
    handed: Option<HandedLog>,
    end: LiveEnd,
}

/// The log of a pass that built its share ([`LiveShare::hand_over`]).
struct HandedLog {
    /// The share built, whose manifest holds the chunk references.
    held: Arc<HeldShare>,
    /// The manifest entry of each file of the listing.
    entries: Vec<u32>,
    /// (file, place in its chunk list), in the order sealed.
    log: Vec<(u32, u32)>,
}

impl HandedLog {
    /// The log of `log` over `held`'s manifest, whose files must be the
    /// listing's (`listing`), in order; `None` when they are not.
    fn new(log: &[Sealed], listing: &LiveListing, held: &Arc<HeldShare>) -> Option<HandedLog> {
        let entries: Vec<u32> = held
            .manifest
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e.kind, EntryKind::File { .. }))
            .map(|(i, _)| u32::try_from(i).ok())
            .collect::<Option<_>>()?;
        let same = entries.len() == listing.files.len()
            && entries
                .iter()
                .zip(&listing.files)
                .all(|(&e, f)| held.manifest.entries[e as usize].path == f.0);
        if !same {
            return None;
        }
        let mut next = vec![0u32; entries.len()];
        let mut out = Vec::with_capacity(log.len());
        for c in log {
            let n = next.get_mut(c.file as usize)?;
            out.push((c.file, *n));
            *n += 1;
        }
        let handed = HandedLog {
            held: held.clone(),
            entries,
            log: out,
        };
        // Every entry must read back as the chunk it was.
        log.iter()
            .enumerate()
            .all(|(i, c)| handed.chunk(i) == Some(c.chunk))
            .then_some(handed)
    }

    /// The `i`-th entry of the log: (file, chunk).
    fn entry(&self, i: usize) -> Option<(u32, ChunkRef)> {
        let &(file, _) = self.log.get(i)?;
        Some((file, self.chunk(i)?))
    }

    fn chunk(&self, i: usize) -> Option<ChunkRef> {
        let &(file, nth) = self.log.get(i)?;
        let e = self
            .held
            .manifest
            .entries
            .get(*self.entries.get(file as usize)? as usize)?;
        match &e.kind {
            EntryKind::File { chunks, .. } => chunks.get(nth as usize).copied(),
            EntryKind::Dir => None,
        }
    }
}

/// A share whose publish pass is running (or just ended).
pub struct LiveShare {
    /// The share.
    pub id: ShareId,
    /// The version being published.
    pub seq: u64,
    /// This agent (the publisher).
    pub publisher: AgentId,
    /// Who may read it.
    pub access: Access,
    /// Fingerprint of the version's key.
    pub key_check: [u8; 8],
    /// Storage directory of the files (`""` or ends in `/`).
    pub root: std::sync::OnceLock<String>,
    state: Mutex<LiveState>,
    news: tokio::sync::watch::Sender<u64>,
    /// A recipient asked for the log, or was handed its ticket before the
    /// pass and so is expected (`expect_follower`): sealed chunks are worth keeping for it
    /// (`SealedCache`); until then they are not (a publish nobody
    /// follows kept 32 MiB of them for nothing).
    followed: std::sync::atomic::AtomicBool,
    /// When the pass sealed its first block (the start of
    /// [`EXPECTED_WITHIN`]).
    first_block: std::sync::OnceLock<Instant>,
    /// Some of the pass's sealed chunks are in the cache.
    kept: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for LiveShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LiveShare({} v{})", self.id, self.seq)
    }
}

impl LiveShare {
    /// A live share with nothing listed yet.
    pub fn new(
        id: ShareId,
        seq: u64,
        publisher: AgentId,
        access: Access,
        key_check: [u8; 8],
    ) -> Self {
        LiveShare {
            id,
            seq,
            publisher,
            access,
            key_check,
            root: std::sync::OnceLock::new(),
            state: Mutex::new(LiveState {
                listing: None,
                listed: None,
                log: Vec::new(),
                listed_to_someone: false,
                index: hashbrown::HashTable::new(),
                offsets: Vec::new(),
                sealed_all: false,
                successor: None,
                handed: None,
                end: LiveEnd::Running,
            }),
            news: tokio::sync::watch::Sender::new(0),
            followed: std::sync::atomic::AtomicBool::new(false),
            first_block: std::sync::OnceLock::new(),
            kept: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether the pass's next sealed block is worth keeping in `cache`
    /// for a recipient: one asked for the log, or was expected ([`Self::expect_follower`]),
    /// and took one within [`EXPECTED_WITHIN`] or may still come (that
    /// long from the first block). When not, the chunks kept so far go,
    /// once.
    pub fn keep_sealed(&self, cache: &SealedCache) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.followed() {
            return false;
        }
        // Within the same 2 s of a take, not `FOLLOWING`: a recipient
        // that keeps up with a slower pass (an object store's) waits for
        // each block, and its blocks would go between two takes.
        let since = self.first_block.get_or_init(Instant::now).elapsed();
        if cache.taken_within(EXPECTED_WITHIN) || since < EXPECTED_WITHIN {
            self.kept.store(true, Relaxed);
            return true;
        }
        if self.kept.swap(false, Relaxed) {
            cache.clear_share(&self.id);
        }
        false
    }

    /// A recipient is expected to follow this pass (it was published to
    /// named agents, whose tickets went out before the pass): its first
    /// blocks are kept for them too, not only those sealed after their
    /// first request. Without this, the blocks sealed while the recipient
    /// was still connecting were read from storage a second time (13 extra
    /// ranged GETs of a 64-object bucket pass in one of three runs).
    pub fn expect_follower(&self) {
        self.followed
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a recipient has asked for the log of this pass.
    pub fn followed(&self) -> bool {
        self.followed.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn changed(&self) {
        self.news.send_modify(|n| *n += 1);
    }

    /// The walk is done: its files and directories (shared with the pass,
    /// which reads its files from it: the pass held a copy of 250,000
    /// paths beside this one).
    pub fn set_listing(&self, root: &str, listing: Arc<LiveListing>) {
        let _ = self.root.set(root.to_string());
        if let Ok(mut s) = self.state.lock() {
            s.offsets = vec![0; listing.files.len()];
            // At least a chunk a file (small files: exactly).
            s.log.reserve(listing.files.len());
            s.listing = Some(listing);
            s.listed = None;
        }
        self.changed();
    }

    /// Chunks of file `file` sealed, in file order, with their AEAD tags.
    pub fn add_chunks(&self, file: usize, refs: &[(ChunkRef, [u8; TAG_LEN])]) {
        if let Ok(mut s) = self.state.lock() {
            let s = &mut *s;
            if s.listing.as_ref().is_none_or(|l| file >= l.files.len()) {
                return;
            }
            let Ok(idx) = u32::try_from(file) else { return };
            for (r, tag) in refs {
                // At most 2^22 chunks a share (`MAX_MANIFEST_CHUNKS`).
                let Ok(at) = u32::try_from(s.log.len()) else {
                    return;
                };
                let offset = s.offsets[file];
                s.offsets[file] += r.len as u64;
                let LiveState { index, log, .. } = s;
                if let hashbrown::hash_table::Entry::Vacant(v) = index.entry(
                    r.id.prefix(),
                    |&p| log.get(p as usize).is_some_and(|c| c.chunk.id == r.id),
                    |&p| log.get(p as usize).map_or(0, |c| c.chunk.id.prefix()),
                ) {
                    v.insert(at);
                }
                s.log.push(Sealed {
                    file: idx,
                    chunk: *r,
                    offset,
                    tag: *tag,
                });
            }
        }
        self.changed();
    }

    /// Whether the pass is still running.
    pub fn running(&self) -> bool {
        self.state.lock().is_ok_and(|s| s.end == LiveEnd::Running)
    }

    /// The pass ended. A pass that is done installed its share before it
    /// ended, which locates its chunks from then on: its index (a hash
    /// table of every chunk) and its listing are freed at once (a
    /// recipient that asks from the start now is told the pass is done,
    /// and takes the manifest); only the log stays, for recipients still
    /// reading it ([`LIVE_LINGER`]), if any was given the listing. A failed pass's chunks stay located
    /// while it lingers: a recipient following it goes on until it reads
    /// why the pass failed.
    pub fn end(&self, end: LiveEnd) {
        if let Ok(mut s) = self.state.lock() {
            s.listed = None;
            if end == LiveEnd::Done {
                s.index = hashbrown::HashTable::new();
                s.offsets = Vec::new();
                s.listing = None;
                s.successor = None;
                if !s.listed_to_someone {
                    s.log = Vec::new();
                    s.handed = None;
                }
            }
            s.end = end;
        }
        self.changed();
    }

    /// Every chunk is sealed. When no recipient was given the listing,
    /// none can be reading the log (its ids reach nobody else), so the live
    /// share lets go of both: the pass then builds its manifest from the
    /// listing without a copy and frees the log before it signs, at its
    /// peak (18 MiB of paths and 24 MiB of log for 250,000 files, held
    /// beside the manifest, its index and its record). Until the pass
    /// ends, an ask from the start is answered as during the walk (nothing
    /// listed yet), then with the end: the asker takes the manifest.
    /// `None` when someone has the listing: both stay for it.
    ///
    /// Either way no one is given the listing from now on, and its shared
    /// encoding goes (10 MB for 250,000 files): a recipient asking from the
    /// start this late takes the manifest, soon signed.
    pub fn let_go(&self) -> Option<Unread> {
        let mut s = self.state.lock().ok()?;
        if s.end != LiveEnd::Running || s.listing.is_none() {
            return None;
        }
        s.listed = None;
        s.sealed_all = true;
        if s.listed_to_someone {
            return None;
        }
        s.listing = None;
        s.offsets = Vec::new();
        Some(Unread {
            log: std::mem::take(&mut s.log),
            index: std::mem::take(&mut s.index),
        })
    }

    /// The pass built its share (`held`: manifest, index and tags, not
    /// yet signed): chunks are located through it from now on, and the
    /// live share lets go of its listing and index (for 250,000 files,
    /// 18 MB of paths and 5 of index, held until the share was installed,
    /// beside the manifest being signed, its record and its index: the
    /// peak of a pass a recipient follows). The log stays for recipients
    /// still reading it, but as each entry's file and place in its chunk
    /// list (2 MB where it took 25): the chunk references are the
    /// manifest's.
    pub fn hand_over(&self, held: &Arc<HeldShare>) {
        if let Ok(mut s) = self.state.lock() {
            s.successor = Some(held.clone());
            if !s.log.is_empty()
                && let Some(listing) = &s.listing
                && let Some(h) = HandedLog::new(&s.log, listing, held)
            {
                s.handed = Some(h);
                s.log = Vec::new();
            }
            s.listing = None;
            s.listed = None;
            s.sealed_all = true;
            s.index = hashbrown::HashTable::new();
            s.offsets = Vec::new();
        }
    }

    /// The AEAD tag of a chunk sealed so far.
    pub fn tag(&self, id: &ChunkId) -> Option<[u8; TAG_LEN]> {
        let s = self.state.lock().ok()?;
        if let Some(h) = &s.successor {
            return h.tag(id);
        }
        s.sealed(id).map(|c| c.tag)
    }

    /// Where a chunk sealed so far lives.
    pub fn locate(&self, id: &ChunkId) -> Option<ChunkLocation> {
        let s = self.state.lock().ok()?;
        if let Some(h) = &s.successor {
            return h.locate(id);
        }
        let c = s.sealed(id)?;
        let (path, file_len, _) = s.listing.as_ref()?.files.get(c.file as usize)?;
        Some(ChunkLocation {
            path: format!("{}{path}", self.root.get().map_or("", |r| r.as_str())),
            offset: c.offset,
            file_len: *file_len,
            chunk: c.chunk,
            tag: Some(c.tag),
        })
    }

    fn encode(&self, a: &LiveAnswerRef<'_>) -> Result<bytes::Bytes> {
        postcard::to_stdvec(a)
            .map(bytes::Bytes::from)
            .map_err(|e| Error::Protocol(format!("live answer: {e}")))
    }

    /// The answer to `at` if there is news: at 0 the listing (shared, see
    /// [`LiveState::listed`]), else up to [`MAX_LIVE_CHUNKS`] entries of the
    /// log from position `at - 1`.
    fn answer_now(&self, at: u64) -> Option<Result<bytes::Bytes>> {
        let mut s = self.state.lock().ok()?;
        let Some(from) = at.checked_sub(1) else {
            if s.sealed_all && s.end == LiveEnd::Running {
                return None;
            }
            if s.listing.is_some() {
                s.listed_to_someone = true;
            }
            if let Some(b) = &s.listed {
                return Some(Ok(b.clone()));
            }
            if s.listing.is_none() && s.end == LiveEnd::Running {
                return None;
            }
            let b = self.encode(&LiveAnswerRef {
                seq: self.seq,
                key_check: self.key_check,
                listing: s.listing.as_deref(),
                from: 0,
                chunks: &[],
                end: &s.end,
            });
            if let Ok(b) = &b
                && s.end == LiveEnd::Running
            {
                s.listed = Some(b.clone());
            }
            return Some(b);
        };
        let len = match &s.handed {
            Some(h) => h.log.len(),
            None => s.log.len(),
        };
        let start = usize::try_from(from).unwrap_or(usize::MAX).min(len);
        let end = (start + MAX_LIVE_CHUNKS).min(len);
        if end == start && s.end == LiveEnd::Running {
            return None;
        }
        // A handed-over log reads back whole (`HandedLog::new` checked it).
        let chunks: Vec<(u32, ChunkRef)> = match &s.handed {
            Some(h) => (start..end).filter_map(|i| h.entry(i)).collect(),
            None => s.log[start..end]
                .iter()
                .map(|c| (c.file, c.chunk))
                .collect(),
        };
        Some(self.encode(&LiveAnswerRef {
            seq: self.seq,
            key_check: self.key_check,
            listing: None,
            from: start as u64,
            chunks: &chunks,
            end: &s.end,
        }))
    }

    /// What was sealed so far, encoded, waiting up to `wait` for news when
    /// there is none yet (a long poll of bounded length). `at` 0 asks for
    /// the listing (with no chunks: the same bytes for every asker); `at`
    /// n + 1 for the log from entry n on (the asker has the listing).
    pub async fn answer(&self, at: u64, wait: Duration) -> Result<bytes::Bytes> {
        self.followed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mut rx = self.news.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            rx.borrow_and_update();
            if let Some(a) = self.answer_now(at) {
                return a;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                break;
            }
        }
        let end = self
            .state
            .lock()
            .map(|s| s.end.clone())
            .unwrap_or(LiveEnd::Running);
        self.encode(&LiveAnswerRef {
            seq: self.seq,
            key_check: self.key_check,
            listing: None,
            from: at.saturating_sub(1),
            chunks: &[],
            end: &end,
        })
    }
}

impl LiveState {
    /// The log entry where chunk `id` was first sealed.
    fn sealed(&self, id: &ChunkId) -> Option<&Sealed> {
        first_sealed(&self.log, &self.index, id)
    }
}

/// The log entry where chunk `id` was first sealed, found by the index.
fn first_sealed<'a>(
    log: &'a [Sealed],
    index: &hashbrown::HashTable<u32>,
    id: &ChunkId,
) -> Option<&'a Sealed> {
    let at = *index.find(id.prefix(), |&p| {
        log.get(p as usize).is_some_and(|c| c.chunk.id == *id)
    })?;
    log.get(at as usize)
}

/// The log of a pass nobody can be reading, handed back to it by
/// [`LiveShare::let_go`]: what it knows of each chunk's tag.
pub struct Unread {
    log: Vec<Sealed>,
    index: hashbrown::HashTable<u32>,
}

impl Unread {
    /// The AEAD tag of a chunk the pass sealed.
    pub fn tag(&self, id: &ChunkId) -> Option<[u8; TAG_LEN]> {
        first_sealed(&self.log, &self.index, id).map(|c| c.tag)
    }
}

struct CacheInner {
    map: HashMap<(ShareId, ChunkId), Body>,
    order: VecDeque<(ShareId, ChunkId)>,
    bytes: usize,
    last_take: Option<Instant>,
}

/// Sealed chunks (ciphertext || tag) the publish pass produced, kept until
/// served once or evicted (oldest first) to stay within a byte budget and
/// a number of chunks.
pub struct SealedCache {
    inner: Mutex<CacheInner>,
    room: tokio::sync::Notify,
    max: usize,
    /// At most this many chunks ([`CACHE_CHUNK_BYTES`]).
    max_chunks: usize,
}

/// The cache holds at most one chunk per this many bytes of its budget
/// (2,048 for 32 MiB). A small chunk costs more than its bytes (its read
/// block's size class, a map slot, its place in the order): a pass of
/// 250,000 files of 4 KiB kept 8,000 of them, 28 MB for 24 MiB of data,
/// through the pass and beside the manifest being built. A lead of 2,048
/// chunks still keeps any follower busy.
pub const CACHE_CHUNK_BYTES: usize = 16 << 10;

impl std::fmt::Debug for SealedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealedCache({} bytes max)", self.max)
    }
}

impl Default for SealedCache {
    fn default() -> Self {
        SealedCache::new(crate::node::tuning::sealed_cache_bytes())
    }
}

impl SealedCache {
    /// A cache of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        SealedCache {
            inner: Mutex::new(CacheInner {
                map: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
                last_take: None,
            }),
            room: tokio::sync::Notify::new(),
            max,
            max_chunks: (max / CACHE_CHUNK_BYTES).max(64),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.inner.lock().map(|c| c.bytes).unwrap_or(0)
    }

    /// Waits (bounded) until `need` bytes in `chunks` chunks fit while a
    /// recipient is taking chunks: the pass then runs at the pace of the
    /// recipients that follow it, and they are served from memory.
    pub async fn wait_for_room(&self, need: usize, chunks: usize) {
        let deadline = tokio::time::Instant::now() + ROOM_WAIT;
        loop {
            let notified = self.room.notified();
            let wait = match self.inner.lock() {
                Ok(c) => {
                    (c.bytes + need > self.max || c.map.len() + chunks > self.max_chunks)
                        && c.last_take.is_some_and(|t| t.elapsed() < FOLLOWING)
                }
                Err(_) => false,
            };
            if !wait || tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    /// Counts as a take now: a recipient is about to start taking (a pass
    /// to named agents began, their tickets handed out before it), so a
    /// full cache makes the pass wait for it (each wait bounded by
    /// `ROOM_WAIT`, and only for `FOLLOWING` unless a real take follows)
    /// instead of evicting what it has not taken yet.
    pub fn expect_take(&self) {
        if let Ok(mut c) = self.inner.lock() {
            c.last_take = Some(Instant::now());
        }
    }

    /// Whether a recipient took a chunk (or was expected to) within the
    /// last [`FOLLOWING`]: someone follows a pass right now.
    pub fn followed(&self) -> bool {
        self.inner
            .lock()
            .is_ok_and(|c| c.last_take.is_some_and(|t| t.elapsed() < FOLLOWING))
    }

    /// Whether a recipient took a chunk (or missed one, or was expected)
    /// within `d`.
    pub fn taken_within(&self, d: Duration) -> bool {
        self.inner
            .lock()
            .is_ok_and(|c| c.last_take.is_some_and(|t| t.elapsed() < d))
    }

    /// When a chunk was last taken (or a take expected).
    #[cfg(test)]
    pub(crate) fn last_take(&self) -> Option<Instant> {
        self.inner.lock().ok().and_then(|c| c.last_take)
    }

    /// Keeps a sealed chunk, evicting the oldest past the budget.
    pub fn insert(&self, share: ShareId, id: ChunkId, sealed: Body) {
        if sealed.len() > self.max {
            return;
        }
        let Ok(mut c) = self.inner.lock() else { return };
        while c.bytes + sealed.len() > self.max || c.map.len() >= self.max_chunks {
            let Some(k) = c.order.pop_front() else { break };
            if let Some(v) = c.map.remove(&k) {
                c.bytes -= v.len();
            }
        }
        c.bytes += sealed.len();
        if let Some(old) = c.map.insert((share, id), sealed) {
            c.bytes -= old.len();
        } else {
            c.order.push_back((share, id));
        }
    }

    /// Whether a sealed chunk is held (it will be served from memory).
    pub fn contains(&self, share: &ShareId, id: &ChunkId) -> bool {
        self.inner
            .lock()
            .is_ok_and(|c| c.map.contains_key(&(*share, *id)))
    }

    /// Takes a sealed chunk out (it is served once from memory; a second
    /// recipient gets it from storage).
    pub fn take(&self, share: &ShareId, id: &ChunkId) -> Option<Body> {
        let v = {
            let mut c = self.inner.lock().ok()?;
            // A miss counts too: a recipient that fell behind the cache is
            // still following the pass, which should now wait for it.
            c.last_take = Some(Instant::now());
            let v = c.map.remove(&(*share, *id))?;
            c.bytes -= v.len();
            // The eviction order forgets what was taken: from its front
            // (chunks are taken roughly in the order they were sealed), and
            // wholesale when stale keys pile up behind one never asked for,
            // so it stays about as long as the map however long the pass.
            while let Some(k) = c.order.front() {
                if c.map.contains_key(k) {
                    break;
                }
                c.order.pop_front();
            }
            if c.order.len() > 2 * c.map.len() + 64 {
                let CacheInner { map, order, .. } = &mut *c;
                order.retain(|k| map.contains_key(k));
            }
            v
        };
        self.room.notify_waiters();
        Some(v)
    }

    /// Drops every chunk of a share.
    pub fn clear_share(&self, share: &ShareId) {
        if let Ok(mut c) = self.inner.lock() {
            let mut freed = 0;
            c.map.retain(|k, v| {
                let keep = k.0 != *share;
                if !keep {
                    freed += v.len();
                }
                keep
            });
            c.bytes -= freed;
            c.order.retain(|k| k.0 != *share);
            if c.map.is_empty() {
                c.map.shrink_to_fit();
                c.order.shrink_to_fit();
            }
        }
        self.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(n: u8, len: u32) -> ChunkRef {
        ChunkRef {
            id: ChunkId([n; 32]),
            key: [n; 32],
            len,
        }
    }

    /// A running pass (version 1) that has listed `files`.
    fn listed(files: Vec<(String, u64, u32)>) -> LiveShare {
        let live = LiveShare::new(
            ShareId([3; 32]),
            1,
            AgentId([0; 32]),
            Access::default(),
            [1; 8],
        );
        live.set_listing(
            "",
            Arc::new(LiveListing {
                files,
                dirs: vec![],
            }),
        );
        live
    }

    async fn ask(live: &LiveShare, at: u64, wait: Duration) -> LiveAnswer {
        LiveAnswer::from_bytes(&live.answer(at, wait).await.unwrap()).unwrap()
    }

    #[tokio::test]
    async fn live_answers_list_first_then_the_log_and_are_capped() {
        let id = ShareId([2; 32]);
        let live = LiveShare::new(id, 3, AgentId([0; 32]), Access::default(), [1; 8]);
        // Nothing yet: the long poll ends empty.
        let a = ask(&live, 0, Duration::from_millis(10)).await;
        assert!(a.listing.is_none() && a.chunks.is_empty() && a.end == LiveEnd::Running);
        live.set_listing(
            "root/",
            Arc::new(LiveListing {
                files: vec![("a".into(), 10, 0o644)],
                dirs: vec![],
            }),
        );
        let a = ask(&live, 0, Duration::from_millis(10)).await;
        assert_eq!(a.listing.unwrap().files.len(), 1);
        // Position 1 (listing known, log from 0): waits for news.
        let a = ask(&live, 1, Duration::from_millis(10)).await;
        assert!(a.listing.is_none() && a.chunks.is_empty());
        let many: Vec<(ChunkRef, [u8; TAG_LEN])> = (0..MAX_LIVE_CHUNKS + 5)
            .map(|i| (r(i as u8, 1), [i as u8; TAG_LEN]))
            .collect();
        live.add_chunks(0, &many);
        // The tags are kept by chunk id (for serving after the pass); a
        // chunk sealed again keeps its first place.
        assert_eq!(live.tag(&r(7, 1).id), Some([7; TAG_LEN]));
        assert_eq!(live.tag(&r(255, 1).id), Some([255; TAG_LEN]));
        let mut unknown = [9u8; 32];
        unknown[31] = 0;
        assert_eq!(live.tag(&ChunkId(unknown)), None);
        let a = ask(&live, 1, Duration::from_millis(10)).await;
        assert_eq!((a.from, a.chunks.len()), (0, MAX_LIVE_CHUNKS));
        let a = ask(&live, 1 + MAX_LIVE_CHUNKS as u64, Duration::ZERO).await;
        assert_eq!((a.from, a.chunks.len()), (MAX_LIVE_CHUNKS as u64, 5));
        // The listing's answer carries no chunks: the log is asked for apart.
        let a = ask(&live, 0, Duration::ZERO).await;
        assert!(a.listing.is_some() && a.chunks.is_empty());
        assert_eq!(live.locate(&ChunkId([1; 32])).unwrap().path, "root/a");
        live.end(LiveEnd::Done);
        let a = ask(&live, 1 + many.len() as u64, Duration::from_secs(5)).await;
        assert_eq!((a.end, a.seq), (LiveEnd::Done, 3));
        // Done: no listing, no index.
        let a = ask(&live, 0, Duration::ZERO).await;
        assert!(a.listing.is_none() && a.end == LiveEnd::Done);
        assert_eq!(live.tag(&r(7, 1).id), None);
    }

    /// A pass nobody was given the listing of frees its log when done (a
    /// recipient asking now is told it is done, and takes the manifest); a
    /// pass someone follows keeps it for them while it lingers.
    #[tokio::test]
    async fn a_done_pass_keeps_its_log_only_for_those_given_its_listing() {
        for given in [false, true] {
            let live = listed(vec![("a".into(), 3, 0o644)]);
            if given {
                assert!(ask(&live, 0, Duration::ZERO).await.listing.is_some());
            }
            live.add_chunks(0, &[(r(1, 3), [1; TAG_LEN])]);
            live.end(LiveEnd::Done);
            let a = ask(&live, 1, Duration::ZERO).await;
            assert_eq!(a.end, LiveEnd::Done);
            assert_eq!(
                a.chunks.len(),
                usize::from(given),
                "given the listing: {given}"
            );
        }
    }

    /// Once the pass has built its share, chunks are located through it:
    /// the listing and index go (an ask from the start no longer gets the
    /// listing), the log stays for the follower reading it, and a failed
    /// install still locates while the pass lingers.
    #[tokio::test]
    async fn a_pass_that_built_its_share_locates_through_it_and_keeps_only_its_log() {
        use crate::manifest::{Entry, EntryKind, Manifest};
        let live = listed(vec![("a".into(), 3, 0o644)]);
        assert!(ask(&live, 0, Duration::ZERO).await.listing.is_some());
        live.add_chunks(0, &[(r(1, 3), [1; TAG_LEN])]);
        let held = Arc::new(
            crate::node::share::HeldShare::new(
                AgentId([0; 32]),
                crate::crypto::Key::random().unwrap(),
                crate::node::share::Role::Published,
                "new-root/".into(),
                Manifest {
                    share_id: ShareId([3; 32]),
                    seq: 1,
                    created_at: 0,
                    access: Access::default(),
                    entries: vec![Entry {
                        path: "a".into(),
                        mode: 0o644,
                        kind: EntryKind::File {
                            size: 3,
                            chunks: vec![r(1, 3)],
                        },
                    }],
                },
                bytes::Bytes::new(),
            )
            .with_tags(|id| live.tag(id)),
        );
        live.hand_over(&held);
        let at = live.locate(&r(1, 3).id).unwrap();
        assert_eq!(
            (at.path.as_str(), at.offset, at.tag),
            ("new-root/a", 0, Some([1; TAG_LEN]))
        );
        assert_eq!(live.tag(&r(1, 3).id), Some([1; TAG_LEN]));
        {
            let s = live.state.lock().unwrap();
            assert!(s.listing.is_none() && s.index.is_empty() && s.offsets.is_empty());
            assert!(
                s.log.is_empty(),
                "the log's chunk references are the manifest's"
            );
            assert_eq!(s.handed.as_ref().unwrap().log, vec![(0, 0)]);
        }
        let a = ask(&live, 0, Duration::ZERO).await;
        assert!(a.listing.is_none(), "no listing once handed over");
        let a = ask(&live, 1, Duration::ZERO).await;
        assert_eq!(
            a.chunks,
            vec![(0, r(1, 3))],
            "the follower still reads the log"
        );
        live.end(LiveEnd::Failed("saving failed".into()));
        assert!(
            live.locate(&r(1, 3).id).is_some(),
            "a failed pass still locates"
        );
        let a = ask(&live, 1, Duration::ZERO).await;
        assert_eq!(a.chunks, vec![(0, r(1, 3))]);
        assert!(matches!(a.end, LiveEnd::Failed(_)));

        // Done: the installed share locates; the log is still read.
        let live = listed(vec![("a".into(), 3, 0o644)]);
        assert!(ask(&live, 0, Duration::ZERO).await.listing.is_some());
        live.add_chunks(0, &[(r(1, 3), [1; TAG_LEN])]);
        live.hand_over(&held);
        live.end(LiveEnd::Done);
        assert!(
            live.locate(&r(1, 3).id).is_none(),
            "done: the installed share serves"
        );
        let a = ask(&live, 1, Duration::ZERO).await;
        assert_eq!((a.chunks, a.end), (vec![(0, r(1, 3))], LiveEnd::Done));

        // A share whose files are not the listing's: the log stays whole.
        let live = listed(vec![("b".into(), 3, 0o644)]);
        assert!(ask(&live, 0, Duration::ZERO).await.listing.is_some());
        live.add_chunks(0, &[(r(1, 3), [1; TAG_LEN])]);
        live.hand_over(&held);
        assert_eq!(live.state.lock().unwrap().log.len(), 1);
        let a = ask(&live, 1, Duration::ZERO).await;
        assert_eq!(a.chunks, vec![(0, r(1, 3))]);
    }

    /// Once every chunk is sealed, a pass nobody was given the listing of
    /// lets go of its listing and log: the pass holds the only listing
    /// (its paths move into the manifest) and the tags, and an ask from
    /// the start is answered as during the walk (nothing listed), then
    /// with the end. A pass someone was given the listing keeps both for
    /// them, but gives the listing to no one more.
    #[tokio::test]
    async fn a_sealed_pass_nobody_follows_lets_go_of_its_listing_and_log() {
        for given in [false, true] {
            let listing = Arc::new(LiveListing {
                files: vec![("a".into(), 3, 0o644)],
                dirs: vec![],
            });
            let live = LiveShare::new(
                ShareId([3; 32]),
                1,
                AgentId([0; 32]),
                Access::default(),
                [1; 8],
            );
            live.set_listing("", listing.clone());
            if given {
                assert!(ask(&live, 0, Duration::ZERO).await.listing.is_some());
            }
            live.add_chunks(0, &[(r(1, 3), [1; TAG_LEN])]);
            let unread = live.let_go();
            assert_eq!(unread.is_some(), !given, "given the listing: {given}");
            let id = r(1, 3).id;
            match unread {
                Some(u) => {
                    assert_eq!(u.tag(&id), Some([1; TAG_LEN]));
                    assert_eq!(Arc::strong_count(&listing), 1, "the pass's alone");
                    assert!(live.locate(&id).is_none() && live.tag(&id).is_none());
                    let a = ask(&live, 0, Duration::ZERO).await;
                    assert!(a.listing.is_none() && a.end == LiveEnd::Running);
                    assert!(live.let_go().is_none(), "once");
                }
                None => {
                    assert_eq!(Arc::strong_count(&listing), 2);
                    assert_eq!(live.tag(&id), Some([1; TAG_LEN]));
                    assert_eq!(ask(&live, 1, Duration::ZERO).await.chunks.len(), 1);
                    // Given to no one more: a late asker takes the manifest.
                    let a = ask(&live, 0, Duration::ZERO).await;
                    assert!(a.listing.is_none() && a.end == LiveEnd::Running);
                }
            }
            live.end(LiveEnd::Done);
            let a = ask(&live, 0, Duration::ZERO).await;
            assert!(a.listing.is_none() && a.end == LiveEnd::Done);
        }
    }

    /// Guarantee: every ask for a running pass's file list is answered with
    /// the same bytes, encoded once (not a copy of the listing per ask:
    /// the wire layer then copies a shared answer only with one of the
    /// asker's few turns), and an ended pass's answer says so.
    #[tokio::test]
    async fn every_ask_for_the_listing_shares_one_encoding() {
        let live = listed((0..1000).map(|i| (format!("f{i:04}"), 10, 0o644)).collect());
        let a = live.answer(0, Duration::ZERO).await.unwrap();
        let b = live.answer(0, Duration::ZERO).await.unwrap();
        assert_eq!(a.as_ptr(), b.as_ptr(), "one encoding, shared");
        assert_eq!(
            LiveAnswer::from_bytes(&a)
                .unwrap()
                .listing
                .unwrap()
                .files
                .len(),
            1000
        );
        live.end(LiveEnd::Failed("disk gone".into()));
        let c = LiveAnswer::from_bytes(&live.answer(0, Duration::ZERO).await.unwrap()).unwrap();
        assert_eq!(c.end, LiveEnd::Failed("disk gone".into()));
        assert!(c.listing.is_some());
    }

    /// Guarantee: a pass keeps sealed chunks only for a recipient that
    /// asked or was expected, and past [`EXPECTED_WITHIN`] of its first
    /// block only while one is taking; what it kept for nobody goes.
    #[test]
    fn an_expected_recipient_that_never_takes_gets_nothing_kept_past_its_time() {
        let cache = SealedCache::new(1 << 20);
        let live = listed(vec![("a".into(), 3, 0o644)]);
        assert!(!live.keep_sealed(&cache), "nobody expected");
        live.expect_follower();
        assert!(live.keep_sealed(&cache), "expected: kept at first");
        cache.insert(live.id, ChunkId([1; 32]), Body::Owned(vec![0; 100]));
        std::thread::sleep(EXPECTED_WITHIN + Duration::from_millis(50));
        assert!(!live.keep_sealed(&cache), "nobody came");
        assert_eq!(cache.bytes(), 0, "what was kept for nobody went");
        // A recipient asking (a miss counts) makes it worth keeping again.
        assert!(cache.take(&live.id, &ChunkId([9; 32])).is_none());
        assert!(live.keep_sealed(&cache));
    }

    #[test]
    fn cache_stays_within_budget_and_serves_once() {
        let c = SealedCache::new(100);
        let s = ShareId([1; 32]);
        c.insert(s, ChunkId([1; 32]), vec![0; 60].into());
        c.insert(s, ChunkId([2; 32]), vec![0; 60].into());
        assert_eq!(c.bytes(), 60);
        assert!(c.take(&s, &ChunkId([1; 32])).is_none());
        assert_eq!(c.take(&s, &ChunkId([2; 32])).map(|v| v.len()), Some(60));
        assert!(c.take(&s, &ChunkId([2; 32])).is_none());
        assert_eq!(c.bytes(), 0);
        c.insert(s, ChunkId([3; 32]), vec![0; 10].into());
        c.clear_share(&s);
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn cache_holds_a_bounded_number_of_small_chunks() {
        let c = SealedCache::new(128 * CACHE_CHUNK_BYTES);
        let s = ShareId([1; 32]);
        for i in 0..1000u32 {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&i.to_le_bytes());
            c.insert(s, ChunkId(id), vec![0; 100].into());
        }
        assert_eq!(
            c.bytes(),
            128 * 100,
            "128 chunks at most, the oldest evicted"
        );
        let mut newest = [0u8; 32];
        newest[..4].copy_from_slice(&999u32.to_le_bytes());
        assert!(c.take(&s, &ChunkId(newest)).is_some());
        assert!(c.take(&s, &ChunkId([0; 32])).is_none());
    }

    /// `Agent::linger` drops a finished pass's chunks at once unless a
    /// recipient follows it right now.
    #[test]
    fn a_cache_is_followed_only_shortly_after_a_take() {
        let c = SealedCache::new(100);
        let s = ShareId([1; 32]);
        c.insert(s, ChunkId([1; 32]), vec![0; 10].into());
        assert!(!c.followed(), "nobody took anything yet");
        assert!(c.take(&s, &ChunkId([1; 32])).is_some());
        assert!(c.followed());
        std::thread::sleep(FOLLOWING + Duration::from_millis(50));
        assert!(!c.followed(), "a take long ago is not following");
        c.expect_take();
        assert!(c.followed(), "an expected recipient follows");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_cache_waits_for_an_expected_recipient_a_bounded_time() {
        let c = SealedCache::new(100);
        let s = ShareId([1; 32]);
        c.insert(s, ChunkId([1; 32]), vec![0; 100].into());
        // Nobody has taken anything: no wait.
        let t = tokio::time::Instant::now();
        c.wait_for_room(50, 1).await;
        assert_eq!(t.elapsed(), Duration::ZERO);
        // A recipient is expected: the pass waits, but only ROOM_WAIT.
        c.expect_take();
        let t = tokio::time::Instant::now();
        c.wait_for_room(50, 1).await;
        assert_eq!(t.elapsed(), ROOM_WAIT);
    }

    #[test]
    fn the_eviction_order_does_not_grow_with_the_pass() {
        let c = SealedCache::new(1 << 20);
        let s = ShareId([1; 32]);
        // One chunk nobody asks for, then a long pass taken in order.
        c.insert(s, ChunkId([0; 32]), vec![0; 10].into());
        for i in 1..10_000u32 {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&i.to_be_bytes());
            c.insert(s, ChunkId(id), vec![0; 10].into());
            assert!(c.take(&s, &ChunkId(id)).is_some());
        }
        let len = c.inner.lock().unwrap().order.len();
        assert!(len <= 2 + 64, "eviction order holds {len} keys for 1 chunk");
    }
}
