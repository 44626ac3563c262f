//! A fetched file written on a local filesystem with `O_DIRECT`.
//!
//! Why: a fetched file must be durable before the fetch says "done". Written
//! through the page cache, every byte is copied into freshly allocated cache
//! pages and then written back by `fsync`: on this project's benchmark
//! machine that costs about 3 CPU-seconds of kernel time per GiB, more than
//! the network, BLAKE3 and AES-GCM together. With `O_DIRECT` the disk reads
//! the bytes straight from our buffer (no copy, no cache pages, no
//! writeback), so the closing `fdatasync` only commits metadata.
//!
//! `O_DIRECT` wants buffers, offsets and lengths aligned to the block size
//! ([`ALIGN`]), and chunks have any length: chunks are gathered in aligned
//! staging buffers of [`SEGMENT`] bytes, and each full buffer is written as
//! one [`Segment`]. The last partial block is written padded with zeros and
//! the file cut back to its length.
//!
//! A direct write returns only once the disk has the bytes: one at a time,
//! a 1 GiB file took 0.87 s of disk time alone here (the whole fetch took
//! 1.3 s). Segments are therefore written by the caller on the blocking
//! pool, several at once (`writer.rs`), while the next chunks arrive.
//!
//! A segment of zeros is not written at all: the file is left sparse there
//! (a hole reads as zeros), and its length is set when it closes. A disk
//! image or a sparse file fetched takes the disk space and the write time
//! of its data, not of its apparent size; a check for zeros stops at the
//! first 4 KiB that holds anything else, so other data pays nothing.
//!
//! Where the filesystem refuses `O_DIRECT` (tmpfs on older kernels, some
//! FUSE filesystems) the file is written through the page cache as before:
//! [`DirectFile::is_direct`] tells the caller, which then starts background
//! writeback itself.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::pool::FreeList;
use crate::util::all_zero;

/// Block alignment for direct I/O: the page size, a multiple of every
/// logical block size in use (512 or 4096).
pub(crate) const ALIGN: usize = 4096;

/// Bytes gathered before one write: 2 MiB writes, a few at once, kept
/// this disk busiest (writing 1 GiB: 0.46 s with four at once, 0.87 s one
/// 512 KiB write at a time).
pub(crate) const SEGMENT: usize = 2 << 20;

/// Bytes a staging buffer holds: a segment and one block more, so a piece
/// of up to [`SEGMENT`] bytes always fits whole in a buffer that starts
/// with the unaligned tail of the previous one ([`DirectFile::stage_with`]).
const CAPACITY: usize = SEGMENT + ALIGN;

/// The largest file staged in a buffer of its own size ([`Pool::get_for`]).
const SMALL_STAGE: usize = 256 << 10;

/// An aligned buffer of `cap` bytes ([`CAPACITY`], or less for a small
/// file: [`Pool::get_for`]): storage over-allocated by [`ALIGN`], the
/// aligned region found with `align_offset` (no unsafe code).
pub(crate) struct Aligned {
    buf: Vec<u8>,
    start: usize,
    cap: usize,
}

impl Aligned {
    fn new(cap: usize) -> Aligned {
        let buf = vec![0u8; cap + ALIGN];
        let start = buf.as_ptr().align_offset(ALIGN).min(ALIGN);
        Aligned { buf, start, cap }
    }

    fn region(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.cap]
    }

    fn region_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.cap]
    }
}

/// Staging buffers shared by the files of one fetch, at most `keep` kept.
pub(crate) struct Pool(FreeList<Aligned>);

impl Pool {
    /// A pool keeping at most `keep` buffers (`writer::staging_kept` for a fetch).
    pub(crate) fn new(keep: usize) -> Pool {
        Pool(FreeList::new(keep))
    }

    fn get(&self) -> Aligned {
        self.0.take().unwrap_or_else(|| Aligned::new(CAPACITY))
    }

