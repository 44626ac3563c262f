//! The admin API server: bearer-token check, one handler per route of
//! [`super::api`], and the mapping of library errors to HTTP statuses.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::extract::{Path as UrlPath, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use futures::StreamExt;

use crate::daemon::api::{
    self, ApiError, FetchRequest, GrantInfo, GrantRequest, PeerInfo, ProgressSnapshot,
    PublishRequest, RevokeRequest, RevokeResponse, ShareSummary, Status, TicketRequest,
    TicketResponse, TrustListing, WhyAnswer,
};
use crate::error::Error;
use crate::identity::AgentId;
use crate::manifest::ShareId;
use crate::node::{Agent, AgentTrust, Declarations};

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

struct ApiFailure(StatusCode, String);

impl From<Error> for ApiFailure {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            e if e.is_bad_input() => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiFailure(code, e.to_string())
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(ApiError {
                error: self.1,
                status: None,
            }),
        )
            .into_response()
    }
}

/// A JSON request body. One that cannot be read (not JSON, a missing or
/// wrong field, a wrong content type, over [`MAX_BODY`]) gets axum's
/// status (400, 422, 415, 413) with the same `{"error": …}` object as
/// every other failure, not axum's plain-text answer: clients parse one
/// shape.
struct Body<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiFailure;

    async fn from_request(req: Request, state: &S) -> std::result::Result<Self, ApiFailure> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(r) => Err(ApiFailure(r.status(), r.body_text())),
        }
    }
}

/// A segment of the request's path (a share id, a name). One that cannot
/// be read (not UTF-8 once decoded) gets 400 with the `{"error": …}`
/// object, as every other failure.
struct Segment(String);

impl<S: Send + Sync> FromRequestParts<S> for Segment {
    type Rejection = ApiFailure;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &S,
    ) -> std::result::Result<Self, ApiFailure> {
        match UrlPath::<String>::from_request_parts(parts, state).await {
            Ok(UrlPath(v)) => Ok(Segment(v)),
            Err(r) => Err(ApiFailure(r.status(), r.body_text())),
        }
    }
}

/// What an unknown route or method gets: the `{"error": …}` object.
async fn no_route() -> ApiFailure {
    ApiFailure(StatusCode::NOT_FOUND, "no such admin API route".into())
}

async fn no_method() -> ApiFailure {
    ApiFailure(
        StatusCode::METHOD_NOT_ALLOWED,
        "this admin API route does not take that method".into(),
    )
}

#[derive(Clone)]
struct AdminState {
    agent: Arc<Agent>,
    token: Arc<String>,
    declared: Option<Arc<Declarations>>,
}

/// Largest request body the admin API reads (a ticket is at most 64 KiB).
pub const MAX_BODY: usize = 256 * 1024;

fn check_token(state: &AdminState, headers: &HeaderMap) -> std::result::Result<(), ApiFailure> {
    check_bearer(&state.token, headers)
}

