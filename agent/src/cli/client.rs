//! The client of the local daemon's admin API.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};

use caravan_agent::daemon::{self, api};

use crate::cli::exit::Exit;
use crate::cli::setup::load_config;

/// A client of the local daemon's admin API.
pub(crate) struct Admin {
    base: String,
    token: String,
    http: reqwest::Client,
}

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
        Ok(Admin {
            base: format!("http://{addr}"),
            token,
            http,
        })
    }

    /// Sends a request with the admin token and returns a successful
    /// answer; an unreachable daemon and a refusal get their exit codes.
    async fn start(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let resp = req.bearer_auth(&self.token).send().await.map_err(|e| {
            Exit::Unreachable(anyhow!(
                "cannot reach the agent daemon at {} ({e}); is `caravan-agent run` running?",
                self.base
            ))
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.bytes().await.context("reading the daemon's answer")?;
        let msg = serde_json::from_slice::<api::ApiError>(&body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        Err(if status.is_client_error() {
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
        })
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
            .context("reading the daemon's answer")?;
        serde_json::from_slice(&body).context("decoding the daemon's answer")
    }

    pub(crate) async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(self.http.get(format!("{}{path}", self.base)))
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

    pub(crate) async fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }
}
