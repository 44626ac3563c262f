//! Trust and repository figures, printed (no harness):
//!
//!   cargo bench -p caravan-agent --bench trust
//!
//! Environment: CARAVAN_BENCH_RECORDS (default 1000000) sets how many
//! records the RSS measurement stores; CARAVAN_BENCH_SKIP_RSS=1 skips it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use caravan_agent::identity::{AgentId, SecretKey};
use caravan_agent::record::SignedRecord;
use caravan_agent::repository::{Repository, RepositoryConfig};
use caravan_agent::trust::{
    Announcement, Revocation, RevocationSet, TrustEngine, TrustGrant, share_locator, verify_chain,
};
use caravan_agent::util::unix_now;
use rayon::prelude::*;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn fake_id(n: u32) -> AgentId {
    let mut b = [0u8; 32];
    b[..4].copy_from_slice(&n.to_be_bytes());
    b[4] = 0xCA;
    AgentId(b)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

const AGENTS: u32 = 20_000;
const GRANTS: usize = 100_000;
const GROUPS: u32 = 10;
const MAX_HOPS: u8 = 8;

/// 20,000 agents in 10 communities of 2,000. Agent 0 (the root) vouches for
/// each community's head; grants are mostly within a community, a few cross.
fn build_graph(now: u64) -> (TrustEngine, Vec<TrustGrant>) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let per = AGENTS / GROUPS;
    let mut grants = Vec::with_capacity(GRANTS);
    let window = |g: &mut TrustGrant| {
        g.not_before = now - 3600;
        g.not_after = now + 30 * 86_400;
    };
    for c in 0..GROUPS {
        let mut g = TrustGrant {
            issuer: fake_id(0),
            subject: fake_id(1 + c * per),
            depth: MAX_HOPS,
            scope: None,
            not_before: 0,
            not_after: 0,
            seq: 1,
        };
        window(&mut g);
        grants.push(g);
    }
    let mut seen = std::collections::HashSet::new();
    while grants.len() < GRANTS {
        let c = rng.below(GROUPS as u64) as u32;
        let i = 1 + c * per + rng.below(per as u64) as u32;
        let cross = rng.below(1000) == 0;
        let sc = if cross {
            rng.below(GROUPS as u64) as u32
        } else {
            c
        };
        let s = 1 + sc * per + rng.below(per as u64) as u32;
        if i == s || !seen.insert((i, s)) {
            continue;
        }
        let mut g = TrustGrant {
            issuer: fake_id(i),
            subject: fake_id(s),
            depth: if cross { 0 } else { 1 + rng.below(5) as u8 },
            scope: None,
            not_before: 0,
            not_after: 0,
            seq: 1,
        };
        window(&mut g);
        grants.push(g);
    }
    let mut e = TrustEngine::new();
    for g in &grants {
        e.add_grant(g.clone());
    }
    (e, grants)
}