/// Compares the bearer token in constant time.
fn check_bearer(token: &str, headers: &HeaderMap) -> std::result::Result<(), ApiFailure> {
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let want = token.as_bytes();
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

pub use super::api::{STARTING, WAITING_FOR_STORAGE};

/// The admin API from the moment its port is bound, before the agent is
/// open: until [`AdminGate::open`], a caller with the token gets `503` and
/// what the daemon waits for (its storage, with the last error), at once,
/// instead of a connection nobody answers (`caravan-agent status` hung for
/// as long as the storage was unreachable); then every request goes to the
/// admin router.
#[derive(Clone)]
pub struct AdminGate {
    token: Arc<String>,
    open: Arc<std::sync::OnceLock<Router>>,
    waiting: Arc<std::sync::Mutex<String>>,
}

impl AdminGate {
    /// A gate answering "starting" to callers with `token`.
    pub fn new(token: String) -> AdminGate {
        AdminGate {
            token: Arc::new(token),
            open: Arc::default(),
            waiting: Arc::new(std::sync::Mutex::new(
                "waiting for its storage to answer".into(),
            )),
        }
    }

    /// What the daemon waits for now (said to callers with the token).
    pub fn waiting(&self, what: String) {
        if let Ok(mut w) = self.waiting.lock() {
            *w = what;
        }
    }

    /// From now on every request goes to `router`.
    pub fn open(&self, router: Router) {
        let _ = self.open.set(router);
    }

    /// The router to serve on the admin port.
    pub fn router(&self) -> Router {
        let gate = self.clone();
        Router::new().fallback(move |req: axum::extract::Request| {
            let gate = gate.clone();
            async move { gate.answer(req).await }
        })
    }

    async fn answer(&self, req: axum::extract::Request) -> Response {
        use tower::ServiceExt;
        if let Some(r) = self.open.get() {
            return match r.clone().oneshot(req).await {
                Ok(resp) => resp,
                Err(never) => match never {},
            };
        }
        if let Err(e) = check_bearer(&self.token, req.headers()) {
            return e.into_response();
        }
        let what = self.waiting.lock().map(|w| w.clone()).unwrap_or_default();
        ApiFailure(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{STARTING}: {what}"),
        )
        .into_response()
    }
}

/// The admin API router (bearer-token protected), without the declared
/// routes.
pub fn admin_router(agent: Arc<Agent>, token: String) -> Router {
    admin_router_with(agent, token, None)
}

/// The admin API router with the declared shares and grants the operator
/// uses (`/v1/declared/…`, answered 503 without `declared`).
pub fn admin_router_with(
    agent: Arc<Agent>,
    token: String,
    declared: Option<Arc<Declarations>>,
) -> Router {
    let state = AdminState {
        agent,
        token: Arc::new(token),
        declared,
    };
    let share_path = format!("{}/{{name}}", api::DECLARED_SHARES);
    let grant_path = format!("{}/{{key}}", api::DECLARED_GRANTS);
    Router::new()
        .route(api::DECLARED_SHARES, get(api_declared_list))
        .route(
            &share_path,
            put(api_declared_put)
                .get(api_declared_get)
                .delete(api_declared_delete),
        )
        .route(&grant_path, put(api_grant_put).delete(api_grant_delete))
        .route(api::STATUS, get(api_status))
        .route(api::ACTIVITY, get(api_activity))
        .route(api::SHARES, post(api_publish))
        .route(api::SHARE, delete(api_forget))
        .route(api::SHARE_TICKETS, post(api_ticket))
        .route(api::FETCHES, post(api_fetch))
        .route(api::FETCH, get(api_fetch_status).delete(api_fetch_cancel))
        .route(api::TRUST, get(api_trust_list))
        .route(api::TRUST_GRANTS, post(api_trust_grant))
        .route(api::TRUST_REVOCATIONS, post(api_trust_revoke))
        .route(api::TRUST_WHY, get(api_trust_why))
        .route(api::SHARE_PEERS, get(api_share_peers))
        .fallback(no_route)
        .method_not_allowed_fallback(no_method)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        .with_state(state)
}

fn declared(s: &AdminState) -> std::result::Result<Arc<Declarations>, ApiFailure> {
    s.declared.clone().ok_or_else(|| {
        ApiFailure(
            StatusCode::SERVICE_UNAVAILABLE,
            "declared shares are not enabled on this agent".into(),
        )
    })
}

async fn api_declared_list(
    State(s): State<AdminState>,
    h: HeaderMap,
) -> std::result::Result<Json<Vec<api::DeclaredShareStatus>>, ApiFailure> {
    check_token(&s, &h)?;
    Ok(Json(declared(&s)?.list_shares()))
}

async fn api_declared_put(
    State(s): State<AdminState>,
    h: HeaderMap,
    Segment(name): Segment,
    Body(req): Body<api::DeclaredShare>,
) -> std::result::Result<Json<api::DeclaredShareStatus>, ApiFailure> {
    check_token(&s, &h)?;
    Ok(Json(declared(&s)?.put_share(&name, req).await?))
}

async fn api_declared_get(
    State(s): State<AdminState>,
    h: HeaderMap,
    Segment(name): Segment,
) -> std::result::Result<Json<api::DeclaredShareStatus>, ApiFailure> {
    check_token(&s, &h)?;
    declared(&s)?
        .get_share(&name)
        .map(Json)
        .ok_or_else(|| ApiFailure(StatusCode::NOT_FOUND, format!("no declared share {name:?}")))
}

async fn api_declared_delete(
    State(s): State<AdminState>,
    h: HeaderMap,
    Segment(name): Segment,
) -> std::result::Result<StatusCode, ApiFailure> {
    check_token(&s, &h)?;
    declared(&s)?.delete_share(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn api_grant_put(
    State(s): State<AdminState>,
    h: HeaderMap,
    Segment(key): Segment,
    Body(req): Body<api::DeclaredGrant>,
) -> std::result::Result<Json<api::DeclaredGrantStatus>, ApiFailure> {
    check_token(&s, &h)?;
    Ok(Json(declared(&s)?.put_grant(&key, req).await?))
}

async fn api_grant_delete(
    State(s): State<AdminState>,
    h: HeaderMap,
    Segment(key): Segment,
) -> std::result::Result<Json<api::RevocationStatus>, ApiFailure> {
    check_token(&s, &h)?;
    Ok(Json(declared(&s)?.delete_grant(&key).await?))
}

/// Checks the bearer token before the request reaches its handler, so no
/// body is read or parsed for a caller without it.
async fn require_token(
    State(s): State<AdminState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match check_token(&s, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

async fn api_status(
    State(s): State<AdminState>,
    h: HeaderMap,
) -> std::result::Result<Json<Status>, ApiFailure> {
    check_token(&s, &h)?;
    Ok(Json(status(&s.agent)))
}

/// `GET /v1/activity`: idle time, pending and scheduled work (scale to zero).
async fn api_activity(
    State(s): State<AdminState>,
    h: HeaderMap,
) -> std::result::Result<Json<api::ActivityReport>, ApiFailure> {
    check_token(&s, &h)?;
    let schedule = s
        .declared
        .as_ref()
        .map(|d| d.schedule())
        .unwrap_or_default();
    Ok(Json(s.agent.activity_report(schedule)))
}

async fn api_publish(
    State(s): State<AdminState>,
    h: HeaderMap,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
    Body(req): Body<PublishRequest>,
) -> std::result::Result<Response, ApiFailure> {
    check_token(&s, &h)?;
    if query.as_deref() == Some(api::STREAM_QUERY) {
        return publish_streamed(s, req).await;
    }
    // The pass runs on its own task: a client that hangs up does not stop
    // it halfway (it is recorded until it ends: `publish_intent`).
    let agent = s.agent.clone();
    let published = tokio::spawn(async move { agent.publish_resumable(req, None).await })
        .await
        .map_err(|e| ApiFailure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    s.agent.activity.touch(api::activity::PUBLISH);
    Ok(Json(published).into_response())
}

/// A publish answered in JSON lines: the share id and tickets as soon as
/// they exist (recipients may start fetching while the pass runs), then
/// the [`Published`] summary, or an [`ApiError`] if the pass failed. An
/// error before the pass is an ordinary error answer.
async fn publish_streamed(
    s: AdminState,
    req: PublishRequest,
) -> std::result::Result<Response, ApiFailure> {
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let agent = s.agent.clone();
    let task = tokio::spawn(async move { agent.publish_resumable(req, Some(started_tx)).await });
    let started = match started_rx.await {
        Ok(started) => started,
        // Failed before it started: the task has the error.
        Err(_) => {
            return Err(match task.await {
                Ok(Err(e)) => e.into(),
                Ok(Ok(_)) => ApiFailure(StatusCode::INTERNAL_SERVER_ERROR, "publish".into()),
                Err(e) => ApiFailure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            });
        }
    };
    let line = |v: serde_json::Result<Vec<u8>>| {
        let mut b = v.unwrap_or_default();
        b.push(b'\n');
        bytes::Bytes::from(b)
    };
    let first = line(serde_json::to_vec(&started));
    let agent = s.agent.clone();
    let last = async move {
        let out = match task.await {
            Ok(Ok(p)) => {
                agent.activity.touch(api::activity::PUBLISH);
                serde_json::to_vec(&p)
            }
            Ok(Err(e)) => {
                let ApiFailure(status, error) = e.into();
                serde_json::to_vec(&ApiError {
                    error,
                    status: Some(status.as_u16()),
                })
            }
            Err(e) => serde_json::to_vec(&ApiError {
                error: e.to_string(),
                status: Some(StatusCode::INTERNAL_SERVER_ERROR.as_u16()),
            }),
        };
        Ok::<_, std::io::Error>(line(out))
    };
    let body = futures::stream::once(async move { Ok::<_, std::io::Error>(first) })
        .chain(futures::stream::once(last));
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

async fn api_ticket(
    State(s): State<AdminState>,
    h: HeaderMap,
    Segment(id): Segment,
    Body(req): Body<TicketRequest>,
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
    Body(req): Body<FetchRequest>,
) -> std::result::Result<Json<ProgressSnapshot>, ApiFailure> {
    check_token(&s, &h)?;
    s.agent.activity.touch(api::activity::FETCH);
    Ok(Json(s.agent.start_fetch(req).await?.snapshot()))
}

async fn api_forget(
    State(s): State<AdminState>,
    h: HeaderMap,
    Segment(id): Segment,
) -> std::result::Result<Json<api::Forgotten>, ApiFailure> {
    check_token(&s, &h)?;
    let id: ShareId = id.parse()?;
    if let Some(d) = &s.declared
        && let Some(name) = d
            .list_shares()
            .into_iter()
            .find(|d| d.share_id.as_deref() == Some(id.to_string().as_str()))
            .map(|d| d.name)
    {
        return Err(Error::Rejected(format!(
            "share {id} is declared as {name:?} (a Kubernetes Share or a declaration of the operator): delete the declaration to stop it, or it would be published or fetched again"
        ))
        .into());
    }
    Ok(Json(s.agent.forget(&id).await?))
}

async fn api_fetch_cancel(
    State(s): State<AdminState>,
    h: HeaderMap,
    Segment(id): Segment,
) -> std::result::Result<Json<serde_json::Value>, ApiFailure> {
    check_token(&s, &h)?;
    let id: ShareId = id.parse()?;
    s.agent.cancel_fetch(&id).await?;
    Ok(Json(
        serde_json::json!({ "share_id": id.to_string(), "cancelled": true }),
    ))
}

async fn api_fetch_status(
    State(s): State<AdminState>,
    h: HeaderMap,
    Segment(id): Segment,
) -> std::result::Result<Json<ProgressSnapshot>, ApiFailure> {
    check_token(&s, &h)?;
    let id: ShareId = id.parse()?;
    let p = s
        .agent
        .fetch_progress(&id)
        .ok_or_else(|| Error::NotFound(format!("no fetch of {id} since the agent started")))?;
    Ok(Json(p.snapshot()))
}

fn trust(s: &AdminState) -> std::result::Result<Arc<AgentTrust>, ApiFailure> {
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
    Ok(Json(trust(&s)?.listing().await))
}

/// `POST /v1/trust/grants` with a [`GrantRequest`]
/// (`{"subject": "<agent id>", "depth": N, "expires_secs": S?, "scope": "…"?}`):
/// signs a grant with this agent's key, keeps it and publishes it to every
/// configured repository; answers a [`GrantInfo`] (`published_to` lists the
/// repositories that stored it). 400 on a request refused before signing
/// ([`GrantRequest::check`]: validity 0 or beyond 366 days, depth beyond 8,
/// a bad scope; a grant to itself; a scope other than that of the grant to
/// the same subject in effect), 502 when repositories are configured and
/// none took it (the grant is in effect on this agent, and one that could
/// not be reached gets it from the outbox at a later trust sync).
async fn api_trust_grant(
    State(s): State<AdminState>,
    h: HeaderMap,
    Body(req): Body<GrantRequest>,
) -> std::result::Result<Json<GrantInfo>, ApiFailure> {
    check_token(&s, &h)?;
    let w = trust(&s)?;
    w.grant(&req).await.map(Json).map_err(|e| match e {
        Error::Protocol(m) => ApiFailure(StatusCode::BAD_GATEWAY, m),
        other => other.into(),
    })
}

/// `POST /v1/trust/revocations` with a [`RevokeRequest`].
async fn api_trust_revoke(
    State(s): State<AdminState>,
    h: HeaderMap,
    Body(req): Body<RevokeRequest>,
) -> std::result::Result<Json<RevokeResponse>, ApiFailure> {
    check_token(&s, &h)?;
    let w = trust(&s)?;
    Ok(Json(w.revoke(&req).await?))
}

/// `GET /v1/trust/why/{agent}`.
async fn api_trust_why(
    State(s): State<AdminState>,
    h: HeaderMap,
    Segment(agent): Segment,
) -> std::result::Result<Json<WhyAnswer>, ApiFailure> {
    check_token(&s, &h)?;
    let who: AgentId = agent.parse()?;
    Ok(Json(trust(&s)?.why(&who).await))
}

/// `GET /v1/shares/{id}/peers`: agents the repositories say hold the share.
async fn api_share_peers(
    State(s): State<AdminState>,
    h: HeaderMap,
    Segment(id): Segment,
) -> std::result::Result<Json<Vec<PeerInfo>>, ApiFailure> {
    check_token(&s, &h)?;
    let id: ShareId = id.parse()?;
    let peers = trust(&s)?.peers_for(&id.0).await?;
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
