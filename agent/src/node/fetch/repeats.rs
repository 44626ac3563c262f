//! Chunks a share lists more than once cross the wire once per fetch.
//!
//! Why: identical data encrypts identically within a share (convergent
//! keys), so a run of zeros in a disk image, a sparse file, or the same
//! file copied into several folders lists one chunk id many times. Fetching
//! each listing again pays egress and the publisher's reads for bytes the
//! recipient already verified. Here the first ask of such an id fetches it
//! (asks made meanwhile wait for that one); its verified ciphertext is held
//! while the listing says more asks are to come, and each of them gets a
//! copy. Ids listed once never touch the held set: the common case costs a
//! lookup. What is held is bounded ([`HELD_MAX_BYTES`]); past it a repeat
//! is fetched again, as before.
//!
//! The counts come from what was listed: the whole signed manifest, or the
//! publisher's live listing as it grows (then an id is known to repeat
//! only at its second listing, so a live fetch may fetch a repeated chunk
//! twice, never more while it is held). A held ciphertext
//! is only ever handed out for the same [`ChunkRef`] (id, key, length) it
//! was verified as.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

use crate::chunk::{ChunkId, ChunkRef, Verified};
use crate::error::Result;

/// Ciphertext bytes held for repeats at once, per fetch: sixteen of the
/// largest chunks the chunker cuts, about fifty of average size.
pub(crate) const HELD_MAX_BYTES: usize = 32 << 20;

/// One id listed more than once.
struct Repeat {
    r: ChunkRef,
    listed: u32,
    asked: u32,
    /// The verified ciphertext (or the fetch of it under way), while held.
    held: Option<Arc<OnceCell<Verified>>>,
}

impl Repeat {
    fn uses_left(&self) -> bool {
        self.asked < self.listed
    }
}

#[derive(Default)]
struct Inner {
    /// Ids listed once so far, by a short fingerprint (a collision only
    /// makes an id count as repeated, which costs a held copy, never a
    /// wrong byte: [`Repeat`] is keyed by the whole id), and whether that
    /// one listing was asked for already.
    once: HashMap<u64, bool>,
    repeats: HashMap<ChunkId, Repeat>,
    held_bytes: usize,
    /// No more listings will come: entries with no uses left are dropped.
    complete: bool,
}

/// The repeated chunks of one fetch.
#[derive(Default)]
pub(crate) struct Repeats {
    inner: Mutex<Inner>,
}

fn fingerprint(id: &ChunkId) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&id.0[..8]);
    u64::from_le_bytes(b)
}

