//! The `deepnode-scheduler` binary: CONTRACT §1's environment in, the scheduler (plus the outbox relay
//! and the `/metrics`, `/healthz`, `/readyz` listener) until SIGINT/SIGTERM, then a clean drain and exit
//! 0; a start-up failure exits 2 with one line (see `deepnode_runtime::host`). All behaviour lives in
//! the library so tests run it in-process.

use std::process::ExitCode;

use deepnode_runtime::host::{run_service, ServiceSpec};
use deepnode_scheduler::SchedulerOptions;

#[tokio::main]
async fn main() -> ExitCode {
    let spec = ServiceSpec {
        binary: "deepnode-scheduler",
        producer: "deepnode-scheduler",
        gated_checkpoints: &[],
    };
    run_service(spec, |ctx, shutdown| {
        deepnode_scheduler::run(ctx, SchedulerOptions::default(), shutdown)
    })
    .await
}
