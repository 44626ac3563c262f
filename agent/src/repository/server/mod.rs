//! The repository HTTP server.
//!
//! State lives entirely in OpenDAL storage, laid out as:
//!
//! | path | content |
//! |---|---|
//! | `records/announcement/<agent hex>` | the agent's newest announcement |
//! | `records/grant/<issuer hex>/<subject hex>` | the newest grant for the pair |
//! | `records/revocation/<issuer hex>/<grant id hex>` | a revocation |
//! | `index/locator/<locator hex>/<agent hex>` | empty marker: agent announced locator |
//! | `index/grant-subject/<subject hex>/<issuer hex>` | empty marker: a grant for subject |
//! | `feed/<n, 20 digits>` | the n-th revocation of the feed (0-based) |
//! | `records/seed/<publisher hex>/<share hex>` | the newest offline seed record of a share |
//!
//! **Replicas.** Look-ups read through to storage on every request (a small
//! in-memory cache only saves re-verifying the signature of bytes already
//! seen), so every replica on the same storage answers the same, and a
//! restart loses nothing: the only state "loaded on start" is the feed head.
//! Index markers are hints: a look-up re-checks the announcement it points
//! at and deletes markers that went stale.
//!
//! **Two writers.** Within one replica, writes to the same key are
//! serialised, so the "newer sequence number only" rule is exact. Across
//! replicas the read-check-write is not atomic on plain object stores: two
//! concurrent writes for one key may leave the older of the two stored. A
//! writer re-reads after writing and rewrites (bounded) when it finds an
//! older record, and agents re-announce periodically and readers keep the
//! highest sequence number across repositories, so this heals. Feed entries
//! are created with `if_not_exists` (atomic on memory, s3 with conditional
//! writes, and fs without `atomic_write_dir`; a narrow race with it), and a
//! writer that loses a number takes the next, so the feed stays gap-free.
//! A revocation is appended to the feed *before* its record is stored, so a
//! crash in between leaves a retry possible (a duplicate feed entry is
//! harmless: revocations are idempotent).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use futures::TryStreamExt;
use opendal::{ErrorKind, Operator};
use prometheus::{Encoder, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};
use serde::{Deserialize, Serialize};

use crate::error::{Context, Error, Result};
use crate::identity::AgentId;
use crate::record::{Kind, SignedRecord};
use crate::trust::{
    Announcement, Invalid, Reason, Revocation, SeedRecord, TrustGrant, decode_record,
};
use crate::util::{hex, parse_hex32, unix_now};

mod feed;
mod handlers;
mod layout;
mod limits;

pub use crate::conn_limits::Cidr;
use layout::*;
use limits::RateLimiter;

use super::{FRAMES_CONTENT_TYPE, MAX_FRAMES, MAX_RECORD_BYTES, NEXT_CURSOR_HEADER, encode_frames};

/// Tunables of a repository server.
#[derive(Debug, Clone)]
pub struct RepositoryConfig {
    /// Largest request body accepted (bytes).
    pub max_body_bytes: usize,
    /// Steady request rate allowed per client IP (requests per second).
    pub rate_per_second: f64,
    /// Burst allowed per client IP above the steady rate.
    pub rate_burst: u32,
    /// Proxies (e.g. the ingress) whose `X-Forwarded-For` names the client;
    /// requests from anywhere else are accounted to their socket address.
    pub trusted_proxies: Vec<Cidr>,
    /// Most records returned by one look-up or feed page.
    pub max_results: usize,
    /// Verified-record cache size (entries); it only saves signature checks.
    pub cache_entries: usize,
    /// Connection caps and idle cut of the listener (the trusted proxies
    /// are exempt from its per-address cap).
    pub connections: crate::conn_limits::HttpLimits,
}

impl Default for RepositoryConfig {
    fn default() -> Self {
        RepositoryConfig {
            max_body_bytes: MAX_RECORD_BYTES,
            rate_per_second: 50.0,
            rate_burst: 200,
            trusted_proxies: Vec::new(),
            max_results: MAX_FRAMES,
            cache_entries: 100_000,
            connections: crate::conn_limits::HttpLimits::from_env(),
        }
    }
}

/// A record as the server keeps it after checking: the verified bytes and
/// the opened value.
#[derive(Debug, Clone)]
enum Parsed {
    Announcement(Announcement),
    Grant(TrustGrant),
    Revocation(Revocation),
    Seed(SeedRecord),
}

