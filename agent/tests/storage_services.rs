//! Every storage service that can run on this machine, exercised for real:
//! two `caravan-agent` daemons on loopback, the publisher's files in one
//! container / bucket / folder of the service, the recipient's in another.
//! A tree with nested folders, an empty file, an empty folder, unicode and
//! space-containing names and a multi-chunk file travels; every object the
//! recipient wrote is compared byte for byte (and nothing else may be there);
//! then a second version with a small edit, a removed and an added file.
//!
//! Each service is enabled by the environment its server script prints
//! (tests/all.sh starts them all):
//! * s3 — `tests/s3/moto.sh start PORT` (`CARAVAN_TEST_S3_ENDPOINT`, `…_BUCKET`)
//! * azblob — `tests/storage/azurite.sh start PORT` (`CARAVAN_TEST_AZBLOB_*`)
//! * gcs — `tests/storage/gcs.sh start PORT` (`CARAVAN_TEST_GCS_*`)
//! * webdav — `tests/storage/webdav.sh start PORT` (`CARAVAN_TEST_WEBDAV_*`)
//!
//! Without its variables a test prints SKIP and passes, so `cargo test`
//! works anywhere; CI sets them all.

mod common;

use std::collections::BTreeMap;

use common::*;

/// How one agent reaches its part of the service.
struct Side {
    /// `[storage.options]` lines (no secrets).
    options: Vec<(String, String)>,
    /// Secret options, written to a credentials file.
    secrets: Vec<(String, String)>,
}

/// One service under test: the scheme and the two agents' sides.
struct Service {
    scheme: &'static str,
    alice: Side,
    bob: Side,
    /// Size of the multi-chunk file (chunks are 512 KiB to 4 MiB).
    big_file: usize,
    /// Whether an empty folder is something the server stores (a key
    /// ending in `/`): s3s-fs makes it a directory of its filesystem, which
    /// its listings leave out, so there is no empty folder to publish.
    empty_folders: bool,
}

/// Over 8 MiB: several chunks, and several parts of a multipart upload.
const BIG: usize = (9 << 20) + 12_345;

