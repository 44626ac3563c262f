//! Declared shares and grants: the operator's desired state, kept by the
//! agent and converged in the background (docs/operator.md, "Operator ↔
//! agent").
//!
//! A declared share is persisted at `<state>declared/shares/<name>.json`
//! with what the agent learned while converging it (the share id, a
//! fingerprint of the published folder), so a restarted agent picks up
//! where it stopped without a new share or a duplicate version. One task
//! per share: a publish task rescans its folder every `rescan_secs` and
//! publishes a new version only when the listing changed; a subscribe task
//! fetches the newest version every `poll_secs` (a no-op when it already
//! holds it) and so keeps following the share.
//!
//! A declared grant is persisted at `<state>declared/grants/<key>.json`
//! with the id of the grant signed for it: the same key and spec never
//! sign twice, and a revocation is signed once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::declare::{
    DeclaredGrant, DeclaredGrantStatus, DeclaredShare, DeclaredShareStatus, DeclaredState,
    RecipientTicket, RevocationStatus, activity, reasons,
};
use crate::error::{Context, Error, Result};
use crate::identity::AgentId;
use crate::manifest::{Access, ShareId, Ticket};
use crate::node::activity::Schedule;
use crate::node::agent::Agent;
use crate::node::fetch::progress::{FetchProgress, FetchState};
use crate::node::publish::PublishRequest;
use crate::node::share::Role;
use crate::node::trust::{DECLARED_GRANT_SECS, GrantRequest};

/// Declared shares per agent, at most.
pub const MAX_DECLARED: usize = 4096;
/// Longest name or key.
pub const MAX_NAME: usize = 253;

/// What is persisted per declared share.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedShare {
    /// The share's name, for a file named after its hash
    /// ([`Declarations::share_file`]); `None` in files saved before.
    #[serde(default)]
    name: Option<String>,
    spec: DeclaredShare,
    #[serde(default)]
    share_id: Option<String>,
    #[serde(default)]
    fingerprint: Option<String>,
}

/// Revokes every grant the agent issued to the subject of `saved` (older
/// ones it superseded too: one grant per issuer and subject is in effect,
/// and a superseded one must not stay valid for whoever kept it). Returns
/// whether a repository took a revocation (true without repositories).
async fn revoke_every_grant(
    trust: &crate::node::trust::AgentTrust,
    saved: &SavedGrant,
) -> Result<bool> {
    let Ok(subject) = saved.spec.subject.parse::<AgentId>() else {
        return trust.revoke_one(&saved.grant_id).await;
    };
    match trust
        .revoke(&crate::node::trust::RevokeRequest {
            subject: Some(subject),
            grant_id: None,
        })
        .await
    {
        Ok(r) => Ok(!r.published_to.is_empty() || trust.repositories().is_none()),
        // Its record is not in this agent's state (any more): by id.
        Err(Error::NotFound(_)) => trust.revoke_one(&saved.grant_id).await,
        Err(e) => Err(e),
    }
}

/// What is persisted per declared grant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SavedGrant {
    pub(crate) spec: DeclaredGrant,
    pub(crate) grant_id: String,
    pub(crate) not_after: u64,
    pub(crate) published: bool,
    #[serde(default)]
    pub(crate) revoked: bool,
    #[serde(default)]
    revocation_published: bool,
}

struct Running {
    saved: Mutex<SavedShare>,
    status: Mutex<DeclaredShareStatus>,
    progress: Mutex<Option<Arc<FetchProgress>>>,
    /// When a publish share rescans next (unix seconds).
    next_run: Mutex<Option<u64>>,
    cancel: CancellationToken,
}

/// The declared shares and grants of one agent.
pub struct Declarations {
    pub(crate) agent: Arc<Agent>,
    shares: Mutex<HashMap<String, Arc<Running>>>,
    /// Held while a declared grant is signed, revoked or renewed.
    pub(crate) grants: tokio::sync::Mutex<()>,
    /// When the first declared grant is due for renewal (unix seconds;
    /// `grant_renewal.rs`).
    pub(crate) next_renewal: Mutex<Option<u64>>,
    pub(crate) shutdown: CancellationToken,
}

fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > MAX_NAME
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        || name.starts_with('.')
    {
        return Err(Error::Rejected(format!(
            "{what} must be 1–{MAX_NAME} characters of a-z, 0-9, `-` and `.`"
        )));
    }
    Ok(())
}

