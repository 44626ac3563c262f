//! Who an agent is: an ed25519 key pair, and the agent id people copy and
//! paste. The id is the public key plus a 3-byte checksum, in lowercase
//! base32 grouped by eight, so a typo is caught instead of naming a stranger.

use std::{fmt, str::FromStr};

use curve25519_dalek::montgomery::MontgomeryPoint;
use data_encoding::BASE32_NOPAD;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

use crate::crypto::{Key, random_bytes};
use crate::error::{Error, Result};

const ID_PREFIX: &str = "cv1";
const SECRET_PREFIX: &str = "caravan-secret-key-v1:";
const CHECKSUM_CONTEXT: &str = "caravan 2026 agent id checksum v1";
const WRAP_CONTEXT: &str = "caravan 2026 key wrap v1";

/// The public identity of an agent (its ed25519 public key).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentId(pub [u8; 32]);

crate::text_serde!(AgentId);

impl AgentId {
    /// The verifying key, or an error when the bytes are not a curve point.
    pub fn verifying_key(&self) -> Result<VerifyingKey> {
        VerifyingKey::from_bytes(&self.0).map_err(|e| Error::parse("agent id", e))
    }

    /// Verifies an ed25519 signature made by this agent over `msg`.
    pub fn verify(&self, msg: &[u8], sig: &[u8; 64]) -> Result<()> {
        let vk = self.verifying_key()?;
        vk.verify_strict(msg, &Signature::from_bytes(sig))
            .or_else(|_| vk.verify(msg, &Signature::from_bytes(sig)).map(|_| ()))
            .map_err(|_| Error::Record("signature does not verify".into()))?;
        Ok(())
    }

    /// [`AgentId::verify`] of a message given in parts (a signed record's
    /// prefix and its body where it lies, not copied together). The same
    /// check: `verify_strict` only adds small-order refusals to `verify`'s
    /// equation, so "strict, or else plain" is plain `verify`, which this is
    /// over the concatenated parts.
    pub fn verify_parts(&self, parts: &[&[u8]], sig: &[u8; 64]) -> Result<()> {
        use ed25519_dalek::ed25519::signature::MultipartVerifier;
        self.verifying_key()?
            .multipart_verify(parts, &Signature::from_bytes(sig))
            .map_err(|_| Error::Record("signature does not verify".into()))
    }

    /// A short, human-friendly prefix for logs (never used for authorization).
    pub fn short(&self) -> String {
        self.to_string().chars().take(12).collect()
    }

    fn checksum(pk: &[u8; 32]) -> [u8; 3] {
        let mut h = blake3::Hasher::new_derive_key(CHECKSUM_CONTEXT);
        h.update(pk);
        let d = h.finalize();
        [d.as_bytes()[0], d.as_bytes()[1], d.as_bytes()[2]]
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut raw = [0u8; 35];
        raw[..32].copy_from_slice(&self.0);
        raw[32..].copy_from_slice(&Self::checksum(&self.0));
        let enc = BASE32_NOPAD.encode(&raw).to_ascii_lowercase();
        f.write_str(ID_PREFIX)?;
        for group in enc.as_bytes().chunks(8) {
            f.write_str("-")?;
            f.write_str(std::str::from_utf8(group).map_err(|_| fmt::Error)?)?;
        }
        Ok(())
    }
}

impl fmt::Debug for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AgentId({self})")
    }
}

impl FromStr for AgentId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let cleaned: String = s
            .trim()
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '-')
            .collect::<String>()
            .to_ascii_uppercase();
        let body = cleaned
            .strip_prefix(&ID_PREFIX.to_ascii_uppercase())
            .ok_or_else(|| Error::parse("agent id", format!("must start with `{ID_PREFIX}-`")))?;
        let raw = BASE32_NOPAD
            .decode(body.as_bytes())
            .map_err(|e| Error::parse("agent id", format!("not base32: {e}")))?;
        if raw.len() != 35 {
            return Err(Error::parse(
                "agent id",
                format!("expected 56 base32 characters, got {}", body.len()),
            ));
        }
        let mut pk = [0u8; 32];
        pk.copy_from_slice(&raw[..32]);
        if raw[32..] != Self::checksum(&pk) {
            return Err(Error::parse("agent id", "checksum mismatch (typo?)"));
        }
        let id = AgentId(pk);
        id.verifying_key()?;
        Ok(id)
    }
}

/// An agent's private key. Never printed, never logged; zeroed on drop.
pub struct SecretKey(SigningKey);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(<redacted> for {})", self.agent_id())
    }
}

impl Clone for SecretKey {
    fn clone(&self) -> Self {
        SecretKey(SigningKey::from_bytes(&self.0.to_bytes()))
    }
}

impl SecretKey {
    /// A new random key pair.
    pub fn generate() -> Result<Self> {
        Ok(Self::from_seed(random_bytes()?))
    }

