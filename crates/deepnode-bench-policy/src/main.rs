//! `deepnode-bench-policy`: benchmarks of the policy core for issue 3 — a routing decision over a
//! realistic snapshot (10,000 nodes in a domain, 1,000 models with 2 replicas), the in-memory fold of
//! a synthetic log, and seeding a PostgreSQL log (plus its projection) on which the real `deepnode
//! replay` and `deepnode audit` binaries are then timed (see docs/BENCHMARKS-policy.md for commands).
//!
//! It measures; it asserts nothing and changes no policy. Histories come from
//! `deepnode_projections::synthetic`, so every run sees the same events.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use deepnode_domain::book::NodeBook;
use deepnode_domain::config::PolicyConfig;
use deepnode_domain::fixed::Bps;
use deepnode_domain::ids::{ModelId, NodeId, RequestId};
use deepnode_domain::log::RecordedEvent;
use deepnode_domain::scoring::{route, CandidateSnapshot, NodeStatus, RouteInput};
use deepnode_projections::synthetic::{History, Spec};
use deepnode_projections::BookProjection;
use deepnode_store::{EventStore, ExpectedVersion, ProjectionRunner};
use futures::StreamExt;
use hdrhistogram::Histogram;

#[derive(Parser)]
#[command(name = "deepnode-bench-policy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Routing decisions: p50/p99 per decision, in-process.
    Route {
        #[arg(long, default_value_t = 10_000)]
        nodes: usize,
        #[arg(long, default_value_t = 1_000)]
        models: usize,
        #[arg(long, default_value_t = 200_000)]
        decisions: usize,
    },
    /// The in-memory fold (`NodeBook::evolve`, decoding included): events/s.
    Fold {
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
    },
    /// Appends a synthetic log of about `events` events to DATABASE_URL, then projects it.
    Seed {
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
}

