//! The agent's configuration file (TOML). The operator renders this same type
//! into the agent's ConfigMap, so the two can never disagree on a field name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where the daemon listens by default for peers.
pub const DEFAULT_PEER_PORT: u16 = 7400;
/// Where the daemon listens by default for its admin API.
pub const DEFAULT_ADMIN_PORT: u16 = 7401;
/// Where the daemon serves `/metrics`, `/livez` and `/readyz` by default.
pub const DEFAULT_METRICS_PORT: u16 = 9400;
/// Prefix inside the user's storage where the agent keeps its own state.
pub const DEFAULT_STATE_PREFIX: &str = ".caravan/";

/// The whole agent configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// File holding the agent's secret key (`caravan-agent keygen` writes it).
    pub identity_file: PathBuf,
    /// File holding the bearer token that guards the admin API.
    pub admin_token_file: PathBuf,
    /// Address for the peer protocol (TLS, mutually authenticated).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Address for the admin API (HTTP, bearer token).
    #[serde(default = "default_admin_listen")]
    pub admin_listen: String,
    /// Address for `/metrics`, `/livez` and `/readyz`; empty disables it.
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: String,
    /// Addresses other agents should dial to reach this one (put into tickets
    /// and announcements). Defaults to `listen` when it is not a wildcard.
    #[serde(default)]
    pub advertise: Vec<String>,
    /// Repository (tracker) base URLs.
    #[serde(default)]
    pub repositories: Vec<String>,
    /// Prefix in the storage for the agent's own state.
    #[serde(default = "default_state_prefix")]
    pub state_prefix: String,
    /// Seconds between trust syncs (revocation feed, announcement renewal).
    /// Unset: [`DEFAULT_SYNC_INTERVAL_SECS`]. A revocation reaches this
    /// agent within about this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_interval_secs: Option<u64>,
    /// The user's storage.
    pub storage: StorageConfig,
}

/// Default seconds between trust syncs.
pub const DEFAULT_SYNC_INTERVAL_SECS: u64 = 10;

/// Which OpenDAL service holds the user's files, and how to reach it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// OpenDAL scheme: fs, memory, s3, gcs, azblob, gdrive, dropbox, onedrive, webdav.
    pub scheme: String,
    /// Non-secret options of the service (root, bucket, endpoint, region…).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// Secret options: a directory with one file per option (a mounted
    /// Kubernetes Secret) or a file of `key=value` lines. Never on the command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<PathBuf>,
}

fn default_listen() -> String {
    format!("0.0.0.0:{DEFAULT_PEER_PORT}")
}
fn default_admin_listen() -> String {
    format!("127.0.0.1:{DEFAULT_ADMIN_PORT}")
}
fn default_metrics_listen() -> String {
    format!("0.0.0.0:{DEFAULT_METRICS_PORT}")
}
fn default_state_prefix() -> String {
    DEFAULT_STATE_PREFIX.to_string()
}

impl AgentConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Self> {
        let cfg: AgentConfig = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Renders the configuration as TOML.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| Error::Config(e.to_string()))
    }

    /// Checks what can be checked without touching the network.
    pub fn validate(&self) -> Result<()> {
        check_scheme(&self.storage.scheme)?;
        for (name, addr) in [
            ("listen", &self.listen),
            ("admin_listen", &self.admin_listen),
        ] {
            addr.parse::<std::net::SocketAddr>()
                .map_err(|e| Error::Config(format!("{name} = {addr:?} is not an ip:port ({e})")))?;
        }
        if !self.metrics_listen.is_empty() {
            self.metrics_listen
                .parse::<std::net::SocketAddr>()
                .map_err(|e| {
                    Error::Config(format!(
                        "metrics_listen = {:?} is not an ip:port ({e})",
                        self.metrics_listen
                    ))
                })?;
        }
        for r in &self.repositories {
            if !(r.starts_with("http://") || r.starts_with("https://")) {
                return Err(Error::Config(format!(
                    "repository {r:?} must be an http(s) URL"
                )));
            }
        }
        if self.state_prefix.is_empty() || self.state_prefix.starts_with('/') {
            return Err(Error::Config(
                "state_prefix must be a relative path like `.caravan/`".into(),
            ));
        }
        Ok(())
    }
}

/// The OpenDAL services this build is compiled with.
pub const SCHEMES: &[&str] = &[
    "fs", "memory", "s3", "gcs", "azblob", "gdrive", "dropbox", "onedrive", "webdav",
];

/// Refuses a scheme this build cannot open, listing the ones it can.
pub fn check_scheme(scheme: &str) -> Result<()> {
    if SCHEMES.contains(&scheme) {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "unknown storage scheme {scheme:?}; this build supports: {}",
            SCHEMES.join(", ")
        )))
    }
}
