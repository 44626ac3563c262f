//! Offline seeding against real storage servers that check signatures,
//! presigned URLs and their expiry:
//! * s3 — s3s-fs (`eval "$(bash tests/s3/s3s.sh start PORT)"` sets
//!   `CARAVAN_TEST_S3S_*`);
//! * azblob — Azurite, which checks SAS signatures
//!   (`tests/storage/azurite.sh start PORT` sets `CARAVAN_TEST_AZBLOB_*`);
//! * gcs — fake-gcs-server (`tests/storage/gcs.sh start PORT` sets
//!   `CARAVAN_TEST_GCS_*`): anonymous, so offline seeding must be refused
//!   with the reason (it also serves objects whatever the signature).
//!
//! Without its server a test prints SKIPPED and passes.
//!
//! The publisher keeps its files in the bucket and stages sealed chunks
//! there; the recipient is an `fs` agent; the repository runs in process.
//! "Publisher stopped" means its peer listener is shut down: nothing of it
//! answers, only its bucket and the repository do.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use caravan_agent::config::{DEFAULT_STATE_PREFIX, StorageConfig};
use caravan_agent::identity::SecretKey;
use caravan_agent::manifest::{Access, ShareId};
use caravan_agent::node::{Agent, AgentOptions, FetchRequest, PublishRequest, Published};
use caravan_agent::repository::{RepositoryClient, RepositoryConfig, serve_with};
use caravan_agent::store::sas::AzblobSigner;
use caravan_agent::trust::SeedIndex;
use caravan_agent::{store, wire};
use opendal::Operator;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

struct S3s {
    endpoint: String,
    bucket: String,
    access: String,
    secret: String,
}

fn s3s() -> Option<S3s> {
    match std::env::var("CARAVAN_TEST_S3S_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => Some(S3s {
            endpoint,
            bucket: std::env::var("CARAVAN_TEST_S3S_BUCKET").unwrap_or("caravan-seed".into()),
            access: std::env::var("CARAVAN_TEST_S3S_ACCESS_KEY").unwrap(),
            secret: std::env::var("CARAVAN_TEST_S3S_SECRET_KEY").unwrap(),
        }),
        _ => {
            eprintln!(
                "SKIPPED: CARAVAN_TEST_S3S_ENDPOINT is not set (run `eval \"$(bash tests/s3/s3s.sh start)\"`)"
            );
            None
        }
    }
}

static N: AtomicU64 = AtomicU64::new(0);

/// Where the publisher keeps its files and stages its chunks.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Bucket {
    S3s,
    Azurite,
    FakeGcs,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn storage_config(scheme: &str, pairs: &[(&str, &str)]) -> StorageConfig {
    StorageConfig {
        scheme: scheme.into(),
        options: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        credentials: None,
        size_limit: None,
    }
}

