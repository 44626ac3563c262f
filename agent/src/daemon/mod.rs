//! The long-running agent: peer listener, admin API, metrics endpoint, and
//! resumption of interrupted fetches.

#[cfg(feature = "node")]
pub mod admin;
pub mod api;
#[cfg(feature = "node")]
mod serve;

#[cfg(feature = "node")]
pub use admin::{admin_router, admin_router_with, status};
#[cfg(feature = "node")]
pub use serve::{lock_held, lock_path, metrics_router, read_identity, read_token, run};
