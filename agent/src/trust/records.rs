//! The three signed records of the trust layer — grants, revocations and
//! announcements — and the checks every reader applies before using one.
//!
//! These values travel inside [`SignedRecord`]s, so they are signed,
//! domain-separated and canonical already; what this module adds is the
//! *meaning*: the signer must be the issuer (or the announcing agent),
//! validity windows must make sense, and nothing may claim to be valid for
//! longer than we are willing to remember it.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::identity::AgentId;
use crate::record::{Kind, Record, SignedRecord};
use crate::util::{hex, parse_hex32};

/// Longest validity we accept for a grant (from now): one year. A longer
/// claim would outlive any sensible key rotation and is refused outright.
pub const MAX_GRANT_VALIDITY_SECS: u64 = 366 * 24 * 3600;
/// Deepest a grant may let its subject vouch further (hops). Agents search
/// chains of at most this many grants, so a deeper grant would promise what
/// no check ever grants.
pub const MAX_GRANT_DEPTH: u8 = 8;
/// Longest an announcement may claim to stay current (from now). Agents
/// re-announce long before this; a stale address book is worse than none.
pub const MAX_ANNOUNCEMENT_TTL_SECS: u64 = 31 * 24 * 3600;
/// Clock difference tolerated between machines for "not before" style checks.
pub const MAX_CLOCK_SKEW_SECS: u64 = 300;
/// Longest scope string of a grant, in bytes.
pub const MAX_SCOPE_LEN: usize = 128;
/// Most addresses one announcement may list, and the longest one: the
/// same limits as a ticket's and an agent's own (`config`).
pub use crate::config::{MAX_ADDRESS_LEN, MAX_ADDRESSES};
/// Most share locators one announcement may list (keeps it under the
/// 64 KiB announcement body limit with room to spare).
pub const MAX_LOCATORS: usize = 1024;

const GRANT_ID_CONTEXT: &str = "caravan 2026 trust grant id v1";
const SHARE_LOCATOR_CONTEXT: &str = "caravan 2026 share locator v1";

/// Checks the validity an agent is asked to sign a grant for (seconds from
/// now) against what every repository accepts: at least one second, at
/// most [`MAX_GRANT_VALIDITY_SECS`] (366 days). The error names the limit.
pub fn check_grant_validity_secs(secs: u64) -> Result<(), String> {
    if secs == 0 {
        return Err(
            "a grant must be valid for at least 1 second (expires 0 is an empty window)".into(),
        );
    }
    if secs > MAX_GRANT_VALIDITY_SECS {
        return Err(format!(
            "a grant may be valid for at most {} days ({MAX_GRANT_VALIDITY_SECS} s): repositories \
             refuse a longer one as far_future; asked for {secs} s (~{} days)",
            MAX_GRANT_VALIDITY_SECS / 86400,
            secs / 86400
        ));
    }
    Ok(())
}

/// Checks a grant's depth against [`MAX_GRANT_DEPTH`]. The error names the limit.
pub fn check_grant_depth(depth: u8) -> Result<(), String> {
    if depth > MAX_GRANT_DEPTH {
        return Err(format!(
            "a grant's depth may be at most {MAX_GRANT_DEPTH} (chains are searched {MAX_GRANT_DEPTH} hops deep); asked for {depth}"
        ));
    }
    Ok(())
}

/// Checks a grant's scope: 1..=[`MAX_SCOPE_LEN`] bytes. The error names the limit.
pub fn check_grant_scope(scope: Option<&str>) -> Result<(), String> {
    if let Some(s) = scope
        && (s.is_empty() || s.len() > MAX_SCOPE_LEN)
    {
        return Err(format!(
            "a grant's scope must be 1..={MAX_SCOPE_LEN} bytes, got {}",
            s.len()
        ));
    }
    Ok(())
}

// Wire layout of a SignedRecord (see crate::record): magic(3) version(1)
// kind(1) signer(32) body length(4), body, signature(64).
const RECORD_HEADER_LEN: usize = 41;
const RECORD_SIG_LEN: usize = 64;

