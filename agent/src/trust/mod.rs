//! The web of trust: signed grants that chain, revocations that prune, and
//! announcements that say where an agent is. [`records`] defines the signed
//! values and their checks; [`engine`] answers "does A trust X, and why".

pub mod engine;
pub mod records;
pub mod seed;

pub use engine::{Chain, GrantRef, RevocationSet, TrustEngine, render_tree, verify_chain};
pub use records::{
    Announcement, GrantId, Invalid, MAX_GRANT_DEPTH, MAX_GRANT_VALIDITY_SECS, Reason, Revocation,
    TrustGrant, check_grant_depth, check_grant_scope, check_grant_validity_secs, decode_record,
    share_locator,
};
pub use seed::{SeedIndex, SeedRecord};
