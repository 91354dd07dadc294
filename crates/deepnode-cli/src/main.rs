//! `deepnode`, the operator's command line (CONTRACT §6). This file only parses arguments, starts the
//! runtime and turns the outcome into an exit code: 0 success, 1 a difference found (audit, or a log
//! the binary cannot fold), 2 a usage or connection error, always with a one-line reason on stderr.
//! Each subcommand lives in its own module under `commands/`; add one there and in `cli.rs`.

mod cli;
mod commands;
mod context;
mod progress;
mod render;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

/// Exit code for "a difference was found" (CONTRACT §6).
const EXIT_DIFFERENCE: u8 = 1;
/// Exit code for a usage or connection error (CONTRACT §6).
const EXIT_ERROR: u8 = 2;

fn main() -> ExitCode {
    // An empty variable is unset, as for the services (`deepnode_runtime::settings`).
    let command = deepnode_runtime::settings::empty_env_is_unset(cli::Cli::command());
    let parsed = command
        .try_get_matches()
        .and_then(|matches| cli::Cli::from_arg_matches(&matches));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version: print them whole and succeed.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!(
                "deepnode: {} (see `deepnode --help`)",
                first_line(&e.to_string())
            );
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("deepnode: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(commands::Outcome::Clean) => ExitCode::SUCCESS,
        Ok(commands::Outcome::Difference) => ExitCode::from(EXIT_DIFFERENCE),
        Err(e) => {
            eprintln!("deepnode: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// The first non-empty line of clap's message, without its `error: ` prefix.
fn first_line(message: &str) -> &str {
    let line = message
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(message);
    line.trim().trim_start_matches("error: ")
}
