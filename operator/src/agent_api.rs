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
            // An agent's admin API never redirects: a pod that answers
            // with one (an impostor wearing the agent's label) must not
            // send the operator, with the agent's token, anywhere else.
            .redirect(reqwest::redirect::Policy::none())
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

/// How long calls to an agent that did not answer within the call timeout
/// are answered "unreachable" at once, without a request.
pub const BREAKER_OPEN: Duration = Duration::from_secs(60);

/// Per-agent fairness: an [`AgentApi`] that bounds every call by a timeout
/// and, after a call to an agent (keyed by its endpoint) timed out (or took
/// more than half the timeout, though its answer is still used), answers
/// every call to that agent `Unreachable` at once for [`BREAKER_OPEN`] ("not
/// asked: …"), without a request. Then one call goes through as a probe
/// (the others keep failing fast while it runs); an answer closes the
/// breaker, another timeout opens it again.
///
/// Without it, a tenant whose agent takes the whole timeout for every call
/// holds a worker of the (shared, bounded) Share or TrustGrant controller
/// for 10 s per object; with a hundred such objects every worker waits on
/// that agent and nobody else's Share is reconciled. With it, that agent
/// costs one slow call per minute.
pub struct CircuitBreaker<A> {
    inner: A,
    timeout: Duration,
    open_for: Duration,
    open: std::sync::Mutex<std::collections::HashMap<String, Tripped>>,
}

#[derive(Clone)]
struct Tripped {
    /// Calls fail fast until then.
    until: tokio::time::Instant,
    /// When the call that tripped it was made (for the message).
    at: k8s_openapi::jiff::Timestamp,
    /// Whether that call got no answer at all (else: a late one).
    no_answer: bool,
}

impl<A: AgentApi> CircuitBreaker<A> {
    /// Wraps `inner` with the production timeout and open time.
    pub fn new(inner: A) -> Self {
        Self::with_times(inner, CALL_TIMEOUT, BREAKER_OPEN)
    }

