//! Command-line interface. Every failure prints one clear line and exits
//! with a code a script can act on:
//! 0 success, 1 failure, 2 bad usage, 3 bad configuration or input,
//! 4 daemon unreachable, 5 transfer or verification failed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use caravan_agent::config::{AgentConfig, StorageConfig};
use caravan_agent::daemon::{self, Status, TicketRequest, TicketResponse};
use caravan_agent::demo::{self, DemoOptions, DemoReport};
use caravan_agent::identity::{AgentId, SecretKey};
use caravan_agent::manifest::{Access, ShareId};
use caravan_agent::node::{FetchProgress, FetchRequest, FetchState, ProgressSnapshot};
use caravan_agent::node::{PublishRequest, Published};

const AFTER_HELP: &str = "\
Quick start (two agents on this machine):
  caravan-agent demo                              # see it work, nothing to set up
  caravan-agent init --dir ./alice --listen 127.0.0.1:7400 --admin 127.0.0.1:7401
  caravan-agent run --config ./alice/agent.toml   # the daemon (keep it running)
  caravan-agent publish --config ./alice/agent.toml photos --to <BOB'S AGENT ID>
  caravan-agent fetch --config ./bob/agent.toml <TICKET> --dest photos-from-alice

Exit codes: 0 ok, 1 failure, 2 bad usage, 3 bad configuration or input,
4 daemon unreachable, 5 transfer or verification failed.
Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=caravan_agent=debug) and
--log-format json for structured logs.";

