//! `caravan-agent demo`: two real agents in one process, on loopback, with
//! temporary local storage. One publishes a generated folder for the other,
//! which fetches it over the authenticated peer channel; every byte is then compared with the source.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use caravan_agent::config::StorageConfig;
use caravan_agent::error::{Context, Error, Result};
use caravan_agent::identity::SecretKey;
use caravan_agent::manifest::Access;
use caravan_agent::node::agent::{Agent, AgentOptions};
use caravan_agent::node::fetch::FetchRequest;
use caravan_agent::node::fetch::progress::{FetchProgress, FetchState, ProgressSnapshot};
use caravan_agent::node::publish::PublishRequest;
use caravan_agent::{store, wire};

/// What the demo moves.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Total payload bytes.
    pub size: u64,
    /// Number of files the payload is split into.
    pub files: u64,
    /// Keep the storages in this directory instead of a temporary one.
    pub keep: Option<PathBuf>,
}

/// What the demo did (`--json` prints this).
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    /// Payload bytes moved.
    pub bytes: u64,
    /// Files moved.
    pub files: u64,
    /// Chunks in the share.
    pub chunks: u64,
    /// Seconds from the start of publishing until every file was verified in place.
    pub seconds: f64,
    /// Seconds the publish pass took (chunking, hashing, sealing); the
    /// fetch runs alongside it, from the tickets handed out before it.
    pub publish_seconds: f64,
    /// End-to-end throughput in MB/s (10^6 bytes).
    pub throughput_mb_s: f64,
    /// Every fetched byte equals the source.
    pub verified: bool,
    /// Ciphertext bytes that crossed the wire.
    pub bytes_on_wire: u64,
    /// CPU seconds (all threads, both agents) from the start of publishing
    /// until every file was in place, on Linux.
    pub cpu_seconds: Option<f64>,
    /// The publishing agent.
    pub publisher: String,
    /// The fetching agent.
    pub recipient: String,
    /// Where the storages are (only when kept).
    pub kept_in: Option<String>,
}

/// CPU time of this process (user + system) from `/proc/self/stat`, so the
/// demo can report the cost per byte and not only wall-clock time.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Fills `buf` with fast pseudo-random bytes (xorshift; not for secrets).
pub fn fill_pseudo_random(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

/// The relative path of demo file `i` of `n`.
fn demo_path(i: u64, n: u64) -> String {
    if n == 1 {
        "payload.bin".to_string()
    } else {
        format!("dir-{:02}/file-{i:05}.bin", i % 16)
    }
}

/// Writes the generated payload: `files` files totalling `size` bytes.
pub fn generate(dir: &Path, size: u64, files: u64) -> Result<()> {
    let files = files.max(1);
    let per = size / files;
    let mut buf = vec![0u8; 8 << 20];
    for i in 0..files {
        let len = if i + 1 == files {
            size - per * (files - 1)
        } else {
            per
        };
        let p = dir.join(demo_path(i, files));
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).context(|| format!("creating {}", parent.display()))?;
        }
        let mut f = std::fs::File::create(&p).context(|| format!("creating {}", p.display()))?;
        let mut left = len;
        let mut block = 0u64;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            fill_pseudo_random(&mut buf[..n], (i << 32) ^ block ^ 0x5eed);
            std::io::Write::write_all(&mut f, &buf[..n])
                .context(|| format!("writing {}", p.display()))?;
            left -= n as u64;
            block += 1;
        }
    }
    Ok(())
}

/// Compares two directory trees byte by byte (every regular file of `a` must
/// exist in `b` with identical content, and vice versa).
pub fn trees_equal(a: &Path, b: &Path) -> Result<bool> {
    let list = |root: &Path| -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).context(|| format!("listing {}", d.display()))? {
                let e = e.context(|| format!("listing {}", d.display()))?;
                let p = e.path();
                if p.is_dir() {
                    if p.file_name().is_some_and(|n| n == ".caravan") {
                        continue;
                    }
                    stack.push(p);
                } else {
                    out.push(p.strip_prefix(root).map(Path::to_path_buf).unwrap_or(p));
                }
            }
        }
        out.sort();
        Ok(out)
    };
    let la = list(a)?;
    if la != list(b)? {
        return Ok(false);
    }
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    for rel in la {
        let mut fa =
            std::fs::File::open(a.join(&rel)).context(|| format!("opening {}", rel.display()))?;
        let mut fb =
            std::fs::File::open(b.join(&rel)).context(|| format!("opening {}", rel.display()))?;
        loop {
            let na = read_full(&mut fa, &mut ba)?;
            let nb = read_full(&mut fb, &mut bb)?;
            if na != nb || ba[..na] != bb[..nb] {
                return Ok(false);
            }
            if na == 0 {
                break;
            }
        }
    }
    Ok(true)
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let r = f
            .read(&mut buf[n..])
            .context(|| "reading for comparison".into())?;
        if r == 0 {
            break;
        }
        n += r;
    }
    Ok(n)
}

