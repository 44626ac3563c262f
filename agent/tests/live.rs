//! Fetching while the publisher's pass still runs (live shares), over real
//! processes on loopback. The publisher's pass is held after each sealed
//! block by a gate file (`CARAVAN_FAULT_PUBLISH_GATE`), so nothing here
//! depends on timing: the fetch provably runs while the pass is unfinished.

mod common;

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use caravan_agent::identity::SecretKey;
use caravan_agent::manifest::ShareId;
use caravan_agent::node::live::{LiveAnswer, LiveEnd};
use caravan_agent::wire::client::PeerConn;
use common::*;

fn key_of(a: &TestAgent) -> SecretKey {
    SecretKey::from_text(&std::fs::read_to_string(a.dir.join("identity.key")).unwrap()).unwrap()
}

fn start_fetch(bob: &TestAgent, ticket: &str, dest: &str) -> Child {
    Command::new(BIN)
        .args([
            "fetch",
            "--config",
            bob.cfg(),
            ticket,
            "--dest",
            dest,
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `cond` (a liveness guard, not a timed assertion: the deadline
/// only turns a hang into a failure).
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !cond() {
        assert!(Instant::now() < deadline, "waited too long for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A publisher whose pass holds after each sealed block until `gate`
/// exists, and a recipient.
fn gated_pair(dir: &Path) -> (std::path::PathBuf, TestAgent, TestAgent) {
    let gate = dir.join("gate");
    let mut alice = TestAgent::init(&dir.join("alice"));
    alice.env.push((
        "CARAVAN_FAULT_PUBLISH_GATE".into(),
        gate.to_str().unwrap().into(),
    ));
    let bob = TestAgent::init(&dir.join("bob"));
    (gate, alice, bob)
}

fn big_file(dir: &Path, name: &str, mib: usize, seed: u64) -> Vec<u8> {
    std::fs::create_dir_all(dir).unwrap();
    let mut data = vec![0u8; mib << 20];
    fill_pseudo_random(&mut data, seed);
    std::fs::write(dir.join(name), &data).unwrap();
    data
}

#[test]
fn fetch_of_a_live_share_starts_before_publish_ends_and_only_recipients_list_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (gate, mut alice, mut bob) = gated_pair(tmp.path());
    let carol = TestAgent::init(&tmp.path().join("carol"));
    let src = alice.data().join("live");
    big_file(&src, "big.bin", 40, 7);
    make_tree(&src.join("tree"), 6, 100_000);
    alice.start();
    bob.start();

    let (mut publishing, mut out, first) = start_publish(&alice, "live", &bob.id);
    let share = first["share_id"].as_str().unwrap().to_string();
    let ticket = first["tickets"][0][1].as_str().unwrap().to_string();
    let mut fetching = start_fetch(&bob, &ticket, "got");

    // Bob receives verified chunks while the pass is held at its gate.
    wait_for("the first verified chunk", || {
        bob.metric("caravan_chunks_received_total") >= 1.0
    });
    assert!(
        publishing.try_wait().unwrap().is_none(),
        "publish is still running"
    );
    assert!(fetching.try_wait().unwrap().is_none(), "fetch is waiting");
    // What the pass sealed before Bob's first request was kept for him
    // too (he was named, so expected): every chunk he got came from
    // memory, none was read and sealed a second time.
    wait_for("every chunk served from the sealed cache", || {
        let sealed = alice.metric("caravan_chunks_sent_sealed_total");
        sealed >= 1.0 && sealed == alice.metric("caravan_chunks_sent_total")
    });

    // Only the publisher's authorized recipients may read the listing; a
    // stranger's answer is exactly that of an unknown share.
    let share_id: ShareId = share.parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let as_bob = PeerConn::connect(&alice.peer_addr, &key_of(&bob), None)
            .await
            .unwrap();
        let a = LiveAnswer::from_bytes(&as_bob.live(&share_id, 0).await.unwrap()).unwrap();
        assert_eq!(a.end, LiveEnd::Running);
        assert!(a.listing.unwrap().files.iter().any(|f| f.0 == "big.bin"));
        let as_carol = PeerConn::connect(&alice.peer_addr, &key_of(&carol), None)
            .await
            .unwrap();
        let e = as_carol.live(&share_id, 0).await.unwrap_err();
        assert!(matches!(e, caravan_agent::Error::NotFound(_)), "{e}");
        let e2 = as_carol.live(&ShareId([9; 32]), 0).await.unwrap_err();
        assert_eq!(e.to_string(), e2.to_string());
    });

    std::fs::write(&gate, b"go").unwrap();
    let mut last = String::new();
    out.read_line(&mut last).unwrap();
    assert!(publishing.wait().unwrap().success());
    let summary: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(summary["share_id"], share.as_str());
    let done = fetching.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let v = last_json(&String::from_utf8_lossy(&done.stdout));
    assert_eq!(v["state"], "done", "{v}");
    assert_same_tree(&src, &bob.data().join("got"));
    // Chunks sealed by the pass were served from memory, not read again.
    assert!(alice.metric("caravan_chunks_sent_sealed_total") >= 1.0);
}

#[test]
fn a_file_changed_while_published_ends_in_the_final_data_or_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (gate, mut alice, mut bob) = gated_pair(tmp.path());
    let src = alice.data().join("edit");
    let mut data = big_file(&src, "big.bin", 40, 11);
    alice.start();
    bob.start();

    // Same size, changed past what the pass has read: the signed manifest
    // lists what the pass read, and the fetch ends with exactly that.
    let (mut publishing, mut out, first) = start_publish(&alice, "edit", &bob.id);
    let ticket = first["tickets"][0][1].as_str().unwrap().to_string();
    let fetching = start_fetch(&bob, &ticket, "got");
    wait_for("the first verified chunk", || {
        bob.metric("caravan_chunks_received_total") >= 1.0
    });
    let at = data.len() - (4 << 20);
    data[at..at + 4096].fill(0xAB);
    {
        // In place, as an editor saving over it would (`fs::write` would
        // truncate first: a moment when the file is empty, which a chunk
        // served from it then rightly refuses).
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(src.join("big.bin"))
            .unwrap();
        f.seek(SeekFrom::Start(at as u64)).unwrap();
        f.write_all(&data[at..at + 4096]).unwrap();
    }
    std::fs::write(&gate, b"go").unwrap();
    let mut last = String::new();
    out.read_line(&mut last).unwrap();
    assert!(publishing.wait().unwrap().success());
    let done = fetching.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(std::fs::read(bob.data().join("got/big.bin")).unwrap(), data);

    // Shrunk under the pass: the publish fails and so does the fetch, with
    // a reason; nothing unverified is written in place of the file.
    std::fs::remove_file(&gate).unwrap();
    std::fs::write(src.join("big.bin"), &data).unwrap();
    let before = bob.metric("caravan_chunks_received_total");
    let (mut publishing, _out, first) = start_publish(&alice, "edit", &bob.id);
    let ticket = first["tickets"][0][1].as_str().unwrap().to_string();
    let fetching = start_fetch(&bob, &ticket, "got2");
    wait_for("the first verified chunk of the second share", || {
        bob.metric("caravan_chunks_received_total") > before
    });
    std::fs::write(src.join("big.bin"), &data[..(20 << 20)]).unwrap();
    std::fs::write(&gate, b"go").unwrap();
    assert!(!publishing.wait().unwrap().success());
    let done = fetching.wait_with_output().unwrap();
    assert!(!done.status.success());
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(said.contains("changed size"), "{said}");
    assert!(!bob.data().join("got2/big.bin").exists());

    // Replaced by another file of the same size under its name (a save by
    // rename) while the pass reads it: the pass keeps reading the file it
    // opened, so the share holds exactly that one, not a mix of both.
    std::fs::remove_file(&gate).unwrap();
    std::fs::write(src.join("big.bin"), &data).unwrap();
    let before = bob.metric("caravan_chunks_received_total");
    let (mut publishing, mut out, first) = start_publish(&alice, "edit", &bob.id);
    let ticket = first["tickets"][0][1].as_str().unwrap().to_string();
    let fetching = start_fetch(&bob, &ticket, "got3");
    wait_for("the first verified chunk of the third share", || {
        bob.metric("caravan_chunks_received_total") > before
    });
    let mut other = data.clone();
    fill_pseudo_random(&mut other, 12);
    std::fs::write(src.join("next.tmp"), &other).unwrap();
    std::fs::rename(src.join("next.tmp"), src.join("big.bin")).unwrap();
    std::fs::write(&gate, b"go").unwrap();
    let mut last = String::new();
    out.read_line(&mut last).unwrap();
    assert!(publishing.wait().unwrap().success());
    let done = fetching.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(
        std::fs::read(bob.data().join("got3/big.bin")).unwrap() == data,
        "the fetched file is the one the pass opened"
    );

    // Grown under the pass (a log being written): its listed start is not
    // the file; the publish fails naming it, as for a shrunk one, rather
    // than publish the file cut short with exit code 0.
    std::fs::remove_file(&gate).unwrap();
    std::fs::write(src.join("big.bin"), &data).unwrap();
    let before = bob.metric("caravan_chunks_received_total");
    let (mut publishing, _out, first) = start_publish(&alice, "edit", &bob.id);
    let ticket = first["tickets"][0][1].as_str().unwrap().to_string();
    let fetching = start_fetch(&bob, &ticket, "got4");
    wait_for("the first verified chunk of the fourth share", || {
        bob.metric("caravan_chunks_received_total") > before
    });
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(src.join("big.bin"))
            .unwrap();
        f.write_all(&[7u8; 1 << 20]).unwrap();
    }
    std::fs::write(&gate, b"go").unwrap();
    let published = publishing.wait().unwrap();
    assert_eq!(published.code(), Some(3), "a grown file was published");
    let done = fetching.wait_with_output().unwrap();
    assert!(!done.status.success());
    assert!(!bob.data().join("got4/big.bin").exists());
}

#[test]
fn a_fetcher_killed_while_following_a_live_share_resumes_from_its_verified_part_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (gate, mut alice, mut bob) = gated_pair(tmp.path());
    let src = alice.data().join("resume");
    big_file(&src, "big.bin", 40, 13);
    alice.start();
    bob.start();
    let (mut publishing, _out, first) = start_publish(&alice, "resume", &bob.id);
    let ticket = first["tickets"][0][1].as_str().unwrap().to_string();
    cli_ok(&[
        "fetch",
        "--config",
        bob.cfg(),
        &ticket,
        "--dest",
        "got",
        "--detach",
    ]);
    let status = |bob: &TestAgent| -> serde_json::Value {
        let st: serde_json::Value =
            serde_json::from_str(&cli_ok(&["status", "--config", bob.cfg(), "--json"])).unwrap();
        st["fetches"][0].clone()
    };
    // Some chunks of the first sealed block are verified and written while
    // the pass is held: kill the fetcher there.
    let mut done_at_kill = 0;
    wait_for("written chunks", || {
        done_at_kill = status(&bob)["chunks_done"].as_u64().unwrap_or(0);
        done_at_kill >= 2
    });
    bob.kill9();
    assert!(publishing.try_wait().unwrap().is_none());
    assert!(!bob.data().join("got/big.bin").exists());

    // Restarted, the fetch resumes on its own, still following the pass.
    bob.start();
    wait_for("the resumed fetch to follow the pass", || {
        bob.newest_log()
            .contains("fetching while the publisher's pass runs")
    });
    std::fs::write(&gate, b"go").unwrap();
    assert!(publishing.wait().unwrap().success());
    let mut after = serde_json::Value::Null;
    wait_for("the resumed fetch", || {
        after = status(&bob);
        assert_ne!(after["state"], "failed", "{after}");
        after["state"] == "done"
    });
    let total = after["chunks_total"].as_u64().unwrap();
    let refetched = after["chunks_fetched"].as_u64().unwrap();
    assert!(
        refetched + done_at_kill <= total,
        "re-downloaded verified chunks: {refetched} fetched after restart, {done_at_kill} were done of {total}"
    );
    assert_same_tree(&src, &bob.data().join("got"));
}

