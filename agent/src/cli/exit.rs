//! The exit codes a script can act on, decided where a failure is understood:
//! 0 success, 1 failure, 2 bad usage, 3 bad configuration or input,
//! 4 daemon unreachable, 5 transfer or verification failed.

/// Failure classes mapped to exit codes.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Exit {
    #[error("{0:#}")]
    Config(anyhow::Error),
    #[error("{0:#}")]
    Unreachable(anyhow::Error),
    #[error("{0:#}")]
    Transfer(anyhow::Error),
}
