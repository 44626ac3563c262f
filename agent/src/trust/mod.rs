//! The web of trust: signed grants that chain, revocations that prune, and
//! announcements that say where an agent is. [`records`] defines the signed
//! values and their checks; [`engine`] answers "does A trust X, and why".

pub mod agent_trust;
pub mod engine;
pub mod records;

pub use engine::{Chain, GrantRef, RevocationSet, TrustEngine, render_tree, verify_chain};
pub use records::{
    Announcement, GrantId, Invalid, Reason, Revocation, TrustGrant, decode_record, share_locator,
};

/// Seconds since the Unix epoch (0 if the clock is before 1970), the time
/// base of every validity window.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
