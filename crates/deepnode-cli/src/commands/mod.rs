//! One module per subcommand. Each exposes `run(&Cli, args) -> anyhow::Result<Outcome>`; `Err` means
//! a usage or connection problem (exit 2), `Outcome::Difference` a finding (exit 1). To add a
//! subcommand (`up`, `sim`): a variant in `cli::Command`, a module here, an arm in [`run`].

mod audit;
mod deployments;
mod events;
mod export;
mod keygen;
mod migrate;
mod nodes;
mod replay;
mod sim;
mod up;
mod verify;
mod witness;

use crate::cli::{Cli, Command};

/// How a command ended, when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything as expected (exit 0).
    Clean,
    /// A difference or an unreadable log was found (exit 1).
    Difference,
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    match &cli.command {
        Command::Migrate => migrate::run(&cli).await,
        Command::Replay(args) => replay::run(&cli, args).await,
        Command::Audit(args) => audit::run(&cli, args).await,
        Command::Nodes(args) => nodes::run(&cli, args).await,
        Command::Deployments(args) => deployments::run(&cli, args).await,
        Command::Events(args) => events::run(&cli, args).await,
        Command::Up(args) => up::run(&cli, args).await,
        Command::Sim(args) => sim::run(&cli, args).await,
        Command::Keygen(args) => keygen::run(args),
        Command::Verify(args) => verify::run(&cli, args).await,
        Command::Witness(args) => witness::run(&cli, args).await,
        Command::Export(args) => export::run(&cli, args).await,
    }
}