/// Executions producing about `events` events (≈4.5 events per execution on average).
fn spec_for(events: usize) -> Spec {
    Spec {
        nodes: 200,
        models: 100,
        executions: events * 2 / 9,
        seed: 42,
        start: chrono::DateTime::from_timestamp(1_767_225_600, 0).unwrap_or_default(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Route {
            nodes,
            models,
            decisions,
        } => bench_route(nodes, models, decisions),
        Command::Fold { events } => bench_fold(events),
        Command::Seed {
            database_url,
            events,
            concurrency,
        } => tokio::runtime::Runtime::new()?.block_on(seed(&database_url, events, concurrency)),
    }
}

fn bench_route(nodes: usize, models: usize, decisions: usize) -> anyhow::Result<()> {
    // The node table of one domain, as the scheduler would keep it in memory.
    let mut table = HashMap::with_capacity(nodes);
    let ids: Vec<NodeId> = (0..nodes)
        .map(|i| NodeId::parse(&format!("node-{i:05}")))
        .collect::<Result<_, _>>()?;
    for (i, id) in ids.iter().enumerate() {
        table.insert(
            id.clone(),
            CandidateSnapshot {
                node_id: id.clone(),
                deployed: true,
                status: if i % 10 == 0 {
                    NodeStatus::Probation
                } else {
                    NodeStatus::Active
                },
                ejected: i % 97 == 0,
                in_flight: (i % 7) as u32,
                capacity: 8,
                reputation: Bps::from_f64(0.3 + (i % 70) as f64 / 100.0),
                failure_rate: Bps::from_f64((i % 20) as f64 / 100.0),
                stake_micros: 1_000_000 * (1 + (i % 50) as u64),
                assignments: (i % 13) as u64,
            },
        );
    }
    let placements: Vec<(ModelId, [NodeId; 2])> = (0..models)
        .map(|m| {
            let a = ids[(m * 2) % nodes].clone();
            let b = ids[(m * 2 + 1 + nodes / 2) % nodes].clone();
            ModelId::parse(&format!("model-{m:04}")).map(|id| (id, [a, b]))
        })
        .collect::<Result<_, _>>()?;
    let policy = PolicyConfig::default().routing;
    let config_hash = PolicyConfig::default().config_hash();
    let requests: Vec<RequestId> = (0..1024)
        .map(|r| RequestId::parse(&format!("req-{r}")))
        .collect::<Result<_, _>>()?;

    let mut hist = Histogram::<u64>::new(3)?;
    let started = Instant::now();
    for d in 0..decisions {
        let (model_id, replicas) = &placements[d % models];
        let t0 = Instant::now();
        // Snapshot the model's replicas from the node table, then decide.
        let candidates = replicas
            .iter()
            .filter_map(|n| table.get(n).cloned())
            .collect();
        let input = RouteInput {
            model_id: model_id.clone(),
            request_id: requests[d % requests.len()].clone(),
            seed: 7,
            epoch: 1,
            config_hash: config_hash.clone(),
            domain_stake_enabled: true,
            domain_median_stake_micros: 25_000_000,
            candidates,
        };
        let decision = route(&input, &policy);
        let ns = t0.elapsed().as_nanos() as u64;
        std::hint::black_box(&decision);
        hist.record(ns.max(1))?;
    }
    let total = started.elapsed();
    println!(
        "route: {decisions} decisions over {nodes} nodes / {models} models (2 replicas): p50 {:.2} µs, p99 {:.2} µs, max {:.2} µs, {:.0} decisions/s",
        hist.value_at_quantile(0.50) as f64 / 1e3,
        hist.value_at_quantile(0.99) as f64 / 1e3,
        hist.max() as f64 / 1e3,
        decisions as f64 / total.as_secs_f64()
    );
    Ok(())
}

fn bench_fold(events: usize) -> anyhow::Result<()> {
    // Materialise the log first (as recorded rows), so only the fold is timed.
    let mut log = Vec::with_capacity(events + 16);
    let now = chrono::Utc::now();
    for append in History::new(spec_for(events))? {
        for (k, e) in append?.events.into_iter().enumerate() {
            log.push(RecordedEvent {
                global_position: log.len() as i64 + 1,
                event_id: e.event_id,
                stream_id: append_stream_placeholder(),
                stream_version: k as i64 + 1,
                event_type: e.event_type,
                schema_version: e.schema_version,
                payload: e.payload.into(),
                metadata: e.metadata.into(),
                occurred_at: e.occurred_at,
                recorded_at: now,
                prev_hash: Vec::new(),
                hash: Vec::new(),
            });
        }
    }
    let mut book = NodeBook::new(&PolicyConfig::default());
    let started = Instant::now();
    for e in &log {
        book.evolve(e).context("folding")?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "fold: {} events in {secs:.3} s = {:.0} events/s ({} nodes, {} executions)",
        log.len(),
        log.len() as f64 / secs,
        book.nodes().len(),
        book.executions().len()
    );
    Ok(())
}

/// The fold never reads `stream_id`; an empty one keeps the materialised log small.
fn append_stream_placeholder() -> String {
    String::new()
}

async fn seed(url: &str, events: usize, concurrency: usize) -> anyhow::Result<()> {
    let store = EventStore::connect(url, 16)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let started = Instant::now();
    let appends = History::new(spec_for(events))?;
    let results = futures::stream::iter(appends)
        .map(|append| {
            let store = store.clone();
            async move {
                let append = append?;
                store
                    .append(&append.stream, ExpectedVersion::Any, append.events)
                    .await
                    .map(|r| r.positions.len())
                    .map_err(anyhow::Error::from)
            }
        })
        .buffer_unordered(concurrency.max(1));
    futures::pin_mut!(results);
    let mut appended = 0usize;
    while let Some(n) = results.next().await {
        appended += n?;
    }
    let append_secs = started.elapsed().as_secs_f64();
    println!(
        "seed: appended {appended} events in {append_secs:.1} s ({:.0} events/s)",
        appended as f64 / append_secs
    );
    let started = Instant::now();
    let mut runner = ProjectionRunner::new(
        store.pool().clone(),
        BookProjection::new(&PolicyConfig::default()),
    )
    .with_batch(5_000);
    let checkpoint = runner.run_to_head().await?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "project: deepnode_book to {checkpoint} in {secs:.1} s ({:.0} events/s)",
        checkpoint as f64 / secs
    );
    Ok(())
}
