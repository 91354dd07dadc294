//! The command line's shape (clap derive). One variant per subcommand; each maps to a module in
//! `commands/`. Environment variables (CONTRACT §1) are read here too, so `--help` documents them.

use clap::{Args, Parser, Subcommand};

/// deepnode's operator command line.
#[derive(Debug, Parser)]
#[command(
    name = "deepnode",
    version,
    about = "deepnode control plane: migrate, replay, audit, admin views, the live demo and simulated nodes"
)]
pub struct Cli {
    /// PostgreSQL holding the event log and projections.
    #[arg(long, env = "DATABASE_URL", default_value = deepnode_store::DEFAULT_DATABASE_URL, global = true)]
    pub database_url: String,
    /// Optional TOML file overriding the policy defaults.
    #[arg(long, env = "DEEPNODE_CONFIG", global = true)]
    pub config: Option<std::path::PathBuf>,
    /// NATS server with JetStream (used by `up`, `sim`, `witness`, and by `verify` and `audit` for
    /// the published checkpoints).
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    pub nats_url: String,
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
    /// Verify the hash chain, recompute every projection and check the log against its
    /// checkpoints; exit 1 on any difference.
    Audit(AuditArgs),
    /// List nodes with their reputation (the `node_reputation` table).
    Nodes(JsonArg),
    /// List current deployments (the `deployments` table).
    Deployments(JsonArg),
    /// Show events of the log, or of one stream.
    Events(EventsArgs),
    /// Run the live demo: services, simulated nodes, deployments and traffic, with a live view.
    Up(UpArgs),
    /// Run simulated nodes (registered through `cmd.node.register`) until Ctrl-C.
    Sim(SimArgs),
    /// Make an Ed25519 key for the log (or a witness) and print its public key.
    Keygen(KeygenArgs),
    /// Check the log against every checkpoint (database, DEEPNODE_CHECKPOINTS, files); exit 1 on
    /// the first that does not hold.
    Verify(VerifyArgs),
    /// Witness the log: co-sign each checkpoint consistent with the last one accepted; refuse and
    /// report one that is not.
    Witness(WitnessArgs),
    /// Write the log, its checkpoints and its Merkle tree (tiles) to a directory, for `replay`,
    /// `audit` and `verify --from DIR` without database access.
    Export(ExportArgs),
}

/// `deepnode export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A new (or empty) directory.
    pub dir: std::path::PathBuf,
}

/// `deepnode witness`.
#[derive(Debug, Args)]
pub struct WitnessArgs {
    /// The witness's own key file (`deepnode keygen --out FILE --name <witness name>`).
    #[arg(long)]
    pub key: std::path::PathBuf,
    /// The log's public key, as `deepnode keygen` printed it.
    #[arg(long, env = "DEEPNODE_LOG_PUBLIC_KEYS")]
    pub log_key: String,
    /// Where the last accepted checkpoint (size and root) is kept between runs.
    #[arg(long, default_value = "deepnode-witness.state")]
    pub state: std::path::PathBuf,
    /// The deployment's subject prefix.
    #[arg(long, default_value = "deepnode")]
    pub prefix: String,
    /// Look at the latest checkpoint once and exit (0 co-signed or nothing new, 1 refused).
    #[arg(long)]
    pub once: bool,
}

/// `deepnode keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Write the private key to this file (created with mode 0600; never overwritten) instead of
    /// printing it.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// The key's name: the log's origin in its checkpoints (no spaces, no `+`).
    #[arg(long, default_value = "deepnode.local/log")]
    pub name: String,
}

/// Where `verify` (and `audit`) find checkpoints besides the log's own, and the keys to trust.
#[derive(Debug, Args)]
pub struct CheckpointArgs {
    /// The log's (and witnesses') public keys, as `deepnode keygen` prints them, or files of them;
    /// without any, signatures are not checked (and the report says so).
    #[arg(
        long = "public-key",
        env = "DEEPNODE_LOG_PUBLIC_KEYS",
        value_delimiter = ',',
        global = true
    )]
    pub public_key: Vec<String>,
    /// A checkpoint kept outside the deployment (a signed note in a file); repeatable.
    #[arg(long, global = true)]
    pub checkpoint: Vec<std::path::PathBuf>,
    /// The deployment's subject prefix (its checkpoints stream is `<PREFIX>_CHECKPOINTS`).
    #[arg(long, default_value = "deepnode", global = true)]
    pub prefix: String,
}

