//! Writing one fetched file into the user's storage: resumable part files
//! where the storage can append, reuse of data already in place, and a
//! window of chunk requests in flight.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use futures::TryStreamExt;
use futures::stream::{FuturesOrdered, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::chunk::{ChunkId, ChunkKeyer, ChunkRef, Verified};
use crate::crypto::TAG_LEN;
use crate::error::{Context, Error, Result};
use crate::node::agent::Agent;
use crate::node::fetch::direct::{Aligned, Closing, DirectFile, Pool, Segment};
use crate::node::fetch::live::ChunkSource;
use crate::node::fetch::local;
use crate::node::fetch::progress::FetchProgress;
use crate::node::fetch::repeats::Repeats;
use crate::node::fetch::swarm::Swarm;
use crate::node::tuning;
use crate::store::streamed_put::StreamedPut;
use crate::wire::channel;

/// Files synced at once.
pub(crate) const SYNC_CONCURRENCY: usize = 16;

/// The background syncs of a fetch's finished files: those running, and
/// the first error of those already reaped.
#[derive(Default)]
pub(crate) struct Syncing {
    running: Vec<tokio::task::JoinHandle<Result<()>>>,
    failed: Option<Error>,
}

impl Syncing {
    /// Adds a sync, first taking the results of those that finished.
    fn push(&mut self, h: tokio::task::JoinHandle<Result<()>>) {
        let mut i = 0;
        while i < self.running.len() {
            if !self.running[i].is_finished() {
                i += 1;
                continue;
            }
            let done = self.running.swap_remove(i);
            let outcome = match futures::FutureExt::now_or_never(done) {
                Some(Ok(r)) => r,
                Some(Err(e)) => Err(Error::Protocol(format!("sync task: {e}"))),
                None => Ok(()),
            };
            if let Err(e) = outcome {
                self.failed.get_or_insert(e);
            }
        }
        self.running.push(h);
    }

    /// Waits for every sync; the first error, if any.
    async fn finish(self) -> Result<()> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        for h in self.running {
            h.await
                .map_err(|e| Error::Protocol(format!("sync task: {e}")))??;
        }
        Ok(())
    }
}

/// Local data that may already hold chunks: key → (path, offset).
/// Files of the destination verified at once when a fetch begins
/// ([`Job::check_own_files`]).
const VERIFY_AT_ONCE: usize = 16;

pub(crate) type LocalIndex = HashMap<[u8; 32], (String, u64)>;

pub(crate) struct Job {
    pub(crate) agent: Arc<Agent>,
    pub(crate) swarm: Arc<Swarm>,
    pub(crate) keyer: ChunkKeyer,
    pub(crate) dest: String,
    pub(crate) local: LocalIndex,
    /// Chunks listed more than once: fetched once, copied for the rest.
    pub(crate) repeats: Arc<Repeats>,
    pub(crate) partial: String,
    /// On a local disk: where each file moved into place is noted first
    /// ([`crate::node::state::placed_log`]).
    pub(crate) placed_log: Option<PathBuf>,
    /// On a local disk: the destination paths (storage paths) holding a
    /// file when the fetch began that it may move a new file over: the
    /// share's own, or the same bytes ([`Job::check_own_files`]). At any
    /// other path a file that appears meanwhile is the user's, never
    /// replaced ([`local::place`]).
    pub(crate) may_replace: Mutex<HashSet<String>>,
    /// Destination files found to be exactly the share's when the fetch
    /// began ([`Job::check_own_files`]): not read again to be written.
    pub(crate) verified: Mutex<HashSet<String>>,
    pub(crate) append: bool,
    /// Storage that takes a whole file in one request (no multipart, no
    /// append): each file is gathered in memory and sent on close. The
    /// budget, in KiB, bounds what the files being written hold together.
    pub(crate) one_shot: Option<OneShot>,
    /// Object storage: parts of one file's multipart upload sent at once
    /// ([`part_uploads`]).
    pub(crate) part_uploads: usize,
    /// Object storage: turns of the files written as multipart uploads
    /// ([`MULTIPART_FILES`]).
    pub(crate) multipart_files: Arc<Semaphore>,
    /// S3: files up to [`tuning::streamed_put_max_bytes`] are written by
    /// one streamed PUT each (`store/streamed_put.rs`), not multipart.
    pub(crate) streamed_puts: bool,
    pub(crate) progress: Arc<FetchProgress>,
    /// Chunks held in memory at once across every file of the fetch
    /// (requested, in flight, or waiting to be written).
    pub(crate) slots: Arc<Semaphore>,
    /// On a local filesystem: the folders files were moved into, synced
    /// by [`Job::sync_written`] before the fetch is done (a set of folders,
    /// not of files: 100,000 files in 100 folders keep 100 paths).
    pub(crate) unsynced: Mutex<HashSet<PathBuf>>,
    /// Syncs of finished files started while the fetch goes on (at most
    /// [`SYNC_CONCURRENCY`] running), awaited by [`Job::sync_written`].
    /// Finished ones are reaped as new ones start (a finished task kept
    /// until the end held its memory: 100,000 files took tens of MiB).
    pub(crate) syncing: Mutex<Syncing>,
    /// Bounds the syncs running at once.
    pub(crate) sync_slots: Arc<Semaphore>,
    /// Small files were written through the page cache without a sync of
    /// their own: [`Job::sync_written`] syncs their filesystems.
    pub(crate) unsynced_small: std::sync::atomic::AtomicBool,
    /// Staging buffers of local files, reused across files.
    pub(crate) buffers: Arc<Pool>,
    /// Segment writes running at once across the fetch's files (each holds
    /// a 2 MiB buffer): [`WRITE_SLOTS`].
    pub(crate) write_slots: Arc<Semaphore>,
    /// Object storage: the sizes of the files already at the destination,
    /// listed once (a HEAD per file is a request per file, which object
    /// stores bill and serve slowly); `None` inside when the listing failed
    /// or was too long, and each file is asked about alone.
    pub(crate) listed: tokio::sync::OnceCell<Option<HashMap<String, u64>>>,
    /// The AEAD tags of the chunks received (one per chunk received, so at
    /// most the manifest's), kept with the share so serving them on is
    /// cheap: a list, sorted once at the end (a hash table of them took
    /// twice the memory).
    pub(crate) tags: Mutex<Vec<(ChunkId, [u8; TAG_LEN])>>,
    /// A local disk: the destination's files and the part files, listed
    /// once (`None` inside when too long or unreadable: a stat per file).
    pub(crate) local_listing: tokio::sync::OnceCell<Option<local::Listing>>,
}

