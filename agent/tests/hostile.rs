//! Attacks on real agent and repository processes over loopback (issue 10):
//! each test plays a hostile peer, a lying repository or an untrusted
//! tenant, and checks the attack is refused with a clear error, nothing is
//! lost, nothing is written outside the destination, and memory and disk
//! stay bounded. The hostile peer runs in this process on the real wire
//! protocol (TLS, frames); the victims are `caravan-agent` processes.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use caravan_agent::chunk::{ChunkId, ChunkKeyer, ChunkRef};
use caravan_agent::crypto::Key;
use caravan_agent::identity::{AgentId, SecretKey};
use caravan_agent::manifest::{
    Access, Entry, EntryKind, Manifest, ManifestRecord, ShareId, Ticket,
};
use caravan_agent::record::SignedRecord;
use caravan_agent::trust::{GrantId, Revocation, TrustGrant};
use caravan_agent::util::unix_now;
use caravan_agent::wire::FrameType;
use caravan_agent::wire::client::PeerConn;
use caravan_agent::wire::server::Service;
use caravan_agent::{Error, Result};
use common::*;

// ---------------------------------------------------------------- helpers

/// Deterministic pseudo-random bytes (xorshift).
fn noise(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

fn key_of(a: &TestAgent) -> SecretKey {
    SecretKey::from_text(&std::fs::read_to_string(a.dir.join("identity.key")).unwrap()).unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A hostile peer: serves whatever manifest and chunks it is told to, and
/// counts the connections it gets.
#[derive(Default)]
struct Hostile {
    manifest: Mutex<Option<bytes::Bytes>>,
    /// The answer to every live request (none: not a live share).
    live: Mutex<Option<bytes::Bytes>>,
    chunks: Mutex<HashMap<ChunkId, Vec<u8>>>,
    /// Answer every chunk request with this many bytes (oversize frames).
    huge_chunk: Option<usize>,
    connections: AtomicUsize,
    /// Chunk requests answered.
    chunk_calls: AtomicUsize,
    /// Wait this long before answering each chunk request.
    chunk_delay: Option<Duration>,
}

impl Service for Hostile {
    async fn manifest(&self, _peer: AgentId, _share: ShareId, _have: u64) -> Result<bytes::Bytes> {
        let m = self.manifest.lock().unwrap().clone();
        m.ok_or_else(|| Error::NotFound("unknown share".into()))
    }
    async fn chunk(&self, _peer: AgentId, _share: ShareId, id: ChunkId) -> Result<Vec<u8>> {
        self.chunk_calls.fetch_add(1, Ordering::SeqCst);
        if let Some(d) = self.chunk_delay {
            tokio::time::sleep(d).await;
        }
        if let Some(n) = self.huge_chunk {
            return Ok(vec![7u8; n]);
        }
        let c = self.chunks.lock().unwrap().get(&id).cloned();
        c.ok_or_else(|| Error::NotFound("unknown chunk".into()))
    }
    async fn key(&self, _peer: AgentId, _share: ShareId, _proof: Vec<Vec<u8>>) -> Result<Vec<u8>> {
        Err(Error::NotFound("unknown share".into()))
    }
    async fn live(&self, _peer: AgentId, _share: ShareId, _from: u64) -> Result<bytes::Bytes> {
        let l = self.live.lock().unwrap().clone();
        l.ok_or_else(|| Error::NotFound("unknown share".into()))
    }
    fn peer_connected(&self, _peer: AgentId, connected: bool) {
        if connected {
            self.connections.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Runs `svc` as a peer with key `key` on a loopback port; returns the address.
fn serve_hostile(rt: &tokio::runtime::Runtime, key: &SecretKey, svc: Arc<Hostile>) -> String {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let tls = caravan_agent::wire::tls::server_config(key).unwrap();
    rt.spawn(caravan_agent::wire::server::serve(
        listener,
        tls,
        svc,
        tokio_util::sync::CancellationToken::new(),
    ));
    addr
}

fn count_files(root: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                n += 1;
            }
        }
    }
    n
}

/// The share key and the current manifest of `share`, as recipient `who`.
fn open_manifest(
    rt: &tokio::runtime::Runtime,
    holder: &TestAgent,
    who: &SecretKey,
    ticket: &str,
) -> (Vec<u8>, Manifest, Key) {
    let t = Ticket::parse(ticket).unwrap();
    let key = who.unwrap_key(&t.wrapped_key).unwrap();
    rt.block_on(async {
        let c = PeerConn::connect(&holder.peer_addr, who, None)
            .await
            .unwrap();
        let rec = c.manifest(&t.share_id, 0).await.unwrap();
        let (_, mr): (_, ManifestRecord) = SignedRecord::open_from(&rec, None).unwrap();
        let m = mr.open(&key).unwrap();
        (rec, m, key)
    })
}

/// Minimal HTTP/1.0 request over a plain socket: (status, body).
fn http(addr: &str, method: &str, path: &str, headers: &[&str], body: &[u8]) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// A repository process, killed on drop.
struct RepoProcess {
    addr: String,
    child: Child,
}

impl RepoProcess {
    fn start(dir: &Path) -> RepoProcess {
        let port = free_port();
        let log = std::fs::File::create(dir.join(format!("repo-{port}.log"))).unwrap();
        let child = Command::new(BIN)
            .args([
                "repository",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--storage-scheme",
                "memory",
                "--rate-per-second",
                "100000",
                "--rate-burst",
                "100000",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !http_get(&addr, "/healthz").is_ok_and(|b| b.contains("200")) {
            assert!(Instant::now() < deadline, "repository did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        RepoProcess { addr, child }
    }
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    fn post(&self, rec: &[u8]) -> (u16, String) {
        http(&self.addr, "POST", "/v1/records", &[], rec)
    }
}

impl Drop for RepoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Points an agent's config at `repos`.
fn set_repositories(a: &TestAgent, repos: &[&str]) {
    let text = std::fs::read_to_string(&a.config).unwrap();
    let list: Vec<String> = repos.iter().map(|r| format!("{r:?}")).collect();
    let mut out: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with("repositories"))
        .map(str::to_string)
        .collect();
    out.insert(0, format!("repositories = [{}]", list.join(", ")));
    std::fs::write(&a.config, out.join("\n") + "\n").unwrap();
}

fn config_value(a: &TestAgent, key: &str) -> String {
    let text = std::fs::read_to_string(&a.config).unwrap();
    let line = text
        .lines()
        .find(|l| l.split('=').next().is_some_and(|k| k.trim() == key))
        .unwrap_or_else(|| panic!("{key} not in config"));
    line.split_once('=')
        .unwrap()
        .1
        .trim()
        .trim_matches('"')
        .to_string()
}

fn grant_record(issuer: &SecretKey, subject: AgentId, depth: u8, seq: u64) -> Vec<u8> {
    let now = unix_now();
    let g = TrustGrant {
        issuer: issuer.agent_id(),
        subject,
        depth,
        scope: None,
        not_before: now - 60,
        not_after: now + 3600,
        seq,
    };
    SignedRecord::seal(issuer, &g).unwrap().to_bytes()
}

fn junk_revocation(seq: u64) -> Vec<u8> {
    let k = SecretKey::generate().unwrap();
    let nobody = SecretKey::generate().unwrap().agent_id();
    let r = Revocation {
        issuer: k.agent_id(),
        grant_id: GrantId::of(&k.agent_id(), &nobody, seq),
        seq,
        revoked_at: unix_now(),
    };
    SignedRecord::seal(&k, &r).unwrap().to_bytes()
}

// ------------------------------------------------------------ 1. rollback

/// A peer replays the publisher's older signed manifest (and a forked one of
/// the same version) while the publisher is offline: the fetcher refuses
/// both, says why, keeps the newer version and deletes nothing.
#[test]
fn replayed_or_forked_manifest_is_refused_and_nothing_is_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let mut alice = TestAgent::init(&tmp.path().join("alice"));
    let mut bob = TestAgent::init(&tmp.path().join("bob"));
    let src = alice.data().join("docs");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.txt"), b"first file").unwrap();
    std::fs::write(src.join("b.txt"), b"second file").unwrap();
    alice.start();
    bob.start();
    let rt = rt();
    let (share, tickets) = publish(&alice, "docs", &[&bob.id], &[]);
    assert_eq!(fetch(&bob, &tickets[0], "docs", &[])["state"], "done");
    let (v1, _, share_key) = open_manifest(&rt, &alice, &key_of(&bob), &tickets[0]);

    std::fs::write(src.join("c.txt"), b"added in version 2").unwrap();
    publish(&alice, "docs", &[&bob.id], &["--share", &share]);
    let done = fetch(&bob, &tickets[0], "docs", &[]);
    assert_eq!(done["seq"], 2);
    let c = bob.data().join("docs/c.txt");
    assert!(c.exists());
    alice.kill9();

    // Mallory replays version 1.
    let mallory = Arc::new(Hostile::default());
    *mallory.manifest.lock().unwrap() = Some(v1.into());
    let addr = serve_hostile(&rt, &SecretKey::generate().unwrap(), mallory.clone());
    let (code, err) = fetch_bounded(&bob, &tickets[0], "docs", &[&addr]);
    assert_ne!(code, Some(0), "an older manifest was accepted");
    assert!(
        err.contains("older") && err.contains("version 2"),
        "unclear refusal: {err}"
    );
    assert!(c.exists(), "a replayed manifest deleted a file");
    assert_eq!(std::fs::read(&c).unwrap(), b"added in version 2");

    // A fork: another version 2 signed by the publisher's key.
    let alice_key = key_of(&alice);
    let share_id: ShareId = share.parse().unwrap();
    let keyer = ChunkKeyer::new(&share_key);
    let (r, _) = keyer.seal(b"forked").unwrap();
    let fork = Manifest {
        share_id,
        seq: 2,
        created_at: unix_now(),
        access: Access {
            agents: vec![bob.id.parse().unwrap()],
            trust_depth: None,
        },
        entries: vec![Entry {
            path: "a.txt".into(),
            mode: 0o644,
            kind: EntryKind::File {
                size: 6,
                chunks: vec![r],
            },
        }],
    };
    *mallory.manifest.lock().unwrap() =
        Some(fork.seal(&alice_key, &share_key).unwrap().to_bytes().into());
    let (code, err) = fetch_bounded(&bob, &tickets[0], "docs", &[&addr]);
    assert_ne!(code, Some(0), "a forked manifest was accepted");
    assert!(err.contains("fork"), "unclear refusal: {err}");
    assert!(c.exists(), "a forked manifest deleted a file");
    assert_eq!(
        std::fs::read(bob.data().join("docs/a.txt")).unwrap(),
        b"first file"
    );
}

/// Guarantee: one share id has one publisher on a recipient. Share ids
/// are no secret (repositories and tickets carry them) and anyone can sign
/// a manifest with any id: Mallory's "version 1000" of Alice's share, with
/// a ticket of her own for Bob, is refused before anything changes, so it
/// neither replaces Alice's share (locking her real versions out as
/// "older") nor writes over its files; Alice's next version still comes.
/// The same on the publisher: Alice is not talked into fetching a stranger's
/// version of her own share.
#[test]
fn a_stranger_cannot_take_over_a_share_id() {
    let tmp = tempfile::tempdir().unwrap();
    let mut alice = TestAgent::init(&tmp.path().join("alice"));
    let mut bob = TestAgent::init(&tmp.path().join("bob"));
    let src = alice.data().join("docs");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("contract.txt"), b"the real contract").unwrap();
    alice.start();
    bob.start();
    let rt = rt();
    let (share, tickets) = publish(&alice, "docs", &[&bob.id], &[]);
    assert_eq!(fetch(&bob, &tickets[0], "docs", &[])["state"], "done");

    let share_id: ShareId = share.parse().unwrap();
    let mallory_key = SecretKey::generate().unwrap();
    let mallory_share_key = Key::random().unwrap();
    let keyer = ChunkKeyer::new(&mallory_share_key);
    let (r, sealed) = keyer.seal(b"mallory was here").unwrap();
    let forged = Manifest {
        share_id,
        seq: 1000,
        created_at: unix_now(),
        access: Access {
            agents: vec![bob.id.parse().unwrap(), alice.id.parse().unwrap()],
            trust_depth: None,
        },
        entries: vec![Entry {
            path: "contract.txt".into(),
            mode: 0o644,
            kind: EntryKind::File {
                size: 16,
                chunks: vec![r],
            },
        }],
    };
    let mallory = Arc::new(Hostile::default());
    *mallory.manifest.lock().unwrap() = Some(
        forged
            .seal(&mallory_key, &mallory_share_key)
            .unwrap()
            .to_bytes()
            .into(),
    );
    mallory.chunks.lock().unwrap().insert(r.id, sealed);
    let addr = serve_hostile(&rt, &mallory_key, mallory.clone());
    for (victim, dest) in [(&bob, "docs"), (&bob, "elsewhere"), (&alice, "from-m")] {
        let ticket = Ticket::issue(
            &mallory_key,
            share_id,
            victim.id.parse().unwrap(),
            &mallory_share_key,
            vec![addr.clone()],
            vec![],
        )
        .unwrap();
        let (code, err) = fetch_bounded(victim, &ticket, dest, &[]);
        assert_eq!(code, Some(3), "a stranger's version was taken: {err}");
        assert!(err.contains("one share id has one publisher"), "{err}");
    }
    assert_eq!(
        mallory.chunk_calls.load(Ordering::SeqCst),
        0,
        "nothing was fetched"
    );
    assert_eq!(
        std::fs::read(bob.data().join("docs/contract.txt")).unwrap(),
        b"the real contract"
    );
    // Alice's own versions still reach Bob, and she still publishes them.
    std::fs::write(src.join("contract.txt"), b"the real contract, v2").unwrap();
    publish(&alice, "docs", &[&bob.id], &["--share", &share]);
    let v2 = fetch(&bob, &tickets[0], "docs", &[]);
    assert_eq!(v2["seq"], 2, "{v2}");
    assert_eq!(
        std::fs::read(bob.data().join("docs/contract.txt")).unwrap(),
        b"the real contract, v2"
    );
}

/// Guarantee: addresses that accept and never answer (anyone may announce
/// any address for a share) do not hold a fetch up: once a peer answers,
/// the dials still out get a second more, and the fetch goes. Sixteen such
/// addresses held it 40 s (a TLS deadline per dial, 8 at a time).
#[test]
fn silent_addresses_do_not_hold_a_fetch_up() {
    let tmp = tempfile::tempdir().unwrap();
    let mut alice = TestAgent::init(&tmp.path().join("alice"));
    let mut bob = TestAgent::init(&tmp.path().join("bob"));
    let src = alice.data().join("docs");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.txt"), b"hello").unwrap();
    alice.start();
    bob.start();
    let (_, tickets) = publish(&alice, "docs", &[&bob.id], &[]);
    // Sixteen listeners that accept and say nothing, kept open.
    let silent: Vec<std::net::TcpListener> = (0..16)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<String> = silent
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    let held = Arc::new(Mutex::new(Vec::new()));
    for l in &silent {
        let l = l.try_clone().unwrap();
        let held = held.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                held.lock().unwrap().push(c);
            }
        });
    }
    let peers: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let started = Instant::now();
    let (code, err) = fetch_bounded(&bob, &tickets[0], "docs", &peers);
    let took = started.elapsed();
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        std::fs::read(bob.data().join("docs/a.txt")).unwrap(),
        b"hello"
    );
    assert!(
        took < Duration::from_secs(8),
        "silent addresses held the fetch up for {took:?}"
    );
}

