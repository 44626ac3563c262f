//! The long-running agent: peer listener, admin API, metrics endpoint, and
//! resumption of interrupted fetches.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::error::{Context, Error, Result};
use crate::identity::{AgentId, SecretKey};
use crate::manifest::ShareId;
use crate::node::agent::{Agent, AgentOptions};
use crate::node::publish::{PublishRequest, Published};
use crate::node::share::Role;
use crate::node::trust::{
    AgentTrust, GrantInfo, GrantRequest, RevokeRequest, TrustListing, WhyAnswer,
};
use crate::node::tuning;
use crate::node::{FetchRequest, ProgressSnapshot};
use crate::{store, wire};

/// Everything the admin API reports about an agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// This agent's id.
    pub agent_id: String,
    /// Build version.
    pub version: String,
    /// Addresses advertised to peers.
    pub advertise: Vec<String>,
    /// Shares held.
    pub shares: Vec<ShareSummary>,
    /// Fetches started since the agent started.
    pub fetches: Vec<ProgressSnapshot>,
}

/// One held share in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShareSummary {
    /// Share id.
    pub share_id: String,
    /// `published` or `fetched`.
    pub role: Role,
    /// Version held.
    pub seq: u64,
    /// Files.
    pub files: u64,
    /// Bytes.
    pub bytes: u64,
    /// Chunks.
    pub chunks: u64,
    /// Where the files are in storage.
    pub root: String,
}

/// Builds [`Status`] for an agent.
pub fn status(agent: &Agent) -> Status {
    let mut shares: Vec<ShareSummary> = agent
        .held_shares()
        .iter()
        .map(|s| ShareSummary {
            share_id: s.id.to_string(),
            role: s.role,
            seq: s.seq(),
            files: s.manifest.files().count() as u64,
            bytes: s.manifest.total_bytes(),
            chunks: s.manifest.total_chunks(),
            root: s.root.clone(),
        })
        .collect();
    shares.sort_by(|a, b| a.share_id.cmp(&b.share_id));
    Status {
        agent_id: agent.id.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        advertise: agent.advertise().to_vec(),
        shares,
        fetches: agent.all_fetches().iter().map(|p| p.snapshot()).collect(),
    }
}

/// Body of `POST /v1/shares/{id}/tickets`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TicketRequest {
    /// Recipient agent id.
    pub recipient: AgentId,
}

/// Body of the ticket response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TicketResponse {
    /// The ticket text.
    pub ticket: String,
}

/// An error as the admin API returns it.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong.
    pub error: String,
}

struct ApiFailure(StatusCode, String);