    /// The key pair for a 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        SecretKey(SigningKey::from_bytes(&seed))
    }

    /// The 32-byte seed (for writing the key file; handle with care).
    pub fn seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The public agent id.
    pub fn agent_id(&self) -> AgentId {
        AgentId(self.0.verifying_key().to_bytes())
    }

    /// Signs raw bytes; callers use [`crate::record`] for anything sent to others.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.0.sign(msg).to_bytes()
    }

    /// The text form stored in key files and Kubernetes Secrets.
    pub fn to_text(&self) -> String {
        let seed = zeroize::Zeroizing::new(self.seed());
        format!(
            "{SECRET_PREFIX}{}\n",
            BASE32_NOPAD.encode(&*seed).to_ascii_lowercase()
        )
    }

    /// Parses [`SecretKey::to_text`] output (surrounding whitespace ignored).
    pub fn from_text(s: &str) -> Result<Self> {
        let body = s.trim().strip_prefix(SECRET_PREFIX).ok_or_else(|| {
            Error::parse("secret key", format!("must start with `{SECRET_PREFIX}`"))
        })?;
        let raw = zeroize::Zeroizing::new(
            BASE32_NOPAD
                .decode(body.to_ascii_uppercase().as_bytes())
                .map_err(|e| Error::parse("secret key", e))?,
        );
        let seed: [u8; 32] = raw
            .as_slice()
            .try_into()
            .map_err(|_| Error::parse("secret key", "expected 32 bytes"))?;
        Ok(Self::from_seed(seed))
    }

    /// PKCS#8 v1 DER of the key, which is what rcgen/rustls want for TLS.
    pub fn pkcs8_der(&self) -> Vec<u8> {
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend_from_slice(&self.seed());
        der
    }

    /// Unwraps a key that was wrapped for this agent with [`wrap_key`].
    pub fn unwrap_key(&self, wrapped: &[u8]) -> Result<Key> {
        if wrapped.len() != 32 + 32 + crate::crypto::TAG_LEN {
            return Err(Error::Crypto("wrapped key has the wrong length"));
        }
        let mut eph = [0u8; 32];
        eph.copy_from_slice(&wrapped[..32]);
        let shared = MontgomeryPoint(eph).mul_clamped(self.0.to_scalar_bytes());
        let k = wrap_kdf(&shared.0, &eph, &self.agent_id());
        let mut buf = wrapped[32..].to_vec();
        k.open([0; 12], b"caravan key wrap", &mut buf)?;
        let out: [u8; 32] = buf
            .as_slice()
            .try_into()
            .map_err(|_| Error::Crypto("wrapped key has the wrong length"))?;
        Ok(Key(out))
    }
}

fn wrap_kdf(shared: &[u8; 32], eph: &[u8; 32], recipient: &AgentId) -> Key {
    let mut h = blake3::Hasher::new_derive_key(WRAP_CONTEXT);
    h.update(shared);
    h.update(eph);
    h.update(&recipient.0);
    Key(*h.finalize().as_bytes())
}

/// Encrypts `key` so that only `recipient` can read it (X25519 on the
/// recipient's ed25519 key converted to Montgomery form, then AES-256-GCM).
/// A fresh ephemeral key per wrap gives a unique AEAD key, so the nonce is fixed.
pub fn wrap_key(recipient: &AgentId, key: &Key) -> Result<Vec<u8>> {
    let mont = recipient.verifying_key()?.to_montgomery();
    let eph_secret: zeroize::Zeroizing<[u8; 32]> = zeroize::Zeroizing::new(random_bytes()?);
    let eph_public = MontgomeryPoint::mul_base_clamped(*eph_secret);
    let shared = mont.mul_clamped(*eph_secret);
    let k = wrap_kdf(&shared.0, &eph_public.0, recipient);
    let mut buf = key.0.to_vec();
    k.seal([0; 12], b"caravan key wrap", &mut buf)?;
    let mut out = eph_public.0.to_vec();
    out.extend_from_slice(&buf);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn agent_id_roundtrips_and_catches_typos() {
        let k = SecretKey::generate().unwrap();
        let id = k.agent_id();
        let text = id.to_string();
        assert!(text.starts_with("cv1-"));
        assert_eq!(text.parse::<AgentId>().unwrap(), id);
        assert_eq!(text.to_uppercase().parse::<AgentId>().unwrap(), id);
        assert_eq!(format!("  {text}\n").parse::<AgentId>().unwrap(), id);
        // flip one character
        let mut chars: Vec<char> = text.chars().collect();
        let i = 10;
        chars[i] = if chars[i] == 'a' { 'b' } else { 'a' };
        let typo: String = chars.into_iter().collect();
        assert!(typo.parse::<AgentId>().is_err());
        assert!("cv1-abc".parse::<AgentId>().is_err());
        assert!("hello".parse::<AgentId>().is_err());
    }

    #[test]
    fn secret_text_roundtrips() {
        let k = SecretKey::generate().unwrap();
        let k2 = SecretKey::from_text(&k.to_text()).unwrap();
        assert_eq!(k.agent_id(), k2.agent_id());
        assert!(!format!("{k:?}").contains(&k.to_text()[22..]));
        assert!(SecretKey::from_text("nope").is_err());
    }

    #[test]
    fn wrap_unwrap_only_for_recipient() {
        let alice = SecretKey::generate().unwrap();
        let bob = SecretKey::generate().unwrap();
        let key = Key::random().unwrap();
        let w = wrap_key(&bob.agent_id(), &key).unwrap();
        assert_eq!(bob.unwrap_key(&w).unwrap(), key);
        assert!(alice.unwrap_key(&w).is_err());
        let mut t = w.clone();
        t[40] ^= 1;
        assert!(bob.unwrap_key(&t).is_err());
    }

    proptest! {
        #[test]
        fn agent_id_text_roundtrips(seed in any::<[u8; 32]>()) {
            let id = SecretKey::from_seed(seed).agent_id();
            prop_assert_eq!(id.to_string().parse::<AgentId>().unwrap(), id);
        }

        #[test]
        fn agent_id_parse_never_panics(s in ".{0,80}") {
            let _ = s.parse::<AgentId>();
        }
    }
}
