//! Publishing: walk a path in the user's storage, cut and seal every file,
//! sign the manifest, remember the share, and hand out tickets.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::chunk::{self, ChunkKeyer, ChunkRef};
use crate::crypto::{Key, TAG_LEN};
use crate::error::{Context, Error, Result};
use crate::identity::AgentId;
use crate::manifest::{Access, Entry, EntryKind, Manifest, ShareId, Ticket};
use crate::node::agent::Agent;
use crate::node::live::{LiveEnd, LiveListing, LiveShare};
use crate::node::share::{HeldShare, Role};
use crate::node::walk::{Listing, Skipped};
use crate::pool::FreeList;
use crate::util::unix_now;
use crate::wire::channel::Body;

/// How much of a file is read from storage at a time (at least two of the
/// largest chunks, so every block yields a chunk; small enough that the
/// blocks of the files chunked at once (`tuning::publish_files`) stay well inside the
/// publisher's memory budget).
const READ_BLOCK: u64 = 8 << 20;

/// What to publish.
#[derive(Debug, Clone, Default, serde::Deserialize, Serialize)]
pub struct PublishRequest {
    /// Path in the agent's storage: a directory or a single file.
    pub path: String,
    /// Who may fetch it.
    #[serde(default)]
    pub access: Access,
    /// Publish a new version of this share instead of a new share.
    #[serde(default)]
    pub share_id: Option<ShareId>,
    /// Use a fresh share key for this version (after revoking someone).
    /// A version that removes a named recipient or trusts fewer hops gets
    /// one anyway.
    #[serde(default)]
    pub rotate_key: bool,
    /// Seed this version offline from the agent's own bucket (presigned
    /// URLs, see `node/seed.rs`); a version published without it stops
    /// the share's offline seeding.
    #[serde(default)]
    pub offline_seeding: bool,
    /// Validity of each presigned URL (seconds; default 7 days).
    #[serde(default)]
    pub url_validity_secs: Option<u64>,
    /// A new version of `share_id` may come from another folder than the
    /// last one (every recipient's copy becomes what is there): without
    /// it such a version is refused, as a mistyped path would wipe them.
    #[serde(default)]
    pub new_path: bool,
}

impl PublishRequest {
    /// The request with each recipient named once (`--to B --to B` gave
    /// B two tickets), in the order given.
    pub fn without_repeats(mut self) -> PublishRequest {
        let mut seen = std::collections::HashSet::new();
        self.access.agents.retain(|a| seen.insert(*a));
        self
    }
}

/// What publishing produced.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Published {
    /// The share id (text form).
    pub share_id: String,
    /// The version.
    pub seq: u64,
    /// Files in the share.
    pub files: u64,
    /// Bytes in the share.
    pub bytes: u64,
    /// Chunks in the share.
    pub chunks: u64,
    /// One ticket per named recipient: (agent id, ticket).
    pub tickets: Vec<(String, String)>,
    /// Time spent.
    pub seconds: f64,
    /// What offline seeding staged and presigned, when asked for.
    #[serde(default)]
    pub seed: Option<crate::node::seed::SeedReport>,
    /// What the walk left out of the share (FIFOs, sockets, links leading
    /// outside, names that are not UTF-8…), and why.
    #[serde(default)]
    pub skipped: Skipped,
    /// Recipients the previous version named and this one does not (`--to`
    /// lists every recipient of the version; these get nothing newer
    /// unless the version's trust depth reaches them).
    #[serde(default)]
    pub removed: Vec<String>,
    /// Whether this version has a fresh share key (asked for, after a
    /// revocation, or because it removed someone).
    #[serde(default)]
    pub key_rotated: bool,
}

/// What a publish hands out before its pass: enough for recipients to start
/// fetching while it runs.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PublishStarted {
    /// The share id (text form).
    pub share_id: String,
    /// The version being published.
    pub seq: u64,
    /// One ticket per named recipient: (agent id, ticket).
    pub tickets: Vec<(String, String)>,
}

/// Bytes hashed so far, for a progress bar.
#[derive(Debug, Default)]
pub struct PublishProgress {
    /// Plaintext bytes processed.
    pub bytes: AtomicU64,
}

/// Whether a publish of `path` can be the next version of a share whose
/// last version was listed under `root` (a folder, or a file's folder):
/// the same folder; or, when the last version was one file (`one_file`),
/// a file in that folder (a single-file share's next file).
fn same_source(root: &str, path: &str, one_file: bool) -> bool {
    let folder = crate::node::state::as_folder(path.trim_end_matches('/'));
    let parent = match path.trim_end_matches('/').rsplit_once('/') {
        Some((dir, _)) => format!("{dir}/"),
        None => String::new(),
    };
    root == folder || (one_file && root == parent)
}