/// Guarantee: peers that complete the handshake and then never answer
/// (anyone may announce a share at a repository) do not hold a fetch up:
/// every peer is asked for the manifest at once, and chunks go to peers
/// that have answered first. (Asked one after another, each such peer cost
/// a minute for the manifest and up to a minute per chunk: four held a
/// fetch of a 6-byte share for over ten minutes.)
#[test]
fn peers_that_never_answer_do_not_hold_a_fetch_up() {
    use tokio::io::AsyncReadExt;
    let tmp = tempfile::tempdir().unwrap();
    let mut alice = TestAgent::init(&tmp.path().join("alice"));
    let mut bob = TestAgent::init(&tmp.path().join("bob"));
    let src = alice.data().join("docs");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.txt"), b"hello").unwrap();
    alice.start();
    bob.start();
    let (_, tickets) = publish(&alice, "docs", &[&bob.id], &[]);
    let rt = rt();
    let addrs: Vec<String> = (0..4)
        .map(|_| {
            let listener = rt
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let tls =
                caravan_agent::wire::tls::server_config(&SecretKey::generate().unwrap()).unwrap();
            rt.spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let Ok(s) = tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await else {
                            return;
                        };
                        let Ok((mut s, _, _)) =
                            caravan_agent::wire::channel::server_switch(s).await
                        else {
                            return;
                        };
                        // Takes every request, answers none.
                        let mut buf = [0u8; 4096];
                        while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
                    });
                }
            });
            addr
        })
        .collect();
    let peers: Vec<&str> = addrs.iter().map(String::as_str).collect();
    // Bounded at 120 s: four silent peers asked in turn took 240 s.
    let (code, err) = fetch_bounded(&bob, &tickets[0], "docs", &peers);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        std::fs::read(bob.data().join("docs/a.txt")).unwrap(),
        b"hello"
    );
}

