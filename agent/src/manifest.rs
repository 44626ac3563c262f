//! Shares, manifests and tickets.
//!
//! A manifest lists a share's files (size, mode, chunks) and empty
//! directories. It travels encrypted under the share key and signed by the
//! publisher; a new version is a new manifest with a higher sequence number.
//! A ticket is what a recipient needs to fetch: the share id, the publisher,
//! the share key wrapped for that recipient, and where to look.

use serde::{Deserialize, Serialize};

use crate::chunk::ChunkRef;
use crate::crypto::{Key, random_bytes};
use crate::error::{Error, Result};
use crate::identity::{AgentId, SecretKey};
use crate::record::{Kind, Record, SignedRecord};

pub use crate::ticket::{ShareId, TICKET_PREFIX, Ticket};

/// Most entries (files and directories) one manifest may list.
pub const MAX_MANIFEST_ENTRIES: usize = 1 << 20;
/// Most chunks one manifest may list (4 TiB at the average chunk size).
pub const MAX_MANIFEST_CHUNKS: u64 = 1 << 22;

/// Who may receive a share.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    /// Agents named explicitly.
    pub agents: Vec<AgentId>,
    /// Also every agent the publisher trusts within this many hops.
    pub trust_depth: Option<u8>,
}

impl Access {
    /// True when `who` is named explicitly.
    pub fn names(&self, who: &AgentId) -> bool {
        self.agents.contains(who)
    }

    /// What `next` takes away from this access: the agents named here and
    /// not there, and whether it trusts fewer hops (or none). Anyone it
    /// takes away still holds this version's key.
    pub fn narrowed_by(&self, next: &Access) -> (Vec<AgentId>, bool) {
        let removed = self
            .agents
            .iter()
            .filter(|a| !next.names(a))
            .copied()
            .collect();
        let fewer_hops = match (self.trust_depth, next.trust_depth) {
            (Some(was), Some(now)) => now < was,
            (Some(_), None) => true,
            (None, _) => false,
        };
        (removed, fewer_hops)
    }
}

/// One entry of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative path with `/` separators; validated by [`check_path`].
    pub path: String,
    /// Unix permission bits (informational on object stores).
    pub mode: u32,
    /// File or directory.
    pub kind: EntryKind,
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file: its size and chunks in order.
    File {
        /// Total size in bytes.
        size: u64,
        /// Chunks in file order.
        chunks: Vec<ChunkRef>,
    },
    /// A directory (listed so empty directories survive the trip).
    Dir,
}

/// The plaintext content of one share version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The share this version belongs to.
    pub share_id: ShareId,
    /// Version number; higher wins.
    pub seq: u64,
    /// Unix seconds at publication.
    pub created_at: u64,
    /// Who may fetch it.
    pub access: Access,
    /// Files and directories, sorted by path.
    pub entries: Vec<Entry>,
}

impl Manifest {
    /// Total bytes of all files.
    pub fn total_bytes(&self) -> u64 {
        self.files().map(|(_, size, _)| size).sum()
    }

    /// Total chunks of all files.
    pub fn total_chunks(&self) -> u64 {
        self.files().map(|(_, _, c)| c.len() as u64).sum()
    }

    /// Iterates over files as (path, size, chunks).
    pub fn files(&self) -> impl Iterator<Item = (&str, u64, &[ChunkRef])> {
        self.entries.iter().filter_map(|e| match &e.kind {
            EntryKind::File { size, chunks } => Some((e.path.as_str(), *size, chunks.as_slice())),
            EntryKind::Dir => None,
        })
    }

    /// Whether `path` is a file of this manifest (entries are sorted by
    /// path: [`Manifest::validate`]).
    pub fn lists_file(&self, path: &str) -> bool {
        self.entries
            .binary_search_by(|e| e.path.as_str().cmp(path))
            .is_ok_and(|i| matches!(self.entries[i].kind, EntryKind::File { .. }))
    }

    /// Whether `folder` is an entry of this manifest or holds one.
    pub fn lists_or_holds(&self, folder: &str) -> bool {
        if self
            .entries
            .binary_search_by(|e| e.path.as_str().cmp(folder))
            .is_ok()
        {
            return true;
        }
        // Every path under `folder/` sorts at or after `folder/`, together.
        let under = format!("{folder}/");
        let at = self
            .entries
            .partition_point(|e| e.path.as_str() < under.as_str());
        self.entries
            .get(at)
            .is_some_and(|e| e.path.starts_with(under.as_str()))
    }

