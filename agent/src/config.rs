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
    /// For `fs`: the most bytes the root may hold, when that is less than
    /// its filesystem's free space says (a Kubernetes emptyDir's
    /// `sizeLimit`, past which the kubelet evicts the pod). A fetch that
    /// would go over it is refused before anything is written, like one
    /// over the disk's free space. The operator sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_limit: Option<u64>,
}

impl StorageConfig {
    /// The folder a local-disk (`fs`) storage is rooted at; `None` for any
    /// other service.
    pub fn fs_root(&self) -> Option<PathBuf> {
        (self.scheme == "fs")
            .then(|| self.options.get("root").map(PathBuf::from))
            .flatten()
    }
}

fn default_listen() -> String {
    format!("0.0.0.0:{DEFAULT_PEER_PORT}")
}
fn default_admin_listen() -> String {
    format!("127.0.0.1:{DEFAULT_ADMIN_PORT}")
}
fn default_metrics_listen() -> String {
    format!("127.0.0.1:{DEFAULT_METRICS_PORT}")
}
/// A TOML error by its position and reason, never quoting the file: a
/// key file or an admin token given as `--config` by mistake would be
/// printed (and logged, and put in `--json` output) otherwise.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let at = e
        .span()
        .map(|span| {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!(" at line {line}, column {column}")
        })
        .unwrap_or_default();
    format!(
        "not a valid agent configuration (TOML){at}: {}",
        e.message().trim_end()
    )
}

fn default_state_prefix() -> String {
    DEFAULT_STATE_PREFIX.to_string()
}

/// A listen address is `ip:port`, `[ipv6]:port` or `host:port` (the name is
/// resolved when the daemon binds, e.g. `localhost:7400`).
fn check_listen(name: &str, addr: &str) -> Result<()> {
    if is_host_port(addr) {
        return Ok(());
    }
    Err(Error::Config(format!(
        "{name} = {addr:?} is not host:port (e.g. 0.0.0.0:7400, [::]:7400 or localhost:7400)"
    )))
}

/// `ip:port`, `[ipv6]:port` or `host:port` (a peer's or a listen address).
pub fn is_host_port(addr: &str) -> bool {
    if addr.parse::<std::net::SocketAddr>().is_ok() {
        return true;
    }
    let valid_host = |h: &str| {
        !h.is_empty()
            && h.len() <= 253
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    };
    matches!(addr.rsplit_once(':'), Some((host, port)) if valid_host(host) && port.parse::<u16>().is_ok())
}

impl AgentConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| match e {
            // One "configuration error:" prefix, not one per layer.
            Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
            other => Error::Config(format!("{}: {other}", path.display())),
        })
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Self> {
        let cfg: AgentConfig =
            toml::from_str(text).map_err(|e| Error::Config(toml_error(text, &e)))?;
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
        check_listen("listen", &self.listen)?;
        check_listen("admin_listen", &self.admin_listen)?;
        if !self.metrics_listen.is_empty() {
            check_listen("metrics_listen", &self.metrics_listen)?;
        }
        check_distinct(&[
            ("listen", &self.listen),
            ("admin_listen", &self.admin_listen),
            ("metrics_listen", &self.metrics_listen),
        ])?;
        if self.advertise.len() > MAX_ADDRESSES {
            return Err(Error::Config(format!(
                "advertise lists {} addresses: at most {MAX_ADDRESSES} (tickets and \
                 announcements carry no more)",
                self.advertise.len()
            )));
        }
        for a in &self.advertise {
            if a.len() > MAX_ADDRESS_LEN || !is_host_port(a) {
                return Err(Error::Config(format!(
                    "advertise address {a:?} is not host:port of at most {MAX_ADDRESS_LEN} bytes"
                )));
            }
        }
        if self.repositories.len() > MAX_REPOSITORIES {
            return Err(Error::Config(format!(
                "{} repositories: at most {MAX_REPOSITORIES}",
                self.repositories.len()
            )));
        }
        for r in &self.repositories {
            if r.len() > MAX_ADDRESS_LEN {
                return Err(Error::Config(format!(
                    "repository URL of {} bytes: at most {MAX_ADDRESS_LEN}",
                    r.len()
                )));
            }
            if !(r.starts_with("http://") || r.starts_with("https://")) {
                return Err(Error::Config(format!(
                    "repository {r:?} must be an http(s) URL"
                )));
            }
        }
        check_state_prefix(&self.state_prefix)
    }
}