/// Why a record was refused. Repositories count refusals by this reason and
/// map it to an HTTP status; agents log it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Not a well-formed record (bad magic, version, length, non-canonical body).
    Malformed,
    /// The signature does not verify (or the signer is not a valid key).
    Forged,
    /// Bigger than the limit for its kind, or too many items inside.
    Oversize,
    /// Signed by someone other than the issuer / announcing agent.
    WrongSigner,
    /// A record of a kind this endpoint does not take.
    WrongKind,
    /// Its validity window is over.
    Expired,
    /// Claims validity (or a timestamp) too far in the future.
    FarFuture,
    /// Not newer than what is already stored for the same key (a replay).
    Stale,
    /// The grant was revoked by its issuer.
    Revoked,
    /// No valid chain of grants leads from the root to the target.
    Untrusted,
    /// A revocation names a grant that is not stored here.
    UnknownGrant,
    /// The issuer already has as many records here as allowed.
    TooMany,
}

impl Reason {
    /// A stable snake_case name, used in metrics labels and JSON error bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::Forged => "forged",
            Reason::Oversize => "oversize",
            Reason::WrongSigner => "wrong_signer",
            Reason::WrongKind => "wrong_kind",
            Reason::Expired => "expired",
            Reason::FarFuture => "far_future",
            Reason::Stale => "stale",
            Reason::Revoked => "revoked",
            Reason::Untrusted => "untrusted",
            Reason::UnknownGrant => "unknown_grant",
            Reason::TooMany => "too_many",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record that failed a trust-layer check: the reason (for metrics and
/// status codes) and a human-readable detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Invalid {
    /// The category of the failure.
    pub reason: Reason,
    /// What exactly was wrong.
    pub detail: String,
}

impl Invalid {
    /// Builds an [`Invalid`] from a reason and a detail.
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Invalid {
            reason,
            detail: detail.into(),
        }
    }
}

impl From<Invalid> for Error {
    fn from(e: Invalid) -> Self {
        Error::Record(e.to_string())
    }
}

/// Identifies a grant: BLAKE3 (derive_key) of issuer, subject and sequence
/// number. It does not depend on the signature, so a revocation can name a
/// grant its issuer no longer has the bytes of, and re-signing the same
/// (issuer, subject, seq) cannot dodge a revocation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GrantId(pub [u8; 32]);

impl GrantId {
    /// The id of the grant `issuer → subject` with sequence number `seq`.
    pub fn of(issuer: &AgentId, subject: &AgentId, seq: u64) -> Self {
        let mut h = blake3::Hasher::new_derive_key(GRANT_ID_CONTEXT);
        h.update(&issuer.0);
        h.update(&subject.0);
        h.update(&seq.to_be_bytes());
        GrantId(*h.finalize().as_bytes())
    }

    /// Lowercase hex, as used in URLs and storage paths.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Parses [`GrantId::to_hex`] output.
    pub fn from_hex(s: &str) -> crate::Result<Self> {
        parse_hex32(s)
            .map(GrantId)
            .ok_or_else(|| Error::parse("grant id", "expected 64 hex characters"))
    }
}

impl fmt::Display for GrantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for GrantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GrantId({})", &self.to_hex()[..16])
    }
}

/// The locator a repository sees for a share: BLAKE3 derive_key of the share
/// id. Holders announce locators, seekers look locators up, and the
/// repository never learns which share id (and so which publisher's ticket)
/// a locator stands for.
pub fn share_locator(share_id: &[u8; 32]) -> [u8; 32] {
    blake3::derive_key(SHARE_LOCATOR_CONTEXT, share_id)
}

