//! The client agents use to talk to several repositories at once.
//!
//! Repositories are trusted for availability only, so every record that
//! comes back is verified here (signature, signer = issuer/agent, expiry,
//! and that it answers the question asked); anything forged or stale is
//! dropped with a warning. Every answer is the union over the repositories
//! that responded; a repository that is down is skipped, and its last good
//! answer to the same question (re-verified, so expiry still applies) is
//! used instead, so an agent keeps working while one is down.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use reqwest::header::CONTENT_TYPE;

use crate::error::{Error, Result};
use crate::identity::AgentId;
use crate::record::SignedRecord;
use crate::trust::{Announcement, GrantId, Invalid, Revocation, TrustGrant, decode_record};
use crate::util::{hex, unix_now};

use super::{MAX_FRAMES, NEXT_CURSOR_HEADER, decode_frames};

/// Largest response body the client reads (bytes).
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;
/// Most cached answers kept (per repository and question).
const MAX_CACHED_ANSWERS: usize = 10_000;
/// Most pages of one listing read from one repository (an issuer holds at
/// most `MAX_GRANTS_PER_ISSUER` = 10,000 records, i.e. 10 pages of 1,000).
const MAX_LISTING_PAGES: usize = 16;
/// Most feed pages read from one repository in one sync.
const MAX_FEED_PAGES: usize = 1_000;

/// What happened to a published record at each repository.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishReport {
    /// Repositories that stored it.
    pub accepted: Vec<String>,
    /// Repositories that refused it, with their JSON error body.
    pub refused: Vec<(String, String)>,
    /// Repositories that could not be reached, with the error.
    pub unreachable: Vec<(String, String)>,
}

/// What one repository did with a published record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stored.
    Accepted,
    /// Refused as not newer than what it holds: it has this record or a
    /// newer one for the same key (the JSON error body).
    Stale(String),
    /// Refused for cause (4xx: expired, too far ahead, unknown grant…),
    /// with the JSON error body. Sending it again will not help.
    Refused(String),
    /// Not reached, or busy or failing (timeout, 429, 5xx): try again later.
    Unreachable(String),
}

#[derive(Default)]
struct Cache {
    answers: HashMap<(usize, String), Vec<Vec<u8>>>,
    cursors: Vec<u64>,
}

/// A client for a set of repositories (base URLs such as `http://host:7480`).
pub struct RepositoryClient {
    urls: Vec<String>,
    http: reqwest::Client,
    cache: Mutex<Cache>,
}

enum Fetched {
    /// The repository answered with these record byte strings.
    Fresh(Vec<Vec<u8>>),
    /// The repository is down; this is its last good answer.
    Cached(Vec<Vec<u8>>),
    /// The repository is down and never answered this question.
    Down,
}

impl RepositoryClient {
    /// A client for `urls` with a 10 s timeout per request.
    pub fn new(urls: &[String]) -> Result<Self> {
        Self::with_timeout(urls, Duration::from_secs(10))
    }

    /// A client for `urls` with the given per-request timeout.
    pub fn with_timeout(urls: &[String], timeout: Duration) -> Result<Self> {
        if urls.is_empty() {
            return Err(Error::Config("no repository URL given".into()));
        }
        let mut clean = Vec::new();
        for u in urls {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(Error::Config(format!(
                    "repository {u:?} must be an http(s) URL"
                )));
            }
            clean.push(u.trim_end_matches('/').to_string());
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            // Repositories close connections idle for 30 s (conn_limits):
            // let them go first rather than reuse one being closed.
            .pool_idle_timeout(Duration::from_secs(20))
            .build()
            .map_err(|e| Error::Config(format!("building the HTTP client: {e}")))?;
        let n = clean.len();
        Ok(RepositoryClient {
            urls: clean,
            http,
            cache: Mutex::new(Cache {
                answers: HashMap::new(),
                cursors: vec![0; n],
            }),
        })
    }

