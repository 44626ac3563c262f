//! Helpers for tests that run real `caravan-agent` processes on loopback.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_caravan-agent");

/// A port that was free a moment ago, below the kernel's ephemeral range
/// (32768 and up here): a port picked by binding port 0 is an ephemeral
/// one, which the kernel may hand to any outgoing connection (a CLI's
/// poll, a fetch's dial) before the daemon binds it, and the daemon then
/// failed with "Address already in use", however often it retried.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // One seed per process: ports then step through all 12,000 before one
    // repeats (7,919 is prime to 12,000). A seed read from the clock at
    // each call gave two calls the same port now and then (an agent
    // initialised with its peer and metrics ports equal).
    static SEED: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        std::process::id().wrapping_mul(2_654_435_761)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
    });
    for _ in 0..2000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (seed.wrapping_add(n.wrapping_mul(7_919)) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs the CLI to completion.
pub fn cli(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run caravan-agent")
}

/// Runs the CLI and returns stdout, panicking with stderr on failure.
pub fn cli_ok(args: &[&str]) -> String {
    let out = cli(args);
    assert!(
        out.status.success(),
        "caravan-agent {args:?} failed ({:?}):\n{}",
        out.status.code(),
        stderr_of(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What a finished CLI run said on stderr.
pub fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// One agent: a directory made by `caravan-agent init` and, when running, its process.
pub struct TestAgent {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub id: String,
    pub peer_addr: String,
    pub metrics_addr: String,
    pub child: Option<Child>,
    pub env: Vec<(String, String)>,
    /// The uid (and gid) the daemon runs as, when the tests run as root
    /// and an ordinary user was asked for ([`TestAgent::unprivileged`]).
    pub run_as: Option<u32>,
}

/// The uid an unprivileged daemon runs as when the tests run as root
/// (`nobody`; the operator's pods run as 65532, any non-root uid will do).
pub const UNPRIVILEGED_UID: u32 = 65534;

impl TestAgent {
    /// `caravan-agent init` in `dir` with fresh loopback ports.
    pub fn init(dir: &Path) -> TestAgent {
        let peer = format!("127.0.0.1:{}", free_port());
        let admin = format!("127.0.0.1:{}", free_port());
        let metrics = format!("127.0.0.1:{}", free_port());
        let id = cli_ok(&[
            "init",
            "--dir",
            dir.to_str().unwrap(),
            "--listen",
            &peer,
            "--admin",
            &admin,
            "--metrics",
            &metrics,
        ])
        .trim()
        .to_string();
        TestAgent {
            dir: std::fs::canonicalize(dir).unwrap(),
            config: std::fs::canonicalize(dir).unwrap().join("agent.toml"),
            id,
            peer_addr: peer,
            metrics_addr: metrics,
            child: None,
            env: vec![],
            run_as: None,
        }
    }

    /// From now on the daemon runs as an ordinary user: as
    /// [`UNPRIVILEGED_UID`] when the tests run as root (its folder handed
    /// to it, the folders above made enterable), else as the tests' own
    /// user, which is one already. Files the test writes later into the
    /// folder are handed over by [`TestAgent::hand_over`].
    pub fn unprivileged(&mut self) {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        if !rustix::process::geteuid().is_root() {
            return;
        }
        self.run_as = Some(UNPRIVILEGED_UID);
        for up in self.dir.ancestors().skip(1) {
            let Ok(meta) = std::fs::metadata(up) else {
                continue;
            };
            if meta.mode() & 0o001 == 0 {
                let mode = (meta.mode() & 0o7777) | 0o011;
                std::fs::set_permissions(up, std::fs::Permissions::from_mode(mode)).unwrap();
            }
        }
        self.hand_over();
    }

    /// Gives everything under the agent's folder to the user its daemon
    /// runs as (nothing to do unless [`TestAgent::unprivileged`] as root).
    pub fn hand_over(&self) {
        fn chown_tree(p: &Path, uid: u32) {
            std::os::unix::fs::lchown(p, Some(uid), Some(uid)).unwrap();
            let meta = std::fs::symlink_metadata(p).unwrap();
            if meta.is_dir() {
                for e in std::fs::read_dir(p).unwrap() {
                    chown_tree(&e.unwrap().path(), uid);
                }
            }
        }
        if let Some(uid) = self.run_as {
            chown_tree(&self.dir, uid);
        }
    }

    /// Replaces the storage section of the config (e.g. to use S3).
    pub fn set_storage(&self, toml_section: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let head = text.split("[storage]").next().unwrap().to_string();
        std::fs::write(&self.config, format!("{head}{toml_section}")).unwrap();
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn cfg(&self) -> &str {
        self.config.to_str().unwrap()
    }

    /// Starts the daemon and waits until it answers as itself: /readyz,
    /// then `status` naming this agent (a port taken by another test's
    /// agent in the meantime would answer for that one). On a first start
    /// whose ports were taken, retries on fresh ports.
    pub fn start(&mut self) {
        let first = self.log_files().is_empty();
        // Ports are picked free but bound later by the daemon: another
        // test's process may take one in between, so a first start moves to
        // fresh ports and tries again (each failed start's error is kept).
        let mut failures = Vec::new();
        for attempt in 0..5 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(200 * attempt));
                self.new_ports();
            }
            if self.try_start() {
                return;
            }
            assert!(first, "agent exited early on restart:\n{}", self.log_tail());
            failures.push(self.log_tail());
        }
        panic!("agent did not start:\n{}", failures.join("\n---\n"));
    }

    /// The daemon's log files, one per start, oldest first.
    pub fn log_files(&self) -> Vec<PathBuf> {
        let mut logs: Vec<PathBuf> = self
            .dir
            .read_dir()
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("agent-"))
            })
            .collect();
        logs.sort();
        logs
    }

    /// Everything the daemon logged, every start.
    pub fn logs(&self) -> String {
        self.log_files()
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect()
    }

    /// What the daemon logged since its last start.
    pub fn newest_log(&self) -> String {
        self.log_files()
            .last()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .unwrap_or_default()
    }

    /// The end of the newest agent log (the temporary folder is gone by
    /// the time anyone reads a failed test's output).
    pub fn log_tail(&self) -> String {
        let logs = self.log_files();
        let Some(newest) = logs.last() else {
            return format!("no agent log in {}", self.dir.display());
        };
        let text = std::fs::read_to_string(newest).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(20);
        format!(
            "{} ({} starts):\n{}",
            newest.display(),
            logs.len(),
            lines[from..].join("\n")
        )
    }

    /// Moves the agent to fresh loopback ports (before it was ever reachable).
    fn new_ports(&mut self) {
        let mut text = std::fs::read_to_string(&self.config).unwrap();
        let admin = text
            .lines()
            .find_map(|l| l.strip_prefix("admin_listen = \""))
            .map(|l| l.trim_end_matches('"').to_string())
            .unwrap();
        let peer = format!("127.0.0.1:{}", free_port());
        let metrics = format!("127.0.0.1:{}", free_port());
        let new_admin = format!("127.0.0.1:{}", free_port());
        text = text
            .replace(&self.peer_addr, &peer)
            .replace(&self.metrics_addr, &metrics)
            .replace(&admin, &new_admin);
        std::fs::write(&self.config, text).unwrap();
        self.peer_addr = peer;
        self.metrics_addr = metrics;
    }

    /// One start; false when the daemon exited (its ports were taken).
    fn try_start(&mut self) -> bool {
        let log = std::fs::File::create(self.dir.join(format!("agent-{}.log", now_ms()))).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "--config", self.cfg()])
            .stdout(Stdio::null())
            .stderr(log)
            .env("RUST_LOG", "info");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(uid) = self.run_as {
            // std drops the supplementary groups too when root sets a uid.
            std::os::unix::process::CommandExt::uid(&mut cmd, uid);
            std::os::unix::process::CommandExt::gid(&mut cmd, uid);
        }
        self.child = Some(cmd.spawn().expect("spawn agent"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(_)) = c.try_wait()
            {
                self.child = None;
                return false;
            }
            if let Ok(body) = http_get(&self.metrics_addr, "/readyz")
                && body.contains("ready")
            {
                let out = cli(&["status", "--config", self.cfg(), "--json"]);
                let me = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                    .is_ok_and(|v| v["agent_id"] == self.id.as_str());
                if me {
                    return true;
                }
            }
            assert!(Instant::now() < deadline, "agent did not become ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends the daemon a signal by its pid (`-STOP`, `-CONT`, …).
    pub fn signal(&self, sig: &str) {
        let pid = self
            .child
            .as_ref()
            .expect("a running daemon")
            .id()
            .to_string();
        let st = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(st.success(), "kill {sig} {pid}");
    }

    /// SIGKILL, no clean-up at all.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn metrics(&self) -> String {
        http_get(&self.metrics_addr, "/metrics").unwrap_or_default()
    }

    /// Value of one unlabelled metric.
    pub fn metric(&self, name: &str) -> f64 {
        self.metrics()
            .lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// Minimal HTTP/1.0 GET over a plain socket (keeps tests free of an HTTP client).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The last line of a JSON-lines output (`publish --json` prints the share
/// id and tickets first, then its summary).
pub fn last_json(out: &str) -> serde_json::Value {
    let line = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    serde_json::from_str(line).unwrap()
}

/// Publishes `path` from `publisher` for `recipients`; returns (share id, tickets in order).
pub fn publish(
    publisher: &TestAgent,
    path: &str,
    recipients: &[&str],
    extra: &[&str],
) -> (String, Vec<String>) {
    let mut args = vec!["publish", "--config", publisher.cfg(), path, "--json"];
    for r in recipients {
        args.push("--to");
        args.push(r);
    }
    args.extend_from_slice(extra);
    let out = cli_ok(&args);
    let v = last_json(&out);
    let tickets = v["tickets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t[1].as_str().unwrap().to_string())
        .collect();
    (v["share_id"].as_str().unwrap().to_string(), tickets)
}

/// `publish --json` in the background; returns the child, its output, and
/// the first line (share id and tickets, printed before the pass).
pub fn start_publish(
    alice: &TestAgent,
    path: &str,
    to: &str,
) -> (
    std::process::Child,
    std::io::BufReader<std::process::ChildStdout>,
    serde_json::Value,
) {
    let mut child = Command::new(BIN)
        .args([
            "publish",
            "--config",
            alice.cfg(),
            path,
            "--to",
            to,
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let first: serde_json::Value = serde_json::from_str(&line).unwrap();
    (child, out, first)
}

/// Fetches and returns the final progress JSON.
pub fn fetch(agent: &TestAgent, ticket: &str, dest: &str, peers: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "fetch",
        "--config",
        agent.cfg(),
        ticket,
        "--dest",
        dest,
        "--json",
    ];
    for p in peers {
        args.push("--peer");
        args.push(p);
    }
    // `--json` streams `status` lines, then one `summary` line.
    let out = cli_ok(&args);
    let last = out.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["message_type"], "summary", "{out}");
    v
}

/// Writes a tree of files with pseudo-random content, an empty file, an
/// empty directory, nested and non-ASCII names.
pub fn make_tree(root: &Path, files: usize, size: usize) {
    for i in 0..files {
        let p = root.join(format!("d{}/sub/файл-{i}.bin", i % 3));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let mut buf = vec![0u8; size + i * 1000];
        fill_pseudo_random(&mut buf, i as u64 + 1);
        std::fs::write(p, buf).unwrap();
    }
    std::fs::write(root.join("empty.txt"), b"").unwrap();
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
}

/// Every file and directory of `a` is in `b` with the same bytes.
pub fn assert_same_tree(a: &Path, b: &Path) {
    assert!(
        trees_equal(a, b),
        "{} and {} differ",
        a.display(),
        b.display()
    );
    // empty directories too
    for e in walk_dirs(a) {
        let rel = e.strip_prefix(a).unwrap();
        assert!(b.join(rel).is_dir(), "directory {} missing", rel.display());
    }
}

fn walk_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() && p.file_name().unwrap() != ".caravan" {
                out.push(p.clone());
                stack.push(p);
            }
        }
    }
    out
}

