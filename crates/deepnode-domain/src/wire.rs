//! The JSON form of a stored event — on the bus (`deepnode.events.<event_type>`, CONTRACT §3) and in
//! an export's `events/*.jsonl` (docs/VERIFY.md): every column of the `events` row, hashes in hex.
//! [`to_bytes`] and [`from_slice`] are exact inverses.

use crate::log::{RecordedEvent, StoredJson};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// The message as read. [`WireEventRef`] writes the same fields, in the same order, borrowed.
#[derive(Deserialize)]
struct WireEvent {
    global_position: i64,
    event_id: Uuid,
    stream_id: String,
    stream_version: i64,
    event_type: String,
    schema_version: i32,
    payload: StoredJson,
    metadata: StoredJson,
    occurred_at: DateTime<Utc>,
    recorded_at: DateTime<Utc>,
    prev_hash: String,
    hash: String,
}

/// The message as written, borrowing the event and the canonical trees of its bodies.
#[derive(Serialize)]
struct WireEventRef<'a> {
    global_position: i64,
    event_id: Uuid,
    stream_id: &'a str,
    stream_version: i64,
    event_type: &'a str,
    schema_version: i32,
    payload: &'a Value,
    metadata: &'a Value,
    occurred_at: DateTime<Utc>,
    recorded_at: DateTime<Utc>,
    prev_hash: String,
    hash: String,
}

/// Why a message is not a stored event.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("not a stored event: {0}")]
    Json(#[from] serde_json::Error),
    #[error("not a stored event: bad hex in {field}")]
    Hex { field: &'static str },
}

/// Serialises a stored event for the bus. The payload and metadata are written in their canonical
/// form (keys sorted, no spaces) whatever text they were read as, so the bytes of an event are the
/// same whether it came from the database or the bus.
pub fn to_bytes(event: &RecordedEvent) -> Vec<u8> {
    let (payload, metadata) = (event.payload.to_value(), event.metadata.to_value());
    let wire = WireEventRef {
        global_position: event.global_position,
        event_id: event.event_id,
        stream_id: &event.stream_id,
        stream_version: event.stream_version,
        event_type: &event.event_type,
        schema_version: event.schema_version,
        payload: &payload,
        metadata: &metadata,
        occurred_at: event.occurred_at,
        recorded_at: event.recorded_at,
        prev_hash: hex::encode(&event.prev_hash),
        hash: hex::encode(&event.hash),
    };
    serde_json::to_vec(&wire).expect("a stored event serialises: plain data with string keys")
}

/// Parses a stored event received from the bus.
pub fn from_slice(bytes: &[u8]) -> Result<RecordedEvent, WireError> {
    let w: WireEvent = serde_json::from_slice(bytes)?;
    Ok(RecordedEvent {
        global_position: w.global_position,
        event_id: w.event_id,
        stream_id: w.stream_id,
        stream_version: w.stream_version,
        event_type: w.event_type,
        schema_version: w.schema_version,
        payload: w.payload,
        metadata: w.metadata,
        occurred_at: w.occurred_at,
        recorded_at: w.recorded_at,
        prev_hash: hex::decode(&w.prev_hash).map_err(|_| WireError::Hex { field: "prev_hash" })?,
        hash: hex::decode(&w.hash).map_err(|_| WireError::Hex { field: "hash" })?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    fn event() -> RecordedEvent {
        let at = Utc.with_ymd_and_hms(2026, 11, 30, 12, 0, 0).unwrap();
        RecordedEvent {
            global_position: 7,
            event_id: Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
            stream_id: "node-n1".to_owned(),
            stream_version: 2,
            event_type: "NodeRegistered".to_owned(),
            schema_version: 1,
            payload: json!({"node_id": "n1", "capacity": 4}).into(),
            metadata: json!({"producer": "test"}).into(),
            occurred_at: at,
            recorded_at: at,
            prev_hash: vec![0xab; 2],
            hash: vec![0xcd; 2],
        }
    }

    /// The bus's and the export's format: fields in this order, bodies with sorted keys, hashes in hex.
    #[test]
    fn a_stored_event_is_written_as_it_always_was() {
        let bytes = to_bytes(&event());
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"{"global_position":7,"event_id":"01234567-89ab-cdef-0123-456789abcdef","stream_id":"node-n1","stream_version":2,"event_type":"NodeRegistered","schema_version":1,"payload":{"capacity":4,"node_id":"n1"},"metadata":{"producer":"test"},"occurred_at":"2026-11-30T12:00:00Z","recorded_at":"2026-11-30T12:00:00Z","prev_hash":"abab","hash":"cdcd"}"#
        );
        assert_eq!(from_slice(&bytes).unwrap(), event());
    }

    /// A body read from the database is jsonb's text (its own key order, spaces): on the bus it is
    /// the canonical form all the same.
    #[test]
    fn a_body_read_as_jsonb_text_is_written_in_canonical_form() {
        let mut from_db = event();
        from_db.payload =
            StoredJson::from_text(r#"{"node_id": "n1", "capacity": 4}"#.into()).unwrap();
        assert_ne!(from_db.payload.text(), event().payload.text());
        assert_eq!(to_bytes(&from_db), to_bytes(&event()));
    }
}
