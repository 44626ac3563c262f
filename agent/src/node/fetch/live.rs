//! The recipient's side of a live share (see `node/live.rs`): the
//! publisher's listing of what its running pass sealed so far, followed by
//! long polls, kept as a growing chunk list per file for the writer. Only
//! the publisher is asked, over the authenticated channel; every chunk is
//! still verified against its id when fetched, and at the end the signed
//! manifest must list exactly these chunks.

use std::sync::{Arc, Mutex};

use crate::chunk::{ChunkRef, MAX_CHUNK};
use crate::error::{Error, Result};
use crate::manifest::{MAX_MANIFEST_CHUNKS, MAX_MANIFEST_ENTRIES, ShareId, check_tree};
use crate::node::fetch::repeats::Repeats;
use crate::node::live::{LiveAnswer, LiveEnd, LiveListing};
use crate::wire::client::PeerConn;

/// How a feed stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FeedEnd {
    Running,
    /// The pass ended (or the publisher no longer lists it): the signed
    /// manifest decides.
    Ended,
    Failed(String),
    /// The connection to the publisher closed (its daemon stopped?): the
    /// fetch may follow the pass again once it is back.
    Lost(String),
}

struct FeedState {
    chunks: Vec<Vec<ChunkRef>>,
    bytes: Vec<u64>,
    cursor: u64,
    end: FeedEnd,
}

/// What the publisher listed of a live share, growing as its pass goes on.
pub(crate) struct LiveFeed {
    /// The version being published.
    pub(crate) seq: u64,
    /// Files and directories of the walk.
    pub(crate) listing: LiveListing,
    state: Mutex<FeedState>,
    news: tokio::sync::watch::Sender<u64>,
    /// Set when following ended because the connection closed
    /// ([`LiveFeed::lost_flag`]).
    lost: Arc<std::sync::atomic::AtomicBool>,
    /// The listed chunks counted, so repeats are fetched once.
    pub(crate) repeats: Arc<Repeats>,
}