    /// The repositories this client uses.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Publishes a record to one repository (`url`, one of [`Self::urls`]).
    pub async fn publish_to(&self, url: &str, rec: &SignedRecord) -> Outcome {
        let r = self
            .http
            .post(format!("{url}/v1/records"))
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(rec.to_bytes())
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => Outcome::Accepted,
            Ok(resp) => {
                let status = resp.status();
                let text = read_limited(resp)
                    .await
                    .map(|b| crate::util::peer_text(&b))
                    .unwrap_or_default();
                // Busy (rate limit, timeout) or failing (5xx): try again later.
                if status.is_server_error()
                    || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                    || status == reqwest::StatusCode::REQUEST_TIMEOUT
                {
                    tracing::warn!(repository = %url, %status, body = %text, "repository could not take a record now");
                    return Outcome::Unreachable(format!("HTTP {status}: {text}"));
                }
                if text.contains("\"stale\"") {
                    return Outcome::Stale(text);
                }
                tracing::warn!(repository = %url, %status, body = %text, "repository refused a record");
                Outcome::Refused(text)
            }
            Err(e) => {
                tracing::warn!(repository = %url, error = %e, "repository unreachable");
                Outcome::Unreachable(e.to_string())
            }
        }
    }

    /// Publishes a record to every repository. Succeeds when at least one
    /// stored it (or already had it or something newer: a `stale` refusal
    /// still means the repository holds the information).
    pub async fn publish(&self, rec: &SignedRecord) -> Result<PublishReport> {
        let sends = self.urls.iter().map(|u| async move {
            let o = self.publish_to(u, rec).await;
            (u.clone(), o)
        });
        let mut report = PublishReport::default();
        for (u, o) in futures::future::join_all(sends).await {
            match o {
                Outcome::Accepted => report.accepted.push(u),
                Outcome::Stale(body) | Outcome::Refused(body) => report.refused.push((u, body)),
                Outcome::Unreachable(e) => report.unreachable.push((u, e)),
            }
        }
        let stale_everywhere_ok = report
            .refused
            .iter()
            .any(|(_, body)| body.contains("\"stale\""));
        if report.accepted.is_empty() && !stale_everywhere_ok {
            return Err(Error::Protocol(format!(
                "no repository accepted the {}: refused {:?}, unreachable {:?}",
                rec.kind.tag(),
                report.refused,
                report.unreachable
            )));
        }
        Ok(report)
    }

    fn cached(&self, repo: usize, path: &str) -> Option<Vec<Vec<u8>>> {
        self.cache
            .lock()
            .ok()?
            .answers
            .get(&(repo, path.to_string()))
            .cloned()
    }

    fn store(&self, repo: usize, path: &str, records: &[Vec<u8>]) {
        if let Ok(mut c) = self.cache.lock() {
            if c.answers.len() >= MAX_CACHED_ANSWERS {
                c.answers.clear();
            }
            c.answers.insert((repo, path.to_string()), records.to_vec());
        }
    }

    async fn get_one(&self, repo: usize, path: &str, framed: bool) -> Fetched {
        let fresh = if framed {
            self.get_pages(repo, path).await
        } else {
            self.get_page(repo, path, false).await.map(|(r, _)| r)
        };
        match fresh {
            Ok(records) => {
                self.store(repo, path, &records);
                Fetched::Fresh(records)
            }
            Err(e) => {
                tracing::warn!(repository = %self.urls[repo], error = %e, "repository look-up failed; skipping it");
                match self.cached(repo, path) {
                    Some(c) => Fetched::Cached(c),
                    None => Fetched::Down,
                }
            }
        }
    }

    /// One GET: the records and, for a paged listing, the cursor of the
    /// next page.
    async fn get_page(
        &self,
        repo: usize,
        path: &str,
        framed: bool,
    ) -> std::result::Result<(Vec<Vec<u8>>, Option<String>), String> {
        let url = format!("{}{path}", self.urls[repo]);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok((Vec::new(), None));
        }
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        let next = resp
            .headers()
            .get(NEXT_CURSOR_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| crate::util::parse_hex32(v).is_some())
            .map(str::to_string);
        let body = read_limited(resp).await.map_err(|e| e.to_string())?;
        if framed {
            decode_frames(&body, MAX_FRAMES)
                .map(|f| (f.into_iter().map(<[u8]>::to_vec).collect(), next))
                .map_err(|e| e.to_string())
        } else {
            Ok((vec![body], None))
        }
    }

    /// Every page of a framed listing, following the `after` cursor. Bounded:
    /// at most [`MAX_LISTING_PAGES`] pages, and a cursor must move forward
    /// (a repository cannot keep the client looping).
    async fn get_pages(
        &self,
        repo: usize,
        path: &str,
    ) -> std::result::Result<Vec<Vec<u8>>, String> {
        let (mut out, mut next) = self.get_page(repo, path, true).await?;
        let mut pages = 1;
        while let Some(after) = next.take() {
            if pages >= MAX_LISTING_PAGES {
                tracing::warn!(repository = %self.urls[repo], path, pages, "listing has more pages than the client reads; using what it has");
                break;
            }
            let (more, n) = self
                .get_page(repo, &format!("{path}?after={after}"), true)
                .await?;
            if more.is_empty() {
                break;
            }
            out.extend(more);
            next = n.filter(|n| *n > after);
            pages += 1;
        }
        Ok(out)
    }

    /// Asks every repository the same question; the union of answers (from
    /// cache for those that are down). Errors only when none could answer.
    async fn ask_all(&self, path: &str, framed: bool) -> Result<Vec<Vec<u8>>> {
        let all =
            futures::future::join_all((0..self.urls.len()).map(|i| self.get_one(i, path, framed)))
                .await;
        let mut any = false;
        let mut out = Vec::new();
        for f in all {
            match f {
                Fetched::Fresh(r) | Fetched::Cached(r) => {
                    any = true;
                    out.extend(r);
                }
                Fetched::Down => {}
            }
        }
        if !any {
            return Err(Error::Protocol(format!(
                "no repository answered {path} (tried {})",
                self.urls.join(", ")
            )));
        }
        Ok(out)
    }

    /// The newest current offline seed record of `share` by `publisher`
    /// across all repositories (verified, signed by the publisher, unexpired).
    pub async fn seed(
        &self,
        publisher: &AgentId,
        share: &crate::ticket::ShareId,
    ) -> Result<Option<(crate::trust::SeedRecord, SignedRecord)>> {
        let raw = self
            .ask_all(
                &format!("/v1/seeds/{}/{}", hex(&publisher.0), share.hex()),
                false,
            )
            .await?;
        let now = unix_now();
        let mut best: Option<(crate::trust::SeedRecord, SignedRecord)> = None;
        for bytes in raw {
            let Ok(rec) = SignedRecord::from_bytes(&bytes) else {
                continue;
            };
            let Ok(s) = crate::trust::SeedRecord::from_record(&rec) else {
                continue;
            };
            if s.publisher != *publisher || s.share_id != *share || s.check_window(now).is_err() {
                continue;
            }
            if best.as_ref().is_none_or(|(b, _)| s.seq > b.seq) {
                best = Some((s, rec));
            }
        }
        Ok(best)
    }

    /// The agent's newest current announcement across all repositories.
    pub async fn announcement(
        &self,
        agent: &AgentId,
    ) -> Result<Option<(Announcement, SignedRecord)>> {
        let raw = self
            .ask_all(&format!("/v1/announcements/{}", hex(&agent.0)), false)
            .await?;
        let now = unix_now();
        Ok(newest_announcements(raw, now, |a| a.agent == *agent)
            .into_values()
            .next())
    }

    /// Every agent announcing `locator` (see [`crate::trust::share_locator`]),
    /// deduplicated (newest announcement per agent), verified and unexpired.
    pub async fn holders(&self, locator: &[u8; 32]) -> Result<Vec<(Announcement, SignedRecord)>> {
        let raw = self
            .ask_all(&format!("/v1/locators/{}", hex(locator)), true)
            .await?;
        let now = unix_now();
        Ok(
            newest_announcements(raw, now, |a| a.locators.contains(locator))
                .into_values()
                .collect(),
        )
    }

    /// Unexpired grants issued by `issuer`, verified, newest per subject.
    pub async fn grants_by_issuer(
        &self,
        issuer: &AgentId,
    ) -> Result<Vec<(TrustGrant, SignedRecord)>> {
        let raw = self
            .ask_all(&format!("/v1/grants/by-issuer/{}", hex(&issuer.0)), true)
            .await?;
        Ok(newest_grants(raw, unix_now(), |g| g.issuer == *issuer))
    }

    /// Unexpired grants naming `subject`, verified, newest per issuer.
    pub async fn grants_by_subject(
        &self,
        subject: &AgentId,
    ) -> Result<Vec<(TrustGrant, SignedRecord)>> {
        let raw = self
            .ask_all(&format!("/v1/grants/by-subject/{}", hex(&subject.0)), true)
            .await?;
        Ok(newest_grants(raw, unix_now(), |g| g.subject == *subject))
    }

    /// Every revocation `issuer` published, verified and deduplicated.
    pub async fn revocations_by_issuer(
        &self,
        issuer: &AgentId,
    ) -> Result<Vec<(Revocation, SignedRecord)>> {
        let raw = self
            .ask_all(
                &format!("/v1/revocations/by-issuer/{}", hex(&issuer.0)),
                true,
            )
            .await?;
        Ok(unique_revocations(raw, unix_now(), |r| r.issuer == *issuer))
    }

    /// Reads one page of repository `repo`'s revocation feed from `cursor`.
    /// Returns the verified revocations and the cursor to continue from.
    /// Entries that do not verify are skipped (and counted as read).
    pub async fn fetch_feed(
        &self,
        repo: usize,
        cursor: u64,
        limit: usize,
    ) -> Result<(Vec<(Revocation, SignedRecord)>, u64)> {
        let base = self
            .urls
            .get(repo)
            .ok_or_else(|| Error::Config(format!("no repository number {repo}")))?;
        let url = format!(
            "{base}/v1/revocations?cursor={cursor}&limit={}",
            limit.min(MAX_FRAMES)
        );
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| Error::Protocol(format!("{base}: {e}")))?;
        if !resp.status().is_success() {
            return Err(Error::Protocol(format!("{base}: HTTP {}", resp.status())));
        }
        let announced_next = resp
            .headers()
            .get(NEXT_CURSOR_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let body = read_limited(resp).await?;
        let frames = decode_frames(&body, MAX_FRAMES)?;
        // The cursor only advances by what was actually delivered, whatever
        // the header says: a repository cannot make us skip entries.
        let next = cursor.saturating_add(frames.len() as u64);
        if announced_next.is_some_and(|a| a != next) {
            tracing::warn!(repository = %base, ?announced_next, next, "feed cursor header disagrees with the page");
        }
        let raw = frames.into_iter().map(<[u8]>::to_vec).collect();
        Ok((unique_revocations(raw, unix_now(), |_| true), next))
    }

    /// Brings every repository's feed up to date from the cursors this
    /// client keeps (see [`Self::cursors`] to persist them), returning the
    /// revocations not seen before in this sync (deduplicated across
    /// repositories). A repository that is down is skipped and its cursor
    /// kept, so the next sync resumes there.
    pub async fn sync_revocations(&self) -> Result<Vec<(Revocation, SignedRecord)>> {
        let start: Vec<u64> = self
            .cache
            .lock()
            .map(|c| c.cursors.clone())
            .unwrap_or_else(|_| vec![0; self.urls.len()]);
        let per_repo = futures::future::join_all((0..self.urls.len()).map(|i| {
            let mut cursor = start.get(i).copied().unwrap_or(0);
            async move {
                let mut got = Vec::new();
                for _ in 0..MAX_FEED_PAGES {
                    match self.fetch_feed(i, cursor, MAX_FRAMES).await {
                        Ok((page, next)) => {
                            let done = next == cursor;
                            got.extend(page);
                            cursor = next;
                            if done {
                                break;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(repository = %self.urls[i], error = %e, "revocation feed sync failed; will resume later");
                            break;
                        }
                    }
                }
                (i, cursor, got)
            }
        }))
        .await;
        let mut seen: BTreeMap<(AgentId, GrantId), (Revocation, SignedRecord)> = BTreeMap::new();
        if let Ok(mut c) = self.cache.lock() {
            for (i, cursor, _) in &per_repo {
                if let Some(slot) = c.cursors.get_mut(*i) {
                    *slot = *cursor;
                }
            }
        }
        for (_, _, revs) in per_repo {
            for (r, rec) in revs {
                seen.entry((r.issuer, r.grant_id)).or_insert((r, rec));
            }
        }
        Ok(seen.into_values().collect())
    }

    /// The feed cursor per repository URL (persist these to resume later).
    pub fn cursors(&self) -> Vec<(String, u64)> {
        let c = self
            .cache
            .lock()
            .map(|c| c.cursors.clone())
            .unwrap_or_default();
        self.urls.iter().cloned().zip(c).collect()
    }

    /// Restores a persisted cursor for the repository at `url`.
    pub fn set_cursor(&self, url: &str, cursor: u64) {
        let url = url.trim_end_matches('/');
        if let Some(i) = self.urls.iter().position(|u| u == url)
            && let Ok(mut c) = self.cache.lock()
            && let Some(slot) = c.cursors.get_mut(i)
        {
            *slot = cursor;
        }
    }
}

