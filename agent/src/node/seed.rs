//! Offline seeding, the publisher's side: stage each sealed chunk of a share
//! once in the agent's own bucket (under the state prefix, named by chunk id
//! only), presign a GET URL per chunk, write the share's seed index (the
//! signed manifest record and the URLs) beside them, and publish a signed
//! [`SeedRecord`] pointing at the index to the repositories. Recipients then
//! fetch straight from the bucket while this agent sleeps or is gone
//! (`node/fetch/seed.rs`). Presigning is local computation: a refresh moves
//! no data, it rewrites the index and the record before the URLs expire.
//!
//! Staged chunks are shared by every share and version that references
//! them (content addressed), and deleted by [`Agent::gc_seed`] once no
//! offline-seeded share's current version references them.

use std::collections::HashSet;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::chunk::{self, ChunkId, ChunkRef};
use crate::error::{Context, Error, Result};
use crate::manifest::ShareId;
use crate::node::agent::Agent;
use crate::node::share::{HeldShare, Role};
use crate::node::state;
use crate::record::SignedRecord;
use crate::repository::client::RepositoryClient;
use crate::trust::seed::MAX_SEED_VALIDITY_SECS;
use crate::trust::{SeedIndex, SeedRecord};
use crate::util::{hex, parse_hex32, unix_millis, unix_now};

/// Shortest URL validity accepted (a refresh must have time to happen).
pub const MIN_URL_VALIDITY_SECS: u64 = 60;
/// Longest URL validity accepted: what S3 SigV4 presigning allows.
pub const MAX_URL_VALIDITY_SECS: u64 = 7 * 24 * 3600;
/// Default URL validity.
pub const DEFAULT_URL_VALIDITY_SECS: u64 = 7 * 24 * 3600;
/// Chunks staged (read, sealed, written) at once.
const STAGE_CONCURRENCY: usize = 8;

/// How one share is seeded offline, kept under `seed/shares/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeedPolicy {
    /// How long each presigned URL is valid.
    pub validity_secs: u64,
    /// The manifest version last staged.
    pub manifest_seq: u64,
    /// Expiry of the URLs of the last record.
    pub expires_at: u64,
    /// Version of the last seed record (forward only).
    pub seq: u64,
    /// The last signed seed record, hex (republished when a repository lost it).
    pub record: String,
}

/// What staging and presigning did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SeedReport {
    /// Chunks written to the bucket now.
    pub staged: u64,
    /// Chunks already there (dedup across versions and shares).
    pub reused: u64,
    /// Presigned chunk URLs in the index.
    pub urls: u64,
    /// When the URLs expire (unix seconds).
    pub expires_at: u64,
    /// Version of the seed record.
    pub seq: u64,
    /// Repositories that hold the seed record.
    pub repositories: Vec<String>,
}

/// Parses a duration such as `90s`, `30m`, `12h`, `7d`, `1w` (plain
/// seconds too), as every duration of the command line takes.
pub fn parse_validity(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86400),
        Some((i, 'w')) => (&s[..i], 7 * 86400),
        _ => (s, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 90s, 30m, 12h, 7d, 1w)"))?;
    let secs = n.saturating_mul(mult);
    if !(MIN_URL_VALIDITY_SECS..=MAX_URL_VALIDITY_SECS).contains(&secs) {
        return Err(format!(
            "URL validity must be between {MIN_URL_VALIDITY_SECS} s and 7 days, not {secs} s"
        ));
    }
    Ok(secs)
}

