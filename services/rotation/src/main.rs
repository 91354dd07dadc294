//! The `deepnode-rotation` binary: CONTRACT §1's environment (or the same as flags) in, the rotation service (plus the outbox
//! relay and the `/metrics`, `/healthz`, `/readyz` listener) until SIGINT/SIGTERM, then a clean drain
//! and exit 0; a start-up failure exits 2 with one line (see `deepnode_runtime::host`). All behaviour
//! lives in the library.

use std::process::ExitCode;

use deepnode_rotation::{run, RotationOptions};
use deepnode_runtime::host::{run_service, ServiceSpec};

#[tokio::main]
async fn main() -> ExitCode {
    let spec = ServiceSpec {
        binary: "deepnode-rotation",
        gated_checkpoints: &[],
        signs: false,
    };
    run_service(spec, |ctx, _log_key, shutdown| {
        run(ctx, RotationOptions::default(), shutdown)
    })
    .await
}
