//! Chunks: content-defined cut points, convergent per-share encryption and
//! content addressing.
//!
//! A chunk's AEAD key is the BLAKE3 keyed hash of its plaintext under a key
//! derived from the share secret: identical data in one share encrypts the
//! same way (so a new version resends only what changed), but the same data
//! in two shares looks unrelated. Because the key is unique per plaintext the
//! nonce is fixed. The chunk id is the BLAKE3 hash of the ciphertext, so any
//! holder can verify a chunk without being able to read it.

use std::fmt;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::crypto::{Key, TAG_LEN};
use crate::error::{Error, Result};

/// Smallest chunk the chunker cuts (except at the end of a file).
pub const MIN_CHUNK: usize = 256 << 10;
/// Average chunk size the chunker aims for. Half a MiB: ten scattered 1 MiB
/// edits of a 1 GiB file resend 1.6–1.8 % of it (with 1 MiB chunks it was
/// 2.2–3.2 %, data-dependent), for a few percent more per-chunk work.
pub const AVG_CHUNK: usize = 512 << 10;
/// Largest chunk the chunker cuts.
pub const MAX_CUT: usize = 2 << 20;
/// Largest chunk a manifest may list: what earlier versions cut (4 MiB),
/// so their shares stay fetchable.
pub const MAX_CHUNK: usize = 4 << 20;
/// Largest ciphertext a peer may send for one chunk.
pub const MAX_CIPHERTEXT: usize = MAX_CHUNK + TAG_LEN;

const CHUNK_AAD: &[u8] = b"caravan chunk v1";

/// The BLAKE3 hash of a chunk's ciphertext.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id's first 8 bytes as a number, in the ids' order: a hash
    /// already (BLAKE3), so it keys tables of chunks and orders indexes
    /// searched by it.
    pub fn prefix(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        u64::from_be_bytes(b)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({self})")
    }
}

/// What a manifest records about one chunk: enough to fetch, verify and open it.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Content address of the ciphertext.
    pub id: ChunkId,
    /// The chunk's AEAD key (keyed hash of the plaintext); manifests are encrypted.
    pub key: [u8; 32],
    /// Plaintext length.
    pub len: u32,
}

impl fmt::Debug for ChunkRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkRef({}, {} bytes)", self.id, self.len)
    }
}

/// The per-share key that chunk keys are derived under, and the last
/// chunk of zeros it sealed ([`ChunkKeyer::seal_in_place`]).
#[derive(Clone)]
pub struct ChunkKeyer(Key, Arc<Mutex<Option<ZeroSeal>>>);

/// A chunk of zeros as sealed: a run of zeros (a sparse file, a disk
/// image) is cut into equal chunks of zeros, each the same chunk, so its
/// key and id are known without hashing it again.
#[derive(Clone, Copy)]
struct ZeroSeal {
    r: ChunkRef,
    tag: [u8; TAG_LEN],
}

/// Chunks of zeros at least this long are remembered (shorter ones are
/// rare: a file's end, a short file).
const ZERO_SEAL_MIN: usize = 64 << 10;

impl ChunkKeyer {
    /// Derives the chunk keyer of a share from the share secret.
    pub fn new(share_key: &Key) -> Self {
        ChunkKeyer(
            share_key.derive("caravan 2026 chunk key v1"),
            Arc::default(),
        )
    }

