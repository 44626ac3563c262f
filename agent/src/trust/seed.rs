//! Offline seeding records: the signed, refreshable pointer a publisher
//! leaves in the repositories so recipients can fetch a share's sealed
//! chunks straight from the publisher's bucket while the publisher sleeps.
//!
//! A [`SeedRecord`] is small (it fits a repository record) and carries:
//! which share and manifest version it covers, until when its URLs are
//! valid, and a presigned URL to the share's *seed index* object, sealed
//! under a key derived from the share key (so only holders of the key can
//! reach the bucket; the repository and anyone reading it cannot). The
//! index (an unsigned [`SeedIndex`] in the bucket) is bound to the record
//! by its BLAKE3 hash and length, and lists the signed manifest record and
//! one presigned URL per chunk id. Every chunk fetched from a URL is then
//! verified exactly as from a peer (BLAKE3 id, then the AEAD tag).
//!
//! `seq` is the issue time in milliseconds and only moves forward: a
//! repository keeps the newest, a recipient never goes back to an older one.

use serde::{Deserialize, Serialize};

use crate::crypto::{Key, NONCE_LEN};
use crate::error::{Error, Result};
use crate::identity::AgentId;
use crate::record::{Kind, Record, SignedRecord};
use crate::ticket::ShareId;
use crate::trust::records::{Invalid, Reason, open_kind};

/// Longest sealed URL accepted (a presigned URL is well under 2 KiB).
pub const MAX_SEALED_URL: usize = 4 << 10;
/// Largest seed index a recipient will download (bounded before reading).
/// About 200 000 chunks (~200 GiB at the average chunk size) fit.
pub const MAX_SEED_INDEX: u64 = 128 << 20;
/// Longest validity a seed record may claim (presigned URLs of S3 SigV4
/// last at most 7 days; a day of slack for clocks).
pub const MAX_SEED_VALIDITY_SECS: u64 = 8 * 24 * 3600;
const URL_KEY_CONTEXT: &str = "caravan seed url v1";

/// The signed pointer to a share's offline seed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedRecord {
    /// The publisher (must be the signer).
    pub publisher: AgentId,
    /// The share.
    pub share_id: ShareId,
    /// Version of this record: the issue time in milliseconds (forward only).
    pub seq: u64,
    /// The manifest version the staged chunks belong to.
    pub manifest_seq: u64,
    /// Unix time after which the URLs no longer work.
    pub expires_at: u64,
    /// BLAKE3 of the seed index object.
    pub index_hash: [u8; 32],
    /// Length of the seed index object in bytes.
    pub index_len: u64,
    /// Nonce of `sealed_url`.
    pub nonce: [u8; NONCE_LEN],
    /// The presigned URL of the seed index, sealed under the share key.
    pub sealed_url: Vec<u8>,
}

impl Record for SeedRecord {
    const KIND: Kind = Kind::Seed;
}

fn url_aad(share: &ShareId, seq: u64) -> Vec<u8> {
    let mut aad = b"caravan seed url\0".to_vec();
    aad.extend_from_slice(&share.0);
    aad.extend_from_slice(&seq.to_be_bytes());
    aad
}

impl SeedRecord {
    /// Seals `url` for holders of `share_key` into this record.
    pub fn seal_url(&mut self, share_key: &Key, url: &str) -> Result<()> {
        let nonce = crate::crypto::random_bytes::<NONCE_LEN>()?;
        let mut buf = url.as_bytes().to_vec();
        share_key.derive(URL_KEY_CONTEXT).seal(
            nonce,
            &url_aad(&self.share_id, self.seq),
            &mut buf,
        )?;
        if buf.len() > MAX_SEALED_URL {
            return Err(Error::Config(format!(
                "a presigned URL of {} bytes is longer than {MAX_SEALED_URL}",
                url.len()
            )));
        }
        self.nonce = nonce;
        self.sealed_url = buf;
        Ok(())
    }

    /// Opens the index URL with the share key.
    pub fn open_url(&self, share_key: &Key) -> Result<String> {
        let mut buf = self.sealed_url.clone();
        share_key
            .derive(URL_KEY_CONTEXT)
            .open(self.nonce, &url_aad(&self.share_id, self.seq), &mut buf)
            .map_err(|_| Error::Crypto("the seed record's URL does not open with the share key"))?;
        String::from_utf8(buf).map_err(|_| Error::Record("seed URL is not UTF-8".into()))
    }