async fn read_limited(mut resp: reqwest::Response) -> Result<Vec<u8>> {
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_RESPONSE_BYTES as u64)
    {
        return Err(Error::Protocol(format!(
            "response larger than {MAX_RESPONSE_BYTES} bytes"
        )));
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| Error::Protocol(format!("reading a response: {e}")))?
    {
        if out.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(Error::Protocol(format!(
                "response larger than {MAX_RESPONSE_BYTES} bytes"
            )));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn verify_logged<T>(
    bytes: &[u8],
    open: impl Fn(&SignedRecord) -> std::result::Result<T, Invalid>,
) -> Option<(T, SignedRecord)> {
    match decode_record(bytes).and_then(|r| open(&r).map(|v| (v, r))) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a record from a repository");
            None
        }
    }
}

fn newest_announcements(
    raw: Vec<Vec<u8>>,
    now: u64,
    wanted: impl Fn(&Announcement) -> bool,
) -> BTreeMap<AgentId, (Announcement, SignedRecord)> {
    let mut out: BTreeMap<AgentId, (Announcement, SignedRecord)> = BTreeMap::new();
    for b in raw {
        let Some((a, rec)) = verify_logged(&b, |r| {
            let a = Announcement::from_record(r)?;
            a.check_window(now)?;
            Ok(a)
        }) else {
            continue;
        };
        if !wanted(&a) {
            continue;
        }
        match out.get(&a.agent) {
            Some((old, _)) if old.seq >= a.seq => {}
            _ => {
                out.insert(a.agent, (a, rec));
            }
        }
    }
    out
}

