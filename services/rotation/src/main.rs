//! `deepnode-rotation`: reads CONTRACT §1's environment, connects (migrating the database), runs the
//! log-to-bus relay, the metrics/health listener (`DEEPNODE_METRICS_ADDR`) and the rotation service
//! until SIGINT/SIGTERM, then drains and exits 0. A start-up failure prints one line and exits 2.
//! All behaviour lives in the library.

use std::process::ExitCode;

use anyhow::Context;
use deepnode_bus::subjects::Subjects;
use deepnode_rotation::{run, RotationOptions};
use deepnode_runtime::observability::{self, ObservabilityOptions};
use deepnode_runtime::relay::{self, RelayOptions, RELAY_CHECKPOINT};
use deepnode_runtime::{telemetry, ServiceContext, Settings, Shutdown};

const SERVICE: &str = "rotation";

async fn connect() -> anyhow::Result<(ServiceContext, ObservabilityOptions)> {
    let settings = Settings::from_env().context("reading settings")?;
    let observe =
        ObservabilityOptions::from_env(&[RELAY_CHECKPOINT]).context("reading settings")?;
    let ctx = ServiceContext::connect(&settings, SERVICE, Subjects::new())
        .await
        .with_context(|| {
            format!(
                "connecting to Postgres at {} and NATS at {}",
                settings.database_url, settings.nats_url
            )
        })?;
    Ok((ctx, observe))
}

#[tokio::main]
async fn main() -> ExitCode {
    telemetry::init(SERVICE);
    let (ctx, observe) = match connect().await {
        Ok(started) => started,
        Err(e) => {
            // The context line plus the root cause: one line, without the repeated middle of the chain.
            eprintln!("deepnode-rotation: {e}: {}", e.root_cause());
            return ExitCode::from(2);
        }
    };
    let shutdown = Shutdown::on_signals();
    if let Err(e) = observability::start(&ctx, observe, shutdown.clone()).await {
        eprintln!("deepnode-rotation: starting the metrics listener: {e}");
        return ExitCode::from(2);
    }
    let relay = tokio::spawn(relay::run(
        ctx.store.clone(),
        ctx.js.clone(),
        ctx.subjects.clone(),
        RelayOptions::default(),
        shutdown.clone(),
    ));
    let result = run(ctx.clone(), RotationOptions::default(), shutdown.clone()).await;
    shutdown.trigger();
    match relay.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "relay stopped with an error"),
        Err(e) => tracing::warn!(error = %e, "relay task failed"),
        Ok(Ok(())) => {}
    }
    if let Err(e) = ctx.nats.drain().await {
        tracing::warn!(error = %e, "draining NATS failed");
    }
    ctx.store.pool().close().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("deepnode-rotation: {e}");
            ExitCode::from(1)
        }
    }
}
