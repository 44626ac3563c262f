//! Command-line interface. Every failure prints one clear line and exits
//! with a code a script can act on:
//! 0 success, 1 failure, 2 bad usage, 3 bad configuration or input,
//! 4 daemon unreachable, 5 transfer or verification failed.

/// `println!` for the commands' standard output. A reader that went away
/// (`caravan-agent publish --json | head -1`) ends the command quietly with
/// exit code 0, as `cat` or ripgrep do, instead of a panic and a backtrace;
/// the daemon's side of the work goes on (a publish's pass runs on its own
/// task).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::print_line(format_args!($($arg)*))
    };
}

/// `eprintln!` that never panics: standard error on a full disk or a
/// closed pipe loses the line, not the command.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod args;
mod client;
mod demo;
mod exit;
mod human;
mod setup;
mod shares;
mod trust;

use std::process::ExitCode;

use anyhow::{Result, anyhow};
use clap::Parser;

use args::{Cli, Command, LogFormat};
use exit::Exit;
use setup::{init, keygen, load_config, run, wait_for_signal};

use caravan_agent::daemon;

/// Writes one line to standard output (see [`out!`]).
pub(crate) fn print_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let written = o
        .write_fmt(args)
        .and_then(|()| o.write_all(b"\n"))
        .and_then(|()| o.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            say!("error: cannot write to standard output: {e}");
            std::process::exit(1)
        }
    }
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // A malformed agent id, share id, duration… is bad input (3), like a
        // malformed ticket or config; other usage mistakes stay 2.
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::InvalidValue | clap::error::ErrorKind::ValueValidation
            ) =>
        {
            if json_output() {
                say!("{}", usage_error_json(&e, 3));
            } else {
                let _ = e.print();
            }
            return ExitCode::from(3);
        }
        // Other usage mistakes (an unknown flag, a missing argument) are
        // JSON too under --json, exit code 2; help and version are not
        // errors.
        Err(e)
            if json_output()
                && !matches!(
                    e.kind(),
                    clap::error::ErrorKind::DisplayHelp
                        | clap::error::ErrorKind::DisplayVersion
                        | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                ) =>
        {
            say!("{}", usage_error_json(&e, 2));
            return ExitCode::from(2);
        }
        Err(e) => e.exit(),
    };
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
            say!("error: cannot start the async runtime: {e}");
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
                    Some(
                        caravan_agent::Error::Config(_)
                        | caravan_agent::Error::Parse { .. }
                        | caravan_agent::Error::Rejected(_),
                    ) => 3,
                    _ => 1,
                },
            };
            if json_output() {
                // Under --json the error is JSON too (restic's `exit_error`).
                let v = serde_json::json!({
                    "message_type": "exit_error",
                    "code": code,
                    "message": message(&e),
                });
                say!("{v}");
            } else {
                say!("error: {}", message(&e));
            }
            ExitCode::from(code)
        }
    }
}

/// An error and its causes, each said once: the library's errors already
/// end with their source (`i/o error while binding …: Address already in
/// use`), which anyhow's `{:#}` would append again.
fn message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let said = cause.to_string();
        if out.contains(&said) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&said);
    }
    out
}

/// A usage error as `--json` prints it: clap's message on one line (what
/// it names included, such as the missing arguments), without its
/// `error: ` and the usage and help lines that follow.
fn usage_error_json(e: &clap::Error, code: u8) -> serde_json::Value {
    let text = e.to_string();
    let said: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:"))
        .filter(|l| !l.is_empty())
        .collect();
    serde_json::json!({
        "message_type": "exit_error",
        "code": code,
        "message": said.join(" ").trim_start_matches("error: ").to_string(),
    })
}

/// Whether the command line asked for `--json` output.
fn json_output() -> bool {
    std::env::args_os().any(|a| a == "--json")
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log line that cannot be written (standard error on a full
        // disk) is dropped: by default the subscriber reports that with
        // `eprintln!` to the same standard error, which panics, and took
        // down whatever task was logging (a publish's pass).
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn dispatch(cmd: Command) -> Result<()> {
    match cmd {
        Command::Completion { shell } => {
            use clap::CommandFactory;
            use std::io::Write;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "caravan-agent", &mut script);
            // A closed pipe (`| head`) is not an error worth a panic.
            match std::io::stdout().write_all(&script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(()),
            }
        }
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
                // As every other command: $CARAVAN_CONFIG, else the
                // default config path.
                (None, None) => {
                    let config = std::env::var_os("CARAVAN_CONFIG")
                        .filter(|v| !v.is_empty())
                        .map(std::path::PathBuf::from)
                        .unwrap_or_else(args::default_config_path);
                    daemon::read_identity(&load_config(&config)?.identity_file)?
                }
            };
            out!("{}", key.agent_id());
            Ok(())
        }
        Command::Run { config } => run(&config).await,
        cmd @ (Command::Publish { .. }
        | Command::Ticket { .. }
        | Command::Fetch { .. }
        | Command::Status { .. }
        | Command::Cancel { .. }
        | Command::Forget { .. }
        | Command::Peers { .. }) => shares::command(cmd).await,
        cmd @ Command::Demo { .. } => demo::command(cmd).await,
        Command::Trust { action } => trust::command(action).await,
        Command::Repository(args) => {
            let shutdown = async { wait_for_signal().await };
            caravan_agent::repository::run(&args, shutdown)
                .await
                .map_err(|e| match e {
                    caravan_agent::Error::Config(_) => Exit::Config(anyhow!(e)).into(),
                    other => anyhow!(other),
                })
        }
    }
}