impl Parsed {
    fn seq(&self) -> u64 {
        match self {
            Parsed::Announcement(a) => a.seq,
            Parsed::Grant(g) => g.seq,
            Parsed::Revocation(r) => r.seq,
            Parsed::Seed(s) => s.seq,
        }
    }
}

#[derive(Debug)]
struct Cached {
    bytes: Vec<u8>,
    value: Parsed,
}

struct Metrics {
    registry: Registry,
    accepted: IntCounterVec,
    rejected: IntCounterVec,
    lookups: IntCounterVec,
    rate_limited: IntCounter,
    storage_errors: IntCounter,
}

impl Metrics {
    fn new() -> Result<Self> {
        let registry = Registry::new();
        let m = |e: prometheus::Error| Error::Config(format!("metrics: {e}"));
        let accepted = IntCounterVec::new(
            Opts::new(
                "caravan_repository_records_accepted_total",
                "Records accepted, by kind",
            ),
            &["kind"],
        )
        .map_err(m)?;
        let rejected = IntCounterVec::new(
            Opts::new(
                "caravan_repository_records_rejected_total",
                "Records refused, by reason",
            ),
            &["reason"],
        )
        .map_err(m)?;
        let lookups = IntCounterVec::new(
            Opts::new(
                "caravan_repository_lookups_total",
                "Look-ups served, by kind",
            ),
            &["kind"],
        )
        .map_err(m)?;
        let rate_limited = IntCounter::new(
            "caravan_repository_rate_limited_total",
            "Requests refused by the per-client rate limit",
        )
        .map_err(m)?;
        let storage_errors = IntCounter::new(
            "caravan_repository_storage_errors_total",
            "Storage operations that failed",
        )
        .map_err(m)?;
        registry.register(Box::new(accepted.clone())).map_err(m)?;
        // process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds…
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(crate::process_metrics::Process::for_self()))
            .map_err(m)?;
        registry.register(Box::new(rejected.clone())).map_err(m)?;
        registry.register(Box::new(lookups.clone())).map_err(m)?;
        registry
            .register(Box::new(rate_limited.clone()))
            .map_err(m)?;
        registry
            .register(Box::new(storage_errors.clone()))
            .map_err(m)?;
        Ok(Metrics {
            registry,
            accepted,
            rejected,
            lookups,
            rate_limited,
            storage_errors,
        })
    }
}

const WRITE_STRIPES: usize = 64;
/// Grants (distinct subjects) one issuer may have stored.
pub const MAX_GRANTS_PER_ISSUER: usize = 10_000;
/// Most shares with an offline seed record stored per publisher.
pub const MAX_SEEDS_PER_PUBLISHER: usize = 10_000;
/// Grants indexed per subject for `/v1/grants/by-subject/` (beyond it a
/// grant is stored and found by issuer, not by subject). Agents find trust
/// proofs by issuer, forward from the publisher, which strangers cannot fill.
pub const MAX_INDEXED_PER_SUBJECT: usize = MAX_FRAMES;
const WRITE_RECHECKS: usize = 3;
const FEED_ATTEMPTS: usize = 32;

/// A repository: storage, caches, limits and metrics. Cheap to share (`Arc`).
pub struct Repository {
    op: Operator,
    cfg: RepositoryConfig,
    metrics: Metrics,
    stripes: Vec<tokio::sync::Mutex<()>>,
    feed_lock: tokio::sync::Mutex<u64>,
    cache: Mutex<HashMap<String, Arc<Cached>>>,
    feed_cache: Mutex<HashMap<u64, Arc<Vec<u8>>>>,
    limiter: RateLimiter,
}

/// Why a request failed, as the HTTP answer will say it.
#[derive(Debug)]
enum ApiError {
    Refused(Invalid),
    NotFound(String),
    BadRequest(String),
    Storage(String),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    detail: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, detail) = match &self {
            ApiError::Refused(inv) => {
                let status = match inv.reason {
                    Reason::Oversize => StatusCode::PAYLOAD_TOO_LARGE,
                    Reason::Stale => StatusCode::CONFLICT,
                    Reason::Expired | Reason::FarFuture => StatusCode::UNPROCESSABLE_ENTITY,
                    Reason::WrongKind => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    Reason::Forged | Reason::WrongSigner => StatusCode::FORBIDDEN,
                    _ => StatusCode::BAD_REQUEST,
                };
                (status, inv.reason.as_str(), inv.detail.as_str())
            }
            ApiError::NotFound(d) => (StatusCode::NOT_FOUND, "not_found", d.as_str()),
            ApiError::BadRequest(d) => (StatusCode::BAD_REQUEST, "bad_request", d.as_str()),
            ApiError::Storage(d) => (StatusCode::SERVICE_UNAVAILABLE, "storage", d.as_str()),
        };
        let body = serde_json::to_string(&ErrorBody {
            error: code,
            detail,
        })
        .unwrap_or_else(|_| "{\"error\":\"internal\"}".into());
        (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response()
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        ApiError::Refused(e)
    }
}