/// Starts an agent on local storage at `root`, listening on loopback.
pub async fn local_agent(
    root: &Path,
    repositories: Vec<String>,
    shutdown: &CancellationToken,
) -> Result<Arc<Agent>> {
    let op = store::open_local(root)?;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context(|| "binding loopback".into())?;
    let addr = listener.local_addr().context(|| "local address".into())?;
    let agent = Agent::open(
        SecretKey::generate()?,
        op,
        AgentOptions {
            state_prefix: caravan_agent::config::DEFAULT_STATE_PREFIX.into(),
            advertise: vec![addr.to_string()],
            repositories,
            fs_root: Some(root.to_path_buf()),
            size_limit: None,
            corrupt_chunks: false,
            azblob_signer: None,
        },
    )
    .await?;
    let tls = wire::tls::server_config(agent.secret_key())?;
    tokio::spawn(wire::server::serve(
        listener,
        tls,
        agent.clone(),
        shutdown.clone(),
    ));
    Ok(agent)
}

/// Runs the demo. `on_progress` is called with the fetch's progress handle
/// as soon as the transfer starts (the CLI draws a bar from it).
pub async fn run(
    opts: DemoOptions,
    on_progress: impl FnOnce(Arc<FetchProgress>),
) -> Result<DemoReport> {
    let tmp;
    let base = match &opts.keep {
        Some(p) => {
            std::fs::create_dir_all(p).context(|| format!("creating {}", p.display()))?;
            p.clone()
        }
        None => {
            tmp = tempfile::tempdir().context(|| "creating a temporary directory".into())?;
            tmp.path().to_path_buf()
        }
    };
    let alice_root = base.join("alice");
    let bob_root = base.join("bob");
    let source = alice_root.join("share");
    std::fs::create_dir_all(&source).context(|| format!("creating {}", source.display()))?;
    std::fs::create_dir_all(&bob_root).context(|| format!("creating {}", bob_root.display()))?;
    let (size, files) = (opts.size, opts.files.max(1));
    tokio::task::spawn_blocking({
        let source = source.clone();
        move || generate(&source, size, files)
    })
    .await
    .map_err(|e| Error::Protocol(format!("generator: {e}")))??;

    let shutdown = CancellationToken::new();
    let alice = local_agent(&alice_root, vec![], &shutdown).await?;
    let bob = local_agent(&bob_root, vec![], &shutdown).await?;

    // As `publish` and `fetch` run for users: the fetch starts from the
    // tickets the publish hands out before its pass, and follows the pass
    // (live share), so end to end is not the pass plus the transfer.
    let started = Instant::now();
    let cpu0 = process_cpu_seconds();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let pass = tokio::spawn({
        let alice = alice.clone();
        let bob_id = bob.id;
        async move {
            let req = PublishRequest {
                path: "share".into(),
                access: Access {
                    agents: vec![bob_id],
                    trust_depth: None,
                },
                share_id: None,
                rotate_key: false,
                ..Default::default()
            };
            let published = alice.publish_with(req, None, Some(started_tx)).await;
            (published, started.elapsed().as_secs_f64())
        }
    });
    let outcome = async {
        let Ok(started_msg) = started_rx.await else {
            // Failed before its pass: the task has the error.
            return Ok(None);
        };
        let ticket = started_msg
            .tickets
            .first()
            .map(|(_, t)| t.clone())
            .ok_or_else(|| Error::Protocol("publishing produced no ticket".into()))?;
        let progress = bob
            .start_fetch(FetchRequest {
                ticket,
                dest: "received".into(),
                peers: vec![],
            })
            .await?;
        on_progress(progress.clone());
        finished(&progress).await.map(Some)
    }
    .await;
    let seconds = started.elapsed().as_secs_f64();
    let cpu1 = process_cpu_seconds();
    let (published, publish_seconds) = match pass.await {
        Ok(done) => done,
        Err(e) => {
            shutdown.cancel();
            return Err(Error::Protocol(format!("publish task: {e}")));
        }
    };
    shutdown.cancel();
    let published = published?;
    let Some(snap) = outcome? else {
        return Err(Error::Protocol("the publish ended before its pass".into()));
    };
    let received = bob_root.join("received");
    let verified = tokio::task::spawn_blocking(move || trees_equal(&source, &received))
        .await
        .map_err(|e| Error::Protocol(format!("verifier: {e}")))??;
    Ok(DemoReport {
        bytes: published.bytes,
        files: published.files,
        chunks: published.chunks,
        seconds,
        publish_seconds,
        throughput_mb_s: published.bytes as f64 / seconds / 1e6,
        verified,
        bytes_on_wire: snap.bytes_received,
        cpu_seconds: cpu0.zip(cpu1).map(|(a, b)| b - a),
        publisher: alice.id.to_string(),
        recipient: bob.id.to_string(),
        kept_in: opts.keep.as_ref().map(|p| p.display().to_string()),
    })
}

