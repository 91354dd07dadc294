//! `deepnode sim` (CONTRACT §7): runs `--nodes` simulated inference nodes in this process, each
//! answering `deepnode.node.<id>.infer` with a log-normal latency around `--latency-ms` and the
//! given error, timeout and invalid-output rates, registers them through `cmd.node.register` (an
//! existing registration answers `conflict`, which is fine), prints a one-line summary every 5 s and
//! the totals when Ctrl-C (or SIGTERM, or `--duration`) stops it.
//!
//! It does not deploy models or send traffic (that is `deepnode up`), and it never touches the
//! database: it is the black-box node the scheduler sees.

use std::time::Duration;

use anyhow::Context as _;
use deepnode_bus::Subjects;
use deepnode_domain::ids::NodeId;
use deepnode_sim::{Behaviour, Counters, Latency, Sim, SimConfig, SimNode};

use super::Outcome;
use crate::cli::{Cli, SimArgs};
use crate::context;

/// How often a summary line is printed.
const REPORT_EVERY: Duration = Duration::from_secs(5);

/// The behaviour every simulated node gets from the flags.
pub fn behaviour(args: &SimArgs) -> Behaviour {
    let latency = if args.latency_ms == 0 {
        Latency::Fixed(Duration::ZERO)
    } else {
        Latency::LogNormal {
            median: Duration::from_millis(args.latency_ms),
            sigma: 0.5,
        }
    };
    Behaviour {
        error_rate: args.error_rate,
        timeout_rate: args.timeout_rate,
        invalid_rate: args.invalid_rate,
        ..Behaviour::healthy(latency)
    }
}

/// The fleet the flags describe.
fn fleet(args: &SimArgs) -> anyhow::Result<SimConfig> {
    let behaviour = behaviour(args);
    let nodes = (0..args.nodes)
        .map(|i| {
            let id = NodeId::parse(&format!("{}-{i}", args.prefix))
                .with_context(|| format!("--prefix {:?} makes an invalid node id", args.prefix))?;
            let mut node = SimNode::new(id, args.domain.clone()).with_behaviour(behaviour.clone());
            node.stake = args.stake;
            node.capacity = args.capacity;
            Ok(node)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(SimConfig {
        nodes,
        seed: args.seed,
        register: true,
        ..SimConfig::default()
    })
}

/// Runs the fleet until a signal or the duration ends.
pub async fn run(cli: &Cli, args: &SimArgs) -> anyhow::Result<Outcome> {
    let config = fleet(args)?;
    let client = context::connect_nats(cli, "deepnode-sim").await?;
    let shutdown = deepnode_runtime::shutdown::on_signals();
    println!(
        "sim: starting {} nodes {}-0..{}-{} in domain {:?} (latency ~{} ms, error {}, timeout {}, invalid {})",
        args.nodes,
        args.prefix,
        args.prefix,
        args.nodes.saturating_sub(1),
        args.domain,
        args.latency_ms,
        args.error_rate,
        args.timeout_rate,
        args.invalid_rate
    );
    let sim = Sim::start(client.clone(), Subjects::new(), config)
        .await
        .context("starting the simulated nodes (is `deepnode-reputation` running?)")?;
    println!(
        "sim: {} nodes registered and answering; Ctrl-C stops",
        sim.node_ids().len()
    );

    let started = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval_at(started + REPORT_EVERY, REPORT_EVERY);
    let mut last = Counters::default();
    loop {
        let deadline = async {
            match args.duration {
                Some(d) => tokio::time::sleep_until(started + d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = deadline => break,
            _ = ticker.tick() => {
                let now = sim.totals();
                println!("sim: {}", line(&delta(&now, &last), REPORT_EVERY, &now));
                last = now;
            }
        }
    }
    let totals = sim.totals();
    sim.stop().await;
    if let Err(e) = client.drain().await {
        eprintln!("deepnode: draining NATS: {e}");
    }
    println!(
        "sim: stopped after {:.0}s; totals: {} requests, {} ok, {} errors, {} timeouts, {} invalid, {} heartbeats",
        started.elapsed().as_secs_f64(),
        totals.requests,
        totals.ok,
        totals.errors,
        totals.timeouts,
        totals.invalid,
        totals.heartbeats
    );
    Ok(Outcome::Clean)
}

/// `now - before`, counter by counter.
fn delta(now: &Counters, before: &Counters) -> Counters {
    Counters {
        requests: now.requests.saturating_sub(before.requests),
        ok: now.ok.saturating_sub(before.ok),
        errors: now.errors.saturating_sub(before.errors),
        timeouts: now.timeouts.saturating_sub(before.timeouts),
        invalid: now.invalid.saturating_sub(before.invalid),
        late: now.late.saturating_sub(before.late),
        duplicates: now.duplicates.saturating_sub(before.duplicates),
        heartbeats: now.heartbeats.saturating_sub(before.heartbeats),
    }
}

/// One summary line: the window's rate and outcomes, then the running total.
fn line(window: &Counters, span: Duration, total: &Counters) -> String {
    format!(
        "{:.1} req/s | last {}s: {} requests, {} ok, {} errors, {} timeouts, {} invalid | total {} requests",
        window.requests as f64 / span.as_secs_f64(),
        span.as_secs(),
        window.requests,
        window.ok,
        window.errors,
        window.timeouts,
        window.invalid,
        total.requests
    )
}
