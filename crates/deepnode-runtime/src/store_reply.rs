//! The one mapping of an event-store failure onto the CONTRACT §2 reply codes, shared by every
//! service so the same failure always gets the same code (and the same log level).

use deepnode_bus::envelope::{ErrorBody, ErrorCode};
use deepnode_store::Error;

/// The §2 answer to `e`: the stream moved or an id was reused → `conflict`; the event would break a
/// limit of the log → `bad_request`; the store is away, behind or shutting down → `unavailable`
/// (safe to retry); anything else is a bug on our side → `internal`. Logged once here, as a warning
/// when it is worth a retry and as an error when it is a bug.
pub fn store_error(e: &Error) -> ErrorBody {
    let body = match e {
        Error::Conflict { .. } | Error::EventIdReused { .. } => {
            ErrorBody::new(ErrorCode::Conflict, e.to_string())
        }
        Error::Invalid(reason) => ErrorBody::bad_request(format!("the log refuses it: {reason}")),
        Error::Unavailable(_) | Error::Lagging { .. } | Error::Closed => {
            ErrorBody::unavailable(format!("the event store is unavailable; retry: {e}"))
        }
        Error::EmptyAppend
        | Error::DuplicateInAppend { .. }
        | Error::Database(_)
        | Error::Migration(_)
        | Error::Decode { .. }
        | Error::Internal(_) => ErrorBody::internal(format!("event store failure: {e}")),
    };
    match body.code {
        ErrorCode::Internal => tracing::error!(error = %e, "event store failure"),
        ErrorCode::Unavailable => tracing::warn!(error = %e, "event store unavailable"),
        _ => tracing::debug!(error = %e, "event store refused"),
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use deepnode_store::ExpectedVersion;

    #[test]
    fn each_failure_has_one_code() {
        let conflict = Error::Conflict {
            stream: "node-n1".into(),
            expected: ExpectedVersion::Exact(1),
            actual: 2,
        };
        assert_eq!(store_error(&conflict).code, ErrorCode::Conflict);
        assert_eq!(
            store_error(&Error::EventIdReused {
                event_id: uuid::Uuid::nil()
            })
            .code,
            ErrorCode::Conflict
        );
        assert_eq!(
            store_error(&Error::Lagging { position: 7 }).code,
            ErrorCode::Unavailable
        );
        assert_eq!(store_error(&Error::Closed).code, ErrorCode::Unavailable);
        let database = Error::Database(std::sync::Arc::new(sqlx::Error::RowNotFound));
        assert_eq!(store_error(&database).code, ErrorCode::Internal);
        assert_eq!(
            store_error(&Error::Internal("test")).code,
            ErrorCode::Internal
        );
        let outage = Error::from(sqlx::Error::PoolTimedOut);
        assert_eq!(store_error(&outage).code, ErrorCode::Unavailable);
    }
}