/// Guarantee: a holder that answers every chunk just inside a request's
/// time limit (anyone may announce a share) does not slow a fetch from an
/// honest publisher down to its pace: a chunk it has not answered within
/// `CARAVAN_SLOW_ANSWER_SECS` is asked of a peer that answers, and the
/// slow one is out after two. (Two such holders held a 400-chunk fetch at
/// 24% after ten minutes.)
#[test]
fn a_holder_answering_just_in_time_does_not_slow_a_fetch_down() {
    let tmp = tempfile::tempdir().unwrap();
    let mut alice = TestAgent::init(&tmp.path().join("alice"));
    let mut bob = TestAgent::init(&tmp.path().join("bob"));
    bob.env
        .push(("CARAVAN_SLOW_ANSWER_SECS".into(), "1".into()));
    let src = alice.data().join("docs");
    std::fs::create_dir_all(&src).unwrap();
    let mut data = vec![0u8; 24 << 20];
    noise(&mut data, 31);
    std::fs::write(src.join("big.bin"), &data).unwrap();
    alice.start();
    bob.start();
    let (_, tickets) = publish(&alice, "docs", &[&bob.id], &[]);
    let rt = rt();
    // The holder serves the share's very manifest and chunks, each chunk
    // after 50 s (inside the 60 s limit of a request).
    let (record, manifest, _) = open_manifest(&rt, &alice, &key_of(&bob), &tickets[0]);
    let share = manifest.share_id;
    let slow = Arc::new(Hostile {
        chunk_delay: Some(Duration::from_secs(50)),
        ..Default::default()
    });
    *slow.manifest.lock().unwrap() = Some(record.into());
    rt.block_on(async {
        let c = PeerConn::connect(&alice.peer_addr, &key_of(&bob), None)
            .await
            .unwrap();
        for (_, _, chunks) in manifest.files() {
            for r in chunks {
                let ct = c.chunk(&share, &r.id).await.unwrap();
                slow.chunks.lock().unwrap().insert(r.id, ct.into_bytes());
            }
        }
    });
    let addr = serve_hostile(&rt, &SecretKey::generate().unwrap(), slow.clone());
    // Bounded at 120 s: at the holder's pace it took minutes.
    let (code, err) = fetch_bounded(&bob, &tickets[0], "docs", &[&addr]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        std::fs::read(bob.data().join("docs/big.bin")).unwrap(),
        data
    );
}

// ------------------------------------------------- 2. stale chunk ids

/// After a file is edited in place (same size, not republished), asking for
/// a chunk id of the old content must not return the new bytes sealed under
/// the old chunk key: a holder only serves bytes that hash to the id asked.
/// Checked on the publisher and on a holder of a fetched share.
#[test]
fn edited_files_are_never_served_under_an_old_chunk_id() {
    let tmp = tempfile::tempdir().unwrap();
    let mut alice = TestAgent::init(&tmp.path().join("alice"));
    let mut bob = TestAgent::init(&tmp.path().join("bob"));
    let src = alice.data().join("live");
    std::fs::create_dir_all(&src).unwrap();
    let mut data = vec![0u8; 700_000];
    noise(&mut data, 5);
    std::fs::write(src.join("f.bin"), &data).unwrap();
    alice.start();
    bob.start();
    let rt = rt();
    let (share, tickets) = publish(&alice, "live", &[&bob.id], &[]);
    assert_eq!(fetch(&bob, &tickets[0], "got", &[])["state"], "done");
    let (_, m, _) = open_manifest(&rt, &alice, &key_of(&bob), &tickets[0]);
    let first: ChunkRef = m.files().next().unwrap().2[0];
    let share_id: ShareId = share.parse().unwrap();

    let secret = vec![0x5au8; data.len()];
    std::fs::write(src.join("f.bin"), &secret).unwrap();
    std::fs::write(bob.data().join("got/f.bin"), &secret).unwrap();

    let sent_before = [
        alice.metric("caravan_chunks_sent_total"),
        bob.metric("caravan_chunks_sent_total"),
    ];
    for (holder, asker) in [(&alice, key_of(&bob)), (&bob, key_of(&alice))] {
        let got = rt.block_on(async {
            let c = PeerConn::connect(&holder.peer_addr, &asker, None)
                .await
                .unwrap();
            c.chunk(&share_id, &first.id).await
        });
        if let Ok(ct) = got {
            assert_eq!(
                blake3::hash(&ct).as_bytes(),
                &first.id.0,
                "{} served other bytes under chunk id {}",
                holder.dir.display(),
                first.id
            );
        }
    }
    // Nothing was sent: the edited data never left either holder.
    assert_eq!(
        [
            alice.metric("caravan_chunks_sent_total"),
            bob.metric("caravan_chunks_sent_total")
        ],
        sent_before
    );
    // A fetch that needs it says what will help: a new version from the
    // publisher (fetching again alone fails the same way).
    let (code, err) = fetch_bounded(&bob, &tickets[0], "again", &[]);
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains("changed since it was published")
            && err.contains(&format!("must publish a new version of the share (`caravan-agent publish PATH --share {share}`)")),
        "{err}"
    );
}

/// Serving checks a chunk by the AEAD tag the publish pass recorded
/// (`<state>/shares/<id>/tags`) instead of hashing it again. The tags
/// persist: a restarted publisher serves exact chunks; a damaged tags
/// file (wrong size) is ignored and wrong tags fall back to the hash, so
/// either way only bytes that hash to the id asked for leave; an edited
/// file is still refused.
#[test]
fn recorded_chunk_tags_serve_exact_chunks_and_damaged_tags_fall_back_to_the_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let mut alice = TestAgent::init(&tmp.path().join("alice"));
    let mut bob = TestAgent::init(&tmp.path().join("bob"));
    let src = alice.data().join("tagged");
    std::fs::create_dir_all(&src).unwrap();
    let mut data = vec![0u8; 6 << 20];
    noise(&mut data, 11);
    std::fs::write(src.join("f.bin"), &data).unwrap();
    alice.start();
    let rt = rt();
    let (share, tickets) = publish(&alice, "tagged", &[&bob.id], &[]);
    let share_id: ShareId = share.parse().unwrap();
    let (_, m, _) = open_manifest(&rt, &alice, &key_of(&bob), &tickets[0]);
    let chunks: Vec<ChunkRef> = m.files().next().unwrap().2.to_vec();
    assert!(
        chunks.len() > 1,
        "want several chunks, got {}",
        chunks.len()
    );
    let tags = alice
        .data()
        .join(".caravan/shares")
        .join(share_id.hex())
        .join("tags");
    let distinct: std::collections::HashSet<_> = chunks.iter().map(|c| c.id).collect();
    assert_eq!(
        std::fs::metadata(&tags).unwrap().len() as usize,
        48 * distinct.len(),
        "one record (id, tag) per chunk"
    );
    // A recipient keeps the tags of the chunks it received, too.
    bob.start();
    assert_eq!(fetch(&bob, &tickets[0], "got", &[])["state"], "done");
    let bob_tags = bob
        .data()
        .join(".caravan/shares")
        .join(share_id.hex())
        .join("tags");
    assert_eq!(std::fs::read(&bob_tags).unwrap().len(), 48 * distinct.len());
    let good = std::fs::read(&tags).unwrap();
    let ask = |holder: &TestAgent| -> Vec<Result<caravan_agent::chunk::Sealed>> {
        rt.block_on(async {
            let c = PeerConn::connect(&holder.peer_addr, &key_of(&bob), None)
                .await
                .unwrap();
            let mut out = Vec::new();
            for r in &chunks {
                out.push(c.chunk(&share_id, &r.id).await);
            }
            out
        })
    };
    let mut wrong = good.clone();
    for rec in wrong.chunks_mut(48) {
        rec[40] ^= 1;
    }
    for (case, file) in [
        ("restarted", good.clone()),
        (
            "tags file of the wrong size",
            good[..good.len() - 1].to_vec(),
        ),
        ("wrong tags", wrong),
    ] {
        alice.kill9();
        std::fs::write(&tags, &file).unwrap();
        alice.start();
        for (r, got) in chunks.iter().zip(ask(&alice)) {
            let ct = got.unwrap_or_else(|e| panic!("{case}: chunk {} refused: {e}", r.id));
            assert_eq!(
                blake3::hash(&ct).as_bytes(),
                &r.id.0,
                "{case}: other bytes served"
            );
        }
    }
    // Edited in place (same size): refused whether the tags are right or not.
    std::fs::write(src.join("f.bin"), vec![0x5au8; data.len()]).unwrap();
    for file in [good.clone(), Vec::new()] {
        alice.kill9();
        std::fs::write(&tags, &file).unwrap();
        alice.start();
        let sent = alice.metric("caravan_chunks_sent_total");
        for (r, got) in chunks.iter().zip(ask(&alice)) {
            if let Ok(ct) = got {
                assert_eq!(blake3::hash(&ct).as_bytes(), &r.id.0, "edited bytes served");
            }
        }
        assert_eq!(
            alice.metric("caravan_chunks_sent_total"),
            sent,
            "edited data left"
        );
    }
}