impl Agent {
    /// Starts (or renews) offline seeding of a share this agent publishes:
    /// stages its chunks, presigns URLs valid for `validity_secs` and
    /// publishes the seed record. Then collects staged chunks nobody needs.
    pub async fn seed_share(&self, id: &ShareId, validity_secs: u64) -> Result<SeedReport> {
        // The CLI asks for at least a minute; seconds are allowed here so
        // tests can watch URLs expire.
        if validity_secs == 0 || validity_secs > MAX_URL_VALIDITY_SECS {
            return Err(Error::Rejected(
                "URL validity must be between 1 s and 7 days".into(),
            ));
        }
        // Presigning is local: a probe says before any data moves whether
        // this storage can sign URLs with its current credentials.
        self.presign(
            &state::seed_index(&self.opts.state_prefix, id),
            Duration::from_secs(validity_secs),
        )
        .await?;
        if self.seed_repositories().is_empty() {
            return Err(Error::Config(
                "offline seeding needs at least one repository: recipients find the seed record \
                 there while this agent sleeps"
                    .into(),
            ));
        }
        let s = self
            .share(id)
            .filter(|s| s.role == Role::Published)
            .ok_or_else(|| Error::NotFound(format!("share {id} is not published by this agent")))?;
        let previous = self.seed_policy(id).await;
        if previous.is_none() {
            // Claimed before staging, so a collection run by another
            // share's publish meanwhile keeps this share's chunks.
            self.save_seed_policy(
                id,
                &SeedPolicy {
                    validity_secs,
                    manifest_seq: s.seq(),
                    expires_at: 0,
                    seq: 0,
                    record: String::new(),
                },
            )
            .await?;
        }
        let (staged, reused) = self.stage_chunks(&s).await?;
        let mut report = self
            .presign_seed(&s, validity_secs, previous.as_ref().map(|p| p.seq))
            .await?;
        report.staged = staged;
        report.reused = reused;
        if let Err(e) = self.gc_seed().await {
            tracing::warn!(error = %e, "could not collect unreferenced staged chunks");
        }
        tracing::info!(share = %id, staged, reused, urls = report.urls, expires_at = report.expires_at, "offline seed published");
        Ok(report)
    }

    /// Stops seeding a share offline: its policy and index go, its chunks
    /// are collected unless another seeded share uses them. URLs already
    /// handed out die with the index (chunk URLs at the next collection).
    pub async fn stop_seeding(&self, id: &ShareId) -> Result<()> {
        let prefix = &self.opts.state_prefix;
        for path in [
            state::seed_share_file(prefix, id),
            state::seed_index(prefix, id),
        ] {
            self.op
                .delete(&path)
                .await
                .context(|| format!("removing {path}"))?;
        }
        self.gc_seed().await.map(|_| ())
    }

    /// The seeding policy of a share, if it is seeded offline.
    pub async fn seed_policy(&self, id: &ShareId) -> Option<SeedPolicy> {
        let path = state::seed_share_file(&self.opts.state_prefix, id);
        let bytes = self.op.read(&path).await.ok()?.to_vec();
        serde_json::from_slice(&bytes).ok()
    }

    /// Re-presigns every offline-seeded share whose URLs are past half of
    /// their validity or whose share has a newer version (restaging it).
    /// The daemon calls this periodically; returns how many were renewed.
    pub async fn refresh_seeds(&self) -> Result<usize> {
        let dir = state::seed_shares_dir(&self.opts.state_prefix);
        let policies = state::read_each(&self.op, &dir, ".json", "seed policy", |b| {
            serde_json::from_slice::<SeedPolicy>(b)
        })
        .await?;
        let now = unix_now();
        let mut renewed = 0;
        for (path, p) in policies {
            let Some(id) = path
                .rsplit('/')
                .next()
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(parse_hex32)
                .map(ShareId)
            else {
                continue;
            };
            let Some(s) = self.share(&id).filter(|s| s.role == Role::Published) else {
                // The share was forgotten: so is its seed.
                self.stop_seeding(&id).await?;
                continue;
            };
            let due = now.saturating_add(p.validity_secs / 2) >= p.expires_at;
            if due || s.seq() != p.manifest_seq {
                self.seed_share(&id, p.validity_secs).await?;
                renewed += 1;
            }
        }
        self.note_next_refresh().await?;
        Ok(renewed)
    }