/// Most destination entries kept from one listing (past it, a stat per
/// file: a destination shared with many other objects is not held in
/// memory whole; 64 Ki entries are a few MiB).
const LISTED_MAX: usize = 64 << 10;

/// Segment writes of one fetch running at once.
pub(crate) const WRITE_SLOTS: usize = 8;

/// Staging buffers kept for reuse by one fetch (a fresh one is zeroed, its
/// pages faulted in as it fills): one per file written at once
/// (`tuning::file_concurrency`) and one per segment write in flight
/// ([`WRITE_SLOTS`]), so none is dropped only to be allocated again while
/// a tree is written (with 16 where 24 were in use, zeroing pages was 3% of
/// a tree recipient's CPU). Freed with the fetch.
pub(crate) fn staging_kept() -> usize {
    tuning::file_concurrency() + WRITE_SLOTS
}

/// Bytes written through the page cache (where the filesystem refuses
/// direct I/O) after which the file's writeback is started in the
/// background (a data sync on a duplicate descriptor), so the disk works
/// while the network does and the final sync finds little to do.
const WRITEBACK_EVERY: u64 = 64 << 20;

/// Destination paths looked at per blocking call when a fetch checks what
/// is already there (`Job::check_own_files`).
const STAT_BATCH: usize = 4096;

/// Segment writes one file keeps going at once.
const WRITES_PER_FILE: usize = 3;

/// A local file being written (straight to the disk where the filesystem
/// allows it, see `direct.rs`): its full segments are written on the
/// blocking pool, a few at once (each holding one of the fetch's write
/// slots), and the bytes written so far are synced in the background when
/// they go through the page cache.
struct LocalFile {
    file: Option<DirectFile>,
    pool: Arc<Pool>,
    slots: Arc<Semaphore>,
    /// Segment writes in the order they were started: (end offset, task,
    /// write slot).
    writes: VecDeque<(u64, SegmentWrite, OwnedSemaphorePermit)>,
    /// Bytes at the start of the file known to be in it: the end of the
    /// last segment whose write, and every earlier one, finished.
    stored: u64,
    since_sync: u64,
    syncing: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

type SegmentWrite = tokio::task::JoinHandle<std::io::Result<Aligned>>;

/// One chunk on its way into a file.
pub(crate) enum Piece {
    /// Plaintext: read back from data already here, or opened early for a
    /// sink that takes owned buffers.
    Plain(Vec<u8>),
    /// Verified ciphertext: a local file's writer decrypts it straight
    /// into its staging buffer.
    Sealed(Verified),
}

impl Piece {
    /// The plaintext (decrypting in place).
    fn into_plain(self) -> Result<Vec<u8>> {
        match self {
            Piece::Plain(p) => Ok(p),
            Piece::Sealed(v) => v.open(),
        }
    }
}

impl LocalFile {
    async fn write(&mut self, piece: Piece, path: &str) -> Result<()> {
        let Some(f) = self.file.as_mut() else {
            return Err(Error::Protocol(format!("{path}: file already failed")));
        };
        let segments = match piece {
            Piece::Sealed(v) if DirectFile::fits(v.len()) => {
                let staged = f.stage_with(v.len(), &self.pool, |out| v.open_into(out));
                if staged.is_err() {
                    // What was staged is garbage: nothing more is written.
                    self.file = None;
                }
                let segments = staged?;
                channel::recycle(v.into_buffer());
                segments
            }
            other => {
                let plain = other.into_plain()?;
                let segments = f.stage(&plain, &self.pool);
                channel::recycle(plain);
                segments
            }
        };
        for seg in segments {
            self.start(seg)
                .await
                .context(|| format!("writing {path}"))?;
        }
        Ok(())
    }

    /// Starts writing a segment, once this file and the fetch have room.
    async fn start(&mut self, seg: Segment) -> std::io::Result<()> {
        while self.writes.len() >= WRITES_PER_FILE {
            self.finish_oldest().await?;
        }
        let permit = loop {
            match self.slots.clone().try_acquire_owned() {
                Ok(p) => break p,
                Err(_) if !self.writes.is_empty() => self.finish_oldest().await?,
                Err(_) => {
                    break self
                        .slots
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(std::io::Error::other)?;
                }
            }
        };
        let (end, n) = (seg.end(), seg.len() as u64);
        self.writes.push_back((
            end,
            tokio::task::spawn_blocking(move || seg.write()),
            permit,
        ));
        let Some(f) = self.file.as_ref() else {
            return Ok(());
        };
        if !f.is_direct() {
            self.since_sync += n;
            if self.since_sync >= WRITEBACK_EVERY
                && self.syncing.as_ref().is_none_or(|h| h.is_finished())
            {
                if let Some(h) = self.syncing.take() {
                    h.await.map_err(std::io::Error::other)??;
                }
                let dup = f.try_clone()?;
                self.syncing = Some(tokio::task::spawn_blocking(move || dup.sync_data()));
                self.since_sync = 0;
            }
        }
        Ok(())
    }

    async fn finish_oldest(&mut self) -> std::io::Result<()> {
        if let Some((end, h, _slot)) = self.writes.pop_front() {
            let buf = h.await.map_err(std::io::Error::other)??;
            self.pool.put(buf);
            self.stored = end;
        }
        Ok(())
    }

