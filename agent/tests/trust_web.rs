//! The web of trust end to end with real processes on loopback: a
//! `caravan-agent repository` process, agent daemons that grant, revoke,
//! fetch shares published for "agents I trust within depth N", and the
//! refusals: a revoked chain, an expired grant, a chain beyond a hop's
//! depth, a grant signed by the wrong key, and a repository serving forged
//! records. Plus `demo --scenario trust --json`.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use caravan_agent::daemon::read_identity;
use caravan_agent::identity::{AgentId, SecretKey};
use caravan_agent::manifest::{ShareId, Ticket};
use caravan_agent::record::SignedRecord;
use caravan_agent::repository::RepositoryClient;
use caravan_agent::trust::TrustGrant;
use caravan_agent::util::unix_now;
use caravan_agent::wire::client::PeerConn;
use common::*;

/// A repository process, killed on drop.
struct RepoProcess {
    url: String,
    child: Child,
}

impl RepoProcess {
    fn start(dir: &Path) -> RepoProcess {
        Self::start_with(dir, free_port(), &["--storage-scheme", "memory"])
    }

    /// A repository on `port` keeping its records in `root` (fs), so a
    /// restart on the same port finds them again.
    fn start_fs(dir: &Path, port: u16, root: &Path) -> RepoProcess {
        let opt = format!("root={}", root.display());
        Self::start_with(
            dir,
            port,
            &["--storage-scheme", "fs", "--storage-option", &opt],
        )
    }

    fn start_with(dir: &Path, port: u16, storage: &[&str]) -> RepoProcess {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("repo-{port}.log")))
            .unwrap();
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["repository", "--listen", &listen];
        args.extend_from_slice(storage);
        args.extend_from_slice(&["--rate-per-second", "10000", "--rate-burst", "10000"]);
        let child = Command::new(BIN)
            .args(&args)
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
        RepoProcess {
            url: format!("http://{addr}"),
            child,
        }
    }
}

impl Drop for RepoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An agent configured with `repos`, syncing trust every half second.
fn agent(base: &Path, name: &str, repos: &[&str]) -> TestAgent {
    let dir = base.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut a = TestAgent::init(&dir);
    set_repositories(&a, repos);
    a.env.push(("CARAVAN_TRUST_SYNC_SECS".into(), "0.5".into()));
    a.start();
    a
}

/// Points an agent's config at `repos` (replacing the line `init` wrote).
fn set_repositories(a: &TestAgent, repos: &[&str]) {
    let text = std::fs::read_to_string(&a.config).unwrap();
    let list: Vec<String> = repos.iter().map(|r| format!("{r:?}")).collect();
    let line = format!("repositories = [{}]", list.join(", "));
    let mut out: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with("repositories"))
        .map(str::to_string)
        .collect();
    out.insert(0, line);
    std::fs::write(&a.config, out.join("\n") + "\n").unwrap();
}