fn check_path(state_prefix: &str, field: &str, p: &str) -> Result<()> {
    let bad = || {
        Err(Error::Rejected(format!(
            "{field} {p:?} leaves the storage root or enters the agent's state"
        )))
    };
    // Stricter than the CLI (no leading `/`, no backslash, shorter), then
    // the rules every user path follows (`state::user_path`).
    if p.len() > 1024 || p.starts_with('/') || p.contains('\\') {
        return bad();
    }
    if crate::node::state::user_path(state_prefix, p).is_err() {
        return bad();
    }
    Ok(())
}

fn check_share(state_prefix: &str, d: &DeclaredShare) -> Result<()> {
    match (&d.publish, &d.subscribe) {
        (Some(p), None) => {
            check_path(state_prefix, "publish.path", &p.path)?;
            if !(1..=86_400).contains(&p.rescan_secs) {
                return Err(Error::Rejected(
                    "publish.rescan_secs must be 1–86400".into(),
                ));
            }
            if p.recipients.len() > 1000 {
                return Err(Error::Rejected("at most 1000 recipients".into()));
            }
            for r in &p.recipients {
                r.parse::<AgentId>()?;
            }
            Ok(())
        }
        (None, Some(s)) => {
            check_path(state_prefix, "subscribe.destination", &s.destination)?;
            if !(1..=86_400).contains(&s.poll_secs) {
                return Err(Error::Rejected(
                    "subscribe.poll_secs must be 1–86400".into(),
                ));
            }
            match (&s.ticket, &s.share_id, &s.publisher) {
                (Some(t), None, None) if t.len() <= 65_536 => Ok(()),
                (None, Some(id), Some(p)) => {
                    id.parse::<ShareId>()?;
                    p.parse::<AgentId>()?;
                    Ok(())
                }
                _ => Err(Error::Rejected(
                    "subscribe needs a ticket, or share_id with publisher".into(),
                )),
            }
        }
        _ => Err(Error::Rejected(
            "declare exactly one of publish or subscribe".into(),
        )),
    }
}

fn pending(name: &str, generation: i64) -> DeclaredShareStatus {
    DeclaredShareStatus {
        name: name.to_string(),
        generation,
        state: DeclaredState::Pending,
        reason: None,
        message: None,
        share_id: None,
        publisher: None,
        version: 0,
        files_done: 0,
        files_total: 0,
        bytes_done: 0,
        bytes_total: 0,
        chunks_done: 0,
        chunks_total: 0,
        bytes_received: 0,
        peers: 0,
        tickets: Vec::new(),
        keyless_ticket: None,
    }
}

/// Maps an error to a reason code of [`reasons`].
pub fn reason_of(e: &Error, had_version: bool) -> &'static str {
    let text = e.to_string();
    match e {
        Error::Parse { .. } | Error::Record(_) => reasons::TICKET_INVALID,
        Error::Storage { .. } => reasons::STORAGE_ERROR,
        Error::Rejected(m) if m.contains("ticket is for agent") => reasons::NOT_A_RECIPIENT,
        Error::Rejected(_) => reasons::INVALID_SPEC,
        // "no peer reachable … Connection refused" is a closed port (a
        // publisher that stopped or sleeps), not a refusal by the publisher.
        Error::Unreachable(_) => reasons::PUBLISHER_UNREACHABLE,
        _ if text.contains("no peer reachable") || text.contains("not reachable") => {
            reasons::PUBLISHER_UNREACHABLE
        }
        _ if text.contains("refused") => {
            if had_version {
                reasons::TRUST_REVOKED
            } else {
                reasons::NOT_A_RECIPIENT
            }
        }
        Error::NotFound(m) if m.contains("nothing to publish") => reasons::PATH_NOT_FOUND,
        _ if text.contains("reachable") || text.contains("no peer") => {
            reasons::PUBLISHER_UNREACHABLE
        }
        _ => reasons::PUBLISHER_UNREACHABLE,
    }
}