// ------------------------------------------- 3. huge declared manifest

/// A publisher's small signed manifest repeating one real chunk declares
/// 1 TiB. The fetcher refuses it before writing (declared size over the
/// whole disk's size: it can never fit), forgets the fetch (no re-dial on
/// restart),
/// and its disk use does not grow.
#[test]
fn manifest_declaring_a_terabyte_is_refused_before_writing_and_not_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bob = TestAgent::init(&tmp.path().join("bob"));
    bob.start();
    let rt = rt();
    let evil = SecretKey::generate().unwrap();
    let share_key = Key::random().unwrap();
    let keyer = ChunkKeyer::new(&share_key);
    let mut plain = vec![0u8; 4 << 20];
    noise(&mut plain, 9);
    let (r, ct) = keyer.seal(&plain).unwrap();
    let n = (1u64 << 40) / (4 << 20);
    let share_id = ShareId::random().unwrap();
    let m = Manifest {
        share_id,
        seq: 1,
        created_at: unix_now(),
        access: Access {
            agents: vec![bob.id.parse().unwrap()],
            trust_depth: None,
        },
        entries: vec![Entry {
            path: "big.bin".into(),
            mode: 0o644,
            kind: EntryKind::File {
                size: n * (4 << 20),
                chunks: vec![r; n as usize],
            },
        }],
    };
    let h = Arc::new(Hostile::default());
    *h.manifest.lock().unwrap() = Some(m.seal(&evil, &share_key).unwrap().to_bytes().into());
    h.chunks.lock().unwrap().insert(r.id, ct);
    let addr = serve_hostile(&rt, &evil, h.clone());
    let ticket = Ticket::issue(
        &evil,
        share_id,
        bob.id.parse().unwrap(),
        &share_key,
        vec![addr.clone()],
        vec![],
    )
    .unwrap();
    let before = dir_bytes(&bob.data());
    let (code, err) = fetch_bounded(&bob, &ticket, "huge", &[]);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("declares") && err.contains("limit"),
        "unclear refusal: {err}"
    );
    let grown = dir_bytes(&bob.data()).saturating_sub(before);
    assert!(grown < 1 << 20, "{grown} bytes written for a refused share");

    // Refused for cause: not resumed (and so not re-dialled) on restart.
    let pending = bob.data().join(".caravan/fetches");
    assert_eq!(
        count_files(&pending),
        0,
        "the refused fetch is still pending"
    );
    let dialled = h.connections.load(Ordering::SeqCst);
    bob.kill9();
    bob.start();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        h.connections.load(Ordering::SeqCst),
        dialled,
        "the restarted agent dialled the attacker again"
    );
}

// ------------------------------------------------ 4. junk revocations

/// Revocations of grants that never existed are refused by the repository,
/// and an agent fed hundreds of them by a lying repository stores none.
#[test]
fn revocations_of_unknown_grants_are_refused_and_agent_storage_stays_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = RepoProcess::start(tmp.path());
    let mut accepted = 0;
    for i in 0..300 {
        let (status, body) = repo.post(&junk_revocation(i + 1));
        if status == 200 {
            accepted += 1;
        } else {
            assert!(body.contains("unknown_grant"), "{status} {body}");
        }
    }
    assert_eq!(accepted, 0, "revocations of non-existent grants stored");
    // A revocation of a real grant is still taken.
    let alice = SecretKey::generate().unwrap();
    let bob = SecretKey::generate().unwrap().agent_id();
    assert_eq!(repo.post(&grant_record(&alice, bob, 0, 1)).0, 200);
    let r = Revocation {
        issuer: alice.agent_id(),
        grant_id: GrantId::of(&alice.agent_id(), &bob, 1),
        seq: 1,
        revoked_at: unix_now(),
    };
    let (status, body) = repo.post(&SignedRecord::seal(&alice, &r).unwrap().to_bytes());
    assert_eq!(status, 200, "{body}");

    // A lying repository serving a feed of 300 junk revocations.
    let rt = rt();
    let feed: Arc<Vec<Vec<u8>>> = Arc::new((0..300).map(|i| junk_revocation(i + 1)).collect());
    let served = Arc::new(AtomicUsize::new(0));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let liar = format!("http://{}", listener.local_addr().unwrap());
    {
        use axum::extract::Query;
        use axum::routing::get;
        let feed = feed.clone();
        let served = served.clone();
        let app = axum::Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/v1/revocations",
                get(move |Query(q): Query<HashMap<String, String>>| {
                    let feed = feed.clone();
                    let served = served.clone();
                    async move {
                        served.fetch_add(1, Ordering::SeqCst);
                        let cursor: usize =
                            q.get("cursor").and_then(|c| c.parse().ok()).unwrap_or(0);
                        let page: Vec<&[u8]> = feed
                            .iter()
                            .skip(cursor)
                            .take(1000)
                            .map(|v| v.as_slice())
                            .collect();
                        let next = cursor + page.len();
                        (
                            [
                                (
                                    "content-type",
                                    caravan_agent::repository::FRAMES_CONTENT_TYPE.to_string(),
                                ),
                                (
                                    caravan_agent::repository::NEXT_CURSOR_HEADER,
                                    next.to_string(),
                                ),
                            ],
                            caravan_agent::repository::encode_frames(page),
                        )
                    }
                }),
            );
        rt.spawn(async move { axum::serve(listener, app).await });
    }
    let mut carol = TestAgent::init(&tmp.path().join("carol"));
    set_repositories(&carol, &[&liar]);
    carol
        .env
        .push(("CARAVAN_TRUST_SYNC_SECS".into(), "0.3".into()));
    carol.start();
    let deadline = Instant::now() + Duration::from_secs(30);
    while served.load(Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "the agent never read the feed");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let stored = count_files(&carol.data().join(".caravan/trust/records"));
    assert!(stored < 10, "{stored} junk revocations stored by the agent");
}

// ------------------------------------------------------- 5. sybils

/// 1,000 grants to bob from sybil keys that sort before the honest issuers
/// cannot hide the honest chain alice→carol→bob: bob still proves it and
/// fetches alice's share, and stores none of the strangers' grants.
#[test]
fn sybil_grants_cannot_hide_an_honest_grant() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = RepoProcess::start(tmp.path());
    let url = repo.url();
    let mut alice = TestAgent::init(&tmp.path().join("alice"));
    let mut bob = TestAgent::init(&tmp.path().join("bob"));
    for a in [&alice, &bob] {
        set_repositories(a, &[&url]);
    }
    alice
        .env
        .push(("CARAVAN_TRUST_SYNC_SECS".into(), "0.5".into()));
    bob.env
        .push(("CARAVAN_TRUST_SYNC_SECS".into(), "0.5".into()));
    make_tree(&alice.data().join("club"), 2, 10_000);
    alice.start();
    bob.start();
    let bob_id: AgentId = bob.id.parse().unwrap();
    let alice_id: AgentId = alice.id.parse().unwrap();
    // carol sorts high, so sybils that sort before her are easy to make.
    let carol = loop {
        let k = SecretKey::generate().unwrap();
        if k.agent_id().0[0] >= 0xc0 {
            break k;
        }
    };
    let mut sybils = 0;
    while sybils < 1000 {
        let k = SecretKey::generate().unwrap();
        if k.agent_id().0[0] >= 0xc0 || k.agent_id() == alice_id {
            continue;
        }
        let (status, body) = repo.post(&grant_record(&k, bob_id, 3, 1));
        assert_eq!(status, 200, "{body}");
        sybils += 1;
    }
    let carol_id = carol.agent_id().to_string();
    cli_ok(&[
        "trust",
        "grant",
        "--config",
        alice.cfg(),
        &carol_id,
        "--depth",
        "1",
    ]);
    assert_eq!(repo.post(&grant_record(&carol, bob_id, 0, 1)).0, 200);
    let out = cli_ok(&[
        "publish",
        "--config",
        alice.cfg(),
        "club",
        "--trust-depth",
        "2",
        "--json",
    ]);
    let v = last_json(&out);
    let share = v["share_id"].as_str().unwrap().to_string();
    let ticket = cli_ok(&["ticket", "--config", alice.cfg(), &share, "--to", &bob.id])
        .trim()
        .to_string();
    let (code, err) = fetch_bounded(&bob, &ticket, "club", &[]);
    assert_eq!(code, Some(0), "{err}");
    assert_same_tree(&alice.data().join("club"), &bob.data().join("club"));
    let stored = count_files(&bob.data().join(".caravan/trust/records"));
    assert!(stored < 50, "bob stored {stored} trust records");
}