    /// Waits for every segment written so far (and any background
    /// writeback), then hands over what is left to do: the last segment
    /// and the sync, done together by the caller ([`Closing::complete`]).
    async fn closing(mut self) -> std::io::Result<Closing> {
        while !self.writes.is_empty() {
            self.finish_oldest().await?;
        }
        if let Some(h) = self.syncing.take() {
            h.await.map_err(std::io::Error::other)??;
        }
        let f = self
            .file
            .take()
            .ok_or_else(|| std::io::Error::other("file already failed"))?;
        Ok(f.close(&self.pool))
    }
}

/// The memory budget of files gathered whole before one write.
pub(crate) struct OneShot {
    /// Largest file, in bytes ([`tuning::one_shot_max_bytes`]).
    pub(crate) max_bytes: u64,
    /// KiB of the budget still free.
    pub(crate) budget: Arc<Semaphore>,
}

impl OneShot {
    pub(crate) fn new(max_bytes: u64) -> OneShot {
        OneShot {
            max_bytes,
            budget: Arc::new(Semaphore::new(kib(max_bytes) as usize)),
        }
    }
}

/// Parts of a multipart upload in memory at once, across the files of a
/// fetch that are written as several parts: see [`part_uploads`].
const PARTS_IN_FLIGHT: usize = 8;

/// Files of one fetch written as multipart uploads at once. Each holds the
/// part it gathers besides the ones in flight: 12 files of 85 MiB written
/// together (all 16 file slots would be) held 12 parts gathering, and the
/// recipient peaked at 173 MiB; the other files of the fetch wait for a
/// turn, holding nothing.
pub(crate) const MULTIPART_FILES: usize = 4;

/// Parts of one file's multipart upload sent at once, given how many files
/// of the fetch are big enough for several parts: up to 4 when one or two
/// are (a big file sent one part at a time waits a round trip per 5 MiB
/// part: a 256 MiB object to moto went at 89 MB/s one part at a time, 113
/// with four, medians of five), fewer as more are, so the parts held in
/// memory (5 MiB each, until sent) stay about [`PARTS_IN_FLIGHT`], and one
/// at a time from five such files on (of which at most [`MULTIPART_FILES`]
/// are written at once).
pub(crate) fn part_uploads(big_files: usize) -> usize {
    (PARTS_IN_FLIGHT / big_files.clamp(1, tuning::file_concurrency())).clamp(1, 4)
}

/// Whole KiB covering `bytes`, at least one (an empty file still takes a slot).
fn kib(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX)
}

/// A chunk's plaintext handed to OpenDAL, whose buffer goes back to the
/// receive pool (`channel::recycle`) once the part it joined is sent: a
/// buffer dropped instead is fresh pages for the next chunk, faulted in and
/// zeroed (12% of a recipient's CPU writing to S3, in `perf`).
struct Recycled(Vec<u8>);

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        channel::recycle(std::mem::take(&mut self.0));
    }
}

/// Where one file's bytes go: OpenDAL's writer (object stores, or any
/// storage without a local root), or a plain file on a local filesystem,
/// written without a per-file fsync (one sync pass covers the whole fetch).
enum Sink {
    Dal(Upload),
    Put(StreamedPut),
    Local(LocalFile),
}

impl Sink {
    async fn write(&mut self, piece: Piece, path: &str) -> Result<()> {
        match self {
            Sink::Dal(w) => {
                let plain = piece.into_plain()?;
                // A part holds its chunks until it is sent: a chunk much
                // smaller than its pooled buffer is copied out, so a 5 MiB
                // part does not pin ten 2 MiB buffers.
                let bytes = if plain.len() < plain.capacity() / 2 {
                    let b = bytes::Bytes::copy_from_slice(&plain);
                    channel::recycle(plain);
                    b
                } else {
                    bytes::Bytes::from_owner(Recycled(plain))
                };
                w.0.as_mut()
                    .ok_or_else(|| Error::Protocol(format!("{path}: upload already ended")))?
                    .write(bytes)
                    .await
                    .context(|| format!("writing {path}"))
            }
            Sink::Put(p) => p
                .write(bytes::Bytes::from_owner(Recycled(piece.into_plain()?)))
                .await
                .context(|| format!("writing {path}")),
            Sink::Local(f) => f.write(piece, path).await,
        }
    }

    /// Bytes of the file already in storage (everything written so far,
    /// but for a direct write's held-back partial block).
    fn stored(&self) -> u64 {
        match self {
            Sink::Dal(_) => u64::MAX,
            // Nothing is in storage before the server answers the PUT (and
            // a failed one is fetched again: nothing may count twice).
            Sink::Put(_) => 0,
            Sink::Local(f) => f.stored,
        }
    }

    /// Waits for the writes already started (a local file's segments).
    async fn settle(&mut self) -> std::io::Result<()> {
        if let Sink::Local(f) = self {
            while !f.writes.is_empty() {
                f.finish_oldest().await?;
            }
        }
        Ok(())
    }

    /// Finishes the file: an object store's upload is completed (a failure
    /// is a storage error: a temporary one makes [`Job::file`] fetch a
    /// streamed file again); a local file's last write and sync are
    /// returned for the caller to run.
    async fn close(self, path: &str) -> Result<Option<Closing>> {
        let what = || format!("finishing {path}");
        match self {
            Sink::Dal(mut w) => match w.0.take() {
                Some(mut u) => match u.close().await {
                    Ok(_) => Ok(None),
                    // Not completed: its parts go too (as a dropped one's).
                    Err(e) => {
                        let _ = u.abort().await;
                        Err(e).context(what)
                    }
                },
                None => Ok(None),
            },
            Sink::Put(p) => p.close().await.map(|()| None).context(what),
            Sink::Local(f) => f.closing().await.map(Some).context(what),
        }
    }
}

/// An object store's upload of one file (OpenDAL's writer: a multipart
/// upload for a big file). One dropped before it was closed (the fetch
/// failed, a peer went away, the fetch was given up), or whose completion
/// failed, is aborted, so a
/// multipart upload's parts do not stay in the bucket, unseen and billed,
/// until a lifecycle rule removes them.
struct Upload(Option<opendal::Writer>);

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(mut w) = self.0.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                if let Err(e) = w.abort().await {
                    tracing::debug!(error = %e, "aborting an unfinished upload");
                }
            });
        }
    }
}