    /// A staging buffer for a new file of `size` bytes: one just big enough
    /// (whole blocks) for a file of up to [`SMALL_STAGE`] bytes, else a
    /// full one from the pool. A tree of small files written 16 at a time
    /// held a full buffer each, 2 MiB for 4 KiB of data: 60 MiB of a
    /// recipient's peak with 250,000 files, most of it zeroed by the
    /// allocator for reuse. (Bigger files keep the pool's buffers: a fresh
    /// one per file is zeroed or faulted in whole.)
    fn get_for(&self, size: u64) -> Aligned {
        match usize::try_from(size) {
            Ok(n) if n <= SMALL_STAGE => Aligned::new(n.next_multiple_of(ALIGN).max(ALIGN)),
            _ => self.get(),
        }
    }

    /// Gives a buffer back for reuse (a small one is freed).
    pub(crate) fn put(&self, a: Aligned) {
        if a.cap == CAPACITY {
            self.0.give(a);
        }
    }
}

/// The descriptor of a file being written, shared with its segment writes.
/// A new file is opened by its first write (on the blocking pool): a small
/// file is then created, written, synced and moved in one blocking call.
struct Shared {
    path: PathBuf,
    file: OnceLock<File>,
    /// Held while the file is being opened by a first write.
    opening: Mutex<()>,
    /// `O_DIRECT` is set on the descriptor (cleared for good when the
    /// filesystem refuses a direct write).
    direct: AtomicBool,
    /// A segment of zeros was left unwritten: the file's length is set
    /// when it closes, in case nothing after it was written.
    holes: AtomicBool,
}

impl Shared {
    /// The open descriptor, creating the file (and its directory) first
    /// if no write has yet.
    fn file(&self) -> io::Result<&File> {
        if let Some(f) = self.file.get() {
            return Ok(f);
        }
        let _opening = self
            .opening
            .lock()
            .map_err(|_| io::Error::other("open lock poisoned"))?;
        if let Some(f) = self.file.get() {
            return Ok(f);
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let (file, direct) = open_for_writing(&self.path, 0, self.direct.load(Ordering::Relaxed))?;
        self.direct.store(direct, Ordering::Relaxed);
        Ok(self.file.get_or_init(|| file))
    }
}

/// Opens `path` for writing (truncated when `offset` is 0), with
/// `O_DIRECT` when `direct` and the filesystem accepts it; tells which.
///
/// Only a regular file is written: the open neither follows a link nor
/// waits on a FIFO (`O_NOFOLLOW | O_NONBLOCK`), and what it opened is
/// checked. Part files live in the agent's state folder, but anyone who
/// can write the storage can put a link there (the resumed fetch wrote
/// through it, outside the storage) or a FIFO (the open blocked the
/// fetch, `cancel` and the daemon's shutdown). A file started afresh
/// (`offset` 0) replaces such an entry; one resumed refuses it.
fn open_for_writing(path: &Path, offset: u64, direct: bool) -> io::Result<(File, bool)> {
    match open_regular_for_writing(path, offset, direct) {
        Err(e) if offset == 0 && not_a_regular_file(&e) => {
            std::fs::remove_file(path)?;
            open_regular_for_writing(path, offset, direct)
        }
        r => r,
    }
}

fn open_regular_for_writing(path: &Path, offset: u64, direct: bool) -> io::Result<(File, bool)> {
    use rustix::fs::OFlags;
    let open = |flags: OFlags| {
        OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(offset == 0)
            .custom_flags((flags | OFlags::NOFOLLOW | OFlags::NONBLOCK).bits() as i32)
            .open(path)
    };
    let (file, direct) = match direct.then(|| open(OFlags::DIRECT)) {
        Some(Ok(f)) => (f, true),
        Some(Err(e)) if !is_einval(&e) => return Err(e),
        _ => (open(OFlags::empty())?, false),
    };
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok((file, direct))
}

/// A link (`ELOOP` under `O_NOFOLLOW`), a FIFO without a reader (`ENXIO`
/// under `O_NONBLOCK`), or anything else not a regular file.
fn not_a_regular_file(e: &io::Error) -> bool {
    use rustix::io::Errno;
    e.kind() == io::ErrorKind::InvalidInput
        || [Errno::LOOP, Errno::NXIO]
            .iter()
            .any(|n| e.raw_os_error() == Some(n.raw_os_error()))
}

fn is_einval(e: &io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error())
}

