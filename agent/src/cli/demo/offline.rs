//! `caravan-agent demo --scenario offline`: offline seeding end to end, in
//! one process, without Kubernetes. A publisher keeps a generated folder in
//! an S3 bucket (any S3-compatible endpoint: moto or s3s-fs from
//! `tests/s3/`), publishes it with offline seeding, and is stopped; a
//! recipient on local storage then fetches everything from the bucket's
//! presigned URLs, finding the seed record in a repository on loopback.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use caravan_agent::config::{DEFAULT_STATE_PREFIX, StorageConfig};
use caravan_agent::error::{Context, Error, Result};
use caravan_agent::identity::SecretKey;
use caravan_agent::manifest::Access;
use caravan_agent::node::agent::{Agent, AgentOptions};
use caravan_agent::node::fetch::FetchRequest;
use caravan_agent::node::fetch::progress::FetchProgress;
use caravan_agent::node::publish::PublishRequest;
use caravan_agent::{repository, store, wire};

use super::scenarios::{finished, generate, local_agent, process_cpu_seconds, trees_equal};

/// Where the publisher's bucket is.
#[derive(Debug, Clone)]
pub struct BucketOptions {
    /// The S3 endpoint URL.
    pub endpoint: String,
    /// The bucket (must exist).
    pub bucket: String,
    /// Access key id.
    pub access_key: String,
    /// Secret access key.
    pub secret_key: String,
}

/// What the offline demo did (`--json` prints this).
#[derive(Debug, Clone, Serialize)]
pub struct OfflineReport {
    /// Payload bytes fetched.
    pub bytes: u64,
    /// Files fetched.
    pub files: u64,
    /// Chunks in the share (each staged once in the bucket).
    pub chunks: u64,
    /// Seconds of the fetch (seed record, index, every chunk verified and in place).
    pub seconds: f64,
    /// Fetch throughput in MB/s (10^6 bytes).
    pub throughput_mb_s: f64,
    /// Seconds spent publishing, staging and presigning.
    pub publish_seconds: f64,
    /// Whether the publisher still answered when the fetch ran (it must not).
    pub publisher_running: bool,
    /// Chunks that came from the bucket.
    pub chunks_from_bucket: u64,
    /// Live peers the fetch used (none).
    pub peers: Vec<String>,
    /// Every fetched byte equals the source.
    pub verified: bool,
    /// CPU seconds of this process during the fetch (the recipient only:
    /// the publisher was stopped).
    pub fetch_cpu_seconds: Option<f64>,
    /// When the presigned URLs expire (unix seconds).
    pub urls_expire_at: u64,
    /// The S3 endpoint used.
    pub endpoint: String,
    /// The publishing agent.
    pub publisher: String,
    /// The fetching agent.
    pub recipient: String,
}