    /// Tells the activity report when the next URL refresh is due (half
    /// way through the soonest-expiring seed), so an operator that scales
    /// this agent to zero wakes it in time.
    async fn note_next_refresh(&self) -> Result<()> {
        let dir = state::seed_shares_dir(&self.opts.state_prefix);
        let policies = state::read_each(&self.op, &dir, ".json", "seed policy", |b| {
            serde_json::from_slice::<SeedPolicy>(b)
        })
        .await?;
        let next = policies
            .iter()
            .filter(|(_, p)| p.expires_at > 0)
            .map(|(_, p)| p.expires_at.saturating_sub(p.validity_secs / 2))
            .min();
        self.activity.set_next_url_refresh(next);
        Ok(())
    }

    /// Deletes staged chunks that no offline-seeded share's current version
    /// references, and indexes of shares no longer seeded. Returns how many
    /// objects were deleted. A recipient still fetching an older version
    /// from the bucket then gets its missing chunks from live peers (or
    /// reads the newer seed record when it refreshes).
    pub async fn gc_seed(&self) -> Result<u64> {
        let prefix = &self.opts.state_prefix;
        let dir = state::seed_shares_dir(prefix);
        let seeded: HashSet<String> = crate::store::list_or_empty(&self.op, &dir)
            .await?
            .into_iter()
            .filter_map(|e| e.name().strip_suffix(".json").map(str::to_string))
            .collect();
        let mut keep: HashSet<[u8; 32]> = HashSet::new();
        for s in self.held_shares() {
            if s.role == Role::Published && seeded.contains(&s.id.hex()) {
                for (_, _, chunks) in s.manifest.files() {
                    keep.extend(chunks.iter().map(|c| c.id.0));
                }
            }
        }
        let mut deleted = 0;
        for e in crate::store::list_or_empty(&self.op, &state::seed_chunks_dir(prefix)).await? {
            let Some(id) = parse_hex32(e.name()) else {
                continue;
            };
            if !keep.contains(&id) {
                self.op
                    .delete(e.path())
                    .await
                    .context(|| format!("removing {}", e.path()))?;
                deleted += 1;
            }
        }
        for e in crate::store::list_or_empty(&self.op, &state::seed_index_dir(prefix)).await? {
            if !e.name().is_empty() && !e.path().ends_with('/') && !seeded.contains(e.name()) {
                self.op
                    .delete(e.path())
                    .await
                    .context(|| format!("removing {}", e.path()))?;
                deleted += 1;
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, "collected unreferenced offline seed objects");
        }
        Ok(deleted)
    }

    /// Repository URLs the seed record goes to: the agent's own.
    fn seed_repositories(&self) -> Vec<String> {
        self.opts.repositories.clone()
    }