/// A local file open for sequential writing, directly to the disk when the
/// filesystem allows it.
pub(crate) struct DirectFile {
    shared: Arc<Shared>,
    /// Writes are whole blocks (the file was opened for direct I/O; stays
    /// so after a fall back to the page cache, which takes any write).
    aligned: bool,
    /// File offset of the staging buffer's first byte (a multiple of
    /// [`ALIGN`] while aligned).
    pos: u64,
    stage: Aligned,
    /// Bytes held in the staging buffer.
    held: usize,
}

/// One staged run of the file, written by [`Segment::write`] (blocking).
pub(crate) struct Segment {
    shared: Arc<Shared>,
    buf: Aligned,
    len: usize,
    at: u64,
    /// The file's length once this (padded, last) segment is written.
    cut_to: Option<u64>,
}

impl Segment {
    /// The file offset just past this segment's bytes.
    pub(crate) fn end(&self) -> u64 {
        self.cut_to.unwrap_or(self.at + self.len as u64)
    }

    /// Bytes written.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Writes the segment at its offset; falls back to the page cache for
    /// good when the filesystem refuses direct I/O. Returns the buffer.
    pub(crate) fn write(self) -> io::Result<Aligned> {
        let bytes = &self.buf.region()[..self.len];
        let file = self.shared.file()?;
        if all_zero(bytes) {
            match self.cut_to {
                // The last segment, written after every other: the length.
                Some(len) => file.set_len(len)?,
                None => self.shared.holes.store(true, Ordering::Relaxed),
            }
            return Ok(self.buf);
        }
        match file.write_all_at(bytes, self.at) {
            Err(e) if self.shared.direct.load(Ordering::Relaxed) && is_einval(&e) => {
                let flags = rustix::fs::fcntl_getfl(file)?;
                rustix::fs::fcntl_setfl(file, flags - rustix::fs::OFlags::DIRECT)?;
                self.shared.direct.store(false, Ordering::Relaxed);
                file.write_all_at(bytes, self.at)?;
            }
            other => other?,
        }
        if let Some(len) = self.cut_to {
            file.set_len(len)?;
        }
        Ok(self.buf)
    }
}

impl DirectFile {
    /// A new file at `path` (its directory created too), opened by its
    /// first write; direct when `direct` and the filesystem accepts it. Its
    /// staging buffer is sized for `size` bytes (the file's length; more
    /// bytes than that still fit, in a full buffer then). No I/O happens
    /// here.
    pub(crate) fn create(path: PathBuf, direct: bool, size: u64, pool: &Pool) -> DirectFile {
        DirectFile {
            shared: Arc::new(Shared {
                path,
                file: OnceLock::new(),
                opening: Mutex::new(()),
                direct: AtomicBool::new(direct),
                holes: AtomicBool::new(false),
            }),
            aligned: direct,
            pos: 0,
            stage: pool.get_for(size),
            held: 0,
        }
    }

    /// Makes room for `len` more staged bytes (at most what a full buffer
    /// holds beyond those staged): a small buffer too small for them is
    /// swapped for a full one, with what it holds.
    fn room_for(&mut self, len: usize, pool: &Pool) {
        if self.held + len > self.stage.cap && self.stage.cap < CAPACITY {
            let mut full = pool.get();
            full.region_mut()[..self.held].copy_from_slice(&self.stage.region()[..self.held]);
            self.stage = full;
        }
    }

