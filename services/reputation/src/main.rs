//! The `deepnode-reputation` binary: reads CONTRACT §1's environment, connects (migrating the
//! database), runs the log-to-bus relay and the metrics/health listener
//! (`DEEPNODE_METRICS_ADDR`) beside the service, and on SIGINT/SIGTERM stops taking
//! work, finishes what is in flight, drains NATS and exits 0. A usage or connection error exits 2
//! with one line. All behaviour lives in the library so tests run it in-process.

use anyhow::Context;
use deepnode_bus::Subjects;
use deepnode_projections::BOOK_PROJECTION;
use deepnode_reputation::ReputationOptions;
use deepnode_runtime::observability::{self, ObservabilityOptions};
use deepnode_runtime::relay::{self, RelayOptions, RELAY_CHECKPOINT};
use deepnode_runtime::{telemetry, ServiceContext, Settings, Shutdown};

const PRODUCER: &str = "reputation";

async fn start() -> anyhow::Result<(ServiceContext, ObservabilityOptions)> {
    let settings = Settings::from_env().context("reading the environment")?;
    let observe = ObservabilityOptions::from_env(&[RELAY_CHECKPOINT, BOOK_PROJECTION])
        .context("reading the environment")?;
    let ctx = ServiceContext::connect(&settings, PRODUCER, Subjects::new())
        .await
        .with_context(|| {
            format!(
                "connecting to the event store and NATS at {}",
                settings.nats_url
            )
        })?;
    Ok((ctx, observe))
}

#[tokio::main]
async fn main() {
    telemetry::init(PRODUCER);
    let (ctx, observe) = match start().await {
        Ok(started) => started,
        Err(e) => {
            eprintln!("deepnode-reputation: {e}: {}", e.root_cause());
            std::process::exit(2);
        }
    };
    let shutdown = Shutdown::on_signals();
    if let Err(e) = observability::start(&ctx, observe, shutdown.clone()).await {
        eprintln!("deepnode-reputation: starting the metrics listener: {e}");
        std::process::exit(2);
    }
    let relay = tokio::spawn(relay::run(
        ctx.store.clone(),
        ctx.js.clone(),
        ctx.subjects.clone(),
        RelayOptions::default(),
        shutdown.clone(),
    ));
    let options = ReputationOptions::from_policy(&ctx.policy);
    let nats = ctx.nats.clone();
    let result = deepnode_reputation::run(ctx, options, shutdown.clone()).await;
    shutdown.trigger();
    if let Ok(Err(e)) = relay.await {
        tracing::error!(error = %e, "relay failed");
    }
    if let Err(e) = nats.drain().await {
        tracing::warn!(error = %e, "draining NATS");
    }
    if let Err(e) = result {
        eprintln!("deepnode-reputation: {e}");
        std::process::exit(1);
    }
}