fn bench_engine() {
    println!("== trust engine: {GRANTS} grants among {AGENTS} agents, max {MAX_HOPS} hops ==");
    let now = unix_now();
    let t = Instant::now();
    let (mut engine, grants) = build_graph(now);
    println!(
        "build (already verified grants): {:.0} ms ({} agents interned)",
        t.elapsed().as_secs_f64() * 1e3,
        engine.agent_count()
    );
    let root = fake_id(0);
    let t = Instant::now();
    let set = engine.trusted_set(&root, MAX_HOPS, now);
    let full = t.elapsed();
    engine.clear_cache();
    let trusted = set.len();
    println!(
        "trusted set of the root: {trusted} agents, computed with chains in {:.2} ms",
        full.as_secs_f64() * 1e3
    );

    // single checks: random targets (trusted and not)
    let mut rng = Rng(42);
    let targets: Vec<AgentId> = (0..20_000)
        .map(|_| fake_id(1 + rng.below(AGENTS as u64) as u32))
        .collect();
    let mut lat = Vec::with_capacity(targets.len());
    let mut found = 0usize;
    let t = Instant::now();
    for target in &targets {
        let t1 = Instant::now();
        if engine.chain(&root, target, MAX_HOPS, now).is_some() {
            found += 1;
        }
        lat.push(t1.elapsed());
    }
    let total = t.elapsed();
    lat.sort();
    println!(
        "chain(root, random target), warm cache: {:.0} checks/s; latency p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs ({found}/{} trusted)",
        targets.len() as f64 / total.as_secs_f64(),
        percentile(&lat, 0.5).as_secs_f64() * 1e6,
        percentile(&lat, 0.99).as_secs_f64() * 1e6,
        lat.last().map(|d| d.as_secs_f64() * 1e6).unwrap_or(0.0),
        targets.len()
    );
    // worst case: an untrusted target forces a full traversal
    let outsider = fake_id(AGENTS + 5);
    engine.add_grant(TrustGrant {
        issuer: fake_id(AGENTS + 4),
        subject: outsider,
        depth: 0,
        scope: None,
        not_before: now - 10,
        not_after: now + 1000,
        seq: 1,
    });
    let mut lat = Vec::new();
    for _ in 0..500 {
        let t1 = Instant::now();
        assert!(engine.chain(&root, &outsider, MAX_HOPS, now).is_none());
        lat.push(t1.elapsed());
    }
    lat.sort();
    println!(
        "chain(root, untrusted), warm cache: p50 {:.2} µs, p99 {:.2} µs",
        percentile(&lat, 0.5).as_secs_f64() * 1e6,
        percentile(&lat, 0.99).as_secs_f64() * 1e6
    );
    // cold: the cache dropped before every check, so each one is a full
    // search over everything the root reaches
    let mut lat = Vec::new();
    let t = Instant::now();
    for target in targets.iter().take(2_000) {
        engine.clear_cache();
        let t1 = Instant::now();
        let _ = engine.chain(&root, target, MAX_HOPS, now);
        lat.push(t1.elapsed());
    }
    let total = t.elapsed();
    lat.sort();
    println!(
        "chain(root, random target), cold (full search each time): {:.0} checks/s; p50 {:.1} µs, p99 {:.1} µs",
        lat.len() as f64 / total.as_secs_f64(),
        percentile(&lat, 0.5).as_secs_f64() * 1e6,
        percentile(&lat, 0.99).as_secs_f64() * 1e6
    );
    engine.clear_cache();
    let t = Instant::now();
    let ids = engine.trusted_ids(&root, MAX_HOPS, now);
    println!(
        "trusted_ids (no chains): {} agents in {:.2} ms",
        ids.len(),
        t.elapsed().as_secs_f64() * 1e3
    );

    // revocation of the root's grant to community 0's head
    let victim = &grants[0];
    let t = Instant::now();
    engine.add_revocation(&Revocation {
        issuer: victim.issuer,
        grant_id: victim.id(),
        seq: 1,
        revoked_at: now,
    });
    let after = engine.trusted_set(&root, MAX_HOPS, now);
    let reeval = t.elapsed();
    engine.clear_cache();
    let t = Instant::now();
    let after_ids = engine.trusted_ids(&root, MAX_HOPS, now).len();
    let reeval_ids = t.elapsed();
    println!(
        "revocation pruning {} of {trusted} trusted agents ({:.1}%): re-evaluated trust tree in {:.2} ms (ids only: {:.2} ms, {after_ids} remain)",
        trusted - after.len(),
        100.0 * (trusted - after.len()) as f64 / trusted.max(1) as f64,
        reeval.as_secs_f64() * 1e3,
        reeval_ids.as_secs_f64() * 1e3,
    );

    // presented chains: 3 signed hops, verified without a global view
    let keys: Vec<SecretKey> = (1..=4u8).map(|n| SecretKey::from_seed([n; 32])).collect();
    let proof: Vec<SignedRecord> = (0..3)
        .map(|i| {
            SignedRecord::seal(
                &keys[i],
                &TrustGrant {
                    issuer: keys[i].agent_id(),
                    subject: keys[i + 1].agent_id(),
                    depth: 3,
                    scope: None,
                    not_before: now - 10,
                    not_after: now + 1000,
                    seq: 1,
                },
            )
            .expect("seal")
        })
        .collect();
    let wire: Vec<Vec<u8>> = proof.iter().map(|r| r.to_bytes()).collect();
    let revs = RevocationSet::new();
    let n = 2_000;
    let t = Instant::now();
    for _ in 0..n {
        let recs: Vec<SignedRecord> = wire
            .iter()
            .map(|b| SignedRecord::from_bytes(b).expect("decode"))
            .collect();
        verify_chain(
            &keys[0].agent_id(),
            &keys[3].agent_id(),
            4,
            None,
            &recs,
            &revs,
            now,
        )
        .expect("chain");
    }
    println!(
        "verify_chain of a presented 3-hop proof (decode + 3 signature checks): {:.0} /s, {:.1} µs each",
        n as f64 / t.elapsed().as_secs_f64(),
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
}

async fn start_server(op: opendal::Operator) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let cfg = RepositoryConfig {
        rate_per_second: 1e9,
        rate_burst: 1_000_000_000,
        ..RepositoryConfig::default()
    };
    tokio::spawn(async move {
        caravan_agent::repository::serve_with(listener, op, cfg, async move {
            let _ = rx.await;
        })
        .await
        .expect("serve");
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    (format!("http://{addr}"), tx)
}

async fn run_load<F, Fut>(n: usize, concurrency: usize, f: F) -> (Duration, usize)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let f = Arc::new(f);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ok = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (f, next, ok) = (f.clone(), next.clone(), ok.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                if f(i).await {
                    ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    (t.elapsed(), ok.load(std::sync::atomic::Ordering::Relaxed))
}

async fn bench_repository() {
    println!("== repository over loopback HTTP (memory storage, 16 concurrent clients) ==");
    opendal::install_default();
    let op = opendal::Operator::via_iter("memory", Vec::<(String, String)>::new()).expect("memory");
    let (url, stop) = start_server(op).await;
    let http = reqwest::Client::new();
    let now = unix_now();
    let n = 10_000usize;
    let keys: Vec<SecretKey> = (0..100u32)
        .map(|i| {
            let mut s = [7u8; 32];
            s[..4].copy_from_slice(&i.to_be_bytes());
            SecretKey::from_seed(s)
        })
        .collect();
    let records: Vec<Vec<u8>> = (0..n)
        .into_par_iter()
        .map(|i| {
            let k = &keys[i % keys.len()];
            SignedRecord::seal(
                k,
                &TrustGrant {
                    issuer: k.agent_id(),
                    subject: fake_id(i as u32),
                    depth: 1,
                    scope: None,
                    not_before: now - 10,
                    not_after: now + 86_400,
                    seq: 1,
                },
            )
            .expect("seal")
            .to_bytes()
        })
        .collect();
    let records = Arc::new(records);
    let (h, u, r) = (http.clone(), url.clone(), records.clone());
    let (dt, ok) = run_load(n, 16, move |i| {
        let (h, u, r) = (h.clone(), u.clone(), r.clone());
        async move {
            h.post(format!("{u}/v1/records"))
                .header("content-type", "application/octet-stream")
                .body(r[i].clone())
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        }
    })
    .await;
    println!(
        "verified writes (trust grants): {:.0} /s ({ok}/{n} accepted in {:.2} s)",
        n as f64 / dt.as_secs_f64(),
        dt.as_secs_f64()
    );

    // announcements: 100 agents holding one locator (+ lookups)
    let loc = share_locator(&[1; 32]);
    for k in &keys {
        let a = Announcement {
            agent: k.agent_id(),
            addresses: vec!["10.1.2.3:7400".into()],
            locators: vec![loc, share_locator(&k.agent_id().0)],
            seq: 1,
            expires_at: now + 3600,
        };
        let b = SignedRecord::seal(k, &a).expect("seal").to_bytes();
        http.post(format!("{url}/v1/records"))
            .body(b)
            .send()
            .await
            .expect("post");
    }
    let n = 20_000;
    let ids: Arc<Vec<String>> = Arc::new(keys.iter().map(|k| k.agent_id().to_string()).collect());
    let (h, u, idsc) = (http.clone(), url.clone(), ids.clone());
    let (dt, ok) = run_load(n, 16, move |i| {
        let (h, u, ids) = (h.clone(), u.clone(), idsc.clone());
        async move {
            h.get(format!("{u}/v1/announcements/{}", ids[i % ids.len()]))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        }
    })
    .await;
    println!(
        "look-ups, one agent's announcement: {:.0} /s ({ok}/{n} ok)",
        n as f64 / dt.as_secs_f64()
    );
    let n = 2_000;
    let (h, u) = (http.clone(), url.clone());
    let loc_hex = caravan_agent::util::hex(&loc);
    let (dt, ok) = run_load(n, 16, move |_| {
        let (h, u, l) = (h.clone(), u.clone(), loc_hex.clone());
        async move {
            h.get(format!("{u}/v1/locators/{l}"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        }
    })
    .await;
    println!(
        "look-ups, holders of a locator held by 100 agents: {:.0} /s ({ok}/{n} ok)",
        n as f64 / dt.as_secs_f64()
    );
    let _ = stop.send(());
}

async fn bench_rss() {
    if std::env::var("CARAVAN_BENCH_SKIP_RSS").is_ok_and(|v| v == "1") {
        return;
    }
    let total: usize = std::env::var("CARAVAN_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    println!(
        "== repository RSS with {total} stored records (memory storage, in-process submit) =="
    );
    opendal::install_default();
    let op = opendal::Operator::via_iter("memory", Vec::<(String, String)>::new()).expect("memory");
    let repo = Repository::open(op, RepositoryConfig::default())
        .await
        .expect("open");
    let before = rss_kib();
    let now = unix_now();
    let keys: Vec<SecretKey> = (0..1000u32)
        .map(|i| {
            let mut s = [9u8; 32];
            s[..4].copy_from_slice(&i.to_be_bytes());
            SecretKey::from_seed(s)
        })
        .collect();
    let batch = 50_000;
    let t = Instant::now();
    let mut done = 0usize;
    while done < total {
        let m = batch.min(total - done);
        let recs: Vec<Vec<u8>> = (done..done + m)
            .into_par_iter()
            .map(|i| {
                let k = &keys[i % keys.len()];
                SignedRecord::seal(
                    k,
                    &TrustGrant {
                        issuer: k.agent_id(),
                        subject: fake_id(i as u32),
                        depth: 1,
                        scope: None,
                        not_before: now - 10,
                        not_after: now + 86_400,
                        seq: 1,
                    },
                )
                .expect("seal")
                .to_bytes()
            })
            .collect();
        let results = futures::future::join_all(recs.iter().map(|r| repo.submit(r))).await;
        if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
            panic!("submit failed: {e}");
        }
        done += m;
    }
    let after = rss_kib();
    println!(
        "stored {total} grants (each: record + subject index marker) in {:.1} s; RSS {:.0} MiB before, {:.0} MiB after ({:.0} bytes/record, incl. the in-memory storage itself and a 100k-entry verified cache)",
        t.elapsed().as_secs_f64(),
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        (after.saturating_sub(before) as f64 * 1024.0) / total as f64
    );
}

fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    bench_engine();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(bench_repository());
    rt.block_on(bench_rss());
}
