//! `caravan-agent`: the agent daemon, its command-line client, and a demo.
#![forbid(unsafe_code)]

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