    /// Writes every chunk of `s` not yet staged: read, sealed, verified
    /// against its id (a file changed since publishing is refused, never
    /// staged under an id it does not hash to). Returns (staged, reused).
    async fn stage_chunks(&self, s: &HeldShare) -> Result<(u64, u64)> {
        let prefix = &self.opts.state_prefix;
        let present: HashSet<[u8; 32]> =
            crate::store::list_or_empty(&self.op, &state::seed_chunks_dir(prefix))
                .await?
                .into_iter()
                .filter_map(|e| parse_hex32(e.name()))
                .collect();
        let mut todo: Vec<(String, u64, ChunkRef)> = Vec::new();
        let mut seen = HashSet::new();
        let mut reused = 0;
        for (path, _, chunks) in s.manifest.files() {
            let mut off = 0u64;
            for c in chunks {
                if seen.insert(c.id.0) {
                    if present.contains(&c.id.0) {
                        reused += 1;
                    } else {
                        todo.push((format!("{}{path}", s.root), off, *c));
                    }
                }
                off += c.len as u64;
            }
        }
        let staged = todo.len() as u64;
        futures::stream::iter(todo)
            .map(|(path, off, c)| async move {
                let mut plain = Vec::with_capacity(c.len as usize + crate::crypto::TAG_LEN);
                crate::store::read_into(&self.op, &path, off..off + c.len as u64, &mut plain)
                    .await
                    .context(|| format!("reading {path} to stage chunk {}", c.id))?;
                let ct = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
                    let ct = chunk::encrypt(&c, plain)?;
                    if blake3::hash(&ct).as_bytes() != &c.id.0 {
                        return Err(Error::Rejected(format!(
                            "{path} changed since it was published: publish a new version"
                        )));
                    }
                    Ok(ct)
                })
                .await
                .map_err(|e| Error::Protocol(format!("sealing task: {e}")))??;
                let obj = state::seed_chunk(prefix, &c.id.0);
                self.op
                    .write(&obj, ct)
                    .await
                    .context(|| format!("staging {obj}"))?;
                Ok::<_, Error>(())
            })
            .buffer_unordered(STAGE_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        Ok((staged, reused))
    }

    /// Presigns every chunk URL and the index URL, writes the index, signs
    /// and publishes the seed record, and saves the policy.
    async fn presign_seed(
        &self,
        s: &HeldShare,
        validity_secs: u64,
        last_seq: Option<u64>,
    ) -> Result<SeedReport> {
        let prefix = &self.opts.state_prefix;
        let validity = Duration::from_secs(validity_secs);
        let mut ids: Vec<ChunkId> = Vec::new();
        let mut seen = HashSet::new();
        for (_, _, chunks) in s.manifest.files() {
            ids.extend(chunks.iter().filter(|c| seen.insert(c.id.0)).map(|c| c.id));
        }
        // The expiry is taken before presigning, so it is never later than
        // the URLs' own.
        let expires_at = unix_now() + validity_secs.min(MAX_SEED_VALIDITY_SECS);
        let urls: Vec<([u8; 32], String)> = futures::stream::iter(ids)
            .map(|id| async move {
                let url = self
                    .presign(&state::seed_chunk(prefix, &id.0), validity)
                    .await?;
                Ok::<_, Error>((id.0, url))
            })
            .buffered(64)
            .try_collect()
            .await?;
        let index = SeedIndex {
            share_id: s.id,
            manifest_seq: s.seq(),
            manifest: s.record(&self.op, prefix).await?.to_vec(),
            urls,
        };
        let bytes = index.to_bytes()?;
        let index_path = state::seed_index(prefix, &s.id);
        let mut rec = SeedRecord {
            publisher: self.id,
            share_id: s.id,
            seq: unix_millis().max(last_seq.unwrap_or(0) + 1),
            manifest_seq: s.seq(),
            expires_at,
            index_hash: *blake3::hash(&bytes).as_bytes(),
            index_len: bytes.len() as u64,
            nonce: [0; crate::crypto::NONCE_LEN],
            sealed_url: Vec::new(),
        };
        let n_urls = index.urls.len() as u64;
        self.op
            .write(&index_path, bytes)
            .await
            .context(|| format!("writing {index_path}"))?;
        let index_url = self.presign(&index_path, validity).await?;
        rec.seal_url(&s.key, &index_url)?;
        let signed = SignedRecord::seal(&self.key, &rec)?;
        let repos = RepositoryClient::new(&self.seed_repositories())?;
        let report = repos.publish(&signed).await?;
        let policy = SeedPolicy {
            validity_secs,
            manifest_seq: s.seq(),
            expires_at,
            seq: rec.seq,
            record: hex(&signed.to_bytes()),
        };
        self.save_seed_policy(&s.id, &policy).await?;
        Ok(SeedReport {
            staged: 0,
            reused: 0,
            urls: n_urls,
            expires_at,
            seq: rec.seq,
            repositories: report.accepted,
        })
    }

    async fn save_seed_policy(&self, id: &ShareId, policy: &SeedPolicy) -> Result<()> {
        let path = state::seed_share_file(&self.opts.state_prefix, id);
        let json = serde_json::to_vec(policy).map_err(|e| Error::Config(e.to_string()))?;
        self.op
            .write(&path, json)
            .await
            .context(|| format!("saving {path}"))?;
        Ok(())
    }

    /// Whether this storage gives presigned URLs with its credentials: a
    /// trial signature (local, no request), asked before a publish with
    /// offline seeding starts, so one that cannot is refused with nothing
    /// published (it was said after the pass, the version published).
    pub(crate) async fn check_presigns(&self) -> Result<()> {
        self.presign(
            &format!("{}seed/can-presign", self.opts.state_prefix),
            Duration::from_secs(60),
        )
        .await
        .map(|_| ())
    }

    /// A GET URL for `path` that a stranger can use until `validity` ends,
    /// or a configuration error that says why this storage cannot give one.
    async fn presign(&self, path: &str, validity: Duration) -> Result<String> {
        let scheme = self.op.info().scheme();
        if scheme == "azblob" {
            let signer = self
                .opts
                .azblob_signer
                .as_ref()
                .ok_or_else(|| Error::Config(crate::store::sas::AZBLOB_NEEDS_KEY.into()))?;
            return signer.presign_read(path, validity);
        }
        if !self.op.info().capability().presign_read {
            return Err(Error::Config(format!(
                "offline seeding needs storage that presigns URLs (s3, gcs, azblob); {scheme} cannot"
            )));
        }
        let url = match self.op.presign_read(path, validity).await {
            Ok(req) => req.uri().to_string(),
            Err(e) if scheme == "gcs" => {
                return Err(Error::Config(format!("{GCS_NEEDS_SERVICE_ACCOUNT} ({e})")));
            }
            Err(e) => return Err(e).context(|| format!("presigning {path}")),
        };
        check_signed(scheme, &url)?;
        Ok(url)
    }
}