// ------------------------------------------ 6. junk proofs, CPU and oracle

/// A 1 MiB proof and a proof of 65 junk grants are refused before any
/// signature is checked, with the same answer for an existing share and a
/// missing one.
#[test]
fn oversize_proofs_are_refused_before_signatures_and_the_same_for_every_share() {
    let tmp = tempfile::tempdir().unwrap();
    let mut alice = TestAgent::init(&tmp.path().join("alice"));
    make_tree(&alice.data().join("p"), 1, 1000);
    alice.start();
    let (share, _) = publish(&alice, "p", &[], &["--trust-depth", "2"]);
    let real: ShareId = share.parse().unwrap();
    let missing = ShareId::random().unwrap();
    let mallory = SecretKey::generate().unwrap();
    let junk_grant = {
        let k = SecretKey::generate().unwrap();
        grant_record(&k, mallory.agent_id(), 9, 1)
    };
    let many: Vec<Vec<u8>> = (0..65).map(|_| junk_grant.clone()).collect();
    let big: Vec<Vec<u8>> = (0..70).map(|_| vec![0xabu8; 15_000]).collect();
    let rt = rt();
    for proof in [many, big] {
        let answers: Vec<String> = [real, missing]
            .iter()
            .map(|s| {
                rt.block_on(async {
                    let c = PeerConn::connect(&alice.peer_addr, &mallory, None)
                        .await
                        .unwrap();
                    match c.key(s, &proof).await {
                        Ok(_) => "released".to_string(),
                        Err(e) => e.to_string(),
                    }
                })
            })
            .collect();
        assert_ne!(answers[0], "released");
        assert_eq!(answers[0], answers[1], "existing vs missing share differ");
        assert!(
            answers[0].contains("limit"),
            "not refused by the size limit: {}",
            answers[0]
        );
    }
}

// ---------------------------------------------- 7. connections

fn tls_connect(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    key: &SecretKey,
) -> Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    rt.block_on(async {
        let cfg = caravan_agent::wire::tls::client_config(key, None).ok()?;
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let name = rustls::pki_types::ServerName::try_from("caravan-agent").ok()?;
        tokio::time::timeout(
            Duration::from_secs(10),
            tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
        )
        .await
        .ok()?
        .ok()
    })
}

/// A connection past the TLS handshake, switched to the peer channel: the
/// bare socket and the sending keys, to write malformed or half frames.
fn channel_connect(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    key: &SecretKey,
) -> (tokio::net::TcpStream, caravan_agent::wire::channel::Sealer) {
    let tls = tls_connect(rt, addr, key).unwrap();
    let (tcp, sealer, _) = rt
        .block_on(caravan_agent::wire::channel::client_switch(tls))
        .unwrap();
    (tcp, sealer)
}

/// Guarantee: a peer that sends requests and never reads the answers makes
/// the server prepare at most 32 answers per connection (each holds a
/// chunk in memory until written): a request's turn is given back only
/// once its answer is written. Before, 32 answers queued for the socket
/// and 32 more prepared behind them (about 64 here).
#[test]
fn a_peer_that_reads_no_answers_gets_at_most_32_prepared() {
    use tokio::io::AsyncWriteExt;
    let rt = rt();
    let server_key = SecretKey::generate().unwrap();
    let svc = Arc::new(Hostile {
        huge_chunk: Some(4 << 20),
        ..Default::default()
    });
    let addr = serve_hostile(&rt, &server_key, svc.clone());
    let (mut tcp, mut sealer) = channel_connect(&rt, &addr, &SecretKey::generate().unwrap());
    rt.block_on(async {
        for id in 1..=200u32 {
            let f = caravan_agent::wire::channel::Outgoing {
                typ: FrameType::GetChunk,
                id,
                payload: vec![0u8; 64].into(),
                raw_hash: None,
            };
            sealer.write(&mut tcp, f).await.unwrap();
        }
        tcp.flush().await.unwrap();
        // The connection serves (up to its 32 turns), then a second more
        // for any answer prepared beyond them.
        for _ in 0..200 {
            if svc.chunk_calls.load(Ordering::SeqCst) >= 32 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    });
    let calls = svc.chunk_calls.load(Ordering::SeqCst);
    assert!(calls >= 32, "{calls}: the connection still serves");
    // 32, plus the few 4 MiB answers the kernel's socket buffers took.
    assert!(
        calls <= 40,
        "{calls} answers prepared for a peer reading none"
    );
    eprintln!("{calls} answers prepared for a peer reading none of 200 asked");
    drop(tcp);
}

/// Guarantee: a peer holding the newest version of a share is told
/// "nothing newer" (an empty answer) instead of being sent the manifest
/// again: a subscriber's poll of a big share moves no manifest. A stranger
/// asking the same way is refused as before (no oracle), and a peer
/// behind gets the record.
#[test]
fn a_peer_holding_the_newest_version_is_not_sent_it_again() {
    let tmp = tempfile::tempdir().unwrap();
    let mut alice = TestAgent::init(&tmp.path().join("alice"));
    make_tree(&alice.data().join("s"), 2, 1000);
    alice.start();
    let bob = SecretKey::generate().unwrap();
    let (_, tickets) = publish(&alice, "s", &[&bob.agent_id().to_string()], &[]);
    let rt = rt();
    let (rec, m, _) = open_manifest(&rt, &alice, &bob, &tickets[0]);
    let t = Ticket::parse(&tickets[0]).unwrap();
    rt.block_on(async {
        let c = PeerConn::connect(&alice.peer_addr, &bob, None)
            .await
            .unwrap();
        assert!(c.manifest(&t.share_id, m.seq).await.unwrap().is_empty());
        assert!(c.manifest(&t.share_id, m.seq + 5).await.unwrap().is_empty());
        assert_eq!(c.manifest(&t.share_id, m.seq - 1).await.unwrap(), rec);
        let stranger = PeerConn::connect(&alice.peer_addr, &SecretKey::generate().unwrap(), None)
            .await
            .unwrap();
        let e = stranger.manifest(&t.share_id, m.seq).await.unwrap_err();
        assert!(e.to_string().contains("unknown share"), "{e}");
    });
}

/// Resident memory of this process, in bytes.
fn own_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib << 10
}

/// Guarantee: a peer asking for a big manifest on every request turn of
/// many connections, reading none of the answers, makes the server hold
/// at most `MANIFESTS_PER_PEER` (2) copies of it: each answer is sealed
/// from a copy of the record, made only with one of the peer's turns.
/// Before, every request made its copy at once: 16 connections of 32
/// requests for an 8 MiB record held 4 GiB (and one copy per connection,
/// 128 MiB, without the turns).
#[test]
fn a_peer_asking_for_a_manifest_on_every_turn_gets_few_copies_made() {
    few_copies_of_an_answer_asked_on_every_turn(FrameType::GetManifest);
}

/// Guarantee: the same for a running publish pass's file list (a live
/// answer from position 0, up to tens of MiB for a pass of many files):
/// it is shared with the manifests' turns. Before, every ask encoded a copy
/// of the listing (`node::live` now encodes it once:
/// `live::tests::every_ask_for_the_listing_shares_one_encoding`).
#[test]
fn a_peer_asking_for_a_live_listing_on_every_turn_gets_few_copies_made() {
    few_copies_of_an_answer_asked_on_every_turn(FrameType::GetLive);
}

fn few_copies_of_an_answer_asked_on_every_turn(typ: FrameType) {
    use tokio::io::AsyncWriteExt;
    let rt = rt();
    let svc = Arc::new(Hostile::default());
    let answer: bytes::Bytes = vec![7u8; 8 << 20].into();
    match typ {
        FrameType::GetLive => *svc.live.lock().unwrap() = Some(answer),
        _ => *svc.manifest.lock().unwrap() = Some(answer),
    }
    let addr = serve_hostile(&rt, &SecretKey::generate().unwrap(), svc);
    let asker = SecretKey::generate().unwrap();
    let before = own_rss();
    let mut conns = Vec::new();
    for _ in 0..16 {
        let (mut tcp, mut sealer) = channel_connect(&rt, &addr, &asker);
        rt.block_on(async {
            for id in 1..=32u32 {
                let mut p = ShareId::random().unwrap().0.to_vec();
                p.extend_from_slice(&0u64.to_be_bytes());
                let f = caravan_agent::wire::channel::Outgoing {
                    typ,
                    id,
                    payload: p.into(),
                    raw_hash: None,
                };
                sealer.write(&mut tcp, f).await.unwrap();
            }
            tcp.flush().await.unwrap();
        });
        conns.push(tcp);
    }
    rt.block_on(async { tokio::time::sleep(Duration::from_secs(3)).await });
    let grown = own_rss().saturating_sub(before);
    eprintln!(
        "{} MiB more resident with 512 {typ:?} answers of 8 MiB unread",
        grown >> 20
    );
    // Two copies of 8 MiB, what the kernel's socket buffers took of
    // them, and the runtime's own.
    assert!(
        grown < 80 << 20,
        "{} MiB more resident: more than a few copies of the {typ:?} answer",
        grown >> 20
    );
    drop(conns);
}

