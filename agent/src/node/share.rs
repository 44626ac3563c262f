//! Shares an agent holds — published by it or fetched by it — and how they
//! are remembered in the agent's state prefix so a restarted agent serves
//! and resumes exactly as before.

use std::collections::HashMap;

use opendal::Operator;
use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkId, ChunkRef};
use crate::crypto::{Key, TAG_LEN};
use crate::error::{Context, Error, Result};
use crate::identity::{AgentId, SecretKey, wrap_key};
use crate::manifest::{EntryKind, Manifest, ManifestHead, ShareId};
use crate::node::state;

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
    /// The file's size (a stream of it reads to there).
    pub file_len: u64,
    /// What the chunk is.
    pub chunk: ChunkRef,
    /// The chunk's AEAD tag, when known (see [`HeldShare::with_tags`]).
    pub tag: Option<[u8; TAG_LEN]>,
}

/// Where one chunk of a held share is, in the manifest's terms: its file
/// (an index into the entries), its place in that file's chunk list, its
/// offset, and its tag when known. Paths and chunk references stay in the
/// manifest alone: an index of [`ChunkLocation`]s held a path and a chunk
/// reference per chunk again, about 200 bytes a chunk in a hash table
/// twice the chunks' size (250,000 files of 4 KiB: about 100 MiB).
#[derive(Debug, Clone, Copy)]
struct Spot {
    entry: u32,
    chunk: u32,
    offset: u64,
    tag: Option<[u8; TAG_LEN]>,
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
    /// The signed manifest record as received or produced; shared, not
    /// copied, by whatever saves or serves it.
    pub record: bytes::Bytes,
    /// Each distinct chunk id once (its first place in the manifest),
    /// sorted by id: 72 bytes a chunk, found by binary search.
    index: Vec<(ChunkId, Spot)>,
}

impl HeldShare {
    /// Builds the chunk index of a manifest.
    pub fn new(
        publisher: AgentId,
        key: Key,
        role: Role,
        root: String,
        manifest: Manifest,
        record: impl Into<bytes::Bytes>,
    ) -> Self {
        let mut index =
            Vec::with_capacity(usize::try_from(manifest.total_chunks()).unwrap_or_default());
        for (entry, e) in manifest.entries.iter().enumerate() {
            let EntryKind::File { chunks, .. } = &e.kind else {
                continue;
            };
            // Within the limits `Manifest::validate` enforces (2^20
            // entries, 2^22 chunks), both fit.
            let Ok(entry) = u32::try_from(entry) else {
                break;
            };
            let mut offset = 0u64;
            for (chunk, c) in chunks.iter().enumerate() {
                let Ok(chunk) = u32::try_from(chunk) else {
                    break;
                };
                index.push((
                    c.id,
                    Spot {
                        entry,
                        chunk,
                        offset,
                        tag: None,
                    },
                ));
                offset += c.len as u64;
            }
        }
        // The first place of a chunk in manifest order wins: places are
        // unique, so sorting by (id, place) and keeping the first of each
        // id is that.
        index.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0)
                .then(a.1.entry.cmp(&b.1.entry))
                .then(a.1.chunk.cmp(&b.1.chunk))
        });
        index.dedup_by(|later, first| later.0 == first.0);
        index.shrink_to_fit();
        HeldShare {
            id: manifest.share_id,
            publisher,
            key,
            role,
            root,
            manifest,
            record: record.into(),
            index,
        }
    }

    /// Records the AEAD tags of chunks (the publish pass saw each one
    /// sealed), as `tag_of` knows them. Serving a chunk then verifies it
    /// by comparing the tag of its fresh encryption with this one instead
    /// of hashing the whole ciphertext again (a fifth of a serving
    /// publisher's CPU). Sound because the chunk id is the hash of
    /// ciphertext and tag, so a tag kept by id is never stale; see
    /// docs/security.md ("Verify on serve"). Tags of chunks that are not in
    /// this share are never asked for.
    pub fn with_tags(mut self, tag_of: impl Fn(&ChunkId) -> Option<[u8; TAG_LEN]>) -> Self {
        for (id, spot) in self.index.iter_mut() {
            if let Some(t) = tag_of(id) {
                spot.tag = Some(t);
            }
        }
        self
    }

    /// The tags known, by chunk id.
    pub fn tags(&self) -> impl Iterator<Item = (&ChunkId, &[u8; TAG_LEN])> {
        self.index
            .iter()
            .filter_map(|(id, s)| s.tag.as_ref().map(|t| (id, t)))
    }

    /// The tag of a chunk of this share, when known.
    pub fn tag(&self, id: &ChunkId) -> Option<[u8; TAG_LEN]> {
        self.spot(id).and_then(|s| s.tag)
    }

    /// How many distinct chunks the share has.
    pub fn distinct_chunks(&self) -> usize {
        self.index.len()
    }

    fn spot(&self, id: &ChunkId) -> Option<&Spot> {
        let at = self.index.binary_search_by(|(k, _)| k.cmp(id)).ok()?;
        self.index.get(at).map(|(_, s)| s)
    }

    /// Where a chunk of this share is stored, if it is one of ours.
    pub fn locate(&self, id: &ChunkId) -> Option<ChunkLocation> {
        let spot = self.spot(id)?;
        let e = self.manifest.entries.get(spot.entry as usize)?;
        let EntryKind::File { size, chunks } = &e.kind else {
            return None;
        };
        Some(ChunkLocation {
            path: format!("{}{}", self.root, e.path),
            offset: spot.offset,
            file_len: *size,
            chunk: *chunks.get(spot.chunk as usize)?,
            tag: spot.tag,
        })
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
    let tags = encode_tags(s);
    let tags_path = format!("{dir}{TAGS_FILE}");
    if !tags.is_empty() {
        op.write(&tags_path, tags)
            .await
            .context(|| format!("saving chunk tags of {}", s.id))?;
    } else if let Err(e) = op.delete(&tags_path).await {
        // An earlier version's tags would not fit this one (a share
        // emptied of its files): refused, with a warning, at each start.
        tracing::warn!(path = %tags_path, error = %e, "could not remove an earlier version's chunk tags");
    }
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
    let mut record = op
        .read(&format!("{dir}manifest"))
        .await
        .context(|| format!("reading {dir}manifest"))?
        .to_vec();
    let head = ManifestHead::open(&record, Some(&publisher))?;
    let manifest = head.manifest_in(&mut record, &key)?;
    let held = HeldShare::new(
        publisher,
        key,
        meta.role,
        meta.root,
        manifest,
        bytes::Bytes::from(record),
    );
    // The tags only speed serving up: without them (an older agent's
    // state, a damaged file) every chunk served is hashed instead.
    let tags = match op.read(&format!("{dir}{TAGS_FILE}")).await {
        Ok(b) => decode_tags(&b.to_vec(), held.distinct_chunks()).unwrap_or_else(|e| {
            tracing::warn!(path = %dir, error = %e, "ignoring the chunk tags file");
            HashMap::new()
        }),
        Err(_) => HashMap::new(),
    };
    Ok(held.with_tags(|id| tags.get(id).copied()))
}

