//! Thin wrappers over the AEAD and key-derivation primitives, so the rest of
//! the crate never touches nonces or tags directly. AES-256-GCM from aws-lc
//! is used because it is the fastest AEAD on this class of CPU (AES-NI/VAES).

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

use crate::error::{Error, Result};

/// Size of an AEAD tag appended to every ciphertext.
pub const TAG_LEN: usize = 16;
/// Size of an AEAD nonce.
pub const NONCE_LEN: usize = 12;

/// A 256-bit symmetric key; zeroed on drop.
#[derive(Clone, zeroize::Zeroize, zeroize::ZeroizeOnDrop, PartialEq, Eq)]
pub struct Key(pub [u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl Key {
    /// A fresh random key from the OS.
    pub fn random() -> Result<Self> {
        Ok(Key(random_bytes()?))
    }

    /// Derives a sub-key for one purpose, so one secret never keys two algorithms.
    pub fn derive(&self, context: &str) -> Key {
        let mut h = blake3::Hasher::new_derive_key(context);
        h.update(&self.0);
        Key(*h.finalize().as_bytes())
    }

    fn aead(&self) -> Result<LessSafeKey> {
        let k = UnboundKey::new(&AES_256_GCM, &self.0).map_err(|_| Error::Crypto("bad key"))?;
        Ok(LessSafeKey::new(k))
    }

    /// Encrypts `buf` in place and appends the tag.
    pub fn seal(&self, nonce: [u8; NONCE_LEN], aad: &[u8], buf: &mut Vec<u8>) -> Result<()> {
        self.aead()?
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), buf)
            .map_err(|_| Error::Crypto("seal failed"))
    }

    /// Encrypts `buf` in place and returns the tag separately.
    pub fn seal_detached(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN]> {
        let tag = self
            .aead()?
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), buf)
            .map_err(|_| Error::Crypto("seal failed"))?;
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(tag.as_ref());
        Ok(t)
    }

    /// Decrypts `ciphertext` (its tag given apart) into `out`, which has its
    /// length: one pass from the received buffer to where the plaintext is
    /// wanted, instead of decrypting in place and copying.
    pub fn open_to(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        ciphertext: &[u8],
        tag: &[u8],
        out: &mut [u8],
    ) -> Result<()> {
        self.aead()?
            .open_separate_gather(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                ciphertext,
                tag,
                out,
            )
            .map_err(|_| Error::Crypto("authentication tag mismatch"))
    }

    /// Decrypts `buf` (ciphertext followed by tag) in place; returns the
    /// plaintext's length (the tag's bytes after it are left as they are,
    /// or unspecified on an error).
    pub fn open_in_slice(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<usize> {
        Ok(self
            .aead()?
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), buf)
            .map_err(|_| Error::Crypto("authentication tag mismatch"))?
            .len())
    }

    /// Decrypts `buf` (ciphertext followed by tag) in place and truncates the tag.
    pub fn open(&self, nonce: [u8; NONCE_LEN], aad: &[u8], buf: &mut Vec<u8>) -> Result<()> {
        let len = self
            .aead()?
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), buf)
            .map_err(|_| Error::Crypto("authentication tag mismatch"))?
            .len();
        buf.truncate(len);
        Ok(())
    }
}

/// Random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|_| Error::Crypto("operating system RNG unavailable"))?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_roundtrip_and_tamper() {
        let k = Key::random().unwrap();
        let mut buf = b"hello caravan".to_vec();
        k.seal([1; 12], b"aad", &mut buf).unwrap();
        assert_eq!(buf.len(), 13 + TAG_LEN);
        let mut ok = buf.clone();
        k.open([1; 12], b"aad", &mut ok).unwrap();
        assert_eq!(ok, b"hello caravan");
        let mut bad = buf.clone();
        bad[0] ^= 1;
        assert!(k.open([1; 12], b"aad", &mut bad).is_err());
        let mut bad_aad = buf;
        assert!(k.open([1; 12], b"other", &mut bad_aad).is_err());
    }

    #[test]
    fn derive_separates_contexts() {
        let k = Key([7; 32]);
        assert_ne!(k.derive("a").0, k.derive("b").0);
        assert_eq!(k.derive("a").0, k.derive("a").0);
    }
}