impl Declarations {
    /// Loads the declarations persisted under the agent's state prefix and
    /// starts converging them; tasks stop when `shutdown` is cancelled.
    pub async fn open(agent: Arc<Agent>, shutdown: CancellationToken) -> Result<Arc<Self>> {
        let d = Arc::new(Declarations {
            agent,
            shares: Mutex::new(HashMap::new()),
            grants: tokio::sync::Mutex::new(()),
            next_renewal: Mutex::new(None),
            shutdown,
        });
        let dir = d.shares_dir();
        let saved =
            crate::node::state::read_each(&d.agent.op, &dir, ".json", "declared share", |b| {
                serde_json::from_slice::<SavedShare>(b)
            })
            .await?;
        for (path, s) in saved {
            let name = match &s.name {
                Some(n) => n.clone(),
                None => path
                    .rsplit('/')
                    .next()
                    .and_then(|f| f.strip_suffix(".json"))
                    .unwrap_or_default()
                    .to_string(),
            };
            // A file is taken only under the name it was saved for (or
            // its plain `<name>.json`, where names up to 241 characters
            // were kept before: moved to the name's file now).
            let file = d.share_file(&name);
            let plain = format!("{}{name}.json", d.shares_dir());
            if check_name("name", &name).is_ok() && (file == path || plain == path) {
                let mut s = s;
                s.name = Some(name.clone());
                if file != path {
                    d.save_share(&name, &s).await?;
                    d.agent
                        .op
                        .delete(&path)
                        .await
                        .context(|| format!("removing {path}"))?;
                }
                d.start(name, s);
            } else {
                tracing::warn!(%path, "ignoring a declared share file that does not match its name");
            }
        }
        tokio::spawn(d.clone().run_grant_renewal());
        Ok(d)
    }

    fn shares_dir(&self) -> String {
        format!("{}declared/shares/", self.agent.opts.state_prefix)
    }

    /// `<name>.json`; a name too long for a file name with that suffix (a
    /// Kubernetes object name may have 253 characters, a disk names 255
    /// bytes, and OpenDAL writes through a temporary `<file>.<8 chars>`:
    /// 246 was the most) is cut and followed by `_` (never in a name, so
    /// no name can take another's file) and a hash of the whole name.
    fn share_file(&self, name: &str) -> String {
        const FILE_NAME_MAX: usize = 200;
        if name.len() <= FILE_NAME_MAX {
            return format!("{}{name}.json", self.shares_dir());
        }
        let hash = blake3::hash(name.as_bytes()).to_hex();
        // `name` is ASCII (check_name), so any byte index is a boundary.
        let head = name.get(..160).unwrap_or(name);
        format!("{}{head}_{}.json", self.shares_dir(), &hash[..32])
    }

    pub(crate) fn grant_file(&self, key: &str) -> String {
        format!("{}{key}.json", self.grants_dir())
    }

    pub(crate) fn grants_dir(&self) -> String {
        format!("{}declared/grants/", self.agent.opts.state_prefix)
    }

    /// Writes a declared grant's saved state at `path`.
    pub(crate) async fn save_grant(&self, path: &str, g: &SavedGrant) -> Result<()> {
        let json = serde_json::to_vec_pretty(g).map_err(|e| Error::Config(e.to_string()))?;
        self.agent
            .op
            .write(path, json)
            .await
            .context(|| format!("saving {path}"))?;
        Ok(())
    }

    async fn save_share(&self, name: &str, s: &SavedShare) -> Result<()> {
        let json = serde_json::to_vec_pretty(s).map_err(|e| Error::Config(e.to_string()))?;
        let path = self.share_file(name);
        self.agent
            .op
            .write(&path, json)
            .await
            .context(|| format!("saving {path}"))?;
        Ok(())
    }

    fn start(self: &Arc<Self>, name: String, saved: SavedShare) -> Arc<Running> {
        let run = Arc::new(Running {
            status: Mutex::new(pending(&name, saved.spec.generation)),
            saved: Mutex::new(saved),
            progress: Mutex::new(None),
            next_run: Mutex::new(None),
            cancel: self.shutdown.child_token(),
        });
        if let Ok(mut m) = self.shares.lock()
            && let Some(old) = m.insert(name.clone(), run.clone())
        {
            old.cancel.cancel();
        }
        let me = self.clone();
        let r = run.clone();
        tokio::spawn(async move { me.converge(name, r).await });
        run
    }