/// True once the server has closed `s` (EOF or error), waiting up to `secs`.
fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    rt: &tokio::runtime::Runtime,
    s: &mut S,
    secs: u64,
) -> bool {
    use tokio::io::AsyncReadExt;
    rt.block_on(async {
        let mut buf = [0u8; 4096];
        let until = tokio::time::Instant::now() + Duration::from_secs(secs);
        // A refusal frame may come first; closed means EOF or an error.
        loop {
            match tokio::time::timeout_at(until, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    })
}

/// Guarantee: sockets that never finish (or never start) a TLS handshake
/// cannot keep honest peers out. At a cap, the oldest connection still
/// handshaking gives its slot to the newcomer, both for the per-address
/// cap (a flood from the honest peer's own address) and for the total cap
/// (a flood from another address); established connections keep theirs.
#[test]
fn a_handshake_flood_does_not_keep_honest_peers_out() {
    let tmp = tempfile::tempdir().unwrap();
    let mut alice = TestAgent::init(&tmp.path().join("alice"));
    let mut bob = TestAgent::init(&tmp.path().join("bob"));
    alice.env.push(("CARAVAN_MAX_CONNS".into(), "12".into()));
    alice
        .env
        .push(("CARAVAN_MAX_CONNS_PER_IP".into(), "8".into()));
    let src = alice.data().join("payload");
    make_tree(&src, 4, 300_000);
    alice.start();
    bob.start();
    let (_, tickets) = publish(&alice, "payload", &[&bob.id], &[]);
    let rt = rt();
    let addr: std::net::SocketAddr = alice.peer_addr.parse().unwrap();
    // 8 silent sockets from bob's own address (its cap), 8 from another
    // loopback address sending half a ClientHello (the total cap).
    let flood: Vec<tokio::net::TcpStream> = rt.block_on(async {
        let mut out = Vec::new();
        for i in 0..16 {
            let from = if i < 8 { "127.0.0.1:0" } else { "127.0.0.2:0" };
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(from.parse().unwrap()).unwrap();
            let mut s = sock.connect(addr).await.unwrap();
            if i >= 8 {
                use tokio::io::AsyncWriteExt;
                s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
                    .await
                    .unwrap();
            }
            out.push(s);
        }
        out
    });
    std::thread::sleep(Duration::from_millis(200));
    for round in 0..2 {
        let v = fetch(&bob, &tickets[0], &format!("got{round}"), &[]);
        assert_eq!(v["state"], "done", "round {round}: {v}");
        assert_same_tree(&src, &bob.data().join(format!("got{round}")));
    }
    drop(flood);
}

/// Connections are capped per address and per peer, idle connections and
/// half-sent frames are cut, request frames are bounded per type, and a
/// client refuses a response frame larger than its request type allows.
#[test]
fn connection_flood_idle_and_half_sent_frames_are_cut() {
    use tokio::io::AsyncWriteExt;
    let tmp = tempfile::tempdir().unwrap();
    let mut alice = TestAgent::init(&tmp.path().join("alice"));
    alice
        .env
        .push(("CARAVAN_PEER_IDLE_SECS".into(), "2".into()));
    alice
        .env
        .push(("CARAVAN_PEER_READ_SECS".into(), "2".into()));
    alice
        .env
        .push(("CARAVAN_MAX_CONNS_PER_IP".into(), "8".into()));
    alice
        .env
        .push(("CARAVAN_MAX_CONNS_PER_PEER".into(), "3".into()));
    alice.start();
    let rt = rt();

    // Per peer: the 4th connection with one key is closed.
    let k = SecretKey::generate().unwrap();
    let mut same: Vec<_> = (0..4)
        .filter_map(|_| tls_connect(&rt, &alice.peer_addr, &k))
        .collect();
    let cut = same
        .iter_mut()
        .map(|s| closed_within(&rt, s, 1))
        .filter(|c| *c)
        .count();
    assert!(cut >= 1, "4 connections from one peer all stayed open");
    drop(same);
    std::thread::sleep(Duration::from_millis(300));

    // Per address: fresh keys do not help past the cap.
    let mut flood: Vec<_> = (0..12)
        .filter_map(|_| tls_connect(&rt, &alice.peer_addr, &SecretKey::generate().unwrap()))
        .collect();
    let open = flood
        .iter_mut()
        .map(|s| closed_within(&rt, s, 1))
        .filter(|c| !*c)
        .count();
    assert!(
        open <= 8,
        "{open} connections open from one address (cap 8)"
    );
    drop(flood);
    std::thread::sleep(Duration::from_millis(300));

    // Idle: closed after the idle timeout.
    let mut idle = tls_connect(&rt, &alice.peer_addr, &SecretKey::generate().unwrap()).unwrap();
    assert!(
        closed_within(&rt, &mut idle, 30),
        "idle connection kept open"
    );

    // Half-sent frame: a GetKey header announcing 60,000 bytes, then 10.
    let (mut half, mut sealer) =
        channel_connect(&rt, &alice.peer_addr, &SecretKey::generate().unwrap());
    rt.block_on(async {
        let mut hdr = sealer.header(FrameType::GetKey, 1, 60_000, false).unwrap();
        hdr.extend_from_slice(&[0u8; 10]);
        half.write_all(&hdr).await.unwrap();
        half.flush().await.unwrap();
    });
    assert!(
        closed_within(&rt, &mut half, 30),
        "half-sent frame held open"
    );

    // Per type: a GetChunk frame announcing 1 MiB is refused at once.
    let (mut big, mut sealer) =
        channel_connect(&rt, &alice.peer_addr, &SecretKey::generate().unwrap());
    rt.block_on(async {
        let hdr = sealer
            .header(FrameType::GetChunk, 1, 1 << 20, false)
            .unwrap();
        big.write_all(&hdr).await.unwrap();
        big.flush().await.unwrap();
    });
    assert!(
        closed_within(&rt, &mut big, 10),
        "oversize GetChunk frame read"
    );

    // Client side: a chunk answer over the chunk limit is refused.
    let evil = SecretKey::generate().unwrap();
    let h = Arc::new(Hostile {
        huge_chunk: Some(6 << 20),
        ..Hostile::default()
    });
    let addr = serve_hostile(&rt, &evil, h);
    let err = rt.block_on(async {
        let c = PeerConn::connect(&addr, &SecretKey::generate().unwrap(), None)
            .await
            .unwrap();
        c.chunk(&ShareId::random().unwrap(), &ChunkId([1; 32]))
            .await
    });
    let e = err.expect_err("a 6 MiB chunk frame was accepted");
    assert!(e.to_string().contains("limit"), "{e}");
}

// ------------------------------------------------------------ 8. modes

/// The publisher's setuid, setgid, sticky and world-writable bits are not
/// applied on the fetcher's disk.
#[test]
fn publisher_cannot_set_setuid_or_world_writable_modes() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let mut alice = TestAgent::init(&tmp.path().join("alice"));
    let mut bob = TestAgent::init(&tmp.path().join("bob"));
    let src = alice.data().join("m");
    std::fs::create_dir_all(src.join("open-dir")).unwrap();
    std::fs::write(src.join("suid.sh"), b"#!/bin/sh\n").unwrap();
    std::fs::write(src.join("open.txt"), b"x").unwrap();
    std::fs::write(src.join("open-dir/x"), b"x").unwrap();
    let set =
        |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    set(&src.join("suid.sh"), 0o6777);
    set(&src.join("open.txt"), 0o666);
    set(&src.join("open-dir"), 0o1777);
    // Closed to everyone (this test runs as root, which still reads them):
    // stays closed to group and others, open to the agent's own user only.
    std::fs::create_dir_all(src.join("closed-dir")).unwrap();
    std::fs::write(src.join("closed-dir/y"), b"y").unwrap();
    std::fs::write(src.join("closed.txt"), b"z").unwrap();
    set(&src.join("closed.txt"), 0o000);
    set(&src.join("closed-dir"), 0o000);
    alice.start();
    bob.start();
    let (_, tickets) = publish(&alice, "m", &[&bob.id], &[]);
    assert_eq!(fetch(&bob, &tickets[0], "m", &[])["state"], "done");
    let mode = |p: &str| {
        std::fs::metadata(bob.data().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("m/suid.sh"), 0o775);
    assert_eq!(mode("m/open.txt"), 0o664);
    assert_eq!(mode("m/open-dir"), 0o775);
    assert_eq!(mode("m/closed.txt"), 0o400);
    assert_eq!(mode("m/closed-dir"), 0o700);
}

/// An agent runs as an ordinary user (the operator's pods run as uid
/// 65532): what it may not read is left out of a publish and named, not a
/// pass failing halfway; a read-only folder it received still takes the
/// next version's new, changed and deleted files (it keeps its own owner
/// bits: `u+rwx` on folders, `u+r` on files).
#[test]
fn unreadable_entries_are_left_out_and_read_only_folders_take_the_next_version() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let mut alice = TestAgent::init(&tmp.path().join("alice"));
    let mut bob = TestAgent::init(&tmp.path().join("bob"));
    alice.unprivileged();
    bob.unprivileged();
    let src = alice.data().join("t");
    std::fs::create_dir_all(src.join("ro/deep")).unwrap();
    std::fs::create_dir_all(src.join("locked")).unwrap();
    std::fs::write(src.join("ro/a.txt"), b"one").unwrap();
    std::fs::write(src.join("ro/deep/b.txt"), b"two").unwrap();
    std::fs::write(src.join("locked/x"), b"hidden").unwrap();
    std::fs::write(src.join("secret.txt"), b"hidden").unwrap();
    std::fs::write(src.join("ok.txt"), b"yes").unwrap();
    alice.hand_over();
    let set =
        |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    set(&src.join("ro/a.txt"), 0o444);
    set(&src.join("ro/deep"), 0o555);
    set(&src.join("ro"), 0o555);
    set(&src.join("locked"), 0o000);
    set(&src.join("secret.txt"), 0o000);
    alice.start();
    bob.start();

    let out = cli_ok(&[
        "publish",
        "--config",
        alice.cfg(),
        "t",
        "--to",
        &bob.id,
        "--json",
    ]);
    let v = last_json(&out);
    let mut skipped: Vec<(String, String)> = v["skipped"]["first"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["path"].as_str().unwrap().into(),
                e["reason"].as_str().unwrap().into(),
            )
        })
        .collect();
    skipped.sort();
    assert_eq!(
        skipped,
        [
            ("locked".into(), "unreadable".into()),
            ("secret.txt".into(), "unreadable".into())
        ],
        "{out}"
    );
    let share = v["share_id"].as_str().unwrap().to_string();
    let ticket = v["tickets"][0][1].as_str().unwrap().to_string();
    assert_eq!(fetch(&bob, &ticket, "t", &[])["state"], "done");
    let got = bob.data().join("t");
    assert_eq!(std::fs::read(got.join("ro/deep/b.txt")).unwrap(), b"two");
    assert!(!got.join("locked").exists() && !got.join("secret.txt").exists());
    let mode = |p: &str| std::fs::metadata(got.join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(
        (mode("ro"), mode("ro/deep"), mode("ro/a.txt")),
        (0o755, 0o755, 0o444)
    );

    // Version 2 adds to, changes and deletes from the read-only folders.
    std::fs::write(src.join("ro/a.txt"), b"one, changed").unwrap();
    std::fs::write(src.join("ro/c.txt"), b"three").unwrap();
    std::fs::remove_file(src.join("ro/deep/b.txt")).unwrap();
    std::fs::write(src.join("ro/deep/d.txt"), b"four").unwrap();
    alice.hand_over();
    set(&src.join("locked"), 0o000);
    set(&src.join("secret.txt"), 0o000);
    publish(&alice, "t", &[&bob.id], &["--share", &share]);
    assert_eq!(fetch(&bob, &ticket, "t", &[])["state"], "done");
    assert_eq!(
        std::fs::read(got.join("ro/a.txt")).unwrap(),
        b"one, changed"
    );
    assert_eq!(std::fs::read(got.join("ro/c.txt")).unwrap(), b"three");
    assert_eq!(std::fs::read(got.join("ro/deep/d.txt")).unwrap(), b"four");
    assert!(!got.join("ro/deep/b.txt").exists());
    // (A test run as an ordinary user could not delete these otherwise.)
    set(&src.join("locked"), 0o755);
    set(&src.join("secret.txt"), 0o644);
}

