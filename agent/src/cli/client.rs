//! The client of the local daemon's admin API.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};

use caravan_agent::daemon::{self, api};

use crate::cli::exit::Exit;
use crate::cli::setup::load_config;

/// How long a question answered from the daemon's memory may take
/// (`CARAVAN_ADMIN_TIMEOUT_SECS`, default 60).
fn quick() -> Duration {
    Duration::from_secs(
        std::env::var("CARAVAN_ADMIN_TIMEOUT_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|s| *s > 0)
            .unwrap_or(60),
    )
}
/// How long a request doing bounded work may take.
const WORK: Duration = Duration::from_secs(300);

/// A client of the local daemon's admin API.
pub(crate) struct Admin {
    base: String,
    token: String,
    http: reqwest::Client,
    /// The folder a local-disk (`fs`) storage is rooted at.
    fs_root: Option<std::path::PathBuf>,
    /// The lock its daemon holds while it runs (local disk only).
    lock: Option<std::path::PathBuf>,
}

/// How long a command waits for a daemon that says it is starting.
const STARTING_WAIT: Duration = Duration::from_secs(10);
/// How often it asks meanwhile.
const STARTING_POLL: Duration = Duration::from_millis(200);
/// How long a refused connection is tried again before the daemon is
/// said not to run: a process just started has not bound its ports yet
/// (nor, for a moment, taken its storage's lock).
const NOT_LISTENING_GRACE: Duration = Duration::from_millis(500);

impl Admin {
    pub(crate) fn from_config(path: &Path) -> Result<Admin> {
        let cfg = load_config(path)?;
        let token =
            daemon::read_token(&cfg.admin_token_file).map_err(|e| Exit::Config(anyhow!(e)))?;
        let addr = cfg.admin_listen.replace("0.0.0.0", "127.0.0.1");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(3600))
            .build()
            .context("building the HTTP client")?;
        let fs_root = cfg.storage.fs_root();
        let lock = fs_root
            .as_ref()
            .map(|r| daemon::lock_path(r, &cfg.state_prefix));
        Ok(Admin {
            base: format!("http://{addr}"),
            token,
            http,
            fs_root,
            lock,
        })
    }

    /// A path the user typed, as the daemon takes it (relative to the
    /// storage's root). On a local disk an absolute path inside the
    /// storage's folder is made relative to it (`/srv/caravan/photos` →
    /// `photos`), and one outside it is refused, saying where paths are
    /// taken from: its leading `/` used to be dropped, so `/tmp/x` meant
    /// `<root>/tmp/x`. Elsewhere (object stores) a leading `/` is the
    /// root, as in OpenDAL.
    pub(crate) fn storage_path(&self, typed: &str) -> Result<String> {
        let Some(root) = &self.fs_root else {
            return Ok(typed.to_string());
        };
        inside_root(root, typed).map_err(|e| Exit::Config(e).into())
    }

    /// Sends a request with the admin token and returns a successful
    /// answer; an unreachable daemon and a refusal get their exit codes.
    /// A daemon still starting (its first look at its storage, loading
    /// its state: a command typed right after `run`) is asked again for up
    /// to [`STARTING_WAIT`]; one that still is then is reported, with
    /// what it waits for.
    async fn start(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let first_try = tokio::time::Instant::now();
        let deadline = first_try + STARTING_WAIT;
        let mut req = req;
        loop {
            let again = req.try_clone();
            let resp = match req.bearer_auth(&self.token).send().await {
                Ok(r) => r,
                // Not listening yet: a daemon just started (`run &` then
                // a command) binds its ports in a moment. Asked again for
                // half a second, and for as long as `STARTING_WAIT` while
                // its storage's lock is held (it is starting); with no
                // daemon, refused after the half second.
                Err(e)
                    if e.is_connect()
                        && (tokio::time::Instant::now() < first_try + NOT_LISTENING_GRACE
                            || (self.lock.as_deref().is_some_and(daemon::lock_held)
                                && tokio::time::Instant::now() + STARTING_POLL < deadline)) =>
                {
                    match again {
                        Some(next) => {
                            tokio::time::sleep(STARTING_POLL).await;
                            req = next;
                            continue;
                        }
                        None => return Err(self.unreachable(e)),
                    }
                }
                Err(e) => return Err(self.unreachable(e)),
            };
            let status = resp.status();
            if status.is_success() {
                return Ok(resp);
            }
            let body = resp.bytes().await.context("reading the daemon's answer")?;
            let msg = serde_json::from_slice::<api::ApiError>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            match again {
                Some(next)
                    if status == reqwest::StatusCode::SERVICE_UNAVAILABLE
                        && msg.starts_with(daemon::admin::STARTING)
                        && tokio::time::Instant::now() + STARTING_POLL < deadline =>
                {
                    tokio::time::sleep(STARTING_POLL).await;
                    req = next;
                }
                _ => return Err(self.failure(status, msg)),
            }
        }
    }

    /// The error, and its exit code, for a daemon's answer `status`.
    fn failure(&self, status: reqwest::StatusCode, msg: String) -> anyhow::Error {
        if status.is_client_error() {
            Exit::Config(anyhow!("{msg}")).into()
        } else if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            // Starting (waiting for its storage): not there yet, like a
            // daemon not running, and said why.
            Exit::Unreachable(anyhow!(
                "the agent daemon at {} is not ready: {msg}",
                self.base
            ))
            .into()
        } else if status == reqwest::StatusCode::BAD_GATEWAY {
            // The daemon did its part; a repository behind it did not (a
            // grant no repository took): the message says what holds.
            anyhow!("{msg}")
        } else {
            anyhow!("the daemon failed: {msg}")
        }
    }

    /// A daemon that cannot be reached, or that took a connection and
    /// then said nothing within the request's time (a stopped or stuck
    /// process): exit code 4, never a wait for ever.
    fn unreachable(&self, e: reqwest::Error) -> anyhow::Error {
        if e.is_timeout() {
            Exit::Unreachable(anyhow!(
                "the agent daemon at {} did not answer in time ({e}); is it stuck?",
                self.base
            ))
            .into()
        } else {
            Exit::Unreachable(anyhow!(
                "cannot reach the agent daemon at {} ({e}); is `caravan-agent run` running?",
                self.base
            ))
            .into()
        }
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T> {
        let body = self
            .start(req)
            .await?
            .bytes()
            .await
            .map_err(|e| self.unreachable(e))?;
        serde_json::from_slice(&body).context("decoding the daemon's answer")
    }

    /// A question the daemon answers from memory (status, a fetch's
    /// progress, trust): [`quick`] to answer.
    pub(crate) async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(
            self.http
                .get(format!("{}{path}", self.base))
                .timeout(quick()),
        )
        .await
    }

    /// Deletes `path` (a quick answer, like [`Admin::get`]).
    pub(crate) async fn delete<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(
            self.http
                .delete(format!("{}{path}", self.base))
                .timeout(quick()),
        )
        .await
    }

    /// Posts and hands each line of a JSON-lines answer to `each` as it
    /// arrives (an error answer is reported like [`Admin::post`]'s).
    pub(crate) async fn post_lines<B: serde::Serialize>(
        &self,
        path: &str,
        body: &B,
        mut each: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let mut resp = self
            .start(self.http.post(format!("{}{path}", self.base)).json(body))
            .await?;
        let mut buf = Vec::new();
        while let Some(part) = resp.chunk().await.context("reading the daemon's answer")? {
            buf.extend_from_slice(&part);
            while let Some(at) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=at).collect();
                each(&line[..at])?;
            }
        }
        if !buf.is_empty() {
            each(&buf)?;
        }
        Ok(())
    }

    /// A request the daemon answers after some work of bounded length (a
    /// ticket, a grant sent to the repositories, a fetch started):
    /// [`WORK`] to answer.
    pub(crate) async fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        self.send(
            self.http
                .post(format!("{}{path}", self.base))
                .json(body)
                .timeout(WORK),
        )
        .await
    }
}

