//! `publish`, `ticket`, `fetch`, `status` and `peers`: share commands, all
//! clients of the daemon's admin API.

use std::time::Duration;

use anyhow::{Result, anyhow};
use indicatif::{ProgressBar, ProgressStyle};

use caravan_agent::daemon::api;
use caravan_agent::daemon::api::{PeerInfo, Status, TicketRequest, TicketResponse};
use caravan_agent::manifest::Access;
use caravan_agent::node::{FetchRequest, FetchState, ProgressSnapshot};
use caravan_agent::node::{PublishRequest, PublishStarted, Published};

use crate::cli::args::Command;
use crate::cli::client::Admin;
use crate::cli::exit::Exit;
use crate::cli::human;

pub(crate) async fn command(cmd: Command) -> Result<()> {
    match cmd {
        Command::Publish {
            config,
            path,
            to,
            trust_depth,
            share,
            rotate_key,
            new_path,
            offline_seeding,
            url_validity,
            json,
        } => {
            if to.is_empty() && trust_depth.is_none() {
                return Err(Exit::Config(anyhow!(
                    "say who may fetch it: --to AGENT_ID (repeatable) and/or --trust-depth N"
                ))
                .into());
            }
            let client = Admin::from_config(&config)?;
            let req = PublishRequest {
                path: client.storage_path(&path)?,
                access: Access {
                    agents: to,
                    trust_depth,
                },
                share_id: share,
                rotate_key,
                offline_seeding,
                url_validity_secs: url_validity,
                new_path,
            };
            // The daemon answers in lines: the share id and tickets as
            // soon as they exist (a script may start `fetch` at once:
            // recipients follow the running pass), then the summary.
            // `--json` prints both lines; otherwise a spinner runs until
            // the summary, and a daemon that stops meanwhile still leaves
            // the user the share id and the tickets (the pass resumes when
            // it starts again).
            let spinner = spinner("publishing (chunking, hashing, encrypting)…", json);
            let path = format!("{}?{}", api::SHARES, api::STREAM_QUERY);
            let mut failed = None;
            let mut started: Option<PublishStarted> = None;
            let mut summary: Option<Published> = None;
            let streamed = client
                .post_lines(&path, &req, |line| {
                    if let Ok(e) = serde_json::from_slice::<api::ApiError>(line) {
                        failed = Some(e);
                        return Ok(());
                    }
                    let v: serde_json::Value = serde_json::from_slice(line)?;
                    if json {
                        out!("{}", serde_json::to_string(&v)?);
                    }
                    match started {
                        None => started = Some(serde_json::from_value(v)?),
                        Some(_) => summary = Some(serde_json::from_value(v)?),
                    }
                    Ok(())
                })
                .await;
            spinner.finish_and_clear();
            if let Err(e) = streamed {
                return Err(match &started {
                    // The daemon went away: exit code 4, as `fetch`.
                    Some(s) => {
                        if !json {
                            for (who, ticket) in &s.tickets {
                                out!("\nticket for {who}:\n{ticket}");
                            }
                        }
                        Exit::Unreachable(e.context(interrupted(&format!(
                            "share {} version {}",
                            s.share_id, s.seq
                        ))))
                        .into()
                    }
                    None => e,
                });
            }
            if let Some(e) = failed {
                // The request's fault (a path that cannot be published):
                // exit code 3.
                if e.status.is_some_and(|s| (400..500).contains(&s)) {
                    return Err(Exit::Config(anyhow!("{}", e.error)).into());
                }
                return Err(anyhow!("the daemon failed: {}", e.error));
            }
            let Some(res) = summary else {
                return Err(anyhow!(
                    "the daemon's answer ended before the publish's summary"
                ));
            };
            if json {
                return Ok(());
            }
            {
                out!(
                    "published share {} version {}: {} files, {}, {} chunks in {:.2}s",
                    res.share_id,
                    res.seq,
                    res.files,
                    human::bytes(res.bytes),
                    res.chunks,
                    res.seconds
                );
                if res.skipped.total > 0 {
                    out!(
                        "left out {} entries (a share carries regular files and folders with UTF-8 names):",
                        res.skipped.total
                    );
                    for s in &res.skipped.first {
                        out!("  {:?}: {}", s.path, s.reason.says());
                    }
                    if res.skipped.total > res.skipped.first.len() as u64 {
                        out!("  … the agent's log names every one");
                    }
                }
                if !res.removed.is_empty() {
                    let unless = match req.access.trust_depth {
                        Some(n) => format!(" (unless this agent trusts it within {n} hops)"),
                        None => String::new(),
                    };
                    out!(
                        "no longer named as a recipient from this version on{unless} (--to names \
                         every recipient): {}",
                        res.removed.join(", ")
                    );
                }
                if res.key_rotated {
                    out!("this version has a fresh share key: whoever lost access cannot open it");
                }
                if let Some(seed) = &res.seed {
                    out!(
                        "seeded offline: {} chunks staged, {} already there, {} URLs valid until {} (record in {} repositories)",
                        seed.staged,
                        seed.reused,
                        seed.urls,
                        human::date(seed.expires_at),
                        seed.repositories.len()
                    );
                }
                for (who, ticket) in &res.tickets {
                    out!("\nticket for {who}:\n{ticket}");
                }
            }
            Ok(())
        }
        Command::Ticket {
            config,
            share,
            to,
            json,
        } => {
            let client = Admin::from_config(&config)?;
            let res: TicketResponse = client
                .post(
                    &api::share_tickets(&share.to_string()),
                    &TicketRequest { recipient: to },
                )
                .await?;
            if json {
                let v = serde_json::json!({
                    "share_id": share.to_string(),
                    "recipient": to.to_string(),
                    "ticket": res.ticket,
                });
                out!("{v}");
            } else {
                out!("{}", res.ticket);
            }
            Ok(())
        }
        Command::Fetch {
            config,
            ticket,
            dest,
            peers,
            detach,
            json,
        } => {
            caravan_agent::manifest::Ticket::parse(&ticket)
                .map_err(|e| Exit::Config(anyhow!(e)))?;
            let client = Admin::from_config(&config)?;
            let started: ProgressSnapshot = client
                .post(
                    api::FETCHES,
                    &FetchRequest {
                        ticket,
                        dest: client.storage_path(&dest)?,
                        peers,
                    },
                )
                .await
                // The daemon could not start it (its storage refused to
                // save the fetch's state: read-only credentials, an
                // outage): a failed transfer, exit code 5, like one that
                // fails later.
                .map_err(|e| match e.downcast_ref::<Exit>() {
                    Some(_) => e,
                    None => Exit::Transfer(e).into(),
                })?;
            if detach {
                if json {
                    out!("{}", tagged("status", &started)?);
                } else {
                    out!(
                        "fetching share {} into {:?} in the background",
                        started.share_id,
                        started.dest
                    );
                }
                return Ok(());
            }
            let bar = bytes_bar(json);
            // Off a terminal (and without --json), progress is a plain line
            // every few seconds instead of a bar nobody sees.
            let plain = !json && !std::io::IsTerminal::is_terminal(&std::io::stderr());
            let path = api::fetch(&started.share_id);
            let t0 = std::time::Instant::now();
            let mut last_report: Option<std::time::Instant> = None;
            let last = loop {
                let s: ProgressSnapshot = client.get(&path).await?;
                bar.set_length(s.bytes_total.max(1));
                bar.set_position(s.bytes_done);
                bar.set_message(format!("{}/{} chunks", s.chunks_done, s.chunks_total));
                let finished = matches!(s.state, FetchState::Done | FetchState::Failed);
                let every = Duration::from_secs(if json { 1 } else { 5 });
                // `--json` reports from the first poll; a plain line waits
                // its first 5 s, so a short fetch prints only its result
                // (not a line of "0 B of 0 B" before the manifest is in).
                let due = match last_report {
                    Some(t) => t.elapsed() >= every,
                    None => json || t0.elapsed() >= every,
                };
                if json && due && !finished {
                    out!("{}", tagged("status", &s)?);
                    last_report = Some(std::time::Instant::now());
                } else if plain && due && !finished {
                    say!("{}", progress_line(&s, t0.elapsed().as_secs_f64()));
                    last_report = Some(std::time::Instant::now());
                }
                if finished {
                    break s;
                }
                // Short: the command's wall clock is what a user measures.
                tokio::time::sleep(Duration::from_millis(25)).await;
            };
            bar.finish_and_clear();
            if json {
                out!("{}", tagged("summary", &last)?);
            }
            if last.state == FetchState::Failed {
                return Err(Exit::Transfer(anyhow!(
                    "fetch failed: {}",
                    last.error.unwrap_or_default()
                ))
                .into());
            }
            if !json && last.already_in_place {
                // Held already, every file in place: nothing moved, so no
                // rate (it was a nonsense 13,000 MiB/s).
                out!(
                    "share {} version {} is already in {:?}: {} files, {}, every file in place",
                    last.share_id,
                    last.seq,
                    last.dest,
                    last.files_total,
                    human::bytes(last.bytes_total),
                );
            } else if !json {
                // The rate is of what came from peers in this attempt: a
                // resumed or repaired copy moved less than the whole share.
                let rate = match last.bytes_received {
                    0 => String::new(),
                    n => format!(", {} from peers", human::rate(n, last.seconds)),
                };
                // A chunk downloaded while following a publish pass and
                // then verified again from its part file (the pass was cut
                // off, the signed manifest followed) is one download, not
                // also a reuse: the two never add up past the share.
                let reused = last
                    .chunks_reused
                    .min(last.chunks_total.saturating_sub(last.chunks_fetched));
                out!(
                    "fetched share {} version {} into {:?}: {} files, {} ({} chunks downloaded, {} reused locally) in {:.2}s{rate}",
                    last.share_id,
                    last.seq,
                    last.dest,
                    last.files_total,
                    human::bytes(last.bytes_total),
                    last.chunks_fetched,
                    reused,
                    last.seconds,
                );
            }
            Ok(())
        }
        Command::Cancel {
            config,
            share,
            json,
        } => {
            let answer: serde_json::Value = Admin::from_config(&config)?
                .delete(&api::fetch(&share.to_string()))
                .await?;
            if json {
                out!("{answer}");
            } else {
                out!("cancelled the fetch of share {share}: it will not be resumed");
            }
            Ok(())
        }
        Command::Forget {
            config,
            share,
            json,
        } => {
            let done: api::Forgotten = Admin::from_config(&config)?
                .delete(&api::share(&share.to_string()))
                .await?;
            if json {
                out!("{}", serde_json::to_string(&done)?);
            } else {
                let seeded = if done.was_seeded {
                    ", its offline seed removed"
                } else {
                    ""
                };
                out!(
                    "forgot share {} ({}, version {}): no longer served{seeded}; its files stay in storage",
                    done.share_id,
                    done.role,
                    done.seq
                );
            }
            Ok(())
        }
        Command::Status { config, json } => {
            let s: Status = Admin::from_config(&config)?.get(api::STATUS).await?;
            if json {
                out!("{}", serde_json::to_string(&s)?);
            } else {
                out!("agent {} (caravan {})", s.agent_id, s.version);
                out!("advertised at: {}", s.advertise.join(", "));
                for sh in &s.shares {
                    out!(
                        "  {} {} v{}: {} files, {} in {:?}",
                        sh.role,
                        sh.share_id,
                        sh.seq,
                        sh.files,
                        human::bytes(sh.bytes),
                        sh.root
                    );
                }
                for f in &s.fetches {
                    out!(
                        "  fetch {} -> {:?}: {:?} {} of {}{}",
                        f.share_id,
                        f.dest,
                        f.state,
                        human::bytes(f.bytes_done),
                        human::bytes(f.bytes_total),
                        f.error
                            .as_deref()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(())
        }
        Command::Peers {
            config,
            share,
            json,
        } => {
            let peers: Vec<PeerInfo> = Admin::from_config(&config)?
                .get(&api::share_peers(&share.to_string()))
                .await?;
            if json {
                out!("{}", serde_json::to_string(&peers)?);
            } else if peers.is_empty() {
                out!("no repository knows a peer holding share {share}");
            } else {
                for p in &peers {
                    out!("{}  {}", p.agent_id, p.addresses.join(", "));
                }
            }
            Ok(())
        }
        _ => unreachable!("not a share command"),
    }
}

pub(crate) fn spinner(msg: &'static str, hidden: bool) -> ProgressBar {
    if hidden || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.set_message(msg);
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

pub(crate) fn bytes_bar(hidden: bool) -> ProgressBar {
    if hidden || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(1);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

/// One line of `--json` output: the value's fields plus `message_type`
/// (`status` while running, `summary` at the end; errors are `exit_error`),
/// the shape restic uses.
fn tagged<T: serde::Serialize>(message_type: &str, value: &T) -> Result<String> {
    let mut v = serde_json::to_value(value)?;
    if let Some(map) = v.as_object_mut() {
        map.insert("message_type".into(), message_type.into());
    }
    Ok(serde_json::to_string(&v)?)
}

/// `fetching sh1-…: 12.0 MiB of 25.0 MiB (48%), 5/12 chunks, 3.1 MiB/s`
fn progress_line(s: &ProgressSnapshot, elapsed: f64) -> String {
    let pct = (s.bytes_done as f64 * 100.0 / s.bytes_total.max(1) as f64).min(100.0);
    format!(
        "fetching {}: {} of {} ({pct:.0}%), {}/{} chunks, {}",
        s.share_id,
        human::bytes(s.bytes_done),
        human::bytes(s.bytes_total),
        s.chunks_done,
        s.chunks_total,
        human::rate(s.bytes_done, elapsed)
    )
}

/// What a publish whose answer broke off says: the daemon went away during
/// the pass, and finishes it when it starts again (`publish_intent`).
fn interrupted(share: &str) -> String {
    format!(
        "the daemon stopped before the publish finished; when it starts again it resumes \
         publishing {share} (same share id and tickets: recipients' fetches continue)"
    )
}