// ------------------------------------------- 9. oracle in metrics and logs

/// A stranger asking for an existing share and for a missing one gets the
/// same answer, the same metrics, and no INFO log line per refusal; metrics
/// bind to loopback unless configured otherwise.
#[test]
fn refusals_leave_no_existence_oracle_in_metrics_or_logs() {
    let tmp = tempfile::tempdir().unwrap();
    let mut alice = TestAgent::init(&tmp.path().join("alice"));
    make_tree(&alice.data().join("s"), 1, 1000);
    alice.start();
    let friend = SecretKey::generate().unwrap().agent_id().to_string();
    let (share, _) = publish(&alice, "s", &[&friend], &[]);
    let real: ShareId = share.parse().unwrap();
    let missing = ShareId::random().unwrap();
    let stranger = SecretKey::generate().unwrap();
    let rt = rt();
    let mut snapshots = Vec::new();
    let mut answers = Vec::new();
    for s in [real, missing] {
        let before = alice.metrics();
        let a = rt.block_on(async {
            let c = PeerConn::connect(&alice.peer_addr, &stranger, None)
                .await
                .unwrap();
            let mut out = Vec::new();
            for _ in 0..20 {
                out.push(format!("{:?}", c.manifest(&s, 0).await.map(|_| ())));
                out.push(format!(
                    "{:?}",
                    c.chunk(&s, &ChunkId([3; 32])).await.map(|_| ())
                ));
                out.push(format!("{:?}", c.key(&s, &[]).await.map(|_| ())));
            }
            out
        });
        answers.push(a);
        let after = alice.metrics();
        let diff: Vec<String> = after
            .lines()
            .filter(|l| l.starts_with("caravan_errors_total") && !before.contains(*l))
            .map(str::to_string)
            .collect();
        snapshots.push(diff);
    }
    assert_eq!(
        answers[0], answers[1],
        "answers differ for an existing share"
    );
    // Whatever is counted, it is counted the same way for both.
    let labels = |d: &Vec<String>| -> Vec<String> {
        d.iter()
            .map(|l| l.split_whitespace().next().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        labels(&snapshots[0]),
        labels(&snapshots[1]),
        "{snapshots:?}"
    );
    let logs = alice.logs();
    let noisy = logs
        .lines()
        .filter(|l| l.contains("INFO") && (l.contains("refused") || l.contains("unauthorized")))
        .count();
    assert_eq!(noisy, 0, "refusals logged at INFO:\n{logs}");

    // A config without metrics_listen binds metrics to loopback.
    let cfg = caravan_agent::config::AgentConfig::parse(
        "identity_file = \"k\"\nadmin_token_file = \"t\"\n[storage]\nscheme = \"memory\"\n",
    )
    .unwrap();
    assert!(
        cfg.metrics_listen.starts_with("127.0.0.1:"),
        "metrics default to {}",
        cfg.metrics_listen
    );
}

// ------------------------------------------------------------ 11. smaller

/// `run` refuses an identity file that others can read.
#[test]
fn identity_file_readable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let alice = TestAgent::init(&tmp.path().join("alice"));
    let key = alice.dir.join("identity.key");
    for mode in [0o644, 0o604, 0o606] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        let mut child = Command::new(BIN)
            .args(["run", "--config", alice.cfg()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.is_some_and(|s| !s.success()),
            "ran with a {mode:o} identity file"
        );
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(
            err.contains("readable") || err.contains("permissions"),
            "{err}"
        );
    }
}

/// The admin API checks the token before it parses a body: a request
/// without the token gets 401 whatever it carries.
#[test]
fn admin_token_is_checked_before_the_body_is_parsed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut alice = TestAgent::init(&tmp.path().join("alice"));
    alice.start();
    let admin = config_value(&alice, "admin_listen");
    for path in [
        "/v1/shares",
        "/v1/fetches",
        "/v1/trust/grants",
        "/v1/trust/revocations",
    ] {
        for body in [&b"{not json"[..], &[0xffu8; 3000][..]] {
            let (status, text) = http(
                &admin,
                "POST",
                path,
                &["Content-Type: application/json"],
                body,
            );
            assert_eq!(status, 401, "{path}: {status} {text}");
        }
    }
}

