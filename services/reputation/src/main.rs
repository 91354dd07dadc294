//! The `deepnode-reputation` binary: CONTRACT §1's environment in, the reputation service (plus the
//! outbox relay and the `/metrics`, `/healthz`, `/readyz` listener, ready only while the SQL
//! projection keeps up) until SIGINT/SIGTERM, then a clean drain and exit 0; a start-up failure exits
//! 2 with one line (see `deepnode_runtime::host`). All behaviour lives in the library.

use std::process::ExitCode;

use deepnode_projections::BOOK_PROJECTION;
use deepnode_reputation::ReputationOptions;
use deepnode_runtime::host::{run_service, ServiceSpec};

#[tokio::main]
async fn main() -> ExitCode {
    let spec = ServiceSpec {
        binary: "deepnode-reputation",
        gated_checkpoints: &[BOOK_PROJECTION],
    };
    let log_key = match deepnode_runtime::settings::log_key_from_env() {
        Ok(key) => key,
        Err(e) => {
            eprintln!("deepnode-reputation: {e}");
            return ExitCode::from(2);
        }
    };
    run_service(spec, move |ctx, shutdown| {
        let mut options = ReputationOptions::from_policy(&ctx.policy);
        options.log_key = log_key.clone();
        deepnode_reputation::run(ctx, options, shutdown)
    })
    .await
}