    /// `PUT`: declares (or re-declares) a share; idempotent.
    pub async fn put_share(
        self: &Arc<Self>,
        name: &str,
        spec: DeclaredShare,
    ) -> Result<DeclaredShareStatus> {
        check_name("share name", name)?;
        check_share(&self.agent.opts.state_prefix, &spec)?;
        let existing = self.shares.lock().ok().and_then(|m| m.get(name).cloned());
        if let Some(run) = &existing {
            let same = run.saved.lock().map(|s| {
                let mut a = s.spec.clone();
                a.generation = spec.generation;
                a == spec
            });
            if same.unwrap_or(false) {
                if let Ok(mut s) = run.saved.lock() {
                    s.spec.generation = spec.generation;
                }
                return Ok(self.status_of(run, spec.generation));
            }
        } else if self.shares.lock().map(|m| m.len()).unwrap_or(0) >= MAX_DECLARED {
            return Err(Error::Rejected(format!(
                "at most {MAX_DECLARED} declared shares"
            )));
        }
        // A changed publish spec keeps its share (a new version follows).
        let keep_id = existing.as_ref().and_then(|r| {
            r.saved
                .lock()
                .ok()
                .filter(|s| s.spec.publish.is_some() && spec.publish.is_some())
                .and_then(|s| s.share_id.clone())
        });
        // Only what a version carries (folder, recipients, trust depth)
        // calls for a new version; a new rescan interval or an offline
        // seeding switch keeps the fingerprint, so unchanged files publish
        // nothing new (the switch is applied to the held version).
        let keep_fp = existing.as_ref().and_then(|r| {
            r.saved
                .lock()
                .ok()
                .and_then(|s| match (&s.spec.publish, &spec.publish) {
                    (Some(a), Some(b))
                        if a.path == b.path
                            && a.recipients == b.recipients
                            && a.trust_depth == b.trust_depth =>
                    {
                        s.fingerprint.clone()
                    }
                    _ => None,
                })
        });
        let saved = SavedShare {
            name: Some(name.to_string()),
            spec,
            share_id: keep_id,
            fingerprint: keep_fp,
        };
        self.save_share(name, &saved).await?;
        self.agent.activity.touch(activity::DECLARED);
        let g = saved.spec.generation;
        let run = self.start(name.to_string(), saved);
        Ok(self.status_of(&run, g))
    }

    /// `GET`: the status of a declared share.
    pub fn get_share(&self, name: &str) -> Option<DeclaredShareStatus> {
        let run = self.shares.lock().ok()?.get(name).cloned()?;
        let g = run.saved.lock().map(|s| s.spec.generation).unwrap_or(0);
        Some(self.status_of(&run, g))
    }

    /// `GET` of the collection: every declared share's status.
    pub fn list_shares(&self) -> Vec<DeclaredShareStatus> {
        let names: Vec<String> = self
            .shares
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        let mut out: Vec<_> = names.iter().filter_map(|n| self.get_share(n)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// `DELETE`: stops converging; a published share is no longer served
    /// (its files stay), a subscription is no longer followed (the fetched
    /// files stay). Unknown names succeed.
    pub async fn delete_share(&self, name: &str) -> Result<()> {
        check_name("share name", name)?;
        let run = self.shares.lock().ok().and_then(|mut m| m.remove(name));
        if let Some(run) = run {
            self.agent.activity.touch(activity::DECLARED);
            run.cancel.cancel();
            let saved = run.saved.lock().map(|s| s.clone()).ok();
            if let Some(s) = saved
                && s.spec.publish.is_some()
                && let Some(id) = s
                    .share_id
                    .as_deref()
                    .and_then(|i| i.parse::<ShareId>().ok())
            {
                self.agent.forget_share(&id).await?;
            }
        }
        let path = self.share_file(name);
        self.agent
            .op
            .delete(&path)
            .await
            .context(|| format!("removing {path}"))?;
        Ok(())
    }

    /// Work of the declared shares for the activity report: shares not
    /// settled yet (accepted, publishing, fetching) are pending; each
    /// publish share's next rescan is scheduled work.
    pub fn schedule(&self) -> Schedule {
        let mut out = Schedule::default();
        let runs: Vec<(String, Arc<Running>)> = self
            .shares
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        for (name, run) in runs {
            let fetching = run.progress.lock().map(|p| p.is_some()).unwrap_or(false);
            let state = run.status.lock().map(|s| s.state).ok();
            if fetching {
                out.pending
                    .push(format!("declared share {name}: fetch running"));
            } else if matches!(
                state,
                Some(DeclaredState::Pending | DeclaredState::Progressing)
            ) {
                out.pending
                    .push(format!("declared share {name} is not settled yet"));
            }
            if let Some(at) = run.next_run.lock().ok().and_then(|n| *n) {
                out.due(at, format!("rescan of share {name}"));
            }
        }
        if let Some(at) = self.next_renewal.lock().ok().and_then(|n| *n) {
            out.due(at, "renewal of declared trust grants".to_string());
        }
        out.pending.sort();
        out
    }

    fn status_of(&self, run: &Running, generation: i64) -> DeclaredShareStatus {
        let mut st = run
            .status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|_| pending("", generation));
        st.generation = generation;
        let progress = run.progress.lock().ok().and_then(|p| p.clone());
        if let Some(p) = progress {
            let snap = p.snapshot();
            if snap.state == FetchState::Transferring || snap.state == FetchState::Starting {
                st.state = DeclaredState::Progressing;
                st.reason = None;
                st.message = None;
            }
            st.bytes_total = snap.bytes_total;
            st.bytes_done = snap.bytes_done;
            st.chunks_total = snap.chunks_total;
            st.chunks_done = snap.chunks_done;
            st.files_total = snap.files_total;
            st.files_done = snap.files_done;
            st.bytes_received = snap.bytes_received;
            st.peers = u32::try_from(snap.peers.len()).unwrap_or(u32::MAX);
        }
        st
    }

    async fn converge(self: Arc<Self>, name: String, run: Arc<Running>) {
        loop {
            let spec = match run.saved.lock() {
                Ok(s) => s.spec.clone(),
                Err(_) => return,
            };
            let wait = if let Some(p) = &spec.publish {
                if let Err(e) = self.publish_once(&name, &run).await {
                    self.fail(&run, reason_of(&e, false), &e);
                }
                p.rescan_secs
            } else if let Some(s) = &spec.subscribe {
                self.subscribe_once(&run).await;
                s.poll_secs
            } else {
                return;
            };
            if spec.publish.is_some()
                && let Ok(mut n) = run.next_run.lock()
            {
                *n = Some(crate::util::unix_now().saturating_add(wait.max(1)));
            }
            tokio::select! {
                _ = run.cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(wait.max(1))) => {}
            }
        }
    }