/// The refusal of a publish while version `running` of share `id` is
/// being published.
fn running_pass(running: u64, id: &ShareId) -> Error {
    Error::Rejected(format!(
        "version {running} of share {id} is being published (or resumed after a restart); \
         publish again when that pass ends"
    ))
}

/// The version a publish makes, fixed before its pass (so it can be
/// recorded, and resumed by a restarted daemon: `publish_intent`).
#[derive(Clone)]
pub(crate) struct NewVersion {
    /// The share.
    pub(crate) share_id: ShareId,
    /// The version number.
    pub(crate) seq: u64,
    /// The share key of this version.
    pub(crate) key: Key,
    /// The checked path in the agent's storage ([`crate::node::state::user_path`]).
    pub(crate) path: String,
    /// Named recipients of the previous version this one drops.
    pub(crate) removed: Vec<AgentId>,
    /// Whether `key` is fresh for this version (not the previous one's).
    pub(crate) key_rotated: bool,
}

impl Agent {
    /// Publishes `req.path` (a new share or a new version of one).
    pub async fn publish(
        &self,
        req: PublishRequest,
        progress: Option<Arc<PublishProgress>>,
    ) -> Result<Published> {
        self.publish_with(req, progress, None).await
    }

    /// Publishes, telling `started` the share id and tickets as soon as they
    /// exist (before the pass): recipients may fetch while it runs.
    pub async fn publish_with(
        &self,
        req: PublishRequest,
        progress: Option<Arc<PublishProgress>>,
        started_tx: Option<tokio::sync::oneshot::Sender<PublishStarted>>,
    ) -> Result<Published> {
        let req = req.without_repeats();
        if req.offline_seeding {
            self.check_presigns().await?;
        }
        let v = self.new_version(&req)?;
        let live = self.go_live(&req, &v)?;
        self.publish_version(&req, &v, live, progress, started_tx)
            .await
    }

    /// Checks a request and picks the version it makes: a new share (id
    /// and key), or the next version of one we publish (its key, or a
    /// fresh one when asked or after a revocation).
    pub(crate) fn new_version(&self, req: &PublishRequest) -> Result<NewVersion> {
        let path = crate::node::state::user_path(&self.opts.state_prefix, &req.path)?;
        let (share_id, seq, key, removed, key_rotated) = match req.share_id {
            Some(id) => {
                // Said early (a first version being resumed is not a
                // share yet); `go_live` checks it again under the lock.
                if let Some(running) = self.pass_running(&id) {
                    return Err(running_pass(running, &id));
                }
                let old = self
                    .share(&id)
                    .filter(|s| s.role == Role::Published)
                    .ok_or_else(|| {
                        Error::NotFound(format!("share {id} is not published by this agent"))
                    })?;
                let one_file = old.manifest.entries.len() == 1 && old.manifest.files().count() == 1;
                if !req.new_path && !same_source(&old.root, &path, one_file) {
                    return Err(Error::Rejected(format!(
                        "share {id} was published from {:?}; this version would publish \
                         {path:?} instead, and every recipient's copy would become that (files \
                         not there removed): if that is what you want, add --new-path",
                        if old.root.is_empty() {
                            "/"
                        } else {
                            old.root.as_str()
                        }
                    )));
                }
                // A trust-depth share rotates its key by itself when a
                // revocation was issued or learned since the last version:
                // whoever was pruned must not read the next one with the key
                // it already holds.
                let pruned_since = old.manifest.access.trust_depth.is_some()
                    && self
                        .trust()
                        .is_some_and(|w| w.last_revocation() >= old.manifest.created_at);
                // Whoever this version takes away still holds the key of
                // the last one: with it, whatever of the new version it got
                // hold of (an offline-seeding URL, a copy) would open.
                let (removed, fewer_hops) = old.manifest.access.narrowed_by(&req.access);
                let rotate = req.rotate_key || pruned_since || fewer_hops || !removed.is_empty();
                let key = if rotate {
                    Key::random()?
                } else {
                    old.key.clone()
                };
                (id, old.seq() + 1, key, removed, rotate)
            }
            None => (ShareId::random()?, 1, Key::random()?, Vec::new(), false),
        };
        for a in &req.access.agents {
            if *a == self.id {
                return Err(Error::Rejected(
                    "a share's recipients cannot include its publisher".into(),
                ));
            }
        }
        Ok(NewVersion {
            share_id,
            seq,
            key,
            path,
            removed,
            key_rotated,
        })
    }