/// The JSON receipt of an accepted record.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Receipt {
    /// The record kind's tag (`announcement`, `trust-grant`, `revocation`).
    pub kind: String,
    /// The storage key the record now lives under.
    pub key: String,
    /// For revocations: the feed number it was appended as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feed_seq: Option<u64>,
}

impl Repository {
    /// Opens a repository on `op`: checks that storage answers and finds the
    /// head of the revocation feed. Everything else is read on demand.
    pub async fn open(op: Operator, cfg: RepositoryConfig) -> Result<Arc<Self>> {
        let cfg_rate = (cfg.rate_per_second, cfg.rate_burst);
        let repo = Repository {
            op,
            cfg,
            metrics: Metrics::new()?,
            stripes: (0..WRITE_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            feed_lock: tokio::sync::Mutex::new(0),
            cache: Mutex::new(HashMap::new()),
            feed_cache: Mutex::new(HashMap::new()),
            limiter: RateLimiter::new(cfg_rate.0, cfg_rate.1),
        };
        let head = repo.find_feed_head(0).await?;
        *repo.feed_lock.lock().await = head;
        tracing::info!(feed_head = head, "repository storage opened");
        Ok(Arc::new(repo))
    }

    fn storage_error(&self, e: Error) -> ApiError {
        self.metrics.storage_errors.inc();
        tracing::warn!(error = %e, "repository storage error");
        ApiError::Storage(e.to_string())
    }

    fn stripe(&self, key: &str) -> &tokio::sync::Mutex<()> {
        let h = blake3::hash(key.as_bytes());
        &self.stripes[h.as_bytes()[0] as usize % WRITE_STRIPES]
    }

    async fn read_raw(&self, path: &str) -> Result<Option<Vec<u8>>> {
        match self.op.read(path).await {
            Ok(buf) => Ok(Some(buf.to_vec())),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(Error::Storage {
                context: format!("reading {path}"),
                source: e,
            }),
        }
    }

    /// Reads and opens the record at `path`; bytes that no longer verify
    /// (storage tampering, a torn write) count as absent.
    async fn read_record(&self, path: &str) -> Result<Option<Arc<Cached>>> {
        let Some(bytes) = self.read_raw(path).await? else {
            return Ok(None);
        };
        if let Ok(cache) = self.cache.lock()
            && let Some(c) = cache.get(path)
            && c.bytes == bytes
        {
            return Ok(Some(c.clone()));
        }
        let Ok(value) = parse_any(&bytes) else {
            tracing::warn!(path, "stored record does not verify; ignoring it");
            return Ok(None);
        };
        let c = Arc::new(Cached { bytes, value });
        self.remember(path, c.clone());
        Ok(Some(c))
    }

    fn remember(&self, path: &str, c: Arc<Cached>) {
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= self.cfg.cache_entries {
                cache.clear();
            }
            cache.insert(path.to_string(), c);
        }
    }

    async fn list_names(&self, prefix: &str, max: usize) -> Result<Vec<String>> {
        let lister = match self.op.lister(prefix).await {
            Ok(l) => l,
            Err(e) if is_not_found(&e) => return Ok(Vec::new()),
            Err(e) => {
                return Err(Error::Storage {
                    context: format!("listing {prefix}"),
                    source: e,
                });
            }
        };
        let mut names = Vec::new();
        let mut lister = lister;
        while names.len() < max {
            match lister.try_next().await {
                Ok(Some(entry)) => {
                    let name = entry.name().trim_end_matches('/');
                    if !name.is_empty() && entry.path() != prefix {
                        names.push(name.to_string());
                    }
                }
                Ok(None) => break,
                Err(e) if is_not_found(&e) => break,
                Err(e) => {
                    return Err(Error::Storage {
                        context: format!("listing {prefix}"),
                        source: e,
                    });
                }
            }
        }
        Ok(names)
    }