fn grant(from: &TestAgent, to: &TestAgent, depth: u8, extra: &[&str]) -> serde_json::Value {
    let d = depth.to_string();
    let mut args = vec![
        "trust",
        "grant",
        "--config",
        from.cfg(),
        &to.id,
        "--depth",
        &d,
        "--json",
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(&cli_ok(&args)).unwrap()
}

fn ticket(publisher: &TestAgent, share: &str, to: &TestAgent) -> String {
    cli_ok(&["ticket", "--config", publisher.cfg(), share, "--to", &to.id])
        .trim()
        .to_string()
}

/// Runs `fetch` and returns its exit code and stderr.
fn try_fetch(a: &TestAgent, ticket: &str, dest: &str) -> (Option<i32>, String) {
    let out = cli(&[
        "fetch",
        "--config",
        a.cfg(),
        ticket,
        "--dest",
        dest,
        "--json",
    ]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn key_of(a: &TestAgent) -> SecretKey {
    read_identity(&a.dir.join("identity.key")).unwrap()
}

/// Presents `proof` to `publisher` over the peer protocol as `who`; true
/// when the publisher released the key.
fn key_released(publisher: &TestAgent, who: &SecretKey, share: &str, proof: &[Vec<u8>]) -> bool {
    let share: ShareId = share.parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = PeerConn::connect(&publisher.peer_addr, who, None)
            .await
            .unwrap();
        conn.key(&share, proof).await.is_ok()
    })
}

fn signed_grant(key: &SecretKey, issuer: AgentId, subject: AgentId, window: (u64, u64)) -> Vec<u8> {
    let g = TrustGrant {
        issuer,
        subject,
        depth: 0,
        scope: None,
        not_before: window.0,
        not_after: window.1,
        seq: 1,
    };
    SignedRecord::seal(key, &g).unwrap().to_bytes()
}

#[test]
fn trust_web_with_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let repo = RepoProcess::start(base);
    let r = [repo.url.as_str()];
    let alice = agent(base, "alice", &r);
    let bob = agent(base, "bob", &r);
    let carol = agent(base, "carol", &r);
    let dave = agent(base, "dave", &r);
    let erin = agent(base, "erin", &r);
    let frank = agent(base, "frank", &r);

    grant(&alice, &bob, 1, &[]);
    grant(&bob, &carol, 0, &[]);
    // A second path to carol, which survives revoking alice→bob.
    grant(&alice, &frank, 1, &[]);
    grant(&frank, &carol, 0, &[]);
    // Too deep: carol may not vouch (depth 0), so carol→dave does not count.
    grant(&carol, &dave, 0, &[]);
    // Expires almost at once.
    grant(&alice, &erin, 0, &["--expires", "2s"]);

    let src = alice.data().join("photos");
    make_tree(&src, 4, 50_000);
    let out = cli_ok(&[
        "publish",
        "--config",
        alice.cfg(),
        "photos",
        "--trust-depth",
        "3",
        "--json",
    ]);
    let v = last_json(&out);
    let share = v["share_id"].as_str().unwrap().to_string();

    // `trust why` explains the chain, and the absence of one.
    let why = cli_ok(&["trust", "why", "--config", alice.cfg(), &carol.id]);
    assert!(why.contains("trusted through 2 grant(s)"), "{why}");
    let out = cli(&["trust", "why", "--config", alice.cfg(), &dave.id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("not trusted"));
    let list = cli_ok(&["trust", "list", "--config", alice.cfg(), "--json"]);
    let l: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(l["issued"].as_array().unwrap().len(), 3);

    // bob and carol fetch through their chains.
    for a in [&bob, &carol] {
        let t = ticket(&alice, &share, a);
        let p = fetch(a, &t, "got", &[]);
        assert_eq!(p["state"], "done");
        assert_same_tree(&src, &a.data().join("got"));
    }
    // The repository knows who holds the share.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let peers = cli_ok(&["peers", "--config", dave.cfg(), &share, "--json"]);
        let p: serde_json::Value = serde_json::from_str(&peers).unwrap();
        let ids: Vec<&str> = p
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["agent_id"].as_str().unwrap())
            .collect();
        if ids.contains(&alice.id.as_str()) && ids.contains(&carol.id.as_str()) {
            break;
        }
        assert!(Instant::now() < deadline, "peers never listed: {peers}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Depth exceeded: dave is refused.
    let (code, err) = try_fetch(&dave, &ticket(&alice, &share, &dave), "got");
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains("refused the share key"), "{err}");

    // Expired grant: erin is refused once it lapsed.
    std::thread::sleep(Duration::from_millis(2500));
    let (code, err) = try_fetch(&erin, &ticket(&alice, &share, &erin), "got");
    assert_eq!(code, Some(5), "{err}");

    // A grant alice→dave signed by mallory's key, presented directly.
    let mallory = SecretKey::generate().unwrap();
    let dave_key = key_of(&dave);
    let alice_id: AgentId = alice.id.parse().unwrap();
    let now = unix_now();
    let forged = signed_grant(&mallory, alice_id, dave_key.agent_id(), (now, now + 3600));
    assert!(!key_released(&alice, &dave_key, &share, &[forged]));
    // An expired grant signed by alice's real key, presented directly.
    let expired = signed_grant(
        &key_of(&alice),
        alice_id,
        dave_key.agent_id(),
        (now - 7200, now - 3600),
    );
    assert!(!key_released(&alice, &dave_key, &share, &[expired]));
    // Control: a valid one is accepted, so the refusals above are about the grant.
    let valid = signed_grant(
        &key_of(&alice),
        alice_id,
        dave_key.agent_id(),
        (now, now + 3600),
    );
    assert!(key_released(&alice, &dave_key, &share, &[valid]));

    // Revoke alice→bob: bob and carol are cut off from the next version.
    let started = Instant::now();
    cli_ok(&["trust", "revoke", "--config", alice.cfg(), &bob.id]);
    let bob_key = key_of(&bob);
    assert!(!key_released(&alice, &bob_key, &share, &[]));
    let revoked_in = started.elapsed();
    std::fs::write(src.join("v2.txt"), b"second version").unwrap();
    cli_ok(&[
        "publish",
        "--config",
        alice.cfg(),
        "photos",
        "--trust-depth",
        "3",
        "--share",
        &share,
        "--rotate-key",
        "--json",
    ]);
    let (code, err) = try_fetch(&bob, &ticket(&alice, &share, &bob), "got");
    assert_eq!(code, Some(5), "{err}");
    let why = cli(&["trust", "why", "--config", alice.cfg(), &bob.id]);
    assert_eq!(why.status.code(), Some(1));
    // carol survives through frank and gets the new version.
    let p = fetch(&carol, &ticket(&alice, &share, &carol), "got", &[]);
    assert_eq!(p["state"], "done");
    assert_eq!(p["seq"], 2);
    assert_same_tree(&src, &carol.data().join("got"));
    let why = cli_ok(&["trust", "why", "--config", alice.cfg(), &carol.id]);
    assert!(why.contains(&frank.id), "{why}");
    eprintln!("revocation effective after {revoked_in:?}");
    // Clear CLI errors for bad input.
    let out = cli(&[
        "trust",
        "grant",
        "--config",
        alice.cfg(),
        "not-an-id",
        "--depth",
        "1",
    ]);
    // A malformed id is bad input (3), like a malformed ticket.
    assert_eq!(out.status.code(), Some(3));
    let out = cli(&["trust", "revoke", "--config", alice.cfg(), &dave.id]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no grant"));
}

/// A repository that answers every look-up with forged records: grants
/// "alice→dave" signed by mallory, and an announcement for the share that
/// mallory signed in dave's name. The agent must verify and drop them all.
#[test]
fn forged_repository_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mallory = SecretKey::generate().unwrap();
    // Start alice without repositories first, to know her id.
    let alice = agent(base, "alice", &[]);
    let alice_id: AgentId = alice.id.parse().unwrap();
    let dave_dir = base.join("dave");
    std::fs::create_dir_all(&dave_dir).unwrap();
    let mut dave = TestAgent::init(&dave_dir);
    let dave_id: AgentId = dave.id.parse().unwrap();

    let now = unix_now();
    let forged_grant = signed_grant(&mallory, alice_id, dave_id, (now, now + 3600));
    let frames = caravan_agent::repository::encode_frames([forged_grant.as_slice()]);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        let app = axum::Router::new().fallback(move || {
            let body = frames.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        caravan_agent::repository::FRAMES_CONTENT_TYPE,
                    )],
                    body,
                )
            }
        });
        let _ = axum::serve(listener, app).await;
    });
    set_repositories(&dave, &[&format!("http://{addr}")]);
    dave.env
        .push(("CARAVAN_TRUST_SYNC_SECS".into(), "0.5".into()));
    dave.start();

    let src = alice.data().join("docs");
    make_tree(&src, 2, 10_000);
    let out = cli_ok(&[
        "publish",
        "--config",
        alice.cfg(),
        "docs",
        "--trust-depth",
        "2",
        "--json",
    ]);
    let v = last_json(&out);
    let share = v["share_id"].as_str().unwrap().to_string();
    let t = ticket(&alice, &share, &dave);
    assert!(Ticket::parse(&t).unwrap().wrapped_key.is_empty());
    let (code, err) = try_fetch(&dave, &t, "got");
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains("found no valid grant chain"), "{err}");
    assert!(!dave.data().join("got").join("empty.txt").exists());
    // The forged "holders" are dropped too: no peers.
    let peers = cli_ok(&["peers", "--config", dave.cfg(), &share, "--json"]);
    assert_eq!(peers.trim(), "[]");
    let why = cli(&["trust", "why", "--config", dave.cfg(), &alice.id]);
    assert_eq!(why.status.code(), Some(1));
}