    /// Makes version `v` live: from here on, recipients holding a ticket
    /// may ask what is sealed so far, and fetch it while the pass goes on.
    /// Refused while another pass of the share runs (a resumed one
    /// included): two passes of one version would sign two different
    /// manifests, a fork every recipient refuses. The check and the
    /// insertion are one step under the live map's lock, so two publishes
    /// racing for one share cannot both start.
    pub(crate) fn go_live(&self, req: &PublishRequest, v: &NewVersion) -> Result<Arc<LiveShare>> {
        let live = Arc::new(LiveShare::new(
            v.share_id,
            v.seq,
            self.id,
            req.access.clone(),
            crate::manifest::key_check(&v.key),
        ));
        self.set_live_unless_running(live.clone())
            .map_err(|running| running_pass(running, &v.share_id))?;
        Ok(live)
    }

    /// Runs the pass of version `v` (made live by [`Agent::go_live`]):
    /// tickets, walk, cut and seal, sign, install, offline seeding.
    pub(crate) async fn publish_version(
        &self,
        req: &PublishRequest,
        v: &NewVersion,
        live: Arc<LiveShare>,
        progress: Option<Arc<PublishProgress>>,
        started_tx: Option<tokio::sync::oneshot::Sender<PublishStarted>>,
    ) -> Result<Published> {
        let started = Instant::now();
        let (share_id, seq) = (v.share_id, v.seq);
        let tickets: Result<Vec<(String, String)>> = req
            .access
            .agents
            .iter()
            .map(|r| Ok((r.to_string(), self.ticket_for(share_id, *r, &v.key)?)))
            .collect();
        let tickets = match tickets {
            Ok(t) => t,
            Err(e) => {
                live.end(LiveEnd::Failed(e.to_string()));
                self.linger(live, false);
                return Err(e);
            }
        };
        // A recipient is expected to follow the pass only when its ticket
        // is out before the pass (a streamed publish: `publish --json`, the
        // demo): then the first sealed blocks are kept for it, the pass
        // waiting for it at most `ROOM_WAIT`. A publish that hands out
        // tickets at its end (plain `publish`, declared shares, whose
        // subscribers poll) tells nobody now, and must not wait.
        if let Some(tx) = started_tx {
            let told = tx
                .send(PublishStarted {
                    share_id: share_id.to_string(),
                    seq,
                    tickets: tickets.clone(),
                })
                .is_ok();
            if told && !req.access.agents.is_empty() {
                live.expect_follower();
                self.sealed.expect_take();
            }
        }
        let pass = self
            .publish_pass(req, &v.path, share_id, seq, &v.key, &live, progress)
            .await;
        let end = match &pass {
            Ok(_) => LiveEnd::Done,
            Err(e) => LiveEnd::Failed(e.to_string()),
        };
        live.end(end);
        self.linger(live, pass.is_ok());
        let (files_n, bytes, chunks, skipped) = pass?;
        let seed = if req.offline_seeding {
            let validity = req
                .url_validity_secs
                .unwrap_or(crate::node::seed::DEFAULT_URL_VALIDITY_SECS);
            Some(self.seed_share(&share_id, validity).await?)
        } else {
            if self.seed_policy(&share_id).await.is_some() {
                self.stop_seeding(&share_id).await?;
            }
            None
        };
        tracing::info!(share = %share_id, seq, files = files_n, bytes, chunks, skipped = skipped.total, "published");
        Ok(Published {
            share_id: share_id.to_string(),
            seq,
            files: files_n,
            bytes,
            chunks,
            tickets,
            seconds: started.elapsed().as_secs_f64(),
            seed,
            skipped,
            removed: v.removed.iter().map(|a| a.to_string()).collect(),
            key_rotated: v.key_rotated,
        })
    }

