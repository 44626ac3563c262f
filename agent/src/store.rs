//! Access to the user's storage through OpenDAL. The user's files stay plain
//! and readable there; the agent's own state lives under a prefix beside them.

use std::collections::BTreeMap;
use std::path::Path;

use opendal::Operator;

use crate::config::{StorageConfig, check_scheme};
use crate::error::{Context, Error, Result};

pub mod sas;

/// Reads secret options: a directory of files (a mounted Kubernetes Secret,
/// one file per option) or one file of `key=value` lines (`#` comments).
pub fn read_credentials(path: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::Config(format!("credentials {}: {e}", path.display())))?;
    if meta.is_dir() {
        let entries = std::fs::read_dir(path)
            .map_err(|e| Error::Config(format!("credentials {}: {e}", path.display())))?;
        for entry in entries {
            let entry =
                entry.map_err(|e| Error::Config(format!("credentials {}: {e}", path.display())))?;
            let name = entry.file_name().to_string_lossy().to_string();
            // Kubernetes secret volumes contain `..data` symlinks and dot-dirs.
            if name.starts_with('.') || !entry.path().is_file() {
                continue;
            }
            let value = std::fs::read_to_string(entry.path()).map_err(|e| {
                Error::Config(format!("credentials {}: {e}", entry.path().display()))
            })?;
            out.insert(name, value.trim_end_matches(['\n', '\r']).to_string());
        }
    } else {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("credentials {}: {e}", path.display())))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line.split_once('=').ok_or_else(|| {
                Error::Config(format!(
                    "credentials {} line {}: expected key=value",
                    path.display(),
                    n + 1
                ))
            })?;
            out.insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    Ok(out)
}

/// Secret options from `CARAVAN_STORAGE_<OPTION>` environment variables.
fn env_credentials() -> BTreeMap<String, String> {
    std::env::vars()
        .filter_map(|(k, v)| {
            k.strip_prefix("CARAVAN_STORAGE_")
                .map(|o| (o.to_ascii_lowercase(), v))
        })
        .collect()
}

/// The config's options merged with the secret ones (credentials file,
/// then environment), which win.
fn merged_options(cfg: &StorageConfig) -> Result<BTreeMap<String, String>> {
    let mut options = cfg.options.clone();
    if let Some(path) = &cfg.credentials {
        options.extend(read_credentials(path)?);
    }
    options.extend(env_credentials());
    Ok(options)
}

/// Opens a local folder as storage (`fs` rooted at `root`): the demo's
/// agents and tests.
pub fn open_local(root: &Path) -> Result<Operator> {
    let mut options = BTreeMap::new();
    options.insert("root".to_string(), root.display().to_string());
    open(&StorageConfig {
        scheme: "fs".into(),
        options,
        credentials: None,
    })
}

/// Opens the user's storage. Options named in the config are merged with the
/// secret ones (credentials file, then environment), which win.
pub fn open(cfg: &StorageConfig) -> Result<Operator> {
    check_scheme(&cfg.scheme)?;
    opendal::install_default();
    let options = merged_options(cfg)?;
    if cfg.scheme == "fs" {
        let root = options
            .get("root")
            .ok_or_else(|| Error::Config("fs storage needs a `root` option".into()))?;
        std::fs::create_dir_all(root).map_err(|e| Error::Config(format!("fs root {root}: {e}")))?;
    }
    // Say what is missing rather than OpenDAL's bare ConfigInvalid.
    let required: &[(&str, &str)] = match cfg.scheme.as_str() {
        "s3" | "gcs" | "oss" | "obs" | "cos" => &[("bucket", "the bucket's name")],
        "azblob" => &[("container", "the container's name")],
        "webdav" => &[("endpoint", "the server's URL, e.g. https://dav.example/")],
        _ => &[],
    };
    let set = |key: &str| options.get(key).is_some_and(|v| !v.trim().is_empty());
    for (key, what) in required {
        if !set(key) {
            let a = if key.starts_with(['a', 'e', 'i', 'o', 'u']) {
                "an"
            } else {
                "a"
            };
            return Err(Error::Config(format!(
                "{} storage needs {a} `{key}` option ({what})",
                cfg.scheme
            )));
        }
    }
    if matches!(cfg.scheme.as_str(), "gdrive" | "dropbox" | "onedrive") {
        check_oauth(&cfg.scheme, &set)?;
    }
    let keys: Vec<String> = options.keys().cloned().collect();
    let op = Operator::via_iter(&cfg.scheme, options).map_err(|e| {
        // Never echo option values: they may be secrets.
        Error::Config(format!(
            "cannot open {} storage with options [{}]: {}",
            cfg.scheme,
            keys.join(", "),
            e.kind()
        ))
    })?;
    Ok(op.layer(opendal::layers::RetryLayer::new().with_max_times(4)))
}