impl From<Error> for ApiFailure {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Parse { .. } | Error::Config(_) | Error::Record(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiFailure(code, e.to_string())
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

#[derive(Clone)]
struct AdminState {
    agent: Arc<Agent>,
    token: Arc<String>,
}

fn check_token(state: &AdminState, headers: &HeaderMap) -> std::result::Result<(), ApiFailure> {
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let want = state.token.as_bytes();
    let ok = given.len() == want.len()
        && given
            .bytes()
            .zip(want)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if ok {
        Ok(())
    } else {
        Err(ApiFailure(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token".into(),
        ))
    }
}

/// The admin API router (bearer-token protected).
pub fn admin_router(agent: Arc<Agent>, token: String) -> Router {
    let state = AdminState {
        agent,
        token: Arc::new(token),
    };
    Router::new()
        .route("/v1/status", get(api_status))
        .route("/v1/shares", post(api_publish))
        .route("/v1/shares/{id}/tickets", post(api_ticket))
        .route("/v1/fetches", post(api_fetch))
        .route("/v1/fetches/{id}", get(api_fetch_status))
        .route("/v1/trust", get(api_trust_list))
        .route("/v1/trust/grants", post(api_trust_grant))
        .route("/v1/trust/revocations", post(api_trust_revoke))
        .route("/v1/trust/why/{agent}", get(api_trust_why))
        .route("/v1/shares/{id}/peers", get(api_share_peers))
        .with_state(state)
}

async fn api_status(
    State(s): State<AdminState>,
    h: HeaderMap,
) -> std::result::Result<Json<Status>, ApiFailure> {
    check_token(&s, &h)?;
    Ok(Json(status(&s.agent)))
}

async fn api_publish(
    State(s): State<AdminState>,
    h: HeaderMap,
    Json(req): Json<PublishRequest>,
) -> std::result::Result<Json<Published>, ApiFailure> {
    check_token(&s, &h)?;
    Ok(Json(s.agent.publish(req, None).await?))
}

async fn api_ticket(
    State(s): State<AdminState>,
    h: HeaderMap,
    UrlPath(id): UrlPath<String>,
    Json(req): Json<TicketRequest>,
) -> std::result::Result<Json<TicketResponse>, ApiFailure> {
    check_token(&s, &h)?;
    let id: ShareId = id.parse()?;
    Ok(Json(TicketResponse {
        ticket: s.agent.ticket(id, req.recipient)?,
    }))
}

async fn api_fetch(
    State(s): State<AdminState>,
    h: HeaderMap,
    Json(req): Json<FetchRequest>,
) -> std::result::Result<Json<ProgressSnapshot>, ApiFailure> {
    check_token(&s, &h)?;
    Ok(Json(s.agent.start_fetch(req).await?.snapshot()))
}

async fn api_fetch_status(
    State(s): State<AdminState>,
    h: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> std::result::Result<Json<ProgressSnapshot>, ApiFailure> {
    check_token(&s, &h)?;
    let id: ShareId = id.parse()?;
    let p = s
        .agent
        .fetch_progress(&id)
        .ok_or_else(|| Error::NotFound(format!("no fetch of {id} since the agent started")))?;
    Ok(Json(p.snapshot()))
}

fn web(s: &AdminState) -> std::result::Result<Arc<AgentTrust>, ApiFailure> {
    s.agent.trust().ok_or_else(|| {
        ApiFailure(
            StatusCode::SERVICE_UNAVAILABLE,
            "the trust state is not loaded".into(),
        )
    })
}

/// `GET /v1/trust`: grants issued and the trust tree.
async fn api_trust_list(
    State(s): State<AdminState>,
    h: HeaderMap,
) -> std::result::Result<Json<TrustListing>, ApiFailure> {
    check_token(&s, &h)?;
    Ok(Json(web(&s)?.listing()))
}

/// `POST /v1/trust/grants` with a [`GrantRequest`]
/// (`{"subject": "<agent id>", "depth": N, "expires_secs": S?, "scope": "…"?}`):
/// signs a grant with this agent's key, keeps it and publishes it to every
/// configured repository; answers a [`GrantInfo`] (`published_to` lists the
/// repositories that stored it). 400 on a malformed request (e.g. a grant
/// to itself), 502 when repositories are configured and none took it.
async fn api_trust_grant(
    State(s): State<AdminState>,
    h: HeaderMap,
    Json(req): Json<GrantRequest>,
) -> std::result::Result<Json<GrantInfo>, ApiFailure> {
    check_token(&s, &h)?;
    let w = web(&s)?;
    w.grant(&req).await.map(Json).map_err(|e| match e {
        Error::Protocol(m) => ApiFailure(StatusCode::BAD_GATEWAY, m),
        other => other.into(),
    })
}

/// Answer of `POST /v1/trust/revocations`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevokeResponse {
    /// Revoked grant ids (hex).
    pub revoked: Vec<String>,
}

/// `POST /v1/trust/revocations` with a [`RevokeRequest`].
async fn api_trust_revoke(
    State(s): State<AdminState>,
    h: HeaderMap,
    Json(req): Json<RevokeRequest>,
) -> std::result::Result<Json<RevokeResponse>, ApiFailure> {
    check_token(&s, &h)?;
    let w = web(&s)?;
    Ok(Json(RevokeResponse {
        revoked: w.revoke(&req).await?,
    }))
}

/// `GET /v1/trust/why/{agent}`.
async fn api_trust_why(
    State(s): State<AdminState>,
    h: HeaderMap,
    UrlPath(agent): UrlPath<String>,
) -> std::result::Result<Json<WhyAnswer>, ApiFailure> {
    check_token(&s, &h)?;
    let who: AgentId = agent.parse()?;
    Ok(Json(web(&s)?.why(&who).await))
}

/// One peer in `GET /v1/shares/{id}/peers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The agent.
    pub agent_id: String,
    /// Where to dial it.
    pub addresses: Vec<String>,
}

/// `GET /v1/shares/{id}/peers`: agents the repositories say hold the share.
async fn api_share_peers(
    State(s): State<AdminState>,
    h: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> std::result::Result<Json<Vec<PeerInfo>>, ApiFailure> {
    check_token(&s, &h)?;
    let id: ShareId = id.parse()?;
    let peers = web(&s)?.peers_for(&id.0).await?;
    Ok(Json(
        peers
            .into_iter()
            .map(|(a, addresses)| PeerInfo {
                agent_id: a.to_string(),
                addresses,
            })
            .collect(),
    ))
}

/// `/metrics`, `/livez` and `/readyz`.
pub fn metrics_router(agent: Arc<Agent>, ready: Arc<AtomicBool>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let a = agent.clone();
                async move { a.metrics.render() }
            }),
        )
        .route("/livez", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let r = ready.clone();
                async move {
                    if r.load(Ordering::SeqCst) {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "starting")
                    }
                }
            }),
        )
}