    /// Walks, cuts and seals, signs and installs the manifest; reports
    /// every step into `live`. Returns (files, bytes, chunks, what the
    /// walk left out).
    #[allow(clippy::too_many_arguments)]
    async fn publish_pass(
        &self,
        req: &PublishRequest,
        path: &str,
        share_id: ShareId,
        seq: u64,
        key: &Key,
        live: &Arc<LiveShare>,
        progress: Option<Arc<PublishProgress>>,
    ) -> Result<(u64, u64, u64, Skipped)> {
        let Listing {
            root,
            files,
            dirs,
            skipped,
            etags,
        } = self.walk(path).await?;
        tracing::info!(share = %share_id, seq, files = files.len(), folders = dirs.len(),
            bytes = files.iter().map(|f| f.1).sum::<u64>(), "listed; the publish pass begins");
        let listing = Arc::new(LiveListing { files, dirs });
        live.set_listing(&root, listing.clone());
        let keyer = ChunkKeyer::new(key);
        let progress = progress.unwrap_or_default();
        let block = listing
            .files
            .iter()
            .map(|f| f.1)
            .max()
            .unwrap_or(0)
            .min(READ_BLOCK);
        let at_once = crate::node::tuning::publish_files(self.opts.fs_root.is_some(), block);
        let blocks = PassBlocks(BlockPool::new(
            block as usize,
            2 * at_once + 2,
            crate::node::tuning::sealed_cache_bytes()
                / (block as usize).max(crate::node::live::CACHE_CHUNK_BYTES),
        ));
        let blocks_ref = &blocks.0;
        // Each file's chunk list as its blocks are sealed (by index: a
        // stream of borrowed items is not `Send` for every lifetime the
        // spawned publish needs); paths join them at the end.
        let lists: Vec<Vec<ChunkRef>> = futures::stream::iter(0..listing.files.len())
            .map(|i| {
                let (rel, size, _) = &listing.files[i];
                let keyer = keyer.clone();
                let progress = progress.clone();
                let full = format!("{root}{rel}");
                let etag = etags.get(rel).cloned();
                let size = *size;
                async move {
                    let out = FileOut {
                        live,
                        index: i,
                        blocks: blocks_ref,
                    };
                    self.chunk_file(&full, (size, etag), &keyer, &progress, &out)
                        .await
                }
            })
            .buffered(at_once)
            .try_collect()
            .await?;
        // Every chunk is sealed: the read blocks go now, not once the
        // manifest is installed, and so do the chunks kept for a recipient
        // that is not taking them now. It is the pass's peak: a publish
        // whose recipient fetches afterwards held 32 MiB of blocks beside
        // the manifest, its record and its index. A recipient coming later
        // reads them from storage as from any finished share.
        drop(blocks);
        if !live.keep_sealed(&self.sealed) {
            self.sealed.clear_share(&share_id);
        }
        // The paths move into the entries when the live share let go of
        // the listing (nobody was given it), else they are copied.
        let unread = live.let_go();
        let LiveListing { files, dirs } =
            Arc::try_unwrap(listing).unwrap_or_else(|shared| (*shared).clone());
        let mut entries = Vec::with_capacity(files.len() + dirs.len());
        entries.extend(
            files
                .into_iter()
                .zip(lists)
                .map(|((path, size, mode), chunks)| Entry {
                    path,
                    mode,
                    kind: EntryKind::File { size, chunks },
                }),
        );
        entries.extend(dirs.into_iter().map(|(path, mode)| Entry {
            path,
            mode,
            kind: EntryKind::Dir,
        }));
        entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        let manifest = Manifest {
            share_id,
            seq,
            created_at: unix_now(),
            access: req.access.clone(),
            entries,
        };
        manifest.validate()?;
        let files_n = manifest.files().count() as u64;
        let bytes = manifest.total_bytes();
        let chunks = manifest.total_chunks();
        // The index takes the tags from the log, which (nobody following)
        // then goes before the record is made: the three never live at once.
        let held = HeldShare::new(
            self.id,
            key.clone(),
            Role::Published,
            root,
            manifest,
            bytes::Bytes::new(),
        );
        let held = Arc::new(match &unread {
            Some(u) => held.with_tags(|id| u.tag(id)),
            None => held.with_tags(|id| live.tag(id)),
        });
        drop(unread);
        // A recipient following the pass is served through the share from
        // now on; the live share's listing goes before the record comes.
        live.hand_over(&held);
        // The tags go to storage before the record is made: their
        // encoding (12 MB for 250,000 chunks) is never held beside it.
        crate::node::share::save_tags(&self.op, &self.opts.state_prefix, &held).await?;
        held.set_record(held.manifest.seal(&self.key, key)?.into_bytes().into())?;
        self.install_share_with(held, crate::node::share::TagsFile::Written)
            .await?;
        Ok((files_n, bytes, chunks, skipped))
    }

    /// A ticket for one more recipient of a share we publish.
    pub fn ticket(&self, share_id: ShareId, recipient: AgentId) -> Result<String> {
        let s = self
            .share(&share_id)
            .filter(|s| s.role == Role::Published)
            .ok_or_else(|| {
                Error::NotFound(format!("share {share_id} is not published by this agent"))
            })?;
        if !s.manifest.access.names(&recipient) && s.manifest.access.trust_depth.is_none() {
            // A ticket the recipient could never use ("unknown share" on fetch):
            // refuse, and say how to add the recipient instead.
            return Err(Error::Rejected(format!(
                "agent {recipient} is not a recipient of share {share_id}: publish a new \
                 version that adds it (`caravan-agent publish PATH --share {share_id} --to \
                 {recipient}` plus the current recipients), then ask for its ticket"
            )));
        }
        if !s.manifest.access.names(&recipient) && s.manifest.access.trust_depth.is_some() {
            return Ticket::issue_keyless(
                &self.key,
                share_id,
                recipient,
                self.opts.advertise.clone(),
                self.opts.repositories.clone(),
            );
        }
        self.ticket_for(share_id, recipient, &s.key)
    }