    /// One page of the names under `prefix`, in name order: at most `page`
    /// names greater than `after`, and the cursor to continue from when more
    /// remain. Listings are unordered on most services, so the folder is
    /// read whole, but never beyond `scan_cap` names (the per-issuer record
    /// cap bounds what a folder may hold).
    async fn list_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        page: usize,
        scan_cap: usize,
    ) -> Result<(Vec<String>, Option<String>)> {
        let mut names = self.list_names(prefix, scan_cap).await?;
        names.sort_unstable();
        if let Some(a) = after {
            names.retain(|n| n.as_str() > a);
        }
        let next = (names.len() > page).then(|| names[page - 1].clone());
        names.truncate(page);
        Ok((names, next))
    }

    /// Stores `bytes` at `path` unless an equal-or-newer record is there,
    /// then re-reads to make sure a concurrent writer (another replica) did
    /// not leave an older record in place.
    async fn store_if_newer(
        &self,
        path: &str,
        bytes: &[u8],
        value: &Parsed,
    ) -> Result<std::result::Result<(), Invalid>> {
        let _guard = self.stripe(path).lock().await;
        for _ in 0..WRITE_RECHECKS {
            if let Some(existing) = self.read_record(path).await? {
                if existing.bytes == bytes {
                    return Ok(Ok(()));
                }
                if existing.value.seq() >= value.seq() {
                    return Ok(Err(Invalid::new(
                        Reason::Stale,
                        format!(
                            "sequence number {} is not newer than the stored {}",
                            value.seq(),
                            existing.value.seq()
                        ),
                    )));
                }
            }
            self.op
                .write(path, bytes.to_vec())
                .await
                .context(|| format!("writing {path}"))?;
            self.remember(
                path,
                Arc::new(Cached {
                    bytes: bytes.to_vec(),
                    value: value.clone(),
                }),
            );
            // Loop re-reads: if our bytes are there (or a newer record), done.
            match self.read_record(path).await? {
                Some(now) if now.bytes == bytes || now.value.seq() > value.seq() => {
                    return Ok(Ok(()));
                }
                _ => continue,
            }
        }
        Ok(Ok(()))
    }

    async fn put_marker(&self, path: &str) -> Result<()> {
        self.op
            .write(path, Vec::<u8>::new())
            .await
            .map(|_| ())
            .context(|| format!("writing {path}"))
    }

    async fn delete_quietly(&self, path: &str) {
        if let Err(e) = self.op.delete(path).await {
            tracing::debug!(path, error = %e, "could not delete stale index marker");
        }
    }

    /// Checks and stores one record (the body of `POST /v1/records`).
    async fn accept(&self, bytes: &[u8]) -> std::result::Result<Receipt, ApiError> {
        let now = unix_now();
        let rec = decode_record(bytes)?;
        let value = open_checked(&rec, now)?;
        let storage = |e| self.storage_error(e);
        match &value {
            Parsed::Seed(sr) => {
                let path = self.accept_seed(bytes, &value, sr).await?;
                Ok(Receipt {
                    kind: rec.kind.tag().into(),
                    key: path,
                    feed_seq: None,
                })
            }
            Parsed::Announcement(a) => {
                let path = announcement_path(&a.agent);
                let previous = self.read_record(&path).await.map_err(storage)?;
                self.store_if_newer(&path, bytes, &value)
                    .await
                    .map_err(storage)??;
                for loc in &a.locators {
                    self.put_marker(&locator_marker(loc, &a.agent))
                        .await
                        .map_err(storage)?;
                }
                if let Some(prev) = previous
                    && let Parsed::Announcement(old) = &prev.value
                {
                    for loc in old.locators.iter().filter(|l| !a.locators.contains(l)) {
                        self.delete_quietly(&locator_marker(loc, &a.agent)).await;
                    }
                }
                Ok(Receipt {
                    kind: rec.kind.tag().into(),
                    key: path,
                    feed_seq: None,
                })
            }
            Parsed::Grant(g) => {
                let path = grant_path(&g.issuer, &g.subject);
                // Per issuer: a bounded number of subjects.
                if !self
                    .op
                    .exists(&path)
                    .await
                    .context(|| format!("checking {path}"))
                    .map_err(storage)?
                    && self
                        .list_names(&issuer_grants_prefix(&g.issuer), MAX_GRANTS_PER_ISSUER)
                        .await
                        .map_err(storage)?
                        .len()
                        >= MAX_GRANTS_PER_ISSUER
                {
                    return Err(Invalid::new(
                        Reason::TooMany,
                        format!(
                            "{} already has {MAX_GRANTS_PER_ISSUER} grants stored (the limit)",
                            g.issuer.short()
                        ),
                    )
                    .into());
                }
                self.store_if_newer(&path, bytes, &value)
                    .await
                    .map_err(storage)??;
                self.put_marker(&grant_id_marker(&g.issuer, &g.id()))
                    .await
                    .map_err(storage)?;
                let marker = subject_marker(&g.subject, &g.issuer);
                if self.op.exists(&marker).await.unwrap_or(false)
                    || self
                        .list_names(&subject_index_prefix(&g.subject), MAX_INDEXED_PER_SUBJECT)
                        .await
                        .map_err(storage)?
                        .len()
                        < MAX_INDEXED_PER_SUBJECT
                {
                    self.put_marker(&marker).await.map_err(storage)?;
                }
                Ok(Receipt {
                    kind: rec.kind.tag().into(),
                    key: path,
                    feed_seq: None,
                })
            }
            Parsed::Revocation(r) => {
                let path = revocation_path(&r.issuer, &r.grant_id);
                // Only grants stored here can be revoked here: nobody can
                // grow the feed (and every agent's trust state) with
                // revocations of grants that never existed.
                let known = grant_id_marker(&r.issuer, &r.grant_id);
                if !self
                    .op
                    .exists(&known)
                    .await
                    .context(|| format!("checking {known}"))
                    .map_err(storage)?
                {
                    return Err(Invalid::new(
                        Reason::UnknownGrant,
                        format!(
                            "no grant {} by {} is stored here; store the grant before its revocation",
                            r.grant_id.to_hex(),
                            r.issuer.short()
                        ),
                    )
                    .into());
                }
                let _guard = self.stripe(&path).lock().await;
                if let Some(existing) = self.read_record(&path).await.map_err(storage)?
                    && existing.value.seq() >= r.seq
                {
                    return Err(Invalid::new(
                        Reason::Stale,
                        format!(
                            "revocation sequence number {} is not newer than the stored {}",
                            r.seq,
                            existing.value.seq()
                        ),
                    )
                    .into());
                }
                let n = self.append_feed(bytes).await.map_err(storage)?;
                self.op
                    .write(&path, bytes.to_vec())
                    .await
                    .context(|| format!("writing {path}"))
                    .map_err(storage)?;
                Ok(Receipt {
                    kind: rec.kind.tag().into(),
                    key: path,
                    feed_seq: Some(n),
                })
            }
        }
    }

    /// Stores a seed record if it is newer than the one held for its share,
    /// within a bounded number of shares per publisher.
    async fn accept_seed(
        &self,
        bytes: &[u8],
        value: &Parsed,
        s: &SeedRecord,
    ) -> std::result::Result<String, ApiError> {
        let storage = |e| self.storage_error(e);
        let path = seed_path(&s.publisher, &s.share_id.0);
        if !self
            .op
            .exists(&path)
            .await
            .context(|| format!("checking {path}"))
            .map_err(storage)?
            && self
                .list_names(
                    &publisher_seeds_prefix(&s.publisher),
                    MAX_SEEDS_PER_PUBLISHER,
                )
                .await
                .map_err(storage)?
                .len()
                >= MAX_SEEDS_PER_PUBLISHER
        {
            return Err(Invalid::new(
                Reason::Oversize,
                format!(
                    "{} already has {MAX_SEEDS_PER_PUBLISHER} seed records stored (the limit)",
                    s.publisher.short()
                ),
            )
            .into());
        }
        self.store_if_newer(&path, bytes, value)
            .await
            .map_err(storage)??;
        Ok(path)
    }

    /// Checks and stores one record in-process, exactly as `POST
    /// /v1/records` would (for embedding a repository, tools and benches).
    /// Refusals come back as [`Error::Record`] naming the reason.
    pub async fn submit(&self, bytes: &[u8]) -> Result<Receipt> {
        self.accept(bytes).await.map_err(|e| match e {
            ApiError::Refused(inv) => Error::from(inv),
            ApiError::NotFound(d) => Error::NotFound(d),
            ApiError::BadRequest(d) => Error::Protocol(d),
            ApiError::Storage(d) => Error::Protocol(format!("storage: {d}")),
        })
    }

    fn allow(&self, peer: IpAddr, headers: &axum::http::HeaderMap) -> bool {
        self.limiter
            .allow(limits::client_ip(peer, headers, &self.cfg.trusted_proxies))
    }
}