/// The publisher's storage under `root`, or None (SKIPPED printed) when
/// that server is not running.
fn bucket_config(bucket: Bucket, root: &str) -> Option<StorageConfig> {
    match bucket {
        Bucket::S3s => {
            let s = s3s()?;
            Some(storage_config(
                "s3",
                &[
                    ("bucket", s.bucket.as_str()),
                    ("endpoint", s.endpoint.as_str()),
                    ("region", "us-east-1"),
                    ("access_key_id", s.access.as_str()),
                    ("secret_access_key", s.secret.as_str()),
                    ("root", root),
                    ("disable_config_load", "true"),
                    ("disable_ec2_metadata", "true"),
                ],
            ))
        }
        Bucket::Azurite => {
            let Some(endpoint) = env("CARAVAN_TEST_AZBLOB_ENDPOINT") else {
                eprintln!(
                    "SKIPPED: CARAVAN_TEST_AZBLOB_ENDPOINT is not set (run `eval \"$(bash tests/storage/azurite.sh start PORT)\"`)"
                );
                return None;
            };
            let container =
                env("CARAVAN_TEST_AZBLOB_CONTAINER").unwrap_or_else(|| "caravan-test".into());
            let account =
                env("CARAVAN_TEST_AZBLOB_ACCOUNT").unwrap_or_else(|| "devstoreaccount1".into());
            let key = env("CARAVAN_TEST_AZBLOB_KEY").unwrap_or_else(|| {
                "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
                    .into()
            });
            Some(storage_config(
                "azblob",
                &[
                    ("container", container.as_str()),
                    ("endpoint", endpoint.as_str()),
                    ("account_name", account.as_str()),
                    ("account_key", key.as_str()),
                    ("root", root),
                ],
            ))
        }
        Bucket::FakeGcs => {
            let Some(endpoint) = env("CARAVAN_TEST_GCS_ENDPOINT") else {
                eprintln!(
                    "SKIPPED: CARAVAN_TEST_GCS_ENDPOINT is not set (run `eval \"$(bash tests/storage/gcs.sh start PORT)\"`)"
                );
                return None;
            };
            let bucket = env("CARAVAN_TEST_GCS_BUCKET").unwrap_or_else(|| "caravan-test".into());
            // The emulator checks no OAuth token; a service-account key
            // would make OpenDAL exchange it at Google's token endpoint
            // for every request, so the agent runs anonymously.
            Some(storage_config(
                "gcs",
                &[
                    ("bucket", bucket.as_str()),
                    ("endpoint", endpoint.as_str()),
                    ("skip_signature", "true"),
                    ("root", root),
                ],
            ))
        }
    }
}

async fn repository() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    opendal::install_default();
    let op = Operator::via_iter("memory", Vec::<(String, String)>::new()).unwrap();
    tokio::spawn(async move {
        let _ = serve_with(
            listener,
            op,
            RepositoryConfig::default(),
            std::future::pending(),
        )
        .await;
    });
    format!("http://{addr}")
}

/// An agent on `op` serving peers until `stop` is cancelled.
async fn agent_on(
    op: Operator,
    repo: &str,
    fs_root: Option<&Path>,
    azblob_signer: Option<AzblobSigner>,
    stop: &CancellationToken,
) -> Arc<Agent> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let agent = Agent::open(
        SecretKey::generate().unwrap(),
        op,
        AgentOptions {
            state_prefix: DEFAULT_STATE_PREFIX.into(),
            advertise: vec![addr.to_string()],
            repositories: vec![repo.to_string()],
            fs_root: fs_root.map(Path::to_path_buf),
            size_limit: None,
            corrupt_chunks: false,
            azblob_signer,
        },
    )
    .await
    .unwrap();
    let tls = wire::tls::server_config(agent.secret_key()).unwrap();
    tokio::spawn(wire::server::serve(
        listener,
        tls,
        agent.clone(),
        stop.clone(),
    ));
    agent
}

fn fs_op(root: &Path) -> Operator {
    let mut options = std::collections::BTreeMap::new();
    options.insert("root".to_string(), root.display().to_string());
    store::open(&StorageConfig {
        scheme: "fs".into(),
        options,
        credentials: None,
        size_limit: None,
    })
    .unwrap()
}

fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct World {
    repo: String,
    pub_op: Operator,
    publisher: Arc<Agent>,
    pub_stop: CancellationToken,
    recipient: Arc<Agent>,
    rec_dir: tempfile::TempDir,
    files: Vec<(String, Vec<u8>)>,
}

/// A publisher with three files in its s3s-fs bucket, a recipient on
/// `fs`. The share is the bucket root: s3s-fs answers a HEAD of a "folder"
/// key with a 500 (its files are real folders), where S3 says 404.
async fn world() -> Option<World> {
    world_on(Bucket::S3s).await
}