/// A vouch: `issuer` trusts `subject`, and lets `subject` vouch `depth`
/// further hops, within `scope` (None: any), from `not_before` to `not_after`
/// (unix seconds, half-open). `seq` orders re-issued grants for the same pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustGrant {
    /// Who vouches (must be the record's signer).
    pub issuer: AgentId,
    /// Who is vouched for.
    pub subject: AgentId,
    /// How many further hops the subject may vouch (0: trusted, cannot vouch).
    pub depth: u8,
    /// What the trust is for; None applies to everything.
    pub scope: Option<String>,
    /// Start of validity (unix seconds, inclusive).
    pub not_before: u64,
    /// End of validity (unix seconds, exclusive).
    pub not_after: u64,
    /// Sequence number; a higher one replaces an older grant for the same pair.
    pub seq: u64,
}

impl Record for TrustGrant {
    const KIND: Kind = Kind::TrustGrant;
}

impl TrustGrant {
    /// This grant's id (see [`GrantId`]).
    pub fn id(&self) -> GrantId {
        GrantId::of(&self.issuer, &self.subject, self.seq)
    }

    /// Checks what does not depend on the clock: no self-grant, a sane
    /// window, a bounded scope.
    pub fn check_well_formed(&self) -> Result<(), Invalid> {
        if self.issuer == self.subject {
            return Err(Invalid::new(
                Reason::Malformed,
                "an agent cannot vouch for itself",
            ));
        }
        if self.not_before >= self.not_after {
            return Err(Invalid::new(
                Reason::Malformed,
                format!(
                    "validity window is empty (not_before {} >= not_after {})",
                    self.not_before, self.not_after
                ),
            ));
        }
        if let Some(s) = &self.scope
            && (s.is_empty() || s.len() > MAX_SCOPE_LEN)
        {
            return Err(Invalid::new(
                Reason::Oversize,
                format!("scope must be 1..={MAX_SCOPE_LEN} bytes, got {}", s.len()),
            ));
        }
        Ok(())
    }

    /// Checks the window against `now`: not expired, and not claiming
    /// validity more than [`MAX_GRANT_VALIDITY_SECS`] ahead. A grant whose
    /// window has not started yet passes (it is stored, just not used yet).
    pub fn check_window(&self, now: u64) -> Result<(), Invalid> {
        if self.not_after <= now {
            return Err(Invalid::new(
                Reason::Expired,
                format!("grant expired at {} (now {now})", self.not_after),
            ));
        }
        if self.not_after > now.saturating_add(MAX_GRANT_VALIDITY_SECS) {
            return Err(Invalid::new(
                Reason::FarFuture,
                format!(
                    "grant claims validity until {}, more than {} days ahead",
                    self.not_after,
                    MAX_GRANT_VALIDITY_SECS / 86400
                ),
            ));
        }
        Ok(())
    }

    /// True when the grant may be used at `now` (inside its window and not
    /// claiming too long a validity).
    pub fn is_active(&self, now: u64) -> bool {
        self.not_before <= now.saturating_add(MAX_CLOCK_SKEW_SECS) && self.check_window(now).is_ok()
    }

    /// Opens a verified record as a grant and checks that its signer is the
    /// issuer and that it is well formed (the clock is not consulted).
    pub fn from_record(rec: &SignedRecord) -> Result<Self, Invalid> {
        let g: TrustGrant = open_kind(rec)?;
        if g.issuer != rec.signer {
            return Err(Invalid::new(
                Reason::WrongSigner,
                format!(
                    "grant by {} is signed by {}",
                    g.issuer.short(),
                    rec.signer.short()
                ),
            ));
        }
        g.check_well_formed()?;
        Ok(g)
    }
}

/// Withdrawal of a grant. Only meaningful when signed by the grant's issuer:
/// a revocation naming somebody else's grant is ignored by every reader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Who revokes (must be the record's signer and the grant's issuer).
    pub issuer: AgentId,
    /// The revoked grant.
    pub grant_id: GrantId,
    /// Sequence number (repositories refuse a replay with a lower or equal one).
    pub seq: u64,
    /// When it was revoked (unix seconds; informational, revocation is forever).
    pub revoked_at: u64,
}

impl Record for Revocation {
    const KIND: Kind = Kind::Revocation;
}

