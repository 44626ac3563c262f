//! The agent's side of the web of trust: its [`TrustEngine`], the grants and
//! revocations it signs, what it learned from repositories, and the
//! background task that keeps all of that current (announce, revocation
//! feed). [`crate::node::agent::Agent::authorized`] consults it for
//! trust-depth shares.
//!
//! State lives under `<state_prefix>trust/records/` (one signed record per
//! file), so a restarted agent keeps its grants, revocations and what it
//! learned even while every repository is down. Grants and revocations this
//! agent signed that a configured repository has not taken yet wait in
//! `<state_prefix>trust/outbox/` (one JSON file per record, naming the
//! repositories still to reach); every trust sync sends them again until
//! each repository took them or refused them for cause.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use opendal::Operator;
use serde::{Deserialize, Serialize};

use crate::error::{Context, Error, Result};
use crate::identity::{AgentId, SecretKey};
use crate::manifest::ShareId;
use crate::node::state;
use crate::record::{Kind, SignedRecord};
use crate::repository::{Outcome, PublishReport, RepositoryClient};
use crate::trust::engine::MAX_PRESENTED_GRANTS;
use crate::trust::{
    Announcement, GrantId, MAX_GRANT_DEPTH, Revocation, TrustEngine, TrustGrant, check_grant_depth,
    check_grant_scope, check_grant_validity_secs, render_tree, share_locator,
};
use crate::util::{unix_millis, unix_now};

/// Hops searched when an agent looks for its own chain to a publisher (the
/// publisher then applies the share's real depth).
pub const SEARCH_HOPS: u8 = MAX_GRANT_DEPTH;
/// Most agents one trust search visits.
pub const SEARCH_AGENTS: usize = 256;
/// Revocations of grants this agent does not know, kept in memory at most
/// (they are not persisted: only revocations of known grants are).
pub const MAX_UNKNOWN_REVOCATIONS: usize = 100_000;
/// Default validity of a grant issued without `expires_secs` (one year).
pub const DEFAULT_GRANT_SECS: u64 = 365 * 24 * 3600;
/// Validity of a declared grant without an expiry (30 days): signed again
/// while it is declared (`node/grant_renewal.rs`).
pub const DECLARED_GRANT_SECS: u64 = 30 * 86_400;
/// Lifetime of an announcement; it is renewed at half of it.
pub const ANNOUNCE_TTL_SECS: u64 = 600;

/// Body of `POST /v1/trust/grants` on the admin API (the operator calls it
/// to have an agent sign a grant; keep it stable):
///
/// ```json
/// {"subject": "<agent id>", "depth": 1, "expires_secs": 86400, "scope": null}
/// ```
///
/// `expires_secs` (optional, default one year) is the validity from now;
/// `scope` (optional) restricts the grant. The answer is a [`GrantInfo`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrantRequest {
    /// The agent vouched for.
    pub subject: AgentId,
    /// How many further hops the subject may vouch (0: cannot vouch).
    pub depth: u8,
    /// Validity from now in seconds (default one year).
    #[serde(default)]
    pub expires_secs: Option<u64>,
    /// What the trust is for (None: everything).
    #[serde(default)]
    pub scope: Option<String>,
}

impl GrantRequest {
    /// Refuses, before anything is signed, a request the repositories would
    /// refuse for its content or that could never be used: a validity of 0
    /// or beyond [`crate::trust::MAX_GRANT_VALIDITY_SECS`] (366 days), a
    /// depth beyond [`MAX_GRANT_DEPTH`], an empty or oversized scope. The
    /// admin API answers 400 and the CLI exits 3 with the message, which
    /// names the limit. Returns the validity in seconds.
    pub fn check(&self) -> Result<u64> {
        let secs = self.expires_secs.unwrap_or(DEFAULT_GRANT_SECS);
        check_grant_validity_secs(secs).map_err(Error::Rejected)?;
        check_grant_depth(self.depth).map_err(Error::Rejected)?;
        check_grant_scope(self.scope.as_deref()).map_err(Error::Rejected)?;
        Ok(secs)
    }
}

/// Answer of `POST /v1/trust/revocations`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RevokeResponse {
    /// Revoked grant ids (hex).
    pub revoked: Vec<String>,
    /// Repositories that stored a revocation (or already held it).
    #[serde(default)]
    pub published_to: Vec<String>,
    /// Repositories that could not be reached (for some revocation): it is
    /// saved and sent again on every trust sync until they take it.
    #[serde(default)]
    pub pending: Vec<String>,
    /// Refusals for cause, as "repository: JSON error body" (e.g. a
    /// revocation of a grant a repository never stored); not retried.
    #[serde(default)]
    pub refused: Vec<String>,
}

/// A record this agent signed that some repositories have not taken yet
/// (a file of `<state>/trust/outbox/`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    /// The signed record.
    record: Vec<u8>,
    /// Repositories still to reach.
    repositories: Vec<String>,
}

/// Body of `POST /v1/trust/revocations`: `{"subject": "<agent id>"}` revokes
/// every grant this agent issued to the subject; `{"grant_id": "<hex>"}` one grant.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RevokeRequest {
    /// Revoke every grant to this agent.
    #[serde(default)]
    pub subject: Option<AgentId>,
    /// Revoke this grant.
    #[serde(default)]
    pub grant_id: Option<String>,
}

/// A grant as the admin API and `trust list` show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrantInfo {
    /// Grant id (hex).
    pub grant_id: String,
    /// Issuer.
    pub issuer: AgentId,
    /// Subject.
    pub subject: AgentId,
    /// Further hops allowed.
    pub depth: u8,
    /// Scope, if any.
    pub scope: Option<String>,
    /// Validity start (unix seconds).
    pub not_before: u64,
    /// Validity end (unix seconds, exclusive).
    pub not_after: u64,
    /// Revoked as far as this agent knows.
    pub revoked: bool,
    /// Repositories that stored it (in a listing: the configured ones its
    /// record no longer waits for in the outbox).
    #[serde(default)]
    pub published_to: Vec<String>,
}

/// Answer of `GET /v1/trust`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrustListing {
    /// This agent.
    pub agent_id: AgentId,
    /// Grants this agent issued.
    pub issued: Vec<GrantInfo>,
    /// Agents trusted within [`SEARCH_HOPS`], with the number of hops.
    pub trusted: BTreeMap<String, usize>,
    /// The trust tree, rendered.
    pub tree: String,
}