    /// Rejects paths that could escape the destination, entries out of
    /// order (a publisher sorts them by path; lookups rely on it), and
    /// sizes that do not add up, before anything is written.
    pub fn validate(&self) -> Result<()> {
        if self.entries.len() > MAX_MANIFEST_ENTRIES {
            return Err(Error::Record(format!(
                "manifest lists {} entries, over the limit of {MAX_MANIFEST_ENTRIES}",
                self.entries.len()
            )));
        }
        let chunks = self.total_chunks();
        if chunks > MAX_MANIFEST_CHUNKS {
            return Err(Error::Record(format!(
                "manifest lists {chunks} chunks, over the limit of {MAX_MANIFEST_CHUNKS}"
            )));
        }
        // Sorted strictly first: a path listed twice is then two
        // neighbours, and what lies under a file is found by a binary
        // search of the entries themselves, with `check_tree`'s rules and
        // words but not its set of every path (10 MB for 250,000 paths, at
        // a recipient's peak: when the manifest has just arrived).
        if let Some(w) = self.entries.windows(2).find(|w| w[0].path >= w[1].path) {
            return Err(Error::Record(if w[0].path == w[1].path {
                format!("manifest lists {:?} twice", w[0].path)
            } else {
                format!(
                    "manifest lists {:?} after {:?}: entries are sorted by path",
                    w[1].path, w[0].path
                )
            }));
        }
        for e in &self.entries {
            check_path(&e.path)?;
        }
        let mut under = String::new();
        for (f, _, _) in self.files() {
            under.clear();
            under.push_str(f);
            under.push('/');
            let at = self
                .entries
                .partition_point(|e| e.path.as_str() < under.as_str());
            if let Some(e) = self.entries.get(at)
                && e.path.starts_with(under.as_str())
            {
                return Err(Error::Record(format!(
                    "manifest lists {:?} inside {f:?}, which it lists as a file",
                    e.path
                )));
            }
        }
        for e in &self.entries {
            if let EntryKind::File { size, chunks } = &e.kind {
                if let Some(c) = chunks
                    .iter()
                    .find(|c| c.len == 0 || c.len as usize > crate::chunk::MAX_CHUNK)
                {
                    return Err(Error::Record(format!(
                        "{:?}: a chunk of {} bytes (chunks are 1 to {} bytes)",
                        e.path,
                        c.len,
                        crate::chunk::MAX_CHUNK
                    )));
                }
                let sum: u64 = chunks.iter().map(|c| c.len as u64).sum();
                if sum != *size {
                    return Err(Error::Record(format!(
                        "{:?}: chunks add up to {sum} bytes, size says {size}",
                        e.path
                    )));
                }
            }
        }
        Ok(())
    }

    /// Encrypts and signs this manifest: encoded once, straight into the
    /// signed record's buffer (sized once), and encrypted there.
    pub fn seal(&self, publisher: &SecretKey, share_key: &Key) -> Result<SignedRecord> {
        let size = postcard::experimental::serialized_size(self)
            .map_err(|e| Error::Record(e.to_string()))?;
        let nonce: [u8; 12] = random_bytes()?;
        let head = ManifestRecord {
            share_id: self.share_id,
            seq: self.seq,
            key_check: key_check(share_key),
            nonce,
            ciphertext: Vec::new(),
        };
        let tail = size + crate::crypto::TAG_LEN;
        SignedRecord::seal_with_tail(publisher, &head, tail, |buf| {
            let at = buf.len();
            *buf = postcard::to_extend(self, std::mem::take(buf))
                .map_err(|e| Error::Record(e.to_string()))?;
            let tag = manifest_key(share_key).seal_detached(
                nonce,
                &manifest_aad(&self.share_id, self.seq),
                &mut buf[at..],
            )?;
            buf.extend_from_slice(&tag);
            Ok(())
        })
    }
}

fn manifest_key(share_key: &Key) -> Key {
    share_key.derive("caravan 2026 manifest key v1")
}

fn manifest_aad(share_id: &ShareId, seq: u64) -> Vec<u8> {
    let mut aad = b"caravan manifest v1".to_vec();
    aad.extend_from_slice(&share_id.0);
    aad.extend_from_slice(&seq.to_be_bytes());
    aad
}