    /// Opens `path` for writing from byte `offset` (a resume point: what is
    /// before it stays; `0` truncates), with `O_DIRECT` when `direct` and
    /// the filesystem accepts it. Blocking.
    pub(crate) fn open(
        path: &Path,
        offset: u64,
        direct: bool,
        pool: &Pool,
    ) -> io::Result<DirectFile> {
        let (file, direct) = open_for_writing(path, offset, direct)?;
        if offset > 0 {
            file.set_len(offset)?;
        }
        let mut me = DirectFile {
            shared: Arc::new(Shared {
                path: path.to_path_buf(),
                file: OnceLock::from(file),
                opening: Mutex::new(()),
                direct: AtomicBool::new(direct),
                holes: AtomicBool::new(false),
            }),
            aligned: direct,
            pos: offset,
            stage: pool.get(),
            held: 0,
        };
        if direct {
            // Resume mid-block: the block's first bytes are read back (through
            // a plain descriptor) and carried, so writes stay aligned.
            let rest = (offset % ALIGN as u64) as usize;
            me.pos = offset - rest as u64;
            if rest > 0 {
                File::open(path)?.read_exact_at(&mut me.stage.region_mut()[..rest], me.pos)?;
                me.held = rest;
            }
        }
        Ok(me)
    }

    /// Whether writes go straight to the disk (else through the page cache,
    /// and the caller should start writeback as it sees fit).
    pub(crate) fn is_direct(&self) -> bool {
        self.shared.direct.load(Ordering::Relaxed)
    }

    /// A second descriptor of the file (for a background data sync).
    pub(crate) fn try_clone(&self) -> io::Result<File> {
        self.shared.file()?.try_clone()
    }

    /// Appends `plain` to the staged bytes; returns the segments that are
    /// full, for the caller to write (in any order, at once if it likes).
    pub(crate) fn stage(&mut self, mut plain: &[u8], pool: &Pool) -> Vec<Segment> {
        let mut full = Vec::new();
        while !plain.is_empty() {
            let n = plain.len().min(SEGMENT - self.held);
            self.room_for(n, pool);
            self.stage.region_mut()[self.held..self.held + n].copy_from_slice(&plain[..n]);
            self.held += n;
            plain = &plain[n..];
            if self.held == SEGMENT {
                let buf = std::mem::replace(&mut self.stage, pool.get());
                full.push(self.segment(buf, SEGMENT, None));
                self.pos += SEGMENT as u64;
                self.held = 0;
            }
        }
        full
    }

    /// Whether [`DirectFile::stage_with`] takes a piece of `len` bytes.
    pub(crate) fn fits(len: usize) -> bool {
        len <= SEGMENT
    }

