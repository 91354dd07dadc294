//! The shell every deepnode process shares: where to find Postgres and NATS and the policy
//! ([`Settings`]), tracing set-up, the shutdown signal, the wire form of stored events, the
//! log-to-bus [`relay`], and the [`observability`] listener (`/metrics`, `/healthz`, `/readyz`).
//! Services stay thin: parse settings, connect, run, drain.
//!
//! Nothing here decides anything about nodes or requests; that is `deepnode-domain`'s job.

pub mod clock;
pub mod context;
pub mod host;
pub mod lease;
pub mod observability;
pub mod relay;
pub mod settings;
pub mod shutdown;
pub mod store_reply;
pub mod tail;
pub mod telemetry;
/// The JSON form of a stored event (defined in `deepnode_domain::wire`).
pub use deepnode_domain::wire;

pub use clock::Clock;
pub use context::{ConnectError, ServiceContext};
pub use observability::{Observability, ObservabilityOptions};
pub use settings::{Settings, SettingsError};
pub use shutdown::Shutdown;
pub use store_reply::store_error;