/// Revocations and grants the repository at `url` holds, by `issuer`.
fn repository_view(url: &str, issuer: &str) -> (Vec<String>, Vec<String>) {
    let issuer: AgentId = issuer.parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = RepositoryClient::new(&[url.to_string()]).unwrap();
        let revoked = c
            .sync_revocations()
            .await
            .map(|v| {
                v.into_iter()
                    .filter(|(r, _)| r.issuer == issuer)
                    .map(|(r, _)| r.grant_id.to_hex())
                    .collect()
            })
            .unwrap_or_default();
        let grants = c
            .grants_by_issuer(&issuer)
            .await
            .map(|v| v.into_iter().map(|(g, _)| g.id().to_hex()).collect())
            .unwrap_or_default();
        (revoked, grants)
    })
}

/// Guarantee: a revocation and a grant made while every repository is
/// down are in effect locally at once, the CLI says they will be published
/// when a repository answers (revoke exits 0), they survive a daemon
/// restart (the outbox is in the agent's state), and the trust sync
/// publishes them within a bounded time once the repository is back.
#[test]
fn trust_records_made_while_the_repository_is_down_are_published_when_it_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let port = free_port();
    let root = base.join("repo-data");
    std::fs::create_dir_all(&root).unwrap();
    let repo = RepoProcess::start_fs(base, port, &root);
    let url = repo.url.clone();
    let mut e = agent(base, "e", &[&url]);
    let f = SecretKey::generate().unwrap().agent_id().to_string();
    let g = SecretKey::generate().unwrap().agent_id().to_string();

    let out = cli_ok(&[
        "trust",
        "grant",
        "--config",
        e.cfg(),
        &f,
        "--depth",
        "0",
        "--expires",
        "1d",
        "--json",
    ]);
    let granted: serde_json::Value = serde_json::from_str(&out).unwrap();
    let f_grant = granted["grant_id"].as_str().unwrap().to_string();
    assert_eq!(granted["published_to"], serde_json::json!([url]));

    // The repository goes down (its records stay on disk).
    drop(repo);
    let out = cli(&["trust", "revoke", "--config", e.cfg(), &f]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains(&format!("revoked grant {f_grant}")),
        "{stdout}"
    );
    assert!(
        stdout.contains("saved, and it will be published when it answers"),
        "{stdout}"
    );
    let out = cli(&[
        "trust",
        "grant",
        "--config",
        e.cfg(),
        &g,
        "--depth",
        "0",
        "--expires",
        "1d",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("in effect on this agent")
            && stderr.contains("will be published when a repository answers")
            && !stderr.contains("the daemon failed"),
        "{stderr}"
    );
    let list = cli_ok(&["trust", "list", "--config", e.cfg(), "--json"]);
    let l: serde_json::Value = serde_json::from_str(&list).unwrap();
    let listed = |l: &serde_json::Value, who: &str| {
        l["issued"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["subject"] == who)
            .cloned()
            .unwrap()
    };
    let g_grant = listed(&l, &g)["grant_id"].as_str().unwrap().to_string();
    // The listing says where each grant is: f's at the repository, g's
    // waiting for it.
    assert_eq!(
        listed(&l, &f)["published_to"],
        serde_json::json!([url]),
        "{l}"
    );
    assert_eq!(listed(&l, &g)["published_to"], serde_json::json!([]), "{l}");

    // The daemon restarts while the repository is still down: the outbox
    // is read back from its state.
    e.kill9();
    e.start();
    std::thread::sleep(Duration::from_secs(1));

    let repo = RepoProcess::start_fs(base, port, &root);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (revoked, grants) = repository_view(&repo.url, &e.id);
        if revoked.contains(&f_grant) && grants.contains(&g_grant) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not published after the repository came back: revoked {revoked:?}, grants {grants:?}\n{}",
            e.log_tail()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // Nothing is left waiting: the outbox is empty.
    let outbox = e.data().join(".caravan/trust/outbox");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(&outbox).is_ok_and(|mut d| d.next().is_some()) {
        assert!(Instant::now() < deadline, "outbox not emptied");
        std::thread::sleep(Duration::from_millis(200));
    }
    let list = cli_ok(&["trust", "list", "--config", e.cfg(), "--json"]);
    let l: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(
        listed(&l, &g)["published_to"],
        serde_json::json!([url]),
        "{l}"
    );
}