/// `syncfs` on one folder of each filesystem among `dirs` (a destination
/// may hold a mount point). Blocking.
fn sync_filesystems(dirs: &[PathBuf]) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut done = HashSet::new();
    let named = |d: &PathBuf, e: std::io::Error| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound => " (removed or moved while the fetch ran?)",
            _ => "",
        };
        std::io::Error::new(e.kind(), format!("{}: {e}{hint}", d.display()))
    };
    for d in dirs {
        let dir = crate::util::open_no_wait(d).map_err(|e| named(d, e))?;
        if done.insert(dir.metadata().map_err(|e| named(d, e))?.dev()) {
            rustix::fs::syncfs(&dir).map_err(|e| named(d, e.into()))?;
        }
    }
    Ok(())
}

/// Syncs a file's data, or a directory (its entries), on the blocking pool.
async fn sync_path(path: PathBuf, dir: bool) -> Result<()> {
    tokio::task::spawn_blocking(move || {
        let named =
            |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let f = crate::util::open_no_wait(&path).map_err(named)?;
        if dir { f.sync_all() } else { f.sync_data() }.map_err(named)
    })
    .await
    .map_err(|e| Error::Protocol(format!("sync task: {e}")))?
    .context(|| "syncing fetched files".into())
}

impl Job {
    /// Fetches one file. Writes to a part file in the state prefix when the
    /// storage can append and rename (resumable per chunk), else streams
    /// straight to the destination (object stores make it appear atomically).
    pub(crate) async fn file(
        self: &Arc<Self>,
        index: usize,
        path: &str,
        size: u64,
        source: ChunkSource<'_>,
    ) -> Result<()> {
        if self.streamed_puts && size > 0 && size <= tuning::streamed_put_max_bytes() {
            match self.file_as(index, path, size, &source, true).await {
                // A streamed PUT cannot be retried (its bytes are gone):
                // the file is fetched again, as a multipart upload whose
                // parts are retried one by one.
                Err(Error::Storage { context, source: e }) if e.is_temporary() => {
                    self.agent.metrics.files_put_retried.inc();
                    tracing::warn!(
                        path,
                        error = %e,
                        "{context}: fetching the file again as a multipart upload"
                    );
                }
                other => return other,
            }
        }
        self.file_as(index, path, size, &source, false).await
    }

