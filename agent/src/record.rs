//! Signed records: everything an agent asserts to others (manifests, tickets,
//! announcements, trust grants, revocations) travels as one of these.
//!
//! Wire form: `"CVR"` magic, format version byte, kind byte, signer (32 bytes),
//! body length (u32 big endian), body, ed25519 signature (64 bytes).
//! The signature covers a domain-separated message — a fixed prefix, the kind's
//! tag, the version, the signer and the body — so a signature for one kind can
//! never be replayed as another. Bodies are postcard, and decoding re-encodes to
//! check the bytes were canonical, so one value has exactly one signed form.

use serde::{Serialize, de::DeserializeOwned};

use crate::error::{Error, Result};
use crate::identity::{AgentId, SecretKey};

const MAGIC: &[u8; 3] = b"CVR";
/// The only record format version this build reads and writes.
pub const FORMAT_VERSION: u8 = 1;
const HEADER_LEN: usize = 3 + 1 + 1 + 32 + 4;
const SIG_LEN: usize = 64;

/// The kinds of signed record, each with its own signature domain and size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// An encrypted share manifest.
    Manifest = 1,
    /// A ticket handed to a recipient out of band.
    Ticket = 2,
    /// An agent announcing where it is and which shares it holds.
    Announcement = 3,
    /// A vouch from one agent for another.
    TrustGrant = 4,
    /// Withdrawal of a trust grant by its issuer.
    Revocation = 5,
    /// A share key handed to a peer on request.
    KeyRelease = 6,
    /// Where a share's sealed chunks can be fetched while its publisher
    /// sleeps (offline seeding): refreshed without a new manifest version.
    Seed = 7,
}

impl Kind {
    fn from_u8(b: u8) -> Result<Self> {
        Ok(match b {
            1 => Kind::Manifest,
            2 => Kind::Ticket,
            3 => Kind::Announcement,
            4 => Kind::TrustGrant,
            5 => Kind::Revocation,
            6 => Kind::KeyRelease,
            7 => Kind::Seed,
            other => return Err(Error::Record(format!("unknown record kind {other}"))),
        })
    }

    /// The domain-separation tag mixed into every signature of this kind.
    pub fn tag(self) -> &'static str {
        match self {
            Kind::Manifest => "manifest",
            Kind::Ticket => "ticket",
            Kind::Announcement => "announcement",
            Kind::TrustGrant => "trust-grant",
            Kind::Revocation => "revocation",
            Kind::KeyRelease => "key-release",
            Kind::Seed => "seed",
        }
    }

    /// The largest body accepted for this kind, so nobody can make us verify
    /// (or store) a gigabyte of "record".
    pub fn max_body(self) -> usize {
        match self {
            Kind::Manifest => 256 << 20,
            Kind::Announcement => 64 << 10,
            _ => 16 << 10,
        }
    }
}

/// A value that travels as a signed record of a fixed kind.
pub trait Record: Serialize + DeserializeOwned {
    /// The record kind (and so the signature domain) of this type.
    const KIND: Kind;
}

/// A decoded record whose signature has been verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRecord {
    /// What sort of record this is.
    pub kind: Kind,
    /// Who signed it.
    pub signer: AgentId,
    /// Canonical postcard bytes of the value.
    pub body: Vec<u8>,
    signature: [u8; 64],
}

/// The signed message's start, before a body of `body_len` bytes, in a
/// buffer with `room` bytes to spare after it. A signer asks for room for
/// the body and the signature, so the body is written once, signed in
/// place, and the start then cut off (see [`SignedRecord::seal_owned`]):
/// a manifest of 100,000 files is 17 MB, and each copy less is that much
/// less at the peak of a publish. A verifier asks for none: it verifies
/// the prefix and the body where it lies (a buffer the body's size,
/// never written, was 24 MB at a fetch's peak for 250,000 files).
fn signing_prefix(kind: Kind, signer: &AgentId, body_len: usize, room: usize) -> Vec<u8> {
    const START: &[u8] = b"caravan signed record\0";
    let prefix = START.len() + kind.tag().len() + 2 + signer.0.len() + 8;
    // The buffer never grows, so it is never copied nor held twice.
    let mut m = Vec::with_capacity(prefix + room);
    m.extend_from_slice(START);
    m.extend_from_slice(kind.tag().as_bytes());
    m.push(0);
    m.push(FORMAT_VERSION);
    m.extend_from_slice(&signer.0);
    m.extend_from_slice(&(body_len as u64).to_be_bytes());
    m
}

