//! The HTTP API of the repository: the router, the per-client rate limit
//! middleware, and one handler per route.

use super::*;

impl Repository {
    /// The axum router serving the API (with body limit, rate limit, metrics).
    /// Serve it with `into_make_service_with_connect_info::<SocketAddr>()`:
    /// the per-client rate limit keys on the peer address (proxy headers are
    /// deliberately not trusted).
    pub fn router(self: &Arc<Self>) -> Router {
        let api = Router::new()
            .route("/v1/records", post(post_record))
            .route("/v1/announcements/{agent}", get(get_announcement))
            .route("/v1/locators/{locator}", get(get_locator))
            .route("/v1/grants/by-issuer/{agent}", get(get_grants_by_issuer))
            .route("/v1/grants/by-subject/{agent}", get(get_grants_by_subject))
            .route(
                "/v1/revocations/by-issuer/{agent}",
                get(get_revocations_by_issuer),
            )
            .route("/v1/revocations", get(get_feed))
            .route("/v1/seeds/{agent}/{share}", get(get_seed))
            .layer(middleware::from_fn_with_state(self.clone(), rate_limit))
            .layer(DefaultBodyLimit::max(self.cfg.max_body_bytes));
        Router::new()
            .route("/metrics", get(get_metrics))
            .route("/healthz", get(|| async { "ok\n" }))
            .merge(api)
            .with_state(self.clone())
    }
}

async fn rate_limit(
    State(repo): State<Arc<Repository>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    if repo.allow(addr.ip(), req.headers()) {
        next.run(req).await
    } else {
        repo.metrics.rate_limited.inc();
        let body =
            r#"{"error":"rate_limited","detail":"too many requests from this address; slow down"}"#;
        (
            StatusCode::TOO_MANY_REQUESTS,
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ),
                (header::RETRY_AFTER, HeaderValue::from_static("1")),
            ],
            body,
        )
            .into_response()
    }
}

async fn post_record(
    State(repo): State<Arc<Repository>>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let result = match body {
        Ok(bytes) => repo.accept(&bytes).await,
        Err(rej) => Err(ApiError::Refused(Invalid::new(
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Reason::Oversize
            } else {
                Reason::Malformed
            },
            rej.body_text(),
        ))),
    };
    match result {
        Ok(receipt) => {
            repo.metrics
                .accepted
                .with_label_values(&[receipt.kind.as_str()])
                .inc();
            axum::Json(receipt).into_response()
        }
        Err(e) => {
            if let ApiError::Refused(inv) = &e {
                repo.metrics
                    .rejected
                    .with_label_values(&[inv.reason.as_str()])
                    .inc();
                tracing::debug!(reason = %inv.reason, detail = %inv.detail, "record refused");
            }
            e.into_response()
        }
    }
}

fn parse_agent(s: &str) -> std::result::Result<AgentId, ApiError> {
    if let Some(raw) = parse_hex32(s) {
        return Ok(AgentId(raw));
    }
    s.parse::<AgentId>()
        .map_err(|e| ApiError::BadRequest(e.to_string()))
}

fn frames_response(records: Vec<Arc<Cached>>) -> Response {
    let body = encode_frames(records.iter().map(|c| c.bytes.as_slice()));
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(FRAMES_CONTENT_TYPE),
        )],
        body,
    )
        .into_response()
}

async fn get_announcement(
    State(repo): State<Arc<Repository>>,
    Path(agent): Path<String>,
) -> std::result::Result<Response, ApiError> {
    let agent = parse_agent(&agent)?;
    repo.metrics
        .lookups
        .with_label_values(&["announcement"])
        .inc();
    let now = unix_now();
    match repo
        .read_record(&announcement_path(&agent))
        .await
        .map_err(|e| repo.storage_error(e))?
    {
        Some(c) if matches!(&c.value, Parsed::Announcement(a) if a.expires_at > now) => Ok((
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            )],
            c.bytes.clone(),
        )
            .into_response()),
        _ => Err(ApiError::NotFound(format!(
            "no current announcement for {}",
            agent.short()
        ))),
    }
}