    /// Appends a piece of `len` bytes (at most [`SEGMENT`], see
    /// [`DirectFile::fits`]) that `fill` writes straight into the staging
    /// buffer (a chunk decrypted into place: no copy). A piece that does not
    /// fit in what is left of the buffer starts the next one: the full
    /// blocks staged so far become a segment, the partial last block moves
    /// along. Returns the segments ready to write. On an error from `fill`
    /// nothing staged counts: the caller abandons the file.
    pub(crate) fn stage_with<E>(
        &mut self,
        len: usize,
        pool: &Pool,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<Vec<Segment>, E> {
        let mut full = Vec::new();
        if self.held + len > CAPACITY {
            full.extend(self.flush_blocks(pool));
        }
        self.room_for(len, pool);
        fill(&mut self.stage.region_mut()[self.held..self.held + len])?;
        self.held += len;
        if self.held >= SEGMENT {
            full.extend(self.flush_blocks(pool));
        }
        Ok(full)
    }

    /// The whole blocks staged (everything, through the page cache) as a
    /// segment; the rest is carried to a fresh buffer.
    fn flush_blocks(&mut self, pool: &Pool) -> Option<Segment> {
        let n = if self.aligned {
            self.held / ALIGN * ALIGN
        } else {
            self.held
        };
        if n == 0 {
            return None;
        }
        let tail = self.held - n;
        let mut next = pool.get();
        next.region_mut()[..tail].copy_from_slice(&self.stage.region()[n..self.held]);
        let buf = std::mem::replace(&mut self.stage, next);
        let seg = self.segment(buf, n, None);
        self.pos += n as u64;
        self.held = tail;
        Some(seg)
    }

    fn segment(&self, buf: Aligned, len: usize, cut_to: Option<u64>) -> Segment {
        Segment {
            shared: self.shared.clone(),
            buf,
            len,
            at: self.pos,
            cut_to,
        }
    }

    /// The last segment: what is still staged (padded with zeros to a
    /// whole block when aligned, the file then cut back to its length), or
    /// `None` with nothing staged. The staging buffer goes back to `pool`
    /// when there is nothing to write.
    pub(crate) fn finish(self, pool: &Pool) -> Option<Segment> {
        let held = self.held;
        if held == 0 {
            pool.put(self.stage);
            return None;
        }
        let DirectFile {
            shared,
            aligned,
            pos,
            mut stage,
            ..
        } = self;
        let (len, cut_to) = if aligned {
            let padded = held.next_multiple_of(ALIGN);
            stage.region_mut()[held..padded].fill(0);
            (padded, Some(pos + held as u64))
        } else {
            (held, None)
        };
        Some(Segment {
            shared,
            buf: stage,
            len,
            at: pos,
            cut_to,
        })
    }

    /// The file's last write and its data sync, to be done together on the
    /// blocking pool ([`Closing::complete`]) once every earlier segment is
    /// written.
    pub(crate) fn close(self, pool: &Pool) -> Closing {
        let shared = self.shared.clone();
        let length = self.pos + self.held as u64;
        Closing {
            last: self.finish(pool),
            shared,
            length,
        }
    }
}

/// A file whose bytes are all staged: its last segment and its sync.
pub(crate) struct Closing {
    last: Option<Segment>,
    shared: Arc<Shared>,
    /// The file's length once complete.
    length: u64,
}

impl Closing {
    /// Whether a last segment is still to be written (it holds a buffer).
    pub(crate) fn writes(&self) -> bool {
        self.last.is_some()
    }

    /// Writes the last segment and, with `sync`, makes the file's data and
    /// length durable (`fdatasync` on the descriptor already open: no second
    /// open by path). Without: a small file, made durable with the others by
    /// one sync of its filesystem before the fetch is done (`writer.rs`).
    /// The file is created by this call when nothing was written before.
    /// Blocking. Returns the segment's buffer for reuse.
    pub(crate) fn complete_with(self, sync: bool) -> io::Result<Option<Aligned>> {
        let buf = self.last.map(Segment::write).transpose()?;
        let file = self.shared.file()?;
        // Zeros left unwritten at the end (every write is done now).
        if self.shared.holes.load(Ordering::Relaxed) && file.metadata()?.len() < self.length {
            file.set_len(self.length)?;
        }
        if sync {
            file.sync_data()?;
        }
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Guarantee: a part file is never written through a link nor waited
    /// on as a FIFO (anyone who can write the storage can put either in
    /// the state folder): started afresh, the entry is replaced by a
    /// regular file and the link's target is untouched; resumed, it is
    /// refused. (A resumed fetch wrote 130 MiB through such a link, outside
    /// the storage; a FIFO hung it, `cancel` and the daemon's shutdown.)
    #[test]
    fn a_part_file_is_never_written_through_a_link_or_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, b"keep me").unwrap();
        let part = dir.path().join("part");
        std::os::unix::fs::symlink(&outside, &part).unwrap();
        assert!(
            open_for_writing(&part, 4096, true).is_err(),
            "a resume through a link"
        );
        let (f, _) = open_for_writing(&part, 0, true).unwrap();
        drop(f);
        assert!(std::fs::symlink_metadata(&part).unwrap().is_file());
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep me");
        std::fs::remove_file(&part).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &part,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        assert!(
            open_for_writing(&part, 4096, false).is_err(),
            "a resume of a FIFO"
        );
        let (f, _) = open_for_writing(&part, 0, false).unwrap();
        drop(f);
        assert!(std::fs::symlink_metadata(&part).unwrap().is_file());
    }

