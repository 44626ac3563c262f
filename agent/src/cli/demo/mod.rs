//! `demo`: the local demos, run in this process, and how they are shown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow};

use caravan_agent::node::{FetchProgress, FetchState};

use crate::cli::args::{Command, Scenario};
use crate::cli::shares::bytes_bar;

mod offline;
mod scenarios;
use crate::cli::exit::Exit;
use scenarios::{DemoOptions, DemoReport};

pub(crate) async fn command(cmd: Command) -> Result<()> {
    match cmd {
        Command::Demo {
            keep,
            json,
            scenario: Scenario::Trust,
            ..
        } => {
            if !json {
                say!("starting two repositories and five agents on loopback…");
            }
            let r = scenarios::run_trust(keep)
                .await
                .map_err(|e| Exit::Transfer(anyhow!(e)))?;
            if json {
                out!("{}", serde_json::to_string(&r)?);
            } else {
                for (name, id) in &r.agents {
                    out!("{name:>5} = {id}");
                }
                out!(
                    "\ntrust tree of alice (depth 3) before the revocation:\n{}",
                    r.tree_before
                );
                out!("after alice revoked alice→bob:\n{}", r.tree_after);
                out!("refused: {}", r.pruned.join(", "));
                for line in &r.refusals {
                    out!("  {line}");
                }
                out!(
                    "still fetching version {}: {}",
                    r.second_version,
                    r.kept.join(", ")
                );
                out!(
                    "version {} uses a fresh share key: {}",
                    r.second_version,
                    if r.fresh_key { "yes" } else { "NO" }
                );
                out!(
                    "first refusal {:.3}s after the revocation; every fetched byte verified: {}",
                    r.revocation_seconds,
                    if r.verified { "yes" } else { "NO" }
                );
            }
            if !r.verified || !r.fresh_key {
                return Err(Exit::Transfer(anyhow!(
                    "verification failed (bytes verified: {}, fresh key: {})",
                    r.verified,
                    r.fresh_key
                ))
                .into());
            }
            Ok(())
        }
        Command::Demo {
            size,
            files,
            keep,
            json,
            scenario: Scenario::Offline,
            s3_endpoint,
            s3_bucket,
        } => run_offline(size, files, keep, json, s3_endpoint, s3_bucket).await,
        Command::Demo {
            size,
            files,
            keep,
            json,
            scenario: Scenario::Transfer,
            ..
        } => {
            let bar = bytes_bar(json);
            let b2 = bar.clone();
            if !json {
                say!(
                    "generating {files} file(s), {size} bytes, and starting two agents on loopback…"
                );
            }
            let poller: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>> = Arc::default();
            let p2 = poller.clone();
            let report = scenarios::run(
                DemoOptions { size, files, keep },
                move |p: Arc<FetchProgress>| {
                    let h = tokio::spawn(async move {
                        loop {
                            let s = p.snapshot();
                            b2.set_length(s.bytes_total.max(1));
                            b2.set_position(s.bytes_done);
                            if matches!(s.state, FetchState::Done | FetchState::Failed) {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    });
                    if let Ok(mut g) = p2.lock() {
                        *g = Some(h);
                    }
                },
            )
            .await
            .map_err(|e| Exit::Transfer(anyhow!(e)))?;
            if let Some(h) = poller.lock().ok().and_then(|mut g| g.take()) {
                h.abort();
            }
            bar.finish_and_clear();
            print_demo(&report, json)?;
            if !report.verified {
                return Err(Exit::Transfer(anyhow!(
                    "verification failed: fetched files differ from the source"
                ))
                .into());
            }
            Ok(())
        }
        _ => unreachable!("not a demo command"),
    }
}

async fn run_offline(
    size: u64,
    files: u64,
    keep: Option<std::path::PathBuf>,
    json: bool,
    endpoint: Option<String>,
    bucket: String,
) -> Result<()> {
    let Some(endpoint) = endpoint.filter(|e| !e.trim().is_empty()) else {
        return Err(Exit::Config(anyhow!(
            "the offline scenario needs an S3-compatible endpoint that can presign URLs: \
             --s3-endpoint URL or CARAVAN_DEMO_S3_ENDPOINT (credentials from \
             CARAVAN_DEMO_S3_ACCESS_KEY / CARAVAN_DEMO_S3_SECRET_KEY, default `testing`); \
             e.g. `eval \"$(bash tests/s3/moto.sh start 9199)\"` then \
             `--s3-endpoint $CARAVAN_TEST_S3_ENDPOINT`"
        ))
        .into());
    };
    let env_or = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    let opts = offline::BucketOptions {
        endpoint,
        bucket,
        access_key: env_or("CARAVAN_DEMO_S3_ACCESS_KEY", "testing"),
        secret_key: env_or("CARAVAN_DEMO_S3_SECRET_KEY", "testing"),
    };
    if !json {
        say!(
            "generating {files} file(s), {size} bytes, uploading them to {} and publishing with offline seeding…",
            opts.endpoint
        );
    }
    let bar = bytes_bar(json);
    let b2 = bar.clone();
    let r = offline::run(size, files, keep, opts, move |p: Arc<FetchProgress>| {
        tokio::spawn(async move {
            loop {
                let s = p.snapshot();
                b2.set_length(s.bytes_total.max(1));
                b2.set_position(s.bytes_done);
                if matches!(s.state, FetchState::Done | FetchState::Failed) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    })
    .await
    .map_err(|e| match e {
        caravan_agent::Error::Config(_) => Exit::Config(anyhow!(e)),
        other => Exit::Transfer(anyhow!(other)),
    })?;
    bar.finish_and_clear();
    if json {
        out!("{}", serde_json::to_string(&r)?);
    } else {
        out!("publisher {} (stopped before the fetch)", r.publisher);
        out!("recipient {}", r.recipient);
        out!(
            "published {} files ({}, {} chunks staged in the bucket) in {:.2}s",
            r.files,
            crate::cli::human::bytes(r.bytes),
            r.chunks,
            r.publish_seconds
        );
        out!(
            "fetched from presigned URLs in {:.2}s = {}; publisher running: {}; live peers: {}; every byte verified: {}",
            r.seconds,
            crate::cli::human::rate(r.bytes, r.seconds),
            r.publisher_running,
            r.peers.len(),
            if r.verified { "yes" } else { "NO" }
        );
    }
    if !r.verified || r.publisher_running {
        return Err(Exit::Transfer(anyhow!(
            "verification failed (bytes verified: {}, publisher running: {})",
            r.verified,
            r.publisher_running
        ))
        .into());
    }
    Ok(())
}

pub(crate) fn print_demo(r: &DemoReport, json: bool) -> Result<()> {
    if json {
        out!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    out!("publisher {}", r.publisher);
    out!("recipient {}", r.recipient);
    out!(
        "published {} {} ({}, {} chunks): the pass took {:.2}s, the fetch following it",
        r.files,
        if r.files == 1 { "file" } else { "files" },
        crate::cli::human::bytes(r.bytes),
        r.chunks,
        r.publish_seconds,
    );
    // One rate, one unit: end to end (publish start to the last file in
    // place), in MiB/s.
    out!(
        "end to end {:.2}s = {}; {} on the wire; every byte verified: {}",
        r.seconds,
        crate::cli::human::rate(r.bytes, r.seconds),
        crate::cli::human::bytes(r.bytes_on_wire),
        if r.verified { "yes" } else { "NO" }
    );
    if let Some(cpu) = r.cpu_seconds {
        // Per GiB only where the payload, not the set-up, is the cost.
        let gib = r.bytes as f64 / (1u64 << 30) as f64;
        if r.bytes >= 64 << 20 {
            out!("CPU, both agents: {cpu:.2} s ({:.2} s per GiB)", cpu / gib);
        } else {
            out!("CPU, both agents: {cpu:.2} s");
        }
    }
    if let Some(k) = &r.kept_in {
        out!("storages kept in {k}");
    }
    Ok(())
}