/// What `demo --scenario trust` did (`--json` prints this).
#[derive(Debug, Clone, Serialize)]
pub struct TrustDemoReport {
    /// Agents that lost access after the revocation (names, sorted).
    pub pruned: Vec<String>,
    /// Agents that kept access (names, sorted).
    pub kept: Vec<String>,
    /// Seconds from alice's revocation until bob's first refused chunk request.
    pub revocation_seconds: f64,
    /// Every fetched byte equals the source (both versions).
    pub verified: bool,
    /// Agent ids by name.
    pub agents: std::collections::BTreeMap<String, String>,
    /// alice's trust tree (depth 3) before the revocation.
    pub tree_before: String,
    /// alice's trust tree (depth 3) after it.
    pub tree_after: String,
    /// What each pruned agent was told (key and chunk refusals).
    pub refusals: Vec<String>,
    /// Repositories started (one is stopped after the revocation).
    pub repositories: usize,
    /// Version fetched by the agents that kept access after the revocation.
    pub second_version: u64,
    /// The version published after the revocation uses a new share key.
    pub fresh_key: bool,
}

/// Starts an in-process repository on loopback with memory storage; it
/// stops when `stop` is cancelled. Returns its base URL.
pub async fn local_repository(stop: &CancellationToken) -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context(|| "binding loopback for a repository".into())?;
    let addr = listener.local_addr().context(|| "local address".into())?;
    let op = store::open(&StorageConfig {
        scheme: "memory".into(),
        options: Default::default(),
        credentials: None,
        size_limit: None,
    })?;
    // Every demo agent shares 127.0.0.1: lift the per-IP rate limit.
    let cfg = caravan_agent::repository::RepositoryConfig {
        rate_per_second: 100_000.0,
        rate_burst: 100_000,
        ..Default::default()
    };
    tokio::spawn(caravan_agent::repository::serve_with(
        listener,
        op,
        cfg,
        stop.clone().cancelled_owned(),
    ));
    Ok(format!("http://{addr}"))
}

struct DemoAgent {
    name: &'static str,
    root: PathBuf,
    agent: Arc<Agent>,
    web: Arc<caravan_agent::node::trust::AgentTrust>,
}