    /// [`Job::file`], by a streamed PUT when `streamed` (and the storage
    /// can presign it).
    async fn file_as(
        self: &Arc<Self>,
        index: usize,
        path: &str,
        size: u64,
        source: &ChunkSource<'_>,
        streamed: bool,
    ) -> Result<()> {
        let op = &self.agent.op;
        let small = size < tuning::small_file_bytes();
        // The chunk list known so far (all of it, unless the publisher's
        // pass is still running: then it grows below).
        let (mut chunks, mut complete) = source.more(0, false).await?;
        let final_path = format!("{}{path}", self.dest);
        let part = format!("{}{index}", self.partial);
        let local_root = self.agent.opts.fs_root.clone().filter(|_| self.append);
        // On a local disk both sizes come from the fetch's one listing
        // (`local.rs`); elsewhere from the storage, the part's only if needed.
        let (existing, part_size) = match &local_root {
            Some(root) => {
                let listing = self
                    .local_listing
                    .get_or_init(|| async {
                        local::Listing::read(root, &self.dest, &self.partial, LISTED_MAX)
                            .await
                            .ok()
                            .flatten()
                    })
                    .await;
                let (e, p) = match listing {
                    Some(l) => l.sizes(&final_path, &part),
                    None => local::sizes(root, &final_path, &part)
                        .await
                        .context(|| format!("stat {final_path}"))?,
                };
                (e, Some(p))
            }
            None => (self.existing_size(&final_path).await, None),
        };
        // An identical file already in place is verified, not re-downloaded.
        let known_same = self.verified.lock().is_ok_and(|v| v.contains(&final_path));
        if complete
            && existing == Some(size)
            && (known_same || self.verify_in_place(&final_path, &chunks).await?)
        {
            self.file_already_in_place(&chunks);
            return Ok(());
        }
        let (write_path, mut start) = if self.append {
            let have = match part_size {
                Some(known) => known,
                None => self.part_size(&part).await?,
            };
            let at = loop {
                match self.resume_point(&part, have, &chunks, complete).await? {
                    Some(at) => break at,
                    None => {
                        let (more, c) = source.more(chunks.len(), true).await?;
                        chunks.extend(more);
                        complete = c;
                    }
                }
            };
            (part.clone(), at)
        } else {
            (final_path.clone(), 0)
        };
        // Held until the file is written: its share of the one-shot budget,
        // or its turn among the multipart uploads.
        let mut _one_shot_permit: Option<OwnedSemaphorePermit> = None;
        let mut _multipart_turn: Option<OwnedSemaphorePermit> = None;
        let put = match streamed && local_root.is_none() {
            true => StreamedPut::begin(op, &write_path, size, crate::store::timeout())
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!(path = %write_path, error = %e, "cannot presign a PUT: multipart upload");
                    None
                }),
            false => None,
        };
        let mut writer = match (&local_root, put) {
            (Some(root), _) => {
                let full = root.join(&write_path);
                let from: u64 = chunks[..start].iter().map(|c| c.len as u64).sum();
                // A small file goes through the page cache without a sync
                // of its own: one direct write and one journal commit per
                // file made 100,000 files of 10 KiB take 22 s and 29
                // CPU-seconds of kernel time here (see `sync_written`).
                let direct = tuning::direct_io() && !small;
                let pool = self.buffers.clone();
                // A new part file is created by its first write (for a
                // small file, the one blocking call that also syncs and
                // moves it); a resumed one is opened now, at its offset.
                let file = if from == 0 {
                    DirectFile::create(full, direct, size, &pool)
                } else {
                    tokio::task::spawn_blocking(move || {
                        DirectFile::open(&full, from, direct, &pool)
                    })
                    .await
                    .map_err(|e| Error::Protocol(format!("open task: {e}")))?
                    .context(|| format!("opening {write_path}"))?
                };
                Sink::Local(LocalFile {
                    file: Some(file),
                    pool: self.buffers.clone(),
                    slots: self.write_slots.clone(),
                    writes: VecDeque::new(),
                    stored: from,
                    since_sync: 0,
                    syncing: None,
                })
            }
            (None, Some(put)) => Sink::Put(put),
            (None, None) => {
                // Object stores: parts of whole chunks, at least the S3
                // minimum part size, so a big file is one multipart upload
                // of few parts and a small one a single PUT.
                let mut w = op
                    .writer_with(&write_path)
                    .chunk(tuning::object_part_bytes())
                    .concurrent(self.part_uploads);
                if self.one_shot.is_none() && size > tuning::object_part_bytes() as u64 {
                    _multipart_turn = Some(
                        self.multipart_files
                            .clone()
                            .acquire_owned()
                            .await
                            .map_err(|_| Error::Protocol("fetch closing".into()))?,
                    );
                }
                if let Some(one) = &self.one_shot {
                    if size > one.max_bytes {
                        return Err(one_shot_refusal(path, size, one.max_bytes));
                    }
                    let permit = one
                        .budget
                        .clone()
                        .acquire_many_owned(kib(size))
                        .await
                        .map_err(|_| Error::Protocol("fetch closing".into()))?;
                    _one_shot_permit = Some(permit);
                    // OpenDAL gathers exactly `size` bytes, then sends them at once.
                    w = w.chunk(usize::try_from(size.max(1)).unwrap_or(usize::MAX));
                }
                Sink::Dal(Upload(Some(
                    w.append(self.append && start > 0)
                        .await
                        .context(|| format!("opening {write_path}"))?,
                )))
            }
        };
        let mut offsets = Vec::with_capacity(chunks.len());
        let mut off = 0u64;
        for c in &chunks {
            offsets.push(off);
            off += c.len as u64;
        }
        if start > 0 {
            // Verified in the part file an earlier attempt left: found
            // locally, not downloaded.
            self.progress
                .chunks_done
                .fetch_add(start as u64, Ordering::Relaxed);
            self.progress
                .chunks_reused
                .fetch_add(start as u64, Ordering::Relaxed);
            self.agent.metrics.chunks_reused.inc_by(start as u64);
            let resumed: u64 = chunks[..start].iter().map(|c| c.len as u64).sum();
            self.progress
                .bytes_done
                .fetch_add(resumed, Ordering::Relaxed);
        }
        let same_size = existing == Some(size);
        let local = matches!(writer, Sink::Local(_));
        let window = tuning::window();
        let mut inflight = FuturesOrdered::new();
        let mut next = start;
        let mut counted = start;
        while start < chunks.len() || !complete {
            if next == chunks.len() && !complete {
                // A live list: take what was sealed since, waiting for it
                // only with nothing of our own in flight (and then with
                // every segment written, so what is done counts as done
                // while the pass is slower than us).
                let idle = inflight.is_empty();
                if idle {
                    writer
                        .settle()
                        .await
                        .context(|| format!("writing {write_path}"))?;
                    let stored = writer.stored();
                    while counted < start && offsets[counted] + chunks[counted].len as u64 <= stored
                    {
                        self.count_done(chunks[counted].len);
                        counted += 1;
                    }
                }
                let (more, c) = source.more(chunks.len(), idle).await?;
                for m in more {
                    offsets.push(off);
                    off += m.len as u64;
                    chunks.push(m);
                }
                complete = c;
            }
            while next < chunks.len() && inflight.len() < window {
                // Wait for a slot only with nothing of our own in flight:
                // slots held by finished chunks are freed by writing them.
                let permit = if inflight.is_empty() {
                    self.slots
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|_| Error::Protocol("fetch closing".into()))?
                } else {
                    match self.slots.clone().try_acquire_owned() {
                        Ok(p) => p,
                        Err(_) => break,
                    }
                };
                let job = self.clone();
                let c = chunks[next];
                let at = same_size.then(|| (final_path.clone(), offsets[next]));
                inflight.push_back(tokio::spawn(async move {
                    let mut piece = job.chunk(c, at).await?;
                    if !local {
                        // Decrypted here, in parallel, for a sink that
                        // takes owned buffers.
                        piece = Piece::Plain(piece.into_plain()?);
                    }
                    Ok::<(Piece, OwnedSemaphorePermit), Error>((piece, permit))
                }));
                next += 1;
            }
            let Some(res) = inflight.next().await else {
                continue;
            };
            let (piece, _permit) =
                res.map_err(|e| Error::Protocol(format!("chunk task: {e}")))??;
            writer.write(piece, &write_path).await?;
            if matches!(writer, Sink::Put(_)) && start == 0 && tuning::fault_put_cut() {
                return Err(Error::Storage {
                    context: format!("writing {write_path}"),
                    source: opendal::Error::new(
                        opendal::ErrorKind::Unexpected,
                        "test fault: PUT cut off",
                    )
                    .set_temporary(),
                });
            }
            self.progress.first_byte();
            start += 1;
            // A chunk counts as done once all of it is in the file: a direct
            // write holds the last partial block back until more comes, and a
            // crash loses what is held (the resumed fetch refetches it).
            let stored = writer.stored();
            while counted < start && offsets[counted] + chunks[counted].len as u64 <= stored {
                self.count_done(chunks[counted].len);
                counted += 1;
            }
        }
        let streamed = matches!(writer, Sink::Put(_));
        let closing = writer.close(&write_path).await?;
        if streamed {
            self.agent.metrics.files_put_streamed.inc();
        }
        for c in &chunks[counted..start] {
            self.count_done(c.len);
        }
        if let (Some(closing), Some(root)) = (closing, local_root) {
            // The last write, the sync and the move into place run now, in
            // one blocking call, while other files are still coming; "done"
            // waits for them (`sync_written`), and a crash before leaves
            // the part file to resume from. The slots are taken here, so
            // files that finish faster than the disk wait (and their
            // buffers stay bounded).
            let closed = |_| Error::Protocol("fetch closing".into());
            let write_slot = match closing.writes() {
                true => Some(
                    self.write_slots
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(closed)?,
                ),
                false => None,
            };
            let sync_slot = self
                .sync_slots
                .clone()
                .acquire_owned()
                .await
                .map_err(closed)?;
            if let Ok(mut u) = self.unsynced.lock()
                && let Some(dir) = root.join(&final_path).parent()
                && !u.contains(dir)
            {
                u.insert(dir.to_path_buf());
            }
            if small {
                self.unsynced_small.store(true, Ordering::Relaxed);
            }
            let pool = self.buffers.clone();
            let placed_log = self.placed_log.clone();
            let progress = self.progress.clone();
            let replace = self
                .may_replace
                .lock()
                .map(|m| m.contains(&final_path))
                .unwrap_or(false);
            let h = tokio::spawn(async move {
                let _slots = (write_slot, sync_slot);
                let buf = tokio::task::spawn_blocking(move || {
                    let buf = closing
                        .complete_with(!small)
                        .context(|| format!("finishing {write_path}"))?;
                    if let Some(log) = &placed_log {
                        local::note_placed(log, &final_path)
                            .context(|| format!("noting {final_path} as placed"))?;
                    }
                    local::place(&root, &write_path, &final_path, replace)
                        .context(|| format!("moving {write_path} to {final_path}"))?;
                    Ok::<_, Error>(buf)
                })
                .await
                .map_err(|e| Error::Protocol(format!("finishing task: {e}")))??;
                if let Some(buf) = buf {
                    pool.put(buf);
                }
                // Counted once in place: a move refused (a file of the
                // user's own appeared there) leaves it not done.
                progress.files_done.fetch_add(1, Ordering::Relaxed);
                Ok(())
            });
            if let Ok(mut s) = self.syncing.lock() {
                s.push(h);
            }
            return Ok(());
        } else if self.append {
            op.rename(&write_path, &final_path)
                .await
                .context(|| format!("moving {write_path} to {final_path}"))?;
        }
        self.progress.files_done.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Makes every file written on a local filesystem durable, with its
    /// directory entry, before the fetch reports "done": each file's sync
    /// was started in the background when the file was complete (and its
    /// writeback while it was written), so this waits for those, then syncs
    /// the directories. A crash before it leaves the fetch pending; the
    /// resumed fetch verifies every chunk already in place and refetches
    /// only what fails.
    pub(crate) async fn sync_written(&self) -> Result<()> {
        let running = self
            .syncing
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default();
        running.finish().await?;
        let mut dirs: Vec<PathBuf> = self
            .unsynced
            .lock()
            .map(|mut u| std::mem::take(&mut *u))
            .unwrap_or_default()
            .into_iter()
            .collect();
        dirs.sort();
        if self.unsynced_small.load(Ordering::Relaxed) {
            // One sync of each filesystem the small files are on (usually
            // one): their data, their moves into place and their folders,
            // in one journal commit instead of one per file.
            let dirs = dirs.clone();
            tokio::task::spawn_blocking(move || sync_filesystems(&dirs))
                .await
                .map_err(|e| Error::Protocol(format!("sync task: {e}")))?
                .context(|| "syncing the fetched files' filesystem".into())?;
        }
        futures::stream::iter(dirs.into_iter().map(|d| sync_path(d, true)))
            .buffer_unordered(SYNC_CONCURRENCY)
            .collect::<Vec<Result<()>>>()
            .await
            .into_iter()
            .collect::<Result<Vec<()>>>()?;
        Ok(())
    }

    /// Counts one chunk written.
    fn count_done(&self, len: u32) {
        self.progress.chunks_done.fetch_add(1, Ordering::Relaxed);
        self.progress
            .bytes_done
            .fetch_add(len as u64, Ordering::Relaxed);
    }

    /// Counts a file found complete and verified at its destination.
    pub(crate) fn file_already_in_place(&self, chunks: &[ChunkRef]) {
        let bytes: u64 = chunks.iter().map(|c| c.len as u64).sum();
        let n = chunks.len() as u64;
        self.progress.bytes_done.fetch_add(bytes, Ordering::Relaxed);
        self.progress.chunks_done.fetch_add(n, Ordering::Relaxed);
        self.progress.chunks_reused.fetch_add(n, Ordering::Relaxed);
        self.agent.metrics.chunks_reused.inc_by(n);
        self.progress.files_done.fetch_add(1, Ordering::Relaxed);
    }

    /// The size of a part file left by an interrupted fetch, if any.
    async fn part_size(&self, part: &str) -> Result<Option<u64>> {
        match self.agent.op.stat(part).await {
            Ok(m) => Ok(Some(m.content_length())),
            Err(e) if e.kind() == opendal::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).context(|| format!("stat {part}")),
        }
    }

    /// How many whole chunks an interrupted part file already holds.
    /// `None`: the part file reaches past the chunks listed so far of an
    /// incomplete list (ask again when it grew).
    async fn resume_point(
        &self,
        part: &str,
        have: Option<u64>,
        chunks: &[ChunkRef],
        complete: bool,
    ) -> Result<Option<usize>> {
        let op = &self.agent.op;
        let Some(have) = have else {
            return Ok(Some(0));
        };
        let listed: u64 = chunks.iter().map(|c| c.len as u64).sum();
        if have > listed && !complete {
            return Ok(None);
        }
        // The last whole chunk the part holds: a part that ends mid-chunk
        // was torn by a crash (or holds the padding of a direct write's last
        // block); a local one is cut back to that chunk, anything else is
        // discarded.
        let mut whole = 0usize;
        let mut at = 0u64;
        for c in chunks {
            if at + c.len as u64 > have {
                break;
            }
            at += c.len as u64;
            whole += 1;
        }
        // What the part holds was verified before it was written, but the
        // crash may have torn more than the tail: check it again (a local
        // read, no refetch) and keep only the verified prefix.
        let mut off = 0u64;
        for (i, c) in chunks[..whole].iter().enumerate() {
            if self.read_local(part, off, c).await.is_none() {
                whole = i;
                at = off;
                break;
            }
            off += c.len as u64;
        }
        if at == have {
            return Ok(Some(whole));
        }
        if let Some(root) = &self.agent.opts.fs_root {
            let full = root.join(part);
            tokio::task::spawn_blocking(move || {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&full)?
                    .set_len(at)
            })
            .await
            .map_err(|e| Error::Protocol(format!("truncate task: {e}")))?
            .context(|| format!("cutting torn {part} back to its last whole chunk"))?;
            return Ok(Some(whole));
        }
        op.delete(part)
            .await
            .context(|| format!("discarding torn {part}"))?;
        Ok(Some(0))
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

    /// Refuses, before anything is written, a share that would replace a
    /// file of the recipient's own: a file at one of the share's paths
    /// that `ours` (the previous version's files at this destination) does
    /// not list and that is not already exactly the share's file (same
    /// size and, where `chunks` are known, every chunk verified in place:
    /// an interrupted fetch's files, put there by this share). Writing over
    /// it, as `cp` would, loses what the recipient had there. On object
    /// storage the check uses the destination's one listing and is left
    /// out when the listing is too long to keep.
    pub(crate) async fn check_own_files(
        &self,
        id: &crate::manifest::ShareId,
        ours: &HashSet<&str>,
        our_folders: &HashSet<&str>,
        files: &[(&str, u64, Option<&[ChunkRef]>)],
    ) -> Result<()> {
        let present: Vec<(usize, u64)> = match &self.agent.opts.fs_root {
            Some(root) => {
                type Found = (
                    Vec<(usize, u64)>,
                    Vec<usize>,
                    Vec<String>,
                    Option<(String, &'static str)>,
                );
                let (mut present, mut folders, mut here, mut other): Found = Default::default();
                // A batch of paths at a time: all at once, a tree of 250,000
                // files held 18 MiB of them at the start of its fetch.
                for (b, batch) in files.chunks(STAT_BATCH).enumerate() {
                    let root = root.clone();
                    let paths: Vec<(usize, String, bool)> = batch
                        .iter()
                        .enumerate()
                        .map(|(j, f)| {
                            let i = b * STAT_BATCH + j;
                            (i, format!("{}{}", self.dest, f.0), ours.contains(f.0))
                        })
                        .collect();
                    let found: Found = tokio::task::spawn_blocking(move || {
                        let mut found: Found = Default::default();
                        let (present, folders, here, other) = &mut found;
                        for (i, p, ours) in paths {
                            let Ok(at) = local::confined(&root, &p) else {
                                continue;
                            };
                            match std::fs::symlink_metadata(at) {
                                Ok(m) if m.is_dir() => folders.push(i),
                                Ok(m) if m.is_file() && !ours => present.push((i, m.len())),
                                Ok(_) if ours => here.push(p),
                                // A link, a FIFO, a socket or a device of the
                                // recipient's: refused now, like a file of
                                // theirs, not found half way through the writes.
                                Ok(m) if other.is_none() => {
                                    *other = Some((p, crate::util::file_type_said(m.file_type())))
                                }
                                _ => {}
                            }
                        }
                        found
                    })
                    .await
                    .map_err(|e| Error::Protocol(format!("checking the destination: {e}")))?;
                    present.extend(found.0);
                    folders.extend(found.1);
                    here.extend(found.2);
                    if other.is_none() {
                        other = found.3;
                    }
                    if other.is_some() {
                        break;
                    }
                }
                if let Some((p, what)) = other {
                    return Err(Error::Rejected(format!(
                        "share {id} would replace {p}, {what} of your own (not one an earlier \
                         version of this share put there): move it away, or fetch into another \
                         folder; nothing was written"
                    )));
                }
                if let Ok(mut m) = self.may_replace.lock() {
                    m.extend(here);
                }
                // A folder where the share has a file: the previous
                // version's folder (listed, or its files in it) is the
                // version's to replace (`tree::Reshape`, which refuses one
                // holding files of the recipient's); any other is the
                // recipient's, which the move into place would fail on
                // halfway.
                if !folders.is_empty() {
                    let ours: std::collections::BTreeSet<&str> = ours.iter().copied().collect();
                    for i in folders {
                        let under = format!("{}/", files[i].0);
                        let previous = our_folders.contains(files[i].0)
                            || ours
                                .range(under.as_str()..)
                                .next()
                                .is_some_and(|p| p.starts_with(&under));
                        if !previous {
                            return Err(Error::Rejected(format!(
                                "share {id} has the file {}{}, where you have a folder: move \
                                 it away, or fetch into another folder; nothing was written",
                                self.dest, files[i].0
                            )));
                        }
                    }
                }
                present
            }
            None => {
                // The destination's one listing, shared with the writes.
                let Some(listed) = self.listing().await else {
                    return Ok(());
                };
                let found: Vec<(usize, u64)> = files
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| !ours.contains(f.0))
                    .filter_map(|(i, f)| {
                        listed
                            .get(&format!("{}{}", self.dest, f.0))
                            .map(|n| (i, *n))
                    })
                    .collect();
                let mut out = Vec::with_capacity(found.len());
                for (i, n) in found {
                    // A listing may leave sizes out (0): asked alone then.
                    let n = match n {
                        0 => self
                            .existing_size(&format!("{}{}", self.dest, files[i].0))
                            .await
                            .unwrap_or(0),
                        n => n,
                    };
                    out.push((i, n));
                }
                out
            }
        };
        // Verified several at once (on object storage each is a GET per
        // chunk: one at a time, a resumed fetch of 5,000 small files spent
        // most of a minute here), and remembered, so the write that follows
        // does not read them all again.
        let checked: Vec<(String, bool, bool)> = futures::stream::iter(present)
            .map(|(i, have)| async move {
                let (path, size, chunks) = files[i];
                let full = format!("{}{path}", self.dest);
                // Without its chunk list (a publish pass being followed,
                // its listing not signed) a file of the same size cannot be
                // told from the share's: it is the user's, so never
                // replaced (nor, once the signed manifest leaves it out,
                // removed). A fetch after the pass verifies it instead.
                let same = have == size
                    && match chunks {
                        Some(c) => self.verify_in_place(&full, c).await?,
                        None => false,
                    };
                Ok::<_, Error>((full, same, chunks.is_some()))
            })
            .buffer_unordered(VERIFY_AT_ONCE)
            .try_collect()
            .await?;
        for (full, same, verified) in checked {
            if !same {
                return Err(Error::Rejected(format!(
                    "share {id} would replace {full}, a file of your own (not one an earlier \
                     version of this share put there): move it away, or fetch into another \
                     folder; nothing was written"
                )));
            }
            if verified && let Ok(mut v) = self.verified.lock() {
                v.insert(full.clone());
            }
            if let Ok(mut m) = self.may_replace.lock() {
                m.insert(full);
            }
        }
        Ok(())
    }

    /// The size of the file at `path` in the destination, if there is one.
    /// Object storage: the destination's files and sizes, listed once per
    /// fetch (none when there are more than [`LISTED_MAX`]).
    async fn listing(&self) -> Option<&HashMap<String, u64>> {
        let op = &self.agent.op;
        self.listed
            .get_or_init(|| async {
                let mut l = op.lister_with(&self.dest).recursive(true).await.ok()?;
                let mut out = HashMap::new();
                while let Some(e) = l.try_next().await.ok()? {
                    if out.len() >= LISTED_MAX {
                        return None;
                    }
                    if e.metadata().is_file() {
                        out.insert(e.path().to_string(), e.metadata().content_length());
                    }
                }
                Some(out)
            })
            .await
            .as_ref()
    }

    async fn existing_size(&self, path: &str) -> Option<u64> {
        let op = &self.agent.op;
        if self.agent.opts.fs_root.is_none() {
            let listed = self.listing().await;
            match listed.map(|l| l.get(path)) {
                Some(None) => return None,
                // A listing may leave sizes out (0): asked alone then.
                Some(Some(n)) if *n > 0 => return Some(*n),
                _ => {}
            }
        }
        match op.stat(path).await {
            Ok(m) if m.is_file() => Some(m.content_length()),
            _ => None,
        }
    }

    async fn read_local(&self, path: &str, offset: u64, c: &ChunkRef) -> Option<Vec<u8>> {
        let keyer = self.keyer.clone();
        let c = *c;
        // On a local disk, only a regular file is read, and never waited
        // on: a FIFO at a path of the share's (put there by the user)
        // blocked the read, the fetch, `cancel` and the daemon's shutdown.
        if let Some(root) = &self.agent.opts.fs_root {
            let at = local::confined(root, path).ok()?;
            return tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let f = crate::util::open_regular(&at).ok()?;
                let mut buf = vec![0u8; c.len as usize];
                f.read_exact_at(&mut buf, offset).ok()?;
                keyer.matches(&c, &buf).then_some(buf)
            })
            .await
            .ok()
            .flatten();
        }
        let buf = self
            .agent
            .op
            .read_with(path)
            .range(offset..offset + c.len as u64)
            .await
            .ok()?
            .to_vec();
        tokio::task::spawn_blocking(move || keyer.matches(&c, &buf).then_some(buf))
            .await
            .ok()
            .flatten()
    }

    /// One chunk: its plaintext from the same place in the old file or
    /// from anywhere an earlier version had it, else verified from the swarm.
    async fn chunk(&self, c: ChunkRef, same_place: Option<(String, u64)>) -> Result<Piece> {
        let candidates = same_place
            .into_iter()
            .chain(self.local.get(&c.key).cloned());
        for (path, off) in candidates {
            if let Some(plain) = self.read_local(&path, off, &c).await {
                self.progress.chunks_reused.fetch_add(1, Ordering::Relaxed);
                self.agent.metrics.chunks_reused.inc();
                return Ok(Piece::Plain(plain));
            }
        }
        let (v, copy) = self.repeats.get(c, || self.swarm.get(c)).await?;
        if copy {
            self.progress.chunks_reused.fetch_add(1, Ordering::Relaxed);
            self.agent.metrics.chunks_reused.inc();
            return Ok(Piece::Sealed(v));
        }
        if let Ok(mut t) = self.tags.lock() {
            // A chunk received again (a file retried) is listed again:
            // duplicates go before the list grows, so it stays within
            // twice the chunks received.
            if t.len() == t.capacity() && t.len() >= 1024 {
                t.sort_unstable_by_key(|t| t.0);
                t.dedup_by_key(|t| t.0);
            }
            t.push((c.id, v.tag()));
        }
        Ok(Piece::Sealed(v))
    }
}