/// `deepnode verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub sources: CheckpointArgs,
    /// Read the log from an export (`deepnode export DIR`) instead of the database.
    #[arg(long, global = true)]
    pub from: Option<std::path::PathBuf>,
    /// Print the report as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// `receipt FILE`: check one exec reply's receipt instead of the whole log.
    #[command(subcommand)]
    pub what: Option<VerifyWhat>,
}

/// What `deepnode verify` checks besides the whole log.
#[derive(Debug, clap::Subcommand)]
pub enum VerifyWhat {
    /// Check one exec receipt (a file holding the exec reply, or its `receipt` alone): the log
    /// key's signature, the event it names in the log, that event's inclusion under a signed
    /// checkpoint, and the outcome the reply states.
    Receipt {
        /// The file.
        file: std::path::PathBuf,
    },
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
    /// Read the log from an export (`deepnode export DIR`) instead of the database.
    #[arg(long)]
    pub from: Option<std::path::PathBuf>,
}

/// `deepnode audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Audit an export (`deepnode export DIR`) instead of the database: its chain, its fold and
    /// its checkpoints (an export holds no tables to compare).
    #[arg(long)]
    pub from: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub sources: CheckpointArgs,
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

/// `deepnode up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Stop after this long (e.g. `30s`, `2m`) and print plain lines instead of the live view.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<std::time::Duration>,
    /// Simulated nodes in the fleet (at least 4: three of them are deliberately bad).
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(4..=1000))]
    pub nodes: u32,
    /// Models to deploy.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub models: u32,
    /// Replicas per deployed model (CONTRACT §3: at least 2; with 2, the growth-tier replica gets a
    /// share of the traffic, so every node placed there is observed).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(2..=16))]
    pub replicas: u32,
    /// Exec requests per second to send.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rate: u32,
    /// Most exec requests in flight at once (further ticks are skipped and counted).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,
    /// Per-attempt timeout sent with every exec request, in milliseconds.
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u64).range(1..=120_000))]
    pub timeout_ms: u64,
    /// Ask for a rotation round (`cmd.rotation.run`) this often (e.g. `10s`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub rotation_every: std::time::Duration,
    /// Directory under which each run gets a `<timestamp>/` folder with the services' logs.
    #[arg(long, default_value = ".dev/logs")]
    pub log_dir: std::path::PathBuf,
}

/// `deepnode sim`.
#[derive(Debug, Args)]
pub struct SimArgs {
    /// How many nodes to simulate.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub nodes: u32,
    /// Probability of answering an error, in [0, 1].
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub error_rate: f64,
    /// Probability of never answering, in [0, 1].
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub timeout_rate: f64,
    /// Probability of answering invalid output, in [0, 1].
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub invalid_rate: f64,
    /// Median answer latency in milliseconds (log-normal, sigma 0.5; 0 answers at once).
    #[arg(long, default_value_t = 20)]
    pub latency_ms: u64,
    /// Domain the nodes register for.
    #[arg(long, default_value = "text")]
    pub domain: String,
    /// Node ids are `<prefix>-0`, `<prefix>-1`, ...
    #[arg(long, default_value = "sim")]
    pub prefix: String,
    /// Seed of every node's random choices.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stake each node registers with.
    #[arg(long, default_value_t = 100.0)]
    pub stake: f64,
    /// Capacity (max concurrent requests) each node registers with.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub capacity: u32,
    /// Stop after this long instead of waiting for Ctrl-C (e.g. `60s`).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<std::time::Duration>,
}

/// Parses `250ms`, `30s`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: use e.g. 30s, 2m, 500ms"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "invalid duration unit {other:?}: use ms, s, m or h"
            ))
        }
    };
    if !(seconds.is_finite() && seconds > 0.0 && seconds < 1e9) {
        return Err(format!("invalid duration {text:?}: must be positive"));
    }
    Ok(std::time::Duration::from_secs_f64(seconds))
}

/// Parses a probability in [0, 1].
fn parse_rate(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("invalid rate {text:?}: use a number in [0, 1]"))?;
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("rate {value} is not in [0, 1]"))
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("3 days").is_err());
    }
}