/// Runs the trust-web scenario (see `caravan-agent demo --help`): two
/// repositories, five agents, grants alice→bob(2), bob→carol(1),
/// carol→dave(0), alice→erin(1), erin→dave(0); alice publishes for "trusted
/// within depth 3", everyone fetches; alice revokes alice→bob, a repository
/// stops, alice publishes the next version with a fresh key: bob and carol
/// are refused, dave (through erin) and erin still fetch.
pub async fn run_trust(keep: Option<PathBuf>) -> Result<TrustDemoReport> {
    use caravan_agent::node::trust::{AgentTrust, GrantRequest, RevokeRequest};
    let tmp;
    let base = match &keep {
        Some(p) => {
            std::fs::create_dir_all(p).context(|| format!("creating {}", p.display()))?;
            p.clone()
        }
        None => {
            tmp = tempfile::tempdir().context(|| "creating a temporary directory".into())?;
            tmp.path().to_path_buf()
        }
    };
    let shutdown = CancellationToken::new();
    let result = trust_scenario(&base, &shutdown).await;
    shutdown.cancel();
    return result;

    async fn trust_scenario(base: &Path, shutdown: &CancellationToken) -> Result<TrustDemoReport> {
        let repo_stops = [shutdown.child_token(), shutdown.child_token()];
        let mut urls = Vec::new();
        for s in &repo_stops {
            urls.push(local_repository(s).await?);
        }
        let mut agents = Vec::new();
        for name in ["alice", "bob", "carol", "dave", "erin"] {
            let root = base.join(name);
            std::fs::create_dir_all(&root).context(|| format!("creating {}", root.display()))?;
            let agent = local_agent(&root, urls.clone(), shutdown).await?;
            let web = AgentTrust::open(
                agent.secret_key(),
                agent.storage().clone(),
                agent.state_prefix(),
                &urls,
            )
            .await?;
            agent.set_trust(web.clone());
            tokio::spawn(
                agent
                    .clone()
                    .run_trust_sync(std::time::Duration::from_millis(500), shutdown.clone()),
            );
            agents.push(DemoAgent {
                name,
                root,
                agent,
                web,
            });
        }
        let [alice, bob, carol, dave, erin] = &agents[..] else {
            return Err(Error::Protocol("five agents expected".into()));
        };
        for (from, to, depth) in [
            (alice, bob, 2),
            (bob, carol, 1),
            (carol, dave, 0),
            (alice, erin, 1),
            (erin, dave, 0),
        ] {
            from.web
                .grant(&GrantRequest {
                    subject: to.agent.id,
                    depth,
                    expires_secs: Some(3600),
                    scope: None,
                })
                .await?;
        }

        let source = alice.root.join("share");
        std::fs::create_dir_all(&source).context(|| format!("creating {}", source.display()))?;
        tokio::task::spawn_blocking({
            let source = source.clone();
            move || generate(&source, 3 << 20, 6)
        })
        .await
        .map_err(|e| Error::Protocol(format!("generator: {e}")))??;
        let published = alice
            .agent
            .publish(
                PublishRequest {
                    path: "share".into(),
                    access: Access {
                        agents: vec![],
                        trust_depth: Some(3),
                    },
                    share_id: None,
                    rotate_key: false,
                    ..Default::default()
                },
                None,
            )
            .await?;
        let sid: caravan_agent::manifest::ShareId = published.share_id.parse()?;
        for who in [bob, carol, dave, erin] {
            alice.web.learn_about(&who.agent.id).await;
        }
        let tree_before = alice.web.tree(&alice.agent.id, 3);

        let mut verified = true;
        let fetch = |who: &DemoAgent| {
            let ticket = alice.agent.ticket(sid, who.agent.id);
            let agent = who.agent.clone();
            async move {
                agent
                    .fetch(FetchRequest {
                        ticket: ticket?,
                        dest: "received".into(),
                        peers: vec![],
                    })
                    .await
            }
        };
        for who in [bob, carol, dave, erin] {
            fetch(who).await?;
            verified &= same_tree(&source, &who.root.join("received")).await?;
        }

        // Revoke alice→bob and lose a repository.
        let chunk_id = alice
            .agent
            .share(&sid)
            .and_then(|s| {
                s.manifest
                    .files()
                    .next()
                    .and_then(|(_, _, c)| c.first().map(|c| c.id))
            })
            .ok_or_else(|| Error::Protocol("the share has no chunk".into()))?;
        let alice_addr = alice
            .agent
            .advertise()
            .first()
            .cloned()
            .ok_or_else(|| Error::Protocol("alice advertises no address".into()))?;
        let bob_conn = caravan_agent::wire::client::PeerConn::connect(
            &alice_addr,
            bob.agent.secret_key(),
            None,
        )
        .await?;
        let revoked_at = Instant::now();
        alice
            .web
            .revoke(&RevokeRequest {
                subject: Some(bob.agent.id),
                grant_id: None,
            })
            .await?;
        let mut revocation_seconds = None;
        for _ in 0..200 {
            if bob_conn.chunk(&sid, &chunk_id).await.is_err() {
                revocation_seconds = Some(revoked_at.elapsed().as_secs_f64());
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let revocation_seconds = revocation_seconds.ok_or_else(|| {
            Error::Protocol("bob was still served 2 s after the revocation".into())
        })?;
        repo_stops[1].cancel();
        let tree_after = alice.web.tree(&alice.agent.id, 3);

        // The next version: the revocation makes alice rotate the key by
        // herself (no --rotate-key needed).
        let key_before = alice
            .agent
            .share(&sid)
            .map(|s| caravan_agent::manifest::key_check(&s.key));
        std::fs::write(source.join("after-revocation.txt"), b"version two\n")
            .context(|| "writing the second version".into())?;
        let v2 = alice
            .agent
            .publish(
                PublishRequest {
                    path: "share".into(),
                    access: Access {
                        agents: vec![],
                        trust_depth: Some(3),
                    },
                    share_id: Some(sid),
                    rotate_key: false,
                    ..Default::default()
                },
                None,
            )
            .await?;
        let key_after = alice
            .agent
            .share(&sid)
            .map(|s| caravan_agent::manifest::key_check(&s.key));
        let fresh_key = key_before.is_some() && key_before != key_after;
        // The new key gives every chunk a new address: ask for one of v2.
        let chunk_id = alice
            .agent
            .share(&sid)
            .and_then(|s| {
                s.manifest
                    .files()
                    .next()
                    .and_then(|(_, _, c)| c.first().map(|c| c.id))
            })
            .ok_or_else(|| Error::Protocol("the share has no chunk".into()))?;
        let mut refusals = Vec::new();
        let (mut pruned, mut kept) = (Vec::new(), Vec::new());
        for who in [bob, carol, dave, erin] {
            let conn = caravan_agent::wire::client::PeerConn::connect(
                &alice_addr,
                who.agent.secret_key(),
                None,
            )
            .await?;
            let proof = who.web.proof_for(&alice.agent.id).await;
            let key = conn.key(&sid, &proof).await;
            let chunk = conn.chunk(&sid, &chunk_id).await;
            match fetch(who).await {
                Ok(snap) if key.is_ok() && chunk.is_ok() && snap.seq == v2.seq => {
                    verified &= same_tree(&source, &who.root.join("received")).await?;
                    kept.push(who.name.to_string());
                }
                Ok(_) => {
                    return Err(Error::Protocol(format!(
                        "{} fetched but was refused a key or chunk directly",
                        who.name
                    )));
                }
                Err(e) => {
                    if key.is_ok() || chunk.is_ok() {
                        return Err(Error::Protocol(format!(
                            "{} was refused the fetch but still given a key or chunk",
                            who.name
                        )));
                    }
                    refusals.push(format!("{}: {e}", who.name));
                    pruned.push(who.name.to_string());
                }
            }
        }
        pruned.sort();
        kept.sort();
        Ok(TrustDemoReport {
            pruned,
            kept,
            revocation_seconds,
            verified,
            agents: agents
                .iter()
                .map(|a| (a.name.to_string(), a.agent.id.to_string()))
                .collect(),
            tree_before: name_ids(&tree_before, &agents),
            tree_after: name_ids(&tree_after, &agents),
            refusals,
            repositories: 2,
            second_version: v2.seq,
            fresh_key,
        })
    }
}

/// Replaces agent ids (and their short forms) by names in a rendered tree.
fn name_ids(text: &str, agents: &[DemoAgent]) -> String {
    let mut out = text.to_string();
    for a in agents {
        out = out.replace(&a.agent.id.to_string(), a.name);
        out = out.replace(&a.agent.id.short(), a.name);
    }
    out
}

async fn same_tree(a: &Path, b: &Path) -> Result<bool> {
    let (a, b) = (a.to_path_buf(), b.to_path_buf());
    tokio::task::spawn_blocking(move || trees_equal(&a, &b))
        .await
        .map_err(|e| Error::Protocol(format!("verifier: {e}")))?
}

/// Polls a fetch until it is done: its last snapshot, or its error.
pub(super) async fn finished(progress: &FetchProgress) -> Result<ProgressSnapshot> {
    loop {
        let s = progress.snapshot();
        match s.state {
            FetchState::Done => return Ok(s),
            FetchState::Failed => {
                return Err(Error::Protocol(
                    s.error.unwrap_or_else(|| "fetch failed".into()),
                ));
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
        }
    }
}
