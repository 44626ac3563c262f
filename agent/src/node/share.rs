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
use crate::node::record_hold::RecordHold;
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

/// As the command line says it ("published", "fetched": the JSON's words).
impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Published => "published",
            Role::Fetched => "fetched",
        })
    }
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

/// Where one chunk of a held share is, in the manifest's terms: the
/// first 8 bytes of its id (the index is searched by them), its file (an
/// index into the entries), its place in that file's chunk list, its
/// offset, and its tag when known. The whole id, paths and chunk
/// references stay in the manifest alone: an index of [`ChunkLocation`]s
/// held a path and a chunk reference per chunk again (250,000 files of
/// 4 KiB: about 100 MiB), and one keyed by the whole id 80 bytes a chunk
/// (21 MB); this is 40.
#[derive(Debug, Clone, Copy)]
struct Spot {
    prefix: u64,
    entry: u32,
    /// The place in the file's chunk list; [`TAGGED`] set when `tag` is known.
    chunk: u32,
    offset: u64,
    tag: [u8; TAG_LEN],
}

/// The bit of [`Spot::chunk`] that says its tag is known (a file has at
/// most 2^22 chunks: `MAX_MANIFEST_CHUNKS`).
const TAGGED: u32 = 1 << 31;

impl Spot {
    fn place(&self) -> (u32, u32) {
        (self.entry, self.chunk & !TAGGED)
    }

    fn tag(&self) -> Option<[u8; TAG_LEN]> {
        (self.chunk & TAGGED != 0).then_some(self.tag)
    }
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
    /// copied, by whatever saves or serves it, and a large one let go of
    /// once saved ([`RecordHold`]). Set once: a publish pass
    /// builds the share (manifest and index) before it signs, so its live
    /// share can locate chunks through it while the record is made
    /// ([`crate::node::live::LiveShare::hand_over`]).
    record: RecordHold,
    /// Each distinct chunk id once (its first place in the manifest),
    /// sorted by id: found by binary search on the prefix, the whole id
    /// read from the manifest.
    index: Vec<Spot>,
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
                if chunk & TAGGED != 0 {
                    break;
                }
                index.push(Spot {
                    prefix: c.id.prefix(),
                    entry,
                    chunk,
                    offset,
                    tag: [0; TAG_LEN],
                });
                offset += c.len as u64;
            }
        }
        // The first place of a chunk in manifest order wins: places are
        // unique, so sorting by (id, place) and keeping the first of each
        // id is that. The whole id is read only when prefixes are equal.
        let id_at = |s: &Spot| chunk_at(&manifest, s.place()).map(|c| c.id);
        index.sort_unstable_by(|a, b| {
            a.prefix
                .cmp(&b.prefix)
                .then_with(|| id_at(a).cmp(&id_at(b)))
                .then(a.place().cmp(&b.place()))
        });
        index.dedup_by(|later, first| later.prefix == first.prefix && id_at(later) == id_at(first));
        index.shrink_to_fit();
        HeldShare {
            id: manifest.share_id,
            publisher,
            key,
            role,
            root,
            manifest,
            record: RecordHold::new(record.into()),
            index,
        }
    }

    /// The signed manifest record (empty until [`HeldShare::set_record`]
    /// for a share built before it was signed), read back from the share's
    /// state under `prefix` in `op` when it is not kept in memory.
    pub async fn record(&self, op: &Operator, prefix: &str) -> Result<bytes::Bytes> {
        self.record.get(op, &record_path(prefix, &self.id)).await
    }

    /// Whether the share has its signed record.
    pub fn has_record(&self) -> bool {
        self.record.is_set()
    }

    /// Whether `record` is exactly this share's signed record.
    pub fn record_is(&self, record: &[u8]) -> bool {
        self.record.is(record)
    }

    /// Sets the signed record of a share built without one; refused when
    /// it has one.
    pub fn set_record(&self, record: bytes::Bytes) -> Result<()> {
        if self.record.set(record) {
            Ok(())
        } else {
            Err(Error::Protocol(format!(
                "share {} already has its record",
                self.id
            )))
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
        let manifest = &self.manifest;
        for spot in self.index.iter_mut() {
            if let Some(c) = chunk_at(manifest, spot.place())
                && let Some(t) = tag_of(&c.id)
            {
                spot.tag = t;
                spot.chunk |= TAGGED;
            }
        }
        self
    }

    /// The tags known, by chunk id.
    pub fn tags(&self) -> impl Iterator<Item = (&ChunkId, [u8; TAG_LEN])> {
        self.index.iter().filter_map(|s| {
            let tag = s.tag()?;
            chunk_at(&self.manifest, s.place()).map(|c| (&c.id, tag))
        })
    }

    /// The tag of a chunk of this share, when known.
    pub fn tag(&self, id: &ChunkId) -> Option<[u8; TAG_LEN]> {
        self.spot(id).and_then(|(s, _)| s.tag())
    }

    /// How many distinct chunks the share has.
    pub fn distinct_chunks(&self) -> usize {
        self.index.len()
    }

    /// The spot of a chunk and its reference in the manifest.
    fn spot(&self, id: &ChunkId) -> Option<(&Spot, &ChunkRef)> {
        let p = id.prefix();
        let first = self.index.partition_point(|s| s.prefix < p);
        self.index[first..]
            .iter()
            .take_while(|s| s.prefix == p)
            .find_map(|s| {
                chunk_at(&self.manifest, s.place())
                    .filter(|c| c.id == *id)
                    .map(|c| (s, c))
            })
    }

    /// Where a chunk of this share is stored, if it is one of ours.
    pub fn locate(&self, id: &ChunkId) -> Option<ChunkLocation> {
        let (spot, chunk) = self.spot(id)?;
        let e = self.manifest.entries.get(spot.entry as usize)?;
        let EntryKind::File { size, .. } = &e.kind else {
            return None;
        };
        Some(ChunkLocation {
            path: format!("{}{}", self.root, e.path),
            offset: spot.offset,
            file_len: *size,
            chunk: *chunk,
            tag: spot.tag(),
        })
    }

    /// The current version.
    pub fn seq(&self) -> u64 {
        self.manifest.seq
    }
}

