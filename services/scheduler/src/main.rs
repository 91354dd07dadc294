//! The `deepnode-scheduler` binary: CONTRACT §1's environment (or the same as flags) in, the scheduler (plus the outbox relay
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
        gated_checkpoints: &[],
        signs: true,
    };
    run_service(spec, |ctx, log_key, shutdown| {
        let options = SchedulerOptions {
            log_key,
            ..SchedulerOptions::default()
        };
        deepnode_scheduler::run(ctx, options, shutdown)
    })
    .await
}