    fn fail(&self, run: &Running, reason: &str, e: &Error) {
        tracing::warn!(reason, error = %e, "declared share cannot converge");
        if let Ok(mut s) = run.status.lock() {
            s.state = DeclaredState::Failed;
            s.reason = Some(reason.to_string());
            s.message = Some(e.to_string());
        }
    }

    async fn publish_once(&self, name: &str, run: &Running) -> Result<()> {
        let (spec, share_id, old_fp) = {
            let s = run
                .saved
                .lock()
                .map_err(|_| Error::Config("poisoned".into()))?;
            (s.spec.clone(), s.share_id.clone(), s.fingerprint.clone())
        };
        let Some(p) = spec.publish else {
            return Ok(());
        };
        let agent = &self.agent;
        let fp = fingerprint(agent, &p.path).await?;
        let held = share_id
            .as_deref()
            .and_then(|i| i.parse::<ShareId>().ok())
            .and_then(|id| agent.share(&id))
            .filter(|s| s.role == Role::Published);
        let id = match held {
            Some(h) if old_fp.as_deref() == Some(fp.as_str()) => {
                // Same files: only offline seeding may have been switched.
                let seeded = agent.seed_policy(&h.id).await.is_some();
                if p.offline_seeding && !seeded {
                    agent
                        .seed_share(&h.id, crate::node::seed::DEFAULT_URL_VALIDITY_SECS)
                        .await?;
                } else if !p.offline_seeding && seeded {
                    agent.stop_seeding(&h.id).await?;
                }
                h.id
            }
            _ => {
                if let Ok(mut s) = run.status.lock() {
                    s.state = DeclaredState::Progressing;
                }
                let mut agents = Vec::new();
                for r in &p.recipients {
                    agents.push(r.parse::<AgentId>()?);
                }
                let req = PublishRequest {
                    path: p.path.clone(),
                    access: Access {
                        agents,
                        trust_depth: p.trust_depth,
                    },
                    share_id: share_id
                        .as_deref()
                        .and_then(|i| i.parse::<ShareId>().ok())
                        .filter(|id| agent.share(id).is_some()),
                    rotate_key: false,
                    offline_seeding: p.offline_seeding,
                    url_validity_secs: None,
                    // The declared path is the spec's: a changed one is
                    // meant (the Share was edited).
                    new_path: true,
                };
                let published = agent.publish(req, None).await?;
                agent.activity.touch(activity::PUBLISH);
                let id: ShareId = published.share_id.parse()?;
                let saved = {
                    let mut s = run
                        .saved
                        .lock()
                        .map_err(|_| Error::Config("poisoned".into()))?;
                    s.share_id = Some(id.to_string());
                    s.fingerprint = Some(fp);
                    s.clone()
                };
                self.save_share(name, &saved).await?;
                id
            }
        };
        let Some(h) = agent.share(&id) else {
            return Err(Error::NotFound("the published share vanished".into()));
        };
        let mut tickets = Vec::new();
        for r in &p.recipients {
            let rid: AgentId = r.parse()?;
            tickets.push(RecipientTicket {
                agent_id: r.clone(),
                ticket: agent.ticket(id, rid)?,
            });
        }
        let keyless = match p.trust_depth {
            Some(_) => Some(Ticket::issue_keyless(
                &agent.key,
                id,
                agent.id,
                agent.opts.advertise.clone(),
                agent.opts.repositories.clone(),
            )?),
            None => None,
        };
        let files = h.manifest.files().count() as u64;
        if let Ok(mut s) = run.status.lock() {
            s.state = DeclaredState::Ready;
            s.reason = None;
            s.message = None;
            s.share_id = Some(id.to_string());
            s.publisher = Some(agent.id.to_string());
            s.version = h.seq();
            s.files_done = files;
            s.files_total = files;
            s.bytes_done = h.manifest.total_bytes();
            s.bytes_total = h.manifest.total_bytes();
            s.chunks_done = h.manifest.total_chunks();
            s.chunks_total = h.manifest.total_chunks();
            s.tickets = tickets;
            s.keyless_ticket = keyless;
        }
        Ok(())
    }