/// Guarantee: `trust grant` refuses, before anything is signed, a validity
/// beyond what repositories accept (400d), of 0, or a depth beyond 8, with
/// exit 3 and a message naming the limit; `--help` states the limits; and
/// the grant in effect stays the published one. Revoking the agent then
/// revokes every grant it was given, the superseded one too.
#[test]
fn grant_limits_are_checked_before_signing() {
    let tmp = tempfile::tempdir().unwrap();
    let e = agent(tmp.path(), "e", &[]);
    let f = SecretKey::generate().unwrap().agent_id().to_string();
    cli_ok(&[
        "trust",
        "grant",
        "--config",
        e.cfg(),
        &f,
        "--depth",
        "0",
        "--expires",
        "30d",
    ]);
    for (flag, value, says) in [
        ("--expires", "400d", "366 days"),
        ("--expires", "0", "at least 1 second"),
        ("--expires", "99999999999999999999", "not a duration"),
        ("--depth", "9", "at most 8"),
    ] {
        let mut args = vec!["trust", "grant", "--config", e.cfg(), &f, flag, value];
        if flag != "--depth" {
            args.extend_from_slice(&["--depth", "0"]);
        }
        let out = cli(&args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(3), "{flag} {value}: {stderr}");
        assert!(stderr.contains(says), "{flag} {value}: {stderr}");
    }
    let list = cli_ok(&["trust", "list", "--config", e.cfg(), "--json"]);
    let l: serde_json::Value = serde_json::from_str(&list).unwrap();
    let issued = l["issued"].as_array().unwrap();
    assert_eq!(issued.len(), 1, "{list}");
    assert!(issued[0]["not_after"].as_u64().unwrap() <= unix_now() + 30 * 86400);
    let help = cli_ok(&["trust", "grant", "--help"])
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        help.contains("366 days") && help.contains("at most 8"),
        "{help}"
    );
    assert!(help.contains("s, m, h, d or w"), "{help}");
    // A second grant supersedes the first; revoking the agent revokes both
    // (the first, kept by the subject, would otherwise still be valid).
    cli_ok(&[
        "trust",
        "grant",
        "--config",
        e.cfg(),
        &f,
        "--depth",
        "0",
        "--expires",
        "20d",
    ]);
    let out = cli_ok(&["trust", "revoke", "--config", e.cfg(), &f]);
    assert_eq!(out.matches("revoked grant").count(), 2, "{out}");
    assert!(
        out.contains(issued[0]["grant_id"].as_str().unwrap()),
        "{out}"
    );
}

#[test]
fn demo_trust_scenario_json() {
    let out = cli_ok(&["demo", "--scenario", "trust", "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["pruned"], serde_json::json!(["bob", "carol"]));
    assert_eq!(v["kept"], serde_json::json!(["dave", "erin"]));
    assert_eq!(v["verified"], true);
    assert_eq!(v["fresh_key"], true);
    let secs = v["revocation_seconds"].as_f64().unwrap();
    assert!((0.0..5.0).contains(&secs), "{secs}");
    assert!(v["tree_before"].as_str().unwrap().contains("carol"));
    assert!(!v["tree_after"].as_str().unwrap().contains("carol"));
}
