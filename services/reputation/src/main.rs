//! The `deepnode-reputation` binary: CONTRACT §1's environment (or the same as flags) in, the reputation service (plus the
//! outbox relay and the `/metrics`, `/healthz`, `/readyz` listener, ready only while the SQL
//! projection and the outcome assessment keep up) until SIGINT/SIGTERM, then a clean drain and exit 0; a start-up failure exits
//! 2 with one line (see `deepnode_runtime::host`). All behaviour lives in the library.

use std::process::ExitCode;

use deepnode_projections::BOOK_PROJECTION;
use deepnode_reputation::{ReputationOptions, OUTCOMES_CHECKPOINT};
use deepnode_runtime::host::{run_service, ServiceSpec};

#[tokio::main]
async fn main() -> ExitCode {
    let spec = ServiceSpec {
        binary: "deepnode-reputation",
        gated_checkpoints: &[BOOK_PROJECTION, OUTCOMES_CHECKPOINT],
        signs: true,
    };
    run_service(spec, |ctx, log_key, shutdown| {
        let mut options = ReputationOptions::from_policy(&ctx.policy);
        options.log_key = log_key;
        deepnode_reputation::run(ctx, options, shutdown)
    })
    .await
}