fn newest_grants(
    raw: Vec<Vec<u8>>,
    now: u64,
    wanted: impl Fn(&TrustGrant) -> bool,
) -> Vec<(TrustGrant, SignedRecord)> {
    let mut out: BTreeMap<(AgentId, AgentId), (TrustGrant, SignedRecord)> = BTreeMap::new();
    for b in raw {
        let Some((g, rec)) = verify_logged(&b, |r| {
            let g = TrustGrant::from_record(r)?;
            g.check_window(now)?;
            Ok(g)
        }) else {
            continue;
        };
        if !wanted(&g) {
            continue;
        }
        match out.get(&(g.issuer, g.subject)) {
            Some((old, _)) if old.seq >= g.seq => {}
            _ => {
                out.insert((g.issuer, g.subject), (g, rec));
            }
        }
    }
    out.into_values().collect()
}

fn unique_revocations(
    raw: Vec<Vec<u8>>,
    now: u64,
    wanted: impl Fn(&Revocation) -> bool,
) -> Vec<(Revocation, SignedRecord)> {
    let mut out: BTreeMap<(AgentId, GrantId), (Revocation, SignedRecord)> = BTreeMap::new();
    for b in raw {
        let Some((r, rec)) = verify_logged(&b, |rec| {
            let r = Revocation::from_record(rec)?;
            r.check_time(now)?;
            Ok(r)
        }) else {
            continue;
        };
        if wanted(&r) {
            out.entry((r.issuer, r.grant_id)).or_insert((r, rec));
        }
    }
    out.into_values().collect()
}
