//! One error type for the agent library, so callers can match on what went
//! wrong (a forged record, a missing share, a storage outage) instead of
//! parsing strings. Binaries wrap it in `anyhow` at the edge.

use std::fmt;

/// Everything the agent library can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Text that should be an agent id, share id, key or ticket is not one.
    #[error("invalid {what}: {reason}")]
    Parse { what: &'static str, reason: String },
    /// A signed record failed to decode, verify, or was of the wrong kind.
    #[error("rejected record: {0}")]
    Record(String),
    /// An AEAD open failed: wrong key or tampered bytes.
    #[error("decryption failed: {0}")]
    Crypto(&'static str),
    /// A chunk's bytes do not hash to the id that was asked for.
    #[error("chunk {id} failed verification: {reason}")]
    CorruptChunk { id: String, reason: String },
    /// The user's storage (through OpenDAL) failed.
    #[cfg(feature = "node")]
    #[error("storage error while {context}: {source}")]
    Storage {
        context: String,
        #[source]
        source: opendal::Error,
    },
    /// Local I/O (sockets, files outside storage) failed.
    #[error("i/o error while {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The peer protocol was violated or a peer answered with an error.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// No peer holding a share could be reached (or every one went away):
    /// said with the addresses tried and how to go on, not as a protocol
    /// fault. A transfer failure (CLI exit code 5), retried by a later fetch.
    #[error("{0}")]
    Unreachable(String),
    /// The thing asked for does not exist (or the asker may not know it does).
    #[error("not found: {0}")]
    NotFound(String),
    /// Configuration is missing or malformed.
    #[error("configuration error: {0}")]
    Config(String),
    /// A request the agent understood but will not do as asked, because of
    /// what was asked (a ticket for another agent, a destination inside the
    /// state folder, a publisher among its own recipients). Decided by the
    /// operation that understands the request; the admin API answers 400
    /// and the CLI exits 3 (bad input).
    #[error("{0}")]
    Rejected(String),
    /// Data from a peer or a publisher refused for cause (a replayed or
    /// forked manifest, a share larger than allowed): not retried.
    #[error("refused: {0}")]
    Refused(String),
    /// A TLS set-up problem (certificates, handshake).
    #[error("tls error: {0}")]
    Tls(String),
}

/// Shorthand used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// True when the caller gave bad input or configuration (admin API 400,
    /// CLI exit 3), as opposed to a failure along the way.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Error::Parse { .. } | Error::Config(_) | Error::Record(_) | Error::Rejected(_)
        )
    }

    /// Builds a parse error, used by every `FromStr` of a textual identifier.
    pub fn parse(what: &'static str, reason: impl fmt::Display) -> Self {
        Error::Parse {
            what,
            reason: reason.to_string(),
        }
    }
}

/// Adds context to OpenDAL and I/O results without repeating `map_err` closures.
pub trait Context<T> {
    /// Attaches a description of what was being done when the error happened.
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

#[cfg(feature = "node")]
impl<T> Context<T> for std::result::Result<T, opendal::Error> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Storage {
            context: context(),
            source,
        })
    }
}

impl<T> Context<T> for std::result::Result<T, std::io::Error> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}
