//! The `deepnode-scheduler` binary: reads CONTRACT §1's environment, connects to Postgres (migrating
//! it) and NATS, runs the outbox relay beside the scheduler and the
//! `/metrics`, `/healthz`, `/readyz` listener (`DEEPNODE_METRICS_ADDR`), and on SIGINT/SIGTERM stops taking
//! requests, finishes those in flight, drains the NATS client and exits 0. A connection failure at
//! start exits 2 with one line. All behaviour lives in the library so tests run it in-process.

use std::process::ExitCode;

use anyhow::Context;
use deepnode_bus::Subjects;
use deepnode_runtime::observability::{self, ObservabilityOptions};
use deepnode_runtime::relay::{self, RelayOptions, RELAY_CHECKPOINT};
use deepnode_runtime::{ServiceContext, Settings, Shutdown};
use deepnode_scheduler::SchedulerOptions;

const PRODUCER: &str = "deepnode-scheduler";

#[tokio::main]
async fn main() -> ExitCode {
    deepnode_runtime::telemetry::init(PRODUCER);
    let (ctx, observe) = match connect().await {
        Ok(started) => started,
        Err(e) => {
            // One line: what we were doing and the root cause (inner errors repeat their sources).
            eprintln!("deepnode-scheduler: {e}: {}", e.root_cause());
            return ExitCode::from(2);
        }
    };
    match serve(ctx, observe).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("deepnode-scheduler: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn connect() -> anyhow::Result<(ServiceContext, ObservabilityOptions)> {
    let settings = Settings::from_env().context("reading settings")?;
    let observe =
        ObservabilityOptions::from_env(&[RELAY_CHECKPOINT]).context("reading settings")?;
    let ctx = ServiceContext::connect(&settings, PRODUCER, Subjects::new())
        .await
        .with_context(|| format!("connecting to Postgres and NATS at {}", settings.nats_url))?;
    Ok((ctx, observe))
}

async fn serve(ctx: ServiceContext, observe: ObservabilityOptions) -> anyhow::Result<()> {
    let shutdown = Shutdown::on_signals();
    observability::start(&ctx, observe, shutdown.clone())
        .await
        .context("starting the metrics listener")?;
    let relay = tokio::spawn(relay::run(
        ctx.store.clone(),
        ctx.js.clone(),
        ctx.subjects.clone(),
        RelayOptions::default(),
        shutdown.clone(),
    ));
    let client = ctx.nats.clone();
    let served = deepnode_scheduler::run(ctx, SchedulerOptions::default(), shutdown.clone()).await;
    shutdown.trigger();
    match relay.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "relay stopped with an error"),
        Err(e) => tracing::warn!(error = %e, "relay task failed"),
    }
    client.drain().await.context("draining the NATS client")?;
    served.context("running the scheduler")
}
