//! The JSON form of a stored event — on the bus (`deepnode.events.<event_type>`, CONTRACT §3) and in
//! an export's `events/*.jsonl` (docs/VERIFY.md): every column of the `events` row, hashes in hex.
//! [`to_bytes`] and [`from_slice`] are exact inverses.

use crate::log::RecordedEvent;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

#[derive(Serialize, Deserialize)]
struct WireEvent {
    global_position: i64,
    event_id: Uuid,
    stream_id: String,
    stream_version: i64,
    event_type: String,
    schema_version: i32,
    payload: Value,
    metadata: Value,
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

/// Serialises a stored event for the bus.
pub fn to_bytes(event: &RecordedEvent) -> Vec<u8> {
    let wire = WireEvent {
        global_position: event.global_position,
        event_id: event.event_id,
        stream_id: event.stream_id.clone(),
        stream_version: event.stream_version,
        event_type: event.event_type.clone(),
        schema_version: event.schema_version,
        payload: event.payload.clone(),
        metadata: event.metadata.clone(),
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