    fn ticket_for(&self, share_id: ShareId, recipient: AgentId, key: &Key) -> Result<String> {
        Ticket::issue(
            &self.key,
            share_id,
            recipient,
            key,
            self.opts.advertise.clone(),
            self.opts.repositories.clone(),
        )
    }

    /// Cuts and seals one file as a two-stage pipeline: while the chunks
    /// of one block are hashed and encrypted (in place: the block is
    /// discarded afterwards), the next block is read and cut. Each block
    /// starts at the end of the last complete chunk: a local file's is read
    /// from there (nothing copied to join blocks); remote storage is read
    /// as one stream per file (`store::Sequential`), so the bytes past the
    /// last cut are carried into the next block (on average half a chunk
    /// per 8 MiB block).
    async fn chunk_file(
        &self,
        path: &str,
        (size, etag): (u64, Option<String>),
        keyer: &ChunkKeyer,
        progress: &PublishProgress,
        out: &FileOut<'_>,
    ) -> Result<Vec<ChunkRef>> {
        let mut refs = Vec::new();
        let mut pos = 0u64;
        let mut sealing: Option<Sealing> = None;
        let mut remote = crate::store::Sequential::new(&self.op, path, 0, size)
            .whole_object()
            .pinned(etag);
        let mut carried: Option<Vec<u8>> = None;
        // A local file is opened once: every block comes from the same
        // file, even if another takes its name meanwhile (an editor's or a
        // download's save by rename), instead of a mix of both.
        let mut local: Option<Arc<std::fs::File>> = None;
        while pos < size {
            let end = (pos + READ_BLOCK).min(size);
            let eof = end == size;
            let pieces = match &self.opts.fs_root {
                // A local file is read straight into the block buffer (no
                // zero-filled buffer, no copy out of OpenDAL's buffers), and
                // cut in the same blocking task.
                Some(root) => {
                    let full = root.join(path);
                    let want = (end - pos) as usize;
                    let shown = path.to_string();
                    let buf = out.blocks.get();
                    let file = local.clone();
                    let (block, cuts, file) = tokio::task::spawn_blocking(move || {
                        let file = match file {
                            Some(f) => f,
                            None => {
                                // Not waited on: a FIFO swapped in since
                                // the listing held the pass for ever.
                                let f = match crate::util::open_regular(&full) {
                                    Err(e)
                                        if matches!(
                                            e.kind(),
                                            std::io::ErrorKind::NotFound
                                                | std::io::ErrorKind::InvalidInput
                                        ) =>
                                    {
                                        return Err(changed_size(&shown));
                                    }
                                    r => r.context(|| format!("opening {shown}"))?,
                                };
                                // The file now at this name must be the
                                // one listed: another saved over it by
                                // rename since then would be read for its
                                // listed size only, its start published
                                // as the whole (longer) file.
                                let now = f.metadata().context(|| format!("stat {shown}"))?;
                                if now.len() != size {
                                    return Err(changed_size(&shown));
                                }
                                Arc::new(f)
                            }
                        };
                        let block = read_block(&file, pos, want, buf)
                            .context(|| format!("reading {shown}"))?;
                        if block.len() != want {
                            return Err(changed_size(&shown));
                        }
                        let cuts = chunk::cut_lengths(&block, eof);
                        Ok((block, cuts, file))
                    })
                    .await
                    .map_err(|e| Error::Protocol(format!("chunking task: {e}")))??;
                    local = Some(file);
                    (block, cuts)
                }
                None => {
                    let mut block = carried.take().unwrap_or_else(|| out.blocks.get());
                    let want = (end - pos) as usize;
                    let more = want.saturating_sub(block.len());
                    match remote.read_into(&mut block, more).await {
                        // Saved over since the listing (`Sequential::pinned`),
                        // or removed.
                        Err(e)
                            if matches!(
                                e.kind(),
                                opendal::ErrorKind::ConditionNotMatch
                                    | opendal::ErrorKind::NotFound
                            ) =>
                        {
                            return Err(changed_size(path));
                        }
                        r => r.context(|| format!("reading {path}"))?,
                    };
                    if block.len() != want {
                        return Err(changed_size(path));
                    }
                    tokio::task::spawn_blocking(move || {
                        let cuts = chunk::cut_lengths(&block, eof);
                        (block, cuts)
                    })
                    .await
                    .map_err(|e| Error::Protocol(format!("chunking task: {e}")))?
                }
            };
            let consumed: u64 = pieces.1.iter().map(|n| *n as u64).sum();
            if consumed == 0 {
                return Err(Error::Protocol(format!(
                    "no chunk boundary found in {path}"
                )));
            }
            pos += consumed;
            progress.bytes.fetch_add(consumed, Ordering::Relaxed);
            if let Some(h) = sealing.take() {
                append(&mut refs, self.sealed_block(join(h).await?, out).await);
            }
            if self.opts.fs_root.is_none() && pos < size {
                // The bytes past the last cut start the next block (the
                // stream does not go back).
                let mut next = out.blocks.get();
                next.extend_from_slice(pieces.0.get(consumed as usize..).unwrap_or_default());
                carried = Some(next);
            }
            sealing = Some(seal(keyer.clone(), out.blocks.clone(), pieces));
        }
        // Checked before the last block is listed: a recipient following
        // the pass places the file once all its chunks are listed.
        // An object saved over by a longer one since the listing: its
        // start is not the file.
        if self.opts.fs_root.is_none() && size > 0 {
            match remote.ends_here().await {
                Ok(true) => {}
                Ok(false) => return Err(changed_size(path)),
                Err(e) if e.kind() == opendal::ErrorKind::NotFound => {
                    return Err(changed_size(path));
                }
                Err(e) => return Err(e).context(|| format!("reading {path}")),
            }
        }
        // A local file that grew while its pass read it (a log being
        // written): its published start is not the file either. One that
        // shrank was caught by a short read.
        if let Some(f) = &local {
            let now = f.metadata().map(|m| m.len()).unwrap_or(size);
            if now != size {
                return Err(changed_size(path));
            }
        }
        if let Some(h) = sealing.take() {
            append(&mut refs, self.sealed_block(join(h).await?, out).await);
        }
        Ok(refs)
    }