/// Every failure of the admin API, a body axum cannot read included
/// (wrong content type 415, not JSON 400, a wrong field 422, too large
/// 413), a path segment that is not UTF-8 (400) and an unknown route or
/// method, is the one `{"error": …}` object clients parse; it was axum's
/// plain text.
#[test]
fn admin_api_failures_are_all_json_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let mut alice = TestAgent::init(&tmp.path().join("alice"));
    alice.start();
    let admin = config_value(&alice, "admin_listen");
    let token = std::fs::read_to_string(config_value(&alice, "admin_token_file")).unwrap();
    let auth = format!("Authorization: Bearer {}", token.trim());
    let json = "Content-Type: application/json";
    let big = vec![b' '; 300 * 1024];
    for (method, path, headers, body, want) in [
        ("POST", "/v1/shares", vec![auth.as_str()], &b"{}"[..], 415),
        (
            "POST",
            "/v1/shares",
            vec![auth.as_str(), json],
            &b"{not json"[..],
            400,
        ),
        (
            "POST",
            "/v1/fetches",
            vec![auth.as_str(), json],
            &br#"{"ticket": 7}"#[..],
            422,
        ),
        (
            "POST",
            "/v1/shares",
            vec![auth.as_str(), json],
            &big[..],
            413,
        ),
        (
            "GET",
            "/v1/nothing-here",
            vec![auth.as_str()],
            &b""[..],
            404,
        ),
        ("DELETE", "/v1/status", vec![auth.as_str()], &b""[..], 405),
        ("GET", "/v1/fetches/%FF", vec![auth.as_str()], &b""[..], 400),
        (
            "GET",
            "/v1/trust/why/%FF%FE",
            vec![auth.as_str()],
            &b""[..],
            400,
        ),
    ] {
        let (status, text) = http(&admin, method, path, &headers, body);
        assert_eq!(status, want, "{method} {path}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{method} {path}: {v}"
        );
    }
}

/// Guarantee: a publisher cannot write into a recipient's state folder
/// whatever `state_prefix` the recipient chose: a share holding `st/…`
/// fetched where `st/` is the state folder is refused before anything is
/// written; the manifest check alone knew only the default `.caravan`.
#[test]
fn a_share_cannot_land_in_a_custom_state_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let mut alice = TestAgent::init(&tmp.path().join("alice"));
    let mut carol = TestAgent::init(&tmp.path().join("carol"));
    let cfg = std::fs::read_to_string(&carol.config).unwrap();
    let cfg: String = cfg
        .lines()
        .map(|l| match l.starts_with("state_prefix") {
            true => "state_prefix = \"st/\"\n".to_string(),
            false => format!("{l}\n"),
        })
        .collect();
    assert!(cfg.contains("\"st/\""));
    std::fs::write(&carol.config, cfg).unwrap();
    let src = alice.data().join("evil");
    std::fs::create_dir_all(src.join("st/trust/peers")).unwrap();
    std::fs::write(src.join("normal.txt"), b"fine").unwrap();
    std::fs::write(src.join("st/evil.txt"), b"planted").unwrap();
    std::fs::write(src.join("st/trust/peers/x.json"), b"{}").unwrap();
    alice.start();
    carol.start();
    let (_, tickets) = publish(&alice, "evil", &[&carol.id], &[]);
    for dest in ["", ".", "/"] {
        let out = cli(&[
            "fetch",
            "--config",
            carol.cfg(),
            &tickets[0],
            "--dest",
            dest,
            "--json",
        ]);
        assert_eq!(out.status.code(), Some(5), "fetch --dest {dest:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("state folder"), "{err}");
    }
    assert!(!carol.data().join("st/evil.txt").exists());
    assert!(!carol.data().join("st/trust/peers/x.json").exists());
    assert!(
        !carol.data().join("normal.txt").exists(),
        "nothing was written"
    );
    // Anywhere else it is an ordinary folder.
    let got = fetch(&carol, &tickets[0], "got", &[]);
    assert_eq!(got["state"], "done", "{got}");
    assert_same_tree(&src, &carol.data().join("got"));
}

/// Guarantee: what to publish and where to fetch to stay inside the
/// agent's storage and out of its state folder, refused as bad input
/// before anything is read or written. On a local disk the storage's
/// parent is the agent's own folder (its key, its admin token), and the
/// publish walk and the fetch's direct writes use the disk directly, not
/// through OpenDAL's root check.
#[test]
fn publish_and_fetch_paths_cannot_leave_the_storage_or_enter_the_state() {
    let tmp = tempfile::tempdir().unwrap();
    let mut alice = TestAgent::init(&tmp.path().join("alice"));
    let mut bob = TestAgent::init(&tmp.path().join("bob"));
    make_tree(&alice.data().join("t"), 2, 1000);
    alice.start();
    bob.start();
    for path in ["..", "../", "t/../..", ".caravan", "./.caravan/shares"] {
        let out = cli(&["publish", "--config", alice.cfg(), path, "--to", &bob.id]);
        assert_eq!(out.status.code(), Some(3), "publish {path:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("leaves the agent's storage") || err.contains("state folder"),
            "{err}"
        );
    }
    // The same refusals with `--json` (whose answer streams: the share id
    // goes out before the walk fails), and a link leading into the state.
    std::os::unix::fs::symlink(".caravan", alice.data().join("statelink")).unwrap();
    for path in ["missing", "statelink", "statelink/shares", ".caravan"] {
        let out = cli(&[
            "publish",
            "--config",
            alice.cfg(),
            path,
            "--to",
            &bob.id,
            "--json",
        ]);
        assert_eq!(
            out.status.code(),
            Some(3),
            "publish --json {path:?}: {out:?}"
        );
    }
    let (_, tickets) = publish(&alice, "t", &[&bob.id], &[]);
    for dest in ["../x", "got/../../y", ".caravan/z", "./.caravan"] {
        let out = cli(&["fetch", "--config", bob.cfg(), &tickets[0], "--dest", dest]);
        assert_eq!(out.status.code(), Some(3), "fetch --dest {dest:?}: {out:?}");
    }
    assert!(!bob.dir.join("x").exists() && !tmp.path().join("y").exists());
    // Links in the recipient's storage are not followed: not as the
    // destination (or a folder on its way), nor as a folder of the share.
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, bob.data().join("outlink")).unwrap();
    std::os::unix::fs::symlink(".caravan", bob.data().join("statelink")).unwrap();
    for dest in ["outlink", "outlink/deeper", "statelink/fetches"] {
        let out = cli(&["fetch", "--config", bob.cfg(), &tickets[0], "--dest", dest]);
        assert_eq!(out.status.code(), Some(3), "fetch --dest {dest:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("is a symbolic link"), "{err}");
    }
    std::fs::create_dir_all(alice.data().join("nested/sub")).unwrap();
    std::fs::write(alice.data().join("nested/sub/x.txt"), b"from alice").unwrap();
    let (_, nested) = publish(&alice, "nested", &[&bob.id], &[]);
    std::fs::create_dir_all(bob.data().join("links")).unwrap();
    std::os::unix::fs::symlink(&outside, bob.data().join("links/sub")).unwrap();
    let out = cli(&[
        "fetch",
        "--config",
        bob.cfg(),
        &nested[0],
        "--dest",
        "links",
    ]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("links/sub is a symbolic link"),
        "{out:?}"
    );
    assert!(
        std::fs::read_dir(&outside).unwrap().next().is_none(),
        "written outside"
    );
    let v = fetch(&bob, &tickets[0], "./got//", &[]);
    assert_eq!(v["state"], "done", "{v}");
    assert_same_tree(&alice.data().join("t"), &bob.data().join("got"));
}

/// Guarantee: a connection to a peer that never closes its side is closed
/// whole when it is dropped. (Its reading task waited for the peer with no
/// deadline, holding the socket: two leaked per failed fetch of a silent
/// peer's share, and with announced addresses up to 64.) The peer keeps
/// sending a frame header one byte at a time: a socket still held takes
/// them, a closed one answers with a reset.
#[test]
fn a_dropped_connection_to_a_peer_that_never_closes_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let tls = caravan_agent::wire::tls::server_config(&SecretKey::generate().unwrap()).unwrap();
        let peer = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = tokio_rustls::TlsAcceptor::from(tls)
                .accept(tcp)
                .await
                .unwrap();
            let (mut s, _, _) = caravan_agent::wire::channel::server_switch(tls)
                .await
                .unwrap();
            // Until the client's side is shut (its writer ended).
            let mut buf = [0u8; 4096];
            while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
            for sent in 0..20 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let wrote = s.write_all(&[0]).await.and(s.flush().await);
                if wrote.is_err() {
                    return Some(sent);
                }
            }
            None
        });
        let conn = PeerConn::connect(&addr, &SecretKey::generate().unwrap(), None)
            .await
            .unwrap();
        drop(conn);
        let refused_after = tokio::time::timeout(Duration::from_secs(30), peer)
            .await
            .expect("the peer's side never ended")
            .unwrap();
        assert!(
            refused_after.is_some(),
            "the dropped connection still took the peer's bytes: its socket leaked"
        );
    });
}