    /// The convergent key of one plaintext chunk.
    pub fn key_for(&self, plaintext: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.0.0);
        h.update(plaintext);
        *h.finalize().as_bytes()
    }

    /// The reference of a plaintext chunk, encrypting into a per-thread
    /// scratch buffer (publishing needs only the id, not the ciphertext).
    pub fn chunk_ref(&self, plaintext: &[u8]) -> Result<ChunkRef> {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let key = self.key_for(plaintext);
        let len =
            u32::try_from(plaintext.len()).map_err(|_| Error::Crypto("chunk larger than 4 GiB"))?;
        SCRATCH.with(|cell| {
            let mut buf = cell.borrow_mut();
            buf.clear();
            buf.reserve(plaintext.len() + TAG_LEN);
            buf.extend_from_slice(plaintext);
            Key(key).seal([0; 12], CHUNK_AAD, &mut buf)?;
            let id = ChunkId(*blake3::hash(&buf).as_bytes());
            Ok(ChunkRef { id, key, len })
        })
    }

    /// The reference of a plaintext chunk, encrypting it in place: the
    /// buffer holds the ciphertext (without its tag) afterwards. For a
    /// publish pass that reads each block only to learn the chunk ids.
    pub fn chunk_ref_in_place(&self, buf: &mut [u8]) -> Result<ChunkRef> {
        self.seal_in_place(buf).map(|(r, _)| r)
    }

    /// Like [`ChunkKeyer::chunk_ref_in_place`], and also returns the AEAD
    /// tag: the buffer followed by the tag is the sealed chunk as served
    /// (its BLAKE3 hash is the chunk id), so a publisher can keep it.
    ///
    /// A chunk of zeros like the last one sealed (same length) is only
    /// encrypted: its key and id are the remembered ones (the same
    /// plaintext under the same keyer), checked by the tag encryption
    /// gives, which is the remembered one too.
    pub fn seal_in_place(&self, buf: &mut [u8]) -> Result<(ChunkRef, [u8; TAG_LEN])> {
        let zeros = buf.len() >= ZERO_SEAL_MIN && crate::util::all_zero(buf);
        let known = match zeros {
            true => self.1.lock().ok().and_then(|z| *z),
            false => None,
        };
        if let Some(z) = known.filter(|z| z.r.len as usize == buf.len()) {
            let tag = Key(z.r.key).seal_detached([0; 12], CHUNK_AAD, buf)?;
            if tag == z.tag {
                return Ok((z.r, tag));
            }
            // Not reachable for zeros; seal it afresh from the plaintext
            // (which was all zeros).
            buf.fill(0);
        }
        let sealed = self.seal_fresh(buf)?;
        if zeros && let Ok(mut z) = self.1.lock() {
            *z = Some(ZeroSeal {
                r: sealed.0,
                tag: sealed.1,
            });
        }
        Ok(sealed)
    }

    fn seal_fresh(&self, buf: &mut [u8]) -> Result<(ChunkRef, [u8; TAG_LEN])> {
        let key = self.key_for(buf);
        let len = u32::try_from(buf.len()).map_err(|_| Error::Crypto("chunk larger than 4 GiB"))?;
        let tag = Key(key).seal_detached([0; 12], CHUNK_AAD, buf)?;
        let mut h = blake3::Hasher::new();
        h.update(buf);
        h.update(&tag);
        let id = ChunkId(*h.finalize().as_bytes());
        Ok((ChunkRef { id, key, len }, tag))
    }

    /// Encrypts a plaintext chunk and returns its reference and ciphertext.
    pub fn seal(&self, plaintext: &[u8]) -> Result<(ChunkRef, Vec<u8>)> {
        let key = self.key_for(plaintext);
        let len =
            u32::try_from(plaintext.len()).map_err(|_| Error::Crypto("chunk larger than 4 GiB"))?;
        let mut buf = Vec::with_capacity(plaintext.len() + TAG_LEN);
        buf.extend_from_slice(plaintext);
        Key(key).seal([0; 12], CHUNK_AAD, &mut buf)?;
        let id = ChunkId(*blake3::hash(&buf).as_bytes());
        Ok((ChunkRef { id, key, len }, buf))
    }

    /// Checks that local plaintext is exactly the chunk `r` describes, so data
    /// already on disk (an earlier version, a finished file) is reused
    /// without fetching it again.
    pub fn matches(&self, r: &ChunkRef, plaintext: &[u8]) -> bool {
        plaintext.len() == r.len as usize && self.key_for(plaintext) == r.key
    }
}