/// `<share dir>/tags`: the AEAD tags of a share's chunks, records of a
/// chunk id (32 bytes) and its tag (16 bytes).
const TAGS_FILE: &str = "tags";
const TAG_RECORD: usize = 32 + TAG_LEN;

fn encode_tags(s: &HeldShare) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.distinct_chunks() * TAG_RECORD);
    for (id, tag) in s.tags() {
        out.extend_from_slice(&id.0);
        out.extend_from_slice(tag);
    }
    out
}

/// Parses a tags file of a share of `chunks` distinct chunks: whole
/// records, no more of them than the share has chunks.
fn decode_tags(b: &[u8], chunks: usize) -> Result<HashMap<ChunkId, [u8; TAG_LEN]>> {
    if !b.len().is_multiple_of(TAG_RECORD) {
        return Err(Error::Config(format!(
            "{} bytes: not whole records of {TAG_RECORD} bytes",
            b.len()
        )));
    }
    if b.len() / TAG_RECORD > chunks {
        return Err(Error::Config(format!(
            "{} records for a share of {chunks} chunks",
            b.len() / TAG_RECORD
        )));
    }
    let mut out = HashMap::with_capacity(b.len() / TAG_RECORD);
    for r in b.chunks_exact(TAG_RECORD) {
        let (id, tag) = r.split_at(32);
        let (Ok(id), Ok(tag)) = (<[u8; 32]>::try_from(id), <[u8; TAG_LEN]>::try_from(tag)) else {
            continue;
        };
        out.insert(ChunkId(id), tag);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_files_are_whole_records_no_more_than_the_chunks() {
        let mut b = Vec::new();
        for i in 0..3u8 {
            b.extend_from_slice(&[i; 32]);
            b.extend_from_slice(&[i + 100; TAG_LEN]);
        }
        let tags = decode_tags(&b, 3).unwrap();
        assert_eq!(tags.get(&ChunkId([2; 32])), Some(&[102; TAG_LEN]));
        assert!(decode_tags(&b, 2).is_err(), "more records than chunks");
        assert!(
            decode_tags(&b[..b.len() - 1], 3).is_err(),
            "a partial record"
        );
        assert!(decode_tags(&[], 0).unwrap().is_empty());
    }
}