/// A short fingerprint of a share key, so a holder of an old key learns it
/// needs a new one instead of seeing a decryption failure.
pub fn key_check(share_key: &Key) -> [u8; 8] {
    let d = share_key.derive("caravan 2026 key check v1");
    let mut out = [0u8; 8];
    out.copy_from_slice(&d.0[..8]);
    out
}

/// The signed, encrypted form of a manifest; what peers exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRecord {
    /// The share (in clear so holders can index it).
    pub share_id: ShareId,
    /// The version (in clear so peers can compare versions).
    pub seq: u64,
    /// Which key it is encrypted under.
    pub key_check: [u8; 8],
    /// AEAD nonce.
    pub nonce: [u8; 12],
    /// The encrypted [`Manifest`].
    pub ciphertext: Vec<u8>,
}

impl Record for ManifestRecord {
    const KIND: Kind = Kind::Manifest;
}

impl ManifestRecord {
    /// Decrypts and validates; the caller has checked the signer.
    pub fn open(&self, share_key: &Key) -> Result<Manifest> {
        self.clone().into_manifest(share_key)
    }

    /// [`ManifestRecord::open`], decrypting in place: a big manifest is not
    /// held twice (a fetch's peak memory is at its start, with the
    /// manifest's record, plaintext and decoded entries all in memory).
    pub fn into_manifest(self, share_key: &Key) -> Result<Manifest> {
        check_key(&self.key_check, share_key)?;
        let mut buf = self.ciphertext;
        manifest_key(share_key).open(
            self.nonce,
            &manifest_aad(&self.share_id, self.seq),
            &mut buf,
        )?;
        decode_manifest(&buf, &self.share_id, self.seq)
    }
}

fn check_key(check: &[u8; 8], share_key: &Key) -> Result<()> {
    if *check != key_check(share_key) {
        return Err(Error::Crypto(
            "manifest is encrypted under a different share key",
        ));
    }
    Ok(())
}

/// Decodes and validates a manifest's plaintext, which must be the
/// version its record says.
fn decode_manifest(plain: &[u8], share_id: &ShareId, seq: u64) -> Result<Manifest> {
    let m: Manifest =
        postcard::from_bytes(plain).map_err(|e| Error::Record(format!("manifest body: {e}")))?;
    if m.share_id != *share_id || m.seq != seq {
        return Err(Error::Record(
            "manifest header does not match its content".into(),
        ));
    }
    m.validate()?;
    Ok(m)
}

/// [`ManifestRecord`] with its ciphertext borrowed from the record's
/// bytes: the same encoding (postcard writes a byte slice and a byte
/// vector alike).
#[derive(Serialize, Deserialize)]
struct ManifestRecordRef<'a> {
    share_id: ShareId,
    seq: u64,
    key_check: [u8; 8],
    nonce: [u8; 12],
    #[serde(borrow)]
    ciphertext: &'a [u8],
}

/// A manifest record checked where it lies: its clear fields, and where
/// its ciphertext is in the record's bytes. What a fetch keeps of each
/// peer's answer while it picks the newest, and opens the chosen one with
/// ([`ManifestHead::manifest_in`]): no copy of a record of tens of MiB is
/// made to verify, decode or decrypt it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestHead {
    /// The share.
    pub share_id: ShareId,
    /// The version.
    pub seq: u64,
    /// Which key it is encrypted under.
    pub key_check: [u8; 8],
    nonce: [u8; 12],
    ciphertext: std::ops::Range<usize>,
}

