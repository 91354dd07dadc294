//! The store's one error type. Conflicts and bad input are typed so callers can answer them precisely
//! (`conflict`, `bad_request`); anything that means "the database is not there right now" is
//! [`Error::Unavailable`], which callers may retry.

use std::sync::Arc;

use deepnode_domain::log::{ExpectedVersion, LogError};
use uuid::Uuid;

/// What can go wrong talking to the event store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The event or stream id was refused before anything was written.
    #[error("invalid event: {0}")]
    Invalid(#[from] LogError),
    /// An append carried no events.
    #[error("an append must carry at least one event")]
    EmptyAppend,
    /// The same event id appears twice in one append.
    #[error("event id {event_id} appears more than once in one append")]
    DuplicateInAppend { event_id: Uuid },
    /// Optimistic concurrency: the stream is not at the version the appender expected.
    #[error("wrong expected version on stream {stream}: expected {expected}, actual {actual}")]
    Conflict {
        stream: String,
        expected: ExpectedVersion,
        actual: i64,
    },
    /// An event id was appended before with a different body (or only some ids of an append exist).
    #[error(
        "event id {event_id} was already appended with a different body or in a different append"
    )]
    EventIdReused { event_id: Uuid },
    /// The database could not be reached or the connection was lost; safe to retry.
    #[error("event store unavailable: {0}")]
    Unavailable(#[source] Arc<sqlx::Error>),
    /// Any other database error.
    #[error("database error: {0}")]
    Database(#[source] Arc<sqlx::Error>),
    /// Migrating or creating the database failed.
    #[error("migration failed: {0}")]
    Migration(String),
    /// A stored event could not be understood (unknown type, newer schema, corrupt row).
    #[error("event at position {position}: {reason}")]
    Decode { position: i64, reason: String },
    /// A follower's state did not reach a position in time (it is behind or the database is slow).
    #[error("the local view has not reached position {position} yet")]
    Lagging { position: i64 },
    /// The store's background writer is gone (the store is shutting down).
    #[error("the event store is shutting down")]
    Closed,
    /// The store broke one of its own invariants (e.g. the append function left an append
    /// unanswered): a bug, not an outage.
    #[error("event store bug: {0}")]
    Internal(&'static str),
}

impl Error {
    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unavailable(_) | Error::Lagging { .. })
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        if is_transient(&e) {
            Error::Unavailable(Arc::new(e))
        } else {
            Error::Database(Arc::new(e))
        }
    }
}

/// Connection loss, pool exhaustion, server shutdown or serialisation failures: worth a retry.
pub(crate) fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") // connection exception
                || code.starts_with("57P") // admin/crash shutdown, cannot connect now
                || code == "53300" // too many connections
                || code == "55000" // e.g. the database does not accept connections now
                || code == "40001" // serialization failure
                || code == "40P01" // deadlock detected
        }),
        _ => false,
    }
}
