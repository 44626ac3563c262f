//! The command line: every subcommand, its flags and their parsers.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use caravan_agent::identity::AgentId;
use caravan_agent::manifest::ShareId;

pub(crate) const AFTER_HELP: &str = "\
Quick start (two agents on this machine):
  caravan-agent demo                              # see it work, nothing to set up
  caravan-agent init --dir ./alice --listen 127.0.0.1:7400 --admin 127.0.0.1:7401
  caravan-agent run --config ./alice/agent.toml   # the daemon (keep it running)
  caravan-agent publish --config ./alice/agent.toml photos --to <BOB'S AGENT ID>
  caravan-agent fetch --config ./bob/agent.toml <TICKET> --dest photos-from-alice

Exit codes: 0 ok, 1 failure, 2 bad usage, 3 bad configuration or input
(a malformed agent id, ticket or duration included), 4 daemon unreachable,
5 transfer or verification failed.
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
pub(crate) struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub(crate) log_format: LogFormat,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Print a shell completion script.
    ///
    /// bash: `caravan-agent completion bash > /etc/bash_completion.d/caravan-agent`;
    /// zsh: `caravan-agent completion zsh > "${fpath[1]}/_caravan-agent"`;
    /// fish: `caravan-agent completion fish > ~/.config/fish/completions/caravan-agent.fish`.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
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
        /// Agent configuration file, TOML (default: $CARAVAN_CONFIG, else
        /// ~/.config/caravan/agent.toml).
        #[arg(long, short, env = "CARAVAN_CONFIG", default_value_os_t = default_config_path())]
        config: PathBuf,
    },
    /// Publish a path of this agent's storage as a share (asks the running daemon).
    ///
    /// Prints one ticket per recipient; send each recipient its ticket. To
    /// publish a new version of a share, pass --share with its id: only
    /// changed chunks will travel.
    Publish {
        /// Agent configuration file (default: $CARAVAN_CONFIG, else
        /// ~/.config/caravan/agent.toml).
        #[arg(long, short, env = "CARAVAN_CONFIG", default_value_os_t = default_config_path())]
        config: PathBuf,
        /// Directory or file in the agent's storage ("" or "." for everything).
        path: String,
        /// Recipient agent id (repeat for several). With --share: every
        /// recipient of the new version; one left out gets nothing newer,
        /// and the version gets a fresh share key.
        #[arg(long = "to", value_name = "AGENT_ID")]
        to: Vec<AgentId>,
        /// Also allow every agent this agent trusts within N hops.
        #[arg(long, value_name = "N")]
        trust_depth: Option<u8>,
        /// Publish a new version of this share.
        #[arg(long, value_name = "SHARE_ID")]
        share: Option<ShareId>,
        /// Use a fresh share key for this version (automatic when it drops a
        /// recipient, trusts fewer hops, or follows a revocation).
        #[arg(long, requires = "share")]
        rotate_key: bool,
        /// The new version comes from another folder than the last one
        /// (every recipient's copy becomes what is there, files not there
        /// removed): without it such a version is refused, as a mistyped
        /// path would wipe their copies.
        #[arg(long, requires = "share")]
        new_path: bool,
        /// Also seed it offline: stage the sealed chunks in this agent's own
        /// bucket (s3 with access keys, gcs with a service-account key,
        /// azblob with the account key) and publish presigned URLs through
        /// the repositories, so recipients can fetch while this agent is
        /// stopped.
        #[arg(long)]
        offline_seeding: bool,
        /// How long each presigned URL stays valid (e.g. 90s, 30m, 12h, 7d);
        /// the running daemon renews them before they expire.
        #[arg(long, value_name = "DURATION", requires = "offline_seeding", value_parser = caravan_agent::node::seed::parse_validity)]
        url_validity: Option<u64>,
        /// Print two JSON lines: the share id, version and tickets as soon
        /// as they exist (recipients may start `fetch` from them while the
        /// pass runs), then the result (files, bytes, chunks, seconds,
        /// what was left out).
        #[arg(long)]
        json: bool,
    },
    /// Make a ticket again for a recipient of a share this agent publishes.
    ///
    /// The recipient must be one the share allows: named with --to when it
    /// was published, or, for a --trust-depth share, an agent this one
    /// trusts within that depth. To add a recipient to a --to share,
    /// publish a new version naming it (publish PATH --share ID --to …).
    Ticket {
        /// Agent configuration file (default: $CARAVAN_CONFIG, else
        /// ~/.config/caravan/agent.toml).
        #[arg(long, short, env = "CARAVAN_CONFIG", default_value_os_t = default_config_path())]
        config: PathBuf,
        /// The share id.
        share: ShareId,
        /// The recipient's agent id.
        #[arg(long = "to", value_name = "AGENT_ID")]
        to: AgentId,
        /// Print the ticket as JSON (`{"share_id", "recipient", "ticket"}`).
        #[arg(long)]
        json: bool,
    },
    /// Fetch a share from a ticket into a directory of this agent's storage.
    ///
    /// Shows progress until every file is verified and in place. Files appear
    /// only when complete. If the daemon stops, the fetch resumes when it
    /// restarts, without downloading verified chunks again.
    Fetch {
        /// Agent configuration file (default: $CARAVAN_CONFIG, else
        /// ~/.config/caravan/agent.toml).
        #[arg(long, short, env = "CARAVAN_CONFIG", default_value_os_t = default_config_path())]
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
        /// Print JSON lines: a `status` line every second while it runs,
        /// then a `summary` line; with --detach, only the first `status`
        /// line (follow it with `status --json`).
        #[arg(long)]
        json: bool,
    },
    /// Stop an unfinished fetch for good: one running now (stopped where it
    /// is), one that failed or one that waits to be tried again (a
    /// publisher that refuses this agent, one gone for good). Its request
    /// and half-written files are removed, and it is no longer resumed at
    /// each start; files it already put in place stay.
    ///
    /// Example: caravan-agent cancel sh1-…   (the share id `status` shows)
    Cancel {
        /// Agent configuration file (default: $CARAVAN_CONFIG, else
        /// ~/.config/caravan/agent.toml).
        #[arg(long, short, env = "CARAVAN_CONFIG", default_value_os_t = default_config_path())]
        config: PathBuf,
        /// The share id of the fetch.
        share: ShareId,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop holding a share, published or fetched: it is no longer served
    /// to anyone or announced, and its record, index, tags and offline
    /// seed go. Its files stay in storage, as the user's own (a later
    /// fetch of the share into the same folder will not replace them
    /// unless they are exactly the share's). Recipients of a share you
    /// published keep what they fetched, and may go on seeding it to each
    /// other. Refused while the share's publish pass runs, while a fetch
    /// of it is unfinished (cancel it first), and for a declared share
    /// (a Kubernetes Share: delete it instead).
    ///
    /// Example: caravan-agent forget sh1-…   (the share id `status` shows)
    Forget {
        /// Agent configuration file (default: $CARAVAN_CONFIG, else
        /// ~/.config/caravan/agent.toml).
        #[arg(long, short, env = "CARAVAN_CONFIG", default_value_os_t = default_config_path())]
        config: PathBuf,
        /// The share id.
        share: ShareId,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show what the running daemon holds and is fetching.
    Status {
        /// Agent configuration file (default: $CARAVAN_CONFIG, else
        /// ~/.config/caravan/agent.toml).
        #[arg(long, short, env = "CARAVAN_CONFIG", default_value_os_t = default_config_path())]
        config: PathBuf,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run two agents on loopback with temporary storage, move a generated
    /// folder from one to the other, verify every byte, and report throughput.
    Demo {
        /// Total payload size in bytes (suffixes K, M, G accepted: 1G = 2^30).
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        size: u64,
        /// Number of files the payload is split into (1 to 1,000,000).
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
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
        /// `offline`: the publisher keeps the folder in an S3 bucket,
        /// publishes it with offline seeding and is stopped; the recipient
        /// fetches everything from presigned URLs (needs --s3-endpoint).
        #[arg(long, value_enum, default_value = "transfer")]
        scenario: Scenario,
        /// S3-compatible endpoint for the offline scenario (e.g. what
        /// `tests/s3/moto.sh start` or `tests/s3/s3s.sh start` prints).
        #[arg(long, env = "CARAVAN_DEMO_S3_ENDPOINT", value_name = "URL")]
        s3_endpoint: Option<String>,
        /// Bucket for the offline scenario (must exist).
        #[arg(long, env = "CARAVAN_DEMO_S3_BUCKET", default_value = "caravan-test")]
        s3_bucket: String,
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
        /// Agent configuration file (default: $CARAVAN_CONFIG, else
        /// ~/.config/caravan/agent.toml).
        #[arg(long, short, env = "CARAVAN_CONFIG", default_value_os_t = default_config_path())]
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
pub(crate) enum Scenario {
    Transfer,
    Trust,
    Offline,
}

#[derive(Subcommand, Debug)]
pub(crate) enum TrustCommand {
    /// Vouch for an agent: sign a grant and publish it.
    ///
    /// Limits (checked before anything is signed; exit 3 when exceeded):
    /// --expires from 1 second to 366 days (repositories refuse a longer
    /// validity), --depth at most 8, --scope 1 to 128 bytes. A grant
    /// replaces this agent's earlier grant to the same agent; one with a
    /// different scope than the grant in effect is refused (revoke that
    /// first). A repository that cannot be reached gets the grant later:
    /// it is saved and sent again on every trust sync.
    ///
    /// Example: `caravan-agent trust grant cv1-… --depth 1 --expires 30d -c agent.toml`
    Grant {
        /// Agent configuration file (default: $CARAVAN_CONFIG, else
        /// ~/.config/caravan/agent.toml).
        #[arg(long, short, env = "CARAVAN_CONFIG", default_value_os_t = default_config_path())]
        config: PathBuf,
        /// The agent to trust.
        agent: AgentId,
        /// How many further hops it may vouch (0: trusted, cannot vouch; at most 8).
        #[arg(long, value_parser = parse_grant_depth)]
        depth: u8,
        /// Validity from now: seconds, or a number with a unit s, m, h, d or w
        /// (e.g. 3600, 90m, 12h, 30d, 2w); from 1 s to 366d (default 365d).
        #[arg(long, value_parser = parse_grant_validity)]
        expires: Option<u64>,
        /// Limit the grant to one scope (1 to 128 bytes). Shares carry no
        /// scope, so a scoped grant does not let the agent fetch them.
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
        /// Agent configuration file (default: $CARAVAN_CONFIG, else
        /// ~/.config/caravan/agent.toml).
        #[arg(long, short, env = "CARAVAN_CONFIG", default_value_os_t = default_config_path())]
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
        /// Agent configuration file (default: $CARAVAN_CONFIG, else
        /// ~/.config/caravan/agent.toml).
        #[arg(long, short, env = "CARAVAN_CONFIG", default_value_os_t = default_config_path())]
        config: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Explain whether and why this agent trusts AGENT_ID: the chain of
    /// grants, or why there is none (no grant, expired, revoked, too deep).
    /// Exits 1 when there is no chain.
    Why {
        /// Agent configuration file (default: $CARAVAN_CONFIG, else
        /// ~/.config/caravan/agent.toml).
        #[arg(long, short, env = "CARAVAN_CONFIG", default_value_os_t = default_config_path())]
        config: PathBuf,
        /// The agent in question.
        agent: AgentId,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `trust grant --expires`: a duration (0 allowed here, so that the
/// message names the limit), then the limits repositories apply.
pub(crate) fn parse_grant_validity(s: &str) -> std::result::Result<u64, String> {
    let secs = split_duration(s.trim())
        .ok_or_else(|| format!("{s:?} is not a duration (e.g. 3600, 90m, 12h, 30d, 1w)"))?;
    caravan_agent::trust::check_grant_validity_secs(secs)?;
    Ok(secs)
}

/// `trust grant --depth`: a number of hops, at most the deepest searched.
pub(crate) fn parse_grant_depth(s: &str) -> std::result::Result<u8, String> {
    let d: u8 = s.trim().parse().map_err(|_| {
        format!(
            "{s:?} is not a depth (0 to {})",
            caravan_agent::trust::MAX_GRANT_DEPTH
        )
    })?;
    caravan_agent::trust::check_grant_depth(d)?;
    Ok(d)
}

/// A number with an optional unit s, m, h, d or w, in seconds (None when
/// malformed or overflowing).
fn split_duration(s: &str) -> Option<u64> {
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        Some('d') => (&s[..s.len() - 1], 86400),
        Some('w') => (&s[..s.len() - 1], 7 * 86400),
        _ => (s, 1),
    };
    num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult))
}

#[derive(clap::Args, Debug)]
#[group(required = false, multiple = false)]
pub(crate) struct ConfigOrKey {
    /// Agent configuration file (default: $CARAVAN_CONFIG, else
    /// ~/.config/caravan/agent.toml).
    // Not `env = …`: clap counts a value from the environment as typed,
    // so `--identity` would conflict with a CARAVAN_CONFIG the user never
    // typed. The variable is read where neither is given.
    #[arg(long, short)]
    pub(crate) config: Option<PathBuf>,
    /// Secret key file.
    #[arg(long)]
    pub(crate) identity: Option<PathBuf>,
}

pub(crate) fn parse_size(s: &str) -> std::result::Result<u64, String> {
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

/// Where `--config` points when neither the flag nor `CARAVAN_CONFIG` is
/// given: `$XDG_CONFIG_HOME/caravan/agent.toml`, else
/// `~/.config/caravan/agent.toml`, else `agent.toml` (no home directory).
pub(crate) fn default_config_path() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        });
    match base {
        Some(b) => b.join("caravan").join("agent.toml"),
        None => PathBuf::from("agent.toml"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// `--help` covers every flag of every command (and sub-subcommand).
    #[test]
    fn every_flag_has_a_description() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "caravan-agent", &mut missing);
        assert!(missing.is_empty(), "flags without --help text: {missing:?}");
    }

    #[test]
    fn completions_are_generated_for_bash_zsh_and_fish() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "caravan-agent", &mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(text.contains("caravan-agent"), "{shell}");
            assert!(text.contains("fetch") && text.contains("config"), "{shell}");
        }
    }

    #[test]
    fn durations_take_weeks() {
        assert_eq!(parse_grant_validity("1w"), Ok(7 * 86_400));
        assert_eq!(parse_grant_validity("30d"), Ok(30 * 86_400));
        assert_eq!(parse_grant_validity("90m"), Ok(5400));
        assert!(parse_grant_validity("1y").is_err());
        assert!(parse_grant_validity("0").is_err());
    }

    #[test]
    fn config_comes_from_the_flag_the_environment_or_the_default_path() {
        let cli = Cli::try_parse_from(["caravan-agent", "status", "-c", "/x/agent.toml"]).unwrap();
        let Command::Status { config, .. } = cli.command else {
            panic!("not status")
        };
        assert_eq!(config, PathBuf::from("/x/agent.toml"));
        let cli = Cli::try_parse_from(["caravan-agent", "status"]).unwrap();
        let Command::Status { config, .. } = cli.command else {
            panic!("not status")
        };
        // CARAVAN_CONFIG is not set in the test environment: the default path.
        if std::env::var_os("CARAVAN_CONFIG").is_none() {
            assert_eq!(config, default_config_path());
            assert!(
                config.ends_with("caravan/agent.toml")
                    || config.as_path() == std::path::Path::new("agent.toml")
            );
        }
    }
}