    /// Opens a verified record, checking the signer and the bounds.
    pub fn from_record(rec: &SignedRecord) -> std::result::Result<Self, Invalid> {
        let s: SeedRecord = open_kind(rec)?;
        if s.publisher != rec.signer {
            return Err(Invalid::new(
                Reason::WrongSigner,
                format!(
                    "seed record of {} is signed by {}",
                    s.publisher.short(),
                    rec.signer.short()
                ),
            ));
        }
        if s.sealed_url.len() > MAX_SEALED_URL || s.index_len > MAX_SEED_INDEX {
            return Err(Invalid::new(
                Reason::Oversize,
                format!(
                    "seed record with a {} byte URL and a {} byte index",
                    s.sealed_url.len(),
                    s.index_len
                ),
            ));
        }
        Ok(s)
    }

    /// Refuses an expired record, or one claiming more than the longest validity.
    pub fn check_window(&self, now: u64) -> std::result::Result<(), Invalid> {
        if self.expires_at <= now {
            return Err(Invalid::new(
                Reason::Expired,
                format!("seed record expired at {} (now {now})", self.expires_at),
            ));
        }
        if self.expires_at > now.saturating_add(MAX_SEED_VALIDITY_SECS) {
            return Err(Invalid::new(
                Reason::FarFuture,
                format!(
                    "seed record claims validity until {}, more than {} days ahead",
                    self.expires_at,
                    MAX_SEED_VALIDITY_SECS / 86400
                ),
            ));
        }
        Ok(())
    }
}

/// The object in the publisher's bucket a [`SeedRecord`] points at: the
/// signed manifest record and one presigned URL per chunk id. It needs no
/// signature of its own: the signed record names its BLAKE3 hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedIndex {
    /// The share.
    pub share_id: ShareId,
    /// The manifest version (the same as the record's `manifest_seq`).
    pub manifest_seq: u64,
    /// The signed manifest record bytes (verified as from a peer).
    pub manifest: Vec<u8>,
    /// (chunk id, presigned URL) for every chunk of the manifest.
    pub urls: Vec<([u8; 32], String)>,
}

impl SeedIndex {
    /// Encodes the index for the bucket.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        postcard::to_stdvec(self).map_err(|e| Error::Record(e.to_string()))
    }

    /// Decodes index bytes already checked against the record's hash.
    pub fn from_bytes(bytes: &[u8], rec: &SeedRecord) -> Result<Self> {
        if bytes.len() as u64 != rec.index_len || blake3::hash(bytes).as_bytes() != &rec.index_hash
        {
            return Err(Error::Record(
                "the seed index does not match its signed hash (replaced or refreshed)".into(),
            ));
        }
        let idx: SeedIndex =
            postcard::from_bytes(bytes).map_err(|e| Error::Record(format!("seed index: {e}")))?;
        if idx.share_id != rec.share_id || idx.manifest_seq != rec.manifest_seq {
            return Err(Error::Record(
                "the seed index is for another share or version".into(),
            ));
        }
        Ok(idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;

    fn sample(key: &SecretKey) -> SeedRecord {
        SeedRecord {
            publisher: key.agent_id(),
            share_id: ShareId([7; 32]),
            seq: 1,
            manifest_seq: 1,
            expires_at: crate::util::unix_now() + 3600,
            index_hash: [0; 32],
            index_len: 10,
            nonce: [0; NONCE_LEN],
            sealed_url: Vec::new(),
        }
    }

    #[test]
    fn url_opens_only_with_the_share_key_and_record_verifies() {
        let sk = SecretKey::generate().unwrap();
        let share_key = Key([1; 32]);
        let mut r = sample(&sk);
        r.seal_url(&share_key, "http://127.0.0.1/x?sig=1").unwrap();
        assert_eq!(r.open_url(&share_key).unwrap(), "http://127.0.0.1/x?sig=1");
        assert!(r.open_url(&Key([2; 32])).is_err());
        let rec = SignedRecord::seal(&sk, &r).unwrap();
        let back =
            SeedRecord::from_record(&SignedRecord::from_bytes(&rec.to_bytes()).unwrap()).unwrap();
        assert_eq!(back, r);
        back.check_window(crate::util::unix_now()).unwrap();
        // Moving the URL to another version breaks it (bound by the AAD).
        let mut moved = r.clone();
        moved.seq = 2;
        assert!(moved.open_url(&share_key).is_err());
    }

    #[test]
    fn index_must_match_the_signed_hash() {
        let sk = SecretKey::generate().unwrap();
        let idx = SeedIndex {
            share_id: ShareId([7; 32]),
            manifest_seq: 1,
            manifest: vec![1, 2, 3],
            urls: vec![([3; 32], "http://x".into())],
        };
        let bytes = idx.to_bytes().unwrap();
        let mut r = sample(&sk);
        r.index_hash = *blake3::hash(&bytes).as_bytes();
        r.index_len = bytes.len() as u64;
        assert_eq!(SeedIndex::from_bytes(&bytes, &r).unwrap(), idx);
        let mut bad = bytes.clone();
        bad[0] ^= 1;
        assert!(SeedIndex::from_bytes(&bad, &r).is_err());
    }
}
