//! deepnode's read side: the SQL projections of CONTRACT §5 (`node_reputation`, `deployments`,
//! `executions`) kept by one [`BookProjection`], and the two ways of checking them against the log —
//! [`replay()`] (fold the log up to a position or an instant, in memory) and [`audit()`] (verify the
//! hash chain, recompute every projection and diff it against the stored tables).
//!
//! All three fold the log with the same function, `deepnode_domain::book::NodeBook::evolve`, so a
//! projection, a replay and an audit of the same events with the same policy agree bit for bit. This
//! crate owns no policy and makes no decisions; it only moves the book's row views in and out of SQL.
//! Reading the log is always streamed (`EventStore::stream_all`): memory grows with the number of
//! nodes, deployments and executions, never with the number of events.

mod audit;
mod error;
pub mod export;
mod projection;
mod replay;
mod rows;
pub mod synthetic;
pub mod tree;

pub use audit::{
    audit, audit_export, AuditProgress, AuditReport, Difference, DifferenceKind, MAX_LISTED,
};
pub use error::Error;
pub use export::{ExportDir, LogSource};
pub use projection::{BookProjection, BOOK_PROJECTION};
pub use replay::{replay, replay_from, ReplayProgress, Until};
pub use rows::{load_deployments, load_executions, load_nodes};