/// Opens a verified record of any repository kind, checking signer, bounds
/// and the clock.
fn open_checked(rec: &SignedRecord, now: u64) -> std::result::Result<Parsed, Invalid> {
    Ok(match rec.kind {
        Kind::Announcement => {
            let a = Announcement::from_record(rec)?;
            a.check_window(now)?;
            Parsed::Announcement(a)
        }
        Kind::TrustGrant => {
            let g = TrustGrant::from_record(rec)?;
            g.check_window(now)?;
            Parsed::Grant(g)
        }
        Kind::Revocation => {
            let r = Revocation::from_record(rec)?;
            r.check_time(now)?;
            Parsed::Revocation(r)
        }
        Kind::Seed => {
            let s = SeedRecord::from_record(rec)?;
            s.check_window(now)?;
            Parsed::Seed(s)
        }
        other => {
            return Err(Invalid::new(
                Reason::WrongKind,
                format!("a repository does not store {} records", other.tag()),
            ));
        }
    })
}

/// Decodes stored bytes without the clock (expiry is checked at look-up).
fn parse_any(bytes: &[u8]) -> std::result::Result<Parsed, Invalid> {
    let rec = decode_record(bytes)?;
    Ok(match rec.kind {
        Kind::Announcement => Parsed::Announcement(Announcement::from_record(&rec)?),
        Kind::TrustGrant => Parsed::Grant(TrustGrant::from_record(&rec)?),
        Kind::Revocation => Parsed::Revocation(Revocation::from_record(&rec)?),
        Kind::Seed => Parsed::Seed(SeedRecord::from_record(&rec)?),
        other => {
            return Err(Invalid::new(
                Reason::WrongKind,
                format!("unexpected {} record in storage", other.tag()),
            ));
        }
    })
}