    async fn subscribe_once(&self, run: &Running) {
        let spec = match run.saved.lock() {
            Ok(s) => s.spec.clone(),
            Err(_) => return,
        };
        let Some(sub) = spec.subscribe else { return };
        let agent = &self.agent;
        let ticket = match (&sub.ticket, &sub.share_id, &sub.publisher) {
            (Some(t), _, _) => Ticket::parse(t),
            (None, Some(id), Some(p)) => (|| {
                Ok(Ticket {
                    share_id: id.parse()?,
                    publisher: p.parse()?,
                    recipient: agent.id,
                    wrapped_key: Vec::new(),
                    addresses: Vec::new(),
                    repositories: Vec::new(),
                })
            })(),
            _ => Err(Error::Rejected("no ticket and no share id".into())),
        };
        let ticket = match ticket {
            Ok(t) => t,
            Err(e) => return self.fail(run, reasons::TICKET_INVALID, &e),
        };
        if !ticket.wrapped_key.is_empty() && ticket.recipient != agent.id {
            let e = Error::Rejected(format!(
                "the ticket is for agent {}, but this agent is {}",
                ticket.recipient, agent.id
            ));
            return self.fail(run, reasons::NOT_A_RECIPIENT, &e);
        }
        if let Ok(mut s) = run.status.lock() {
            s.share_id = Some(ticket.share_id.to_string());
            s.publisher = Some(ticket.publisher.to_string());
        }
        let held_before = agent
            .share(&ticket.share_id)
            .filter(|s| s.role == Role::Fetched)
            .map(|s| s.seq());
        // A trust-based subscription that held a version and whose chain
        // from the publisher is gone (a revocation this agent learned) is
        // cut off: report it at once; the files of that version stay.
        if ticket.wrapped_key.is_empty()
            && held_before.is_some()
            && let Some(trust) = agent.trust()
            && trust.proof_for(&ticket.publisher).await.is_empty()
        {
            let e = Error::NotFound(format!(
                "no valid trust chain from the publisher {} to this agent any more (revoked or expired); keeping version {}",
                ticket.publisher,
                held_before.unwrap_or_default()
            ));
            return self.fail(run, reasons::TRUST_REVOKED, &e);
        }
        let progress = Arc::new(FetchProgress::new(ticket.share_id, sub.destination.clone()));
        if let Ok(mut p) = run.progress.lock() {
            *p = Some(progress.clone());
        }
        let result = agent
            .clone()
            .fetch_ticket(&ticket, &sub.destination, &[], progress.clone())
            .await;
        if let Ok(mut p) = run.progress.lock() {
            *p = None;
        }
        let snap = progress.snapshot();
        let held = agent
            .share(&ticket.share_id)
            .filter(|s| s.role == Role::Fetched);
        if let Ok(mut s) = run.status.lock() {
            if let Some(h) = &held {
                s.version = h.seq();
                let files = h.manifest.files().count() as u64;
                s.files_total = files;
                s.files_done = files;
                s.bytes_total = h.manifest.total_bytes();
                s.bytes_done = h.manifest.total_bytes();
                s.chunks_total = h.manifest.total_chunks();
                s.chunks_done = h.manifest.total_chunks();
            }
            s.peers = u32::try_from(snap.peers.len()).unwrap_or(u32::MAX);
            // Bytes received for the version now held: what this run
            // moved when it brought a new version, else what the run that
            // brought it moved.
            if held.as_ref().map(|h| h.seq()) != held_before {
                s.bytes_received = snap.bytes_received;
            }
            if held.as_ref().map(|h| h.seq()) != held_before || snap.bytes_received > 0 {
                agent.activity.touch(activity::FETCH);
            }
            if result.is_ok() {
                s.state = DeclaredState::Ready;
                s.reason = None;
                s.message = None;
            }
        }
        if let Err(e) = result {
            self.fail(run, reason_of(&e, held.is_some()), &e);
        }
    }