    /// Keeps a block's sealed chunks in the cache when a recipient follows
    /// the pass (waiting a little for room while it does), then lists them
    /// live.
    async fn sealed_block(&self, block: Vec<Sealed>, out: &FileOut<'_>) -> Vec<ChunkRef> {
        let tagged: Vec<(ChunkRef, [u8; TAG_LEN])> =
            block.iter().map(|(r, tag, _)| (*r, *tag)).collect();
        let keep = out.live.keep_sealed(&self.sealed);
        out.blocks.for_cache(keep);
        if keep {
            let bytes: usize = block.iter().map(|(_, _, ct)| ct.len()).sum();
            self.sealed.wait_for_room(bytes, block.len()).await;
            for (r, _, ct) in block {
                self.sealed.insert(out.live.id, r.id, ct);
            }
        }
        out.live.add_chunks(out.index, &tagged);
        // A new, exactly sized list: collected from `tagged`, it reused that
        // buffer, sized for a tag per reference too (18 MiB instead of 13
        // for 250,000 one-chunk files).
        let mut refs = Vec::with_capacity(tagged.len());
        refs.extend(tagged.iter().map(|(r, _)| *r));
        if let Some(gate) = crate::node::tuning::fault_publish_gate() {
            while !gate.exists() {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        refs
    }
}

/// Adds a block's chunk references to a file's: the first block's list is
/// taken as it is (exactly sized), since a growing `Vec` starts at room for
/// four, and most files of a big tree are one chunk: 100,000 of them held
/// 28 MB of references instead of 7.
fn append(refs: &mut Vec<ChunkRef>, block: Vec<ChunkRef>) {
    if refs.is_empty() {
        *refs = block;
    } else {
        refs.extend(block);
    }
}

/// A file whose size is not its listing's when its pass reads it (it was
/// being written, saved over by rename, or removed): the publish fails,
/// naming it, rather than publish bytes it no longer has or a mix of two
/// files. (Recipients may follow the pass from the listing, so the file
/// cannot be left out or re-sized at this point.)
fn changed_size(path: &str) -> Error {
    Error::Rejected(format!(
        "{path} changed size or was replaced or removed while being published (was it still \
         being written?): publish again once it is complete"
    ))
}

/// Reads shorter than this look for holes no more: a small file is one
/// read, not three more system calls.
const HOLES_FROM: usize = 1 << 20;

/// Reads `len` bytes of the open local file `f` at `offset` into `buf`
/// (an empty block; fewer bytes when the file is shorter: the caller
/// checks).
///
/// The holes of a sparse file are not read: the buffer is zeroed there
/// (`SEEK_DATA` / `SEEK_HOLE` find them), instead of the kernel zeroing
/// page-cache pages for them and copying those out, which was most of the
/// cost of publishing a disk image. A filesystem that cannot tell is read
/// as before; so is a read under [`HOLES_FROM`], and a file that has as
/// many blocks as bytes.
fn read_block(
    mut f: &std::fs::File,
    offset: u64,
    len: usize,
    mut buf: Vec<u8>,
) -> std::io::Result<Vec<u8>> {
    use rustix::fs::{SeekFrom as Whence, seek};
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::MetadataExt;
    // Only a file with fewer blocks than bytes can have holes: others are
    // read at once (no hole search, which some filesystems answer slowly).
    let meta = match len < HOLES_FROM {
        true => None,
        false => Some(f.metadata()?).filter(|m| m.blocks().saturating_mul(512) < m.len()),
    };
    let Some(meta) = meta else {
        f.seek(SeekFrom::Start(offset))?;
        f.take(len as u64).read_to_end(&mut buf)?;
        return Ok(buf);
    };
    // Nothing past the end (a file that shrank comes back short: the
    // caller checks the length).
    let end = (offset + len as u64).min(meta.len());
    let mut at = offset;
    while at < end {
        let data = match seek(f, Whence::Data(at)) {
            Ok(d) => d.min(end),
            // No data from here on: a hole to the end of the file.
            Err(rustix::io::Errno::NXIO) => end,
            Err(_) => break,
        };
        if data > at {
            buf.resize(buf.len() + (data - at) as usize, 0);
            at = data;
            continue;
        }
        let Ok(hole) = seek(f, Whence::Hole(at)) else {
            break;
        };
        let stop = hole.min(end);
        if stop <= at {
            break;
        }
        f.seek(SeekFrom::Start(at))?;
        at += (&mut f).take(stop - at).read_to_end(&mut buf)? as u64;
        if at < stop {
            return Ok(buf);
        }
    }
    if at < end {
        f.seek(SeekFrom::Start(at))?;
        f.take(end - at).read_to_end(&mut buf)?;
    }
    Ok(buf)
}

/// Where the sealed chunks of one file go besides the manifest, and the
/// pass's blocks it reads into.
struct FileOut<'a> {
    live: &'a Arc<LiveShare>,
    index: usize,
    blocks: &'a Arc<BlockPool>,
}

/// The read blocks of one publish pass, reused: a fresh 8 MiB allocation is
/// fresh pages, each faulted in and zeroed as the read fills it (11% of an
/// S3 publisher's CPU in `perf`, with a copy out of OpenDAL's buffers). A
/// sealed block lives on in the sealed cache (its chunks are slices of it)
/// and comes back when its last chunk is served or evicted. Bound: at most
/// `keep` free blocks, no more than were alive at once anyway (two per file
/// read at once, and the cache's worth); none once the pass has ended.
struct BlockPool {
    free: FreeList<Vec<u8>>,
    /// The size every block is allocated with (the largest a read asks).
    capacity: usize,
    /// Free blocks kept for the reads alone, and for the cache besides.
    reads: usize,
    cache: usize,
    /// Whether blocks are kept for the cache too.
    caching: std::sync::atomic::AtomicBool,
}

impl BlockPool {
    fn new(capacity: usize, reads: usize, cache: usize) -> Arc<BlockPool> {
        Arc::new(BlockPool {
            free: FreeList::new(reads + cache),
            capacity,
            reads,
            cache,
            caching: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// Sizes the pool for a pass whose sealed chunks go to the cache
    /// (`on`) or not. Off, the cache's worth of free blocks goes at once:
    /// a pass whose recipient never came kept the 32 MiB of blocks the
    /// cache had given back to the end of the pass.
    fn for_cache(&self, on: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.caching.swap(on, Relaxed) == on {
            return;
        }
        if on {
            self.free.set_keep(self.reads + self.cache);
        } else {
            self.free.set_keep(self.reads);
            self.free.clear();
        }
    }

    /// An empty block with room for `capacity` bytes.
    fn get(&self) -> Vec<u8> {
        self.free
            .take()
            .unwrap_or_else(|| Vec::with_capacity(self.capacity))
    }

    fn put(&self, mut block: Vec<u8>) {
        if block.capacity() != self.capacity {
            return;
        }
        block.clear();
        self.free.give(block);
    }
}

/// Closes a pass's pool when the pass ends, however it ends: blocks coming
/// back later (from the sealed cache) are freed.
struct PassBlocks(Arc<BlockPool>);

impl Drop for PassBlocks {
    fn drop(&mut self) {
        self.0.free.close();
    }
}

/// A sealed block as the owner of the bytes its chunks are slices of:
/// dropping the last slice gives it back to the pool.
struct PooledBlock {
    block: Vec<u8>,
    pool: Arc<BlockPool>,
}

impl AsRef<[u8]> for PooledBlock {
    fn as_ref(&self) -> &[u8] {
        &self.block
    }
}

impl Drop for PooledBlock {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.block));
    }
}

/// A chunk sealed by the pass: its reference, its AEAD tag, and its
/// ciphertext with that tag (for the cache recipients are served from).
type Sealed = (ChunkRef, [u8; TAG_LEN], Body);

type Sealing = tokio::task::JoinHandle<Result<Vec<Sealed>>>;

/// Hashes and encrypts the chunks of a block, in place (the block was read
/// for this alone), one chunk after the other on one blocking thread: the
/// pass already overlaps cutting, sealing and other files' blocks, and a
/// thread pool inside each block (rayon, before) only added idle workers
/// spinning in `sched_yield`, 4–5% of a publisher's CPU while it serves.
/// The cache the recipients are served from keeps each sealed chunk as a
/// slice of the block and its tag: no copy (the block is freed when its
/// last chunk is served or evicted).
fn seal(
    keyer: ChunkKeyer,
    pool: Arc<BlockPool>,
    (mut block, cuts): (Vec<u8>, Vec<usize>),
) -> Sealing {
    tokio::task::spawn_blocking(move || {
        let mut pieces = Vec::with_capacity(cuts.len());
        let mut rest = &mut block[..];
        for n in &cuts {
            let (piece, tail) = rest.split_at_mut(*n);
            pieces.push(piece);
            rest = tail;
        }
        let sealed = pieces
            .into_iter()
            .map(|p| keyer.seal_in_place(p))
            .collect::<Result<Vec<_>>>()?;
        let block = bytes::Bytes::from_owner(PooledBlock { block, pool });
        let mut off = 0;
        Ok(sealed
            .into_iter()
            .zip(cuts)
            .map(|((r, tag), n)| {
                let body = Body::Sealed(block.slice(off..off + n), tag);
                off += n;
                (r, tag, body)
            })
            .collect())
    })
}

async fn join(h: Sealing) -> Result<Vec<Sealed>> {
    h.await
        .map_err(|e| Error::Protocol(format!("sealing task: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;

    /// The next version of a share comes from the same folder as the last
    /// (or, for a single file, a file in that folder), unless said.
    #[test]
    fn a_next_version_comes_from_the_same_folder() {
        assert!(same_source("photos/", "photos", false));
        assert!(same_source("photos/", "photos/", false));
        assert!(same_source("", "", false));
        assert!(same_source("photos/", "photos/c.txt", true));
        assert!(same_source("", "c.txt", true));
        assert!(!same_source("photos/", "photos/sub", false));
        assert!(!same_source("photos/", "docs", false));
        assert!(!same_source("photos/", "docs", true));
        assert!(!same_source("", "docs", false));
        assert!(!same_source("a/photos/", "b/photos", false));
    }

    /// Blocks of a sparse file read the same bytes as a plain read, holes
    /// and all, wherever they start and end.
    #[test]
    fn a_sparse_file_reads_the_same_with_its_holes_skipped() {
        use std::io::{Seek, SeekFrom, Write};
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("sparse");
        let mut f = std::fs::File::create(&path).unwrap();
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8 + 1).collect();
        f.write_all(&data).unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        f.write_all(&data[..4096]).unwrap();
        f.set_len(8 << 20).unwrap();
        drop(f);
        let dense = tmp.path().join("dense");
        std::fs::write(&dense, &data).unwrap();
        for p in [&path, &dense] {
            let whole = std::fs::read(p).unwrap();
            let n = whole.len() as u64;
            for (offset, len) in [
                (0, 8 << 20),
                (0, 100),
                (4000, 2 << 20),
                (1 << 20, 1 << 20),
                ((3 << 20) - 10, 100),
                ((3 << 20) + 4000, 8 << 20),
                (n - 3, 10),
                (n, 10),
                (n + 5, 10),
            ] {
                let f = std::fs::File::open(p).unwrap();
                let got = read_block(&f, offset, len, Vec::new()).unwrap();
                let from = offset.min(n) as usize;
                let to = (offset + len as u64).min(n) as usize;
                assert_eq!(
                    got,
                    &whole[from..to],
                    "{} at {offset} for {len}",
                    p.display()
                );
            }
        }
    }

    /// Only a publish whose caller gets the tickets before the pass
    /// expects a recipient to follow it (and so may wait for one, at most
    /// `ROOM_WAIT`, when its sealed cache fills); one that hands them out
    /// at its end told nobody, and never waits.
    #[tokio::test]
    async fn only_a_publish_that_hands_out_tickets_first_expects_a_follower() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("docs")).unwrap();
        std::fs::write(tmp.path().join("docs/a.txt"), b"hello").unwrap();
        let op = crate::store::open_local(tmp.path()).unwrap();
        let agent = Agent::for_test(op, Some(tmp.path().to_path_buf())).await;
        let bob = SecretKey::generate().unwrap().agent_id();
        let req = |share_id| PublishRequest {
            path: "docs".into(),
            access: Access {
                agents: vec![bob],
                trust_depth: None,
            },
            share_id,
            ..Default::default()
        };
        let first = agent.publish(req(None), None).await.unwrap();
        assert!(agent.sealed.last_take().is_none(), "nobody was told");
        let id: ShareId = first.share_id.parse().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        agent
            .publish_with(req(Some(id)), None, Some(tx))
            .await
            .unwrap();
        assert_eq!(rx.await.unwrap().tickets.len(), 1);
        assert!(agent.sealed.last_take().is_some(), "bob was told first");
    }
}