impl ManifestHead {
    /// Verifies `record` (signed by `publisher` when given) and reads its
    /// clear fields.
    pub fn open(record: &[u8], publisher: Option<&AgentId>) -> Result<ManifestHead> {
        let (_, r): (_, ManifestRecordRef<'_>) =
            SignedRecord::open_borrowed(record, Kind::Manifest, publisher)?;
        // Where the borrowed ciphertext starts in `record`.
        let start = (r.ciphertext.as_ptr() as usize).wrapping_sub(record.as_ptr() as usize);
        let ciphertext = start..start + r.ciphertext.len();
        let found = record
            .get(ciphertext.clone())
            .map(|c| (c.as_ptr(), c.len()));
        if found != Some((r.ciphertext.as_ptr(), r.ciphertext.len())) {
            return Err(Error::Record("manifest ciphertext out of place".into()));
        }
        Ok(ManifestHead {
            share_id: r.share_id,
            seq: r.seq,
            key_check: r.key_check,
            nonce: r.nonce,
            ciphertext,
        })
    }

    /// The manifest, decrypted in place in `record` (the bytes given to
    /// [`ManifestHead::open`]), decoded and validated, then encrypted back:
    /// the same key, nonce and plaintext give the same ciphertext and tag
    /// (AES-GCM is deterministic; checked), so `record` is as it was and
    /// nothing new is ever encrypted under this nonce. The record is held
    /// by the caller alone meanwhile; after an error its bytes are not to
    /// be used. A fetch of 250,000 files held the record, a copy of its
    /// ciphertext decrypted, and the decoded manifest at once: 24 MiB
    /// more at its peak.
    pub fn manifest_in(&self, record: &mut [u8], share_key: &Key) -> Result<Manifest> {
        check_key(&self.key_check, share_key)?;
        let region = record
            .get_mut(self.ciphertext.clone())
            .ok_or_else(|| Error::Record("manifest ciphertext out of place".into()))?;
        let Some(n) = region.len().checked_sub(crate::crypto::TAG_LEN) else {
            return Err(Error::Crypto("manifest ciphertext shorter than its tag"));
        };
        let mut tag = [0u8; crate::crypto::TAG_LEN];
        tag.copy_from_slice(&region[n..]);
        let key = manifest_key(share_key);
        let aad = manifest_aad(&self.share_id, self.seq);
        key.open_in_slice(self.nonce, &aad, region)?;
        let decoded = decode_manifest(&region[..n], &self.share_id, self.seq);
        let again = key.seal_detached(self.nonce, &aad, &mut region[..n])?;
        region[n..].copy_from_slice(&again);
        if again != tag {
            return Err(Error::Crypto("manifest encrypted back differs"));
        }
        decoded
    }
}

/// Checks the paths of a listing (a manifest's, or a live share's) as a
/// tree a destination can hold: each path safe ([`check_path`]), listed
/// once, and none inside another that is listed as a file (`a` a file and
/// `a/b` anything). A hostile publisher's listing is refused here, before
/// anything is written, instead of failing halfway through the writes.
/// `what` names the listing in the error; `entries` gives each path and
/// whether it is a file.
pub fn check_tree<'a>(what: &str, entries: impl Iterator<Item = (&'a str, bool)>) -> Result<()> {
    // A sorted set finds what lies under a file with one range lookup per
    // file: comparing paths costs their common prefix at most, where
    // looking up every ancestor of every path would cost the square of a
    // path's length (a hostile manifest of deep 4 KiB paths: minutes of CPU).
    let mut all = std::collections::BTreeSet::new();
    let mut files = Vec::new();
    for (p, is_file) in entries {
        check_path(p)?;
        if !all.insert(p) {
            return Err(Error::Record(format!("{what} lists {p:?} twice")));
        }
        if is_file {
            files.push(p);
        }
    }
    let mut under = String::new();
    for f in files {
        under.clear();
        under.push_str(f);
        under.push('/');
        if let Some(p) = all.range(under.as_str()..).next()
            && p.starts_with(under.as_str())
        {
            return Err(Error::Record(format!(
                "{what} lists {p:?} inside {f:?}, which it lists as a file"
            )));
        }
    }
    Ok(())
}

/// The longest name (one path component) a share carries, in bytes: what
/// Linux filesystems (`NAME_MAX`) and most others hold. An object store
/// takes longer ones (a key's segments are not names there), so a
/// publisher on one leaves them out, rather than every recipient on a disk
/// failing on them halfway through its fetch.
pub const MAX_NAME_BYTES: usize = 255;

/// Checks a manifest path: relative, `/`-separated, no `.`/`..`/empty parts,
/// no part longer than [`MAX_NAME_BYTES`] or beginning or ending with
/// whitespace (object stores' clients trim it), no backslashes, NULs or other
/// control characters (names a terminal or a log would act on), not inside
/// the agent's state prefix.
pub fn check_path(p: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::Record(format!(
            "unsafe path {p:?} in manifest: {why}"
        )))
    };
    if p.is_empty() || p.len() > 4096 {
        return bad("empty or too long");
    }
    if p.starts_with('/') || p.contains('\\') {
        return bad("absolute or backslash");
    }
    if p.chars().any(char::is_control) {
        return bad("control character");
    }
    for part in p.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return bad("empty, `.` or `..` component");
        }
        if part.len() > MAX_NAME_BYTES {
            return bad("a name longer than 255 bytes");
        }
        // Object-store clients (OpenDAL) trim whitespace off a whole path:
        // `f ` or `f\u{a0}` would read or write the object `f`.
        if part.trim() != part {
            return bad("a name beginning or ending with whitespace");
        }
    }
    if p == ".caravan" || p.starts_with(".caravan/") {
        return bad("inside the agent's state directory");
    }
    Ok(())
}

