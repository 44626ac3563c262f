//! A bounded free list: the one shape of every buffer pool in the agent
//! (chunk buffers of the peer channel, staging buffers of direct writes,
//! the publish pass's read blocks).
//!
//! Why pools at all: a fresh allocation of a chunk's or a block's size is
//! fresh pages from the kernel, each faulted in and zeroed as it is first
//! written; reusing buffers took a tenth of a recipient's and of a
//! publisher's CPU away. Why bounded: a pool never holds more than `keep`
//! free buffers, and a pool that is closed (its fetch or pass ended) holds
//! none and takes none back, so an idle agent keeps no buffer memory.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// At most `keep` free values of `T`, handed out and given back.
pub struct FreeList<T> {
    /// The free values; `None` once closed.
    free: Mutex<Option<Vec<T>>>,
    keep: AtomicUsize,
}

impl<T> FreeList<T> {
    /// An open, empty list keeping at most `keep` values.
    pub const fn new(keep: usize) -> FreeList<T> {
        FreeList {
            free: Mutex::new(Some(Vec::new())),
            keep: AtomicUsize::new(keep),
        }
    }

    /// A free value, if one is kept.
    pub fn take(&self) -> Option<T> {
        self.free.lock().ok()?.as_mut()?.pop()
    }

    /// The kept value with the smallest `fit` among those that fit
    /// (`fit` gives `None` for a value that does not): buffers of several
    /// sizes in one list, each request taking the smallest big enough.
    /// A linear scan: a list keeps tens of values, not thousands.
    pub fn take_best<K: Ord>(&self, fit: impl Fn(&T) -> Option<K>) -> Option<T> {
        let mut guard = self.free.lock().ok()?;
        let free = guard.as_mut()?;
        let (at, _) = free
            .iter()
            .enumerate()
            .filter_map(|(i, v)| fit(v).map(|k| (i, k)))
            .min_by(|a, b| a.1.cmp(&b.1))?;
        Some(free.swap_remove(at))
    }

    /// Keeps `value` for reuse while the list is open and has room (the
    /// check and the push happen under one lock, so nothing is kept by a
    /// list closed meanwhile); else it is dropped.
    pub fn give(&self, value: T) {
        if let Ok(mut free) = self.free.lock()
            && let Some(free) = free.as_mut()
            && free.len() < self.keep.load(Ordering::Relaxed)
        {
            free.push(value);
        }
    }

    /// Changes how many values are kept from now on.
    pub fn set_keep(&self, keep: usize) {
        self.keep.store(keep, Ordering::Relaxed);
    }

    /// Frees every kept value; the list stays open.
    pub fn clear(&self) {
        if let Ok(mut free) = self.free.lock()
            && free.is_some()
        {
            *free = Some(Vec::new());
        }
    }

    /// Frees every kept value and keeps none given back later.
    pub fn close(&self) {
        if let Ok(mut free) = self.free.lock() {
            *free = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_at_most_keep_and_nothing_once_closed() {
        let l = FreeList::new(2);
        assert_eq!(l.take(), None::<u32>);
        for v in 0..5 {
            l.give(v);
        }
        assert_eq!((l.take(), l.take(), l.take()), (Some(1), Some(0), None));
        l.set_keep(3);
        for v in 0..5 {
            l.give(v);
        }
        l.clear();
        assert_eq!(l.take(), None);
        l.give(7);
        assert_eq!(l.take(), Some(7));
        l.give(8);
        l.close();
        assert_eq!(l.take(), None);
        l.give(9);
        assert_eq!(l.take(), None, "a closed list took a value back");
    }

    #[test]
    fn take_best_gives_the_smallest_that_fits() {
        let l = FreeList::new(8);
        for v in [5u32, 9, 2, 7] {
            l.give(v);
        }
        let fits = |need: u32| move |v: &u32| (*v >= need).then_some(*v);
        assert_eq!(l.take_best(fits(6)), Some(7));
        assert_eq!(l.take_best(fits(6)), Some(9));
        assert_eq!(l.take_best(fits(6)), None, "nothing kept is big enough");
        assert_eq!(l.take_best(fits(1)), Some(2));
        assert_eq!(l.take_best(fits(1)), Some(5));
        assert_eq!(l.take_best(fits(1)), None);
    }
}
