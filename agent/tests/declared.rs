//! The declared admin API (what the operator drives) with real processes on
//! loopback: a repository, a publisher and two subscribers. Grants and
//! shares are declared idempotently; a subscriber by share id + publisher
//! id (no ticket) and one with a ticket receive the folder and keep
//! following new versions; revoking the grant cuts the trusted subscriber
//! off (`TrustRevoked`, old files kept) while the ticket holder gets the
//! next version; bad input is refused or reported with a reason.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

struct RepoProcess {
    url: String,
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
                "10000",
                "--rate-burst",
                "10000",
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

fn agent(base: &Path, name: &str, repo: &str) -> TestAgent {
    let dir = base.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut a = TestAgent::init(&dir);
    let text = std::fs::read_to_string(&a.config).unwrap();
    let mut out: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with("repositories"))
        .map(str::to_string)
        .collect();
    out.insert(0, format!("repositories = [{repo:?}]"));
    std::fs::write(&a.config, out.join("\n") + "\n").unwrap();
    a.env.push(("CARAVAN_TRUST_SYNC_SECS".into(), "0.5".into()));
    a.start();
    a
}

/// One admin API call: (status code, JSON body or Null).
fn admin(a: &TestAgent, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let cfg: toml::Value = toml::from_str(&std::fs::read_to_string(&a.config).unwrap()).unwrap();
    let addr = cfg["admin_listen"].as_str().unwrap().to_string();
    let token = std::fs::read_to_string(cfg["admin_token_file"].as_str().unwrap()).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        token.trim(),
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code: u16 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let json = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| serde_json::from_str(b).unwrap_or(Value::Null))
        .unwrap_or(Value::Null);
    (code, json)
}