async fn get_seed(
    State(repo): State<Arc<Repository>>,
    Path((agent, share)): Path<(String, String)>,
) -> std::result::Result<Response, ApiError> {
    let agent = parse_agent(&agent)?;
    let share = parse_hex32(&share)
        .ok_or_else(|| ApiError::BadRequest("a share id is 64 hex digits".into()))?;
    repo.metrics.lookups.with_label_values(&["seed"]).inc();
    let now = unix_now();
    match repo
        .read_record(&seed_path(&agent, &share))
        .await
        .map_err(|e| repo.storage_error(e))?
    {
        Some(c) if matches!(&c.value, Parsed::Seed(s) if s.expires_at > now) => Ok((
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            )],
            c.bytes.clone(),
        )
            .into_response()),
        _ => Err(ApiError::NotFound(format!(
            "no current seed record of {} for that share",
            agent.short()
        ))),
    }
}

async fn get_locator(
    State(repo): State<Arc<Repository>>,
    Path(locator): Path<String>,
) -> std::result::Result<Response, ApiError> {
    let loc = parse_hex32(&locator)
        .ok_or_else(|| ApiError::BadRequest("a locator is 64 hex characters".into()))?;
    repo.metrics.lookups.with_label_values(&["locator"]).inc();
    let now = unix_now();
    let prefix = format!("index/locator/{}/", hex(&loc));
    let names = repo
        .list_names(&prefix, repo.cfg.max_results)
        .await
        .map_err(|e| repo.storage_error(e))?;
    let mut out = Vec::new();
    for name in names {
        let Some(agent) = parse_hex32(&name).map(AgentId) else {
            continue;
        };
        let rec = repo
            .read_record(&announcement_path(&agent))
            .await
            .map_err(|e| repo.storage_error(e))?;
        match rec {
            Some(c) if matches!(&c.value, Parsed::Announcement(a) if a.expires_at > now && a.locators.contains(&loc)) => {
                out.push(c)
            }
            _ => {
                // Expired, gone, or the agent no longer holds it: the marker
                // is stale. (Markers are written after their announcement,
                // and a re-announcement writes them again.)
                repo.delete_quietly(&format!("{prefix}{name}")).await;
            }
        }
    }
    Ok(frames_response(out))
}

async fn grants_for(
    repo: &Repository,
    paths: Vec<String>,
) -> std::result::Result<Vec<Arc<Cached>>, ApiError> {
    let now = unix_now();
    let mut out = Vec::new();
    for p in paths {
        if let Some(c) = repo
            .read_record(&p)
            .await
            .map_err(|e| repo.storage_error(e))?
            && matches!(&c.value, Parsed::Grant(g) if g.check_window(now).is_ok())
        {
            out.push(c);
        }
    }
    Ok(out)
}

/// `?after=<64 hex>`: continue a paged listing after that name.
#[derive(Debug, Deserialize)]
struct PageQuery {
    after: Option<String>,
}

impl PageQuery {
    fn after(&self) -> std::result::Result<Option<&str>, ApiError> {
        match self.after.as_deref() {
            None => Ok(None),
            Some(a) if parse_hex32(a).is_some() => Ok(Some(a)),
            Some(_) => Err(ApiError::BadRequest(
                "`after` is a name from the previous page (64 hex characters)".into(),
            )),
        }
    }
}

/// Frames plus, when the listing goes on, the cursor for `?after=`.
fn paged_response(records: Vec<Arc<Cached>>, next: Option<String>) -> Response {
    let mut resp = frames_response(records);
    if let Some(v) = next.and_then(|n| HeaderValue::from_str(&n).ok()) {
        resp.headers_mut()
            .insert(header::HeaderName::from_static(NEXT_CURSOR_HEADER), v);
    }
    resp
}

/// Most names read from one issuer's folder: its record cap, plus slack for
/// records being replaced.
const ISSUER_SCAN_CAP: usize = MAX_GRANTS_PER_ISSUER + MAX_FRAMES;

async fn get_grants_by_issuer(
    State(repo): State<Arc<Repository>>,
    Path(agent): Path<String>,
    Query(q): Query<PageQuery>,
) -> std::result::Result<Response, ApiError> {
    let issuer = parse_agent(&agent)?;
    let after = q.after()?;
    repo.metrics
        .lookups
        .with_label_values(&["grants_by_issuer"])
        .inc();
    let prefix = format!("records/grant/{}/", hex(&issuer.0));
    let (names, next) = repo
        .list_page(&prefix, after, repo.cfg.max_results, ISSUER_SCAN_CAP)
        .await
        .map_err(|e| repo.storage_error(e))?;
    let paths = names.into_iter().map(|n| format!("{prefix}{n}")).collect();
    Ok(paged_response(grants_for(&repo, paths).await?, next))
}