/// Why a file cannot be fetched into storage that takes a file in one request.
pub(crate) fn one_shot_refusal(path: &str, size: u64, max: u64) -> Error {
    Error::Refused(format!(
        "{path} is {size} bytes; this storage takes a file in one request, held in memory, \
         and the limit is {max} bytes (CARAVAN_ONE_SHOT_MAX_BYTES)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parts sent at once per file: four for one or two big files, fewer
    /// as more are written, never none; with at most [`MULTIPART_FILES`]
    /// written at once, the parts in flight stay within the budget.
    /// A folder gone by the time it is synced (the user removed or moved
    /// the destination meanwhile) is named in the error.
    #[test]
    fn a_folder_gone_before_its_sync_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let gone = tmp.path().join("dest/sub");
        sync_filesystems(&[tmp.path().to_path_buf()]).unwrap();
        let e = sync_filesystems(std::slice::from_ref(&gone)).unwrap_err();
        assert!(
            e.to_string().contains("dest/sub") && e.to_string().contains("removed"),
            "{e}"
        );
    }

    #[test]
    fn part_uploads_shrink_as_big_files_grow() {
        assert_eq!(part_uploads(0), 4);
        assert_eq!(part_uploads(1), 4);
        assert_eq!(part_uploads(2), 4);
        assert_eq!(part_uploads(3), 2);
        assert_eq!(part_uploads(5), 1);
        assert_eq!(part_uploads(10_000), 1);
        for n in 3..=tuning::file_concurrency() {
            let at_once = n.min(MULTIPART_FILES);
            assert!(at_once * part_uploads(n) <= PARTS_IN_FLIGHT, "{n}");
        }
    }
}