/// The share key handed to one requester by the publisher, on request
/// (after the publisher checked the requester is allowed, every time).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRelease {
    /// The share.
    pub share_id: ShareId,
    /// Who may unwrap it.
    pub recipient: AgentId,
    /// The version whose key this is.
    pub seq: u64,
    /// The key, wrapped for `recipient`.
    pub wrapped_key: Vec<u8>,
}

impl Record for KeyRelease {
    const KIND: Kind = Kind::KeyRelease;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkKeyer;
    use proptest::prelude::*;

    fn sample(share_id: ShareId, keyer: &ChunkKeyer) -> Manifest {
        let (r, _) = keyer.seal(b"hello").unwrap();
        Manifest {
            share_id,
            seq: 3,
            created_at: 1,
            access: Access::default(),
            entries: vec![
                Entry {
                    path: "dir/empty".into(),
                    mode: 0o755,
                    kind: EntryKind::Dir,
                },
                Entry {
                    path: "empty.txt".into(),
                    mode: 0o644,
                    kind: EntryKind::File {
                        size: 0,
                        chunks: vec![],
                    },
                },
                Entry {
                    path: "naïve/日本語.txt".into(),
                    mode: 0o600,
                    kind: EntryKind::File {
                        size: 5,
                        chunks: vec![r],
                    },
                },
            ],
        }
    }

    #[test]
    fn manifest_seal_open_roundtrip() {
        let k = SecretKey::generate().unwrap();
        let key = Key::random().unwrap();
        let m = sample(ShareId::random().unwrap(), &ChunkKeyer::new(&key));
        let rec = m.seal(&k, &key).unwrap();
        let bytes = rec.to_bytes();
        let (signer, mr): (_, ManifestRecord) =
            SignedRecord::open_from(&bytes, Some(&k.agent_id())).unwrap();
        assert_eq!(signer, k.agent_id());
        assert_eq!(mr.open(&key).unwrap(), m);
        assert!(mr.open(&Key::random().unwrap()).is_err());
    }

    /// Guarantee: a manifest opened where its record lies (verified,
    /// decoded and decrypted without a copy) is the one sealed, and the
    /// record's bytes are left exactly as they were; a wrong key, another
    /// signer, a record of another kind and a ciphertext that fails its tag
    /// are refused.
    #[test]
    fn a_manifest_opened_in_its_record_leaves_the_record_as_it_was() {
        let k = SecretKey::generate().unwrap();
        let key = Key::random().unwrap();
        let m = sample(ShareId::random().unwrap(), &ChunkKeyer::new(&key));
        let sealed = m.seal(&k, &key).unwrap().to_bytes();
        let mut bytes = sealed.clone();
        let head = ManifestHead::open(&bytes, Some(&k.agent_id())).unwrap();
        assert_eq!((head.share_id, head.seq), (m.share_id, m.seq));
        assert_eq!(head.manifest_in(&mut bytes, &key).unwrap(), m);
        assert_eq!(bytes, sealed, "the record is as it was");
        assert!(
            head.manifest_in(&mut bytes, &Key::random().unwrap())
                .is_err()
        );
        assert_eq!(bytes, sealed, "a wrong key touches nothing");
        let other = SecretKey::generate().unwrap();
        assert!(ManifestHead::open(&bytes, Some(&other.agent_id())).is_err());
        let mut flipped = sealed.clone();
        let last = flipped.len() - 80;
        flipped[last] ^= 1;
        assert!(ManifestHead::open(&flipped, None).is_err(), "signature");
        let release = KeyRelease {
            share_id: m.share_id,
            recipient: other.agent_id(),
            seq: 1,
            wrapped_key: vec![1, 2, 3],
        };
        let not_a_manifest = SignedRecord::seal(&k, &release).unwrap().to_bytes();
        assert!(ManifestHead::open(&not_a_manifest, None).is_err());
        // Signed by the publisher, but the ciphertext is not under the key.
        let forged = ManifestRecord {
            share_id: m.share_id,
            seq: m.seq,
            key_check: key_check(&key),
            nonce: [7; 12],
            ciphertext: vec![9; 64],
        };
        let mut forged = SignedRecord::seal(&k, &forged).unwrap().to_bytes();
        let head = ManifestHead::open(&forged, Some(&k.agent_id())).unwrap();
        let e = head.manifest_in(&mut forged, &key).unwrap_err();
        assert!(e.to_string().contains("authentication"), "{e}");
    }

