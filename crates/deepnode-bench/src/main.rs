//! `deepnode-bench`: measures the event log on the machine it runs on and prints Markdown tables
//! for `docs/BENCHMARKS.md`.
//!
//! `append` measures, in one run and one fresh database, the raw PostgreSQL ceiling (plain INSERTs
//! into a table shaped like `events`, one connection per client as pgbench does) next to
//! `EventStore::append` at the same concurrency; `read` fills a fresh log through the store (so the
//! hash chain is real) and times `stream_all` over all of it while watching the process's RSS.
//! It creates its own database and drops it at the end (unless `--keep`); it never touches any
//! other database and does not change server settings.

mod append;
mod db;
mod procs;
mod read;
mod report;
mod system;
mod tlog;

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

/// Benchmarks of the deepnode event log.
#[derive(Parser, Debug)]
#[command(name = "deepnode-bench", version)]
struct Cli {
    /// Server to benchmark on; its database part is ignored: each run creates `deepnode_bench_<random>`.
    #[arg(long, env = "DATABASE_URL", default_value = deepnode_store::DEFAULT_DATABASE_URL, global = true)]
    database_url: String,

    /// Keep the benchmark database instead of dropping it at the end.
    #[arg(long, global = true)]
    keep: bool,

    /// Diagnostics: log every statement's duration in the server log (a setting of the benchmark
    /// database only, `log_min_duration_statement = 0`), to see where a commit's time goes.
    #[arg(long, global = true)]
    log_statements: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Raw INSERT ceiling vs `EventStore::append` at 1, 4 and 16 writers, and 100-event appends.
    Append(AppendArgs),
    /// Fill a log through the store, then time `stream_all` over all of it and watch memory.
    Read(ReadArgs),
    /// The whole deployment: its own nats-server, the three release service binaries as separate
    /// processes (one copy each, then two), `deepnode sim` as the nodes, and this process as the
    /// outside client (figures in `docs/BENCHMARKS-system.md`).
    System(system::SystemArgs),
    /// The log's Merkle tree (issue 14): fill a log, build its tree, then time inclusion and
    /// consistency proofs, `deepnode verify` over the whole log, and a receipt's signature.
    Tlog(TlogArgs),
}

/// Options of `tlog`.
#[derive(Args, Debug, Clone)]
pub struct TlogArgs {
    /// Events in the log.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Inclusion proofs, and as many consistency proofs, to time.
    #[arg(long, default_value_t = 1_000)]
    pub proofs: usize,
    /// Approximate size of each event's JSON payload in bytes.
    #[arg(long, default_value_t = 300)]
    pub payload_bytes: usize,
}

/// Options of `append`.
#[derive(Args, Debug, Clone)]
pub struct AppendArgs {
    /// Measured seconds per scenario.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Unmeasured warm-up seconds before each scenario's measurement.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Concurrency levels for the one-row / one-event scenarios.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub clients: Vec<usize>,
    /// Rows per transaction / events per append in the batch scenarios (1 client); 0 skips them.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Diagnostics: `ANALYZE events` before each deepnode scenario, as autovacuum eventually would,
    /// so that statements the store prepared on a near-empty table are re-planned.
    #[arg(long)]
    pub analyze: bool,
    /// Diagnostics: run only the deepnode scenarios.
    #[arg(long)]
    pub skip_raw: bool,
    /// Approximate size of each event's JSON payload in bytes.
    #[arg(long, default_value_t = 300)]
    pub payload_bytes: usize,
    /// Raw/deepnode pairs per concurrency level, run alternately; with more than one, the comparison
    /// adds each level's median ratio (for a machine whose speed drifts between scenarios).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
}

/// Options of `read`.
#[derive(Args, Debug, Clone)]
pub struct ReadArgs {
    /// Events to write before reading.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Events per append while filling.
    #[arg(long, default_value_t = 500)]
    pub fill_batch: usize,
    /// Concurrent appending tasks while filling.
    #[arg(long, default_value_t = 4)]
    pub fill_tasks: usize,
    /// Approximate size of each event's JSON payload in bytes.
    #[arg(long, default_value_t = 300)]
    pub payload_bytes: usize,
    /// RSS sampling interval in milliseconds.
    #[arg(long, default_value_t = 10)]
    pub sample_ms: u64,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the Tokio runtime")?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    if let Command::System(args) = &cli.command {
        // One fresh database (and NATS server) per deployment, made by the benchmark itself.
        return system::run(&cli.database_url, cli.keep, cli.log_statements, args).await;
    }
    let bench_db = db::BenchDb::create(&cli.database_url).await?;
    eprintln!("benchmark database: {}", bench_db.name);
    if cli.log_statements {
        bench_db.log_statements().await?;
    }
    let outcome = match &cli.command {
        Command::Append(args) => append::run(&bench_db, args).await,
        Command::Read(args) => read::run(&bench_db, args).await,
        Command::Tlog(args) => match std::env::current_exe() {
            Ok(exe) => {
                let bin_dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
                tlog::run(&bench_db, args, &bin_dir).await
            }
            Err(e) => Err(e.into()),
        },
        Command::System(_) => unreachable!("handled above"),
    };
    if cli.keep {
        eprintln!("kept database {}", bench_db.name);
    } else if let Err(e) = bench_db.drop_database(Duration::from_secs(30)).await {
        // Report the benchmark's own error first if both failed.
        eprintln!("warning: could not drop {}: {e:#}", bench_db.name);
    }
    let markdown = outcome?;
    println!("{markdown}");
    Ok(())
}
