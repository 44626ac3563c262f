//! Caravan agent library: identity, chunking and encryption, storage access,
//! the peer protocol, and the daemon that ties them together.
#![forbid(unsafe_code)]

pub mod chunk;
pub mod config;
pub mod crypto;
pub mod error;
pub mod identity;
pub mod manifest;
pub mod record;
pub mod store;

pub use error::{Error, Result};
