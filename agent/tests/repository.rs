//! The repository over real HTTP on loopback: every refusal, look-ups,
//! the revocation feed, restarts and replicas on `fs`, the client against
//! several repositories (one down, one lying), and the same on S3 (moto)
//! when `CARAVAN_TEST_S3_ENDPOINT` is set.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use caravan_agent::identity::{AgentId, SecretKey};
use caravan_agent::record::{Kind, Record, SignedRecord};
use caravan_agent::repository::{RepositoryClient, RepositoryConfig, encode_frames, serve_with};
use caravan_agent::trust::{Announcement, Revocation, TrustEngine, TrustGrant, share_locator};
use caravan_agent::util::unix_now;
use opendal::Operator;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

struct Server {
    url: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(op: Operator, cfg: RepositoryConfig) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve_with(listener, op, cfg, async move {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        let url = format!("http://{addr}");
        // wait for health
        let http = reqwest::Client::new();
        for _ in 0..100 {
            if http.get(format!("{url}/healthz")).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Server {
            url,
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }
}

fn cfg() -> RepositoryConfig {
    RepositoryConfig {
        rate_per_second: 1e6,
        rate_burst: 1_000_000,
        ..RepositoryConfig::default()
    }
}

fn memory() -> Operator {
    opendal::install_default();
    Operator::via_iter("memory", Vec::<(String, String)>::new()).unwrap()
}

fn fs(root: &std::path::Path) -> Operator {
    opendal::install_default();
    Operator::via_iter("fs", [("root".to_string(), root.display().to_string())]).unwrap()
}

fn key(n: u8) -> SecretKey {
    SecretKey::from_seed([n; 32])
}

fn announcement(k: &SecretKey, seq: u64, locators: Vec<[u8; 32]>) -> Announcement {
    Announcement {
        agent: k.agent_id(),
        addresses: vec![format!("10.0.0.{}:7400", seq % 250)],
        locators,
        seq,
        expires_at: unix_now() + 3600,
    }
}

fn grant(i: &SecretKey, s: &SecretKey, depth: u8, seq: u64) -> TrustGrant {
    let now = unix_now();
    TrustGrant {
        issuer: i.agent_id(),
        subject: s.agent_id(),
        depth,
        scope: None,
        not_before: now - 10,
        not_after: now + 86_400,
        seq,
    }
}

fn revocation(i: &SecretKey, g: &TrustGrant, seq: u64) -> Revocation {
    Revocation {
        issuer: i.agent_id(),
        grant_id: g.id(),
        seq,
        revoked_at: unix_now(),
    }
}

fn seal<T: Record>(k: &SecretKey, v: &T) -> Vec<u8> {
    SignedRecord::seal(k, v).unwrap().to_bytes()
}

async fn post(url: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/records"))
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (status, json)
}

async fn expect_refused(url: &str, body: Vec<u8>, status: u16, reason: &str) {
    let (s, j) = post(url, body).await;
    assert_eq!(s, status, "body {j}");
    assert_eq!(j["error"], reason, "body {j}");
    assert!(
        j["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "body {j}"
    );
}

#[derive(Serialize, Deserialize)]
struct FakeManifest(Vec<u8>);
impl Record for FakeManifest {
    const KIND: Kind = Kind::Manifest;
}

#[tokio::test]
async fn every_refusal_has_a_clear_status_and_reason() {
    let srv = Server::start(memory(), cfg()).await;
    let url = srv.url.clone();
    let a = key(1);
    let b = key(2);

    // accepted baseline
    let (s, j) = post(&url, seal(&a, &announcement(&a, 5, vec![]))).await;
    assert_eq!(s, 200, "{j}");
    assert_eq!(j["kind"], "announcement");
    let baseline_grant = seal(&a, &grant(&a, &b, 1, 5));
    let (s, _) = post(&url, baseline_grant.clone()).await;
    assert_eq!(s, 200);

    // forged: a flipped bit in the signature
    let mut forged = seal(&a, &announcement(&a, 6, vec![]));
    let n = forged.len();
    forged[n - 3] ^= 0x10;
    expect_refused(&url, forged, 403, "forged").await;
    // forged: flipped bit in the body
    let mut forged = seal(&a, &grant(&a, &b, 1, 6));
    forged[50] ^= 1;
    expect_refused(&url, forged, 403, "forged").await;
    // malformed
    expect_refused(&url, b"hello world, not a record at all........................................................................".to_vec(), 400, "malformed").await;
    expect_refused(&url, vec![], 400, "malformed").await;
    // oversize: beyond the HTTP body limit
    expect_refused(&url, vec![7u8; 200_000], 413, "oversize").await;
    // oversize: too many addresses
    let mut big = announcement(&a, 7, vec![]);
    big.addresses = vec!["x:1".into(); 40];
    expect_refused(&url, seal(&a, &big), 413, "oversize").await;
    // replayed-older: equal and lower sequence numbers
    expect_refused(
        &url,
        seal(&a, &announcement(&a, 5, vec![[1; 32]])),
        409,
        "stale",
    )
    .await;
    expect_refused(&url, seal(&a, &announcement(&a, 4, vec![])), 409, "stale").await;
    expect_refused(&url, seal(&a, &grant(&a, &b, 3, 5)), 409, "stale").await;
    // ...but the very same bytes again are idempotent
    let (s, _) = post(&url, baseline_grant).await;
    assert_eq!(s, 200);
    // expired
    let mut old = announcement(&a, 8, vec![]);
    old.expires_at = unix_now() - 1;
    expect_refused(&url, seal(&a, &old), 422, "expired").await;
    let mut g = grant(&a, &b, 1, 9);
    g.not_before = 10;
    g.not_after = 20;
    expect_refused(&url, seal(&a, &g), 422, "expired").await;
    // far future
    let mut far = announcement(&a, 8, vec![]);
    far.expires_at = unix_now() + 5 * 365 * 86_400;
    expect_refused(&url, seal(&a, &far), 422, "far_future").await;
    let mut g = grant(&a, &b, 1, 9);
    g.not_after = unix_now() + 2 * 366 * 86_400;
    expect_refused(&url, seal(&a, &g), 422, "far_future").await;
    let mut r = revocation(&a, &grant(&a, &b, 1, 5), 1);
    r.revoked_at = unix_now() + 86_400;
    expect_refused(&url, seal(&a, &r), 422, "far_future").await;
    // wrong signer: b signs a's announcement, b signs a grant "from" a
    expect_refused(
        &url,
        seal(&b, &announcement(&a, 9, vec![])),
        403,
        "wrong_signer",
    )
    .await;
    expect_refused(&url, seal(&b, &grant(&a, &b, 9, 9)), 403, "wrong_signer").await;
    expect_refused(
        &url,
        seal(&b, &revocation(&a, &grant(&a, &b, 1, 5), 2)),
        403,
        "wrong_signer",
    )
    .await;
    // a kind the repository does not store
    expect_refused(
        &url,
        seal(&a, &FakeManifest(vec![1, 2, 3])),
        415,
        "wrong_kind",
    )
    .await;
    // revocation replay
    let r = seal(&a, &revocation(&a, &grant(&a, &b, 1, 5), 1));
    let (s, j) = post(&url, r.clone()).await;
    assert_eq!(s, 200, "{j}");
    assert_eq!(j["feed_seq"], 0);
    expect_refused(&url, r, 409, "stale").await;

    // metrics count them
    let m = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for reason in [
        "forged",
        "malformed",
        "oversize",
        "stale",
        "expired",
        "far_future",
        "wrong_signer",
        "wrong_kind",
    ] {
        assert!(
            m.contains(&format!(
                "caravan_repository_records_rejected_total{{reason=\"{reason}\"}}"
            )),
            "{reason} missing from metrics:\n{m}"
        );
    }
    assert!(
        m.contains("caravan_repository_records_accepted_total{kind=\"announcement\"} 1"),
        "{m}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn lookups_feed_and_client() {
    let op = memory();
    let srv = Server::start(op.clone(), cfg()).await;
    let (a, b, c) = (key(1), key(2), key(3));
    let share = [42u8; 32];
    let loc = share_locator(&share);
    let client = RepositoryClient::new(std::slice::from_ref(&srv.url)).unwrap();

    // a and b hold the share; c held it but moved on
    client
        .publish(&SignedRecord::seal(&a, &announcement(&a, 1, vec![loc])).unwrap())
        .await
        .unwrap();
    client
        .publish(&SignedRecord::seal(&b, &announcement(&b, 1, vec![loc, [1; 32]])).unwrap())
        .await
        .unwrap();
    client
        .publish(&SignedRecord::seal(&c, &announcement(&c, 1, vec![loc])).unwrap())
        .await
        .unwrap();
    client
        .publish(&SignedRecord::seal(&c, &announcement(&c, 2, vec![])).unwrap())
        .await
        .unwrap();
    // an expired announcement slipped into storage directly (as if it expired since)
    let d = key(4);
    let mut expired = announcement(&d, 1, vec![loc]);
    expired.expires_at = unix_now() - 5;
    let path = format!(
        "records/announcement/{}",
        caravan_agent::util::hex(&d.agent_id().0)
    );
    op.write(&path, seal(&d, &expired)).await.unwrap();
    op.write(
        &format!(
            "index/locator/{}/{}",
            caravan_agent::util::hex(&loc),
            caravan_agent::util::hex(&d.agent_id().0)
        ),
        Vec::<u8>::new(),
    )
    .await
    .unwrap();

    let mut holders: Vec<AgentId> = client
        .holders(&loc)
        .await
        .unwrap()
        .into_iter()
        .map(|(a, _)| a.agent)
        .collect();
    holders.sort();
    let mut want = vec![a.agent_id(), b.agent_id()];
    want.sort();
    assert_eq!(holders, want);
    let (ann, _) = client.announcement(&c.agent_id()).await.unwrap().unwrap();
    assert_eq!(ann.seq, 2);
    assert!(client.announcement(&d.agent_id()).await.unwrap().is_none());
    // the repository only ever saw the locator
    let listing = op.list_with("").recursive(true).await.unwrap();
    assert!(
        listing
            .iter()
            .all(|e| { !e.path().contains(&caravan_agent::util::hex(&share)) })
    );

    // grants and a revocation, then the engine agrees
    let g_ab = grant(&a, &b, 2, 1);
    let g_bc = grant(&b, &c, 0, 1);
    client
        .publish(&SignedRecord::seal(&a, &g_ab).unwrap())
        .await
        .unwrap();
    client
        .publish(&SignedRecord::seal(&b, &g_bc).unwrap())
        .await
        .unwrap();
    let by_issuer = client.grants_by_issuer(&a.agent_id()).await.unwrap();
    assert_eq!(by_issuer.len(), 1);
    let by_subject = client.grants_by_subject(&c.agent_id()).await.unwrap();
    assert_eq!(by_subject[0].0, g_bc);
    let mut engine = TrustEngine::new();
    for (_, rec) in by_issuer.iter().chain(&by_subject) {
        engine.add_grant_record(rec).unwrap();
    }
    let now = unix_now();
    assert_eq!(
        engine
            .chain(&a.agent_id(), &c.agent_id(), 5, now)
            .unwrap()
            .len(),
        2
    );

    assert!(client.sync_revocations().await.unwrap().is_empty());
    client
        .publish(&SignedRecord::seal(&a, &revocation(&a, &g_ab, 1)).unwrap())
        .await
        .unwrap();
    let revs = client.sync_revocations().await.unwrap();
    assert_eq!(revs.len(), 1);
    for (_, rec) in &revs {
        engine.add_revocation_record(rec).unwrap();
    }
    assert!(engine.chain(&a.agent_id(), &c.agent_id(), 5, now).is_none());
    // incremental: nothing new; then one more
    assert!(client.sync_revocations().await.unwrap().is_empty());
    client
        .publish(&SignedRecord::seal(&b, &revocation(&b, &g_bc, 1)).unwrap())
        .await
        .unwrap();
    let revs = client.sync_revocations().await.unwrap();
    assert_eq!(revs.len(), 1);
    assert_eq!(revs[0].0.issuer, b.agent_id());
    assert_eq!(client.cursors()[0].1, 2);
    assert_eq!(
        client
            .revocations_by_issuer(&a.agent_id())
            .await
            .unwrap()
            .len(),
        1
    );
    // paging from a cursor
    let (page, next) = client.fetch_feed(0, 1, 10).await.unwrap();
    assert_eq!((page.len(), next), (1, 2));
    srv.stop().await;
}

#[tokio::test]
async fn client_survives_a_down_repository_and_ignores_lies() {
    let srv = Server::start(memory(), cfg()).await;
    // a repository that answers with forged, expired and foreign records
    let a = key(1);
    let liar_key = key(9);
    let loc = share_locator(&[7; 32]);
    let mut forged = seal(&a, &announcement(&a, 99, vec![loc]));
    let n = forged.len();
    forged[n - 1] ^= 1;
    let mut expired = announcement(&liar_key, 1, vec![loc]);
    expired.expires_at = unix_now() - 100;
    let wrong_signer = seal(&liar_key, &announcement(&a, 100, vec![loc]));
    let not_holding = seal(&liar_key, &announcement(&liar_key, 1, vec![[0; 32]]));
    let body = encode_frames([
        forged.as_slice(),
        &seal(&liar_key, &expired),
        &wrong_signer,
        &not_holding,
    ]);
    let liar = axum::Router::new().route(
        "/v1/locators/{x}",
        axum::routing::get(move || {
            let body = body.clone();
            async move { body }
        }),
    );
    let liar_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let liar_url = format!("http://{}", liar_listener.local_addr().unwrap());
    let liar_task = tokio::spawn(async move {
        let _ = axum::serve(liar_listener, liar).await;
    });
    // a port nobody listens on
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);

    let client = RepositoryClient::with_timeout(
        &[srv.url.clone(), liar_url, dead_url.clone()],
        Duration::from_secs(2),
    )
    .unwrap();
    let report = client
        .publish(&SignedRecord::seal(&a, &announcement(&a, 1, vec![loc])).unwrap())
        .await
        .unwrap();
    assert_eq!(report.accepted, vec![srv.url.clone()]);
    assert_eq!(report.unreachable.len(), 1);
    let holders = client.holders(&loc).await.unwrap();
    assert_eq!(holders.len(), 1);
    assert_eq!(holders[0].0.agent, a.agent_id());
    assert_eq!(holders[0].0.seq, 1);

    // the good repository goes down: the cached answer keeps working
    srv.stop().await;
    let holders = client.holders(&loc).await.unwrap();
    assert_eq!(holders.len(), 1);
    // a question never asked before, with every honest repository down
    let only_dead = RepositoryClient::with_timeout(&[dead_url], Duration::from_secs(1)).unwrap();
    assert!(only_dead.holders(&loc).await.is_err());
    assert!(
        only_dead
            .publish(&SignedRecord::seal(&a, &announcement(&a, 2, vec![])).unwrap())
            .await
            .is_err()
    );
    liar_task.abort();
}

#[tokio::test]
async fn rate_limit_answers_429() {
    let srv = Server::start(
        memory(),
        RepositoryConfig {
            rate_per_second: 0.5,
            rate_burst: 3,
            ..RepositoryConfig::default()
        },
    )
    .await;
    let http = reqwest::Client::new();
    let mut codes = Vec::new();
    for _ in 0..5 {
        let r = http
            .get(format!(
                "{}/v1/announcements/{}",
                srv.url,
                key(1).agent_id()
            ))
            .send()
            .await
            .unwrap();
        codes.push(r.status().as_u16());
    }
    assert_eq!(&codes[..3], &[404, 404, 404]);
    assert_eq!(codes[4], 429);
    // health and metrics are not rate limited
    assert_eq!(
        http.get(format!("{}/healthz", srv.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    srv.stop().await;
}

/// Behind an ingress every request comes from one address. With the ingress
/// as a trusted proxy each client (X-Forwarded-For) gets its own bucket;
/// without it the header is ignored (anyone can send it) and all share one.
#[tokio::test]
async fn rate_limit_keys_on_the_forwarded_client_only_behind_a_trusted_proxy() {
    async fn codes(trusted: &str) -> Vec<(String, u16)> {
        let srv = Server::start(
            memory(),
            RepositoryConfig {
                rate_per_second: 0.01,
                rate_burst: 2,
                trusted_proxies: if trusted.is_empty() {
                    vec![]
                } else {
                    vec![trusted.parse().unwrap()]
                },
                ..RepositoryConfig::default()
            },
        )
        .await;
        let http = reqwest::Client::new();
        let mut out = Vec::new();
        for client in [
            "198.51.100.1",
            "198.51.100.1",
            "198.51.100.2",
            "198.51.100.2",
        ] {
            let r = http
                .get(format!(
                    "{}/v1/announcements/{}",
                    srv.url,
                    key(1).agent_id()
                ))
                .header("x-forwarded-for", format!("203.0.113.9, {client}"))
                .send()
                .await
                .unwrap();
            out.push((client.to_string(), r.status().as_u16()));
        }
        srv.stop().await;
        out
    }
    let trusted = codes("127.0.0.1/32").await;
    assert!(
        trusted.iter().all(|(_, c)| *c == 404),
        "two clients, two requests each, burst 2: none limited: {trusted:?}"
    );
    let untrusted = codes("").await;
    assert_eq!(
        untrusted.iter().map(|(_, c)| *c).collect::<Vec<_>>(),
        [404, 404, 429, 429],
        "one shared bucket when the proxy is not trusted"
    );
}

/// Publishes a known set of records and returns what look-ups should say.
async fn populate(url: &str) -> (Vec<SignedRecord>, [u8; 32]) {
    let client = RepositoryClient::new(&[url.to_string()]).unwrap();
    let loc = share_locator(&[3; 32]);
    let mut revs = Vec::new();
    for n in 1..=5u8 {
        let k = key(n);
        client
            .publish(&SignedRecord::seal(&k, &announcement(&k, 1, vec![loc])).unwrap())
            .await
            .unwrap();
        let g = grant(&k, &key(n + 1), 1, 1);
        client
            .publish(&SignedRecord::seal(&k, &g).unwrap())
            .await
            .unwrap();
        if n % 2 == 1 {
            let r = SignedRecord::seal(&k, &revocation(&k, &g, 1)).unwrap();
            client.publish(&r).await.unwrap();
            revs.push(r);
        }
    }
    (revs, loc)
}

async fn snapshot(url: &str, loc: &[u8; 32]) -> BTreeMap<String, usize> {
    let client = RepositoryClient::new(&[url.to_string()]).unwrap();
    let mut out = BTreeMap::new();
    out.insert("holders".into(), client.holders(loc).await.unwrap().len());
    let mut grants = 0;
    for n in 1..=6u8 {
        grants += client
            .grants_by_issuer(&key(n).agent_id())
            .await
            .unwrap()
            .len();
    }
    out.insert("grants".into(), grants);
    out.insert(
        "revocations".into(),
        client.sync_revocations().await.unwrap().len(),
    );
    out.insert("feed_cursor".into(), client.cursors()[0].1 as usize);
    out
}

#[tokio::test]
async fn fs_restart_loses_nothing_and_replicas_agree() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(fs(dir.path()), cfg()).await;
    let (revs, loc) = populate(&srv.url).await;
    let before = snapshot(&srv.url, &loc).await;
    assert_eq!(before["holders"], 5);
    assert_eq!(before["grants"], 5);
    assert_eq!(before["revocations"], revs.len());
    srv.stop().await;

    // restart on the same directory
    let srv = Server::start(fs(dir.path()), cfg()).await;
    assert_eq!(snapshot(&srv.url, &loc).await, before);
    // a replay is still refused after the restart (state really persisted)
    let (s, _) = post(&srv.url, revs[0].to_bytes()).await;
    assert_eq!(s, 409);

    // a second replica on the same directory
    let replica = Server::start(fs(dir.path()), cfg()).await;
    assert_eq!(snapshot(&replica.url, &loc).await, before);
    // writes through either are seen by both, and the feed numbering is shared
    let k = key(20);
    let g = grant(&k, &key(21), 0, 1);
    let g_bytes = seal(&k, &g);
    let (s, _) = post(&srv.url, g_bytes.clone()).await;
    assert_eq!(s, 200);
    let (s, j) = post(&replica.url, seal(&k, &revocation(&k, &g, 1))).await;
    assert_eq!(s, 200);
    assert_eq!(j["feed_seq"], revs.len() as u64);
    let g2 = grant(&k, &key(22), 0, 1);
    assert_eq!(post(&replica.url, seal(&k, &g2)).await.0, 200);
    let (s, j) = post(&srv.url, seal(&k, &revocation(&k, &g2, 1))).await;
    assert_eq!(s, 200);
    assert_eq!(
        j["feed_seq"],
        revs.len() as u64 + 1,
        "replica A must see B's feed entry"
    );
    let a_view = snapshot(&srv.url, &loc).await;
    let b_view = snapshot(&replica.url, &loc).await;
    assert_eq!(a_view, b_view);
    assert_eq!(a_view["revocations"], revs.len() + 2);
    // stale check across replicas
    let (s, _) = post(&replica.url, g_bytes).await;
    assert_eq!(s, 200); // same bytes: idempotent
    let (s, _) = post(
        &replica.url,
        seal(&key(1), &announcement(&key(1), 1, vec![])),
    )
    .await;
    assert_eq!(s, 409);
    srv.stop().await;
    replica.stop().await;
}

#[tokio::test]
async fn concurrent_revocations_on_two_replicas_get_distinct_feed_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let a = Server::start(fs(dir.path()), cfg()).await;
    let b = Server::start(fs(dir.path()), cfg()).await;
    let mut tasks = Vec::new();
    for n in 0..20u8 {
        let url = if n % 2 == 0 {
            a.url.clone()
        } else {
            b.url.clone()
        };
        tasks.push(tokio::spawn(async move {
            let k = key(100 + n);
            let g = grant(&k, &key(1), 0, 1);
            // Only stored grants can be revoked (issue 10).
            assert_eq!(post(&url, seal(&k, &g)).await.0, 200);
            post(&url, seal(&k, &revocation(&k, &g, 1))).await
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        let (s, j) = t.await.unwrap();
        assert_eq!(s, 200, "{j}");
        seqs.push(j["feed_seq"].as_u64().unwrap());
    }
    seqs.sort();
    assert_eq!(seqs, (0..20).collect::<Vec<u64>>());
    let client = RepositoryClient::new(std::slice::from_ref(&a.url)).unwrap();
    assert_eq!(client.sync_revocations().await.unwrap().len(), 20);
    a.stop().await;
    b.stop().await;
}

fn s3_operator(root: &str) -> Option<Operator> {
    let endpoint = match std::env::var("CARAVAN_TEST_S3_ENDPOINT") {
        Ok(e) if !e.is_empty() => e,
        _ => {
            eprintln!(
                "SKIPPED: CARAVAN_TEST_S3_ENDPOINT is not set (run `tests/s3/moto.sh start` and export what it prints)"
            );
            return None;
        }
    };
    let bucket = std::env::var("CARAVAN_TEST_S3_BUCKET").unwrap_or_else(|_| "caravan-test".into());
    opendal::install_default();
    Some(
        Operator::via_iter(
            "s3",
            [
                ("bucket", bucket.as_str()),
                ("endpoint", endpoint.as_str()),
                ("region", "us-east-1"),
                ("access_key_id", "testing"),
                ("secret_access_key", "testing"),
                ("root", root),
                ("disable_config_load", "true"),
                ("disable_ec2_metadata", "true"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .unwrap(),
    )
}

#[tokio::test]
async fn s3_replicas_restart_and_refusals() {
    let root = format!("/repo-test-{}-{}/", std::process::id(), unix_now());
    let Some(op) = s3_operator(&root) else {
        return;
    };
    let srv = Server::start(op, cfg()).await;
    let (revs, loc) = populate(&srv.url).await;
    let before = snapshot(&srv.url, &loc).await;
    assert_eq!(before["holders"], 5);
    assert_eq!(before["revocations"], revs.len());
    let (s, _) = post(&srv.url, revs[0].to_bytes()).await;
    assert_eq!(s, 409);
    let mut forged = revs[1].to_bytes();
    forged[45] ^= 4;
    expect_refused(&srv.url, forged, 403, "forged").await;
    srv.stop().await;
    // restart plus a second replica on the same bucket prefix
    let a = Server::start(s3_operator(&root).unwrap(), cfg()).await;
    let b = Server::start(s3_operator(&root).unwrap(), cfg()).await;
    assert_eq!(snapshot(&a.url, &loc).await, before);
    assert_eq!(snapshot(&b.url, &loc).await, before);
    let k = key(30);
    let g = grant(&k, &key(31), 0, 1);
    assert_eq!(post(&a.url, seal(&k, &g)).await.0, 200);
    let (s, j) = post(&b.url, seal(&k, &revocation(&k, &g, 1))).await;
    assert_eq!(s, 200, "{j}");
    assert_eq!(j["feed_seq"], revs.len() as u64);
    let client = RepositoryClient::new(std::slice::from_ref(&a.url)).unwrap();
    assert_eq!(
        client.sync_revocations().await.unwrap().len(),
        revs.len() + 1
    );
    // concurrent revocations through both replicas get distinct feed numbers
    let mut tasks = Vec::new();
    for n in 0..10u8 {
        let url = if n % 2 == 0 {
            a.url.clone()
        } else {
            b.url.clone()
        };
        tasks.push(tokio::spawn(async move {
            let k = key(150 + n);
            let g = grant(&k, &key(1), 0, 1);
            // Only stored grants can be revoked (issue 10).
            assert_eq!(post(&url, seal(&k, &g)).await.0, 200);
            post(&url, seal(&k, &revocation(&k, &g, 1))).await
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        let (s, j) = t.await.unwrap();
        assert_eq!(s, 200, "{j}");
        seqs.push(j["feed_seq"].as_u64().unwrap());
    }
    seqs.sort();
    let first = revs.len() as u64 + 1;
    assert_eq!(seqs, (first..first + 10).collect::<Vec<u64>>());
    assert_eq!(client.sync_revocations().await.unwrap().len(), 10);
    a.stop().await;
    b.stop().await;
}

/// Guarantee: an issuer's grants and revocations are listed in pages
/// (`?after=` + the next-cursor header), so an issuer with more records
/// than one answer holds is still seen whole; a malformed cursor is a 400.
#[tokio::test]
async fn issuer_listings_are_paged() {
    let cfg = RepositoryConfig {
        max_results: 3,
        ..cfg()
    };
    let server = Server::start(memory(), cfg).await;
    let client = RepositoryClient::new(std::slice::from_ref(&server.url)).unwrap();
    let issuer = key(200);
    let mut grants = Vec::new();
    for n in 0..8u8 {
        let g = grant(&issuer, &key(n + 1), 1, 1);
        client
            .publish(&SignedRecord::seal(&issuer, &g).unwrap())
            .await
            .unwrap();
        grants.push(g);
    }
    let got = client.grants_by_issuer(&issuer.agent_id()).await.unwrap();
    assert_eq!(got.len(), 8, "every page of grants was read");
    for g in grants.iter().take(7) {
        client
            .publish(&SignedRecord::seal(&issuer, &revocation(&issuer, g, 1)).unwrap())
            .await
            .unwrap();
    }
    let revs = client
        .revocations_by_issuer(&issuer.agent_id())
        .await
        .unwrap();
    assert_eq!(revs.len(), 7, "every page of revocations was read");

    let http = reqwest::Client::new();
    let base = format!(
        "{}/v1/grants/by-issuer/{}",
        server.url,
        caravan_agent::util::hex(&issuer.agent_id().0)
    );
    let first = http.get(&base).send().await.unwrap();
    let next = first
        .headers()
        .get("x-caravan-next-cursor")
        .expect("a first page of 3 out of 8 names the next")
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(next.len(), 64);
    let bad = http
        .get(format!("{base}?after=../../etc"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), reqwest::StatusCode::BAD_REQUEST);
    server.stop().await;
}