    /// Entries out of order are refused (lookups by path rely on the
    /// order); files and the folders holding entries are found.
    #[test]
    fn entries_are_sorted_and_looked_up_by_path() {
        let key = Key::random().unwrap();
        let mut m = sample(ShareId::random().unwrap(), &ChunkKeyer::new(&key));
        m.validate().unwrap();
        assert!(m.lists_file("empty.txt") && m.lists_file("naïve/日本語.txt"));
        assert!(!m.lists_file("dir/empty") && !m.lists_file("dir") && !m.lists_file("zz"));
        assert!(m.lists_or_holds("dir") && m.lists_or_holds("dir/empty"));
        assert!(m.lists_or_holds("naïve") && !m.lists_or_holds("nai"));
        assert!(!m.lists_or_holds("di") && !m.lists_or_holds("empty"));
        // A sibling sorting between "a" and "a/…" ("a-b": '-' < '/').
        m.entries.insert(
            0,
            Entry {
                path: "a-b".into(),
                mode: 0o644,
                kind: EntryKind::Dir,
            },
        );
        m.entries.insert(
            1,
            Entry {
                path: "a/c".into(),
                mode: 0o644,
                kind: EntryKind::Dir,
            },
        );
        m.validate().unwrap();
        assert!(m.lists_or_holds("a") && !m.lists_or_holds("a/c/d"));
        m.entries.swap(0, 1);
        let e = m.validate().unwrap_err();
        assert!(e.to_string().contains("sorted by path"), "{e}");
    }

    /// A manifest's tree is checked by the rules of `check_tree` (a path
    /// under a file, twice, unsafe) without its set of every path: what
    /// lies under a file is found among the sorted entries, even past a
    /// sibling sorting between them ("a-x": '-' < '/').
    #[test]
    fn a_manifest_with_a_path_under_a_file_or_twice_is_refused() {
        let key = Key::random().unwrap();
        let base = sample(ShareId::random().unwrap(), &ChunkKeyer::new(&key));
        let file = |p: &str| Entry {
            path: p.into(),
            mode: 0o644,
            kind: EntryKind::File {
                size: 0,
                chunks: vec![],
            },
        };
        let dir = |p: &str| Entry {
            path: p.into(),
            mode: 0o755,
            kind: EntryKind::Dir,
        };
        for (entries, says) in [
            (vec![file("a"), file("a/b")], "inside \"a\""),
            (vec![file("a"), file("a-x"), dir("a/b/c")], "inside \"a\""),
            (vec![dir("a"), file("a")], "twice"),
            (vec![file("b"), file("a")], "sorted by path"),
            (vec![file("a\u{1b}[2J")], "control character"),
            (vec![file("../up")], ".."),
        ] {
            let m = Manifest {
                entries,
                ..base.clone()
            };
            let e = m.validate().unwrap_err();
            assert!(e.to_string().contains(says), "{says}: {e}");
        }
        let ok = Manifest {
            entries: vec![dir("a"), file("a-x"), file("a/b"), dir("a/c"), file("b")],
            ..base
        };
        ok.validate().unwrap();
    }

    /// A record sealed with its last field written in place is the record
    /// sealed whole, byte for byte (lengths of one to three varint bytes);
    /// a tail of another length than announced is refused.
    #[test]
    fn a_record_sealed_with_its_tail_in_place_is_the_same_record() {
        let k = SecretKey::generate().unwrap();
        for n in [0usize, 5, 127, 128, 300, 20_000] {
            let ct: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let head = ManifestRecord {
                share_id: ShareId([9; 32]),
                seq: 300,
                key_check: [1; 8],
                nonce: [2; 12],
                ciphertext: Vec::new(),
            };
            let whole = ManifestRecord {
                ciphertext: ct.clone(),
                ..head.clone()
            };
            let a = SignedRecord::seal(&k, &whole).unwrap().to_bytes();
            let b = SignedRecord::seal_with_tail(&k, &head, n, |buf| {
                buf.extend_from_slice(&ct);
                Ok(())
            })
            .unwrap()
            .to_bytes();
            assert_eq!(a, b, "{n} bytes");
            let short = SignedRecord::seal_with_tail(&k, &head, n + 1, |buf| {
                buf.extend_from_slice(&ct);
                Ok(())
            });
            assert!(short.is_err());
        }
    }

