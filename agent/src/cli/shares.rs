//! `publish`, `ticket`, `fetch`, `status` and `peers`: share commands, all
//! clients of the daemon's admin API.

use std::time::Duration;

use anyhow::{Result, anyhow};
use indicatif::{ProgressBar, ProgressStyle};

use caravan_agent::daemon::api;
use caravan_agent::daemon::api::{PeerInfo, Status, TicketRequest, TicketResponse};
use caravan_agent::manifest::Access;
use caravan_agent::node::{FetchRequest, FetchState, ProgressSnapshot};
use caravan_agent::node::{PublishRequest, Published};

use crate::cli::args::Command;
use crate::cli::client::Admin;
use crate::cli::exit::Exit;

pub(crate) async fn command(cmd: Command) -> Result<()> {
    match cmd {
        Command::Publish {
            config,
            path,
            to,
            trust_depth,
            share,
            rotate_key,
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
                path,
                access: Access {
                    agents: to,
                    trust_depth,
                },
                share_id: share,
                rotate_key,
            };
            let spinner = spinner("publishing (chunking, hashing, encrypting)…", json);
            let res: Published = client.post(api::SHARES, &req).await?;
            spinner.finish_and_clear();
            if json {
                println!("{}", serde_json::to_string_pretty(&res)?);
            } else {
                println!(
                    "published share {} version {}: {} files, {} bytes, {} chunks in {:.2}s",
                    res.share_id, res.seq, res.files, res.bytes, res.chunks, res.seconds
                );
                for (who, ticket) in &res.tickets {
                    println!("\nticket for {who}:\n{ticket}");
                }
            }
            Ok(())
        }
        Command::Ticket { config, share, to } => {
            let client = Admin::from_config(&config)?;
            let res: TicketResponse = client
                .post(
                    &api::share_tickets(&share.to_string()),
                    &TicketRequest { recipient: to },
                )
                .await?;
            println!("{}", res.ticket);
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
                        dest,
                        peers,
                    },
                )
                .await?;
            if detach {
                println!(
                    "fetching share {} into {:?} in the background",
                    started.share_id, started.dest
                );
                return Ok(());
            }
            let bar = bytes_bar(json);
            let path = api::fetch(&started.share_id);
            let last = loop {
                let s: ProgressSnapshot = client.get(&path).await?;
                bar.set_length(s.bytes_total.max(1));
                bar.set_position(s.bytes_done);
                bar.set_message(format!("{}/{} chunks", s.chunks_done, s.chunks_total));
                if matches!(s.state, FetchState::Done | FetchState::Failed) {
                    break s;
                }
                // Short: the command's wall clock is what a user measures.
                tokio::time::sleep(Duration::from_millis(25)).await;
            };
            bar.finish_and_clear();
            if json {
                println!("{}", serde_json::to_string_pretty(&last)?);
            }
            if last.state == FetchState::Failed {
                return Err(Exit::Transfer(anyhow!(
                    "fetch failed: {}",
                    last.error.unwrap_or_default()
                ))
                .into());
            }
            if !json {
                println!(
                    "fetched share {} version {} into {:?}: {} files, {} bytes ({} chunks downloaded, {} reused locally) in {:.2}s",
                    last.share_id,
                    last.seq,
                    last.dest,
                    last.files_total,
                    last.bytes_total,
                    last.chunks_fetched,
                    last.chunks_reused,
                    last.seconds
                );
            }
            Ok(())
        }
        Command::Status { config, json } => {
            let s: Status = Admin::from_config(&config)?.get(api::STATUS).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("agent {} (caravan {})", s.agent_id, s.version);
                println!("advertised at: {}", s.advertise.join(", "));
                for sh in &s.shares {
                    println!(
                        "  {:?} {} v{}: {} files, {} bytes in {:?}",
                        sh.role, sh.share_id, sh.seq, sh.files, sh.bytes, sh.root
                    );
                }
                for f in &s.fetches {
                    println!(
                        "  fetch {} -> {:?}: {:?} {}/{} bytes",
                        f.share_id, f.dest, f.state, f.bytes_done, f.bytes_total
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
                println!("{}", serde_json::to_string_pretty(&peers)?);
            } else if peers.is_empty() {
                println!("no repository knows a peer holding share {share}");
            } else {
                for p in &peers {
                    println!("{}  {}", p.agent_id, p.addresses.join(", "));
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