/// Reads the secret key file, refusing files others can read.
pub fn read_identity(path: &std::path::Path) -> Result<SecretKey> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("identity file {}: {e}", path.display())))?;
    SecretKey::from_text(&text)
        .map_err(|e| Error::Config(format!("identity file {}: {e}", path.display())))
}

/// Reads the admin token file.
pub fn read_token(path: &std::path::Path) -> Result<String> {
    let t = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("admin token file {}: {e}", path.display())))?;
    let t = t.trim().to_string();
    if t.len() < 16 {
        return Err(Error::Config(format!(
            "admin token in {} is too short (at least 16 characters)",
            path.display()
        )));
    }
    Ok(t)
}

async fn bind(addr: &str, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .context(|| format!("binding the {what} on {addr}"))
}

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> Result<()> {
    let key = read_identity(&cfg.identity_file)?;
    let token = read_token(&cfg.admin_token_file)?;
    let op = store::open(&cfg.storage)?;
    let ready = Arc::new(AtomicBool::new(false));

    let peer_listener = bind(&cfg.listen, "peer listener").await?;
    let admin_listener = bind(&cfg.admin_listen, "admin API").await?;
    let peer_addr: SocketAddr = peer_listener
        .local_addr()
        .context(|| "peer address".into())?;
    let advertise = if cfg.advertise.is_empty() && !peer_addr.ip().is_unspecified() {
        vec![peer_addr.to_string()]
    } else {
        cfg.advertise.clone()
    };
    // Storage may be briefly unavailable at start (a bucket being created):
    // report not-ready and retry with backoff rather than crash-looping.
    let mut delay = std::time::Duration::from_millis(200);
    let mut attempt = 0;
    while let Err(e) = store::probe(&op).await {
        attempt += 1;
        tracing::warn!(error = %e, attempt, "storage not reachable yet");
        if attempt >= 30 {
            return Err(e);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(std::time::Duration::from_secs(10));
    }
    let fs_root = (cfg.storage.scheme == "fs")
        .then(|| {
            cfg.storage
                .options
                .get("root")
                .map(std::path::PathBuf::from)
        })
        .flatten();
    let agent = Agent::open(
        key,
        op,
        AgentOptions {
            state_prefix: cfg.state_prefix.clone(),
            advertise,
            repositories: cfg.repositories.clone(),
            fs_root,
            corrupt_chunks: tuning::fault_corrupt_chunks(),
        },
    )
    .await?;

    let trust = AgentTrust::open(
        agent.secret_key(),
        agent.storage().clone(),
        agent.state_prefix(),
        &cfg.repositories,
    )
    .await?;
    agent.set_trust(trust);
    let interval = tuning::trust_sync_interval().unwrap_or_else(|| {
        std::time::Duration::from_secs(
            cfg.sync_interval_secs
                .unwrap_or(crate::config::DEFAULT_SYNC_INTERVAL_SECS)
                .max(1),
        )
    });
    tokio::spawn(agent.clone().run_trust_sync(interval, shutdown.clone()));

    let tls = wire::tls::server_config(agent.secret_key())?;
    tokio::spawn(wire::server::serve(
        peer_listener,
        tls,
        agent.clone(),
        shutdown.clone(),
    ));
    let admin = admin_router(agent.clone(), token);
    let sd = shutdown.clone();
    tokio::spawn(async move {
        let _ = axum::serve(admin_listener, admin)
            .with_graceful_shutdown(sd.cancelled_owned())
            .await;
    });
    if !cfg.metrics_listen.is_empty() {
        let l = bind(&cfg.metrics_listen, "metrics endpoint").await?;
        let r = metrics_router(agent.clone(), ready.clone());
        let sd = shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(l, r)
                .with_graceful_shutdown(sd.cancelled_owned())
                .await;
        });
    }
    let resumed = agent.resume_fetches().await?;
    ready.store(true, Ordering::SeqCst);
    tracing::info!(
        agent_id = %agent.id,
        listen = %peer_addr,
        admin = %cfg.admin_listen,
        metrics = %cfg.metrics_listen,
        shares = agent.held_shares().len(),
        resumed,
        "agent running"
    );
    shutdown.cancelled().await;
    tracing::info!("agent stopping");
    Ok(())
}