impl Repeats {
    /// Counts chunks listed (each listing once: a manifest's files, or a
    /// live listing's new entries).
    pub(crate) fn listed<'a>(&self, chunks: impl IntoIterator<Item = &'a ChunkRef>) {
        let Ok(mut i) = self.inner.lock() else {
            return;
        };
        for c in chunks {
            if let Some(rep) = i.repeats.get_mut(&c.id) {
                rep.listed = rep.listed.saturating_add(1);
            } else if let Some(asked) = i.once.get(&fingerprint(&c.id)).copied() {
                i.repeats.insert(
                    c.id,
                    Repeat {
                        r: *c,
                        listed: 2,
                        asked: asked as u32,
                        held: None,
                    },
                );
            } else {
                i.once.insert(fingerprint(&c.id), false);
            }
        }
    }

    /// The repeats of a whole listing (a signed manifest), complete: found
    /// by sorting short fingerprints (8 bytes per chunk for the moment),
    /// so a manifest of distinct chunks costs no table of them.
    pub(crate) fn of_whole<'a, I>(chunks: impl Fn() -> I) -> Repeats
    where
        I: Iterator<Item = &'a ChunkRef>,
    {
        let mut fps: Vec<u64> = chunks().map(|c| fingerprint(&c.id)).collect();
        fps.sort_unstable();
        let twice: std::collections::HashSet<u64> = fps
            .windows(2)
            .filter(|w| w[0] == w[1])
            .map(|w| w[0])
            .collect();
        drop(fps);
        let mut repeats: HashMap<ChunkId, Repeat> = HashMap::new();
        for c in chunks().filter(|c| twice.contains(&fingerprint(&c.id))) {
            repeats
                .entry(c.id)
                .and_modify(|rep| rep.listed = rep.listed.saturating_add(1))
                .or_insert(Repeat {
                    r: *c,
                    listed: 1,
                    asked: 0,
                    held: None,
                });
        }
        // Fingerprints shared by distinct ids: each listed once.
        repeats.retain(|_, rep| rep.listed > 1);
        Repeats {
            inner: Mutex::new(Inner {
                repeats,
                complete: true,
                ..Inner::default()
            }),
        }
    }

    /// Nothing more will be listed: what has no use left is let go, and
    /// the ids listed once are forgotten.
    pub(crate) fn complete(&self) {
        let Ok(mut i) = self.inner.lock() else {
            return;
        };
        i.complete = true;
        i.once = HashMap::new();
        let mut freed = 0;
        i.repeats.retain(|_, rep| {
            let keep = rep.uses_left();
            if !keep && rep.held.is_some() {
                freed += rep.r.len as usize;
            }
            keep
        });
        i.held_bytes -= freed;
    }

    /// Ciphertext bytes held now.
    #[cfg(test)]
    fn held_bytes(&self) -> usize {
        self.inner.lock().map(|i| i.held_bytes).unwrap_or(0)
    }

    /// Chunk `r`, verified: a copy of the held one when it repeats and was
    /// fetched already (or is being fetched: then after that fetch), else
    /// `fetch()`. The second value says whether it was a copy.
    pub(crate) async fn get<F, Fut>(&self, r: ChunkRef, fetch: F) -> Result<(Verified, bool)>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Verified>>,
    {
        let Some(cell) = self.cell_for(&r) else {
            return Ok((fetch().await?, false));
        };
        let mut fetched = false;
        let v = cell
            .get_or_try_init(|| {
                fetched = true;
                fetch()
            })
            .await?;
        Ok((v.duplicate(), !fetched))
    }

    /// The cell of `r` when it repeats and is (or may now be) held; counts
    /// the ask.
    fn cell_for(&self, r: &ChunkRef) -> Option<Arc<OnceCell<Verified>>> {
        let mut i = self.inner.lock().ok()?;
        let i = &mut *i;
        let Some(rep) = i.repeats.get_mut(&r.id) else {
            if !i.complete
                && let Some(asked) = i.once.get_mut(&fingerprint(&r.id))
            {
                *asked = true;
            }
            return None;
        };
        if rep.r != *r {
            return None;
        }
        rep.asked = rep.asked.saturating_add(1);
        let left = rep.uses_left();
        if let Some(cell) = &rep.held {
            let cell = cell.clone();
            if !left && i.complete {
                i.repeats.remove(&r.id);
                i.held_bytes -= r.len as usize;
            }
            return Some(cell);
        }
        // Once the listing is whole, an id with no use left is not held;
        // while it grows, a repeated id is held on the bet that it repeats
        // again (the recipient often asks as soon as the publisher lists),
        // and is let go at the end or when room is needed.
        if !left && i.complete {
            return None;
        }
        let len = r.len as usize;
        if i.held_bytes + len > HELD_MAX_BYTES {
            // Make room: let go of what no listing still asks for.
            let mut freed = 0;
            for rep in i.repeats.values_mut() {
                if !rep.uses_left() && rep.held.take().is_some() {
                    freed += rep.r.len as usize;
                }
            }
            i.held_bytes -= freed;
            if i.held_bytes + len > HELD_MAX_BYTES {
                return None;
            }
        }
        let cell = Arc::new(OnceCell::new());
        if let Some(rep) = i.repeats.get_mut(&r.id) {
            rep.held = Some(cell.clone());
        }
        i.held_bytes += len;
        Some(cell)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{ChunkKeyer, verify};
    use crate::crypto::Key;
    use crate::error::Error;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn sealed(data: &[u8]) -> (ChunkRef, Vec<u8>) {
        ChunkKeyer::new(&Key([3; 32])).seal(data).unwrap()
    }

    async fn get(rep: &Repeats, r: ChunkRef, ct: &[u8], calls: &AtomicUsize) -> (Verified, bool) {
        rep.get(r, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            verify(&r, ct.to_vec())
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_chunk_listed_many_times_is_fetched_once_and_let_go_after_its_last_use() {
        let (a, ca) = sealed(&[0u8; 5000]);
        let (b, cb) = sealed(b"listed once");
        let rep = Repeats::of_whole(|| [&a, &b, &a, &a].into_iter());
        let calls = AtomicUsize::new(0);
        let (v, copy) = get(&rep, a, &ca, &calls).await;
        assert!(!copy);
        assert_eq!(v.open().unwrap(), vec![0u8; 5000]);
        assert_eq!(rep.held_bytes(), 5000);
        assert!(!get(&rep, b, &cb, &calls).await.1);
        for _ in 0..2 {
            let (v, copy) = get(&rep, a, &ca, &calls).await;
            assert!(copy);
            assert_eq!(v.open().unwrap(), vec![0u8; 5000]);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2, "a once, b once");
        assert_eq!(rep.held_bytes(), 0, "the last use let it go");
        // An ask past what was listed fetches again.
        assert!(!get(&rep, a, &ca, &calls).await.1);
    }

    #[tokio::test]
    async fn asks_made_while_the_first_is_in_flight_wait_for_it() {
        let (a, ca) = sealed(&[1u8; 3000]);
        let rep = Repeats::of_whole(|| std::iter::repeat_n(&a, 8));
        let calls = AtomicUsize::new(0);
        let asks = (0..8).map(|_| get(&rep, a, &ca, &calls));
        let got = futures::future::join_all(asks).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(got.iter().filter(|(_, copy)| *copy).count(), 7);
        assert_eq!(rep.held_bytes(), 0);
    }

    #[tokio::test]
    async fn a_failed_fetch_is_tried_again_by_the_next_ask() {
        let (a, ca) = sealed(&[2u8; 100]);
        let rep = Repeats::of_whole(|| [&a, &a].into_iter());
        let failed = rep
            .get(a, || async { Err(Error::Protocol("peer gone".into())) })
            .await;
        assert!(failed.is_err());
        let calls = AtomicUsize::new(0);
        let (v, copy) = get(&rep, a, &ca, &calls).await;
        assert!(!copy);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(v.open().unwrap(), vec![2u8; 100]);
    }

    #[tokio::test]
    async fn the_same_id_under_another_key_or_length_is_never_handed_out() {
        let (a, ca) = sealed(&[4u8; 64]);
        let mut forged = a;
        forged.key = [9; 32];
        let rep = Repeats::of_whole(|| [&a, &forged, &a].into_iter());
        let calls = AtomicUsize::new(0);
        get(&rep, a, &ca, &calls).await;
        let (_, copy) = get(&rep, forged, &ca, &calls).await;
        assert!(!copy, "a listing under another key is fetched on its own");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn what_is_held_stays_within_its_bound() {
        // Distinct chunks, each listed twice, all asked once first: the
        // held set fills to its bound, the rest are fetched twice.
        let size = 4 << 20;
        let chunks: Vec<_> = (0..12u8).map(|n| sealed(&vec![n; size])).collect();
        let rep = Repeats::of_whole(|| chunks.iter().chain(&chunks).map(|(r, _)| r));
        let calls = AtomicUsize::new(0);
        for (r, ct) in &chunks {
            get(&rep, *r, ct, &calls).await;
            assert!(rep.held_bytes() <= HELD_MAX_BYTES);
        }
        assert_eq!(rep.held_bytes(), HELD_MAX_BYTES / size * size);
        let mut copies = 0;
        for (r, ct) in &chunks {
            copies += get(&rep, *r, ct, &calls).await.1 as usize;
        }
        assert_eq!(copies, HELD_MAX_BYTES / size);
        assert_eq!(calls.load(Ordering::SeqCst), 24 - copies);
        assert_eq!(rep.held_bytes(), 0);
    }

    #[test]
    fn a_whole_listing_counts_as_one_listed_piece_by_piece() {
        let chunks: Vec<_> = (0..40u8).map(|n| sealed(&[n % 7; 10]).0).collect();
        let whole = Repeats::of_whole(|| chunks.iter());
        let grown = Repeats::default();
        for c in &chunks {
            grown.listed([c]);
        }
        grown.complete();
        let counts = |r: &Repeats| {
            let i = r.inner.lock().unwrap();
            let mut v: Vec<_> = i
                .repeats
                .iter()
                .map(|(id, rep)| (*id, rep.listed))
                .collect();
            v.sort();
            v
        };
        assert_eq!(counts(&whole).len(), 7);
        assert_eq!(counts(&whole), counts(&grown));
    }

    #[tokio::test]
    async fn a_growing_listing_holds_a_chunk_from_its_second_listing_on() {
        let (a, ca) = sealed(&[5u8; 700]);
        let rep = Repeats::default();
        let calls = AtomicUsize::new(0);
        rep.listed([&a]);
        assert!(!get(&rep, a, &ca, &calls).await.1);
        rep.listed([&a]);
        assert!(
            !get(&rep, a, &ca, &calls).await.1,
            "not known to repeat when first asked"
        );
        for _ in 0..5 {
            rep.listed([&a]);
            assert!(get(&rep, a, &ca, &calls).await.1);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        rep.complete();
        assert_eq!(rep.held_bytes(), 0);
    }
}