/// Encrypts plaintext already known to belong to `r` (serving a chunk). The
/// result is byte-identical to what [`ChunkKeyer::seal`] produced.
pub fn encrypt(r: &ChunkRef, mut plaintext: Vec<u8>) -> Result<Vec<u8>> {
    plaintext.reserve_exact(TAG_LEN);
    if plaintext.len() != r.len as usize {
        return Err(Error::CorruptChunk {
            id: r.id.to_string(),
            reason: format!(
                "source has {} bytes where the manifest says {} (file changed since publishing?)",
                plaintext.len(),
                r.len
            ),
        });
    }
    Key(r.key).seal([0; 12], CHUNK_AAD, &mut plaintext)?;
    Ok(plaintext)
}

/// A chunk's ciphertext as received, with its BLAKE3 hash when the code
/// that received it already computed it (the peer channel does, to check
/// the frame's MAC), so verifying it costs no second pass.
#[derive(Debug)]
pub struct Sealed {
    bytes: Vec<u8>,
    hash: Option<blake3::Hash>,
}

impl Sealed {
    /// Ciphertext whose hash was computed on exactly these bytes.
    #[cfg(feature = "node")]
    pub(crate) fn hashed(bytes: Vec<u8>, hash: blake3::Hash) -> Self {
        Sealed {
            bytes,
            hash: Some(hash),
        }
    }

    /// The BLAKE3 hash of the bytes (computed now if it was not known).
    pub fn hash(&self) -> blake3::Hash {
        self.hash.unwrap_or_else(|| blake3::hash(&self.bytes))
    }

    /// The ciphertext.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

impl From<Vec<u8>> for Sealed {
    fn from(bytes: Vec<u8>) -> Self {
        Sealed { bytes, hash: None }
    }
}

impl std::ops::Deref for Sealed {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

/// A chunk's ciphertext that hashed to its id: the bytes the publisher
/// sealed (the signed manifest names them), so it may be kept, served or
/// decrypted; not opened yet, so the plaintext can be written straight to
/// where it goes ([`Verified::open_into`]).
#[derive(Debug)]
pub struct Verified {
    r: ChunkRef,
    bytes: Vec<u8>,
}

/// Checks a ciphertext from a peer or a bucket against its id: its length,
/// then its BLAKE3 hash. A mismatch is the sender's fault (ask another).
pub fn verify(r: &ChunkRef, ciphertext: impl Into<Sealed>) -> Result<Verified> {
    let sealed = ciphertext.into();
    if sealed.bytes.len() != r.len as usize + TAG_LEN {
        return Err(Error::CorruptChunk {
            id: r.id.to_string(),
            reason: format!(
                "{} bytes received, {} expected",
                sealed.bytes.len(),
                r.len as usize + TAG_LEN
            ),
        });
    }
    if sealed.hash() != blake3::Hash::from(r.id.0) {
        return Err(Error::CorruptChunk {
            id: r.id.to_string(),
            reason: "BLAKE3 hash does not match the chunk id".into(),
        });
    }
    Ok(Verified {
        r: *r,
        bytes: sealed.bytes,
    })
}

impl Verified {
    /// The chunk's AEAD tag (its last bytes), kept by a holder to verify
    /// the chunk cheaply when it serves it ([`crate::node::share::HeldShare::with_tags`]).
    pub fn tag(&self) -> [u8; TAG_LEN] {
        let mut t = [0u8; TAG_LEN];
        let at = self.bytes.len().saturating_sub(TAG_LEN);
        let tail = &self.bytes[at..];
        t[TAG_LEN - tail.len()..].copy_from_slice(tail);
        t
    }

    /// Plaintext bytes.
    pub fn len(&self) -> usize {
        self.r.len as usize
    }

    /// Whether the chunk is empty.
    pub fn is_empty(&self) -> bool {
        self.r.len == 0
    }

    /// Decrypts in place; the plaintext.
    pub fn open(self) -> Result<Vec<u8>> {
        let Verified { r, mut bytes } = self;
        Key(r.key)
            .open([0; 12], CHUNK_AAD, &mut bytes)
            .map_err(|_| tag_failed(&r))?;
        Ok(bytes)
    }

    /// Decrypts into `out` (exactly [`Verified::len`] bytes). On an error
    /// `out` holds garbage and must not be used.
    pub fn open_into(&self, out: &mut [u8]) -> Result<()> {
        let n = self.len();
        Key(self.r.key)
            .open_to([0; 12], CHUNK_AAD, &self.bytes[..n], &self.bytes[n..], out)
            .map_err(|_| tag_failed(&self.r))
    }

