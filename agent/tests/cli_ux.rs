//! The command line as a user meets it, without a daemon: where the config
//! comes from, what a mistake prints, which exit code it gets, what `--json`
//! turns errors into, and that every flag is documented in `--help`.

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_caravan-agent");

/// Runs the CLI with a clean environment: HOME in `home`, no CARAVAN_CONFIG
/// unless given.
fn run(home: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("HOME", home)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.args(args).output().expect("run caravan-agent")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn config_defaults_to_caravan_config_then_the_home_path() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    // Neither flag nor variable: the default path, and a message that says what to do.
    let out = run(home, &[], &["status"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    let default = home.join(".config/caravan/agent.toml");
    assert!(err.contains(&default.display().to_string()), "{err}");
    assert!(
        err.contains("CARAVAN_CONFIG") && err.contains("caravan-agent init"),
        "{err}"
    );

    // CARAVAN_CONFIG is used when --config is not given.
    let dir = home.join("agent");
    let init = run(home, &[], &["init", "--dir", dir.to_str().unwrap()]);
    assert!(init.status.success(), "{}", stderr(&init));
    let cfg = dir.join("agent.toml");
    let id_env = run(home, &[("CARAVAN_CONFIG", cfg.to_str().unwrap())], &["id"]);
    assert!(id_env.status.success(), "{}", stderr(&id_env));
    let id_flag = run(home, &[], &["id", "--config", cfg.to_str().unwrap()]);
    assert_eq!(id_env.stdout, id_flag.stdout);
    // A key file named on the command line wins over CARAVAN_CONFIG (it
    // was refused as a conflict with a --config never typed).
    let other = home.join("other");
    let init = run(home, &[], &["init", "--dir", other.to_str().unwrap()]);
    assert!(init.status.success(), "{}", stderr(&init));
    let key = other.join("identity.key");
    let by_key = run(
        home,
        &[("CARAVAN_CONFIG", cfg.to_str().unwrap())],
        &["id", "--identity", key.to_str().unwrap()],
    );
    assert!(by_key.status.success(), "{}", stderr(&by_key));
    let other_id = run(
        home,
        &[],
        &["id", "--config", other.join("agent.toml").to_str().unwrap()],
    );
    assert_eq!(by_key.stdout, other_id.stdout);
    assert_ne!(by_key.stdout, id_env.stdout);

    // …and so is the default path.
    let init = run(
        home,
        &[],
        &[
            "init",
            "--dir",
            home.join(".config/caravan").to_str().unwrap(),
        ],
    );
    assert!(init.status.success(), "{}", stderr(&init));
    let status = run(home, &[], &["status"]);
    // The daemon is not running: "unreachable" (4), not "no configuration" (3).
    assert_eq!(status.status.code(), Some(4), "{}", stderr(&status));
    // `id` takes the default path too.
    let id = run(home, &[], &["id"]);
    assert!(id.status.success(), "{}", stderr(&id));
    assert!(String::from_utf8_lossy(&id.stdout).starts_with("cv1-"));
}

/// `init` checks its addresses before it writes anything: a mistyped
/// one, or two listeners on one port, leave no half-made agent behind.
#[test]
fn init_refuses_bad_addresses_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let dir = home.join("a");
    let d = dir.to_str().unwrap();
    for args in [
        vec!["init", "--dir", d, "--listen", "not an address"],
        vec![
            "init",
            "--dir",
            d,
            "--listen",
            "127.0.0.1:7400",
            "--admin",
            "127.0.0.1:7400",
        ],
    ] {
        let out = run(home, &[], &args);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", stderr(&out));
        assert!(!dir.exists(), "{args:?} left {}", dir.display());
    }
}

#[test]
fn errors_say_configuration_error_once_and_accept_host_names() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let dir = home.join("a");
    assert!(
        run(home, &[], &["init", "--dir", dir.to_str().unwrap()])
            .status
            .success()
    );
    let cfg = dir.join("agent.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let with = |listen: &str| {
        let t: String = text
            .lines()
            .map(|l| {
                if l.starts_with("listen =") {
                    format!("listen = {listen:?}")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&cfg, t).unwrap();
    };
    with("localhost:7400");
    let ok = run(home, &[], &["id", "-c", cfg.to_str().unwrap()]);
    assert!(
        ok.status.success(),
        "localhost:7400 accepted: {}",
        stderr(&ok)
    );
    with("nowhere");
    let bad = run(home, &[], &["id", "-c", cfg.to_str().unwrap()]);
    assert_eq!(bad.status.code(), Some(3));
    let err = stderr(&bad);
    assert_eq!(err.matches("configuration error").count(), 1, "{err}");
    assert!(
        err.contains("listen = \"nowhere\" is not host:port"),
        "{err}"
    );
}

#[test]
fn bad_ids_tickets_and_durations_are_all_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let cfg = home.join("none.toml");
    let c = cfg.to_str().unwrap();
    for args in [
        vec!["trust", "grant", "-c", c, "cv1-mistyped", "--depth", "1"],
        vec![
            "trust",
            "grant",
            "-c",
            c,
            "cv1-x",
            "--depth",
            "1",
            "--expires",
            "1y",
        ],
        vec!["fetch", "-c", c, "caravan-ticket-v1:garbage", "--dest", "d"],
        vec!["ticket", "-c", c, "sh1-nope", "--to", "cv1-nope"],
    ] {
        let out = run(home, &[], &args);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", stderr(&out));
    }
    // A usage mistake (unknown flag) stays 2.
    assert_eq!(
        run(home, &[], &["status", "--bogus"]).status.code(),
        Some(2)
    );
}

#[test]
fn json_turns_errors_into_exit_error_objects() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    for args in [
        vec!["status", "--json"],
        vec!["trust", "grant", "cv1-mistyped", "--depth", "1", "--json"],
    ] {
        let out = run(home, &[], &args);
        assert_eq!(out.status.code(), Some(3));
        let v: serde_json::Value = serde_json::from_str(stderr(&out).trim())
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", stderr(&out)));
        assert_eq!(v["message_type"], "exit_error");
        assert_eq!(v["code"], 3);
        assert!(!v["message"].as_str().unwrap().is_empty());
    }
    // A usage mistake under --json: JSON as well, exit code 2; --help is
    // still help.
    let out = run(home, &[], &["status", "--bogus", "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_str(stderr(&out).trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stderr(&out)));
    assert_eq!(v["code"], 2);
    assert!(v["message"].as_str().unwrap().contains("--bogus"), "{v}");
    // What is missing is named, not only "were not provided:".
    let out = run(home, &[], &["fetch", "--dest", "x", "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_str(stderr(&out).trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stderr(&out)));
    assert!(v["message"].as_str().unwrap().contains("<TICKET>"), "{v}");
    let out = run(home, &[], &["status", "--help", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"));
}

#[test]
fn help_documents_config_and_completions_are_printed() {
    let tmp = tempfile::tempdir().unwrap();
    for cmd in ["fetch", "publish", "ticket", "status", "peers", "run"] {
        let out = run(tmp.path(), &[], &[cmd, "--help"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("CARAVAN_CONFIG"), "{cmd} --help: {text}");
    }
    for shell in ["bash", "zsh", "fish"] {
        let out = run(tmp.path(), &[], &["completion", shell]);
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains("caravan-agent"));
    }
}

/// Guarantee: output into a pipe whose reader went away (`… | head -1`)
/// ends the command quietly with exit code 0, never a panic and a
/// backtrace.
#[test]
fn a_closed_pipe_on_stdout_is_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let made = run(tmp.path(), &[], &["init", "--dir", dir.to_str().unwrap()]);
    assert!(made.status.success(), "{}", stderr(&made));
    let cfg = dir.join("agent.toml");
    for args in [
        vec!["id", "--config", cfg.to_str().unwrap()],
        vec!["completion", "bash"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(BIN)
            .env("HOME", tmp.path())
            .args(&args)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
