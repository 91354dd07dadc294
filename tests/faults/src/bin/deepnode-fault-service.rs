//! `deepnode-fault-service <scheduler|reputation|rotation> --prefix P`: runs one deepnode service and
//! the outbox relay beside it, through the services' library `run` functions, on the subject prefix
//! `P` (reading `DATABASE_URL`, `NATS_URL` and `DEEPNODE_CONFIG` like the real binaries). The fault
//! tests start it as a child process so they can `kill -9` a real process; it deliberately adds no
//! behaviour of its own beyond a shorter relay lease retry (250 ms) so takeovers are quick to observe.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use deepnode_bus::Subjects;
use deepnode_reputation::ReputationOptions;
use deepnode_rotation::RotationOptions;
use deepnode_runtime::relay::{self, RelayOptions};
use deepnode_runtime::{ServiceContext, Settings};
use deepnode_scheduler::SchedulerOptions;

const USAGE: &str = "usage: deepnode-fault-service <scheduler|reputation|rotation> --prefix P";

#[tokio::main]
async fn main() -> ExitCode {
    deepnode_runtime::telemetry::init("deepnode-fault-service");
    match serve().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("deepnode-fault-service: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn serve() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (service, prefix) = match args.as_slice() {
        [service, flag, prefix] if flag == "--prefix" => (service.clone(), prefix.clone()),
        _ => bail!("{USAGE}"),
    };
    if !["scheduler", "reputation", "rotation"].contains(&service.as_str()) {
        bail!("unknown service {service:?}; {USAGE}");
    }
    let subjects = Subjects::with_prefix(&prefix).context("reading --prefix")?;
    let settings = Settings::from_env().context("reading settings")?;
    let producer = format!("fault-{service}");
    let ctx = ServiceContext::connect(&settings, &producer, subjects)
        .await
        .with_context(|| format!("connecting to Postgres and NATS at {}", settings.nats_url))?;
    let shutdown = deepnode_runtime::shutdown::on_signals();
    let relay_options = RelayOptions {
        lease_retry: Duration::from_millis(250),
        poll: Duration::from_millis(200),
        ..RelayOptions::default()
    };
    let relay = tokio::spawn(relay::run(
        ctx.store.clone(),
        ctx.js.clone(),
        ctx.subjects.clone(),
        relay_options,
        shutdown.clone(),
    ));
    let nats = ctx.nats.clone();
    let result = match service.as_str() {
        "scheduler" => deepnode_scheduler::run(ctx, SchedulerOptions::default(), shutdown.clone())
            .await
            .context("running the scheduler"),
        "reputation" => {
            let options = ReputationOptions::from_policy(&ctx.policy);
            deepnode_reputation::run(ctx, options, shutdown.clone())
                .await
                .context("running the reputation service")
        }
        _ => deepnode_rotation::run(ctx, RotationOptions::default(), shutdown.clone())
            .await
            .context("running the rotation service"),
    };
    shutdown.cancel();
    match relay.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "relay stopped with an error"),
        Err(e) => tracing::warn!(error = %e, "relay task failed"),
    }
    if let Err(e) = nats.drain().await {
        tracing::warn!(error = %e, "draining NATS");
    }
    result
}