/// Refuses a record signed by anyone but `expected` (when given).
fn check_signer(signer: &AgentId, expected: Option<&AgentId>) -> Result<()> {
    match expected {
        Some(want) if want != signer => Err(Error::Record(format!(
            "signed by {} but expected {}",
            signer.short(),
            want.short()
        ))),
        _ => Ok(()),
    }
}

/// Decodes a record's body as `T`, checking that it is a `want` record and
/// canonically encoded (re-encoded, it is the same bytes).
fn decode_canonical<'a, T: Serialize + serde::Deserialize<'a>>(
    want: Kind,
    kind: Kind,
    body: &'a [u8],
) -> Result<T> {
    if kind != want {
        return Err(Error::Record(format!(
            "expected a {} record, got a {}",
            want.tag(),
            kind.tag()
        )));
    }
    let value: T = postcard::from_bytes(body)
        .map_err(|e| Error::Record(format!("malformed {} body: {e}", kind.tag())))?;
    let same = postcard::serialize_with_flavor(
        &value,
        SameAs {
            expected: body,
            pos: 0,
            same: true,
        },
    )
    .map_err(|e| Error::Record(e.to_string()))?;
    if !same {
        return Err(Error::Record(format!(
            "{} body is not canonically encoded",
            kind.tag()
        )));
    }
    Ok(value)
}

/// A postcard output that compares what is written with the bytes
/// expected instead of keeping it: the canonical-encoding check of
/// [`SignedRecord::open`] without a second copy of the record.
struct SameAs<'a> {
    expected: &'a [u8],
    pos: usize,
    same: bool,
}

impl postcard::ser_flavors::Flavor for SameAs<'_> {
    type Output = bool;

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.try_extend(&[data])
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        let end = self.pos + data.len();
        self.same = self.same && self.expected.get(self.pos..end) == Some(data);
        self.pos = end;
        Ok(())
    }

    fn finalize(self) -> postcard::Result<bool> {
        Ok(self.same && self.pos == self.expected.len())
    }
}

impl SignedRecord {
    /// Signs `value` with `key`.
    pub fn seal<T: Record>(key: &SecretKey, value: &T) -> Result<Self> {
        let (message, start) = Self::message_of(key, value)?;
        Ok(Self::sign_message::<T>(key, message, start))
    }

    /// Signs a record whose last field is a byte string (`Vec<u8>`) of
    /// `tail_len` bytes that `fill` appends to the encoding, in place:
    /// `head` is the record with that field empty. A big manifest is then
    /// encrypted where it is signed, not built as a record of its own and
    /// copied into the signed message (at the end of a publish pass of
    /// 250,000 files, 26 MB more at the publisher's peak). The result is
    /// the same record as [`SignedRecord::seal`] of the whole value.
    pub fn seal_with_tail<T: Record>(
        key: &SecretKey,
        head: &T,
        tail_len: usize,
        fill: impl FnOnce(&mut Vec<u8>) -> Result<()>,
    ) -> Result<Self> {
        let empty = postcard::to_stdvec(head).map_err(|e| Error::Record(e.to_string()))?;
        let Some((&0, head_bytes)) = empty.split_last() else {
            return Err(Error::Record(
                "a record sealed with a tail must end with an empty byte string".into(),
            ));
        };
        // A byte string is its length (a varint, as any integer) and its bytes.
        let len =
            postcard::to_stdvec(&(tail_len as u64)).map_err(|e| Error::Record(e.to_string()))?;
        let n = head_bytes.len() + len.len() + tail_len;
        if n > T::KIND.max_body() {
            return Err(Error::Record(format!(
                "{} of {n} bytes exceeds the {} byte limit",
                T::KIND.tag(),
                T::KIND.max_body()
            )));
        }
        let mut message = signing_prefix(T::KIND, &key.agent_id(), n, n + SIG_LEN);
        let start = message.len();
        message.extend_from_slice(head_bytes);
        message.extend_from_slice(&len);
        let at = message.len();
        fill(&mut message)?;
        if message.len() - at != tail_len {
            return Err(Error::Record(format!(
                "a record's tail of {} bytes where {tail_len} were announced",
                message.len() - at
            )));
        }
        Ok(Self::sign_message::<T>(key, message, start))
    }

    /// Signs `value` with `key`, dropping it once encoded: a big record
    /// (a manifest of 100,000 files is 17 MB) is not held twice while the
    /// signature is computed.
    pub fn seal_owned<T: Record>(key: &SecretKey, value: T) -> Result<Self> {
        let (message, start) = Self::message_of(key, &value)?;
        drop(value);
        Ok(Self::sign_message::<T>(key, message, start))
    }