/// A publisher with three files in `bucket`, a recipient on `fs`.
async fn world_on(bucket: Bucket) -> Option<World> {
    let root = format!(
        "/offline-{}-{}-{}/",
        std::process::id(),
        caravan_agent::util::unix_millis(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let cfg = bucket_config(bucket, &root)?;
    let pub_op = store::open(&cfg).unwrap();
    let signer = AzblobSigner::from_config(&cfg).unwrap();
    // Under 5 MiB on gcs: fake-gcs-server lacks the XML multipart upload
    // OpenDAL's gcs writer switches to there (fsouza/fake-gcs-server#852).
    let b_len = if bucket == Bucket::FakeGcs {
        4 << 20
    } else {
        5 << 20
    };
    let files: Vec<(String, Vec<u8>)> = vec![
        ("a.bin".into(), pseudo_random(3 << 20, 1)),
        ("b.bin".into(), pseudo_random(b_len, 2)),
        ("sub/c.txt".into(), b"hello, offline world\n".to_vec()),
    ];
    for (p, b) in &files {
        pub_op.write(p, b.clone()).await.unwrap();
    }
    let repo = repository().await;
    let pub_stop = CancellationToken::new();
    let publisher = agent_on(pub_op.clone(), &repo, None, signer, &pub_stop).await;
    let rec_dir = tempfile::tempdir().unwrap();
    let recipient = agent_on(
        fs_op(rec_dir.path()),
        &repo,
        Some(rec_dir.path()),
        None,
        &CancellationToken::new(),
    )
    .await;
    Some(World {
        repo,
        pub_op,
        publisher,
        pub_stop,
        recipient,
        rec_dir,
        files,
    })
}

impl World {
    async fn publish(&self, share: Option<ShareId>, validity: Option<u64>) -> Published {
        self.try_publish(share, validity).await.unwrap()
    }

    async fn try_publish(
        &self,
        share: Option<ShareId>,
        validity: Option<u64>,
    ) -> caravan_agent::Result<Published> {
        self.publisher
            .publish(
                PublishRequest {
                    path: "".into(),
                    access: Access {
                        agents: vec![self.recipient.id],
                        trust_depth: None,
                    },
                    share_id: share,
                    offline_seeding: true,
                    url_validity_secs: validity,
                    ..Default::default()
                },
                None,
            )
            .await
    }

    async fn fetch(&self, p: &Published, peers: &[String]) -> caravan_agent::Result<()> {
        self.recipient
            .fetch(FetchRequest {
                ticket: p.tickets[0].1.clone(),
                dest: "got".into(),
                peers: peers.to_vec(),
            })
            .await
            .map(|_| ())
    }

    fn assert_fetched(&self) {
        for (p, b) in &self.files {
            let rel = p.as_str();
            let got = std::fs::read(self.rec_dir.path().join("got").join(rel)).unwrap();
            assert!(got == *b, "{rel} differs");
        }
    }

    async fn staged(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .pub_op
            .list(".caravan/seed/chunks/")
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.name().to_string())
            .filter(|n| !n.is_empty())
            .collect();
        v.sort();
        v
    }

    async fn index(&self, p: &Published) -> SeedIndex {
        let id: ShareId = p.share_id.parse().unwrap();
        let bytes = self
            .pub_op
            .read(&format!(".caravan/seed/index/{}", id.hex()))
            .await
            .unwrap()
            .to_vec();
        let repos = RepositoryClient::new(std::slice::from_ref(&self.repo)).unwrap();
        let (rec, _) = repos.seed(&self.publisher.id, &id).await.unwrap().unwrap();
        SeedIndex::from_bytes(&bytes, &rec).unwrap()
    }
}

#[tokio::test]
async fn fetch_from_the_bucket_while_the_publisher_is_stopped() {
    let Some(w) = world().await else { return };
    let p = w.publish(None, None).await;
    let seed = p.seed.clone().unwrap();
    assert_eq!(seed.staged, p.chunks);
    assert_eq!(seed.urls, p.chunks);
    // Object names and URLs carry chunk ids only: no file name, no size.
    let staged = w.staged().await;
    assert_eq!(staged.len() as u64, p.chunks);
    assert!(
        staged
            .iter()
            .all(|n| n.len() == 64 && n.chars().all(|c| c.is_ascii_hexdigit()))
    );
    let index = w.index(&p).await;
    for (_, url) in &index.urls {
        assert!(
            !url.contains("a.bin") && !url.contains("share/") && !url.contains("c.txt"),
            "{url}"
        );
    }
    // The publisher stops: nothing of it answers any more.
    w.pub_stop.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    w.fetch(&p, &[]).await.unwrap();
    w.assert_fetched();
    let snap = w.recipient.all_fetches()[0].snapshot();
    assert!(
        snap.peers.is_empty(),
        "a live peer served: {:?}",
        snap.peers
    );
    assert_eq!(snap.chunks_fetched, p.chunks);
}

#[tokio::test]
async fn the_server_refuses_a_tampered_or_moved_presigned_url() {
    let Some(w) = world().await else { return };
    let p = w.publish(None, None).await;
    let index = w.index(&p).await;
    let http = reqwest::Client::new();
    let (id0, url0) = index.urls[0].clone();
    let (_, url1) = index.urls[1].clone();
    let ok = http.get(&url0).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let body = ok.bytes().await.unwrap();
    assert_eq!(blake3::hash(&body).as_bytes(), &id0);
    // A flipped signature digit.
    let i = url0.find("X-Amz-Signature=").unwrap() + "X-Amz-Signature=".len();
    let mut bad = url0.clone().into_bytes();
    bad[i] = if bad[i] == b'0' { b'1' } else { b'0' };
    let bad = String::from_utf8(bad).unwrap();
    assert_eq!(http.get(&bad).send().await.unwrap().status(), 403);
    // One URL's signature on another object's path.
    let sig0 = &url0[url0.find('?').unwrap()..];
    let moved = format!("{}{}", &url1[..url1.find('?').unwrap()], sig0);
    assert_eq!(http.get(&moved).send().await.unwrap().status(), 403);
    // No signature at all.
    let bare = &url0[..url0.find('?').unwrap()];
    assert_eq!(http.get(bare).send().await.unwrap().status(), 403);
    // A longer validity than signed.
    let longer = url0.replace("X-Amz-Expires=604800", "X-Amz-Expires=604799");
    assert_ne!(longer, url0);
    assert_eq!(http.get(&longer).send().await.unwrap().status(), 403);
}

/// A listener that accepts connections and never answers: the recipient's
/// TLS handshake to it waits for its 10 s timeout, long after the first
/// URLs (valid 2 s) have expired.
async fn black_hole() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    addr
}

