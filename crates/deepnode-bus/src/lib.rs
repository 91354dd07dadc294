//! deepnode's NATS bus: the one place where subject names are built ([`subjects`]), the §2 reply
//! envelope and command parsing ([`envelope`]), JetStream stream/consumer setup and deduplicated
//! publishing ([`jetstream`]), queue-group request/reply serving ([`rpc`]) and connecting with
//! retries ([`connect()`]).
//!
//! It deliberately knows nothing about the event log, Postgres or the domain's decisions: services
//! put those together. The only domain types it touches are the id newtypes used in subjects.

pub mod connect;
pub mod envelope;
pub mod jetstream;
pub mod rpc;
pub mod subjects;

pub use connect::{connect, connect_with, ConnectPolicy};
pub use envelope::{parse_command, ErrorBody, ErrorCode, Reply, MAX_COMMAND_BYTES};
pub use rpc::{request_bytes, request_json, serve, serve_with_limit, Request, CORRELATION_HEADER};
pub use subjects::Subjects;

/// Re-exported so callers name the same `async-nats` version as the bus.
pub use async_nats;