    /// The signed message of `value`: its encoding written once, straight
    /// after the message's prefix (which ends at the returned offset), its
    /// size checked before any of it is written.
    fn message_of<T: Record>(key: &SecretKey, value: &T) -> Result<(Vec<u8>, usize)> {
        let n = postcard::experimental::serialized_size(value)
            .map_err(|e| Error::Record(e.to_string()))?;
        if n > T::KIND.max_body() {
            return Err(Error::Record(format!(
                "{} of {n} bytes exceeds the {} byte limit",
                T::KIND.tag(),
                T::KIND.max_body()
            )));
        }
        // Room for the signature too: with the prefix cut off, the body's
        // buffer holds the wire form's header and signature
        // ([`SignedRecord::into_bytes`] makes it in place).
        let prefix = signing_prefix(T::KIND, &key.agent_id(), n, n + SIG_LEN);
        let start = prefix.len();
        let message =
            postcard::to_extend(value, prefix).map_err(|e| Error::Record(e.to_string()))?;
        Ok((message, start))
    }

    /// Signs the message and keeps its body (the prefix cut off in place).
    fn sign_message<T: Record>(key: &SecretKey, mut message: Vec<u8>, start: usize) -> Self {
        let signature = key.sign(&message);
        message.drain(..start);
        SignedRecord {
            kind: T::KIND,
            signer: key.agent_id(),
            body: message,
            signature,
        }
    }

    /// [`SignedRecord::to_bytes`] made of the body's own buffer (a record
    /// sealed here has room for the header and signature): a big record
    /// (a manifest) is not held twice.
    pub fn into_bytes(self) -> Vec<u8> {
        let mut out = self.body;
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.push(FORMAT_VERSION);
        header.push(self.kind as u8);
        header.extend_from_slice(&self.signer.0);
        header.extend_from_slice(&(out.len() as u32).to_be_bytes());
        out.reserve_exact(HEADER_LEN + SIG_LEN);
        out.splice(0..0, header);
        out.extend_from_slice(&self.signature);
        out
    }

    /// Encodes the record for the wire or for storage.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.body.len() + SIG_LEN);
        out.extend_from_slice(MAGIC);
        out.push(FORMAT_VERSION);
        out.push(self.kind as u8);
        out.extend_from_slice(&self.signer.0);
        out.extend_from_slice(&(self.body.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.body);
        out.extend_from_slice(&self.signature);
        out
    }