fn wait_share(a: &TestAgent, name: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (code, v) = admin(a, "GET", &format!("/v1/declared/shares/{name}"), None);
        if code == 200 && ok(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: last status {code} {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn edit(path: &Path, seed: u64) {
    let mut buf = std::fs::read(path).unwrap();
    let mut extra = vec![0u8; 4096];
    fill_pseudo_random(&mut extra, seed);
    let mid = buf.len() / 2;
    buf.splice(mid..mid, extra);
    std::fs::write(path, buf).unwrap();
}

#[test]
fn declared_shares_and_grants_converge_follow_and_prune() {
    let base = tempfile::tempdir().unwrap();
    let repo = RepoProcess::start(base.path());
    let alice = agent(base.path(), "alice", &repo.url);
    let bob = agent(base.path(), "bob", &repo.url);
    let dave = agent(base.path(), "dave", &repo.url);
    let photos = alice.data().join("photos");
    make_tree(&photos, 6, 300_000);

    // A grant, declared twice: signed once.
    let g = json!({"subject": bob.id, "depth": 0});
    let (code, g1) = admin(&alice, "PUT", "/v1/declared/grants/g-1", Some(&g));
    assert_eq!(code, 200, "{g1}");
    assert_eq!(g1["published"], true, "{g1}");
    let (_, g2) = admin(&alice, "PUT", "/v1/declared/grants/g-1", Some(&g));
    assert_eq!(g1["grant_id"], g2["grant_id"], "idempotent grant");
    // A second declared grant to the same agent is refused, naming the
    // first (one grant per issuer and subject is in effect: it replaced
    // the first, and deleting either revoked both); deleting the refused
    // one revokes nothing.
    let (code, dup) = admin(&alice, "PUT", "/v1/declared/grants/g-dup", Some(&g));
    assert_eq!(code, 400, "{dup}");
    assert!(dup.to_string().contains("g-1"), "{dup}");
    let (code, r) = admin(&alice, "DELETE", "/v1/declared/grants/g-dup", None);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["revoked"], json!([]), "{r}");

    // Publish to trusted agents and to dave explicitly; declared twice.
    let spec = json!({"generation": 1, "publish": {"path": "photos", "recipients": [dave.id],
                      "trust_depth": 1, "rescan_secs": 1}});
    let (code, _) = admin(&alice, "PUT", "/v1/declared/shares/photos", Some(&spec));
    assert_eq!(code, 200);
    let published = wait_share(&alice, "photos", "alice publishes", |v| {
        v["state"] == "ready"
    });
    let (_, again) = admin(&alice, "PUT", "/v1/declared/shares/photos", Some(&spec));
    assert_eq!(again["share_id"], published["share_id"]);
    assert_eq!(again["version"], 1, "a repeated PUT publishes nothing new");
    // A new rescan interval (generation 2) is a changed spec, but nothing a
    // version carries: still version 1.
    let slower = json!({"generation": 2, "publish": {"path": "photos", "recipients": [dave.id],
                        "trust_depth": 1, "rescan_secs": 2}});
    let (code, _) = admin(&alice, "PUT", "/v1/declared/shares/photos", Some(&slower));
    assert_eq!(code, 200);
    let settled = wait_share(&alice, "photos", "alice settles generation 2", |v| {
        v["state"] == "ready" && v["generation"] == 2
    });
    assert_eq!(
        settled["version"], 1,
        "a rescan-interval change publishes nothing new"
    );
    let share_id = published["share_id"].as_str().unwrap().to_string();
    let dave_ticket = published["tickets"][0]["ticket"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(published["tickets"][0]["agent_id"], dave.id);
    assert!(
        published["keyless_ticket"]
            .as_str()
            .unwrap()
            .starts_with("caravan-ticket-v1:")
    );

    // bob by share id + publisher (no ticket), dave with his ticket.
    let by_id = json!({"generation": 1, "subscribe": {"share_id": share_id, "publisher": alice.id,
                       "destination": "in/alice", "poll_secs": 1}});
    assert_eq!(
        admin(&bob, "PUT", "/v1/declared/shares/from-alice", Some(&by_id)).0,
        200
    );
    let with_ticket = json!({"generation": 1, "subscribe": {"ticket": dave_ticket,
                             "destination": "in/alice", "poll_secs": 1}});
    assert_eq!(
        admin(
            &dave,
            "PUT",
            "/v1/declared/shares/from-alice",
            Some(&with_ticket)
        )
        .0,
        200
    );
    for a in [&bob, &dave] {
        let v = wait_share(a, "from-alice", "first version arrives", |v| {
            v["state"] == "ready" && v["version"] == 1
        });
        assert_eq!(v["share_id"], share_id.as_str());
        assert_same_tree(&photos, &a.data().join("in/alice"));
    }

    // An edit: a new version, and only the changed chunks travel.
    let total = published["bytes_total"].as_u64().unwrap();
    edit(&photos.join("d1/sub/файл-1.bin"), 7);
    wait_share(&alice, "photos", "alice publishes v2", |v| {
        v["version"] == 2
    });
    for a in [&bob, &dave] {
        let v = wait_share(a, "from-alice", "v2 arrives", |v| {
            v["state"] == "ready" && v["version"] == 2
        });
        let received = v["bytes_received"].as_u64().unwrap();
        assert!(
            received < total / 3,
            "an edit resent {received} of {total} bytes"
        );
        assert_same_tree(&photos, &a.data().join("in/alice"));
    }

    // Revoke: bob is cut off at the next version and keeps v2; dave follows.
    let (code, r) = admin(&alice, "DELETE", "/v1/declared/grants/g-1", None);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["published"], true);
    assert_eq!(r["revoked"][0], g1["grant_id"]);
    let (_, r2) = admin(&alice, "DELETE", "/v1/declared/grants/g-1", None);
    assert_eq!(
        r2["published"], true,
        "a repeated revocation is harmless: {r2}"
    );
    let bob_v2 = std::fs::read(bob.data().join("in/alice/d1/sub/файл-1.bin")).unwrap();
    edit(&photos.join("d2/sub/файл-2.bin"), 8);
    wait_share(&alice, "photos", "alice publishes v3", |v| {
        v["version"] == 3
    });
    wait_share(&dave, "from-alice", "dave gets v3", |v| {
        v["state"] == "ready" && v["version"] == 3
    });
    assert_same_tree(&photos, &dave.data().join("in/alice"));
    let v = wait_share(&bob, "from-alice", "bob is refused", |v| {
        v["state"] == "failed"
    });
    assert_eq!(v["reason"], "TrustRevoked", "{v}");
    assert_eq!(v["version"], 2, "{v}");
    assert_eq!(
        std::fs::read(bob.data().join("in/alice/d1/sub/файл-1.bin")).unwrap(),
        bob_v2
    );

    // Bad input.
    let escape =
        json!({"generation": 1, "publish": {"path": "../x", "recipients": [], "rescan_secs": 5}});
    assert_eq!(
        admin(&alice, "PUT", "/v1/declared/shares/bad", Some(&escape)).0,
        400
    );
    let state = json!({"generation": 1, "subscribe": {"share_id": share_id, "publisher": alice.id,
                       "destination": ".caravan/x", "poll_secs": 5}});
    assert_eq!(
        admin(&bob, "PUT", "/v1/declared/shares/bad", Some(&state)).0,
        400
    );
    let stolen = json!({"generation": 1, "subscribe": {"ticket": with_ticket["subscribe"]["ticket"],
                        "destination": "stolen", "poll_secs": 5}});
    assert_eq!(
        admin(&bob, "PUT", "/v1/declared/shares/stolen", Some(&stolen)).0,
        200
    );
    let v = wait_share(&bob, "stolen", "a ticket for another agent", |v| {
        v["state"] == "failed"
    });
    assert_eq!(v["reason"], "NotARecipient", "{v}");
    let garbage = json!({"generation": 1, "subscribe": {"ticket": "caravan-ticket-v1:AAAA",
                         "destination": "g", "poll_secs": 5}});
    admin(&bob, "PUT", "/v1/declared/shares/garbage", Some(&garbage));
    let v = wait_share(&bob, "garbage", "a garbage ticket", |v| {
        v["state"] == "failed"
    });
    assert_eq!(v["reason"], "TicketInvalid", "{v}");
    assert_eq!(
        admin(
            &bob,
            "PUT",
            "/v1/declared/shares/BAD%20NAME",
            Some(&garbage)
        )
        .0,
        400
    );

    // Delete: no longer declared, no longer served; deleting again is fine.
    assert_eq!(
        admin(&alice, "DELETE", "/v1/declared/shares/photos", None).0,
        204
    );
    assert_eq!(
        admin(&alice, "GET", "/v1/declared/shares/photos", None).0,
        404
    );
    assert_eq!(
        admin(&alice, "DELETE", "/v1/declared/shares/photos", None).0,
        204
    );
    let (_, st) = admin(&alice, "GET", "/v1/status", None);
    assert!(
        st["shares"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["share_id"] != share_id.as_str()),
        "{st}"
    );
}

/// Guarantee: a declared grant made while no repository answers is signed
/// once (a retried PUT does not sign another), reported as not yet
/// published, sent by the outbox once the repository is up, and a DELETE
/// revokes it — no grant signed for the declaration is left unrevoked.
#[test]
fn a_declared_grant_made_while_the_repository_is_down_is_signed_once_and_revoked() {
    let base = tempfile::tempdir().unwrap();
    // Nothing listens there yet.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let alice = agent(base.path(), "alice", &url);
    let bob = caravan_agent::identity::SecretKey::generate()
        .unwrap()
        .agent_id()
        .to_string();
    let g = json!({"subject": bob, "depth": 0});
    let (code, g1) = admin(&alice, "PUT", "/v1/declared/grants/g-down", Some(&g));
    assert_eq!(code, 200, "{g1}");
    assert_eq!(g1["published"], false, "{g1}");
    let (code, g2) = admin(&alice, "PUT", "/v1/declared/grants/g-down", Some(&g));
    assert_eq!(code, 200, "{g2}");
    assert_eq!(g1["grant_id"], g2["grant_id"], "signed once: {g2}");
    let list = cli_ok(&["trust", "list", "--config", alice.cfg(), "--json"]);
    let l: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(l["issued"].as_array().unwrap().len(), 1, "{list}");
    let (code, r) = admin(&alice, "DELETE", "/v1/declared/grants/g-down", None);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["revoked"][0], g1["grant_id"], "{r}");
    let list = cli_ok(&["trust", "list", "--config", alice.cfg(), "--json"]);
    let l: Value = serde_json::from_str(&list).unwrap();
    assert!(
        l["issued"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["revoked"] == true),
        "{list}"
    );
}

/// Guarantee: a declared share may have any Kubernetes object name, the
/// longest (253 characters) included: it is kept under a file name a disk
/// can hold (cut, with a hash of the name) and found again after a
/// restart. Before, that name failed with "File name too long", which the
/// operator reported as the agent being unreachable.
#[test]
fn a_declared_share_with_the_longest_object_name_survives_a_restart() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("alice");
    std::fs::create_dir_all(&dir).unwrap();
    let mut alice = TestAgent::init(&dir);
    alice.start();
    make_tree(&alice.data().join("photos"), 2, 10_000);
    let long = format!("{}.{}", "a".repeat(200), "b".repeat(52));
    assert_eq!(long.len(), 253);
    let spec = json!({"generation": 1, "publish": {"path": "photos",
        "recipients": [TestAgent::init(&base.path().join("bob")).id], "rescan_secs": 3600}});
    // 242 characters: the file name alone fitted, not OpenDAL's
    // temporary file's (9 bytes longer).
    let middle = "m".repeat(242);
    let mut ids = Vec::new();
    for name in [long.as_str(), "short", middle.as_str()] {
        let (code, v) = admin(
            &alice,
            "PUT",
            &format!("/v1/declared/shares/{name}"),
            Some(&spec),
        );
        assert_eq!(code, 200, "{name}: {v}");
        let v = wait_share(&alice, name, "published", |v| v["state"] == "ready");
        ids.push(v["share_id"].clone());
    }
    alice.kill9();
    // A 242-character name saved by an older agent, as `<name>.json` with
    // no name inside: found, and moved to the name's file.
    let dir = alice.data().join(".caravan/declared/shares");
    let hashed = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("mmm"))
        .unwrap();
    let mut saved: Value = serde_json::from_slice(&std::fs::read(&hashed).unwrap()).unwrap();
    saved.as_object_mut().unwrap().remove("name");
    std::fs::remove_file(&hashed).unwrap();
    let plain = dir.join(format!("{middle}.json"));
    std::fs::write(&plain, saved.to_string()).unwrap();
    alice.start();
    for (name, id) in [long.as_str(), "short", middle.as_str()].iter().zip(&ids) {
        let v = wait_share(&alice, name, "kept", |v| v["state"] == "ready");
        assert_eq!(&v["share_id"], id, "{name}: {v}");
    }
    assert!(
        !plain.exists() && hashed.exists(),
        "moved to the name's file"
    );
    // `forget` leaves a declared share to its declaration, which would
    // publish it again: refused, naming it.
    let out = cli(&["forget", "--config", alice.cfg(), ids[1].as_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("declared as \"short\""), "{err}");
    let (code, _) = admin(
        &alice,
        "DELETE",
        &format!("/v1/declared/shares/{long}"),
        None,
    );
    assert_eq!(code, 204);
    let (code, _) = admin(&alice, "GET", &format!("/v1/declared/shares/{long}"), None);
    assert_eq!(code, 404);
    let left = std::fs::read_dir(alice.data().join(".caravan/declared/shares"))
        .unwrap()
        .count();
    assert_eq!(left, 2, "the long name's file is gone, the others stay");
}