    /// A copy, for a chunk a share lists more than once
    /// (`node/fetch/repeats.rs`): still exactly the bytes that hashed to
    /// the id.
    #[cfg(feature = "node")]
    pub(crate) fn duplicate(&self) -> Verified {
        Verified {
            r: self.r,
            bytes: self.bytes.clone(),
        }
    }

    /// The buffer, for reuse.
    pub fn into_buffer(self) -> Vec<u8> {
        self.bytes
    }
}

/// A verified ciphertext that does not open: the publisher sealed it so
/// (no other peer can have better bytes under the same id).
fn tag_failed(r: &ChunkRef) -> Error {
    Error::CorruptChunk {
        id: r.id.to_string(),
        reason: "authentication tag does not verify".into(),
    }
}

/// Verifies a ciphertext from a peer against its id, then decrypts it.
pub fn open(r: &ChunkRef, ciphertext: impl Into<Sealed>) -> Result<Vec<u8>> {
    verify(r, ciphertext)?.open()
}

#[cfg(feature = "node")]
/// The complete chunks at the start of `block`, as zero-copy slices. Unless
/// `eof`, the last cut is dropped when it may be an artefact of where the
/// block ends (it did not reach [`MAX_CUT`]): the caller reads the next block
/// from the end of the last returned chunk, so no bytes are ever copied to
/// stitch two blocks together.
pub fn cut_block(block: &bytes::Bytes, eof: bool) -> Vec<bytes::Bytes> {
    let cuts = cut_points(block);
    let n = cuts.len();
    cuts.into_iter()
        .enumerate()
        .filter(|(i, (_, len))| eof || i + 1 < n || *len >= MAX_CUT)
        .map(|(_, (off, len))| block.slice(off..off + len))
        .collect()
}

#[cfg(feature = "node")]
/// The lengths of the complete chunks at the start of `block`, by the same
/// rule as [`cut_block`].
pub fn cut_lengths(block: &[u8], eof: bool) -> Vec<usize> {
    let cuts = cut_points(block);
    let n = cuts.len();
    cuts.into_iter()
        .enumerate()
        .filter(|(i, (_, len))| eof || i + 1 < n || *len >= MAX_CUT)
        .map(|(_, (_, len))| len)
        .collect()
}

#[cfg(feature = "node")]
/// Cut points of a whole in-memory buffer (offset, length).
pub fn cut_points(data: &[u8]) -> Vec<(usize, usize)> {
    static CUTTER: std::sync::OnceLock<crate::cdc::Cutter> = std::sync::OnceLock::new();
    CUTTER
        .get_or_init(|| crate::cdc::Cutter::new(MIN_CHUNK, AVG_CHUNK, MAX_CUT))
        .cut_points(data)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reproducible incompressible bytes (xorshift), for tests of this crate.
    pub(crate) fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(n);
        let mut x = seed | 1;
        while out.len() < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(&x.to_le_bytes());
        }
        out.truncate(n);
        out
    }

    #[test]
    fn a_chunk_of_zeros_sealed_again_is_the_same_chunk() {
        let keyer = ChunkKeyer::new(&Key([5; 32]));
        for len in [ZERO_SEAL_MIN, 2 << 20, 2 << 20, 700_000, 2 << 20] {
            let mut remembered = vec![0u8; len];
            let (r, tag) = keyer.seal_in_place(&mut remembered).unwrap();
            // The same, from a keyer that never saw zeros.
            let mut fresh = vec![0u8; len];
            let want = ChunkKeyer::new(&Key([5; 32]))
                .seal_in_place(&mut fresh)
                .unwrap();
            assert_eq!((r, tag), want);
            assert_eq!(remembered, fresh);
            remembered.extend_from_slice(&tag);
            assert_eq!(open(&r, remembered).unwrap(), vec![0u8; len]);
        }
        // Not zeros (a last byte set): sealed as ever.
        let mut other = vec![0u8; 2 << 20];
        other[(2 << 20) - 1] = 1;
        let (r, tag) = keyer.seal_in_place(&mut other).unwrap();
        other.extend_from_slice(&tag);
        let mut plain = vec![0u8; 2 << 20];
        plain[(2 << 20) - 1] = 1;
        assert_eq!(open(&r, other).unwrap(), plain);
    }