    /// `PUT` of a grant: signs once per key and spec, publishes.
    pub async fn put_grant(&self, key: &str, spec: DeclaredGrant) -> Result<DeclaredGrantStatus> {
        check_name("grant key", key)?;
        let _guard = self.grants.lock().await;
        let trust = self
            .agent
            .trust()
            .ok_or_else(|| Error::Config("the trust state is not loaded".into()))?;
        let subject: AgentId = spec.subject.parse()?;
        crate::trust::check_grant_depth(spec.depth).map_err(Error::Rejected)?;
        let path = self.grant_file(key);
        let old: Option<SavedGrant> = match self.agent.op.read(&path).await {
            Ok(b) => serde_json::from_slice(&b.to_vec()).ok(),
            Err(e) if e.kind() == opendal::ErrorKind::NotFound => None,
            Err(e) => return Err(e).context(|| format!("reading {path}")),
        };
        if let Some(o) = &old
            && o.spec == spec
            && !o.revoked
        {
            let mut o = o.clone();
            // Signed while no repository answered: the outbox has sent it since.
            if !o.published && !trust.is_unpublished(&o.grant_id).await {
                o.published = true;
                self.save_grant(&path, &o).await?;
            }
            return Ok(self.grant_status(&o, &spec));
        }
        // One grant per issuer and subject is in effect (signing a second
        // replaces the first): a second declared grant for the same subject
        // is refused, naming the one in effect. Before, both showed as
        // published, and deleting either revoked the other's grant too.
        let dir = self.grants_dir();
        let others =
            crate::node::state::read_each(&self.agent.op, &dir, ".json", "declared grant", |b| {
                serde_json::from_slice::<SavedGrant>(b)
            })
            .await?;
        if let Some((other, _)) = others
            .iter()
            .find(|(p, g)| *p != path && !g.revoked && g.spec.subject == spec.subject)
        {
            let other = other
                .strip_prefix(&dir)
                .and_then(|n| n.strip_suffix(".json"))
                .unwrap_or(other);
            return Err(Error::Rejected(format!(
                "another declared grant ({other}) already trusts agent {}: an issuer has one \
                 grant per subject in effect; change that one, or delete it first",
                spec.subject
            )));
        }
        if let Some(o) = &old
            && !o.revoked
        {
            revoke_every_grant(&trust, o).await?;
        }
        let now = crate::util::unix_now();
        // No expiry declared: signed for a month and renewed while declared
        // (`grant_renewal.rs`).
        let expires_secs = Some(
            spec.not_after
                .map_or(DECLARED_GRANT_SECS, |n| n.saturating_sub(now).max(1)),
        );
        // A grant no repository could be reached for is saved as not yet
        // published (the outbox sends it): a retried PUT must not sign
        // another one, which a DELETE would then not know of.
        let info = trust
            .grant_queued(&GrantRequest {
                subject,
                depth: spec.depth,
                expires_secs,
                scope: spec.scope.clone(),
            })
            .await?;
        let saved = SavedGrant {
            spec: spec.clone(),
            grant_id: info.grant_id.clone(),
            not_after: info.not_after,
            published: !info.published_to.is_empty() || trust.repositories().is_none(),
            revoked: false,
            revocation_published: false,
        };
        self.save_grant(&path, &saved).await?;
        self.agent.activity.touch(activity::DECLARED);
        self.note_renewal(&saved);
        let mut st = self.grant_status(&saved, &spec);
        st.published_to = info.published_to;
        Ok(st)
    }