    #[test]
    fn closing_writes_the_last_segment_and_cuts_the_file_to_length() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = Pool::new(4);
        for direct in [true, false] {
            // Created by its first write, directory and all.
            let path = tmp.path().join(format!("new/c{direct}"));
            let data = pattern(SEGMENT + 5000, 9);
            let mut f = DirectFile::create(path.clone(), direct, 0, &pool);
            assert!(!path.exists());
            write_all(f.stage(&data, &pool));
            let closing = f.close(&pool);
            assert!(closing.writes());
            assert!(closing.complete_with(true).unwrap().is_some());
            assert_eq!(std::fs::read(&path).unwrap(), data);
            // Nothing staged: only the sync.
            let mut f = DirectFile::open(&path, 0, direct, &pool).unwrap();
            write_all(f.stage(&data[..SEGMENT], &pool));
            let closing = f.close(&pool);
            assert!(!closing.writes());
            assert!(closing.complete_with(true).unwrap().is_none());
            assert_eq!(std::fs::read(&path).unwrap(), &data[..SEGMENT]);
            // An empty file is created by its closing.
            let empty = tmp.path().join(format!("new/e{direct}"));
            let f = DirectFile::create(empty.clone(), direct, 0, &pool);
            assert!(f.close(&pool).complete_with(true).unwrap().is_none());
            assert_eq!(std::fs::read(&empty).unwrap(), b"");
        }
    }

    /// Writes segments in reverse order, as concurrent writes may land.
    fn write_all(segs: impl IntoIterator<Item = Segment>) {
        let mut segs: Vec<Segment> = segs.into_iter().collect();
        segs.reverse();
        for s in segs {
            s.write().unwrap();
        }
    }

    #[test]
    fn unaligned_pieces_make_the_exact_file_and_resume_mid_block() {
        let pool = Pool::new(4);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let pieces = [
            pattern(1, 1),
            pattern(5000, 2),
            pattern(4096, 3),
            pattern(123_457, 4),
            pattern(SEGMENT * 2 + 17, 6),
            pattern(3, 5),
        ];
        let want: Vec<u8> = pieces.concat();
        for direct in [true, false] {
            let mut f = DirectFile::open(&path, 0, direct, &pool).unwrap();
            for p in &pieces[..3] {
                write_all(f.stage(p, &pool));
            }
            write_all(f.finish(&pool));
            // Resume after the third piece (offset 9097: mid-block).
            let at = (pieces[0].len() + pieces[1].len() + pieces[2].len()) as u64;
            let mut f = DirectFile::open(&path, at, direct, &pool).unwrap();
            for p in &pieces[3..] {
                write_all(f.stage(p, &pool));
            }
            write_all(f.finish(&pool));
            assert_eq!(std::fs::read(&path).unwrap(), want, "direct={direct}");
        }
    }

    #[test]
    fn pieces_filled_in_place_and_copied_mix_into_the_exact_file() {
        let pool = Pool::new(4);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let sizes = [
            1,
            5000,
            SEGMENT,
            700_000,
            3,
            SEGMENT - 1,
            1_500_000,
            4096,
            SEGMENT,
            SEGMENT,
            12_345,
        ];
        let pieces: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| pattern(*n, i as u8))
            .collect();
        let want: Vec<u8> = pieces.concat();
        for direct in [true, false] {
            let mut f = DirectFile::open(&path, 0, direct, &pool).unwrap();
            for (i, p) in pieces.iter().enumerate() {
                let segs = if i % 3 == 1 {
                    f.stage(p, &pool)
                } else {
                    assert!(DirectFile::fits(p.len()));
                    f.stage_with(p.len(), &pool, |out| {
                        out.copy_from_slice(p);
                        Ok::<(), ()>(())
                    })
                    .unwrap()
                };
                for s in &segs {
                    assert!(
                        !direct
                            || (s.at.is_multiple_of(ALIGN as u64) && s.len.is_multiple_of(ALIGN))
                    );
                }
                write_all(segs);
            }
            write_all(f.finish(&pool));
            assert_eq!(std::fs::read(&path).unwrap(), want, "direct={direct}");
        }
        assert!(!DirectFile::fits(SEGMENT + 1));
    }

    /// Guarantee: a new small file stages in a buffer of its own size
    /// (whole blocks), not a full segment's, and is written the same
    /// whatever its size said: exactly, less, or more than it (the buffer
    /// then grows to a full one with what it held).
    #[test]
    fn a_small_file_stages_in_a_buffer_of_its_size_and_any_length_fits() {
        let pool = Pool::new(4);
        assert_eq!(pool.get_for(5000).cap, 2 * ALIGN);
        assert_eq!(pool.get_for(0).cap, ALIGN);
        assert_eq!(pool.get_for(SMALL_STAGE as u64).cap, SMALL_STAGE);
        assert_eq!(pool.get_for(SMALL_STAGE as u64 + 1).cap, CAPACITY);
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(3 * SEGMENT, 5);
        for (i, (said, len)) in [
            (5000, 5000),
            (5000, 3000),
            (5000, 9000),
            (4096, 3 * SEGMENT),
        ]
        .into_iter()
        .enumerate()
        {
            for direct in [true, false] {
                for with in [false, true] {
                    let path = dir.path().join(format!("z{i}{direct}{with}"));
                    let mut f = DirectFile::create(path.clone(), direct, said, &pool);
                    for piece in data[..len].chunks(1500) {
                        if with {
                            write_all(
                                f.stage_with(piece.len(), &pool, |b| {
                                    b.copy_from_slice(piece);
                                    Ok::<_, ()>(())
                                })
                                .unwrap(),
                            );
                        } else {
                            write_all(f.stage(piece, &pool));
                        }
                    }
                    f.close(&pool).complete_with(true).unwrap();
                    assert_eq!(
                        std::fs::read(&path).unwrap(),
                        &data[..len],
                        "said {said}, wrote {len}, direct={direct}, stage_with={with}"
                    );
                }
            }
        }
    }

    #[test]
    fn segments_of_zeros_are_left_as_holes_and_the_file_keeps_its_length() {
        use std::os::unix::fs::MetadataExt;
        let pool = Pool::new(4);
        let dir = tempfile::tempdir().unwrap();
        let zeros = vec![0u8; 8 * SEGMENT];
        let data = pattern(5000, 3);
        // Zeros between data, zeros at the end on a segment boundary, and
        // zeros ending mid-block.
        let cases: [Vec<&[u8]>; 3] = [
            vec![&data, &zeros, &data],
            vec![&data[..4096], &zeros],
            vec![&zeros, &zeros[..1000]],
        ];
        for (i, pieces) in cases.iter().enumerate() {
            for direct in [true, false] {
                let path = dir.path().join(format!("s{i}{direct}"));
                let mut f = DirectFile::create(path.clone(), direct, 0, &pool);
                for p in pieces {
                    write_all(f.stage(p, &pool));
                }
                f.close(&pool).complete_with(true).unwrap();
                let want: Vec<u8> = pieces.concat();
                assert_eq!(
                    std::fs::read(&path).unwrap(),
                    want,
                    "case {i} direct={direct}"
                );
                let m = std::fs::metadata(&path).unwrap();
                assert!(
                    m.blocks() * 512 < 2 * SEGMENT as u64 + 3 * ALIGN as u64,
                    "case {i}: {} bytes allocated for {}",
                    m.blocks() * 512,
                    m.len()
                );
            }
        }
        assert!(all_zero(&zeros));
        let mut late = zeros.clone();
        late[3 * SEGMENT + 17] = 1;
        assert!(!all_zero(&late));
    }

    #[test]
    fn a_resume_point_cuts_what_follows_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, pattern(10_000, 9)).unwrap();
        let pool = Pool::new(4);
        let mut f = DirectFile::open(&path, 6000, true, &pool).unwrap();
        write_all(f.stage(&pattern(10, 7), &pool));
        write_all(f.finish(&pool));
        let mut want = pattern(10_000, 9);
        want.truncate(6000);
        want.extend(pattern(10, 7));
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }
}
