//! The crate's error type: either the store failed, or the log holds an event this binary cannot
//! fold (unknown type, newer schema, payload not matching its schema) — named by its position.

use deepnode_domain::events::DecodeError;

/// What can go wrong replaying, projecting or auditing.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The event store (database) failed.
    #[error(transparent)]
    Store(#[from] deepnode_store::Error),
    /// The event at `position` cannot be folded; the fold stops there rather than skip it.
    #[error("event at position {position} cannot be folded: {source}")]
    Decode {
        /// Global position of the event.
        position: i64,
        /// Why it could not be decoded.
        source: DecodeError,
    },
    /// An export's files could not be written or read (path and reason).
    #[error("export: {0}")]
    Export(String),
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Store(e.into())
    }
}

impl Error {
    /// The position of the event that stopped the fold, if that is what happened.
    pub fn position(&self) -> Option<i64> {
        match self {
            Error::Decode { position, .. } => Some(*position),
            Error::Store(deepnode_store::Error::Decode { position, .. }) => Some(*position),
            Error::Store(_) | Error::Export(_) => None,
        }
    }
}
