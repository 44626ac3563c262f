//! Shares an agent holds — published by it or fetched by it — and how they
//! are remembered in the agent's state prefix so a restarted agent serves
//! and resumes exactly as before.

use std::collections::HashMap;

use opendal::Operator;
use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkId, ChunkRef};
use crate::crypto::Key;
use crate::error::{Context, Error, Result};
use crate::identity::{AgentId, SecretKey, wrap_key};
use crate::manifest::{Manifest, ManifestRecord, ShareId};
use crate::node::state;
use crate::record::SignedRecord;

/// Why this agent holds a share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// We publish it: we sign its manifests and hold its key.
    Published,
    /// We fetched it and serve it on to other authorized agents.
    Fetched,
}

/// Where one chunk's plaintext lives in our storage.
#[derive(Debug, Clone)]
pub struct ChunkLocation {
    /// Storage path of the file.
    pub path: String,
    /// Byte offset in the file.
    pub offset: u64,
    /// What the chunk is.
    pub chunk: ChunkRef,
}

/// One share held, at its newest version.
#[derive(Debug)]
pub struct HeldShare {
    /// The share.
    pub id: ShareId,
    /// Who signs its manifests.
    pub publisher: AgentId,
    /// The share key (of this version).
    pub key: Key,
    /// Published or fetched.
    pub role: Role,
    /// Storage directory the manifest's paths are relative to (`""` or ends in `/`).
    pub root: String,
    /// The decrypted manifest.
    pub manifest: Manifest,
    /// The signed manifest record as received or produced.
    pub record: Vec<u8>,
    index: HashMap<ChunkId, ChunkLocation>,
}

impl HeldShare {
    /// Builds the chunk index of a manifest.
    pub fn new(
        publisher: AgentId,
        key: Key,
        role: Role,
        root: String,
        manifest: Manifest,
        record: Vec<u8>,
    ) -> Self {
        let mut index = HashMap::new();
        for (path, _, chunks) in manifest.files() {
            let mut offset = 0u64;
            for c in chunks {
                index.entry(c.id).or_insert_with(|| ChunkLocation {
                    path: format!("{root}{path}"),
                    offset,
                    chunk: *c,
                });
                offset += c.len as u64;
            }
        }
        HeldShare {
            id: manifest.share_id,
            publisher,
            key,
            role,
            root,
            manifest,
            record,
            index,
        }
    }

    /// Where a chunk of this share is stored, if it is one of ours.
    pub fn locate(&self, id: &ChunkId) -> Option<&ChunkLocation> {
        self.index.get(id)
    }

    /// The current version.
    pub fn seq(&self) -> u64 {
        self.manifest.seq
    }
}

/// What is written to `<state>/shares/<id>/share.json`.
#[derive(Debug, Serialize, Deserialize)]
struct ShareState {
    share_id: String,
    publisher: String,
    role: Role,
    root: String,
    /// The share key wrapped for ourselves, so state at rest holds no clear key.
    wrapped_key: String,
}

/// Persists a held share (manifest record + metadata).
pub async fn save(op: &Operator, prefix: &str, me: &SecretKey, s: &HeldShare) -> Result<()> {
    let dir = state::share_dir(prefix, &s.id);
    let meta = ShareState {
        share_id: s.id.to_string(),
        publisher: s.publisher.to_string(),
        role: s.role,
        root: s.root.clone(),
        wrapped_key: data_encoding::BASE64.encode(&wrap_key(&me.agent_id(), &s.key)?),
    };
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| Error::Config(e.to_string()))?;
    op.write(&format!("{dir}manifest"), s.record.clone())
        .await
        .context(|| format!("saving manifest of {}", s.id))?;
    op.write(&format!("{dir}share.json"), json)
        .await
        .context(|| format!("saving state of {}", s.id))?;
    Ok(())
}

/// Loads every held share from the state prefix. A damaged entry is
/// reported and skipped, never fatal: one bad file must not stop an agent.
pub async fn load_all(op: &Operator, prefix: &str, me: &SecretKey) -> Result<Vec<HeldShare>> {
    let dirs = state::sub_dirs(op, &state::shares_dir(prefix)).await?;
    let mut out = Vec::new();
    for p in dirs {
        match load_one(op, &p, me).await {
            Ok(s) => out.push(s),
            Err(err) => tracing::warn!(path = %p, error = %err, "skipping unreadable share state"),
        }
    }
    Ok(out)
}

async fn load_one(op: &Operator, dir: &str, me: &SecretKey) -> Result<HeldShare> {
    let meta = op
        .read(&format!("{dir}share.json"))
        .await
        .context(|| format!("reading {dir}share.json"))?;
    let meta: ShareState = serde_json::from_slice(&meta.to_vec())
        .map_err(|e| Error::Config(format!("{dir}share.json: {e}")))?;
    let publisher: AgentId = meta.publisher.parse()?;
    let wrapped = data_encoding::BASE64
        .decode(meta.wrapped_key.as_bytes())
        .map_err(|e| Error::parse("wrapped key", e))?;
    let key = me.unwrap_key(&wrapped)?;
    let record = op
        .read(&format!("{dir}manifest"))
        .await
        .context(|| format!("reading {dir}manifest"))?
        .to_vec();
    let (_, mr): (_, ManifestRecord) = SignedRecord::open_from(&record, Some(&publisher))?;
    let manifest = mr.open(&key)?;
    Ok(HeldShare::new(
        publisher, key, meta.role, meta.root, manifest, record,
    ))
}