/// Serves a repository with default tunables on `addr` until `shutdown`
/// resolves. This is what `caravan-agent repository` runs.
pub async fn serve(
    addr: SocketAddr,
    op: Operator,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .context(|| format!("binding repository listener on {addr}"))?;
    serve_with(listener, op, RepositoryConfig::default(), shutdown).await
}

/// Serves a repository on an already bound listener (tests bind port 0 and
/// read the address first) with explicit tunables.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    op: Operator,
    cfg: RepositoryConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let repo = Repository::open(op, cfg).await?;
    let addr = listener
        .local_addr()
        .context(|| "reading the listener address".into())?;
    tracing::info!(%addr, "repository listening");
    let mut limits = repo.cfg.connections.clone();
    limits
        .exempt
        .extend(repo.cfg.trusted_proxies.iter().cloned());
    // `tap_io` does nothing to the connections: it is how axum lends
    // `ConnectInfo<SocketAddr>` (the rate limit's key) to any listener.
    let listener = crate::conn_limits::CappedListener::new(listener, limits).tap_io(|_| {});
    axum::serve(
        listener,
        repo.router()
            .into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .context(|| format!("serving the repository on {addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;
    use proptest::prelude::*;

    fn repo(rt: &tokio::runtime::Runtime) -> Arc<Repository> {
        opendal::install_default();
        let op = Operator::via_iter("memory", Vec::<(String, String)>::new()).unwrap();
        rt.block_on(Repository::open(op, RepositoryConfig::default()))
            .unwrap()
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn submit_refuses_each_bit_flip_of_a_grant() {
        let rt = rt();
        let r = repo(&rt);
        let k = SecretKey::from_seed([1; 32]);
        let now = unix_now();
        let g = TrustGrant {
            issuer: k.agent_id(),
            subject: SecretKey::from_seed([2; 32]).agent_id(),
            depth: 1,
            scope: None,
            not_before: now,
            not_after: now + 100,
            seq: 1,
        };
        let bytes = SignedRecord::seal(&k, &g).unwrap().to_bytes();
        for byte in 0..bytes.len() {
            let mut b = bytes.clone();
            b[byte] ^= 1 << (byte % 8);
            assert!(
                rt.block_on(r.submit(&b)).is_err(),
                "flip in byte {byte} accepted"
            );
        }
        assert!(rt.block_on(r.submit(&bytes)).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn submit_never_panics_on_arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let rt = rt();
            let r = repo(&rt);
            prop_assert!(rt.block_on(r.submit(&b)).is_err());
        }

    }
}