/// Guarantee: a publish pass that stops listing anything new (held, or a
/// publisher answering "running, nothing new" for ever) does not hold its
/// follower for ever: past `CARAVAN_LIVE_STALL_SECS` the fetch fails (exit
/// 5) saying the pass stalled.
#[test]
fn a_stalled_publish_pass_does_not_hold_its_follower_for_ever() {
    let tmp = tempfile::tempdir().unwrap();
    let (gate, mut alice, mut bob) = gated_pair(tmp.path());
    bob.env.push(("CARAVAN_LIVE_STALL_SECS".into(), "3".into()));
    big_file(&alice.data().join("held"), "big.bin", 40, 29);
    alice.start();
    bob.start();
    let (mut publishing, _out, first) = start_publish(&alice, "held", &bob.id);
    let ticket = first["tickets"][0][1].as_str().unwrap().to_string();
    let out = start_fetch(&bob, &ticket, "got")
        .wait_with_output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("stalled"), "{err}");
    std::fs::write(&gate, b"go").unwrap();
    assert!(publishing.wait().unwrap().success());
}

/// Guarantee: a fetch following a publish pass never replaces a file of
/// the recipient's own, even one of the same size as the share's (the
/// pass's listing is not signed and its chunks are not all known, so it
/// cannot be checked): refused, exit 5, the file as it was. (A hostile
/// publisher's listing overwrote such a file, then had it removed.)
#[test]
fn a_live_fetch_never_replaces_a_same_size_file_of_the_users_own() {
    let tmp = tempfile::tempdir().unwrap();
    let (gate, mut alice, mut bob) = gated_pair(tmp.path());
    let src = alice.data().join("live");
    big_file(&src, "big.bin", 40, 23);
    std::fs::write(src.join("notes.txt"), b"share's text").unwrap();
    let mine = bob.data().join("got/notes.txt");
    std::fs::create_dir_all(mine.parent().unwrap()).unwrap();
    std::fs::write(&mine, b"MY OWN NOTES").unwrap();
    alice.start();
    bob.start();
    let (mut publishing, _out, first) = start_publish(&alice, "live", &bob.id);
    let ticket = first["tickets"][0][1].as_str().unwrap().to_string();
    let out = start_fetch(&bob, &ticket, "got")
        .wait_with_output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("a file of your own"), "{err}");
    assert_eq!(std::fs::read(&mine).unwrap(), b"MY OWN NOTES");
    std::fs::write(&gate, b"go").unwrap();
    assert!(publishing.wait().unwrap().success());
}