    /// Decodes and verifies a record. There is no way to get an unverified one.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let (kind, signer, body, signature) = Self::verified(bytes)?;
        let mut body = body.to_vec();
        // A small record is kept exactly sized (a repository holds many).
        if body.len() < 64 << 10 {
            body.shrink_to_fit();
        }
        Ok(SignedRecord {
            kind,
            signer,
            body,
            signature,
        })
    }

    /// Checks a record's form and signature where it lies: its kind,
    /// signer, body (borrowed from `bytes`) and signature. The signed
    /// message is verified in two parts, its prefix and the body in place:
    /// a record of tens of MiB (a manifest) is not copied to be verified.
    fn verified(bytes: &[u8]) -> Result<(Kind, AgentId, &[u8], [u8; 64])> {
        if bytes.len() < HEADER_LEN + SIG_LEN {
            return Err(Error::Record(format!("{} bytes is too short", bytes.len())));
        }
        if &bytes[..3] != MAGIC {
            return Err(Error::Record("not a Caravan record (bad magic)".into()));
        }
        if bytes[3] != FORMAT_VERSION {
            return Err(Error::Record(format!(
                "record format version {} is not supported (this build reads {FORMAT_VERSION})",
                bytes[3]
            )));
        }
        let kind = Kind::from_u8(bytes[4])?;
        let mut signer = [0u8; 32];
        signer.copy_from_slice(&bytes[5..37]);
        let signer = AgentId(signer);
        let len = u32::from_be_bytes([bytes[37], bytes[38], bytes[39], bytes[40]]) as usize;
        if len > kind.max_body() {
            return Err(Error::Record(format!(
                "{} body of {len} bytes exceeds the {} byte limit",
                kind.tag(),
                kind.max_body()
            )));
        }
        if bytes.len() != HEADER_LEN + len + SIG_LEN {
            return Err(Error::Record(
                "length field does not match the record size".into(),
            ));
        }
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&bytes[HEADER_LEN + len..]);
        let body = &bytes[HEADER_LEN..HEADER_LEN + len];
        let prefix = signing_prefix(kind, &signer, len, 0);
        signer.verify_parts(&[&prefix, body], &signature)?;
        Ok((kind, signer, body, signature))
    }

    /// [`SignedRecord::open_from`] decoding a `want` record straight from
    /// `bytes`, the record not copied: a value that borrows from it (a
    /// manifest record's ciphertext) stays where it lies.
    pub fn open_borrowed<'a, T: Serialize + serde::Deserialize<'a>>(
        bytes: &'a [u8],
        want: Kind,
        expected_signer: Option<&AgentId>,
    ) -> Result<(AgentId, T)> {
        let (kind, signer, body, _) = Self::verified(bytes)?;
        check_signer(&signer, expected_signer)?;
        Ok((signer, decode_canonical(want, kind, body)?))
    }

    /// Decodes the body as `T`, checking the kind and canonical encoding.
    pub fn open<T: Record>(&self) -> Result<T> {
        decode_canonical(T::KIND, self.kind, &self.body)
    }

    /// Decodes, verifies, checks the signer and opens in one step.
    pub fn open_from<T: Record>(
        bytes: &[u8],
        expected_signer: Option<&AgentId>,
    ) -> Result<(AgentId, T)> {
        let rec = Self::from_bytes(bytes)?;
        check_signer(&rec.signer, expected_signer)?;
        Ok((rec.signer, rec.open()?))
    }

    /// The signature bytes (for ids derived from a record).
    pub fn signature(&self) -> &[u8; 64] {
        &self.signature
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Demo {
        n: u64,
        s: String,
    }
    impl Record for Demo {
        const KIND: Kind = Kind::Announcement;
    }

    /// A record sealed once (encoded into its signed message, signed in
    /// place) reads back as the value, its wire form the same whether made
    /// from a borrowed record or from the body's own buffer, and one
    /// decoded from the wire (verified in place) encodes back the same.
    #[test]
    fn a_record_is_encoded_once_and_reads_back_the_same() {
        let key = SecretKey::generate().unwrap();
        for n in [0usize, 1, 1000, 50_000] {
            let v = Demo {
                n: n as u64,
                s: "x".repeat(n),
            };
            let rec = SignedRecord::seal(&key, &v).unwrap();
            // Room for the wire form in the body's own buffer.
            assert!(rec.body.capacity() >= rec.body.len() + HEADER_LEN + SIG_LEN);
            let wire = rec.to_bytes();
            assert_eq!(rec.clone().into_bytes(), wire);
            let back = SignedRecord::from_bytes(&wire).unwrap();
            assert_eq!(back, rec);
            assert_eq!(back.body.capacity(), back.body.len(), "kept exactly sized");
            assert_eq!(back.open::<Demo>().unwrap(), v);
            assert_eq!(
                SignedRecord::seal_owned(&key, v).unwrap().into_bytes(),
                wire
            );
        }
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Other {
        n: u64,
        s: String,
    }
    impl Record for Other {
        const KIND: Kind = Kind::TrustGrant;
    }

    fn sample() -> (SecretKey, Vec<u8>) {
        let k = SecretKey::from_seed([3; 32]);
        let r = SignedRecord::seal(
            &k,
            &Demo {
                n: 42,
                s: "héllo".into(),
            },
        )
        .unwrap();
        (k, r.to_bytes())
    }

    #[test]
    fn roundtrip() {
        let (k, bytes) = sample();
        let (who, d): (_, Demo) = SignedRecord::open_from(&bytes, Some(&k.agent_id())).unwrap();
        assert_eq!(who, k.agent_id());
        assert_eq!(
            d,
            Demo {
                n: 42,
                s: "héllo".into()
            }
        );
    }

    #[test]
    fn wrong_kind_and_wrong_signer_rejected() {
        let (_, bytes) = sample();
        let r = SignedRecord::from_bytes(&bytes).unwrap();
        assert!(r.open::<Other>().is_err());
        let stranger = SecretKey::from_seed([4; 32]).agent_id();
        assert!(SignedRecord::open_from::<Demo>(&bytes, Some(&stranger)).is_err());
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let (_, bytes) = sample();
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            let res = SignedRecord::from_bytes(&b).and_then(|r| r.open::<Demo>());
            assert!(res.is_err(), "bit {i} flip accepted");
        }
    }

    #[test]
    fn oversize_refused() {
        let k = SecretKey::from_seed([3; 32]);
        let big = Demo {
            n: 1,
            s: "x".repeat(70_000),
        };
        assert!(SignedRecord::seal(&k, &big).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = SignedRecord::from_bytes(&b).and_then(|r| r.open::<Demo>());
        }

        #[test]
        fn truncations_rejected(cut in 0usize..100) {
            let (_, bytes) = sample();
            let cut = cut.min(bytes.len() - 1);
            prop_assert!(SignedRecord::from_bytes(&bytes[..cut]).is_err());
        }
    }
}
