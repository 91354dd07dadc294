//! The command line's shape (clap derive). One variant per subcommand; each maps to a module in
//! `commands/`. Environment variables (CONTRACT §1) are read here too, so `--help` documents them.

use clap::{Args, Parser, Subcommand};

/// deepnode's operator command line.
#[derive(Debug, Parser)]
#[command(
    name = "deepnode",
    version,
    about = "deepnode control plane: migrate, replay, audit, admin views"
)]
pub struct Cli {
    /// PostgreSQL holding the event log and projections.
    #[arg(long, env = "DATABASE_URL", default_value = deepnode_store::DEFAULT_DATABASE_URL, global = true)]
    pub database_url: String,
    /// Optional TOML file overriding the policy defaults.
    #[arg(long, env = "DEEPNODE_CONFIG", global = true)]
    pub config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply pending migrations.
    Migrate,
    /// Fold the log up to a point and print node reputation and deployments as they were then.
    Replay(ReplayArgs),
    /// Verify the hash chain and recompute every projection; exit 1 on any difference.
    Audit(AuditArgs),
    /// List nodes with their reputation (the `node_reputation` table).
    Nodes(JsonArg),
    /// List current deployments (the `deployments` table).
    Deployments(JsonArg),
    /// Show events of the log, or of one stream.
    Events(EventsArgs),
}

/// `deepnode replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Stop after this global position (inclusive).
    #[arg(long, conflicts_with = "until_time", value_parser = clap::value_parser!(i64).range(0..))]
    pub until_position: Option<i64>,
    /// Fold only the events that occurred at or before this instant (RFC 3339).
    #[arg(long)]
    pub until_time: Option<chrono::DateTime<chrono::FixedOffset>>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// `deepnode audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A lone `--json` flag.
#[derive(Debug, Args)]
pub struct JsonArg {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `deepnode events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only this stream (e.g. `node-n1`); `--from` is then a stream version.
    #[arg(long)]
    pub stream: Option<String>,
    /// Start at this global position (or stream version with `--stream`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i64).range(1..))]
    pub from: i64,
    /// Show at most this many events.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub limit: i64,
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
}