impl Revocation {
    /// Opens a verified record as a revocation and checks the signer is the issuer.
    pub fn from_record(rec: &SignedRecord) -> Result<Self, Invalid> {
        let r: Revocation = open_kind(rec)?;
        if r.issuer != rec.signer {
            return Err(Invalid::new(
                Reason::WrongSigner,
                format!(
                    "revocation by {} is signed by {}",
                    r.issuer.short(),
                    rec.signer.short()
                ),
            ));
        }
        Ok(r)
    }

    /// Refuses a revocation dated in the future (beyond clock skew).
    pub fn check_time(&self, now: u64) -> Result<(), Invalid> {
        if self.revoked_at > now.saturating_add(MAX_CLOCK_SKEW_SECS) {
            return Err(Invalid::new(
                Reason::FarFuture,
                format!(
                    "revocation dated {} is in the future (now {now})",
                    self.revoked_at
                ),
            ));
        }
        Ok(())
    }
}

/// An agent saying where it can be reached and which shares (by locator) it
/// holds, until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// The announcing agent (must be the record's signer).
    pub agent: AgentId,
    /// Addresses peers should dial (host:port or URLs).
    pub addresses: Vec<String>,
    /// Share locators (see [`share_locator`]) of the shares it holds.
    pub locators: Vec<[u8; 32]>,
    /// Sequence number; a higher one replaces the previous announcement.
    /// Repositories refuse anything not newer than what they hold, so use a
    /// clock-derived value (e.g. unix milliseconds) that survives restarts.
    pub seq: u64,
    /// Unix seconds after which the announcement is ignored.
    pub expires_at: u64,
}

impl Record for Announcement {
    const KIND: Kind = Kind::Announcement;
}

impl Announcement {
    /// Checks the bounds that do not depend on the clock.
    pub fn check_well_formed(&self) -> Result<(), Invalid> {
        if self.addresses.len() > MAX_ADDRESSES {
            return Err(Invalid::new(
                Reason::Oversize,
                format!("{} addresses (limit {MAX_ADDRESSES})", self.addresses.len()),
            ));
        }
        if let Some(a) = self
            .addresses
            .iter()
            .find(|a| a.is_empty() || a.len() > MAX_ADDRESS_LEN)
        {
            return Err(Invalid::new(
                Reason::Oversize,
                format!(
                    "address of {} bytes (must be 1..={MAX_ADDRESS_LEN})",
                    a.len()
                ),
            ));
        }
        if self.locators.len() > MAX_LOCATORS {
            return Err(Invalid::new(
                Reason::Oversize,
                format!("{} locators (limit {MAX_LOCATORS})", self.locators.len()),
            ));
        }
        Ok(())
    }

    /// Checks the expiry against `now`: not past, not too far ahead.
    pub fn check_window(&self, now: u64) -> Result<(), Invalid> {
        if self.expires_at <= now {
            return Err(Invalid::new(
                Reason::Expired,
                format!("announcement expired at {} (now {now})", self.expires_at),
            ));
        }
        if self.expires_at > now.saturating_add(MAX_ANNOUNCEMENT_TTL_SECS) {
            return Err(Invalid::new(
                Reason::FarFuture,
                format!(
                    "announcement claims to be current until {}, more than {} days ahead",
                    self.expires_at,
                    MAX_ANNOUNCEMENT_TTL_SECS / 86400
                ),
            ));
        }
        Ok(())
    }

    /// Opens a verified record as an announcement, checking signer and bounds.
    pub fn from_record(rec: &SignedRecord) -> Result<Self, Invalid> {
        let a: Announcement = open_kind(rec)?;
        if a.agent != rec.signer {
            return Err(Invalid::new(
                Reason::WrongSigner,
                format!(
                    "announcement for {} is signed by {}",
                    a.agent.short(),
                    rec.signer.short()
                ),
            ));
        }
        a.check_well_formed()?;
        Ok(a)
    }
}

