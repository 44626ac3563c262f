//! The operator's side of the agent admin API: the declarative contract the
//! Share and TrustGrant controllers speak (documented in docs/operator.md,
//! "Operator ↔ agent"), and an HTTP client for it.
//!
//! The channel: plain HTTP to the agent pod's admin port (7401) on the pod
//! network, with the bearer token from the Agent's identity Secret. The
//! NetworkPolicy admits the admin port only from the operator's namespace.
//!
//! Everything is declarative and idempotent: the operator `PUT`s the whole
//! desired state of one share or grant under a stable key (the Share's name,
//! the TrustGrant's uid); the agent persists it under its state prefix,
//! converges in the background and reports status on `GET`. A repeated or
//! retried `PUT` with the same body changes nothing; a `DELETE` of something
//! unknown succeeds. So an operator restart, an agent restart or a lost
//! response converge without duplicate versions, grants or revocations.

use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// Largest answer the operator reads from an agent (an agent is a tenant's
/// pod: bounded before parsing).
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// Longest text copied from an agent answer into a status field.
pub const MAX_MESSAGE_CHARS: usize = 1024;

pub use caravan_agent::daemon::api::{
    ACTIVITY, ActivityReport, DECLARED_GRANTS, DECLARED_SHARES, DeclaredGrant, DeclaredGrantStatus,
    DeclaredPublish, DeclaredShare, DeclaredShareStatus, DeclaredState, DeclaredSubscribe,
    RecipientTicket, RevocationStatus, reasons,
};

/// Where an agent's admin API is and the token it wants.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentEndpoint {
    /// `http://<pod ip>:7401`.
    pub base: String,
    /// The bearer token (never logged).
    pub token: String,
}

impl std::fmt::Debug for AgentEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentEndpoint")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// A failed call to an agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// No answer (connection refused, timeout, pod restarting).
    #[error("agent admin API unreachable: {0}")]
    Unreachable(String),
    /// The agent refused the request (`4xx`): the declared input is wrong.
    #[error("agent refused the request ({code}): {message}")]
    Refused { code: u16, message: String },
    /// The agent failed (`5xx`) or answered something unreadable.
    #[error("agent error: {0}")]
    Agent(String),
}

/// The calls the controllers make; [`HttpAgentApi`] in production, a fake
/// in tests.
pub trait AgentApi: Send + Sync {
    /// `PUT /v1/declared/shares/{name}`.
    fn put_share<'a>(
        &'a self,
        ep: &'a AgentEndpoint,
        name: &'a str,
        share: &'a DeclaredShare,
    ) -> BoxFuture<'a, Result<DeclaredShareStatus, CallError>>;
    /// `DELETE /v1/declared/shares/{name}` (success when unknown).
    fn delete_share<'a>(
        &'a self,
        ep: &'a AgentEndpoint,
        name: &'a str,
    ) -> BoxFuture<'a, Result<(), CallError>>;
    /// `PUT /v1/declared/grants/{key}`.
    fn put_grant<'a>(
        &'a self,
        ep: &'a AgentEndpoint,
        key: &'a str,
        grant: &'a DeclaredGrant,
    ) -> BoxFuture<'a, Result<DeclaredGrantStatus, CallError>>;
    /// `DELETE /v1/declared/grants/{key}`: revoke (success when unknown).
    fn delete_grant<'a>(
        &'a self,
        ep: &'a AgentEndpoint,
        key: &'a str,
    ) -> BoxFuture<'a, Result<RevocationStatus, CallError>>;
    /// `GET /v1/activity` (scale to zero). The default answers
    /// "unreachable", so an agent that cannot tell is never put to sleep.
    fn activity<'a>(
        &'a self,
        _ep: &'a AgentEndpoint,
    ) -> BoxFuture<'a, Result<ActivityReport, CallError>> {
        Box::pin(async { Err(CallError::Unreachable("activity is not supported".into())) })
    }
}

/// Percent-encodes one path segment (names are DNS subdomains and uids, so
/// this is belt and braces).
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Cuts an agent-provided text to [`MAX_MESSAGE_CHARS`].
pub fn bounded(s: &str) -> String {
    if s.chars().count() <= MAX_MESSAGE_CHARS {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(MAX_MESSAGE_CHARS).collect();
        t.push('…');
        t
    }
}

/// [`AgentApi`] over HTTP with reqwest: bounded time and answer size.
#[derive(Clone)]
pub struct HttpAgentApi {
    http: reqwest::Client,
}

/// Time for one admin call (publishing happens in the background on the
/// agent, so calls are quick).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