/// Runs the offline demo.
pub async fn run(
    size: u64,
    files: u64,
    keep: Option<PathBuf>,
    bucket: BucketOptions,
    on_progress: impl FnOnce(Arc<FetchProgress>),
) -> Result<OfflineReport> {
    let tmp;
    let base = match &keep {
        Some(k) => {
            std::fs::create_dir_all(k).context(|| format!("creating {}", k.display()))?;
            k.clone()
        }
        None => {
            tmp = tempfile::tempdir().context(|| "temporary directory".into())?;
            tmp.path().to_path_buf()
        }
    };
    let source = base.join("source");
    let bob_root = base.join("bob");
    for d in [&source, &bob_root] {
        std::fs::create_dir_all(d).context(|| format!("creating {}", d.display()))?;
    }
    let src = source.clone();
    tokio::task::spawn_blocking(move || generate(&src, size, files))
        .await
        .map_err(|e| Error::Protocol(format!("generator: {e}")))??;

    // The publisher's bucket, under a fresh root so runs never mix.
    let root = format!(
        "/caravan-demo-{}-{}/",
        std::process::id(),
        caravan_agent::util::unix_millis()
    );
    let mut options = std::collections::BTreeMap::new();
    for (k, v) in [
        ("bucket", bucket.bucket.as_str()),
        ("endpoint", bucket.endpoint.as_str()),
        ("region", "us-east-1"),
        ("access_key_id", bucket.access_key.as_str()),
        ("secret_access_key", bucket.secret_key.as_str()),
        ("root", root.as_str()),
        ("disable_config_load", "true"),
        ("disable_ec2_metadata", "true"),
    ] {
        options.insert(k.to_string(), v.to_string());
    }
    let op = store::open(&StorageConfig {
        scheme: "s3".into(),
        options,
        credentials: None,
        size_limit: None,
    })?;
    store::probe(&op).await.map_err(|e| {
        Error::Config(format!(
            "the S3 endpoint {} (bucket {}) does not answer: {e}",
            bucket.endpoint, bucket.bucket
        ))
    })?;
    upload(&op, &source).await?;

    // A repository on loopback, where the seed record waits.
    let repo_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context(|| "binding loopback".into())?;
    let repo_url = format!(
        "http://{}",
        repo_listener
            .local_addr()
            .context(|| "local address".into())?
    );
    let repo_stop = CancellationToken::new();
    let rs = repo_stop.clone();
    let memory = opendal::Operator::via_iter("memory", Vec::<(String, String)>::new())
        .map_err(|e| Error::Config(format!("memory storage: {e}")))?;
    tokio::spawn(repository::serve_with(
        repo_listener,
        memory,
        repository::RepositoryConfig::default(),
        async move { rs.cancelled().await },
    ));

    // The publisher: its files in the bucket, a peer listener while it runs.
    let pub_stop = CancellationToken::new();
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context(|| "binding loopback".into())?;
    let pub_addr = listener.local_addr().context(|| "local address".into())?;
    let alice = Agent::open(
        SecretKey::generate()?,
        op.clone(),
        AgentOptions {
            state_prefix: DEFAULT_STATE_PREFIX.into(),
            advertise: vec![pub_addr.to_string()],
            repositories: vec![repo_url.clone()],
            fs_root: None,
            size_limit: None,
            corrupt_chunks: false,
            azblob_signer: None,
        },
    )
    .await?;
    let tls = wire::tls::server_config(alice.secret_key())?;
    tokio::spawn(wire::server::serve(
        listener,
        tls,
        alice.clone(),
        pub_stop.clone(),
    ));
    let bob_stop = CancellationToken::new();
    let bob = local_agent(&bob_root, vec![repo_url], &bob_stop).await?;

    let started = Instant::now();
    let published = alice
        .publish(
            PublishRequest {
                path: String::new(),
                access: Access {
                    agents: vec![bob.id],
                    trust_depth: None,
                },
                offline_seeding: true,
                url_validity_secs: Some(3600),
                ..Default::default()
            },
            None,
        )
        .await?;
    let publish_seconds = started.elapsed().as_secs_f64();
    let ticket = published
        .tickets
        .first()
        .map(|(_, t)| t.clone())
        .ok_or_else(|| Error::Protocol("publishing produced no ticket".into()))?;
    let urls_expire_at = published.seed.as_ref().map(|s| s.expires_at).unwrap_or(0);
    let (publisher, recipient) = (alice.id.to_string(), bob.id.to_string());

    // Stop the publisher: its listener closes, the agent is dropped.
    pub_stop.cancel();
    drop(alice);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let publisher_running = tokio::net::TcpStream::connect(pub_addr).await.is_ok();

    let cpu0 = process_cpu_seconds();
    let t0 = Instant::now();
    let progress = bob
        .start_fetch(FetchRequest {
            ticket,
            dest: "received".into(),
            peers: vec![],
        })
        .await?;
    on_progress(progress.clone());
    let snap = match finished(&progress).await {
        Ok(s) => s,
        Err(e) => {
            bob_stop.cancel();
            repo_stop.cancel();
            return Err(e);
        }
    };
    let seconds = t0.elapsed().as_secs_f64();
    let cpu1 = process_cpu_seconds();
    bob_stop.cancel();
    repo_stop.cancel();
    let received = bob_root.join("received");
    let verified = tokio::task::spawn_blocking(move || trees_equal(&source, &received))
        .await
        .map_err(|e| Error::Protocol(format!("verifier: {e}")))??;
    if keep.is_none()
        && let Err(e) = op.delete_with("").recursive(true).await
    {
        tracing::warn!(error = %e, %root, "could not clean the demo's bucket root");
    }
    Ok(OfflineReport {
        bytes: published.bytes,
        files: published.files,
        chunks: published.chunks,
        seconds,
        throughput_mb_s: published.bytes as f64 / seconds / 1e6,
        publish_seconds,
        publisher_running,
        chunks_from_bucket: snap.chunks_fetched,
        peers: snap.peers,
        verified,
        fetch_cpu_seconds: cpu0.zip(cpu1).map(|(a, b)| b - a),
        urls_expire_at,
        endpoint: bucket.endpoint,
        publisher,
        recipient,
    })
}

/// Copies the generated folder into the bucket.
async fn upload(op: &opendal::Operator, dir: &std::path::Path) -> Result<()> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).context(|| format!("listing {}", d.display()))? {
            let p = e.context(|| format!("listing {}", d.display()))?.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let rel = p
                .strip_prefix(dir)
                .map_err(|e| Error::Protocol(e.to_string()))?
                .to_string_lossy()
                .to_string();
            let bytes = tokio::fs::read(&p)
                .await
                .context(|| format!("reading {}", p.display()))?;
            op.write(&rel, bytes)
                .await
                .context(|| format!("uploading {rel}"))?;
        }
    }
    Ok(())
}