/// Deterministic pseudo-random bytes (xorshift), the same generator the demo uses.
pub fn fill_pseudo_random(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

/// The same relative file paths with the same bytes under `a` and `b`
/// (the agent's `.caravan/` state folders left out).
pub fn trees_equal(a: &Path, b: &Path) -> bool {
    fn files(root: &Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    if p.file_name().is_some_and(|n| n != ".caravan") {
                        stack.push(p);
                    }
                } else {
                    out.push(p.strip_prefix(root).unwrap().to_path_buf());
                }
            }
        }
        out.sort();
        out
    }
    let fa = files(a);
    fa == files(b)
        && fa
            .iter()
            .all(|r| std::fs::read(a.join(r)).unwrap() == std::fs::read(b.join(r)).unwrap())
}

/// Bytes of the files under `root`.
pub fn dir_bytes(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

/// Runs `fetch` with a bound on its duration (an attack that is not refused
/// would otherwise run for hours, a hang would hold the test run); returns
/// exit code and stderr.
pub fn fetch_bounded(
    a: &TestAgent,
    ticket: &str,
    dest: &str,
    peers: &[&str],
) -> (Option<i32>, String) {
    let mut args = vec![
        "fetch",
        "--config",
        a.cfg(),
        ticket,
        "--dest",
        dest,
        "--json",
    ];
    for p in peers {
        args.push("--peer");
        args.push(p);
    }
    let mut child = Command::new(BIN)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            use std::io::Read;
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code(), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return (None, "fetch still running after 120 s (killed)".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