/// Most peer addresses a ticket (or an agent's announcement) may list: a
/// fetch dials each (a silent one costs its connect and handshake limits),
/// so a ticket of a thousand silent addresses would hold a fetch for
/// hours. An agent advertises at most this many.
pub const MAX_ADDRESSES: usize = 16;
/// Most repository URLs a ticket may list (each is asked for the share's
/// offline seed) and an agent may use.
pub const MAX_REPOSITORIES: usize = 16;
/// Longest address or repository URL, in bytes.
pub const MAX_ADDRESS_LEN: usize = 256;

/// Refuses two listeners on one port (the second would fail to bind at
/// start with "taken", as if another daemon held it): the same address,
/// or the same port where one listens on every address. `localhost` is
/// every loopback address (it is how a user writes 127.0.0.1 or ::1);
/// other host names are compared as written, since resolving them would
/// touch the network. Port 0 (any free port) and an empty (off) listener
/// never clash.
fn check_distinct(listeners: &[(&str, &String)]) -> Result<()> {
    for (i, (a, x)) in listeners.iter().enumerate() {
        for (b, y) in &listeners[i + 1..] {
            if x.is_empty() || y.is_empty() {
                continue;
            }
            let clash = match (listen_parts(x), listen_parts(y)) {
                (Some((p, port_p)), Some((q, port_q))) => {
                    port_p != 0 && port_p == port_q && same_host(&p, &q)
                }
                _ => x == y,
            };
            if clash {
                return Err(Error::Config(format!(
                    "{a} ({x}) and {b} ({y}) would listen on the same port: give each its own"
                )));
            }
        }
    }
    Ok(())
}

/// A listener's host and port, the host an address when it is one.
enum ListenHost {
    Ip(std::net::IpAddr),
    Name(String),
}

fn listen_parts(v: &str) -> Option<(ListenHost, u16)> {
    if let Ok(a) = v.parse::<std::net::SocketAddr>() {
        return Some((ListenHost::Ip(a.ip()), a.port()));
    }
    let (host, port) = v.rsplit_once(':')?;
    let port = port.parse().ok()?;
    Some((ListenHost::Name(host.to_ascii_lowercase()), port))
}

/// Whether two listeners' hosts may bind the same address: equal, one of
/// them every address, or `localhost` and a loopback address.
fn same_host(p: &ListenHost, q: &ListenHost) -> bool {
    let loopback_name = |n: &str| n == "localhost" || n.ends_with(".localhost");
    match (p, q) {
        (ListenHost::Ip(p), ListenHost::Ip(q)) => {
            p == q || p.is_unspecified() || q.is_unspecified()
        }
        (ListenHost::Ip(ip), ListenHost::Name(n)) | (ListenHost::Name(n), ListenHost::Ip(ip)) => {
            ip.is_unspecified() || (ip.is_loopback() && loopback_name(n))
        }
        (ListenHost::Name(p), ListenHost::Name(q)) => {
            p == q || (loopback_name(p) && loopback_name(q))
        }
    }
}