impl HttpAgentApi {
    /// A client with connect and request timeouts.
    pub fn new() -> Result<Self, CallError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(CALL_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| CallError::Agent(format!("cannot build an HTTP client: {e}")))?;
        Ok(Self { http })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        ep: &AgentEndpoint,
        path: String,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Vec<u8>), CallError> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", ep.base))
            .bearer_auth(&ep.token);
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b);
        }
        let mut resp = req
            .send()
            .await
            .map_err(|e| CallError::Unreachable(e.to_string()))?;
        let code = resp.status().as_u16();
        let mut buf = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| CallError::Unreachable(e.to_string()))?
        {
            if buf.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(CallError::Agent(format!(
                    "answer larger than {MAX_RESPONSE_BYTES} bytes"
                )));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok((code, buf))
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        ep: &AgentEndpoint,
        path: String,
        body: Option<Vec<u8>>,
    ) -> Result<T, CallError> {
        let (code, buf) = self.call(method, ep, path, body).await?;
        check(code, &buf)?;
        serde_json::from_slice(&buf)
            .map_err(|e| CallError::Agent(format!("unreadable answer: {e}")))
    }
}

/// Maps an HTTP status and body to a [`CallError`].
pub fn check(code: u16, body: &[u8]) -> Result<(), CallError> {
    if (200..300).contains(&code) {
        return Ok(());
    }
    #[derive(Deserialize)]
    struct ApiError {
        error: String,
    }
    let message = serde_json::from_slice::<ApiError>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
    let message = bounded(message.trim());
    if (400..500).contains(&code) {
        Err(CallError::Refused { code, message })
    } else if code == 503 {
        // The agent is starting (waiting for its storage): not there yet.
        Err(CallError::Unreachable(message))
    } else {
        Err(CallError::Agent(format!("HTTP {code}: {message}")))
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, CallError> {
    serde_json::to_vec(v).map_err(|e| CallError::Agent(e.to_string()))
}

impl AgentApi for HttpAgentApi {
    fn put_share<'a>(
        &'a self,
        ep: &'a AgentEndpoint,
        name: &'a str,
        share: &'a DeclaredShare,
    ) -> BoxFuture<'a, Result<DeclaredShareStatus, CallError>> {
        Box::pin(async move {
            let path = format!("{DECLARED_SHARES}/{}", segment(name));
            self.json(reqwest::Method::PUT, ep, path, Some(to_json(share)?))
                .await
        })
    }

    fn delete_share<'a>(
        &'a self,
        ep: &'a AgentEndpoint,
        name: &'a str,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        Box::pin(async move {
            let path = format!("{DECLARED_SHARES}/{}", segment(name));
            let (code, buf) = self.call(reqwest::Method::DELETE, ep, path, None).await?;
            if code == 404 {
                return Ok(());
            }
            check(code, &buf)
        })
    }

    fn put_grant<'a>(
        &'a self,
        ep: &'a AgentEndpoint,
        key: &'a str,
        grant: &'a DeclaredGrant,
    ) -> BoxFuture<'a, Result<DeclaredGrantStatus, CallError>> {
        Box::pin(async move {
            let path = format!("{DECLARED_GRANTS}/{}", segment(key));
            self.json(reqwest::Method::PUT, ep, path, Some(to_json(grant)?))
                .await
        })
    }

    fn delete_grant<'a>(
        &'a self,
        ep: &'a AgentEndpoint,
        key: &'a str,
    ) -> BoxFuture<'a, Result<RevocationStatus, CallError>> {
        Box::pin(async move {
            let path = format!("{DECLARED_GRANTS}/{}", segment(key));
            self.json(reqwest::Method::DELETE, ep, path, None).await
        })
    }

    fn activity<'a>(
        &'a self,
        ep: &'a AgentEndpoint,
    ) -> BoxFuture<'a, Result<ActivityReport, CallError>> {
        Box::pin(async move {
            self.json(reqwest::Method::GET, ep, ACTIVITY.to_string(), None)
                .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_by_status_class() {
        assert!(check(200, b"{}").is_ok());
        assert_eq!(
            check(400, br#"{"error":"bad ticket"}"#),
            Err(CallError::Refused {
                code: 400,
                message: "bad ticket".into()
            })
        );
        assert!(matches!(check(502, b"gateway"), Err(CallError::Agent(m)) if m.contains("502")));
        assert_eq!(
            check(
                503,
                br#"{"error":"the agent is starting: waiting for its storage"}"#
            ),
            Err(CallError::Unreachable(
                "the agent is starting: waiting for its storage".into()
            ))
        );
    }

    #[test]
    fn hostile_messages_are_bounded() {
        let long = "x".repeat(100_000);
        let Err(CallError::Refused { message, .. }) = check(400, long.as_bytes()) else {
            panic!("expected a refusal");
        };
        assert!(message.chars().count() <= MAX_MESSAGE_CHARS + 1);
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(segment("photos-2026.v1"), "photos-2026.v1");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn status_json_is_tolerant_of_missing_counters() {
        let s: DeclaredShareStatus =
            serde_json::from_str(r#"{"name":"n","generation":2,"state":"progressing"}"#).unwrap();
        assert_eq!(s.state, DeclaredState::Progressing);
        assert_eq!(s.version, 0);
    }

    #[test]
    fn token_is_not_in_debug_output() {
        let ep = AgentEndpoint {
            base: "http://10.0.0.1:7401".into(),
            token: "sekrit".into(),
        };
        assert!(!format!("{ep:?}").contains("sekrit"));
    }
}