/// Google Drive, Dropbox and OneDrive take an OAuth access token, or a
/// refresh token with the app's client id and secret (never both kinds):
/// say which, instead of OpenDAL's bare ConfigInvalid.
fn check_oauth(scheme: &str, set: &dyn Fn(&str) -> bool) -> Result<()> {
    let hint = "a secret `access_token`, or `refresh_token` with `client_id` and `client_secret`";
    match (set("access_token"), set("refresh_token")) {
        (true, true) => Err(Error::Config(format!(
            "{scheme} storage takes either `access_token` or `refresh_token`, not both"
        ))),
        (false, false) => Err(Error::Config(format!("{scheme} storage needs {hint}"))),
        (false, true) if !(set("client_id") && set("client_secret")) => {
            Err(Error::Config(format!(
                "{scheme} storage with `refresh_token` needs `client_id` and `client_secret` too"
            )))
        }
        _ => Ok(()),
    }
}

/// Reads `range` of `path` into `buf`, appending each piece as it arrives
/// (a publish block, a chunk to seal): OpenDAL's buffers are let go at once,
/// so its HTTP client reads the next piece into the same memory instead of
/// fresh pages, and `buf` ends up one slice, as cutting and sealing want.
/// Returns the bytes read (fewer than asked when the object is shorter).
pub async fn read_into(
    op: &Operator,
    path: &str,
    range: std::ops::Range<u64>,
    buf: &mut Vec<u8>,
) -> std::result::Result<usize, opendal::Error> {
    op.reader_with(path).await?.read_into(buf, range).await
}

/// Checks that storage answers at all, so a dead bucket is reported at start.
pub async fn probe(op: &Operator) -> Result<()> {
    first_entry(op, "")
        .await
        .map(|_| ())
        .context(|| "probing storage".into())
}

/// The first entry listed under `dir`, with one request: a `list` with a
/// page size of one would page through every entry, a request each.
pub async fn first_entry(
    op: &Operator,
    dir: &str,
) -> std::result::Result<Option<opendal::Entry>, opendal::Error> {
    use futures::TryStreamExt;
    op.lister_with(dir).limit(1).await?.try_next().await
}

/// Lists a directory of the agent's state; a directory that was never
/// written is simply empty (object stores have no empty directories).
pub async fn list_or_empty(op: &Operator, dir: &str) -> Result<Vec<opendal::Entry>> {
    match op.list(dir).await {
        Ok(e) => Ok(e),
        Err(e) if e.kind() == opendal::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).context(|| format!("listing {dir}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(scheme: &str, options: &[(&str, &str)]) -> StorageConfig {
        StorageConfig {
            scheme: scheme.into(),
            options: options
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            credentials: None,
        }
    }

    fn config_error(c: &StorageConfig) -> String {
        match open(c) {
            Err(Error::Config(msg)) => msg,
            Err(other) => panic!("{}: {other}", c.scheme),
            Ok(_) => panic!("{}: opened with options {:?}", c.scheme, c.options.keys()),
        }
    }

    /// The services with no server that can run here (Google Drive,
    /// Dropbox, OneDrive): the agent's checks and OpenDAL's builder accept
    /// each way of giving credentials that the README documents, and a
    /// missing or half-given one is named. No network is touched.
    #[test]
    fn oauth_services_accept_their_documented_options() {
        for scheme in ["gdrive", "dropbox", "onedrive"] {
            let ok = [
                vec![("root", "/caravan/"), ("access_token", "t")],
                vec![
                    ("root", "/caravan/"),
                    ("refresh_token", "r"),
                    ("client_id", "i"),
                    ("client_secret", "s"),
                ],
            ];
            for options in ok {
                let op = open(&cfg(scheme, &options))
                    .unwrap_or_else(|e| panic!("{scheme} {options:?}: {e}"));
                assert_eq!(op.info().scheme().to_string(), scheme);
                assert!(op.info().capability().write, "{scheme} cannot write");
            }
            let e = config_error(&cfg(scheme, &[("root", "/caravan/")]));
            assert!(e.contains("needs a secret `access_token`"), "{e}");
            let e = config_error(&cfg(scheme, &[("refresh_token", "r"), ("client_id", "i")]));
            assert!(e.contains("needs `client_id` and `client_secret`"), "{e}");
            let e = config_error(&cfg(
                scheme,
                &[("refresh_token", "r"), ("access_token", "t")],
            ));
            assert!(e.contains("not both"), "{e}");
            assert!(!e.contains("\"t\""), "a secret leaked: {e}");
        }
    }

    #[test]
    fn webdav_without_its_endpoint_says_so() {
        let e = config_error(&cfg("webdav", &[("root", "/caravan/")]));
        assert!(e.contains("needs an `endpoint` option"), "{e}");
        assert!(open(&cfg("webdav", &[("endpoint", "http://127.0.0.1:1/")])).is_ok());
    }

    #[test]
    fn a_bucket_store_without_its_bucket_says_so() {
        for (scheme, key) in [("s3", "bucket"), ("gcs", "bucket"), ("azblob", "container")] {
            let cfg = StorageConfig {
                scheme: scheme.into(),
                options: BTreeMap::from([("region".to_string(), "eu-west-1".to_string())]),
                credentials: None,
            };
            match open(&cfg) {
                Err(Error::Config(msg)) => {
                    assert!(msg.contains(&format!("needs a `{key}` option")), "{msg}")
                }
                Err(other) => panic!("{scheme}: {other}"),
                Ok(_) => panic!("{scheme}: opened without {key}"),
            }
        }
    }
}