pub(crate) fn open_kind<T: Record>(rec: &SignedRecord) -> Result<T, Invalid> {
    if rec.kind != T::KIND {
        return Err(Invalid::new(
            Reason::WrongKind,
            format!(
                "expected a {} record, got a {}",
                T::KIND.tag(),
                rec.kind.tag()
            ),
        ));
    }
    rec.open::<T>()
        .map_err(|e| Invalid::new(Reason::Malformed, e.to_string()))
}

/// Decodes and verifies record bytes from the network, classifying the
/// failure (malformed, oversize, forged) so callers can report it precisely.
/// The signature is always checked (by [`SignedRecord::from_bytes`]).
pub fn decode_record(bytes: &[u8]) -> Result<SignedRecord, Invalid> {
    if bytes.len() < RECORD_HEADER_LEN + RECORD_SIG_LEN {
        return Err(Invalid::new(
            Reason::Malformed,
            format!("{} bytes is too short for a record", bytes.len()),
        ));
    }
    if &bytes[..3] != b"CVR" {
        return Err(Invalid::new(
            Reason::Malformed,
            "not a Caravan record (bad magic)",
        ));
    }
    let kind = bytes[4];
    let len = u32::from_be_bytes([bytes[37], bytes[38], bytes[39], bytes[40]]) as usize;
    let max = [Kind::Announcement, Kind::TrustGrant, Kind::Revocation]
        .into_iter()
        .find(|k| *k as u8 == kind)
        .map(|k| k.max_body());
    if let Some(max) = max
        && (len > max || bytes.len() > RECORD_HEADER_LEN + max + RECORD_SIG_LEN)
    {
        return Err(Invalid::new(
            Reason::Oversize,
            format!("record body of {len} bytes exceeds the {max} byte limit"),
        ));
    }
    if bytes.len()
        != RECORD_HEADER_LEN
            .saturating_add(len)
            .saturating_add(RECORD_SIG_LEN)
    {
        // Let the canonical decoder name the problem (version, kind, length).
        return Err(match SignedRecord::from_bytes(bytes) {
            Err(e) => Invalid::new(Reason::Malformed, e.to_string()),
            Ok(_) => Invalid::new(Reason::Malformed, "length field does not match"),
        });
    }
    match SignedRecord::from_bytes(bytes) {
        Ok(r) => Ok(r),
        Err(Error::Record(msg)) if msg.contains("signature") => {
            Err(Invalid::new(Reason::Forged, msg))
        }
        Err(Error::Parse { reason, .. }) => Err(Invalid::new(
            Reason::Forged,
            format!("signer is not a valid public key: {reason}"),
        )),
        Err(e) => Err(Invalid::new(Reason::Malformed, e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;
    use proptest::prelude::*;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    fn grant(i: &SecretKey, s: &SecretKey, depth: u8) -> TrustGrant {
        TrustGrant {
            issuer: i.agent_id(),
            subject: s.agent_id(),
            depth,
            scope: Some("photos".into()),
            not_before: 1_000,
            not_after: 2_000,
            seq: 7,
        }
    }

    #[test]
    fn grant_roundtrip_and_signer_check() {
        let (a, b) = (key(1), key(2));
        let g = grant(&a, &b, 3);
        let rec = SignedRecord::seal(&a, &g).unwrap();
        let back = TrustGrant::from_record(&decode_record(&rec.to_bytes()).unwrap()).unwrap();
        assert_eq!(back, g);
        assert_eq!(back.id(), GrantId::of(&a.agent_id(), &b.agent_id(), 7));
        // b signs a grant claiming to be from a
        let forged = SignedRecord::seal(&b, &g).unwrap();
        assert_eq!(
            TrustGrant::from_record(&forged).unwrap_err().reason,
            Reason::WrongSigner
        );
    }

    #[test]
    fn windows() {
        let g = grant(&key(1), &key(2), 0);
        assert!(g.is_active(1_500));
        assert!(!g.is_active(2_000));
        assert!(!g.is_active(100));
        assert_eq!(g.check_window(2_000).unwrap_err().reason, Reason::Expired);
        let far = TrustGrant {
            not_after: 1_500 + MAX_GRANT_VALIDITY_SECS + 1,
            ..g.clone()
        };
        assert_eq!(
            far.check_window(1_500).unwrap_err().reason,
            Reason::FarFuture
        );
        let empty = TrustGrant {
            not_before: 2_000,
            ..g.clone()
        };
        assert!(empty.check_well_formed().is_err());
        let selfg = TrustGrant {
            subject: g.issuer,
            ..g
        };
        assert!(selfg.check_well_formed().is_err());
    }

    #[test]
    fn announcement_checks() {
        let a = key(1);
        let ann = Announcement {
            agent: a.agent_id(),
            addresses: vec!["10.0.0.1:7400".into()],
            locators: vec![share_locator(&[9; 32])],
            seq: 1,
            expires_at: 5_000,
        };
        let rec = SignedRecord::seal(&a, &ann).unwrap();
        assert_eq!(Announcement::from_record(&rec).unwrap(), ann);
        assert!(ann.check_window(4_000).is_ok());
        assert_eq!(ann.check_window(5_000).unwrap_err().reason, Reason::Expired);
        let many = Announcement {
            addresses: vec!["x".into(); MAX_ADDRESSES + 1],
            ..ann.clone()
        };
        assert_eq!(
            many.check_well_formed().unwrap_err().reason,
            Reason::Oversize
        );
        let other = SignedRecord::seal(&key(2), &ann).unwrap();
        assert_eq!(
            Announcement::from_record(&other).unwrap_err().reason,
            Reason::WrongSigner
        );
        // kinds are not interchangeable
        assert_eq!(
            TrustGrant::from_record(&rec).unwrap_err().reason,
            Reason::WrongKind
        );
    }

    #[test]
    fn locator_hides_share_id() {
        let id = [5u8; 32];
        assert_ne!(share_locator(&id), id);
        assert_eq!(share_locator(&id), share_locator(&id));
        assert_ne!(share_locator(&id), share_locator(&[6; 32]));
    }

    #[test]
    fn hex_roundtrip() {
        let g = GrantId([0xab; 32]);
        assert_eq!(GrantId::from_hex(&g.to_hex()).unwrap(), g);
        assert!(GrantId::from_hex("zz").is_err());
        assert!(parse_hex32(&"g".repeat(64)).is_none());
    }

    #[test]
    fn decode_classifies() {
        let a = key(1);
        let rec = SignedRecord::seal(&a, &grant(&a, &key(2), 1)).unwrap();
        let mut bytes = rec.to_bytes();
        let n = bytes.len();
        bytes[n - 1] ^= 1;
        assert_eq!(decode_record(&bytes).unwrap_err().reason, Reason::Forged);
        assert_eq!(
            decode_record(b"nope").unwrap_err().reason,
            Reason::Malformed
        );
        let mut big = rec.to_bytes();
        big[37..41].copy_from_slice(&(1u32 << 20).to_be_bytes());
        assert_eq!(decode_record(&big).unwrap_err().reason, Reason::Oversize);
    }

    fn grant_strategy() -> impl Strategy<Value = TrustGrant> {
        (
            any::<u8>(),
            any::<u8>(),
            any::<u8>(),
            proptest::option::of("[a-z]{1,20}"),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(|(i, s, depth, scope, nb, na, seq)| TrustGrant {
                issuer: key(i).agent_id(),
                subject: key(s).agent_id(),
                depth,
                scope,
                not_before: nb,
                not_after: na,
                seq,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn grant_codec_roundtrips(g in grant_strategy()) {
            let k = key(0);
            let rec = SignedRecord::seal(&k, &g).unwrap();
            let back: TrustGrant = SignedRecord::from_bytes(&rec.to_bytes()).unwrap().open().unwrap();
            prop_assert_eq!(back, g);
        }

        #[test]
        fn revocation_and_announcement_codecs_roundtrip(
            seq in any::<u64>(), at in any::<u64>(), id in any::<[u8; 32]>(),
            addrs in proptest::collection::vec("[a-z0-9.:]{1,30}", 0..4),
            locs in proptest::collection::vec(any::<[u8; 32]>(), 0..8),
        ) {
            let k = key(3);
            let r = Revocation { issuer: k.agent_id(), grant_id: GrantId(id), seq, revoked_at: at };
            let rec = SignedRecord::seal(&k, &r).unwrap();
            prop_assert_eq!(Revocation::from_record(&decode_record(&rec.to_bytes()).unwrap()).unwrap(), r);
            let a = Announcement { agent: k.agent_id(), addresses: addrs, locators: locs, seq, expires_at: at };
            let rec = SignedRecord::seal(&k, &a).unwrap();
            prop_assert_eq!(Announcement::from_record(&decode_record(&rec.to_bytes()).unwrap()).unwrap(), a);
        }

        #[test]
        fn every_bit_flip_of_a_grant_is_rejected(g in grant_strategy(), bit in any::<proptest::sample::Index>()) {
            let k = key(9);
            let bytes = SignedRecord::seal(&k, &g).unwrap().to_bytes();
            let i = bit.index(bytes.len() * 8);
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            // Codec level: decoding plus opening the body must fail, with no
            // semantic check (signer == issuer) helping out.
            let res = decode_record(&b).and_then(|r| {
                r.open::<TrustGrant>().map_err(|e| Invalid::new(Reason::Malformed, e.to_string()))
            });
            prop_assert!(res.is_err(), "bit {} flip accepted", i);
        }

        #[test]
        fn decoders_never_panic_on_arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(r) = decode_record(&b) {
                let _ = TrustGrant::from_record(&r);
                let _ = Revocation::from_record(&r);
                let _ = Announcement::from_record(&r);
            }
        }

        #[test]
        fn decoders_never_panic_on_valid_header_garbage(
            kind in 0u8..8, body in proptest::collection::vec(any::<u8>(), 0..200), sig in any::<[u8; 32]>()
        ) {
            let mut b = b"CVR\x01".to_vec();
            b.push(kind);
            b.extend_from_slice(&key(1).agent_id().0);
            b.extend_from_slice(&(body.len() as u32).to_be_bytes());
            b.extend_from_slice(&body);
            b.extend_from_slice(&sig);
            b.extend_from_slice(&sig);
            prop_assert!(decode_record(&b).is_err());
        }
    }

    #[test]
    fn bit_flips_of_each_kind_rejected() {
        let a = key(1);
        let recs = [
            SignedRecord::seal(&a, &grant(&a, &key(2), 1))
                .unwrap()
                .to_bytes(),
            SignedRecord::seal(
                &a,
                &Revocation {
                    issuer: a.agent_id(),
                    grant_id: GrantId([1; 32]),
                    seq: 1,
                    revoked_at: 10,
                },
            )
            .unwrap()
            .to_bytes(),
            SignedRecord::seal(
                &a,
                &Announcement {
                    agent: a.agent_id(),
                    addresses: vec!["a:1".into()],
                    locators: vec![[2; 32]],
                    seq: 1,
                    expires_at: 10,
                },
            )
            .unwrap()
            .to_bytes(),
        ];
        for bytes in recs {
            // One bit in every other byte (a different bit position each time) keeps this
            // fast in debug builds; record.rs flips every bit of its sample.
            for byte in (0..bytes.len()).step_by(2) {
                let i = byte * 8 + (byte / 2) % 8;
                let mut b = bytes.clone();
                b[i / 8] ^= 1 << (i % 8);
                let ok = decode_record(&b).ok().and_then(|r| {
                    TrustGrant::from_record(&r)
                        .ok()
                        .map(|_| ())
                        .or(Revocation::from_record(&r).ok().map(|_| ()))
                        .or(Announcement::from_record(&r).ok().map(|_| ()))
                });
                assert!(ok.is_none(), "bit {i} flip accepted");
            }
        }
    }
}
