//! `caravan-agent demo`: two real agents in one process, on loopback, with
//! temporary local storage. One publishes a generated folder for the other,
//! which fetches it over TLS; every byte is then compared with the source.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::StorageConfig;
use crate::error::{Context, Error, Result};
use crate::fetch::{FetchProgress, FetchRequest, FetchState};
use crate::identity::SecretKey;
use crate::manifest::Access;
use crate::node::{Agent, AgentOptions};
use crate::publish::PublishRequest;
use crate::{store, wire};

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
    /// Seconds spent publishing (chunking, hashing, encrypting).
    pub publish_seconds: f64,
    /// Seconds spent transferring (connect, manifest, chunks, writes).
    pub transfer_seconds: f64,
    /// End-to-end throughput in MB/s (10^6 bytes).
    pub throughput_mb_s: f64,
    /// Every fetched byte equals the source.
    pub verified: bool,
    /// Ciphertext bytes that crossed the wire.
    pub bytes_on_wire: u64,
    /// CPU seconds (all threads, both agents) spent publishing, on Linux.
    pub publish_cpu_seconds: Option<f64>,
    /// CPU seconds (all threads, both agents) spent transferring, on Linux.
    pub transfer_cpu_seconds: Option<f64>,
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
    let mut options = std::collections::BTreeMap::new();
    options.insert("root".to_string(), root.display().to_string());
    let op = store::open(&StorageConfig {
        scheme: "fs".into(),
        options,
        credentials: None,
    })?;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context(|| "binding loopback".into())?;
    let addr = listener.local_addr().context(|| "local address".into())?;
    let agent = Agent::open(
        SecretKey::generate()?,
        op,
        AgentOptions {
            state_prefix: crate::config::DEFAULT_STATE_PREFIX.into(),
            advertise: vec![addr.to_string()],
            repositories,
            fs_root: Some(root.to_path_buf()),
            corrupt_chunks: false,
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

    let started = Instant::now();
    let cpu0 = process_cpu_seconds();
    let published = alice
        .publish(
            PublishRequest {
                path: "share".into(),
                access: Access {
                    agents: vec![bob.id],
                    trust_depth: None,
                },
                share_id: None,
                rotate_key: false,
            },
            None,
        )
        .await?;
    let publish_seconds = started.elapsed().as_secs_f64();
    let cpu1 = process_cpu_seconds();
    let ticket = published
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
    let snap = loop {
        let s = progress.snapshot();
        match s.state {
            FetchState::Done => break s,
            FetchState::Failed => {
                shutdown.cancel();
                return Err(Error::Protocol(
                    s.error.unwrap_or_else(|| "fetch failed".into()),
                ));
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let cpu2 = process_cpu_seconds();
    shutdown.cancel();
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
        transfer_seconds: seconds - publish_seconds,
        throughput_mb_s: published.bytes as f64 / seconds / 1e6,
        verified,
        bytes_on_wire: snap.bytes_received,
        publish_cpu_seconds: cpu0.zip(cpu1).map(|(a, b)| b - a),
        transfer_cpu_seconds: cpu1.zip(cpu2).map(|(a, b)| b - a),
        publisher: alice.id.to_string(),
        recipient: bob.id.to_string(),
        kept_in: opts.keep.as_ref().map(|p| p.display().to_string()),
    })
}
