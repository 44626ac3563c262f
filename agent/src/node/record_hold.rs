//! Where a held share's signed manifest record is: in memory while it is
//! small or not saved yet, else in the share's state (its `manifest`
//! file) with its length and hash, read back when a peer asks for it.
//!
//! Why: the record is about 100 bytes a file (25 MB for 250,000 files),
//! and it is needed only to answer a peer that asks for the manifest (a
//! recipient without it, a fetch of the held version again, an offline
//! seed index). Kept in memory beside the decoded manifest and the chunk
//! index it was a fifth of a fetch's peak and a quarter of an idle
//! agent's memory holding such a share. A record of at most
//! [`IN_MEMORY_MAX`] stays in memory: most shares, and no storage read
//! per ask.
//!
//! A record read back is checked against its length and BLAKE3 hash, so a
//! file replaced meanwhile (a newer version saved over it) is an error, not
//! another version's bytes; and the bytes read are shared by every answer
//! sent while one still holds them, so peers asking at once cause one read
//! and one copy in memory, not one each.

use std::sync::{Arc, Mutex, RwLock, Weak};

use bytes::Bytes;
use opendal::Operator;

use crate::error::{Context, Error, Result};

/// Largest record kept in memory once saved (1 MiB: about 10,000 files).
pub(crate) const IN_MEMORY_MAX: usize = 1 << 20;

enum Hold {
    /// A share built before its record was signed (a publish pass).
    Unset,
    Memory(Bytes),
    Saved {
        len: usize,
        hash: [u8; 32],
    },
}

/// A record read back, shared by the answers that hold it.
struct Shared(Arc<Bytes>);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// The signed record of one held share (see the module doc).
pub(crate) struct RecordHold {
    hold: RwLock<Hold>,
    /// The bytes last read back, while an answer still holds them.
    read_back: Mutex<Weak<Bytes>>,
}

impl std::fmt::Debug for RecordHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.hold.read().as_deref() {
            Ok(Hold::Memory(b)) => write!(f, "RecordHold(in memory, {} bytes)", b.len()),
            Ok(Hold::Saved { len, .. }) => write!(f, "RecordHold(saved, {len} bytes)"),
            _ => write!(f, "RecordHold(unset)"),
        }
    }
}

impl RecordHold {
    /// Holding `record` in memory (nothing when it is empty).
    pub(crate) fn new(record: Bytes) -> RecordHold {
        let hold = if record.is_empty() {
            Hold::Unset
        } else {
            Hold::Memory(record)
        };
        RecordHold {
            hold: RwLock::new(hold),
            read_back: Mutex::new(Weak::new()),
        }
    }

    /// Sets the record of a share built without one; false when it has one.
    pub(crate) fn set(&self, record: Bytes) -> bool {
        match self.hold.write() {
            Ok(mut h) if matches!(*h, Hold::Unset) => {
                *h = Hold::Memory(record);
                true
            }
            _ => false,
        }
    }

    /// Whether the share has its record.
    pub(crate) fn is_set(&self) -> bool {
        self.hold.read().is_ok_and(|h| !matches!(*h, Hold::Unset))
    }

    /// The record, when it is in memory (always before it is saved).
    pub(crate) fn in_memory(&self) -> Option<Bytes> {
        match &*self.hold.read().ok()? {
            Hold::Memory(b) => Some(b.clone()),
            _ => None,
        }
    }

    /// The record is saved in the share's state: a large one is let go
    /// of, and read back from there when asked for.
    pub(crate) fn saved(&self) {
        if let Ok(mut h) = self.hold.write()
            && let Hold::Memory(b) = &*h
            && b.len() > IN_MEMORY_MAX
        {
            *h = Hold::Saved {
                len: b.len(),
                hash: *blake3::hash(b).as_bytes(),
            };
        }
    }

    /// Whether `other` is exactly the record.
    pub(crate) fn is(&self, other: &[u8]) -> bool {
        match self.hold.read().as_deref() {
            Ok(Hold::Memory(b)) => b.as_ref() == other,
            Ok(Hold::Saved { len, hash }) => {
                *len == other.len() && blake3::hash(other).as_bytes() == hash
            }
            _ => false,
        }
    }

    /// The record's bytes; read back from `path` in `op` when it is not
    /// in memory (empty while unset).
    pub(crate) async fn get(&self, op: &Operator, path: &str) -> Result<Bytes> {
        let (len, hash) = match self.hold.read().as_deref() {
            Ok(Hold::Memory(b)) => return Ok(b.clone()),
            Ok(Hold::Saved { len, hash }) => (*len, *hash),
            _ => return Ok(Bytes::new()),
        };
        if let Some(held) = self.read_back.lock().ok().and_then(|w| w.upgrade()) {
            return Ok(Bytes::from_owner(Shared(held)));
        }
        // Read into one buffer of the record's size, piece by piece: the
        // storage's own buffers go as each piece lands, so a read costs one
        // copy of the record in memory, as holding it did, not two.
        let mut bytes = Vec::with_capacity(len);
        crate::store::read_into(op, path, 0..len as u64, &mut bytes)
            .await
            .context(|| format!("reading the saved manifest record {path}"))?;
        if bytes.len() != len || blake3::hash(&bytes).as_bytes() != &hash {
            return Err(Error::Protocol(format!(
                "the saved manifest record {path} is not the share's any more (a newer version saved over it?): ask again"
            )));
        }
        let held = Arc::new(Bytes::from(bytes));
        if let Ok(mut w) = self.read_back.lock() {
            *w = Arc::downgrade(&held);
        }
        Ok(Bytes::from_owner(Shared(held)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A large record goes once saved and comes back from storage checked:
    /// one read shared while it is held, and a file saved over is an
    /// error, never the other bytes. A small one stays in memory.
    #[tokio::test]
    async fn a_large_record_is_read_back_checked_and_shared() {
        let tmp = tempfile::tempdir().unwrap();
        let op = crate::store::open_local(tmp.path()).unwrap();
        let big: Vec<u8> = (0..IN_MEMORY_MAX + 10).map(|i| i as u8).collect();
        op.write("m", big.clone()).await.unwrap();
        let r = RecordHold::new(Bytes::from(big.clone()));
        r.saved();
        assert!(r.in_memory().is_none() && r.is_set());
        assert!(r.is(&big) && !r.is(&big[1..]));
        let a = r.get(&op, "m").await.unwrap();
        assert_eq!(a.as_ref(), &big[..]);
        let b = r.get(&op, "m").await.unwrap();
        assert_eq!(a.as_ptr(), b.as_ptr(), "one read while it is held");
        drop((a, b));
        let mut other = big.clone();
        other[7] ^= 1;
        op.write("m", other).await.unwrap();
        assert!(
            r.get(&op, "m").await.is_err(),
            "another record saved over it"
        );

        let small = RecordHold::new(Bytes::from_static(b"small"));
        small.saved();
        assert_eq!(small.in_memory().as_deref(), Some(&b"small"[..]));
        assert!(!RecordHold::new(Bytes::new()).is_set());
        let unset = RecordHold::new(Bytes::new());
        assert!(unset.set(Bytes::from_static(b"x")) && !unset.set(Bytes::from_static(b"y")));
    }
}