/// The chunk at (entry, place in its file's list) of a manifest.
fn chunk_at(m: &Manifest, (entry, chunk): (u32, u32)) -> Option<&ChunkRef> {
    match &m.entries.get(entry as usize)?.kind {
        EntryKind::File { chunks, .. } => chunks.get(chunk as usize),
        EntryKind::Dir => None,
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

/// Whether [`save`] writes the share's tags file too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagsFile {
    /// Write it (with the record).
    Write,
    /// Already written by [`save_tags`] (a publish pass, before it signed:
    /// the tags of 250,000 chunks are 12 MB encoded, the record 25).
    Written,
}

/// Persists a held share (manifest record + metadata, and its tags file
/// unless `tags` says it is written).
pub async fn save(
    op: &Operator,
    prefix: &str,
    me: &SecretKey,
    s: &HeldShare,
    tags: TagsFile,
) -> Result<()> {
    let dir = state::share_dir(prefix, &s.id);
    let meta = ShareState {
        share_id: s.id.to_string(),
        publisher: s.publisher.to_string(),
        role: s.role,
        root: s.root.clone(),
        wrapped_key: data_encoding::BASE64.encode(&wrap_key(&me.agent_id(), &s.key)?),
    };
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| Error::Config(e.to_string()))?;
    let record = s.record.in_memory().ok_or_else(|| {
        Error::Protocol(format!(
            "share {} has no signed record in memory to save",
            s.id
        ))
    })?;
    op.write(&record_path(prefix, &s.id), record)
        .await
        .context(|| format!("saving manifest of {}", s.id))?;
    if tags == TagsFile::Write {
        save_tags(op, prefix, s).await?;
    }
    op.write(&format!("{dir}share.json"), json)
        .await
        .context(|| format!("saving state of {}", s.id))?;
    s.record.saved();
    Ok(())
}

/// `<share dir>manifest`: the share's signed manifest record.
fn record_path(prefix: &str, id: &ShareId) -> String {
    format!("{}{RECORD_FILE}", state::share_dir(prefix, id))
}

/// The name of a share's signed manifest record in its state folder.
const RECORD_FILE: &str = "manifest";