/// Answer of `GET /v1/trust/why/{agent}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WhyAnswer {
    /// Is there a valid chain?
    pub trusted: bool,
    /// The chain, root first, as "issuer -> subject (depth d)" lines.
    pub chain: Vec<String>,
    /// Why not, when there is no chain.
    pub reason: Option<String>,
}

/// The agent's trust state. See the module docs.
pub struct AgentTrust {
    me: AgentId,
    key: SecretKey,
    engine: RwLock<TrustEngine>,
    repos: Option<RepositoryClient>,
    op: Operator,
    /// The agent's state prefix (ends in `/`).
    prefix: String,
    /// Unix seconds of the last revocation this agent learned or issued.
    last_revocation: AtomicU64,
    /// Locators last announced (re-announce when they change).
    announced: Mutex<(Vec<[u8; 32]>, u64)>,
    /// Every grant this agent signed, superseded ones included (the engine
    /// keeps only the newest per subject): revoking a subject revokes each.
    own_grants: Mutex<BTreeMap<GrantId, SignedRecord>>,
    /// Records not yet taken by every repository, by file name stem
    /// (mirrors `<state>/trust/outbox/`); the lock also serialises sending.
    outbox: tokio::sync::Mutex<BTreeMap<String, Pending>>,
    /// Outbox records a repository refused for cause (dropped), not yet
    /// counted in the metrics (see [`AgentTrust::take_dropped`]).
    dropped: AtomicU64,
}

impl std::fmt::Debug for AgentTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AgentTrust({})", self.me)
    }
}

impl AgentTrust {
    /// Opens the trust state of the agent holding `key`, loading the records
    /// persisted under `state_prefix` in `op`, with a client for
    /// `repositories` (none: local only).
    pub async fn open(
        key: &SecretKey,
        op: Operator,
        state_prefix: &str,
        repositories: &[String],
    ) -> Result<Arc<AgentTrust>> {
        let repos = if repositories.is_empty() {
            None
        } else {
            Some(RepositoryClient::with_timeout(
                repositories,
                Duration::from_secs(5),
            )?)
        };
        let t = AgentTrust {
            me: key.agent_id(),
            key: key.clone(),
            engine: RwLock::new(TrustEngine::new()),
            repos,
            op,
            prefix: state_prefix.to_string(),
            last_revocation: AtomicU64::new(0),
            announced: Mutex::new((Vec::new(), 0)),
            own_grants: Mutex::new(BTreeMap::new()),
            outbox: tokio::sync::Mutex::new(BTreeMap::new()),
            dropped: AtomicU64::new(0),
        };
        t.load().await?;
        Ok(Arc::new(t))
    }

    async fn load(&self) -> Result<()> {
        let dir = state::trust_records_dir(&self.prefix);
        let records = state::read_each(
            &self.op,
            &dir,
            ".rec",
            "trust record",
            SignedRecord::from_bytes,
        )
        .await?;
        for (_, rec) in records {
            self.absorb(&rec);
            self.remember_own(&rec);
        }
        let pending = state::read_each(
            &self.op,
            &state::trust_outbox_dir(&self.prefix),
            ".json",
            "unpublished trust record",
            |b: &[u8]| serde_json::from_slice::<Pending>(b),
        )
        .await?;
        let mut outbox = self.outbox.lock().await;
        for (path, p) in pending {
            let key = path
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .trim_end_matches(".json")
                .to_string();
            outbox.insert(key, p);
        }
        Ok(())
    }

    /// Keeps `rec` among this agent's own grants when it is one.
    fn remember_own(&self, rec: &SignedRecord) {
        if rec.kind == Kind::TrustGrant
            && rec.signer == self.me
            && let Ok(g) = TrustGrant::from_record(rec)
            && let Ok(mut own) = self.own_grants.lock()
        {
            own.insert(g.id(), rec.clone());
        }
    }