async fn get_grants_by_subject(
    State(repo): State<Arc<Repository>>,
    Path(agent): Path<String>,
) -> std::result::Result<Response, ApiError> {
    let subject = parse_agent(&agent)?;
    repo.metrics
        .lookups
        .with_label_values(&["grants_by_subject"])
        .inc();
    let prefix = format!("index/grant-subject/{}/", hex(&subject.0));
    let names = repo
        .list_names(&prefix, repo.cfg.max_results)
        .await
        .map_err(|e| repo.storage_error(e))?;
    let paths = names
        .into_iter()
        .filter_map(|n| parse_hex32(&n).map(|i| grant_path(&AgentId(i), &subject)))
        .collect();
    Ok(frames_response(grants_for(&repo, paths).await?))
}

async fn get_revocations_by_issuer(
    State(repo): State<Arc<Repository>>,
    Path(agent): Path<String>,
    Query(q): Query<PageQuery>,
) -> std::result::Result<Response, ApiError> {
    let issuer = parse_agent(&agent)?;
    let after = q.after()?;
    repo.metrics
        .lookups
        .with_label_values(&["revocations_by_issuer"])
        .inc();
    let prefix = format!("records/revocation/{}/", hex(&issuer.0));
    let (names, next) = repo
        .list_page(&prefix, after, repo.cfg.max_results, ISSUER_SCAN_CAP)
        .await
        .map_err(|e| repo.storage_error(e))?;
    let mut out = Vec::new();
    for n in names {
        if let Some(c) = repo
            .read_record(&format!("{prefix}{n}"))
            .await
            .map_err(|e| repo.storage_error(e))?
        {
            out.push(c);
        }
    }
    Ok(paged_response(out, next))
}

#[derive(Debug, Deserialize)]
struct FeedQuery {
    #[serde(default)]
    cursor: u64,
    limit: Option<usize>,
}

async fn get_feed(
    State(repo): State<Arc<Repository>>,
    Query(q): Query<FeedQuery>,
) -> std::result::Result<Response, ApiError> {
    repo.metrics
        .lookups
        .with_label_values(&["revocation_feed"])
        .inc();
    let limit = q
        .limit
        .unwrap_or(repo.cfg.max_results)
        .min(repo.cfg.max_results);
    let mut entries: Vec<Arc<Vec<u8>>> = Vec::new();
    let mut n = q.cursor;
    while entries.len() < limit {
        let cached = repo.feed_cache.lock().ok().and_then(|c| c.get(&n).cloned());
        let bytes = match cached {
            Some(b) => b,
            None => {
                let Some(raw) = repo
                    .read_raw(&feed_path(n))
                    .await
                    .map_err(|e| repo.storage_error(e))?
                else {
                    break;
                };
                // An entry that does not verify is being written right now
                // (or was tampered with): stop before it, the client retries.
                if decode_record(&raw)
                    .and_then(|r| Revocation::from_record(&r))
                    .is_err()
                {
                    tracing::warn!(n, "feed entry does not verify; stopping the page before it");
                    break;
                }
                let b = Arc::new(raw);
                if let Ok(mut c) = repo.feed_cache.lock() {
                    if c.len() >= repo.cfg.cache_entries {
                        c.clear();
                    }
                    c.insert(n, b.clone());
                }
                b
            }
        };
        entries.push(bytes);
        n += 1;
    }
    let body = encode_frames(entries.iter().map(|b| b.as_slice()));
    let next =
        HeaderValue::from_str(&n.to_string()).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(FRAMES_CONTENT_TYPE),
            ),
            (header::HeaderName::from_static(NEXT_CURSOR_HEADER), next),
        ],
        body,
    )
        .into_response())
}

async fn get_metrics(State(repo): State<Arc<Repository>>) -> Response {
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&repo.metrics.registry.gather(), &mut buf) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            )],
            buf,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;
    use proptest::prelude::*;

    #[test]
    fn agent_path_parameters() {
        let id = SecretKey::from_seed([1; 32]).agent_id();
        assert_eq!(parse_agent(&id.to_string()).unwrap(), id);
        assert_eq!(parse_agent(&hex(&id.0)).unwrap(), id);
        assert!(parse_agent("nope").is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn path_parsers_never_panic(s in ".{0,100}") {
            let _ = parse_agent(&s);
            let _ = parse_hex32(&s);
        }
    }
}