/// Writes the share's tags file (or removes an earlier version's when
/// it has none). Written before its manifest is safe: a tag is kept by
/// chunk id, never stale, and the tags of chunks not in the share held
/// are never asked for ([`HeldShare::with_tags`]); a file with more
/// records than that share's chunks is ignored at load.
pub async fn save_tags(op: &Operator, prefix: &str, s: &HeldShare) -> Result<()> {
    let tags = encode_tags(s);
    let tags_path = format!("{}{TAGS_FILE}", state::share_dir(prefix, &s.id));
    if !tags.is_empty() {
        op.write(&tags_path, tags)
            .await
            .context(|| format!("saving chunk tags of {}", s.id))?;
    } else if let Err(e) = op.delete(&tags_path).await {
        // An earlier version's tags would not fit this one (a share
        // emptied of its files): refused, with a warning, at each start.
        tracing::warn!(path = %tags_path, error = %e, "could not remove an earlier version's chunk tags");
    }
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

/// Loads one held share from its state, as [`load_all`] does at a start.
pub async fn load(op: &Operator, prefix: &str, me: &SecretKey, id: &ShareId) -> Result<HeldShare> {
    load_one(op, &state::share_dir(prefix, id), me).await
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
        .read(&format!("{dir}{RECORD_FILE}"))
        .await
        .context(|| format!("reading {dir}{RECORD_FILE}"))?
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
    let held = held.with_tags(|id| tags.get(id).copied());
    // Read from its state: a large record is read back from there.
    held.record.saved();
    Ok(held)
}

/// `<share dir>/tags`: the AEAD tags of a share's chunks, records of a
/// chunk id (32 bytes) and its tag (16 bytes).
const TAGS_FILE: &str = "tags";
const TAG_RECORD: usize = 32 + TAG_LEN;

fn encode_tags(s: &HeldShare) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.distinct_chunks() * TAG_RECORD);
    for (id, tag) in s.tags() {
        out.extend_from_slice(&id.0);
        out.extend_from_slice(&tag);
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

    fn r(id: [u8; 32], len: u32) -> ChunkRef {
        ChunkRef {
            id: ChunkId(id),
            key: [7; 32],
            len,
        }
    }

    fn id(first: u8, last: u8) -> [u8; 32] {
        let mut b = [first; 32];
        b[31] = last;
        b
    }

    #[test]
    fn the_index_finds_each_chunk_at_its_first_place_even_when_ids_share_a_prefix() {
        use crate::manifest::{Access, Entry};
        // `x` and `y` differ only in their last byte: the same 8-byte prefix.
        let (x, y, z) = (id(1, 1), id(1, 2), id(9, 0));
        let file = |path: &str, chunks: Vec<ChunkRef>| Entry {
            path: path.into(),
            mode: 0o644,
            kind: EntryKind::File {
                size: chunks.iter().map(|c| c.len as u64).sum(),
                chunks,
            },
        };
        let manifest = Manifest {
            share_id: ShareId::random().unwrap(),
            seq: 1,
            created_at: 0,
            access: Access::default(),
            entries: vec![
                file("a", vec![r(z, 10), r(y, 20), r(x, 30)]),
                Entry {
                    path: "b".into(),
                    mode: 0o755,
                    kind: EntryKind::Dir,
                },
                file("b/c", vec![r(x, 30), r(z, 10)]),
            ],
        };
        let held = HeldShare::new(
            AgentId([3; 32]),
            Key::random().unwrap(),
            Role::Published,
            "root/".into(),
            manifest,
            bytes::Bytes::new(),
        );
        assert_eq!(held.distinct_chunks(), 3);
        let at = |i: [u8; 32]| {
            let l = held.locate(&ChunkId(i)).unwrap();
            (l.path, l.offset, l.chunk.id, l.file_len)
        };
        assert_eq!(at(z), ("root/a".into(), 0, ChunkId(z), 60));
        assert_eq!(at(y), ("root/a".into(), 10, ChunkId(y), 60));
        assert_eq!(at(x), ("root/a".into(), 30, ChunkId(x), 60));
        assert!(
            held.locate(&ChunkId(id(1, 3))).is_none(),
            "same prefix, other id"
        );
        assert!(held.locate(&ChunkId(id(0, 0))).is_none());
        assert!(held.locate(&ChunkId(id(255, 255))).is_none());

        let held = held.with_tags(|c| (c.0 == y).then_some([5; TAG_LEN]));
        assert_eq!(held.tag(&ChunkId(y)), Some([5; TAG_LEN]));
        assert_eq!(held.tag(&ChunkId(x)), None);
        assert_eq!(held.locate(&ChunkId(y)).unwrap().tag, Some([5; TAG_LEN]));
        assert_eq!(held.locate(&ChunkId(y)).unwrap().offset, 10);
        let tags: Vec<_> = held.tags().map(|(c, t)| (*c, t)).collect();
        assert_eq!(tags, vec![(ChunkId(y), [5; TAG_LEN])]);
        let back = decode_tags(&encode_tags(&held), held.distinct_chunks()).unwrap();
        assert_eq!(back.get(&ChunkId(y)), Some(&[5; TAG_LEN]));
    }

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