    /// Wraps `inner`; a call taking `timeout` trips the breaker for `open_for`.
    pub fn with_times(inner: A, timeout: Duration, open_for: Duration) -> Self {
        Self {
            inner,
            timeout,
            open_for,
            open: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Tripped>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Err` when the breaker for `base` is open; otherwise this call may go
    /// (as the probe, when the breaker was open: it stays open meanwhile).
    fn admit(&self, base: &str) -> Result<(), CallError> {
        let now = tokio::time::Instant::now();
        let mut t = self.table();
        let Some(tripped) = t.get_mut(base) else {
            return Ok(());
        };
        if now < tripped.until {
            let at = tripped.at.strftime("%Y-%m-%dT%H:%M:%SZ");
            return Err(CallError::Unreachable(if tripped.no_answer {
                format!(
                    "not asked: it did not answer within {} s at {at} (asked again {} s later)",
                    self.timeout.as_secs(),
                    self.open_for.as_secs()
                )
            } else {
                format!(
                    "not asked: it took more than {} s to answer at {at} (asked again {} s later)",
                    self.slow().as_secs(),
                    self.open_for.as_secs()
                )
            }));
        }
        // The probe: the others keep failing fast while it runs.
        tripped.until = now + self.timeout + self.open_for;
        Ok(())
    }

    /// A call taking this long (half the timeout) also trips the breaker:
    /// admin calls are quick (the agent converges in the background), so an
    /// agent this slow holds workers the other tenants need.
    fn slow(&self) -> Duration {
        self.timeout / 2
    }

    async fn guarded<T>(
        &self,
        ep: &AgentEndpoint,
        call: BoxFuture<'_, Result<T, CallError>>,
    ) -> Result<T, CallError> {
        self.admit(&ep.base)?;
        let started = tokio::time::Instant::now();
        let at = k8s_openapi::jiff::Timestamp::now();
        let r = match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Unreachable(format!(
                "no answer within {} s",
                self.timeout.as_secs()
            ))),
        };
        let took = started.elapsed();
        let no_answer =
            matches!(r, Err(CallError::Unreachable(_))) && took >= self.timeout.mul_f32(0.9);
        if no_answer || took >= self.slow() {
            tracing::warn!(agent = %ep.base, open_for = ?self.open_for, took = ?took, no_answer,
                "agent admin API too slow; calls to it fail fast for a while");
            self.table().insert(
                ep.base.clone(),
                Tripped {
                    until: tokio::time::Instant::now() + self.open_for,
                    at,
                    no_answer,
                },
            );
        } else {
            self.table().remove(&ep.base);
        }
        r
    }
}

impl<A: AgentApi> AgentApi for CircuitBreaker<A> {
    fn put_share<'a>(
        &'a self,
        ep: &'a AgentEndpoint,
        name: &'a str,
        share: &'a DeclaredShare,
    ) -> BoxFuture<'a, Result<DeclaredShareStatus, CallError>> {
        Box::pin(self.guarded(ep, self.inner.put_share(ep, name, share)))
    }
    fn delete_share<'a>(
        &'a self,
        ep: &'a AgentEndpoint,
        name: &'a str,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        Box::pin(self.guarded(ep, self.inner.delete_share(ep, name)))
    }
    fn put_grant<'a>(
        &'a self,
        ep: &'a AgentEndpoint,
        key: &'a str,
        grant: &'a DeclaredGrant,
    ) -> BoxFuture<'a, Result<DeclaredGrantStatus, CallError>> {
        Box::pin(self.guarded(ep, self.inner.put_grant(ep, key, grant)))
    }
    fn delete_grant<'a>(
        &'a self,
        ep: &'a AgentEndpoint,
        key: &'a str,
    ) -> BoxFuture<'a, Result<RevocationStatus, CallError>> {
        Box::pin(self.guarded(ep, self.inner.delete_grant(ep, key)))
    }
    fn activity<'a>(
        &'a self,
        ep: &'a AgentEndpoint,
    ) -> BoxFuture<'a, Result<ActivityReport, CallError>> {
        Box::pin(self.guarded(ep, self.inner.activity(ep)))
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

    /// An agent API where `slow` agents take `delay` for every call; counts
    /// the requests that were actually made, per agent.
    struct Sleepy {
        delay: std::sync::Mutex<Duration>,
        made: std::sync::Mutex<Vec<String>>,
    }

    impl Sleepy {
        fn made(&self, base: &str) -> usize {
            self.made
                .lock()
                .unwrap()
                .iter()
                .filter(|b| *b == base)
                .count()
        }
    }

    impl AgentApi for std::sync::Arc<Sleepy> {
        fn put_share<'a>(
            &'a self,
            ep: &'a AgentEndpoint,
            name: &'a str,
            _share: &'a DeclaredShare,
        ) -> BoxFuture<'a, Result<DeclaredShareStatus, CallError>> {
            Box::pin(async move {
                self.made.lock().unwrap().push(ep.base.clone());
                if ep.base.contains("slow") {
                    let d = *self.delay.lock().unwrap();
                    tokio::time::sleep(d).await;
                }
                Ok(DeclaredShareStatus {
                    name: name.into(),
                    ..serde_json::from_str(r#"{"name":"","generation":1,"state":"ready"}"#).unwrap()
                })
            })
        }
        fn delete_share<'a>(
            &'a self,
            _ep: &'a AgentEndpoint,
            _name: &'a str,
        ) -> BoxFuture<'a, Result<(), CallError>> {
            Box::pin(async { Ok(()) })
        }
        fn put_grant<'a>(
            &'a self,
            _ep: &'a AgentEndpoint,
            _key: &'a str,
            _grant: &'a DeclaredGrant,
        ) -> BoxFuture<'a, Result<DeclaredGrantStatus, CallError>> {
            Box::pin(async { Err(CallError::Agent("unused".into())) })
        }
        fn delete_grant<'a>(
            &'a self,
            _ep: &'a AgentEndpoint,
            _key: &'a str,
        ) -> BoxFuture<'a, Result<RevocationStatus, CallError>> {
            Box::pin(async { Err(CallError::Agent("unused".into())) })
        }
    }

    #[tokio::test]
    async fn an_agent_that_does_not_answer_costs_one_timeout_per_window() {
        let sleepy = std::sync::Arc::new(Sleepy {
            delay: std::sync::Mutex::new(Duration::from_secs(3600)),
            made: Default::default(),
        });
        let timeout = Duration::from_millis(200);
        let open_for = Duration::from_millis(600);
        let b = CircuitBreaker::with_times(sleepy.clone(), timeout, open_for);
        let ep = |base: &str| AgentEndpoint {
            base: base.into(),
            token: "t".into(),
        };
        let (slow, fast) = (ep("http://slow:7401"), ep("http://fast:7401"));
        let decl: DeclaredShare = serde_json::from_str(
            r#"{"generation":1,"publish":{"path":"p","recipients":[],"rescan_secs":60}}"#,
        )
        .unwrap();

        // The first call waits the whole timeout, then trips the breaker.
        let t0 = tokio::time::Instant::now();
        let r = b.put_share(&slow, "s0", &decl).await;
        assert!(matches!(r, Err(CallError::Unreachable(_))), "{r:?}");
        assert!(t0.elapsed() >= timeout);

        // A hundred more calls (a tenant's hundred Shares) fail at once,
        // without a request, saying why; the other agent is not affected.
        let t1 = tokio::time::Instant::now();
        for i in 0..100 {
            let Err(CallError::Unreachable(m)) = b.put_share(&slow, &format!("s{i}"), &decl).await
            else {
                panic!("expected a fast failure");
            };
            assert!(
                m.starts_with("not asked: it did not answer within 0 s at "),
                "{m}"
            );
            b.put_share(&fast, "f", &decl).await.unwrap();
        }
        assert!(t1.elapsed() < timeout, "no call waited: {:?}", t1.elapsed());
        assert_eq!(sleepy.made("http://slow:7401"), 1, "one request only");
        assert_eq!(sleepy.made("http://fast:7401"), 100);

        // After the window, one probe goes; calls meanwhile still fail fast.
        tokio::time::sleep(open_for).await;
        *sleepy.delay.lock().unwrap() = Duration::from_millis(60);
        let probe = b.put_share(&slow, "probe", &decl);
        let other = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            b.put_share(&slow, "other", &decl).await
        };
        let (p, o) = tokio::join!(probe, other);
        p.unwrap();
        assert!(matches!(o, Err(CallError::Unreachable(m)) if m.starts_with("not asked")));
        assert_eq!(sleepy.made("http://slow:7401"), 2);
        // It answered: closed again, calls go through.
        b.put_share(&slow, "s1", &decl).await.unwrap();
        assert_eq!(sleepy.made("http://slow:7401"), 3);

        // An answer later than half the timeout is used, but trips it too.
        *sleepy.delay.lock().unwrap() = Duration::from_millis(150);
        b.put_share(&slow, "late", &decl).await.unwrap();
        let Err(CallError::Unreachable(m)) = b.put_share(&slow, "next", &decl).await else {
            panic!("expected a fast failure after a late answer");
        };
        assert!(
            m.starts_with("not asked: it took more than 0 s to answer at "),
            "{m}"
        );
        assert_eq!(sleepy.made("http://slow:7401"), 4);
    }

    /// A redirect from an "agent" is an answer like any other failure,
    /// never followed: the place it names gets no request (and so never
    /// the agent's token).
    #[tokio::test]
    async fn a_redirect_is_never_followed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let elsewhere = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let there = elsewhere.local_addr().unwrap();
        let agent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let here = agent.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = agent.accept().await {
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf).await;
                let answer = format!(
                    "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://{there}/steal\r\n\
                     Content-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = c.write_all(answer.as_bytes()).await;
            }
        });
        let api = HttpAgentApi::new().unwrap();
        let ep = AgentEndpoint {
            base: format!("http://{here}"),
            token: "sekrit".into(),
        };
        let (code, _) = api
            .call(reqwest::Method::GET, &ep, "/v1/status".into(), None)
            .await
            .unwrap();
        assert_eq!(code, 307);
        let followed = tokio::time::timeout(Duration::from_millis(300), elsewhere.accept()).await;
        assert!(followed.is_err(), "the redirect was followed");
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