/// Refuses a `state_prefix` that is not a plain relative folder (`.caravan/`,
/// `a/b`): every check that keeps a share's files and the user's paths out
/// of the state compares plain paths with it, so `./st/`, `a//b/` or
/// `a/./b/` would name the state folder in a form they do not recognise
/// (a share writing `st/…` into `./st/` got through).
pub fn check_state_prefix(prefix: &str) -> Result<()> {
    let body = prefix.strip_suffix('/').unwrap_or(prefix);
    let plain = !body.is_empty()
        && !body.starts_with('/')
        && body
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != ".." && !p.chars().any(char::is_control));
    if plain {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "state_prefix {prefix:?} must be a plain relative folder like `.caravan/` (no \
             leading `/`, no empty, `.` or `..` parts)"
        )))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Only plain relative folders are state prefixes: every other form
    /// of one is refused, so the checks comparing paths with it hold.
    #[test]
    fn state_prefixes_are_plain_relative_folders() {
        for ok in [".caravan/", ".caravan", "st/", "a/b/", "a/b"] {
            check_state_prefix(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        for bad in [
            "", "/", "/st/", "./st/", "a//b/", "a/./b/", "x/../st/", "st//", "..",
        ] {
            assert!(check_state_prefix(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// An agent advertises no more addresses, and uses no more
    /// repositories, than its tickets may carry (they would be refused by
    /// every recipient).
    #[test]
    fn too_many_addresses_or_repositories_are_refused() {
        let mut c = AgentConfig::parse(BASE).unwrap();
        c.advertise = (0..MAX_ADDRESSES)
            .map(|i| format!("10.0.0.{i}:7400"))
            .collect();
        c.repositories = (0..MAX_REPOSITORIES)
            .map(|i| format!("http://r{i}:7500"))
            .collect();
        c.validate().unwrap();
        c.advertise.push("10.0.1.1:7400".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("advertise lists 17 addresses"), "{e}");
        c.advertise.pop();
        c.advertise[0] = "not an address".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("not host:port")
        );
        c.advertise.clear();
        c.repositories.push("http://r99:7500".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("17 repositories"), "{e}");
    }

    /// Two listeners on one port are refused by name, before a start
    /// that would say the port is taken; any free port (0) and an empty
    /// (off) listener never clash.
    #[test]
    fn two_listeners_on_one_port_are_refused() {
        let s = |v: &str| v.to_string();
        let check = |l: &str, a: &str, m: &str| {
            check_distinct(&[
                ("listen", &s(l)),
                ("admin_listen", &s(a)),
                ("metrics_listen", &s(m)),
            ])
        };
        assert!(check("127.0.0.1:7400", "127.0.0.1:7401", "127.0.0.1:9400").is_ok());
        assert!(check("127.0.0.1:0", "127.0.0.1:0", "").is_ok());
        assert!(check("127.0.0.1:7400", "127.0.0.2:7400", "").is_ok());
        assert!(check("localhost:7400", "10.0.0.1:7400", "").is_ok());
        assert!(check("localhost:7400", "localhost:7401", "").is_ok());
        for (l, a, m) in [
            ("127.0.0.1:7400", "127.0.0.1:7400", ""),
            ("0.0.0.0:7400", "127.0.0.1:7401", "127.0.0.1:7400"),
            ("[::]:7400", "127.0.0.1:7400", ""),
            ("localhost:7400", "127.0.0.1:7401", "localhost:7400"),
            ("localhost:7400", "127.0.0.1:7400", ""),
            ("LOCALHOST:7400", "[::1]:7400", ""),
            ("0.0.0.0:7400", "example.internal:7400", ""),
            ("example.internal:7400", "EXAMPLE.internal:7400", ""),
        ] {
            let e = check(l, a, m).unwrap_err().to_string();
            assert!(e.contains("same port"), "{l} {a} {m}: {e}");
        }
    }

    /// Guarantee: a key file or an admin token given as the config by
    /// mistake is never quoted in the error (it is printed, logged and put
    /// in `--json` output).
    #[test]
    fn a_secret_given_as_config_is_never_quoted() {
        for secret in [
            "caravan-secret-key-v1:SECRETSECRETSECRETSECRET\n",
            "tokentokentokentokentoken0123456789\n",
        ] {
            let e = AgentConfig::parse(secret).unwrap_err().to_string();
            assert!(!e.contains("SECRET") && !e.contains("tokentoken"), "{e}");
            assert!(e.contains("line 1, column"), "{e}");
        }
    }

    const BASE: &str =
        "identity_file = \"k\"\nadmin_token_file = \"t\"\n[storage]\nscheme = \"fs\"\n";

    #[test]
    fn listen_takes_a_host_name_as_well_as_an_address() {
        for ok in [
            "localhost:7400",
            "0.0.0.0:7400",
            "[::]:7400",
            "agent-1.example:7400",
        ] {
            let text = format!("listen = {ok:?}\n{BASE}");
            assert!(AgentConfig::parse(&text).is_ok(), "{ok}");
        }
        for bad in [
            "localhost",
            "localhost:x",
            ":7400",
            "a b:7400",
            "localhost:99999",
        ] {
            let text = format!("listen = {bad:?}\n{BASE}");
            let e = AgentConfig::parse(&text).unwrap_err().to_string();
            assert!(e.contains("is not host:port"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_bad_file_says_configuration_error_once() {
        let dir = std::env::temp_dir().join(format!("caravan-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.toml");
        std::fs::write(&path, format!("listen = \"nowhere\"\n{BASE}")).unwrap();
        let e = AgentConfig::load(&path).unwrap_err().to_string();
        assert_eq!(e.matches("configuration error").count(), 1, "{e}");
        assert!(e.contains("agent.toml: listen"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