/// Guarantee: a plain `publish` (no `--json`) whose daemon stops during
/// the pass says so (exit code 4, "resumes publishing" with the share id)
/// and still prints the tickets, which stay valid: the user is not left
/// without the share a restarted daemon finishes (it was "cannot reach the
/// agent daemon", and nothing else).
#[test]
fn a_plain_publish_cut_off_by_its_daemon_still_gives_the_share_and_tickets() {
    let tmp = tempfile::tempdir().unwrap();
    let (_gate, mut alice, bob) = gated_pair(tmp.path());
    big_file(&alice.data().join("cut"), "big.bin", 40, 19);
    alice.start();
    let publishing = Command::new(BIN)
        .args(["publish", "--config", alice.cfg(), "cut", "--to", &bob.id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let records = alice.data().join(".caravan/publishes");
    wait_for("the publish's record", || {
        std::fs::read_dir(&records).is_ok_and(|mut d| d.next().is_some())
    });
    // The share id and tickets go out right after the record, before the
    // pass (held at its gate until the kill).
    std::thread::sleep(Duration::from_secs(1));
    alice.kill9();
    let out = publishing.wait_with_output().unwrap();
    let (said, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(4), "{said}{err}");
    assert!(
        err.contains("resumes publishing share sh1-") && err.contains("version 1"),
        "{err}"
    );
    assert!(
        said.contains(&format!("ticket for {}", bob.id)) && said.contains("caravan-ticket-v1:"),
        "{said}"
    );
}

#[test]
fn a_publisher_killed_during_its_pass_resumes_it_and_its_recipient_follows_again() {
    let tmp = tempfile::tempdir().unwrap();
    let (gate, mut alice, mut bob) = gated_pair(tmp.path());
    let src = alice.data().join("crash");
    big_file(&src, "big.bin", 40, 17);
    make_tree(&src.join("tree"), 5, 70_000);
    alice.start();
    bob.start();
    let (mut publishing, _out, first) = start_publish(&alice, "crash", &bob.id);
    let share = first["share_id"].as_str().unwrap().to_string();
    let ticket = first["tickets"][0][1].as_str().unwrap().to_string();
    let fetching = start_fetch(&bob, &ticket, "got");
    // Bob has written verified chunks of the first sealed block and has
    // nothing left to ask (the pass is held at its gate): the publisher's
    // daemon dies there.
    let status = |bob: &TestAgent| -> (u64, u64) {
        let st: serde_json::Value =
            serde_json::from_str(&cli_ok(&["status", "--config", bob.cfg(), "--json"])).unwrap();
        let f = &st["fetches"][0];
        (
            f["chunks_done"].as_u64().unwrap_or(0),
            f["chunks_fetched"].as_u64().unwrap_or(0),
        )
    };
    let mut at_kill = (0, 0);
    wait_for("written chunks, and a fetch waiting for the pass", || {
        let now = status(&bob);
        let settled = now == at_kill && now.0 >= 2;
        at_kill = now;
        if !settled {
            std::thread::sleep(Duration::from_millis(200));
        }
        settled
    });
    let (done_at_kill, fetched_at_kill) = at_kill;
    alice.kill9();
    // The daemon went away: exit code 4 (as `fetch`), saying it resumes.
    assert_eq!(publishing.wait().unwrap().code(), Some(4));
    let hex = share.parse::<ShareId>().unwrap().hex();
    let record = alice.data().join(format!(".caravan/publishes/{hex}.json"));
    assert!(record.exists(), "the unfinished publish is recorded");

    // Restarted, the daemon resumes the same share (same id, key and
    // tickets); the recipient, still fetching, dials it again and follows.
    alice.start();
    wait_for("the resumed pass", || {
        alice.newest_log().contains("resuming a publish")
    });
    std::fs::write(&gate, b"go").unwrap();
    let done = fetching.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&done.stdout).to_string();
    assert!(
        done.status.success(),
        "{said}{}\nrecipient's log:\n{}",
        String::from_utf8_lossy(&done.stderr),
        bob.newest_log()
    );
    let summary: serde_json::Value = serde_json::from_str(said.lines().last().unwrap()).unwrap();
    assert_eq!(summary["share_id"], share.as_str());
    assert_eq!(summary["state"], "done");
    let total = summary["chunks_total"].as_u64().unwrap();
    assert_eq!(summary["chunks_done"].as_u64().unwrap(), total, "{summary}");
    let fetched_after = summary["chunks_fetched"].as_u64().unwrap() - fetched_at_kill;
    assert!(
        fetched_after + done_at_kill <= total,
        "written chunks were fetched again: {fetched_after} fetched after the restart, \
         {done_at_kill} were written before, of {total}: {summary}"
    );
    assert_same_tree(&src, &bob.data().join("got"));
    wait_for("the record to go", || !record.exists());
    let shares: serde_json::Value =
        serde_json::from_str(&cli_ok(&["status", "--config", alice.cfg(), "--json"])).unwrap();
    assert!(shares.to_string().contains(&share), "{shares}");
}

/// Guarantee: a file saved over by rename with one of another size after
/// the folder was listed, before its pass opened it, fails the publish
/// naming it (exit 3) and the recipient following the pass fails too,
/// writing nothing of it; before, the pass read the new file for the
/// listed size only and published its start as the whole file, a file
/// that never existed, with exit 0.
#[test]
fn a_file_saved_over_after_the_listing_is_never_published_torn() {
    replaced_after_the_listing(|f| {
        let tmp = f.with_file_name("next.tmp");
        std::fs::write(&tmp, b"NEW, LONGER CONTENT 11\n").unwrap();
        std::fs::rename(&tmp, f).unwrap();
    });
}

/// Guarantee: a FIFO put where a listed file was fails the pass at once,
/// naming the file (exit 3): the pass never waits on it (the open blocked
/// until something wrote to the pipe, holding the publish and its
/// recipient).
#[test]
fn a_fifo_swapped_in_after_the_listing_fails_the_pass_at_once() {
    replaced_after_the_listing(|f| {
        std::fs::remove_file(f).unwrap();
        let ok = Command::new("mkfifo").arg(f).status().unwrap().success();
        assert!(ok);
    });
}

/// The pass of 12 files held at its gate with its first files open, the
/// last one replaced by `swap`: the publish fails naming it (exit 3), the
/// recipient following the pass too, writing nothing of it.
fn replaced_after_the_listing(swap: impl FnOnce(&Path)) {
    let tmp = tempfile::tempdir().unwrap();
    let (gate, mut alice, mut bob) = gated_pair(tmp.path());
    let src = alice.data().join("many");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..12 {
        std::fs::write(src.join(format!("f{i:02}")), format!("old {i}\n")).unwrap();
    }
    alice.start();
    bob.start();
    let (mut publishing, _out, first) = start_publish(&alice, "many", &bob.id);
    let ticket = first["tickets"][0][1].as_str().unwrap().to_string();
    let mut fetching = start_fetch(&bob, &ticket, "got");
    // A verified chunk: the pass listed the folder and holds at the gate
    // with its first files open; the last one is not opened yet.
    wait_for("the first verified chunk", || {
        bob.metric("caravan_chunks_received_total") >= 1.0
    });
    swap(&src.join("f11"));
    std::fs::write(&gate, b"go").unwrap();
    wait_for("the publish to end", || {
        publishing.try_wait().unwrap().is_some()
    });
    let published = publishing.wait().unwrap();
    assert_eq!(published.code(), Some(3), "the publish must fail");
    wait_for("the fetch to end", || {
        fetching.try_wait().unwrap().is_some()
    });
    let done = fetching.wait_with_output().unwrap();
    assert!(!done.status.success());
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(said.contains("f11") && said.contains("replaced"), "{said}");
    assert!(!bob.data().join("got/f11").exists());
}