#[tokio::test]
async fn expired_urls_are_refreshed_without_restarting_the_fetch() {
    refresh_expired_urls(Bucket::S3s).await;
}

#[tokio::test]
async fn azblob_expired_urls_are_refreshed_without_restarting_the_fetch() {
    refresh_expired_urls(Bucket::Azurite).await;
}

async fn refresh_expired_urls(bucket: Bucket) {
    let Some(w) = world_on(bucket).await else {
        return;
    };
    let p = w.publish(None, Some(2)).await;
    let first = p.seed.clone().unwrap();
    w.pub_stop.cancel();
    let hole = black_hole().await;
    // The recipient reads the 2-second record at once, then waits on the
    // black hole; meanwhile the URLs expire and the publisher (its storage
    // and key, no listener) renews them, as the daemon's loop does.
    let rec = w.recipient.clone();
    let ticket = p.tickets[0].1.clone();
    let fetch = tokio::spawn(async move {
        rec.fetch(FetchRequest {
            ticket,
            dest: "got".into(),
            peers: vec![hole],
        })
        .await
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let id: ShareId = p.share_id.parse().unwrap();
    assert_eq!(w.publisher.refresh_seeds().await.unwrap(), 1);
    let policy = w.publisher.seed_policy(&id).await.unwrap();
    assert!(policy.seq > first.seq);
    // The activity report names the next refresh: half way through the
    // renewed URLs' validity (what the operator wakes a sleeping agent for).
    assert_eq!(
        w.publisher.activity.next_url_refresh(),
        Some(policy.expires_at - policy.validity_secs / 2)
    );
    // Renewal moved no data.
    assert_eq!(w.staged().await.len() as u64, p.chunks);
    // Those renewed URLs last 2 s again; renew for an hour so they outlive
    // the black hole's 10 s.
    let renewed = w.publisher.seed_share(&id, 3600).await.unwrap();
    assert_eq!(renewed.staged, 0);
    fetch.await.unwrap().unwrap();
    w.assert_fetched();
}

/// Which way a staged object is spoiled.
#[derive(Clone, Copy, Debug)]
enum Spoil {
    BitFlip,
    Delete,
    ReplaceWithAnotherChunk,
}

async fn spoil(w: &World, how: Spoil) -> Vec<String> {
    let staged = w.staged().await;
    let victim = format!(".caravan/seed/chunks/{}", staged[0]);
    let other = format!(".caravan/seed/chunks/{}", staged[1]);
    match how {
        Spoil::BitFlip => {
            let mut b = w.pub_op.read(&victim).await.unwrap().to_vec();
            let mid = b.len() / 2;
            b[mid] ^= 0x01;
            w.pub_op.write(&victim, b).await.unwrap();
        }
        Spoil::Delete => w.pub_op.delete(&victim).await.unwrap(),
        Spoil::ReplaceWithAnotherChunk => {
            let b = w.pub_op.read(&other).await.unwrap().to_vec();
            w.pub_op.write(&victim, b).await.unwrap();
        }
    }
    staged
}

#[tokio::test]
async fn a_spoiled_object_is_detected_and_a_live_peer_fills_in() {
    for how in [
        Spoil::BitFlip,
        Spoil::Delete,
        Spoil::ReplaceWithAnotherChunk,
    ] {
        let Some(w) = world().await else { return };
        let p = w.publish(None, None).await;
        spoil(&w, how).await;
        let rejected0 = w.recipient.metrics.chunks_rejected.get();
        // The publisher is live: the fetch completes from it.
        w.fetch(&p, &[])
            .await
            .unwrap_or_else(|e| panic!("{how:?}: {e}"));
        w.assert_fetched();
        let snap = w.recipient.all_fetches()[0].snapshot();
        assert_eq!(snap.peers, vec![w.publisher.id.to_string()], "{how:?}");
        if !matches!(how, Spoil::Delete) {
            assert!(
                w.recipient.metrics.chunks_rejected.get() > rejected0,
                "{how:?}: not counted"
            );
        }
        w.pub_stop.cancel();
    }
}

#[tokio::test]
async fn a_spoiled_object_without_a_live_peer_fails_clearly() {
    for how in [
        Spoil::BitFlip,
        Spoil::Delete,
        Spoil::ReplaceWithAnotherChunk,
    ] {
        let Some(w) = world().await else { return };
        let p = w.publish(None, None).await;
        spoil(&w, how).await;
        w.pub_stop.cancel();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let err = w
            .fetch(&p, &[])
            .await
            .expect_err("a spoiled bucket and no peer");
        let msg = err.to_string();
        assert!(msg.contains("publisher's bucket"), "{how:?}: {msg}");
        assert!(msg.contains("no live peer"), "{how:?}: {msg}");
        // Nothing unverified was put in place.
        assert!(
            !w.rec_dir.path().join("got/a.bin").exists() || {
                let got = std::fs::read(w.rec_dir.path().join("got/a.bin")).unwrap();
                got == w.files[0].1
            }
        );
    }
}

#[tokio::test]
async fn unreferenced_staged_chunks_are_collected() {
    let Some(w) = world().await else { return };
    let p1 = w.publish(None, None).await;
    let id: ShareId = p1.share_id.parse().unwrap();
    let v1 = w.staged().await;
    // A new version with b.bin changed: its old chunks go, a.bin's stay.
    w.pub_op
        .write("b.bin", pseudo_random(5 << 20, 99))
        .await
        .unwrap();
    let p2 = w.publish(Some(id), None).await;
    let seed = p2.seed.clone().unwrap();
    assert!(seed.reused > 0, "a.bin's chunks were staged again");
    assert!(seed.staged > 0);
    let v2 = w.staged().await;
    assert_eq!(v2.len() as u64, p2.chunks);
    let held = w.publisher.share(&id).unwrap();
    let current: std::collections::HashSet<String> = held
        .manifest
        .files()
        .flat_map(|(_, _, c)| c.iter().map(|c| caravan_agent::util::hex(&c.id.0)))
        .collect();
    assert!(v2.iter().all(|n| current.contains(n)));
    assert!(v1.iter().any(|n| !v2.contains(n)), "nothing was collected");
    // Publishing without offline seeding stops it: everything is collected.
    w.publisher
        .publish(
            PublishRequest {
                path: "".into(),
                access: Access {
                    agents: vec![w.recipient.id],
                    trust_depth: None,
                },
                share_id: Some(id),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();
    assert!(w.staged().await.is_empty());
    assert!(w.publisher.seed_policy(&id).await.is_none());
}

#[test]
fn the_offline_demo_fetches_from_the_bucket_with_the_publisher_stopped() {
    let bin = env!("CARGO_BIN_EXE_caravan-agent");
    // Without an endpoint it says what it needs (exit 3, bad config).
    let out = std::process::Command::new(bin)
        .args(["demo", "--scenario", "offline", "--json", "--size", "1M"])
        .env_remove("CARAVAN_DEMO_S3_ENDPOINT")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("--s3-endpoint"), "{said}");
    let Some(s3) = s3s() else { return };
    let out = std::process::Command::new(bin)
        .args([
            "demo",
            "--scenario",
            "offline",
            "--json",
            "--size",
            "24M",
            "--files",
            "6",
        ])
        .args(["--s3-endpoint", &s3.endpoint, "--s3-bucket", &s3.bucket])
        .env("CARAVAN_DEMO_S3_ACCESS_KEY", &s3.access)
        .env("CARAVAN_DEMO_S3_SECRET_KEY", &s3.secret)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["publisher_running"], false);
    assert_eq!(r["verified"], true);
    assert_eq!(r["bytes"], 24 << 20);
    assert_eq!(r["chunks_from_bucket"], r["chunks"]);
    assert_eq!(r["peers"].as_array().unwrap().len(), 0);
}

/// The same round trip on Azure Blob (Azurite): the publisher stops, the
/// recipient reads every chunk through read-only SAS URLs Caravan signed.
#[tokio::test]
async fn azblob_fetch_from_the_container_while_the_publisher_is_stopped() {
    let Some(w) = world_on(Bucket::Azurite).await else {
        return;
    };
    let p = w.publish(None, None).await;
    let seed = p.seed.clone().unwrap();
    assert_eq!(seed.staged, p.chunks);
    assert_eq!(seed.urls, p.chunks);
    let staged = w.staged().await;
    assert_eq!(staged.len() as u64, p.chunks);
    let index = w.index(&p).await;
    assert_eq!(index.urls.len() as u64, p.chunks);
    for (_, url) in &index.urls {
        // One blob, read only, no file name.
        assert!(url.contains("sp=r&") && url.contains("sr=b&"), "{url}");
        assert!(!url.contains("a.bin") && !url.contains("c.txt"), "{url}");
    }
    w.pub_stop.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    w.fetch(&p, &[]).await.unwrap();
    w.assert_fetched();
    let snap = w.recipient.all_fetches()[0].snapshot();
    assert!(
        snap.peers.is_empty(),
        "a live peer served: {:?}",
        snap.peers
    );
    assert_eq!(snap.chunks_fetched, p.chunks);
    eprintln!(
        "azblob: {} chunks, {} bytes fetched from Azurite with the publisher stopped",
        p.chunks,
        w.files.iter().map(|(_, b)| b.len()).sum::<usize>()
    );
}

/// Azurite checks SAS signatures: a changed signature, permission, expiry
/// or blob, or no SAS at all, is refused; the read-only URL cannot write.
#[tokio::test]
async fn azurite_refuses_a_tampered_moved_or_widened_sas_url() {
    let Some(w) = world_on(Bucket::Azurite).await else {
        return;
    };
    let p = w.publish(None, None).await;
    let index = w.index(&p).await;
    let http = reqwest::Client::new();
    let (id0, url0) = index.urls[0].clone();
    let (_, url1) = index.urls[1].clone();
    let ok = http.get(&url0).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let body = ok.bytes().await.unwrap();
    assert_eq!(blake3::hash(&body).as_bytes(), &id0);
    let refused = |s: reqwest::StatusCode| s == 403;
    // A changed signature character.
    let i = url0.find("sig=").unwrap() + "sig=".len();
    let mut bad = url0.clone().into_bytes();
    bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
    let bad = String::from_utf8(bad).unwrap();
    let s = http.get(&bad).send().await.unwrap().status();
    assert!(refused(s), "tampered signature: {s}");
    eprintln!("azurite: tampered signature -> HTTP {s}");
    // One URL's SAS on another blob.
    let sas0 = &url0[url0.find('?').unwrap()..];
    let moved = format!("{}{}", &url1[..url1.find('?').unwrap()], sas0);
    let s = http.get(&moved).send().await.unwrap().status();
    assert!(refused(s), "moved SAS: {s}");
    eprintln!("azurite: moved SAS -> HTTP {s}");
    // No SAS at all (the container is private).
    let bare = &url0[..url0.find('?').unwrap()];
    let s = http.get(bare).send().await.unwrap().status();
    assert!(refused(s), "no SAS: {s}");
    eprintln!("azurite: no SAS -> HTTP {s}");
    // Wider permissions than signed.
    let widened = url0.replace("sp=r&", "sp=rwd&");
    assert_ne!(widened, url0);
    let s = http.get(&widened).send().await.unwrap().status();
    assert!(refused(s), "widened permission: {s}");
    eprintln!("azurite: widened permission -> HTTP {s}");
    // A later expiry than signed.
    let i = url0.find("se=").unwrap() + "se=".len();
    let year: u32 = url0[i..i + 4].parse().unwrap();
    let later = format!("{}{}{}", &url0[..i], year + 1, &url0[i + 4..]);
    let s = http.get(&later).send().await.unwrap().status();
    assert!(refused(s), "later expiry: {s}");
    eprintln!("azurite: later expiry -> HTTP {s}");
    // The read-only URL cannot overwrite or delete the chunk.
    let s = http
        .put(&url0)
        .header("x-ms-blob-type", "BlockBlob")
        .body(b"spoiled".to_vec())
        .send()
        .await
        .unwrap()
        .status();
    assert!(refused(s), "write through a read URL: {s}");
    eprintln!("azurite: write through a read URL -> HTTP {s}");
    let s = http.delete(&url0).send().await.unwrap().status();
    assert!(refused(s), "delete through a read URL: {s}");
    eprintln!("azurite: delete through a read URL -> HTTP {s}");
    let again = http.get(&url0).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(again, body);
}

/// Azurite checks the SAS expiry too: a URL signed for 2 s is refused
/// once they are past.
#[tokio::test]
async fn azurite_refuses_an_expired_sas_url() {
    let Some(w) = world_on(Bucket::Azurite).await else {
        return;
    };
    let p = w.publish(None, Some(2)).await;
    let index = w.index(&p).await;
    let http = reqwest::Client::new();
    let (_, url) = index.urls[0].clone();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let s = http.get(&url).send().await.unwrap().status();
    eprintln!("azurite: expired SAS -> HTTP {s}");
    assert_eq!(s, 403);
}

/// azblob storage without its account key cannot sign read-only URLs:
/// offline seeding says what it needs before any chunk is staged.
#[tokio::test]
async fn azblob_without_an_account_key_says_what_offline_seeding_needs() {
    let Some(w) = world_on(Bucket::Azurite).await else {
        return;
    };
    let repo = repository().await;
    let publisher = agent_on(
        w.pub_op.clone(),
        &repo,
        None,
        None,
        &CancellationToken::new(),
    )
    .await;
    let err = publisher
        .publish(
            PublishRequest {
                path: "".into(),
                access: Access {
                    agents: vec![w.recipient.id],
                    trust_depth: None,
                },
                offline_seeding: true,
                ..Default::default()
            },
            None,
        )
        .await
        .expect_err("offline seeding without the account key");
    let msg = err.to_string();
    assert!(
        msg.contains("account_key") && msg.contains("sas_token"),
        "{msg}"
    );
    assert!(w.staged().await.is_empty());
}

/// GCS signed URLs (V4) need a service-account private key. The emulator
/// runs anonymously (`skip_signature`), with which OpenDAL's presign
/// returns the bare object URL: the agent refuses to publish that as a
/// presigned URL and says why, before any chunk is staged.
#[tokio::test]
async fn gcs_without_a_service_account_says_why_offline_seeding_cannot_run() {
    let Some(w) = world_on(Bucket::FakeGcs).await else {
        return;
    };
    let err = w
        .try_publish(None, None)
        .await
        .expect_err("offline seeding with unsigned URLs");
    let msg = err.to_string();
    assert!(
        msg.contains("service-account") && msg.contains("credential_path"),
        "{msg}"
    );
    assert!(msg.contains("unsigned"), "{msg}");
    assert!(w.staged().await.is_empty(), "chunks were staged");
    // Publishing without offline seeding still works on it.
    w.publisher
        .publish(
            PublishRequest {
                path: "".into(),
                access: Access {
                    agents: vec![w.recipient.id],
                    trust_depth: None,
                },
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();
}

/// With a service-account key (a throwaway one: presigning is local RSA),
/// OpenDAL's gcs presign gives a V4 signed URL: the agent's check accepts
/// it. Only the presign is exercised: every other request would exchange
/// the key at Google's token endpoint, which the emulator does not stand in
/// for.
#[tokio::test]
async fn gcs_with_a_service_account_key_signs_v4_urls() {
    let Some(endpoint) = env("CARAVAN_TEST_GCS_ENDPOINT") else {
        eprintln!("SKIPPED: CARAVAN_TEST_GCS_ENDPOINT is not set (tests/storage/gcs.sh)");
        return;
    };
    let Some(pem) = throwaway_rsa_key() else {
        eprintln!("SKIPPED: no `openssl` to make a throwaway service-account key");
        return;
    };
    let sa = serde_json::json!({
        "type": "service_account",
        "client_email": "caravan-test@example.iam.gserviceaccount.com",
        "private_key": pem,
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sa.json");
    std::fs::write(&path, sa.to_string()).unwrap();
    let op = store::open(&storage_config(
        "gcs",
        &[
            ("bucket", "caravan-test"),
            ("endpoint", endpoint.as_str()),
            ("credential_path", &path.display().to_string()),
            ("disable_vm_metadata", "true"),
            ("disable_config_load", "true"),
        ],
    ))
    .unwrap();
    let url = op
        .presign_read(".caravan/seed/chunks/00", Duration::from_secs(600))
        .await
        .unwrap()
        .uri()
        .to_string();
    assert!(url.contains("X-Goog-Signature="), "{url}");
    assert!(url.contains("X-Goog-Expires=600"), "{url}");
}

/// A PKCS#8 RSA key in PEM from `openssl`, or None without it.
fn throwaway_rsa_key() -> Option<String> {
    let out = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}
