//! Offline seeding, the recipient's side: the publisher's bucket as one more
//! source of a fetch. The signed seed record comes from the repositories
//! (the ones named in the ticket and our own), so it is found while the
//! publisher sleeps; its index URL opens only with the share key. Each
//! chunk from a presigned URL is bounded before it is read and verified
//! exactly as one from a peer (BLAKE3 id, then the AEAD tag). A URL that
//! the bucket refuses (expired, replaced index) makes us re-read the
//! refreshed record once, without restarting the fetch; any other failure
//! is a strike against the bucket, and the swarm asks a live peer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use crate::chunk::{self, ChunkRef, MAX_CIPHERTEXT, Verified};
use crate::crypto::Key;
use crate::error::{Error, Result};
use crate::identity::AgentId;
use crate::manifest::ShareId;
use crate::repository::client::RepositoryClient;
use crate::trust::seed::MAX_SEED_INDEX;
use crate::trust::{SeedIndex, SeedRecord};

/// Failures after which the bucket is no longer asked in this fetch.
pub(crate) const SEED_BAN_AFTER: u32 = 4;
/// Chunk requests to the bucket in flight at once when peers are there too
/// (without peers, the file and chunk windows of the fetch bound it).
pub(crate) const SEED_WINDOW: usize = 16;

/// What one seed record told us.
struct Loaded {
    seq: u64,
    manifest_seq: u64,
    manifest: Vec<u8>,
    urls: HashMap<[u8; 32], String>,
}

/// The publisher's bucket as a source of one fetch.
pub(crate) struct SeedSource {
    http: reqwest::Client,
    repos: RepositoryClient,
    publisher: AgentId,
    share: ShareId,
    key: Key,
    loaded: tokio::sync::RwLock<Loaded>,
    refreshing: tokio::sync::Mutex<()>,
    strikes: AtomicU32,
    in_flight: AtomicUsize,
}

/// Decrements the in-flight count when a request ends, however it ends.
struct InFlight<'a>(&'a AtomicUsize);
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl SeedSource {
    /// Looks for the share's seed record in `repos`; `None` when there is
    /// none (or no repository answered): the fetch then uses peers only.
    pub(crate) async fn discover(
        repos: &[String],
        publisher: AgentId,
        share: ShareId,
        key: &Key,
    ) -> Result<Option<SeedSource>> {
        if repos.is_empty() {
            return Ok(None);
        }
        let repos = RepositoryClient::with_timeout(repos, Duration::from_secs(10))?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::Config(format!("http client: {e}")))?;
        let Some(loaded) = load(&http, &repos, &publisher, &share, key).await? else {
            return Ok(None);
        };
        Ok(Some(SeedSource {
            http,
            repos,
            publisher,
            share,
            key: key.clone(),
            loaded: tokio::sync::RwLock::new(loaded),
            refreshing: tokio::sync::Mutex::new(()),
            strikes: AtomicU32::new(0),
            in_flight: AtomicUsize::new(0),
        }))
    }

    /// The signed manifest record the index carries (verified by the caller
    /// like any peer's), and its version.
    pub(crate) async fn manifest(&self) -> (Vec<u8>, u64) {
        let l = self.loaded.read().await;
        (l.manifest.clone(), l.manifest_seq)
    }

    /// Still worth asking (not too many failures)?
    pub(crate) fn usable(&self) -> bool {
        self.strikes.load(Ordering::Relaxed) < SEED_BAN_AFTER
    }

    /// Chunk requests in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a failure against the bucket.
    pub(crate) fn strike(&self) {
        self.strikes.fetch_add(1, Ordering::Relaxed);
    }

    /// Does the index list this chunk?
    pub(crate) async fn has(&self, r: &ChunkRef) -> bool {
        self.loaded.read().await.urls.contains_key(&r.id.0)
    }

    /// Gets one chunk from the bucket: its ciphertext bounded, then
    /// verified (the writer opens it). A refusal by the bucket (an expired URL, most
    /// likely) re-reads the refreshed record once and retries.
    pub(crate) async fn get(&self, r: &ChunkRef) -> Result<(Verified, u64)> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let _guard = InFlight(&self.in_flight);
        let (url, seq) = self.url_of(r).await?;
        let ct = match self.download(&url, r).await {
            Err(Refusal::Denied(status)) => {
                tracing::info!(%status, "the bucket refused a presigned URL; re-reading the seed record");
                self.refresh(seq).await?;
                let (url, _) = self.url_of(r).await?;
                self.download(&url, r).await.map_err(Refusal::into_error)?
            }
            other => other.map_err(Refusal::into_error)?,
        };
        let n = ct.len() as u64;
        Ok((chunk::verify(r, ct)?, n))
    }

    async fn url_of(&self, r: &ChunkRef) -> Result<(String, u64)> {
        let l = self.loaded.read().await;
        let url = l.urls.get(&r.id.0).cloned().ok_or_else(|| {
            Error::NotFound(format!("chunk {} is not in the publisher's bucket", r.id))
        })?;
        Ok((url, l.seq))
    }

    /// Re-reads the seed record (once for all requests that saw `seen`).
    async fn refresh(&self, seen: u64) -> Result<()> {
        let _one = self.refreshing.lock().await;
        if self.loaded.read().await.seq != seen {
            return Ok(()); // another request already refreshed it
        }
        match load(
            &self.http,
            &self.repos,
            &self.publisher,
            &self.share,
            &self.key,
        )
        .await?
        {
            Some(new) if new.seq > seen => {
                tracing::info!(seq = new.seq, "fresh presigned URLs from the seed record");
                *self.loaded.write().await = new;
                Ok(())
            }
            _ => Err(Error::Protocol(
                "the publisher's presigned URLs expired and no fresher seed record is in the \
                 repositories"
                    .into(),
            )),
        }
    }

    async fn download(&self, url: &str, r: &ChunkRef) -> std::result::Result<Vec<u8>, Refusal> {
        let want = r.len as usize + crate::crypto::TAG_LEN;
        match get_bounded(&self.http, url, want.min(MAX_CIPHERTEXT) as u64).await {
            // Longer than the chunk: not the chunk (replaced), like a bad hash.
            Err(Refusal::TooBig(max)) => Err(Refusal::Failed(Error::CorruptChunk {
                id: r.id.to_string(),
                reason: format!("the bucket sent more than the {max} bytes of the chunk"),
            })),
            other => other,
        }
    }
}