    /// Every grant this agent signed (superseded ones too), oldest first.
    fn own_grants(&self) -> Vec<(TrustGrant, SignedRecord)> {
        let mut out: Vec<(TrustGrant, SignedRecord)> = self
            .own_grants
            .lock()
            .map(|own| {
                own.values()
                    .filter_map(|r| TrustGrant::from_record(r).ok().map(|g| (g, r.clone())))
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by_key(|(g, _)| g.seq);
        out
    }

    fn outbox_file(&self, key: &str) -> String {
        format!("{}{key}.json", state::trust_outbox_dir(&self.prefix))
    }

    async fn save_pending(&self, key: &str, p: &Pending) -> Result<()> {
        let path = self.outbox_file(key);
        let json = serde_json::to_vec(p).map_err(|e| Error::Config(format!("{path}: {e}")))?;
        self.op
            .write(&path, json)
            .await
            .context(|| format!("saving {path}"))?;
        Ok(())
    }

    /// Queues `rec` for every configured repository (persisted first, so a
    /// crash or restart keeps it); returns its outbox key.
    async fn enqueue(&self, rec: &SignedRecord) -> Result<Option<String>> {
        let Some(r) = &self.repos else {
            return Ok(None);
        };
        let bytes = rec.to_bytes();
        let key = blake3::hash(&bytes).to_hex().to_string();
        let p = Pending {
            record: bytes,
            repositories: r.urls().to_vec(),
        };
        self.save_pending(&key, &p).await?;
        self.outbox.lock().await.insert(key.clone(), p);
        Ok(Some(key))
    }

    /// Records in the outbox (not yet taken by every repository).
    pub async fn unpublished(&self) -> usize {
        self.outbox.lock().await.len()
    }

    /// Outbox records dropped since the last call because a repository
    /// refused them for cause (for `caravan_errors_total{kind="trust_record_refused"}`).
    pub fn take_dropped(&self) -> u64 {
        self.dropped.swap(0, Ordering::Relaxed)
    }

    /// Sends the outbox records `keys` (all of them when None; grants
    /// before revocations, as a repository takes a revocation only of a
    /// grant it holds) to the repositories that have not taken them.
    /// A repository that took one (or holds it or something newer) is done
    /// with it; one that refused it for cause (4xx) is dropped from it with
    /// a warning; one that is unreachable or busy stays, for the next sync,
    /// and is skipped for the rest of this pass. Returns, per record sent,
    /// what happened at each repository.
    async fn send_outbox(&self, keys: Option<&[String]>) -> BTreeMap<String, PublishReport> {
        let mut reports = BTreeMap::new();
        let Some(r) = &self.repos else {
            return reports;
        };
        let mut outbox = self.outbox.lock().await;
        let mut order: Vec<(u8, u64, String, SignedRecord)> = Vec::new();
        let mut broken = Vec::new();
        for (key, p) in outbox.iter() {
            if keys.is_some_and(|k| !k.contains(key)) {
                continue;
            }
            let Ok(rec) = SignedRecord::from_bytes(&p.record) else {
                broken.push(key.clone());
                continue;
            };
            let (rank, seq) = match rec.kind {
                Kind::TrustGrant => (0, TrustGrant::from_record(&rec).map_or(0, |g| g.seq)),
                _ => (1, Revocation::from_record(&rec).map_or(0, |v| v.seq)),
            };
            order.push((rank, seq, key.clone(), rec));
        }
        order.sort_by_key(|a| (a.0, a.1));
        for key in broken {
            tracing::warn!(key, "dropping an unreadable record from the trust outbox");
            outbox.remove(&key);
            self.delete_pending(&key).await;
        }
        let mut down: HashSet<String> = HashSet::new();
        for (_, _, key, rec) in order {
            let Some(p) = outbox.get(&key).cloned() else {
                continue;
            };
            let mut report = PublishReport::default();
            let mut remaining = Vec::new();
            for url in &p.repositories {
                if !r.urls().contains(url) {
                    // No longer configured.
                    continue;
                }
                if down.contains(url) {
                    remaining.push(url.clone());
                    report
                        .unreachable
                        .push((url.clone(), "unreachable earlier in this pass".into()));
                    continue;
                }
                let mut o = r.publish_to(url, &rec).await;
                // A revocation of a grant the repository never stored (it
                // was down when the grant was made, and the grant's own
                // outbox entry is gone): send the grant, then again.
                if matches!(&o, Outcome::Refused(b) if b.contains("\"unknown_grant\""))
                    && let Ok(v) = Revocation::from_record(&rec)
                    && let Some(g) = self
                        .own_grants
                        .lock()
                        .ok()
                        .and_then(|own| own.get(&v.grant_id).cloned())
                {
                    let _ = r.publish_to(url, &g).await;
                    o = r.publish_to(url, &rec).await;
                }
                match o {
                    Outcome::Accepted | Outcome::Stale(_) => report.accepted.push(url.clone()),
                    Outcome::Refused(body) => {
                        tracing::warn!(
                            repository = %url,
                            kind = rec.kind.tag(),
                            refusal = %body,
                            "a repository refused a trust record this agent signed; it will not be sent there again"
                        );
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                        report.refused.push((url.clone(), body));
                    }
                    Outcome::Unreachable(e) => {
                        down.insert(url.clone());
                        remaining.push(url.clone());
                        report.unreachable.push((url.clone(), e));
                    }
                }
            }
            if remaining.is_empty() {
                outbox.remove(&key);
                self.delete_pending(&key).await;
            } else if remaining != p.repositories {
                let np = Pending {
                    record: p.record.clone(),
                    repositories: remaining,
                };
                if let Err(e) = self.save_pending(&key, &np).await {
                    tracing::warn!(error = %e, "could not update the trust outbox");
                }
                outbox.insert(key.clone(), np);
            }
            reports.insert(key, report);
        }
        reports
    }

    async fn delete_pending(&self, key: &str) {
        let path = self.outbox_file(key);
        if let Err(e) = self.op.delete(&path).await {
            tracing::warn!(error = %e, %path, "could not remove a sent record from the trust outbox");
        }
    }

    /// Sends every record still in the outbox (each trust sync calls it);
    /// returns how many records are still waiting for a repository.
    pub async fn publish_pending(&self) -> usize {
        let reports = self.send_outbox(None).await;
        let sent = reports.values().filter(|r| !r.accepted.is_empty()).count();
        if sent > 0 {
            tracing::info!(
                sent,
                "published trust records that were waiting for a repository"
            );
        }
        self.outbox.lock().await.len()
    }

    /// Adds a verified grant or revocation to the engine; true when new.
    fn absorb(&self, rec: &SignedRecord) -> bool {
        let Ok(mut e) = self.engine.write() else {
            return false;
        };
        match rec.kind {
            Kind::TrustGrant => e.add_grant_record(rec).unwrap_or(false),
            Kind::Revocation => {
                if e.revocations().len() >= MAX_UNKNOWN_REVOCATIONS
                    && Revocation::from_record(rec).is_ok_and(|r| e.grant(&r.grant_id).is_none())
                {
                    tracing::debug!(
                        "dropping a revocation of an unknown grant: memory bound reached"
                    );
                    return false;
                }
                let new = e.add_revocation_record(rec).unwrap_or(false);
                if new {
                    self.last_revocation.store(unix_now(), Ordering::Relaxed);
                }
                new
            }
            _ => false,
        }
    }

    async fn persist(&self, rec: &SignedRecord) -> Result<()> {
        let bytes = rec.to_bytes();
        let path = format!(
            "{}{}.rec",
            state::trust_records_dir(&self.prefix),
            blake3::hash(&bytes).to_hex()
        );
        self.op
            .write(&path, bytes)
            .await
            .context(|| format!("saving {path}"))?;
        Ok(())
    }

    /// Absorbs and persists a record learned from elsewhere.
    async fn learn(&self, rec: &SignedRecord) -> bool {
        let new = self.absorb(rec);
        // A revocation is stored only when it revokes a grant this agent
        // knows: nobody can make the agent's storage grow with revocations
        // of grants that never existed.
        let keep = match rec.kind {
            Kind::Revocation => Revocation::from_record(rec).is_ok_and(|r| {
                self.engine
                    .read()
                    .is_ok_and(|e| e.grant(&r.grant_id).is_some())
            }),
            _ => true,
        };
        if new
            && keep
            && let Err(e) = self.persist(rec).await
        {
            tracing::warn!(error = %e, "could not persist a trust record");
        }
        new
    }

    /// This agent's id.
    pub fn id(&self) -> AgentId {
        self.me
    }

    /// Unix seconds of the last revocation learned or issued (0: none).
    pub fn last_revocation(&self) -> u64 {
        self.last_revocation.load(Ordering::Relaxed)
    }

    /// The repository client, when repositories are configured.
    pub fn repositories(&self) -> Option<&RepositoryClient> {
        self.repos.as_ref()
    }

    /// Signs a grant, keeps it, and publishes it to every repository.
    ///
    /// Refused before signing ([`Error::Rejected`]): a request
    /// [`GrantRequest::check`] refuses, a grant to this agent itself, and a
    /// grant whose scope differs from the one of this agent's grant to the
    /// same subject still in effect (one grant per issuer and subject is
    /// kept, here and in the repositories, so it would replace it).
    ///
    /// A repository that cannot be reached gets the grant later (it waits
    /// in the outbox); when none took it, the answer is [`Error::Protocol`]
    /// saying so, while the grant is in effect on this agent.
    pub async fn grant(&self, req: &GrantRequest) -> Result<GrantInfo> {
        self.sign_grant(req, false).await
    }

    /// Like [`Self::grant`], but a grant that no repository could be
    /// reached for is no error: it waits in the outbox and `published_to`
    /// is empty (see [`Self::is_unpublished`]). Declared grants use it, so
    /// a retried declaration does not sign one grant per attempt.
    pub async fn grant_queued(&self, req: &GrantRequest) -> Result<GrantInfo> {
        self.sign_grant(req, true).await
    }

    /// True while the grant `grant_id` (hex) waits in the outbox for a
    /// repository.
    pub async fn is_unpublished(&self, grant_id: &str) -> bool {
        self.outbox.lock().await.values().any(|p| {
            SignedRecord::from_bytes(&p.record)
                .ok()
                .and_then(|r| TrustGrant::from_record(&r).ok())
                .is_some_and(|g| g.id().to_hex() == grant_id)
        })
    }

    async fn sign_grant(&self, req: &GrantRequest, queued_is_ok: bool) -> Result<GrantInfo> {
        let secs = req.check()?;
        if req.subject == self.me {
            return Err(Error::Rejected("an agent cannot vouch for itself".into()));
        }
        let now = unix_now();
        if let Some(other) = self.issued().into_iter().find(|g| {
            g.subject == req.subject
                && g.scope != req.scope
                && g.is_active(now)
                && !self.engine.read().is_ok_and(|e| e.is_revoked(&g.id()))
        }) {
            let name = |s: &Option<String>| {
                s.as_ref()
                    .map_or("no scope (general trust)".to_string(), |s| {
                        format!("scope {s:?}")
                    })
            };
            return Err(Error::Rejected(format!(
                "this agent's grant {} to {} with {} is in effect, and a grant with {} would replace it \
                 (one grant per issuer and subject is kept; shares carry no scope, so only a grant without \
                 scope lets an agent fetch): revoke it first (`trust revoke --grant-id {}`), or grant with {}",
                other.id(),
                req.subject,
                name(&other.scope),
                name(&req.scope),
                other.id(),
                name(&other.scope),
            )));
        }
        let g = TrustGrant {
            issuer: self.me,
            subject: req.subject,
            depth: req.depth,
            scope: req.scope.clone(),
            not_before: now,
            not_after: now.saturating_add(secs),
            // Newer than every grant this agent signed, even two within a
            // millisecond (a grant replaces only an older one).
            seq: unix_millis().max(
                self.own_grants()
                    .last()
                    .map_or(0, |(g, _)| g.seq.saturating_add(1)),
            ),
        };
        g.check_well_formed().map_err(Error::from)?;
        let rec = SignedRecord::seal(&self.key, &g)?;
        if let Ok(mut e) = self.engine.write() {
            e.add_grant_record(&rec).map_err(Error::from)?;
        }
        self.persist(&rec).await?;
        self.remember_own(&rec);
        let mut info = self.info(&g);
        if let Some(key) = self.enqueue(&rec).await? {
            let report = self
                .send_outbox(Some(std::slice::from_ref(&key)))
                .await
                .remove(&key)
                .unwrap_or_default();
            let waiting = !report.unreachable.is_empty();
            if report.accepted.is_empty() && !(queued_is_ok && waiting) {
                return Err(Error::Protocol(format!(
                    "grant {} to {} is signed, saved and in effect on this agent, but no repository took it \
                     (refused: {:?}; unreachable: {:?}){}",
                    g.id(),
                    g.subject,
                    report.refused,
                    report
                        .unreachable
                        .iter()
                        .map(|(u, _)| u.as_str())
                        .collect::<Vec<_>>(),
                    if waiting {
                        "; it is saved and will be published when a repository answers"
                    } else {
                        ""
                    }
                )));
            }
            info.published_to = report.accepted;
        }
        Ok(info)
    }

    /// Signs revocations of this agent's grants (to a subject: every grant
    /// it ever issued to it, superseded and scoped ones included; or one
    /// grant id), applies them at once, and publishes them. A repository
    /// that cannot be reached gets them later: they wait in the outbox,
    /// and every trust sync sends them again.
    pub async fn revoke(&self, req: &RevokeRequest) -> Result<RevokeResponse> {
        let own = self.own_grants();
        let targets: Vec<GrantId> = match (&req.subject, &req.grant_id) {
            (Some(s), None) => own
                .iter()
                .filter(|(g, _)| g.subject == *s)
                .map(|(g, _)| g.id())
                .collect(),
            (None, Some(id)) => {
                let id = GrantId::from_hex(id)?;
                if !own.iter().any(|(g, _)| g.id() == id) {
                    return Err(Error::NotFound(format!(
                        "this agent issued no grant with id {id}"
                    )));
                }
                vec![id]
            }
            _ => {
                return Err(Error::Config(
                    "give exactly one of `subject` and `grant_id`".into(),
                ));
            }
        };
        if targets.is_empty() {
            return Err(Error::NotFound(
                "this agent issued no grant to that agent".into(),
            ));
        }
        let mut out = RevokeResponse::default();
        let mut keys = Vec::new();
        for (i, grant_id) in targets.into_iter().enumerate() {
            let rev = Revocation {
                issuer: self.me,
                grant_id,
                seq: unix_millis() + i as u64,
                revoked_at: unix_now(),
            };
            let rec = SignedRecord::seal(&self.key, &rev)?;
            self.absorb(&rec);
            self.last_revocation.store(unix_now(), Ordering::Relaxed);
            self.persist(&rec).await?;
            if let Some(key) = self.enqueue(&rec).await? {
                keys.push(key);
            }
            out.revoked.push(grant_id.to_hex());
        }
        if let Some(r) = &self.repos {
            let reports = self.send_outbox(Some(&keys)).await;
            for url in r.urls() {
                if reports.values().any(|rep| rep.accepted.contains(url)) {
                    out.published_to.push(url.clone());
                }
                if reports
                    .values()
                    .any(|rep| rep.unreachable.iter().any(|(u, _)| u == url))
                {
                    out.pending.push(url.clone());
                }
            }
            for rep in reports.values() {
                for (u, body) in &rep.refused {
                    out.refused.push(format!("{u}: {body}"));
                }
            }
            if out.published_to.is_empty() {
                tracing::warn!(
                    pending = ?out.pending,
                    "revocation in effect on this agent, but no repository took it yet; it is saved and will be published when one answers"
                );
            }
        }
        Ok(out)
    }

    /// Revokes one grant this agent issued, by id (hex): signs the
    /// revocation, applies it, publishes it (a repository that cannot be
    /// reached gets it later, from the outbox). Returns whether a repository
    /// stored it (true without repositories). A grant already revoked is
    /// revoked again (revocations are idempotent records).
    pub async fn revoke_one(&self, grant_id: &str) -> Result<bool> {
        let id = GrantId::from_hex(grant_id)?;
        let rev = Revocation {
            issuer: self.me,
            grant_id: id,
            seq: unix_millis(),
            revoked_at: unix_now(),
        };
        let rec = SignedRecord::seal(&self.key, &rev)?;
        self.absorb(&rec);
        self.last_revocation.store(unix_now(), Ordering::Relaxed);
        self.persist(&rec).await?;
        match self.enqueue(&rec).await? {
            None => Ok(true),
            Some(key) => Ok(self
                .send_outbox(Some(std::slice::from_ref(&key)))
                .await
                .get(&key)
                .is_some_and(|r| !r.accepted.is_empty())),
        }
    }

    fn issued(&self) -> Vec<TrustGrant> {
        self.engine
            .read()
            .map(|e| e.grants_issued_by(&self.me))
            .unwrap_or_default()
    }

    fn info(&self, g: &TrustGrant) -> GrantInfo {
        GrantInfo {
            grant_id: g.id().to_hex(),
            issuer: g.issuer,
            subject: g.subject,
            depth: g.depth,
            scope: g.scope.clone(),
            not_before: g.not_before,
            not_after: g.not_after,
            revoked: self
                .engine
                .read()
                .map(|e| e.is_revoked(&g.id()))
                .unwrap_or(false),
            published_to: Vec::new(),
        }
    }

    /// What `trust list` shows.
    ///
    /// Each grant's `published_to`: the configured repositories but those
    /// its record still waits for in the outbox.
    pub async fn listing(&self) -> TrustListing {
        let now = unix_now();
        let set = self
            .engine
            .read()
            .map(|e| e.trusted_set(&self.me, SEARCH_HOPS, now))
            .unwrap_or_default();
        let mut waiting: HashMap<String, Vec<String>> = HashMap::new();
        for p in self.outbox.lock().await.values() {
            if let Ok(rec) = SignedRecord::from_bytes(&p.record)
                && let Ok(g) = TrustGrant::from_record(&rec)
            {
                waiting
                    .entry(g.id().to_hex())
                    .or_default()
                    .extend(p.repositories.iter().cloned());
            }
        }
        let repos: Vec<String> = self
            .repos
            .as_ref()
            .map(|r| r.urls().to_vec())
            .unwrap_or_default();
        let issued = self
            .issued()
            .iter()
            .map(|g| {
                let mut info = self.info(g);
                let pending = waiting.get(&info.grant_id);
                info.published_to = repos
                    .iter()
                    .filter(|u| !pending.is_some_and(|p| p.contains(u)))
                    .cloned()
                    .collect();
                info
            })
            .collect();
        TrustListing {
            agent_id: self.me,
            issued,
            trusted: set.iter().map(|(k, c)| (k.to_string(), c.len())).collect(),
            tree: render_tree(&self.me, &set),
        }
    }

    /// The trust tree of `root` within `hops`, rendered (for the demo).
    pub fn tree(&self, root: &AgentId, hops: u8) -> String {
        let set = self
            .engine
            .read()
            .map(|e| e.trusted_set(root, hops, unix_now()))
            .unwrap_or_default();
        render_tree(root, &set)
    }

    /// Why this agent trusts `who` (the chain), or why not. Looks up the
    /// grants the repositories hold on paths to `who` first.
    pub async fn why(&self, who: &AgentId) -> WhyAnswer {
        // Revocations come from the background sync; only grants are looked up here.
        self.collect_chain(&self.me, who).await;
        let now = unix_now();
        let Ok(e) = self.engine.read() else {
            return WhyAnswer {
                trusted: false,
                chain: vec![],
                reason: Some("trust state unavailable".into()),
            };
        };
        if *who == self.me {
            return WhyAnswer {
                trusted: true,
                chain: vec![],
                reason: Some("that is this agent".into()),
            };
        }
        match e.chain(&self.me, who, SEARCH_HOPS, now) {
            Some(c) => WhyAnswer {
                trusted: true,
                chain: c
                    .iter()
                    .map(|h| {
                        let depth = e.grant(&h.id).map(|(g, _)| g.depth).unwrap_or(0);
                        format!("{} -> {} (depth {depth})", h.issuer, h.subject)
                    })
                    .collect(),
                reason: None,
            },
            None => {
                let all = e.grant_records();
                let naming: Vec<TrustGrant> = all
                    .iter()
                    .filter_map(|r| TrustGrant::from_record(r).ok())
                    .filter(|g| g.subject == *who)
                    .collect();
                // What is wrong with each grant naming `who` itself, so that
                // an unrelated revocation elsewhere is not blamed.
                let faults: Vec<String> = naming
                    .iter()
                    .filter_map(|g| {
                        let by = g.issuer.short();
                        if e.is_revoked(&g.id()) {
                            Some(format!("the grant by {by} is revoked"))
                        } else if !g.is_active(now) {
                            Some(format!(
                                "the grant by {by} is not in effect (valid {}..{}, now {now})",
                                g.not_before, g.not_after
                            ))
                        } else {
                            g.scope.as_ref().map(|sc| {
                                format!(
                                    "the grant by {by} is scoped to {sc:?}, and shares carry no scope, \
                                     so it gives no general trust"
                                )
                            })
                        }
                    })
                    .collect();
                let reason = if naming.is_empty() {
                    format!("no grant naming {who} is known (locally or in the repositories)")
                } else if faults.len() == naming.len() {
                    format!(
                        "{} grant(s) name {who}, none usable: {}",
                        naming.len(),
                        faults.join("; ")
                    )
                } else {
                    // Revoked grants are left out: they are not the reason
                    // when a usable grant names `who`.
                    let presented: Vec<SignedRecord> = all
                        .into_iter()
                        .filter(|r| {
                            TrustGrant::from_record(r).is_ok_and(|g| !e.is_revoked(&g.id()))
                        })
                        .take(MAX_PRESENTED_GRANTS)
                        .collect();
                    match crate::trust::verify_chain(
                        &self.me,
                        who,
                        SEARCH_HOPS,
                        None,
                        &presented,
                        e.revocations(),
                        now,
                    ) {
                        Ok(_) => "a chain exists only through grants this agent cannot present"
                            .to_string(),
                        Err(inv) => format!(
                            "{} grant(s) name {who}, but no valid chain: {inv} \
                             (expired, revoked, beyond a hop's depth, or not linked to this agent)",
                            naming.len()
                        ),
                    }
                };
                WhyAnswer {
                    trusted: false,
                    chain: vec![],
                    reason: Some(reason),
                }
            }
        }
    }

    /// Walks grants backwards from `target` (grants by subject) through the
    /// repositories, up to [`SEARCH_HOPS`] levels and a bounded number of
    /// agents, learning every verified grant on the way.
    /// Learns from the repositories every grant on a path to `who` (for
    /// rendering a fuller tree, or before answering "why").
    pub async fn learn_about(&self, who: &AgentId) {
        self.collect_chain(&self.me, who).await;
    }

    /// Walks grants *forward* from `root` (grants by issuer) through the
    /// repositories, up to [`SEARCH_HOPS`] levels and [`SEARCH_AGENTS`]
    /// agents, then learns only the grants on a path from `root` to
    /// `target`. Only agents already reachable from `root` are asked about,
    /// so grants by strangers (sybil keys naming `target`, which anybody can
    /// write) can neither hide an honest chain nor fill this agent's storage.
    async fn collect_chain(&self, root: &AgentId, target: &AgentId) {
        let Some(r) = &self.repos else { return };
        let mut frontier = vec![*root];
        let mut seen: HashSet<AgentId> = HashSet::from([*root]);
        let mut edges: Vec<(TrustGrant, SignedRecord)> = Vec::new();
        for _ in 0..SEARCH_HOPS {
            let mut next = Vec::new();
            for who in frontier {
                match r.grants_by_issuer(&who).await {
                    Ok(gs) => {
                        for (g, rec) in gs {
                            if g.issuer != who {
                                continue;
                            }
                            if seen.len() < SEARCH_AGENTS && seen.insert(g.subject) {
                                next.push(g.subject);
                            }
                            edges.push((g, rec));
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "grant look-up failed"),
                }
            }
            if next.is_empty() {
                break;
            }
            frontier = next;
        }
        // Agents from which `target` is reachable over the edges found.
        let mut reaches: HashSet<AgentId> = HashSet::from([*target]);
        loop {
            let before = reaches.len();
            for (g, _) in &edges {
                if reaches.contains(&g.subject) {
                    reaches.insert(g.issuer);
                }
            }
            if reaches.len() == before {
                break;
            }
        }
        for (g, rec) in &edges {
            if reaches.contains(&g.subject) && reaches.contains(&g.issuer) {
                self.learn(rec).await;
            }
        }
    }

    /// The grant records to present to `publisher`: every known grant on a
    /// path from `publisher` to this agent (a small graph, not one chain, so
    /// the publisher finds another path when one hop was revoked). Empty
    /// when there is none.
    pub async fn proof_for(&self, publisher: &AgentId) -> Vec<Vec<u8>> {
        self.collect_chain(publisher, &self.me).await;
        let now = unix_now();
        let Ok(e) = self.engine.read() else {
            return Vec::new();
        };
        // Agents reachable from the publisher that also reach us: take every
        // active, unrevoked grant between agents the publisher trusts (plus
        // the publisher) whose subject is us or another such agent.
        let mut nodes: BTreeSet<AgentId> = e
            .trusted_ids(publisher, SEARCH_HOPS, now)
            .into_iter()
            .collect();
        if !nodes.contains(&self.me) {
            return Vec::new();
        }
        nodes.insert(*publisher);
        let mut out = Vec::new();
        for issuer in &nodes {
            for g in e.grants_issued_by(issuer) {
                if nodes.contains(&g.subject)
                    && g.is_active(now)
                    && !e.is_revoked(&g.id())
                    && let Some((_, Some(rec))) = e.grant(&g.id())
                {
                    out.push(rec.to_bytes());
                }
                if out.len() >= MAX_PRESENTED_GRANTS {
                    return out;
                }
            }
        }
        out
    }

    /// Brings revocations and this agent's announcement up to date.
    pub async fn refresh(&self) {
        let Some(r) = &self.repos else { return };
        match r.sync_revocations().await {
            Ok(revs) => {
                for (_, rec) in revs {
                    if self.learn(&rec).await {
                        tracing::info!("learned a revocation from a repository");
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "revocation sync failed"),
        }
    }

    /// Announces this agent (reachable at `addresses`, holding `shares`) when
    /// the set of shares changed or the last announcement is past half its
    /// lifetime.
    pub async fn announce(&self, addresses: &[String], shares: &[ShareId]) {
        let Some(r) = &self.repos else { return };
        let mut locators: Vec<[u8; 32]> = shares.iter().map(|s| share_locator(&s.0)).collect();
        locators.sort();
        let now = unix_now();
        let due = self
            .announced
            .lock()
            .map(|a| a.0 != locators || now >= a.1 + ANNOUNCE_TTL_SECS / 2)
            .unwrap_or(true);
        if !due {
            return;
        }
        let a = Announcement {
            agent: self.me,
            addresses: addresses.to_vec(),
            locators: locators.clone(),
            seq: unix_millis(),
            expires_at: now + ANNOUNCE_TTL_SECS,
        };
        let rec = match SignedRecord::seal(&self.key, &a) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "could not sign an announcement");
                return;
            }
        };
        match r.publish(&rec).await {
            Ok(_) => {
                if let Ok(mut g) = self.announced.lock() {
                    *g = (locators, now);
                }
            }
            Err(e) => tracing::warn!(error = %e, "announcement not stored anywhere; will retry"),
        }
    }

    /// Addresses of agents the repositories say hold `share` (union over
    /// every repository, signatures checked, newest per agent, self
    /// excluded). The answer is kept in storage, so while every repository
    /// is down (or a restarted agent cannot reach one) the peers learned last
    /// time are used.
    pub async fn peers_for(&self, share: &[u8; 32]) -> Result<Vec<(AgentId, Vec<String>)>> {
        let Some(r) = &self.repos else {
            return Ok(Vec::new());
        };
        let path = state::trust_peers_file(&self.prefix, share);
        match r.holders(&share_locator(share)).await {
            Ok(holders) => {
                let peers: Vec<(AgentId, Vec<String>)> = holders
                    .into_iter()
                    .filter(|(a, _)| a.agent != self.me)
                    .map(|(a, _)| (a.agent, a.addresses))
                    .collect();
                if let Ok(json) = serde_json::to_vec(&peers)
                    && let Err(e) = self.op.write(&path, json).await
                {
                    tracing::warn!(error = %e, %path, "could not cache the peers of a share");
                }
                Ok(peers)
            }
            Err(e) => match self.op.read(&path).await {
                Ok(bytes) => {
                    tracing::warn!(error = %e, "no repository answered; using the peers learned earlier");
                    serde_json::from_slice(&bytes.to_vec())
                        .map_err(|d| Error::Config(format!("{path}: {d}")))
                }
                Err(_) => Err(e),
            },
        }
    }
}

impl AgentTrust {
    /// Addresses `who` announced itself, looked up by its id (which no other
    /// key can crowd out, unlike a share's list of holders).
    pub async fn addresses_of(&self, who: &AgentId) -> Vec<String> {
        let Some(r) = &self.repos else {
            return Vec::new();
        };
        match r.announcement(who).await {
            Ok(Some((a, _))) => a.addresses,
            Ok(None) => Vec::new(),
            Err(e) => {
                tracing::debug!(error = %e, "announcement look-up failed");
                Vec::new()
            }
        }
    }

    /// Does `root` trust `who` within `max_hops`, given the proof records
    /// `who` presented (each an encoded signed record)? True when a valid,
    /// unrevoked chain exists.
    pub fn trusts(
        &self,
        root: &AgentId,
        who: &AgentId,
        max_hops: u8,
        presented: &[SignedRecord],
    ) -> bool {
        self.engine
            .read()
            .map(|e| {
                e.authorize(root, who, max_hops, None, presented, unix_now())
                    .is_ok()
            })
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StorageConfig;

    fn memory() -> Operator {
        crate::store::open(&StorageConfig {
            scheme: "memory".into(),
            options: Default::default(),
            credentials: None,
            size_limit: None,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn grants_persist_and_revocations_prune() {
        let op = memory();
        let alice_key = SecretKey::generate().unwrap();
        let alice_id = alice_key.agent_id();
        let (bob, carol) = (
            SecretKey::generate().unwrap().agent_id(),
            SecretKey::generate().unwrap().agent_id(),
        );
        let web = AgentTrust::open(&alice_key, op.clone(), ".caravan/", &[])
            .await
            .unwrap();
        for (s, d) in [(bob, 1), (carol, 0)] {
            web.grant(&GrantRequest {
                subject: s,
                depth: d,
                expires_secs: None,
                scope: None,
            })
            .await
            .unwrap();
        }
        assert!(web.trusts(&alice_id, &carol, 1, &[]));
        assert!(web.why(&carol).await.trusted);
        assert!(
            web.grant(&GrantRequest {
                subject: alice_id,
                depth: 0,
                expires_secs: None,
                scope: None,
            })
            .await
            .is_err()
        );
        assert_eq!(
            web.revoke(&RevokeRequest {
                subject: Some(bob),
                grant_id: None
            })
            .await
            .unwrap()
            .revoked
            .len(),
            1
        );
        assert!(web.last_revocation() > 0);
        assert!(!web.trusts(&alice_id, &bob, 1, &[]));
        assert!(web.revoke(&RevokeRequest::default()).await.is_err());
        let why = web.why(&bob).await;
        assert!(!why.trusted);
        assert!(why.reason.unwrap().contains("revoked"));

        // A restart keeps all of it.
        let again = AgentTrust::open(&alice_key, op.clone(), ".caravan/", &[])
            .await
            .unwrap();
        let l = again.listing().await;
        assert_eq!(l.issued.len(), 2);
        assert!(l.issued.iter().any(|g| g.subject == bob && g.revoked));
        assert!(l.trusted.contains_key(&carol.to_string()));
        assert!(!l.trusted.contains_key(&bob.to_string()));
    }

    fn req(subject: AgentId, expires_secs: Option<u64>) -> GrantRequest {
        GrantRequest {
            subject,
            depth: 0,
            expires_secs,
            scope: None,
        }
    }

    /// Guarantee: a grant request every repository would refuse for its
    /// content (validity 0, beyond 366 days, or overflowing; depth beyond
    /// 8; an empty scope) is refused as bad input before anything is
    /// signed, so no unpublishable grant becomes active or replaces one.
    #[tokio::test]
    async fn grant_requests_beyond_the_limits_are_refused_before_signing() {
        let key = SecretKey::generate().unwrap();
        let web = AgentTrust::open(&key, memory(), ".caravan/", &[])
            .await
            .unwrap();
        let f = SecretKey::generate().unwrap().agent_id();
        web.grant(&req(f, Some(30 * 86400))).await.unwrap();
        let mut bad = vec![
            req(f, Some(400 * 86400)),
            req(f, Some(0)),
            req(f, Some(u64::MAX)),
            req(f, Some(crate::trust::MAX_GRANT_VALIDITY_SECS + 1)),
        ];
        let mut deep = req(f, None);
        deep.depth = MAX_GRANT_DEPTH + 1;
        bad.push(deep);
        let mut empty = req(f, None);
        empty.scope = Some(String::new());
        bad.push(empty);
        for r in bad {
            let e = web.grant(&r).await.unwrap_err();
            assert!(
                matches!(e, Error::Rejected(_)) && e.is_bad_input(),
                "{r:?}: {e}"
            );
        }
        let e = web.grant(&req(f, Some(400 * 86400))).await.unwrap_err();
        assert!(e.to_string().contains("366 days"), "{e}");
        // Only the first grant was ever signed, and it is the one in effect.
        let l = web.listing().await;
        assert_eq!(l.issued.len(), 1);
        assert!(l.issued[0].not_after <= unix_now() + 30 * 86400);
        assert_eq!(web.own_grants().len(), 1);
        // The largest validity accepted is exactly the repositories' limit.
        web.grant(&req(f, Some(crate::trust::MAX_GRANT_VALIDITY_SECS)))
            .await
            .unwrap();
    }

    /// Guarantee: revoking an agent revokes every grant this agent ever
    /// issued to it, the superseded ones too (across a restart), so the
    /// subject cannot present an older grant it kept.
    #[tokio::test]
    async fn revoking_a_subject_revokes_its_superseded_grants_too() {
        let op = memory();
        let key = SecretKey::generate().unwrap();
        let me = key.agent_id();
        let web = AgentTrust::open(&key, op.clone(), ".caravan/", &[])
            .await
            .unwrap();
        let f = SecretKey::generate().unwrap().agent_id();
        let first = web.grant(&req(f, Some(30 * 86400))).await.unwrap();
        let second = web.grant(&req(f, Some(20 * 86400))).await.unwrap();
        assert_ne!(first.grant_id, second.grant_id);
        let old = web
            .own_grants()
            .into_iter()
            .find(|(g, _)| g.id().to_hex() == first.grant_id)
            .unwrap()
            .1;
        // Before: the older grant, presented, is a valid chain.
        assert!(web.trusts(&me, &f, 1, std::slice::from_ref(&old)));
        // After a restart (the engine keeps only the newest grant per subject).
        let web = AgentTrust::open(&key, op.clone(), ".caravan/", &[])
            .await
            .unwrap();
        let r = web
            .revoke(&RevokeRequest {
                subject: Some(f),
                grant_id: None,
            })
            .await
            .unwrap();
        assert_eq!(r.revoked.len(), 2, "{r:?}");
        assert!(r.revoked.contains(&first.grant_id));
        assert!(!web.trusts(&me, &f, 1, &[]));
        assert!(!web.trusts(&me, &f, 1, std::slice::from_ref(&old)));
        // A superseded grant can be revoked by id, too.
        web.revoke(&RevokeRequest {
            subject: None,
            grant_id: Some(first.grant_id.clone()),
        })
        .await
        .unwrap();
    }

    /// Guarantee: a scoped grant never silently replaces this agent's
    /// general (unscoped) grant to the same subject — it is refused as bad
    /// input and the subject stays trusted — and `why` explains a subject
    /// named only by a scoped grant by its scope, not by an unrelated
    /// revocation.
    #[tokio::test]
    async fn a_scoped_grant_does_not_replace_the_general_one() {
        let key = SecretKey::generate().unwrap();
        let me = key.agent_id();
        let web = AgentTrust::open(&key, memory(), ".caravan/", &[])
            .await
            .unwrap();
        let (f, g) = (
            SecretKey::generate().unwrap().agent_id(),
            SecretKey::generate().unwrap().agent_id(),
        );
        web.grant(&req(f, Some(86400))).await.unwrap();
        let mut scoped = req(f, Some(86400));
        scoped.scope = Some("photos".into());
        let e = web.grant(&scoped).await.unwrap_err();
        assert!(matches!(e, Error::Rejected(_)), "{e}");
        assert!(e.to_string().contains("revoke it first"), "{e}");
        assert!(web.trusts(&me, &f, 1, &[]));
        assert!(web.why(&f).await.trusted);
        // Once the general grant is revoked, a scoped one may be issued.
        web.revoke(&RevokeRequest {
            subject: Some(f),
            grant_id: None,
        })
        .await
        .unwrap();
        web.grant(&scoped).await.unwrap();
        // `why` for an agent with only a scoped grant, after an unrelated
        // revocation (of g's grant): the scope is the reason.
        web.grant(&req(g, Some(86400))).await.unwrap();
        web.revoke(&RevokeRequest {
            subject: Some(g),
            grant_id: None,
        })
        .await
        .unwrap();
        let why = web.why(&f).await;
        assert!(!why.trusted);
        let reason = why.reason.unwrap();
        assert!(reason.contains("scoped to \"photos\""), "{reason}");
        assert!(!reason.contains("revoked"), "{reason}");
    }

    /// A repository that answers every POST with `status`, counting them.
    async fn answering(status: u16) -> (String, Arc<AtomicU64>) {
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new().fallback(move || {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::Relaxed);
                (
                    axum::http::StatusCode::from_u16(status).unwrap(),
                    "{\"error\":\"far_future\",\"detail\":\"test\"}",
                )
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, hits)
    }

    /// Guarantee: the outbox retries a repository that is failing (5xx)
    /// on every sync, and drops a record a repository refused for cause
    /// (4xx) at once, counted for the metrics, never sending it there again.
    #[tokio::test]
    async fn the_outbox_retries_failures_but_not_refusals() {
        let op = memory();
        let key = SecretKey::generate().unwrap();
        let (refusing, refused_hits) = answering(422).await;
        let (failing, failed_hits) = answering(503).await;
        let web = AgentTrust::open(&key, op.clone(), ".caravan/", &[refusing, failing.clone()])
            .await
            .unwrap();
        let f = SecretKey::generate().unwrap().agent_id();
        let e = web.grant(&req(f, Some(86400))).await.unwrap_err();
        assert!(e.to_string().contains("will be published"), "{e}");
        assert_eq!(web.take_dropped(), 1);
        assert_eq!(web.unpublished().await, 1);
        for _ in 0..3 {
            assert_eq!(web.publish_pending().await, 1);
        }
        assert_eq!(refused_hits.load(Ordering::Relaxed), 1);
        assert_eq!(failed_hits.load(Ordering::Relaxed), 4);
        // The queue survives a restart, for the failing repository only.
        let again = AgentTrust::open(&key, op.clone(), ".caravan/", &[failing])
            .await
            .unwrap();
        assert_eq!(again.unpublished().await, 1);
        let p = again.outbox.lock().await.values().next().cloned().unwrap();
        assert_eq!(p.repositories.len(), 1);
        assert_eq!(again.take_dropped(), 0);
    }

    #[tokio::test]
    async fn peers_come_from_the_cache_when_repositories_are_down() {
        let op = memory();
        let a_key = SecretKey::generate().unwrap();
        // Nothing listens on this port: every repository is down.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let web = AgentTrust::open(
            &a_key,
            op.clone(),
            ".caravan/",
            &[format!("http://127.0.0.1:{port}")],
        )
        .await
        .unwrap();
        let share = [7u8; 32];
        assert!(web.peers_for(&share).await.is_err());
        let known = vec![(a_key.agent_id(), vec!["127.0.0.1:1".to_string()])];
        let path = format!(".caravan/trust/peers/{}.json", crate::util::hex(&share));
        op.write(&path, serde_json::to_vec(&known).unwrap())
            .await
            .unwrap();
        assert_eq!(web.peers_for(&share).await.unwrap(), known);
    }
}