/// Caravan agent: exchange encrypted, content-addressed chunks between storages.
///
/// An agent holds a key pair (its identity) and access to one storage (a local
/// directory, S3, GCS, Azure Blob, Google Drive, Dropbox, OneDrive, WebDAV…).
/// It publishes folders from that storage as shares for named agents, and fetches
/// shares others published for it, verifying every chunk.
#[derive(Parser, Debug)]
#[command(name = "caravan-agent", version, after_help = AFTER_HELP, propagate_version = true)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new agent key pair and print its agent id.
    ///
    /// The key file is written with mode 0600. The agent id (cv1-…) is public:
    /// give it to people who want to share with you.
    Keygen {
        /// Where to write the secret key.
        #[arg(long, default_value = "identity.key")]
        out: PathBuf,
        /// Overwrite an existing key file (the old identity is lost).
        #[arg(long)]
        force: bool,
    },
    /// Create a ready-to-run agent directory: key, admin token, config, and
    /// local storage under DIR/data.
    Init {
        /// The directory to create.
        #[arg(long)]
        dir: PathBuf,
        /// Peer listen address.
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: String,
        /// Admin API listen address (keep it on loopback).
        #[arg(long = "admin", default_value = "127.0.0.1:7401")]
        admin: String,
        /// Metrics listen address (empty to disable).
        #[arg(long, default_value = "127.0.0.1:9400")]
        metrics: String,
    },
    /// Print the agent id of a config's identity (or of a key file).
    Id {
        #[command(flatten)]
        target: ConfigOrKey,
    },
    /// Run the agent daemon (serves peers, the admin API and /metrics).
    ///
    /// Interrupted fetches resume on start. Stops cleanly on SIGINT/SIGTERM.
    Run {
        /// Agent configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Publish a path of this agent's storage as a share (asks the running daemon).
    ///
    /// Prints one ticket per recipient; send each recipient its ticket. To
    /// publish a new version of a share, pass --share with its id: only
    /// changed chunks will travel.
    Publish {
        /// Agent configuration file (to find the daemon and its token).
        #[arg(long, short)]
        config: PathBuf,
        /// Directory or file in the agent's storage ("" or "." for everything).
        path: String,
        /// Recipient agent id (repeat for several).
        #[arg(long = "to", value_name = "AGENT_ID")]
        to: Vec<AgentId>,
        /// Also allow every agent this agent trusts within N hops.
        #[arg(long, value_name = "N")]
        trust_depth: Option<u8>,
        /// Publish a new version of this share.
        #[arg(long, value_name = "SHARE_ID")]
        share: Option<ShareId>,
        /// Use a fresh share key for this version (after removing someone).
        #[arg(long, requires = "share")]
        rotate_key: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make a ticket for one more recipient of a share this agent publishes.
    Ticket {
        #[arg(long, short)]
        config: PathBuf,
        /// The share id.
        share: ShareId,
        /// The recipient's agent id.
        #[arg(long = "to", value_name = "AGENT_ID")]
        to: AgentId,
    },
    /// Fetch a share from a ticket into a directory of this agent's storage.
    ///
    /// Shows progress until every file is verified and in place. Files appear
    /// only when complete. If the daemon stops, the fetch resumes when it
    /// restarts, without downloading verified chunks again.
    Fetch {
        #[arg(long, short)]
        config: PathBuf,
        /// The ticket (caravan-ticket-v1:…).
        ticket: String,
        /// Destination directory in the agent's storage.
        #[arg(long)]
        dest: String,
        /// Extra peer address (host:port) that holds the share (repeatable).
        #[arg(long = "peer", value_name = "ADDR")]
        peers: Vec<String>,
        /// Start the fetch and return at once.
        #[arg(long)]
        detach: bool,
        /// Print the final progress as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show what the running daemon holds and is fetching.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Run two agents on loopback with temporary storage, move a generated
    /// folder from one to the other, verify every byte, and report throughput.
    Demo {
        /// Total payload size in bytes (suffixes K, M, G accepted: 1G = 2^30).
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        size: u64,
        /// Number of files the payload is split into.
        #[arg(long, default_value_t = 16)]
        files: u64,
        /// Keep both agents' storage in this directory.
        #[arg(long)]
        keep: Option<PathBuf>,
        /// Print one JSON object on stdout (bytes, files, seconds, verified…;
        /// for the trust scenario: pruned, kept, revocation_seconds, verified…).
        #[arg(long)]
        json: bool,
        /// `transfer`: two agents move a folder. `trust`: two repositories
        /// and five agents (alice, bob, carol, dave, erin) with grants
        /// alice→bob(2), bob→carol(1), carol→dave(0), alice→erin(1),
        /// erin→dave(0); alice shares with "agents I trust within 3 hops",
        /// then revokes alice→bob while a repository is down: bob and carol
        /// are refused, dave (through erin) and erin keep fetching.
        #[arg(long, value_enum, default_value = "transfer")]
        scenario: Scenario,
    },
    /// Manage whom this agent vouches for (asks the running daemon).
    ///
    /// A grant says "I trust AGENT_ID, and let it vouch DEPTH more hops".
    /// Shares published with --trust-depth N go to every agent reachable
    /// from this one through at most N grants. Grants and revocations are
    /// signed by this agent and published to its repositories.
    Trust {
        #[command(subcommand)]
        action: TrustCommand,
    },
    /// List the peers the repositories know for a share (agent id and addresses).
    Peers {
        /// Agent configuration file (to find the daemon and its token).
        #[arg(long, short)]
        config: PathBuf,
        /// The share id.
        share: ShareId,
        /// Print the peers as JSON (`[{"agent_id", "addresses"}]`).
        #[arg(long)]
        json: bool,
    },
    /// Serve a repository (tracker): stores and serves signed announcements,
    /// grants and revocations over HTTP. It verifies every record, so it can
    /// lose data but never forge it.
    Repository(caravan_agent::repository::RepositoryArgs),
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    Transfer,
    Trust,
}

#[derive(Subcommand, Debug)]
enum TrustCommand {
    /// Vouch for an agent: sign a grant and publish it.
    ///
    /// Example: `caravan-agent trust grant cv1-… --depth 1 --expires 30d -c agent.toml`
    Grant {
        /// Agent configuration file (to find the daemon and its token).
        #[arg(long, short)]
        config: PathBuf,
        /// The agent to trust.
        agent: AgentId,
        /// How many further hops it may vouch (0: trusted, cannot vouch).
        #[arg(long)]
        depth: u8,
        /// Validity from now: seconds, or with a suffix s, m, h, d (default 365d).
        #[arg(long, value_parser = parse_duration)]
        expires: Option<u64>,
        /// Limit the grant to one scope.
        #[arg(long)]
        scope: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Withdraw every grant this agent issued to AGENT_ID (or one --grant-id).
    ///
    /// Takes effect on this agent at once (peers served through the grant are
    /// refused on their next request) and on others as they read the
    /// repositories' revocation feed. The next version of a share published
    /// for a trust depth gets a fresh key by itself, so revoked agents cannot
    /// read it even with the key they already hold.
    Revoke {
        /// Agent configuration file (to find the daemon and its token).
        #[arg(long, short)]
        config: PathBuf,
        /// The agent whose grants to revoke.
        #[arg(required_unless_present = "grant_id", conflicts_with = "grant_id")]
        agent: Option<AgentId>,
        /// Revoke this one grant (hex id from `trust list`).
        #[arg(long)]
        grant_id: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the grants this agent issued and its trust tree.
    List {
        /// Agent configuration file (to find the daemon and its token).
        #[arg(long, short)]
        config: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Explain whether and why this agent trusts AGENT_ID: the chain of
    /// grants, or why there is none (no grant, expired, revoked, too deep).
    /// Exits 1 when there is no chain.
    Why {
        /// Agent configuration file (to find the daemon and its token).
        #[arg(long, short)]
        config: PathBuf,
        /// The agent in question.
        agent: AgentId,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn parse_duration(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        Some('d') => (&s[..s.len() - 1], 86400),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?} is not a duration (e.g. 3600, 90m, 12h, 30d)"))
}

#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
struct ConfigOrKey {
    /// Agent configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Secret key file.
    #[arg(long)]
    identity: Option<PathBuf>,
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 1048576, 512K, 64M, 1G)"))
}

/// Failure classes mapped to exit codes.
#[derive(Debug, thiserror::Error)]
enum Exit {
    #[error("{0:#}")]
    Config(anyhow::Error),
    #[error("{0:#}")]
    Unreachable(anyhow::Error),
    #[error("{0:#}")]
    Transfer(anyhow::Error),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo reports what happened itself; its logs would only drown it
    // (e.g. every sync with the repository it stops on purpose).
    let default_level = if matches!(cli.command, Command::Demo { .. }) {
        "error"
    } else {
        "info"
    };
    init_logging(cli.log_format, default_level);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = match e.downcast_ref::<Exit>() {
                Some(Exit::Config(_)) => 3,
                Some(Exit::Unreachable(_)) => 4,
                Some(Exit::Transfer(_)) => 5,
                None => match e.downcast_ref::<caravan_agent::Error>() {
                    Some(caravan_agent::Error::Config(_) | caravan_agent::Error::Parse { .. }) => 3,
                    _ => 1,
                },
            };
            eprintln!("error: {e:#}");
            ExitCode::from(code)
        }
    }
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn dispatch(cmd: Command) -> Result<()> {
    match cmd {
        Command::Keygen { out, force } => keygen(&out, force),
        Command::Init {
            dir,
            listen,
            admin,
            metrics,
        } => init(&dir, listen, admin, metrics),
        Command::Id { target } => {
            let key = match (target.config, target.identity) {
                (Some(c), _) => daemon::read_identity(&load_config(&c)?.identity_file)?,
                (_, Some(k)) => daemon::read_identity(&k)?,
                _ => bail!("give --config or --identity"),
            };
            println!("{}", key.agent_id());
            Ok(())
        }
        Command::Run { config } => run(&config).await,
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
            let res: Published = client.post("/v1/shares", &req).await?;
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
                    &format!("/v1/shares/{share}/tickets"),
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
                    "/v1/fetches",
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
            let path = format!("/v1/fetches/{}", started.share_id);
            let last = loop {
                let s: ProgressSnapshot = client.get(&path).await?;
                bar.set_length(s.bytes_total.max(1));
                bar.set_position(s.bytes_done);
                bar.set_message(format!("{}/{} chunks", s.chunks_done, s.chunks_total));
                if matches!(s.state, FetchState::Done | FetchState::Failed) {
                    break s;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
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
            let s: Status = Admin::from_config(&config)?.get("/v1/status").await?;
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
        Command::Demo {
            keep,
            json,
            scenario: Scenario::Trust,
            ..
        } => {
            if !json {
                eprintln!("starting two repositories and five agents on loopback…");
            }
            let r = demo::run_trust(keep)
                .await
                .map_err(|e| Exit::Transfer(anyhow!(e)))?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                for (name, id) in &r.agents {
                    println!("{name:>5} = {id}");
                }
                println!(
                    "\ntrust tree of alice (depth 3) before the revocation:\n{}",
                    r.tree_before
                );
                println!("after alice revoked alice→bob:\n{}", r.tree_after);
                println!("refused: {}", r.pruned.join(", "));
                for line in &r.refusals {
                    println!("  {line}");
                }
                println!(
                    "still fetching version {}: {}",
                    r.second_version,
                    r.kept.join(", ")
                );
                println!(
                    "version {} uses a fresh share key: {}",
                    r.second_version,
                    if r.fresh_key { "yes" } else { "NO" }
                );
                println!(
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
        Command::Trust { action } => trust_command(action).await,
        Command::Peers {
            config,
            share,
            json,
        } => {
            let peers: Vec<daemon::PeerInfo> = Admin::from_config(&config)?
                .get(&format!("/v1/shares/{share}/peers"))
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
        Command::Repository(args) => {
            let shutdown = async { wait_for_signal().await };
            caravan_agent::repository::run(&args, shutdown)
                .await
                .map_err(|e| match e {
                    caravan_agent::Error::Config(_) => Exit::Config(anyhow!(e)).into(),
                    other => anyhow!(other),
                })
        }
        Command::Demo {
            size,
            files,
            keep,
            json,
            scenario: Scenario::Transfer,
        } => {
            let bar = bytes_bar(json);
            let b2 = bar.clone();
            if !json {
                eprintln!(
                    "generating {files} file(s), {size} bytes, and starting two agents on loopback…"
                );
            }
            let poller: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>> = Arc::default();
            let p2 = poller.clone();
            let report = demo::run(
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
    }
}

async fn trust_command(action: TrustCommand) -> Result<()> {
    use caravan_agent::node::trust::{
        GrantInfo, GrantRequest, RevokeRequest, TrustListing, WhyAnswer,
    };
    match action {
        TrustCommand::Grant {
            config,
            agent,
            depth,
            expires,
            scope,
            json,
        } => {
            let g: GrantInfo = Admin::from_config(&config)?
                .post(
                    "/v1/trust/grants",
                    &GrantRequest {
                        subject: agent,
                        depth,
                        expires_secs: expires,
                        scope,
                    },
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&g)?);
            } else {
                println!(
                    "granted {} depth {} until unix {} (grant {}); published to {}",
                    g.subject,
                    g.depth,
                    g.not_after,
                    g.grant_id,
                    if g.published_to.is_empty() {
                        "no repository (none configured)".to_string()
                    } else {
                        g.published_to.join(", ")
                    }
                );
            }
            Ok(())
        }
        TrustCommand::Revoke {
            config,
            agent,
            grant_id,
            json,
        } => {
            let r: daemon::RevokeResponse = Admin::from_config(&config)?
                .post(
                    "/v1/trust/revocations",
                    &RevokeRequest {
                        subject: agent,
                        grant_id,
                    },
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                for id in &r.revoked {
                    println!("revoked grant {id}");
                }
            }
            Ok(())
        }
        TrustCommand::List { config, json } => {
            let l: TrustListing = Admin::from_config(&config)?.get("/v1/trust").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&l)?);
            } else {
                println!("grants issued by {}:", l.agent_id);
                for g in &l.issued {
                    println!(
                        "  {} -> {} depth {}{}{} (grant {})",
                        g.issuer.short(),
                        g.subject,
                        g.depth,
                        g.scope
                            .as_ref()
                            .map(|s| format!(" scope {s}"))
                            .unwrap_or_default(),
                        if g.revoked { " REVOKED" } else { "" },
                        g.grant_id
                    );
                }
                println!("\ntrust tree:\n{}", l.tree);
            }
            Ok(())
        }
        TrustCommand::Why {
            config,
            agent,
            json,
        } => {
            let w: WhyAnswer = Admin::from_config(&config)?
                .get(&format!("/v1/trust/why/{agent}"))
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&w)?);
            } else if w.trusted {
                println!("trusted through {} grant(s):", w.chain.len());
                for hop in &w.chain {
                    println!("  {hop}");
                }
            } else {
                println!(
                    "not trusted: {}",
                    w.reason.clone().unwrap_or_else(|| "no chain".into())
                );
            }
            if !w.trusted {
                bail!("no trust chain to {agent}");
            }
            Ok(())
        }
    }
}

fn print_demo(r: &DemoReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    println!("publisher {}", r.publisher);
    println!("recipient {}", r.recipient);
    println!(
        "published {} files ({} bytes, {} chunks) in {:.2}s; transferred over TLS in {:.2}s",
        r.files, r.bytes, r.chunks, r.publish_seconds, r.transfer_seconds
    );
    println!(
        "end to end {:.2}s = {:.0} MB/s; {} bytes on the wire; every byte verified: {}",
        r.seconds,
        r.throughput_mb_s,
        r.bytes_on_wire,
        if r.verified { "yes" } else { "NO" }
    );
    if let Some(k) = &r.kept_in {
        println!("storages kept in {k}");
    }
    Ok(())
}

fn spinner(msg: &'static str, hidden: bool) -> ProgressBar {
    if hidden || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.set_message(msg);
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

fn bytes_bar(hidden: bool) -> ProgressBar {
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

fn keygen(out: &std::path::Path, force: bool) -> Result<()> {
    if out.exists() && !force {
        return Err(Exit::Config(anyhow!(
            "{} already exists; refusing to replace an identity (use --force)",
            out.display()
        ))
        .into());
    }
    let key = SecretKey::generate()?;
    write_private(out, key.to_text().as_bytes())?;
    println!("{}", key.agent_id());
    Ok(())
}

fn write_private(path: &std::path::Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn init(dir: &std::path::Path, listen: String, admin: String, metrics: String) -> Result<()> {
    if dir.join("agent.toml").exists() {
        return Err(Exit::Config(anyhow!("{} already holds an agent", dir.display())).into());
    }
    std::fs::create_dir_all(dir.join("data"))
        .with_context(|| format!("creating {}", dir.display()))?;
    let dir = std::fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))?;
    let key = SecretKey::generate()?;
    write_private(&dir.join("identity.key"), key.to_text().as_bytes())?;
    let token: [u8; 24] = caravan_agent::crypto::random_bytes()?;
    let token: String = token.iter().map(|b| format!("{b:02x}")).collect();
    write_private(&dir.join("admin.token"), format!("{token}\n").as_bytes())?;
    let mut options = std::collections::BTreeMap::new();
    options.insert("root".into(), dir.join("data").display().to_string());
    let cfg = AgentConfig {
        identity_file: dir.join("identity.key"),
        admin_token_file: dir.join("admin.token"),
        listen,
        admin_listen: admin,
        metrics_listen: metrics,
        advertise: vec![],
        repositories: vec![],
        state_prefix: caravan_agent::config::DEFAULT_STATE_PREFIX.into(),
        sync_interval_secs: None,
        storage: StorageConfig {
            scheme: "fs".into(),
            options,
            credentials: None,
        },
    };
    cfg.validate().map_err(|e| Exit::Config(anyhow!(e)))?;
    std::fs::write(dir.join("agent.toml"), cfg.to_toml()?).with_context(|| "writing agent.toml")?;
    println!("{}", key.agent_id());
    eprintln!(
        "agent created in {}: run it with `caravan-agent run --config {}`",
        dir.display(),
        dir.join("agent.toml").display()
    );
    Ok(())
}

fn load_config(path: &Path) -> Result<AgentConfig> {
    AgentConfig::load(path).map_err(|e| Exit::Config(anyhow!(e)).into())
}

async fn run(config: &Path) -> Result<()> {
    let cfg = load_config(config)?;
    let shutdown = CancellationToken::new();
    let sd = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        sd.cancel();
    });
    daemon::run(cfg, shutdown).await.map_err(|e| match e {
        caravan_agent::Error::Config(_) => Exit::Config(anyhow!(e)).into(),
        other => anyhow!(other),
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// A client of the local daemon's admin API.
struct Admin {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Admin {
    fn from_config(path: &Path) -> Result<Admin> {
        let cfg = load_config(path)?;
        let token =
            daemon::read_token(&cfg.admin_token_file).map_err(|e| Exit::Config(anyhow!(e)))?;
        let addr = cfg.admin_listen.replace("0.0.0.0", "127.0.0.1");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(3600))
            .build()
            .context("building the HTTP client")?;
        Ok(Admin {
            base: format!("http://{addr}"),
            token,
            http,
        })
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T> {
        let resp = req.bearer_auth(&self.token).send().await.map_err(|e| {
            Exit::Unreachable(anyhow!(
                "cannot reach the agent daemon at {} ({e}); is `caravan-agent run` running?",
                self.base
            ))
        })?;
        let status = resp.status();
        let body = resp.bytes().await.context("reading the daemon's answer")?;
        if !status.is_success() {
            let msg = serde_json::from_slice::<daemon::ApiError>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(if status.is_client_error() {
                Exit::Config(anyhow!("{msg}")).into()
            } else {
                anyhow!("the daemon failed: {msg}")
            });
        }
        serde_json::from_slice(&body).context("decoding the daemon's answer")
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    async fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }
}