/// What gcs storage needs for offline seeding.
const GCS_NEEDS_SERVICE_ACCOUNT: &str = "offline seeding on gcs needs a service-account key \
     (`credential` or `credential_path` in the storage credentials): GCS signed URLs (V4) are \
     signed with its private key. An access token, VM metadata credentials or `skip_signature` \
     cannot sign them";

/// Refuses a "presigned" URL that carries no signature: OpenDAL returns the
/// bare object URL when signing is skipped (gcs and s3 `skip_signature`,
/// s3 `allow_anonymous`). Such a URL works only on a public bucket and
/// never expires, so it must not be published as if it did.
fn check_signed(scheme: &str, url: &str) -> Result<()> {
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    let has = |name: &str| query.split('&').any(|kv| kv.starts_with(name));
    let signed = match scheme {
        "s3" => has("X-Amz-Signature="),
        "gcs" => has("X-Goog-Signature="),
        _ => !query.is_empty(),
    };
    if signed {
        return Ok(());
    }
    Err(Error::Config(match scheme {
        "gcs" => format!(
            "{GCS_NEEDS_SERVICE_ACCOUNT}; with the current credentials the URL would be unsigned"
        ),
        _ => format!(
            "offline seeding needs signed URLs, but {scheme} storage with its current credentials \
             (anonymous or `skip_signature`) gives unsigned ones: configure its access keys"
        ),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsigned_urls_are_refused_with_the_reason() {
        check_signed("s3", "http://h/b/k?X-Amz-Date=1&X-Amz-Signature=ab").unwrap();
        check_signed("gcs", "http://h/b/k?X-Goog-Signature=ab&X-Goog-Date=1").unwrap();
        let e = check_signed("gcs", "http://h/b/k").unwrap_err().to_string();
        assert!(
            e.contains("service-account") && e.contains("unsigned"),
            "{e}"
        );
        let e = check_signed("s3", "http://h/b/k").unwrap_err().to_string();
        assert!(e.contains("unsigned"), "{e}");
    }

    #[test]
    fn validity_parses_units_and_bounds() {
        assert_eq!(parse_validity("7d").unwrap(), 7 * 86400);
        assert_eq!(parse_validity("1w").unwrap(), 7 * 86400);
        assert_eq!(parse_validity("90s").unwrap(), 90);
        assert_eq!(parse_validity("30m").unwrap(), 1800);
        assert_eq!(parse_validity("3600").unwrap(), 3600);
        assert!(parse_validity("8d").is_err());
        assert!(parse_validity("10s").is_err());
        assert!(parse_validity("soon").is_err());
    }
}
