//! Caravan agent library: identity, chunking and encryption, storage access,
//! the peer protocol, and the daemon that ties them together.
#![forbid(unsafe_code)]

pub mod config;
pub mod crypto;
pub mod error;
pub mod identity;
pub mod record;
pub mod repository;
pub mod store;
pub mod trust;

pub use error::{Error, Result};
