//! `GET /v1/activity` (what the operator polls to scale an idle agent to
//! zero) with real agent processes on loopback: a fresh agent has no
//! activity and nothing scheduled; declaring and publishing a share is
//! activity and schedules its next rescan; a peer fetching it makes the
//! publisher's last activity `serve` and the subscriber's `fetch`; a rescan
//! due soon is pending work; the token is required.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn admin(
    a: &TestAgent,
    method: &str,
    path: &str,
    body: Option<&Value>,
    token: bool,
) -> (u16, Value) {
    let cfg: toml::Value = toml::from_str(&std::fs::read_to_string(&a.config).unwrap()).unwrap();
    let addr = cfg["admin_listen"].as_str().unwrap().to_string();
    let token = if token {
        std::fs::read_to_string(cfg["admin_token_file"].as_str().unwrap()).unwrap()
    } else {
        "wrong-token-wrong-token".into()
    };
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

fn activity(a: &TestAgent) -> Value {
    let (code, v) = admin(a, "GET", "/v1/activity", None, true);
    assert_eq!(code, 200, "{v}");
    v
}

fn wait_for(a: &TestAgent, what: &str, ok: impl Fn(&Value) -> bool, path: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (code, v) = admin(a, "GET", path, None, true);
        if code == 200 && ok(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: last answer {code} {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn activity_reports_idle_time_pending_and_scheduled_work() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |n: &str| {
        let d = tmp.path().join(n);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let mut alice = TestAgent::init(&dir("alice"));
    let mut dave = TestAgent::init(&dir("dave"));
    alice.start();

    // The token is required; a fresh agent has done nothing.
    assert_eq!(admin(&alice, "GET", "/v1/activity", None, false).0, 401);
    let v = activity(&alice);
    assert!(v.get("idle_secs").is_none(), "{v}");
    assert!(v.get("last_activity").is_none(), "{v}");
    assert!(v.get("pending").is_none(), "{v}");
    assert!(v.get("next_wake_unix").is_none(), "{v}");
    assert!(v.get("next_url_refresh_unix").is_none(), "{v}");

    // Declaring and publishing is activity; the next rescan is scheduled.
    let photos = alice.data().join("photos");
    make_tree(&photos, 4, 50_000);
    let spec = json!({"generation": 1, "publish": {"path": "photos", "recipients": [dave.id],
                      "rescan_secs": 600}});
    assert_eq!(
        admin(
            &alice,
            "PUT",
            "/v1/declared/shares/photos",
            Some(&spec),
            true
        )
        .0,
        200
    );
    let published = wait_for(
        &alice,
        "alice publishes",
        |v| v["state"] == "ready",
        "/v1/declared/shares/photos",
    );
    let v = activity(&alice);
    assert_eq!(v["last_activity"], "publish", "{v}");
    assert!(
        v["idle_secs"].as_u64().unwrap() <= v["uptime_secs"].as_u64().unwrap(),
        "{v}"
    );
    assert!(
        v.get("pending").is_none(),
        "a settled share is no work: {v}"
    );
    let next = v["next_wake_unix"].as_u64().unwrap();
    let now = unix_now();
    assert!(
        next > now + 500 && next <= now + 601,
        "next rescan {next}, now {now}"
    );
    assert_eq!(v["next_wake_reason"], "rescan of share photos", "{v}");

    // A subscriber fetches: the publisher served, the subscriber fetched.
    dave.start();
    let ticket = published["tickets"][0]["ticket"].as_str().unwrap();
    let sub = json!({"generation": 1, "subscribe": {"ticket": ticket, "destination": "in",
                     "poll_secs": 600}});
    assert_eq!(
        admin(
            &dave,
            "PUT",
            "/v1/declared/shares/from-alice",
            Some(&sub),
            true
        )
        .0,
        200
    );
    wait_for(
        &dave,
        "dave fetches",
        |v| v["state"] == "ready" && v["version"] == 1,
        "/v1/declared/shares/from-alice",
    );
    assert_same_tree(&photos, &dave.data().join("in"));
    let v = activity(&alice);
    assert_eq!(v["last_activity"], "serve", "{v}");
    let d = activity(&dave);
    assert_eq!(d["last_activity"], "fetch", "{d}");
    assert!(d.get("pending").is_none(), "{d}");
    assert!(
        d.get("next_wake_unix").is_none(),
        "a subscription schedules no wake-up: {d}"
    );

    // A rescan due within 30 s is pending work (no point in sleeping).
    let soon = json!({"generation": 2, "publish": {"path": "photos", "recipients": [dave.id],
                      "rescan_secs": 5}});
    assert_eq!(
        admin(
            &alice,
            "PUT",
            "/v1/declared/shares/photos",
            Some(&soon),
            true
        )
        .0,
        200
    );
    let v = wait_for(
        &alice,
        "a rescan due soon is pending",
        |v| {
            v["pending"]
                .as_array()
                .is_some_and(|p| p.iter().any(|l| l.as_str().unwrap().contains("due within")))
        },
        "/v1/activity",
    );
    let last = v["last_activity"].as_str().unwrap();
    assert!(["declared", "publish"].contains(&last), "{v}");

    // Removing the share removes its schedule.
    assert_eq!(
        admin(&alice, "DELETE", "/v1/declared/shares/photos", None, true).0,
        204
    );
    let v = activity(&alice);
    assert!(v.get("next_wake_unix").is_none(), "{v}");
    assert!(v.get("pending").is_none(), "{v}");
}