/// [`Admin::storage_path`] on a local disk rooted at `root`.
fn inside_root(root: &Path, typed: &str) -> std::result::Result<String, anyhow::Error> {
    let t = typed.trim();
    if !t.starts_with('/') || t == "/" {
        return Ok(t.to_string());
    }
    let folder = t.ends_with('/');
    let roots = [Some(root.to_path_buf()), std::fs::canonicalize(root).ok()];
    for r in roots.iter().flatten() {
        if let Ok(rest) = Path::new(t).strip_prefix(r) {
            let mut rel = rest.to_string_lossy().into_owned();
            if folder && !rel.is_empty() {
                rel.push('/');
            }
            return Ok(rel);
        }
    }
    Err(anyhow!(
        "{t} is not inside the agent's storage ({}): paths are taken from the storage's \
         root, e.g. `photos` for {}/photos",
        root.display(),
        root.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a local disk, absolute paths inside the storage's folder become
    /// relative to it; outside it they are refused, naming the folder.
    #[test]
    fn absolute_paths_on_a_local_disk_are_taken_inside_the_storage_or_refused() {
        let root = Path::new("/srv/caravan/data");
        assert_eq!(inside_root(root, "photos").unwrap(), "photos");
        assert_eq!(inside_root(root, "/").unwrap(), "/");
        assert_eq!(
            inside_root(root, "/srv/caravan/data/photos").unwrap(),
            "photos"
        );
        assert_eq!(inside_root(root, "/srv/caravan/data/in/").unwrap(), "in/");
        assert_eq!(inside_root(root, "/srv/caravan/data").unwrap(), "");
        let e = inside_root(root, "/tmp/x").unwrap_err().to_string();
        assert!(
            e.contains("not inside the agent's storage (/srv/caravan/data)"),
            "{e}"
        );
        assert!(inside_root(root, "/srv/caravan/database").is_err());
    }
}
