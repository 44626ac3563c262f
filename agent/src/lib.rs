//! Caravan agent library: identity, chunking and encryption, storage access,
//! the peer protocol, and the daemon that ties them together.
#![forbid(unsafe_code)]

/// Serializes a 32-byte id as its text form for humans (JSON, TOML) and as
/// raw bytes for postcard, so APIs read well and records stay compact.
#[macro_export]
macro_rules! text_serde {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(
                &self,
                s: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.collect_str(self)
                } else {
                    serde::Serialize::serialize(&self.0, s)
                }
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(
                d: D,
            ) -> std::result::Result<Self, D::Error> {
                if d.is_human_readable() {
                    let s = <String as serde::Deserialize>::deserialize(d)?;
                    s.parse().map_err(serde::de::Error::custom)
                } else {
                    <[u8; 32] as serde::Deserialize>::deserialize(d).map(Self)
                }
            }
        }
    };
}

// Layers, bottom to top; each imports only those above it in this list
// (docs/architecture.md; checked by tests/layers.rs). Without the `node`
// feature only the light part is built: what the operator uses.
#[cfg(feature = "node")]
pub mod cdc;
pub mod chunk;
pub mod config;
#[cfg(feature = "node")]
pub mod conn_limits;
pub mod crypto;
pub mod daemon;
pub mod declare;
pub mod error;
pub mod identity;
#[cfg(feature = "node")]
pub mod manifest;
#[cfg(feature = "node")]
pub mod node;
pub mod pool;
#[cfg(feature = "process-metrics")]
pub mod process_metrics;
pub mod record;
#[cfg(feature = "node")]
pub mod repository;
#[cfg(feature = "node")]
pub mod store;
pub mod ticket;
#[cfg(feature = "node")]
pub mod trust;
pub mod util;
#[cfg(feature = "node")]
pub mod wire;

pub use error::{Error, Result};