/// A name no other test (thread or process) of this run uses: tests share
/// the servers, each in folders of its own.
fn unique() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{}-{n}", now_ms(), std::process::id())
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn opts(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// moto: S3 as most clients see it (it does not check signatures).
fn s3() -> Option<Service> {
    let endpoint = env("CARAVAN_TEST_S3_ENDPOINT")?;
    let bucket = env("CARAVAN_TEST_S3_BUCKET").unwrap_or_else(|| "caravan-test".into());
    Some(s3_service(&endpoint, &bucket, ("testing", "testing"), true))
}

/// s3s-fs: an S3 server that checks every request's signature (moto does
/// not), so names that need escaping are signed as S3 expects. It answers a
/// HEAD of a key that is a folder of objects with 500, not 404: publishing
/// a folder must not start with one.
fn s3s() -> Option<Service> {
    let endpoint = env("CARAVAN_TEST_S3S_ENDPOINT")?;
    let bucket = env("CARAVAN_TEST_S3S_BUCKET").unwrap_or_else(|| "caravan-seed".into());
    let access = env("CARAVAN_TEST_S3S_ACCESS_KEY")?;
    let secret = env("CARAVAN_TEST_S3S_SECRET_KEY")?;
    Some(s3_service(&endpoint, &bucket, (&access, &secret), false))
}

/// Alice and Bob in folders of their own in one S3 bucket.
fn s3_service(
    endpoint: &str,
    bucket: &str,
    (access, secret): (&str, &str),
    empty_folders: bool,
) -> Service {
    let run = unique();
    let side = |who: &str| Side {
        options: opts(&[
            ("bucket", bucket),
            ("endpoint", endpoint),
            ("region", "us-east-1"),
            ("root", &format!("/{who}-{run}/")),
        ]),
        secrets: opts(&[("access_key_id", access), ("secret_access_key", secret)]),
    };
    Service {
        scheme: "s3",
        big_file: BIG,
        empty_folders,
        alice: side("alice"),
        bob: side("bob"),
    }
}

fn azblob() -> Option<Service> {
    let endpoint = env("CARAVAN_TEST_AZBLOB_ENDPOINT")?;
    let container = env("CARAVAN_TEST_AZBLOB_CONTAINER").unwrap_or_else(|| "caravan-test".into());
    // Azurite's published development account, unless the script says otherwise.
    let account = env("CARAVAN_TEST_AZBLOB_ACCOUNT").unwrap_or_else(|| "devstoreaccount1".into());
    let key = env("CARAVAN_TEST_AZBLOB_KEY").unwrap_or_else(|| {
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
            .into()
    });
    let run = unique();
    let side = |container: &str, who: &str| Side {
        options: opts(&[
            ("container", container),
            ("endpoint", &endpoint),
            ("root", &format!("/{who}-{run}/")),
        ]),
        secrets: opts(&[("account_name", &account), ("account_key", &key)]),
    };
    Some(Service {
        scheme: "azblob",
        big_file: BIG,
        empty_folders: true,
        alice: side(&container, "alice"),
        bob: side(&format!("{container}-2"), "bob"),
    })
}

fn gcs() -> Option<Service> {
    let endpoint = env("CARAVAN_TEST_GCS_ENDPOINT")?;
    let bucket = env("CARAVAN_TEST_GCS_BUCKET").unwrap_or_else(|| "caravan-test".into());
    let run = unique();
    // The emulator does not check OAuth tokens: run anonymously rather than
    // look for Google credentials or a VM metadata server.
    let side = |bucket: &str, who: &str| Side {
        options: opts(&[
            ("bucket", bucket),
            ("endpoint", &endpoint),
            ("skip_signature", "true"),
            ("root", &format!("/{who}-{run}/")),
        ]),
        secrets: vec![],
    };
    Some(Service {
        scheme: "gcs",
        // Still several chunks, but under the 5 MiB at which OpenDAL's gcs
        // writer switches to the XML multipart API, which fake-gcs-server
        // does not implement (fsouza/fake-gcs-server#852).
        big_file: (4 << 20) + 500_000,
        empty_folders: true,
        alice: side(&bucket, "alice"),
        bob: side(&format!("{bucket}-2"), "bob"),
    })
}

fn webdav() -> Option<Service> {
    let endpoint = env("CARAVAN_TEST_WEBDAV_ENDPOINT")?;
    let user = env("CARAVAN_TEST_WEBDAV_USER").unwrap_or_default();
    let password = env("CARAVAN_TEST_WEBDAV_PASSWORD").unwrap_or_default();
    let run = unique();
    let side = |who: &str| Side {
        options: opts(&[("endpoint", &endpoint), ("root", &format!("/{who}-{run}/"))]),
        secrets: opts(&[("username", &user), ("password", &password)]),
    };
    Some(Service {
        scheme: "webdav",
        big_file: BIG,
        empty_folders: true,
        alice: side("alice"),
        bob: side("bob"),
    })
}

#[test]
fn s3_publish_and_fetch() {
    run("s3", s3(), "tests/s3/moto.sh");
}

#[test]
fn s3s_publish_and_fetch() {
    run("s3", s3s(), "tests/s3/s3s.sh");
}

#[test]
fn azblob_publish_and_fetch() {
    run("azblob", azblob(), "tests/storage/azurite.sh");
}

#[test]
fn gcs_publish_and_fetch() {
    run("gcs", gcs(), "tests/storage/gcs.sh");
}

#[test]
fn webdav_publish_and_fetch() {
    run("webdav", webdav(), "tests/storage/webdav.sh");
}

/// Writes `side` into `agent`'s config: options inline, secrets in a
/// credentials file (as a user would, never on a command line).
fn configure(agent: &TestAgent, scheme: &str, side: &Side) {
    let mut section = format!("[storage]\nscheme = \"{scheme}\"\n");
    if !side.secrets.is_empty() {
        let creds = agent.dir.join("storage.env");
        let text: String = side
            .secrets
            .iter()
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect();
        std::fs::write(&creds, text).unwrap();
        section.push_str(&format!("credentials = \"{}\"\n", creds.display()));
    }
    section.push_str("\n[storage.options]\n");
    for (k, v) in &side.options {
        section.push_str(&format!("{k} = \"{v}\"\n"));
    }
    agent.set_storage(&section);
}

/// The published tree: relative path → bytes, plus its empty folders.
struct Tree {
    files: BTreeMap<String, Vec<u8>>,
    empty_dirs: Vec<String>,
}

/// Nested folders, an empty file, an empty folder, names with non-ASCII
/// letters, spaces and a plus sign, small files and one file of several
/// chunks.
fn first_version(big_file: usize) -> Tree {
    let mut files = BTreeMap::new();
    let mut big = vec![0u8; big_file];
    fill_pseudo_random(&mut big, 42);
    files.insert("big/multi-chunk.bin".to_string(), big);
    for (i, name) in [
        "a/b/c/deep.txt",
        "фото/зима 2024/снег.bin",
        "日本語/ファイル.dat",
        "spaces and + signs/file (1).txt",
        "émojis/😀 smile.bin",
        "top.txt",
    ]
    .iter()
    .enumerate()
    {
        let mut data = vec![0u8; 1000 + i * 37_001];
        fill_pseudo_random(&mut data, i as u64 + 7);
        files.insert(name.to_string(), data);
    }
    files.insert("empty.txt".to_string(), Vec::new());
    files.insert("a/also-empty".to_string(), Vec::new());
    Tree {
        files,
        empty_dirs: vec!["empty-dir".to_string()],
    }
}

fn run(scheme: &str, service: Option<Service>, script: &str) {
    let Some(service) = service else {
        eprintln!(
            "SKIP {scheme}_publish_and_fetch: its server is not configured (`eval \"$(bash {script} start PORT)\"` sets it up; tests/all.sh does)"
        );
        return;
    };
    assert_eq!(service.scheme, scheme);
    let tmp = tempfile::tempdir().unwrap();
    let mut alice = TestAgent::init(&tmp.path().join("alice"));
    let mut bob = TestAgent::init(&tmp.path().join("bob"));
    configure(&alice, scheme, &service.alice);
    configure(&bob, scheme, &service.bob);
    let alice_cfg = caravan_agent::config::AgentConfig::load(&alice.config).unwrap();
    let bob_cfg = caravan_agent::config::AgentConfig::load(&bob.config).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let alice_op = caravan_agent::store::open(&alice_cfg.storage).unwrap();
    let bob_op = caravan_agent::store::open(&bob_cfg.storage).unwrap();

    // Alice's files go into her storage directly, as any other tool would put them.
    let mut tree = first_version(service.big_file);
    if !service.empty_folders {
        tree.empty_dirs.clear();
    }
    rt.block_on(async {
        for (rel, data) in &tree.files {
            alice_op
                .write(&format!("reports/{rel}"), data.clone())
                .await
                .unwrap_or_else(|e| panic!("{scheme}: writing {rel}: {e}"));
        }
        for d in &tree.empty_dirs {
            alice_op.create_dir(&format!("reports/{d}/")).await.unwrap();
        }
    });

    // On S3 Bob writes each file with one streamed PUT; the first is cut
    // off half way (as an outage would), and that file is fetched again
    // as a multipart upload.
    if scheme == "s3" {
        bob.env
            .push(("CARAVAN_FAULT_PUT_CUT".to_string(), "1".to_string()));
    }
    alice.start();
    bob.start();
    // Carol (local disk) is served from Alice's storage later on.
    let mut carol = TestAgent::init(&tmp.path().join("carol"));
    carol.start();
    let (share, tickets) = publish(&alice, "reports", &[&bob.id, &carol.id], &[]);
    let v1 = fetch(&bob, &tickets[0], "inbox", &[]);
    assert_eq!(v1["state"], "done", "{scheme}: {v1}");
    // Read as one stream per file, in blocks, the files are cut exactly
    // where a cut of each whole file falls (a block starts with the bytes
    // the last one left past its last cut).
    let cuts: usize = tree
        .files
        .values()
        .map(|d| caravan_agent::chunk::cut_points(d).len())
        .sum();
    assert_eq!(v1["chunks_total"], cuts as u64, "{scheme}: {v1}");
    rt.block_on(assert_holds(scheme, &bob_op, "inbox/", &tree));
    if scheme == "s3" {
        let non_empty = tree.files.values().filter(|d| !d.is_empty()).count() as f64;
        assert_eq!(
            bob.metric("caravan_files_put_retried_total"),
            1.0,
            "{scheme}"
        );
        assert_eq!(
            bob.metric("caravan_files_put_streamed_total"),
            non_empty - 1.0,
            "{scheme}: every other file in one streamed PUT"
        );
    }

    // Served from storage again, by a restarted publisher (nothing sealed
    // in its memory): the big file's chunks are cut from streamed reads of
    // it (`store/readahead.rs`), not one ranged read each, and every byte
    // still arrives as published.
    alice.kill9();
    alice.start();
    let again = fetch(&carol, &tickets[1], "again", &[]);
    assert_eq!(again["state"], "done", "{scheme}: {again}");
    assert_eq!(
        again["chunks_fetched"], v1["chunks_total"],
        "{scheme}: {again}"
    );
    let carol_cfg = caravan_agent::config::AgentConfig::load(&carol.config).unwrap();
    let carol_op = caravan_agent::store::open(&carol_cfg.storage).unwrap();
    rt.block_on(assert_holds(scheme, &carol_op, "again/", &tree));
    let streamed = alice.metric("caravan_chunks_sent_streamed_total");
    assert!(
        streamed >= 1.0,
        "{scheme}: no chunk of the big file came from a stream of it"
    );
    eprintln!(
        "{scheme}: served from storage, {streamed} of {} chunks cut from streams",
        alice.metric("caravan_chunks_sent_total")
    );

    // Version 2: 100 bytes changed in the middle of the big file, one file
    // removed, one added. Only the touched chunks travel.
    let big = tree.files.get_mut("big/multi-chunk.bin").unwrap();
    for b in &mut big[3_000_000..3_000_100] {
        *b ^= 0x5a;
    }
    tree.files.remove("top.txt");
    tree.files
        .insert("a/b/new in v2.txt".to_string(), b"added in v2".to_vec());
    rt.block_on(async {
        for rel in ["big/multi-chunk.bin", "a/b/new in v2.txt"] {
            alice_op
                .write(&format!("reports/{rel}"), tree.files[rel].clone())
                .await
                .unwrap();
        }
        alice_op.delete("reports/top.txt").await.unwrap();
    });
    publish(&alice, "reports", &[&bob.id], &["--share", &share]);
    let v2 = fetch(&bob, &tickets[0], "inbox", &[]);
    assert_eq!(v2["state"], "done", "{scheme}: {v2}");
    assert_eq!(v2["seq"], 2, "{scheme}: {v2}");
    let fetched = v2["chunks_fetched"].as_u64().unwrap();
    let total = v2["chunks_total"].as_u64().unwrap();
    assert!(
        fetched <= 3,
        "{scheme}: fetched {fetched} of {total} chunks for one small edit and one new file"
    );
    rt.block_on(assert_holds(scheme, &bob_op, "inbox/", &tree));
    eprintln!(
        "{scheme}: v1 {} chunks, v2 fetched {fetched} of {total}",
        v1["chunks_total"]
    );

    // Version 3 changes the tree's shape: a file becomes a folder and a
    // folder a file. Servers that keep objects as files (s3s-fs, the
    // WebDAV server) cannot hold `x` beside `x/y`: the recipient removes
    // the previous version's objects in the way before it writes.
    tree.files.remove("a/also-empty");
    tree.files.insert(
        "a/also-empty/now-a-folder.txt".to_string(),
        b"a folder now".to_vec(),
    );
    tree.files.remove("a/b/c/deep.txt");
    tree.files
        .insert("a/b/c".to_string(), b"a file where a folder was".to_vec());
    // A folder holding a folder becomes a file too.
    tree.files.remove("фото/зима 2024/снег.bin");
    tree.files
        .insert("фото".to_string(), b"two folders deep before".to_vec());
    rt.block_on(async {
        alice_op.delete("reports/a/also-empty").await.unwrap();
        alice_op.delete("reports/a/b/c/deep.txt").await.unwrap();
        let _ = alice_op.delete("reports/a/b/c/").await;
        alice_op
            .delete("reports/фото/зима 2024/снег.bin")
            .await
            .unwrap();
        let _ = alice_op.delete("reports/фото/зима 2024/").await;
        let _ = alice_op.delete("reports/фото/").await;
        for rel in ["a/also-empty/now-a-folder.txt", "a/b/c", "фото"] {
            alice_op
                .write(&format!("reports/{rel}"), tree.files[rel].clone())
                .await
                .unwrap_or_else(|e| panic!("{scheme}: writing {rel}: {e}"));
        }
    });
    publish(&alice, "reports", &[&bob.id], &["--share", &share]);
    let v3 = fetch(&bob, &tickets[0], "inbox", &[]);
    assert_eq!(v3["state"], "done", "{scheme}: {v3}");
    assert_eq!(v3["seq"], 3, "{scheme}: {v3}");
    rt.block_on(assert_holds(scheme, &bob_op, "inbox/", &tree));
}

/// `op` holds exactly `tree` under `dir`: every file with the same bytes,
/// no extra objects (no leftover part files), the empty folders present.
async fn assert_holds(scheme: &str, op: &opendal::Operator, dir: &str, tree: &Tree) {
    let mut got = BTreeMap::new();
    for entry in op.list_with(dir).recursive(true).await.unwrap() {
        let Some(rel) = entry.path().strip_prefix(dir) else {
            continue;
        };
        if rel.is_empty() {
            continue;
        }
        if !entry.metadata().is_dir() {
            let data = op
                .read(entry.path())
                .await
                .unwrap_or_else(|e| panic!("{scheme}: reading {}: {e}", entry.path()))
                .to_vec();
            got.insert(rel.to_string(), data);
        }
    }
    let want: Vec<&String> = tree.files.keys().collect();
    let have: Vec<&String> = got.keys().collect();
    assert_eq!(have, want, "{scheme}: the recipient's files differ");
    for (rel, data) in &tree.files {
        assert!(
            got[rel] == *data,
            "{scheme}: {rel} differs ({} bytes, want {})",
            got[rel].len(),
            data.len()
        );
    }
    for d in &tree.empty_dirs {
        let meta = op
            .stat(&format!("{dir}{d}/"))
            .await
            .unwrap_or_else(|e| panic!("{scheme}: empty folder {d} missing: {e}"));
        assert!(meta.is_dir(), "{scheme}: {d} is not a folder");
    }
}

/// WebDAV takes a file in one request, so the recipient holds it in memory:
/// a file over `CARAVAN_ONE_SHOT_MAX_BYTES` is refused before anything is
/// written, with a message that names the limit.
#[test]
fn webdav_refuses_a_file_over_the_one_shot_limit() {
    let Some(service) = webdav() else {
        eprintln!(
            "SKIP webdav_refuses_a_file_over_the_one_shot_limit: its server is not configured (tests/storage/webdav.sh)"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut alice = TestAgent::init(&tmp.path().join("alice"));
    let mut bob = TestAgent::init(&tmp.path().join("bob"));
    configure(&alice, "webdav", &service.alice);
    configure(&bob, "webdav", &service.bob);
    let alice_cfg = caravan_agent::config::AgentConfig::load(&alice.config).unwrap();
    let bob_cfg = caravan_agent::config::AgentConfig::load(&bob.config).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let alice_op = caravan_agent::store::open(&alice_cfg.storage).unwrap();
    let bob_op = caravan_agent::store::open(&bob_cfg.storage).unwrap();
    let mut big = vec![0u8; 3 << 20];
    fill_pseudo_random(&mut big, 3);
    rt.block_on(async {
        alice_op
            .write("movies/small.txt", b"fits".to_vec())
            .await
            .unwrap();
        alice_op.write("movies/big.bin", big).await.unwrap();
    });
    bob.env
        .push(("CARAVAN_ONE_SHOT_MAX_BYTES".into(), (2 << 20).to_string()));
    alice.start();
    bob.start();
    let (_, tickets) = publish(&alice, "movies", &[&bob.id], &[]);
    let out = cli(&[
        "fetch",
        "--config",
        bob.cfg(),
        &tickets[0],
        "--dest",
        "inbox",
        "--json",
    ]);
    assert!(!out.status.success(), "a file over the limit was fetched");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("big.bin") && err.contains("CARAVAN_ONE_SHOT_MAX_BYTES"),
        "{err}"
    );
    rt.block_on(async {
        assert!(
            !bob_op.exists("inbox/small.txt").await.unwrap(),
            "nothing may be written"
        );
    });
}

/// A publish from a bucket reads the object it listed and no other: every
/// read carries the listed ETag (`If-Match`), so an object saved over since
/// the listing — or between a stream that failed and the stream opened
/// again where it stopped — is refused by the server (412) instead of its
/// bytes passing for the listed file's, or joining them. (A server whose
/// listings carry no ETag, as s3s-fs's, is read unpinned; the local GCS
/// server, fake-gcs-server, ignores `If-Match`, so GCS is not asserted.)
fn reads_only_the_listed_object(scheme: &str, service: Option<Service>, script: &str) {
    let Some(service) = service else {
        eprintln!(
            "SKIP {scheme}_reads_only_the_listed_object: its server is not configured (`eval \"$(bash {script} start PORT)\"`)"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let alice = TestAgent::init(&tmp.path().join("alice"));
    configure(&alice, service.scheme, &service.alice);
    let cfg = caravan_agent::config::AgentConfig::load(&alice.config).unwrap();
    let op = caravan_agent::store::open(&cfg.storage).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use futures::TryStreamExt;
        let len = 300_000usize;
        let (mut first, mut second) = (vec![0u8; len], vec![0u8; len]);
        fill_pseudo_random(&mut first, 1);
        fill_pseudo_random(&mut second, 2);
        op.write("pin/f", first.clone()).await.unwrap();
        assert!(op.info().capability().read_with_if_match);
        // The ETag as a publish's listing gets it.
        let listed: Vec<opendal::Entry> = op
            .lister_with("pin/")
            .recursive(true)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let etag = listed
            .iter()
            .find(|e| e.path() == "pin/f")
            .and_then(|e| e.metadata().etag().map(str::to_string))
            .unwrap_or_else(|| panic!("{scheme}: no ETag in the listing"));
        let read = |etag: String| {
            let op = op.clone();
            async move {
                let mut r = caravan_agent::store::Sequential::new(&op, "pin/f", 0, len as u64)
                    .whole_object()
                    .pinned(Some(etag));
                let mut buf = Vec::new();
                r.read_into(&mut buf, len).await.map(|_| buf)
            }
        };
        assert_eq!(read(etag.clone()).await.unwrap(), first);
        // Saved over by an object of the same size.
        op.write("pin/f", second).await.unwrap();
        let e = match read(etag).await {
            Ok(_) => panic!("{scheme}: an object saved over was read"),
            Err(e) => e,
        };
        assert_eq!(
            e.kind(),
            opendal::ErrorKind::ConditionNotMatch,
            "{scheme}: {e}"
        );
    });
}

#[test]
fn s3_reads_only_the_listed_object() {
    reads_only_the_listed_object("s3", s3(), "tests/s3/moto.sh");
}

#[test]
fn azblob_reads_only_the_listed_object() {
    reads_only_the_listed_object("azblob", azblob(), "tests/storage/azurite.sh");
}

#[test]
fn webdav_reads_only_the_listed_object() {
    reads_only_the_listed_object("webdav", webdav(), "tests/storage/webdav.sh");
}

/// An object removed after the listing, before the pass reads it, fails
/// the publish naming it with exit code 3 ("publish again"), like one
/// saved over, not exit 1 with the server's raw answer.
#[test]
fn s3_an_object_removed_during_the_pass_fails_the_publish_by_name() {
    let Some(service) = s3() else {
        eprintln!("SKIP s3_an_object_removed_during_the_pass…: moto is not configured");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let gate = tmp.path().join("gate");
    let mut alice = TestAgent::init(&tmp.path().join("alice"));
    alice.env.push((
        "CARAVAN_FAULT_PUBLISH_GATE".into(),
        gate.to_str().unwrap().into(),
    ));
    // One file at a time: the gate holds the pass before the last is opened.
    alice.env.push(("CARAVAN_PUBLISH_FILES".into(), "1".into()));
    let bob = TestAgent::init(&tmp.path().join("bob"));
    configure(&alice, service.scheme, &service.alice);
    let cfg = caravan_agent::config::AgentConfig::load(&alice.config).unwrap();
    let op = caravan_agent::store::open(&cfg.storage).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for i in 0..6 {
            op.write(&format!("gone/f{i}"), format!("file {i}\n").into_bytes())
                .await
                .unwrap();
        }
    });
    alice.start();
    // The pass lists the folder, seals the first file's block and holds
    // at the gate; the last file is not opened yet.
    // `--json` says the share and its tickets once the folder is listed.
    let mut publishing = std::process::Command::new(BIN)
        .args([
            "publish",
            "--config",
            alice.cfg(),
            "gone",
            "--to",
            &bob.id,
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(publishing.stdout.as_mut().unwrap()),
        &mut first,
    )
    .unwrap();
    assert!(first.contains("share_id"), "{first}");
    // The tickets come before the listing: wait for the pass to begin.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !alice.logs().contains("the publish pass begins") {
        assert!(std::time::Instant::now() < deadline, "the pass never began");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    rt.block_on(async { op.delete("gone/f5").await.unwrap() });
    std::fs::write(&gate, b"go").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while publishing.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the publish never ended"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = publishing.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{said}");
    assert!(said.contains("f5") && said.contains("removed"), "{said}");
    alice.kill9();
}

/// A key that is a file and a prefix too (`a` and `a/b`, which S3 allows):
/// publishing it by name publishes the file, as a walk of its folder keeps
/// the file and leaves out what is under it; before, the keys under it
/// were published in its place.
#[test]
fn s3_a_key_that_is_a_file_and_a_prefix_publishes_the_file() {
    let Some(service) = s3() else {
        eprintln!("SKIP s3_a_key_that_is_a_file_and_a_prefix…: moto is not configured");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut alice = TestAgent::init(&tmp.path().join("alice"));
    let mut bob = TestAgent::init(&tmp.path().join("bob"));
    configure(&alice, service.scheme, &service.alice);
    let cfg = caravan_agent::config::AgentConfig::load(&alice.config).unwrap();
    let op = caravan_agent::store::open(&cfg.storage).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        op.write("both/a", b"I am a file".to_vec()).await.unwrap();
        op.write("both/a/b", b"I am under a file".to_vec())
            .await
            .unwrap();
    });
    alice.start();
    bob.start();
    let (_, tickets) = publish(&alice, "both/a", &[&bob.id], &[]);
    let got = fetch(&bob, &tickets[0], "got", &[]);
    assert_eq!(got["state"], "done", "{got}");
    assert_eq!(got["files_total"], 1, "{got}");
    let file = bob.data().join("got/a");
    assert_eq!(std::fs::read(&file).unwrap(), b"I am a file");
    alice.kill9();
    bob.kill9();
}
