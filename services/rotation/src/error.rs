//! The rotation service's error type and its mapping onto the §2 reply codes. Store outages are
//! `unavailable` (safe to retry); a conflict stays a conflict and is never swallowed.

use deepnode_bus::envelope::{ErrorBody, ErrorCode};

/// What can go wrong running the rotation service or one of its rounds.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The event store failed (or the local view could not catch up with it).
    #[error("event store: {0}")]
    Store(#[from] deepnode_store::Error),
    /// Serving a subject failed.
    #[error("serving requests: {0}")]
    Serve(#[from] deepnode_bus::rpc::Error),
    /// Another round completed this epoch first (the `rotation` stream moved under us).
    #[error("epoch {epoch} was completed by another round")]
    EpochTaken {
        /// The epoch this round planned.
        epoch: u64,
    },
}

impl Error {
    /// The reply error for this failure.
    pub fn to_body(&self) -> ErrorBody {
        match self {
            Error::Store(e) => deepnode_runtime::store_error(e),
            Error::EpochTaken { .. } => ErrorBody::new(ErrorCode::Conflict, self.to_string()),
            Error::Serve(_) => ErrorBody::internal(self.to_string()),
        }
    }
}