    fn grant_status(&self, s: &SavedGrant, spec: &DeclaredGrant) -> DeclaredGrantStatus {
        DeclaredGrantStatus {
            grant_id: s.grant_id.clone(),
            issuer: self.agent.id.to_string(),
            subject: spec.subject.clone(),
            depth: spec.depth,
            not_after: s.not_after,
            published: s.published,
            published_to: Vec::new(),
        }
    }

    /// `DELETE` of a grant: signs its revocation once and publishes it;
    /// repeating it re-publishes. Unknown keys succeed with nothing revoked.
    pub async fn delete_grant(&self, key: &str) -> Result<RevocationStatus> {
        check_name("grant key", key)?;
        let _guard = self.grants.lock().await;
        let path = self.grant_file(key);
        let mut saved: SavedGrant = match self.agent.op.read(&path).await {
            Ok(b) => serde_json::from_slice(&b.to_vec())
                .map_err(|e| Error::Config(format!("{path}: {e}")))?,
            Err(e) if e.kind() == opendal::ErrorKind::NotFound => {
                return Ok(RevocationStatus {
                    revoked: Vec::new(),
                    published: true,
                });
            }
            Err(e) => return Err(e).context(|| format!("reading {path}")),
        };
        let trust = self
            .agent
            .trust()
            .ok_or_else(|| Error::Config("the trust state is not loaded".into()))?;
        if !saved.revoked || !saved.revocation_published {
            self.agent.activity.touch(activity::DECLARED);
            let published = revoke_every_grant(&trust, &saved).await?;
            saved.revoked = true;
            saved.revocation_published = published;
        }
        if saved.revocation_published {
            self.agent
                .op
                .delete(&path)
                .await
                .context(|| format!("removing {path}"))?;
        } else {
            self.save_grant(&path, &saved).await?;
        }
        Ok(RevocationStatus {
            revoked: vec![saved.grant_id],
            published: saved.revocation_published,
        })
    }
}

/// A fingerprint of a folder's listing: every path with its size and
/// modification time or etag. A new version is published only when it
/// changes.
async fn fingerprint(agent: &Agent, path: &str) -> Result<String> {
    let root = crate::node::state::user_folder(&agent.opts.state_prefix, path)?;
    let mut lister = agent
        .op
        .lister_with(&root)
        .recursive(true)
        .await
        .context(|| format!("listing {root:?}"))?;
    let mut lines = Vec::new();
    while let Some(e) = lister
        .try_next()
        .await
        .context(|| format!("listing {root:?}"))?
    {
        if e.path().starts_with(&agent.opts.state_prefix) {
            continue;
        }
        let m = e.metadata();
        let mut meta = m.clone();
        if !m.is_dir() && m.last_modified().is_none() && m.etag().is_none() {
            meta = agent
                .op
                .stat(e.path())
                .await
                .context(|| format!("stat {}", e.path()))?;
        }
        lines.push(format!(
            "{}\t{}\t{:?}\t{:?}",
            e.path(),
            meta.content_length(),
            meta.last_modified().map(|t| t.to_string()),
            meta.etag()
        ));
    }
    if lines.is_empty() {
        return Err(Error::NotFound(format!("nothing to publish at {path:?}")));
    }
    lines.sort();
    Ok(blake3::hash(lines.join("\n").as_bytes())
        .to_hex()
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_port_is_unreachable_not_revoked() {
        let closed = Error::Unreachable(
            "no peer reachable for share x (10.0.0.1:7400: Connection refused (os error 111)): \
             its publisher and any other holder are offline"
                .into(),
        );
        assert_eq!(reason_of(&closed, true), reasons::PUBLISHER_UNREACHABLE);
        let refused = Error::NotFound(
            "the publisher refused the share key: this agent found no valid grant chain".into(),
        );
        assert_eq!(reason_of(&refused, true), reasons::TRUST_REVOKED);
        assert_eq!(reason_of(&refused, false), reasons::NOT_A_RECIPIENT);
    }
}