    #[test]
    fn seal_open_roundtrip_and_corruption_detected() {
        let keyer = ChunkKeyer::new(&Key([9; 32]));
        let data = pseudo_random(100_000, 1);
        let (r, ct) = keyer.seal(&data).unwrap();
        assert_eq!(open(&r, ct.clone()).unwrap(), data);
        assert_eq!(encrypt(&r, data.clone()).unwrap(), ct);
        let mut in_place = data.clone();
        assert_eq!(keyer.chunk_ref_in_place(&mut in_place).unwrap(), r);
        assert_eq!(keyer.chunk_ref(&data).unwrap(), r);
        assert!(keyer.matches(&r, &data));
        for i in [0, 1, ct.len() / 2, ct.len() - 1] {
            let mut bad = ct.clone();
            bad[i] ^= 0x80;
            assert!(matches!(open(&r, bad), Err(Error::CorruptChunk { .. })));
        }
        assert!(open(&r, ct[..ct.len() - 1].to_vec()).is_err());
    }

    #[test]
    fn convergent_within_share_distinct_across_shares() {
        let a = ChunkKeyer::new(&Key([1; 32]));
        let b = ChunkKeyer::new(&Key([2; 32]));
        let data = b"same bytes".to_vec();
        assert_eq!(a.seal(&data).unwrap().0.id, a.seal(&data).unwrap().0.id);
        assert_ne!(a.seal(&data).unwrap().0.id, b.seal(&data).unwrap().0.id);
    }

    #[test]
    fn block_by_block_cutting_matches_whole_buffer() {
        let data = bytes::Bytes::from(pseudo_random(9 << 20, 7));
        let whole: Vec<Vec<u8>> = cut_points(&data)
            .into_iter()
            .map(|(o, l)| data[o..o + l].to_vec())
            .collect();
        for block in [MAX_CUT + 1, 5 << 20, 8 << 20] {
            let mut pos = 0;
            let mut streamed: Vec<Vec<u8>> = Vec::new();
            while pos < data.len() {
                let end = (pos + block).min(data.len());
                let pieces = cut_block(&data.slice(pos..end), end == data.len());
                assert!(!pieces.is_empty());
                for p in pieces {
                    pos += p.len();
                    streamed.push(p.to_vec());
                }
            }
            assert_eq!(streamed, whole, "block size {block}");
        }
    }

    #[test]
    fn local_edit_changes_few_chunks() {
        let data = pseudo_random(16 << 20, 3);
        let mut edited = data.clone();
        for b in &mut edited[8 << 20..(8 << 20) + 1000] {
            *b = !*b;
        }
        let ids = |d: &[u8]| -> std::collections::HashSet<Vec<u8>> {
            cut_points(d)
                .into_iter()
                .map(|(o, l)| d[o..o + l].to_vec())
                .collect()
        };
        let before = ids(&data);
        let after = ids(&edited);
        let changed = after.difference(&before).count();
        assert!(
            changed <= 3,
            "{changed} chunks changed for a 1000-byte edit"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn chunk_boundaries_cover_input(len in 0usize..(6 << 20), seed in any::<u64>()) {
            let data = pseudo_random(len, seed);
            let cuts = cut_points(&data);
            let mut next = 0;
            for (i, (o, l)) in cuts.iter().enumerate() {
                prop_assert_eq!(*o, next);
                prop_assert!(*l <= MAX_CUT);
                if i + 1 < cuts.len() { prop_assert!(*l >= MIN_CHUNK); }
                next = o + l;
            }
            prop_assert_eq!(next, len);
        }

        #[test]
        fn open_never_panics_on_garbage(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let r = ChunkRef { id: ChunkId([0; 32]), key: [0; 32], len: 10 };
            let _ = open(&r, b);
        }
    }
}