/// Why a bucket GET failed.
enum Refusal {
    /// 403 or 400: an expired or no longer valid URL; worth a refresh.
    Denied(reqwest::StatusCode),
    /// A body longer than the bound (not read further).
    TooBig(u64),
    /// Anything else.
    Failed(Error),
}

impl Refusal {
    fn into_error(self) -> Error {
        match self {
            Refusal::Denied(s) => Error::Protocol(format!(
                "the publisher's bucket refused the presigned URL (HTTP {s})"
            )),
            Refusal::TooBig(max) => Error::Protocol(format!(
                "the publisher's bucket sent more than the {max} bytes expected"
            )),
            Refusal::Failed(e) => e,
        }
    }
}

/// GETs `url`, refusing a body longer than `max` before and while reading it.
async fn get_bounded(
    http: &reqwest::Client,
    url: &str,
    max: u64,
) -> std::result::Result<Vec<u8>, Refusal> {
    let mut resp = http
        .get(url)
        .send()
        .await
        .map_err(|e| Refusal::Failed(Error::Protocol(format!("bucket request: {e}"))))?;
    let status = resp.status();
    if status == reqwest::StatusCode::FORBIDDEN || status == reqwest::StatusCode::BAD_REQUEST {
        return Err(Refusal::Denied(status));
    }
    if !status.is_success() {
        return Err(Refusal::Failed(Error::Protocol(format!(
            "the publisher's bucket answered HTTP {status} (object deleted?)"
        ))));
    }
    if resp.content_length().is_some_and(|n| n > max) {
        return Err(Refusal::TooBig(max));
    }
    let mut out = Vec::with_capacity(max.min(MAX_CIPHERTEXT as u64) as usize);
    while let Some(part) = resp
        .chunk()
        .await
        .map_err(|e| Refusal::Failed(Error::Protocol(format!("bucket read: {e}"))))?
    {
        if (out.len() + part.len()) as u64 > max {
            return Err(Refusal::TooBig(max));
        }
        out.extend_from_slice(&part);
    }
    Ok(out)
}

/// Reads the newest seed record from the repositories and the index it
/// points at (bounded by the record's signed length, checked by its hash).
async fn load(
    http: &reqwest::Client,
    repos: &RepositoryClient,
    publisher: &AgentId,
    share: &ShareId,
    key: &Key,
) -> Result<Option<Loaded>> {
    let rec = match repos.seed(publisher, share).await {
        Ok(Some((rec, _))) => rec,
        Ok(None) => return Ok(None),
        Err(e) => {
            tracing::debug!(error = %e, "no repository answered for a seed record");
            return Ok(None);
        }
    };
    let url = rec.open_url(key)?;
    let bytes = get_bounded(http, &url, rec.index_len.min(MAX_SEED_INDEX))
        .await
        .map_err(Refusal::into_error)?;
    let index = SeedIndex::from_bytes(&bytes, &rec)?;
    Ok(Some(from_index(&rec, index)))
}

fn from_index(rec: &SeedRecord, index: SeedIndex) -> Loaded {
    Loaded {
        seq: rec.seq,
        manifest_seq: rec.manifest_seq,
        manifest: index.manifest,
        urls: index.urls.into_iter().collect(),
    }
}