    #[test]
    fn bad_paths_rejected() {
        for p in [
            "",
            "/abs",
            "a/../b",
            "..",
            "a//b",
            "./a",
            "a\\b",
            ".caravan/x",
            "a/",
            &"n".repeat(MAX_NAME_BYTES + 1),
            &format!("a/{}/b", "é".repeat(128)),
            "f ",
            "a/f\u{a0}",
            " lead",
            "dir\t/x",
        ] {
            assert!(check_path(p).is_err(), "{p:?} accepted");
        }
        for p in [
            "a",
            "a/b/c",
            "naïve/日本語.txt",
            ".hidden",
            "..x",
            "a b/c d.txt",
            &"n".repeat(MAX_NAME_BYTES),
        ] {
            check_path(p).unwrap();
        }
    }

    #[test]
    fn ticket_roundtrip_and_only_recipient_unwraps() {
        let alice = SecretKey::generate().unwrap();
        let bob = SecretKey::generate().unwrap();
        let key = Key::random().unwrap();
        let sid = ShareId::random().unwrap();
        let text = Ticket::issue(
            &alice,
            sid,
            bob.agent_id(),
            &key,
            vec!["127.0.0.1:1".into()],
            vec![],
        )
        .unwrap();
        let t = Ticket::parse(&text).unwrap();
        assert_eq!(t.share_id, sid);
        assert_eq!(t.publisher, alice.agent_id());
        assert_eq!(bob.unwrap_key(&t.wrapped_key).unwrap(), key);
        assert!(alice.unwrap_key(&t.wrapped_key).is_err());
        let mut chars: Vec<char> = text.chars().collect();
        let i = chars.len() / 2;
        chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
        let flipped: String = chars.into_iter().collect();
        // Damaged or cut short when copied: said so, as bad input.
        for bad in [
            flipped.as_str(),
            &text[..text.len() - 7],
            &text[..TICKET_PREFIX.len() + 3],
        ] {
            let e = Ticket::parse(bad).unwrap_err();
            assert!(e.is_bad_input(), "{e}");
            assert!(e.to_string().contains("damaged or cut short"), "{e}");
        }
    }

    #[test]
    fn share_id_text_roundtrip() {
        let s = ShareId::random().unwrap();
        assert_eq!(s.to_string().parse::<ShareId>().unwrap(), s);
        assert_eq!(s.hex().parse::<ShareId>().unwrap(), s);
    }

    proptest! {
        #[test]
        fn ticket_parse_never_panics(s in ".{0,200}") {
            let _ = Ticket::parse(&s);
            let _ = Ticket::parse(&format!("{TICKET_PREFIX}{s}"));
        }
    }

    #[test]
    fn a_tree_no_folder_can_hold_is_refused() {
        let ok = [("a/b", true), ("a/c", false), ("a", false), ("d", true)];
        check_tree("manifest", ok.iter().copied()).unwrap();
        for (bad, says) in [
            (vec![("a", true), ("a/b", true)], "inside \"a\""),
            (vec![("a", true), ("a/b/c", false)], "inside \"a\""),
            (vec![("x/a", true), ("x/a/b/c", true)], "inside \"x/a\""),
            (vec![("a", true), ("a", false)], "twice"),
            (vec![("a\u{1b}[2J", true)], "control character"),
            (vec![("new\nline", true)], "control character"),
        ] {
            let e = check_tree("manifest", bad.iter().copied()).unwrap_err();
            assert!(e.to_string().contains(says), "{e}");
        }
        // Deep paths (2,000 levels) under a file, the hostile shape for a
        // check that looks up every ancestor: refused all the same.
        let deep: Vec<String> = (0..64)
            .map(|i| format!("{}{i}", "a/".repeat(2000)))
            .collect();
        let mut entries: Vec<(&str, bool)> = deep.iter().map(|p| (p.as_str(), true)).collect();
        entries.push(("a/a/a", true));
        let e = check_tree("manifest", entries.iter().copied()).unwrap_err();
        assert!(e.to_string().contains("inside \"a/a/a\""), "{e}");
    }
}
