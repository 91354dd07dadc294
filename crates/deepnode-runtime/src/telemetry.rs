//! Tracing set-up: `RUST_LOG` filters (default `info`), `DEEPNODE_LOG_FORMAT=json` switches to JSON
//! lines for log shippers. Logs go to stderr so stdout stays for a command's own output.

use tracing_subscriber::EnvFilter;

use crate::settings::LogFormat;

/// Installs the global subscriber once; later calls are no-ops (tests start many services).
pub fn init(service: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = format == LogFormat::Json;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.compact().try_init()
    };
    if installed.is_ok() {
        tracing::debug!(service, "tracing initialised");
    }
}