impl LiveFeed {
    /// Starts from the publisher's first answer (which holds the listing)
    /// and follows the pass in the background on `conn`.
    pub(crate) fn start(
        conn: Arc<PeerConn>,
        share: ShareId,
        first: LiveAnswer,
    ) -> Result<Arc<LiveFeed>> {
        let feed = Self::from_first(first)?;
        // The follower holds the feed only while it takes an answer in:
        // the fetch drops the feed (its listing and chunk lists, 44 MB for
        // 250,000 files) before it takes the signed manifest, and a
        // follower pausing between asks or waiting on one kept it alive
        // beside the manifest.
        let weak = Arc::downgrade(&feed);
        tokio::spawn(async move {
            let stall = crate::node::tuning::live_stall();
            let mut moved = std::time::Instant::now();
            loop {
                let from = {
                    let Some(f) = weak.upgrade() else { break };
                    let from = match f.state.lock() {
                        Ok(s) if s.end == FeedEnd::Running => s.cursor,
                        _ => break,
                    };
                    if moved.elapsed() > stall {
                        f.set_end(FeedEnd::Failed(format!(
                            "the publisher's pass listed nothing new for {} s: given up as stalled \
                             (fetch again once it has published)",
                            stall.as_secs()
                        )));
                        break;
                    }
                    from
                };
                // Position n + 1: the log from entry n on, without the listing.
                let asked = std::time::Instant::now();
                let answer = conn.live(&share, from + 1).await;
                let Some(f) = weak.upgrade() else { break };
                let r = match answer {
                    Ok(b) => LiveAnswer::from_bytes(&b).and_then(|a| f.apply(a)),
                    // No longer live (it ended a while ago): the manifest decides.
                    Err(Error::NotFound(_)) => {
                        f.set_end(FeedEnd::Ended);
                        break;
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = r {
                    let why = format!("following the publisher's pass: {e}");
                    f.set_end(if conn.is_closed() {
                        FeedEnd::Lost(why)
                    } else {
                        FeedEnd::Failed(why)
                    });
                    break;
                }
                let (now, running) = f
                    .state
                    .lock()
                    .map(|s| (s.cursor, s.end == FeedEnd::Running))
                    .unwrap_or((from, false));
                drop(f);
                if !running {
                    break;
                }
                if now != from {
                    moved = std::time::Instant::now();
                } else {
                    // An honest publisher holds an ask open until there is
                    // news (`LIVE_POLL`); one that answers "nothing new" at
                    // once is asked at most once a second.
                    pace(asked).await;
                }
            }
        });
        Ok(feed)
    }

    /// A feed of the publisher's first answer, its listing checked.
    fn from_first(mut first: LiveAnswer) -> Result<Arc<LiveFeed>> {
        let listing = first
            .listing
            .take()
            .ok_or_else(|| Error::Protocol("live answer without the file list".into()))?;
        check_listing(&listing)?;
        let n = listing.files.len();
        let feed = Arc::new(LiveFeed {
            seq: first.seq,
            listing,
            state: Mutex::new(FeedState {
                chunks: vec![Vec::new(); n],
                bytes: vec![0; n],
                cursor: 0,
                end: FeedEnd::Running,
            }),
            news: tokio::sync::watch::Sender::new(0),
            lost: Arc::default(),
            repeats: Arc::default(),
        });
        feed.apply(first)?;
        Ok(feed)
    }

    fn set_end(&self, end: FeedEnd) {
        if let Ok(mut s) = self.state.lock()
            && s.end == FeedEnd::Running
        {
            if matches!(end, FeedEnd::Lost(_)) {
                self.lost.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            s.end = end;
        }
        self.news.send_modify(|n| *n += 1);
    }

    /// Takes one answer in, checking it continues the log and stays
    /// within each file's declared size.
    fn apply(&self, a: LiveAnswer) -> Result<()> {
        if a.seq != self.seq {
            return Err(Error::Protocol(format!(
                "the publisher moved on to version {} while version {} was being fetched",
                a.seq, self.seq
            )));
        }
        {
            let mut s = self
                .state
                .lock()
                .map_err(|_| Error::Protocol("live feed poisoned".into()))?;
            if a.from != s.cursor {
                return Err(Error::Protocol(format!(
                    "live answer from position {} where {} was asked",
                    a.from, s.cursor
                )));
            }
            for (file, r) in &a.chunks {
                let i = *file as usize;
                let Some(size) = self.listing.files.get(i).map(|f| f.1) else {
                    return Err(Error::Protocol(format!(
                        "live chunk for unknown file {file}"
                    )));
                };
                if r.len == 0 || r.len as usize > MAX_CHUNK || s.bytes[i] + r.len as u64 > size {
                    return Err(Error::Protocol(format!(
                        "live chunk {} does not fit file {}",
                        r.id, self.listing.files[i].0
                    )));
                }
                s.bytes[i] += r.len as u64;
                // Exactly sized once a file is listed whole: a growing
                // list starts with room for four (272 bytes), and most
                // files of a big tree are one chunk: 80 MB of lists for
                // 250,000 small files, 17 when sized.
                let whole = s.bytes[i] == size;
                let list = &mut s.chunks[i];
                if whole && list.is_empty() {
                    list.reserve_exact(1);
                }
                list.push(*r);
                if whole {
                    list.shrink_to_fit();
                }
            }
            self.repeats.listed(a.chunks.iter().map(|(_, r)| r));
            s.cursor += a.chunks.len() as u64;
            if s.cursor > MAX_MANIFEST_CHUNKS {
                return Err(Error::Record(format!(
                    "the live listing has over {MAX_MANIFEST_CHUNKS} chunks"
                )));
            }
            match a.end {
                LiveEnd::Running => {}
                LiveEnd::Done => {
                    // Done is final once the whole log was read (an answer
                    // is capped: more may be left to ask for).
                    let complete = self
                        .listing
                        .files
                        .iter()
                        .zip(&s.bytes)
                        .all(|(f, b)| f.1 == *b);
                    if complete {
                        s.end = FeedEnd::Ended;
                        self.repeats.complete();
                    } else if a.chunks.is_empty() {
                        s.end = FeedEnd::Failed(
                            "the publisher's pass ended with files listed in part".into(),
                        );
                    }
                }
                // The publisher's words, never raw (it may be hostile).
                LiveEnd::Failed(m) => {
                    s.end = FeedEnd::Failed(format!(
                        "the publish failed: {}",
                        crate::util::peer_text(m.as_bytes())
                    ))
                }
            }
        }
        self.news.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Chunks of file `file` from position `have` on, and whether its list
    /// is complete; with `wait`, waits until there is something new.
    pub(crate) async fn more(
        &self,
        file: usize,
        have: usize,
        wait: bool,
    ) -> Result<(Vec<ChunkRef>, bool)> {
        let size = self.listing.files.get(file).map(|f| f.1).unwrap_or(0);
        let mut rx = self.news.subscribe();
        loop {
            rx.borrow_and_update();
            {
                let s = self
                    .state
                    .lock()
                    .map_err(|_| Error::Protocol("live feed poisoned".into()))?;
                let list = &s.chunks[file];
                let complete = s.bytes[file] == size;
                let new = list.get(have..).unwrap_or_default().to_vec();
                if !new.is_empty() || complete || !wait {
                    return Ok((new, complete));
                }
                match &s.end {
                    FeedEnd::Running => {}
                    FeedEnd::Failed(m) | FeedEnd::Lost(m) => {
                        return Err(Error::Protocol(m.clone()));
                    }
                    FeedEnd::Ended => {
                        return Err(Error::Protocol(format!(
                            "the publisher's pass ended before {} was listed whole",
                            self.listing.files[file].0
                        )));
                    }
                }
            }
            rx.changed()
                .await
                .map_err(|_| Error::Protocol("live feed closed".into()))?;
        }
    }

    /// Waits for the pass to end: `Err` if it failed.
    pub(crate) async fn ended(&self) -> Result<()> {
        let mut rx = self.news.subscribe();
        loop {
            rx.borrow_and_update();
            match self.state.lock().map(|s| s.end.clone()) {
                Ok(FeedEnd::Running) => {}
                Ok(FeedEnd::Ended) => return Ok(()),
                Ok(FeedEnd::Failed(m) | FeedEnd::Lost(m)) => return Err(Error::Protocol(m)),
                Err(_) => return Err(Error::Protocol("live feed poisoned".into())),
            }
            rx.changed()
                .await
                .map_err(|_| Error::Protocol("live feed closed".into()))?;
        }
    }

    /// Whether following ended because the connection to the publisher
    /// closed (not because of anything it said), readable after the feed
    /// is gone: the fetch drops the feed (its listing and chunk lists)
    /// before it takes the signed manifest, and its caller asks this on a
    /// failure, to follow the pass again.
    pub(crate) fn lost_flag(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.lost.clone()
    }

    /// A digest of the files listed, in order, with the chunks listed
    /// for each (complete once [`LiveFeed::ended`]): equal to
    /// [`files_digest`] of a signed manifest's files exactly when it lists
    /// the same. Taken so the feed can go before the manifest is asked
    /// for: the listing and every chunk list (44 MB for 250,000 files)
    /// held beside the record and the parsed manifest were the follower's
    /// peak.
    pub(crate) fn digest(&self) -> Option<FilesDigest> {
        let s = self.state.lock().ok()?;
        Some(files_digest(
            self.listing
                .files
                .iter()
                .zip(&s.chunks)
                .map(|((p, size, _), c)| (p.as_str(), *size, &c[..])),
        ))
    }
}

/// BLAKE3 of a file list (path, size, chunks), each field framed by its
/// length so that no two lists hash alike unless they are the same.
pub(crate) type FilesDigest = [u8; 32];

/// The [`FilesDigest`] of `files` (a signed manifest's [`Manifest::files`]
/// or a feed's listing).
///
/// [`Manifest::files`]: crate::manifest::Manifest::files
pub(crate) fn files_digest<'a>(
    files: impl Iterator<Item = (&'a str, u64, &'a [ChunkRef])>,
) -> FilesDigest {
    let mut h = blake3::Hasher::new();
    for (path, size, chunks) in files {
        h.update(&(path.len() as u64).to_le_bytes());
        h.update(path.as_bytes());
        h.update(&size.to_le_bytes());
        h.update(&(chunks.len() as u64).to_le_bytes());
        for c in chunks {
            h.update(&c.id.0);
            h.update(&c.key);
            h.update(&c.len.to_le_bytes());
        }
    }
    *h.finalize().as_bytes()
}

/// The same checks as a manifest's (`Manifest::validate`): bounded, safe
/// paths, each once. Nothing is written under a path before this.
fn check_listing(l: &LiveListing) -> Result<()> {
    let n = l.files.len() + l.dirs.len();
    if n > MAX_MANIFEST_ENTRIES {
        return Err(Error::Record(format!(
            "the live listing has {n} entries, over the limit of {MAX_MANIFEST_ENTRIES}"
        )));
    }
    check_tree(
        "the live listing",
        l.files
            .iter()
            .map(|f| (f.0.as_str(), true))
            .chain(l.dirs.iter().map(|d| (d.0.as_str(), false))),
    )?;
    // The sizes are the publisher's word, unsigned until the manifest: no
    // more than a manifest can hold in all, added without wrapping (sizes
    // adding up to 2^64 + 1,000 passed as 1,000 bytes, under every
    // free-space check, and filled the disk).
    let most = MAX_MANIFEST_CHUNKS * MAX_CHUNK as u64;
    let total = l
        .files
        .iter()
        .try_fold(0u64, |sum, f| sum.checked_add(f.1).filter(|t| *t <= most));
    if total.is_none() {
        return Err(Error::Record(format!(
            "the live listing's file sizes add up to more than any share holds \
             ({most} bytes)"
        )));
    }
    Ok(())
}

/// Where the writer takes a file's chunk list from: the manifest (fixed),
/// or a live share's listing that grows while the publisher's pass runs.
pub(crate) enum ChunkSource<'a> {
    /// Every chunk known.
    Fixed(&'a [ChunkRef]),
    /// File `.1` of a live feed.
    Live(&'a LiveFeed, usize),
}

impl ChunkSource<'_> {
    /// Chunks from position `have` on and whether the list is complete;
    /// with `wait`, waits for news when there is none.
    pub(crate) async fn more(&self, have: usize, wait: bool) -> Result<(Vec<ChunkRef>, bool)> {
        match self {
            ChunkSource::Fixed(c) => Ok((c.get(have..).unwrap_or_default().to_vec(), true)),
            ChunkSource::Live(feed, file) => feed.more(*file, have, wait).await,
        }
    }
}

/// Waits out the rest of a second since `asked`: the pace of asks to a
/// publisher whose answers bring nothing new.
pub(crate) async fn pace(asked: std::time::Instant) {
    let gap = std::time::Duration::from_secs(1);
    if let Some(rest) = gap.checked_sub(asked.elapsed()) {
        tokio::time::sleep(rest).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(sizes: &[u64]) -> LiveListing {
        LiveListing {
            files: sizes
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("f{i}"), *s, 0o644))
                .collect(),
            dirs: Vec::new(),
        }
    }

    fn r(n: u8, len: u32) -> ChunkRef {
        ChunkRef {
            id: crate::chunk::ChunkId([n; 32]),
            key: [n; 32],
            len,
        }
    }

    /// The signed manifest must list exactly the files followed, in order,
    /// with the same sizes and chunks: compared by digest, any difference
    /// (a chunk, a path, a size, a file more or fewer, a chunk moved to
    /// the next file) says no.
    #[test]
    fn a_manifest_matches_the_feed_only_when_it_lists_exactly_its_chunks() {
        let first = LiveAnswer {
            seq: 1,
            key_check: [0; 8],
            listing: Some(listing(&[3, 5])),
            from: 0,
            chunks: vec![(0, r(1, 3)), (1, r(2, 2)), (1, r(3, 3))],
            end: LiveEnd::Running,
        };
        let feed = LiveFeed::from_first(first).unwrap();
        let (a, b) = ([r(1, 3)], [r(2, 2), r(3, 3)]);
        let same: Vec<(&str, u64, &[ChunkRef])> = vec![("f0", 3, &a), ("f1", 5, &b)];
        let followed = feed.digest().unwrap();
        assert_eq!(followed, files_digest(same.iter().copied()));
        let other = [r(2, 2), r(4, 3)];
        for bad in [
            vec![("f0", 3, &a[..]), ("f1", 5, &other[..])],
            vec![("f0", 3, &a[..]), ("g1", 5, &b[..])],
            vec![("f0", 4, &a[..]), ("f1", 5, &b[..])],
            vec![("f0", 3, &a[..])],
            vec![("f0", 3, &a[..]), ("f1", 5, &b[..]), ("f2", 0, &[][..])],
            vec![("f0", 3, &[r(1, 3), r(2, 2)][..]), ("f1", 5, &b[1..])],
            vec![("f0f", 3, &a[..]), ("1", 5, &b[..])],
        ] {
            assert_ne!(followed, files_digest(bad.iter().copied()), "{bad:?}");
        }
    }

    /// Whether following was lost (the connection closed) stays known
    /// once the feed is gone (the fetch drops it before it takes the
    /// manifest), and only a lost connection sets it: a publisher's
    /// failure or a clean end do not make the fetch follow again.
    #[test]
    fn a_lost_feed_is_known_after_the_feed_is_gone() {
        let first = || LiveAnswer {
            seq: 1,
            key_check: [0; 8],
            listing: Some(listing(&[3])),
            from: 0,
            chunks: Vec::new(),
            end: LiveEnd::Running,
        };
        let feed = LiveFeed::from_first(first()).unwrap();
        let lost = feed.lost_flag();
        feed.set_end(FeedEnd::Lost("connection closed".into()));
        feed.set_end(FeedEnd::Failed("later words do not count".into()));
        drop(feed);
        assert!(lost.load(std::sync::atomic::Ordering::Relaxed));
        for end in [FeedEnd::Failed("the publish failed".into()), FeedEnd::Ended] {
            let feed = LiveFeed::from_first(first()).unwrap();
            let lost = feed.lost_flag();
            feed.set_end(end);
            drop(feed);
            assert!(!lost.load(std::sync::atomic::Ordering::Relaxed));
        }
    }

    /// A live listing's sizes (the publisher's unsigned word) cannot wrap
    /// around to a small total that passes the free-space checks, nor add
    /// up to more than any share holds.
    #[test]
    fn listed_sizes_that_wrap_or_exceed_any_share_are_refused() {
        check_listing(&listing(&[209_715_200, 0, 5])).unwrap();
        let wraps = listing(&[
            209_715_200,
            9_223_372_036_854_775_807,
            9_223_372_036_645_061_609,
        ]);
        let e = check_listing(&wraps).unwrap_err();
        assert!(matches!(e, Error::Record(_)), "{e}");
        assert!(
            e.to_string()
                .contains("add up to more than any share holds"),
            "{e}"
        );
        let most = MAX_MANIFEST_CHUNKS * MAX_CHUNK as u64;
        check_listing(&listing(&[most])).unwrap();
        assert!(check_listing(&listing(&[most, 1])).is_err());
    }
}
