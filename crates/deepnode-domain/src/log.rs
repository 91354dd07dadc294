//! The shape of the event log, shared by the writer (`deepnode-store`) and every reader (projections,
//! replay, audit): stream ids, expected versions, new and recorded events, and the hash chain.
//!
//! This module is pure: it defines how a row is turned into the canonical bytes that the SHA-256 chain
//! covers, so that the store (which computes the hash inside the appending transaction) and the auditor
//! (which recomputes it from what it reads back) agree bit for bit. It does no IO and reads no clock.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Longest accepted stream id. Stream ids are `<kind>-<id>` and ids are at most 128 characters, so the
/// bound leaves room for the prefix.
pub const MAX_STREAM_ID_LEN: usize = 200;

/// Largest accepted event body (payload + metadata, serialised), in bytes.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// The `prev_hash` of the very first event in the log.
pub const GENESIS_HASH: [u8; 32] = [0u8; 32];

/// Why an id, stream id or event body was refused before anything was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    #[error("stream id must not be empty")]
    EmptyStreamId,
    #[error("stream id is {len} characters long; the limit is {max}")]
    StreamIdTooLong { len: usize, max: usize },
    #[error("stream id {0:?} contains a character outside [A-Za-z0-9._:-]")]
    StreamIdCharset(String),
    #[error("event type {0:?} must be a non-empty PascalCase identifier")]
    BadEventType(String),
    #[error("schema_version must be at least 1, got {0}")]
    BadSchemaVersion(i32),
    #[error("event {field} must be a JSON object")]
    NotAnObject { field: &'static str },
    #[error("event body is {size} bytes; the limit is {max}")]
    TooLarge { size: usize, max: usize },
    #[error("event {field} contains a NUL character, which PostgreSQL jsonb cannot store")]
    NulCharacter { field: &'static str },
}

/// Returns true for the characters the contract allows in ids: `[A-Za-z0-9._:-]`.
pub fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

/// A validated stream id such as `node-n1` or `exec-r42`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StreamId(String);

impl StreamId {
    /// Parses a stream id: non-empty, at most [`MAX_STREAM_ID_LEN`] characters of `[A-Za-z0-9._:-]`.
    pub fn parse(raw: &str) -> Result<StreamId, LogError> {
        if raw.is_empty() {
            return Err(LogError::EmptyStreamId);
        }
        let len = raw.chars().count();
        if len > MAX_STREAM_ID_LEN {
            return Err(LogError::StreamIdTooLong {
                len,
                max: MAX_STREAM_ID_LEN,
            });
        }
        if !raw.chars().all(is_id_char) {
            return Err(LogError::StreamIdCharset(raw.to_owned()));
        }
        Ok(StreamId(raw.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for StreamId {
    type Error = LogError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        StreamId::parse(&value)
    }
}

impl From<StreamId> for String {
    fn from(value: StreamId) -> Self {
        value.0
    }
}

/// What the appender believes about the stream's current version (optimistic concurrency).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpectedVersion {
    /// Append whatever the stream's version is.
    Any,
    /// The stream must not exist yet (it has no events).
    NoStream,
    /// The stream's last event must have exactly this version (`>= 1`).
    Exact(i64),
}

impl ExpectedVersion {
    /// Whether a stream currently at `actual` (0 = no events) satisfies this expectation.
    pub fn matches(self, actual: i64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual == 0,
            ExpectedVersion::Exact(v) => v == actual,
        }
    }
}

impl std::fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::Exact(v) => write!(f, "{v}"),
        }
    }
}

/// An event to append: everything but its place in the log, which the store assigns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i32,
    pub payload: Value,
    pub metadata: Value,
    pub occurred_at: DateTime<Utc>,
}

impl NewEvent {
    /// Checks what the store checks before writing: type name, version, object bodies, size, no NUL.
    pub fn validate(&self) -> Result<(), LogError> {
        self.clone().into_stored_bodies().map(drop)
    }

    /// The payload's and the metadata's JSON as the log stores them (normalised as jsonb gives them
    /// back, see [`normalize_json`], and serialised by [`to_json_bytes`]), after every check of
    /// [`NewEvent::validate`]. The appender writes these texts and hashes their bytes.
    pub fn into_stored_bodies(self) -> Result<(String, String), LogError> {
        let mut chars = self.event_type.chars();
        let pascal = chars.next().is_some_and(|c| c.is_ascii_uppercase())
            && chars.all(|c| c.is_ascii_alphanumeric())
            && self.event_type.len() <= 128;
        if !pascal {
            return Err(LogError::BadEventType(self.event_type));
        }
        if self.schema_version < 1 {
            return Err(LogError::BadSchemaVersion(self.schema_version));
        }
        let payload = stored_body("payload", self.payload)?;
        let metadata = stored_body("metadata", self.metadata)?;
        check_event_size(payload.len() + metadata.len())?;
        Ok((payload, metadata))
    }
}

/// One body of an event as the log stores it: an object, normalised, serialised, without NUL.
fn stored_body(field: &'static str, mut value: Value) -> Result<String, LogError> {
    if !value.is_object() {
        return Err(LogError::NotAnObject { field });
    }
    normalize_json(&mut value);
    // serde_json only ever writes UTF-8.
    let text = String::from_utf8(to_json_bytes(&value)).unwrap_or_default();
    if writes_nul(&text) {
        return Err(LogError::NulCharacter { field });
    }
    Ok(text)
}

/// Refuses an event whose payload and metadata serialise to more than [`MAX_EVENT_BYTES`] together.
pub fn check_event_size(size: usize) -> Result<(), LogError> {
    if size > MAX_EVENT_BYTES {
        return Err(LogError::TooLarge {
            size,
            max: MAX_EVENT_BYTES,
        });
    }
    Ok(())
}

/// Whether JSON text serde_json wrote holds a NUL character (PostgreSQL's jsonb refuses one) in a
/// string or a key: serde_json writes it `\u0000`, and that sequence is an escape, not text, when an
/// odd number of backslashes ends where it starts (`\\u0000` is a backslash, then `u0000`).
/// One pass over the bytes the appender writes anyway, instead of a walk of the tree.
fn writes_nul(json: &str) -> bool {
    let bytes = json.as_bytes();
    let mut from = 0;
    while let Some(at) = json[from..].find("\\u0000").map(|i| from + i) {
        let backslashes = bytes[..=at]
            .iter()
            .rev()
            .take_while(|&&b| b == b'\\')
            .count();
        if backslashes % 2 == 1 {
            return true;
        }
        from = at + 1;
    }
    false
}

/// An event's `payload` or `metadata` as stored in the log (appenders write only objects, see
/// [`NewEvent::validate`]): its text, as the database or the bus gave it, checked to be JSON but not
/// built into a tree. Readers deserialise what they need straight from the text
/// ([`StoredJson::parse`]); the tree ([`StoredJson::to_value`]) is built only where it is needed —
/// the canonical bytes, for instance, since PostgreSQL's jsonb text orders keys its own way and is
/// not the canonical form.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StoredJson(Box<RawValue>);

impl StoredJson {
    /// Checks that `text` is JSON and keeps it as it is.
    pub fn from_text(text: String) -> Result<StoredJson, serde_json::Error> {
        RawValue::from_string(text).map(StoredJson)
    }

    /// The JSON text as stored.
    pub fn text(&self) -> &str {
        self.0.get()
    }

    /// Deserialises the text as `T`.
    pub fn parse<'a, T: Deserialize<'a>>(&'a self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.0.get())
    }

    /// The JSON tree of the text.
    pub fn to_value(&self) -> Value {
        // The text was checked to be JSON when this was made, under the same nesting limit.
        self.parse().expect("stored JSON text parses")
    }
}

impl From<&Value> for StoredJson {
    fn from(value: &Value) -> StoredJson {
        let raw = serde_json::value::to_raw_value(value)
            .expect("a Value serialises: its keys are strings");
        StoredJson(raw)
    }
}

impl From<Value> for StoredJson {
    fn from(value: Value) -> StoredJson {
        StoredJson::from(&value)
    }
}

/// Equal when the JSON is, whatever the text's key order or spacing.
impl PartialEq for StoredJson {
    fn eq(&self, other: &StoredJson) -> bool {
        self.text() == other.text() || self.to_value() == other.to_value()
    }
}

/// An event as stored in the log, with its global position and place in the hash chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedEvent {
    pub global_position: i64,
    pub event_id: Uuid,
    pub stream_id: String,
    pub stream_version: i64,
    pub event_type: String,
    pub schema_version: i32,
    pub payload: StoredJson,
    pub metadata: StoredJson,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

impl RecordedEvent {
    /// Recomputes this row's hash from its fields and the given previous hash.
    pub fn expected_hash(&self, prev_hash: &[u8]) -> [u8; 32] {
        chain_hash(prev_hash, &self.canonical_bytes())
    }

    /// The canonical bytes of the row (everything but the two hashes), see [`canonical_bytes`].
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let payload = to_json_bytes(&self.payload.to_value());
        let metadata = to_json_bytes(&self.metadata.to_value());
        canonical_bytes(&CanonicalRow {
            global_position: self.global_position,
            event_id: self.event_id,
            stream_id: &self.stream_id,
            stream_version: self.stream_version,
            event_type: &self.event_type,
            schema_version: self.schema_version,
            payload_json: &payload,
            metadata_json: &metadata,
            occurred_at: self.occurred_at,
            recorded_at: self.recorded_at,
        })
    }
}

/// The fields of a row that the hash chain covers, with the JSON bodies already serialised by
/// [`to_json_bytes`] (the writer needs those bytes anyway, to send them to the database).
#[derive(Debug, Clone, Copy)]
pub struct CanonicalRow<'a> {
    pub global_position: i64,
    pub event_id: Uuid,
    pub stream_id: &'a str,
    pub stream_version: i64,
    pub event_type: &'a str,
    pub schema_version: i32,
    pub payload_json: &'a [u8],
    pub metadata_json: &'a [u8],
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
}

/// serde_json's serialisation of a `Value`: object keys sorted (serde_json's map is ordered), numbers
/// in shortest round-trip form, which PostgreSQL's jsonb gives back unchanged.
pub fn to_json_bytes(value: &Value) -> Vec<u8> {
    // These bytes are hashed into the chain: never a quiet empty value.
    serde_json::to_vec(value).expect("a Value serialises: its keys are strings")
}

/// Rewrites the one JSON value jsonb does not give back unchanged: `-0.0`, which `numeric` stores as
/// `0.0`. Appenders normalise bodies with this before hashing so a read-back row hashes the same.
pub fn normalize_json(value: &mut Value) {
    match value {
        Value::Number(n) if n.as_f64() == Some(0.0) && n.is_f64() => {
            if let Some(zero) = serde_json::Number::from_f64(0.0) {
                *n = zero;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(normalize_json),
        Value::Object(map) => map.values_mut().for_each(normalize_json),
        _ => {}
    }
}

/// The version tag that starts every row's canonical bytes.
pub const CANONICAL_TAG: &[u8] = b"deepnode-event-v1";

/// The canonical byte encoding of a row: a version tag, fixed-width big-endian integers,
/// length-prefixed UTF-8 strings and JSON, and timestamps as microseconds since the Unix epoch (the
/// precision of `timestamptz`).
///
/// Laid out as `CANONICAL_TAG ‖ position ‖ identity ‖ stream_version ‖ body` (see
/// [`canonical_identity`] and [`canonical_body`]): the two numbers the log assigns at append time sit
/// between parts the appender can encode beforehand, so the database function that assigns them
/// (`deepnode_append`) only concatenates and hashes, and the format is defined here alone.
pub fn canonical_bytes(row: &CanonicalRow<'_>) -> Vec<u8> {
    canonical_bytes_of_parts(
        row.global_position,
        &canonical_identity(row.event_id, row.stream_id),
        row.stream_version,
        &canonical_body(row),
    )
}

/// The canonical bytes of a row from its position, stream version and the two parts the appender
/// encodes beforehand ([`canonical_identity`], [`canonical_body`]).
pub fn canonical_bytes_of_parts(
    global_position: i64,
    identity: &[u8],
    stream_version: i64,
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(CANONICAL_TAG.len() + 16 + identity.len() + body.len());
    out.extend_from_slice(CANONICAL_TAG);
    out.extend_from_slice(&global_position.to_be_bytes());
    out.extend_from_slice(identity);
    out.extend_from_slice(&stream_version.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// The part of the canonical bytes between the global position and the stream version.
pub fn canonical_identity(event_id: Uuid, stream_id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + stream_id.len());
    out.extend_from_slice(event_id.as_bytes());
    put_prefixed(&mut out, stream_id.as_bytes());
    out
}

/// The part of the canonical bytes after the stream version (the row's `global_position`,
/// `event_id`, `stream_id` and `stream_version` are not read).
pub fn canonical_body(row: &CanonicalRow<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        48 + row.event_type.len() + row.payload_json.len() + row.metadata_json.len(),
    );
    put_prefixed(&mut out, row.event_type.as_bytes());
    out.extend_from_slice(&row.schema_version.to_be_bytes());
    put_prefixed(&mut out, row.payload_json);
    put_prefixed(&mut out, row.metadata_json);
    out.extend_from_slice(&row.occurred_at.timestamp_micros().to_be_bytes());
    out.extend_from_slice(&row.recorded_at.timestamp_micros().to_be_bytes());
    out
}

fn put_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// `sha256(prev_hash ‖ canonical)`.
pub fn chain_hash(prev_hash: &[u8], canonical: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(prev_hash);
    hasher.update(canonical);
    hasher.finalize().into()
}

/// Truncates a timestamp to whole microseconds, the precision PostgreSQL keeps, so that what is hashed
/// at append time is exactly what is read back.
pub fn to_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(payload: Value) -> NewEvent {
        NewEvent {
            event_id: Uuid::nil(),
            event_type: "NodeRegistered".into(),
            schema_version: 1,
            payload,
            metadata: json!({}),
            occurred_at: DateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn stream_ids_are_checked() {
        assert_eq!(StreamId::parse(""), Err(LogError::EmptyStreamId));
        assert!(matches!(
            StreamId::parse(&"a".repeat(201)),
            Err(LogError::StreamIdTooLong { len: 201, .. })
        ));
        assert!(matches!(
            StreamId::parse("node n1"),
            Err(LogError::StreamIdCharset(_))
        ));
        assert_eq!(
            StreamId::parse("node-n1.a:b_c").map(|s| s.to_string()),
            Ok("node-n1.a:b_c".into())
        );
    }

    /// The tree walk the NUL check on the written text replaced: the oracle of the test below.
    fn contains_nul(value: &Value) -> bool {
        match value {
            Value::String(s) => s.contains('\0'),
            Value::Array(items) => items.iter().any(contains_nul),
            Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
            _ => false,
        }
    }

    #[test]
    fn a_nul_is_found_in_the_text_wherever_the_tree_holds_one() {
        for (value, nul) in [
            (json!({"a": "x\u{0}"}), true),
            (json!({"x\u{0}y": 1}), true),
            (json!({"a": ["\\\u{0}"]}), true),
            (json!({"a": "\\u0000"}), false),
            (json!({"a": "\\\\u0000", "b": "\\"}), false),
            (json!({"a": "u0000", "b": "\u{1}"}), false),
        ] {
            assert_eq!(contains_nul(&value), nul, "{value}");
            let text = String::from_utf8(to_json_bytes(&value)).unwrap();
            assert_eq!(writes_nul(&text), nul, "{text}");
        }
    }

    proptest::proptest! {
        #[test]
        fn the_text_holds_a_nul_exactly_when_the_tree_does(
            parts in proptest::collection::vec(
                proptest::prop_oneof!["\\\\{1,3}", "u0000", "\\x00", "[a-u0]{0,3}"], 0..8),
            in_key in proptest::bool::ANY,
        ) {
            let s: String = parts.concat();
            let value = if in_key { json!({ s.clone(): 1 }) } else { json!({"k": [s.clone()]}) };
            let text = String::from_utf8(to_json_bytes(&value)).unwrap();
            proptest::prop_assert_eq!(writes_nul(&text), contains_nul(&value), "{:?}", s);
        }
    }

    #[test]
    fn negative_zero_is_normalised_like_jsonb_does() {
        let mut v = json!({"a": [-0.0, 1.5], "b": {"c": -0.0}, "d": 0});
        normalize_json(&mut v);
        assert_eq!(
            String::from_utf8(to_json_bytes(&v)).unwrap(),
            r#"{"a":[0.0,1.5],"b":{"c":0.0},"d":0}"#
        );
    }

    #[test]
    fn bodies_are_checked() {
        assert_eq!(
            event(json!([1])).validate(),
            Err(LogError::NotAnObject { field: "payload" })
        );
        assert_eq!(
            event(json!({"a": "x\u{0}"})).validate(),
            Err(LogError::NulCharacter { field: "payload" })
        );
        let big = event(json!({ "a": "x".repeat(MAX_EVENT_BYTES) }));
        assert!(matches!(big.validate(), Err(LogError::TooLarge { .. })));
        let mut bad_type = event(json!({}));
        bad_type.event_type = "node_registered".into();
        assert!(matches!(
            bad_type.validate(),
            Err(LogError::BadEventType(_))
        ));
        assert_eq!(event(json!({"a": 1})).validate(), Ok(()));
    }

    #[test]
    fn canonical_bytes_ignore_key_order_but_not_values() {
        let a: Value = serde_json::from_str(r#"{"b":1,"a":0.1}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":0.1,"b":1}"#).unwrap();
        let c: Value = serde_json::from_str(r#"{"a":0.2,"b":1}"#).unwrap();
        let row = |p: &Value| {
            let meta = to_json_bytes(&json!({}));
            let p = to_json_bytes(p);
            canonical_bytes(&CanonicalRow {
                global_position: 1,
                event_id: Uuid::nil(),
                stream_id: "s",
                stream_version: 1,
                event_type: "T",
                schema_version: 1,
                payload_json: &p,
                metadata_json: &meta,
                occurred_at: DateTime::UNIX_EPOCH,
                recorded_at: DateTime::UNIX_EPOCH,
            })
        };
        assert_eq!(row(&a), row(&b));
        assert_ne!(row(&a), row(&c));
        assert_ne!(
            chain_hash(&GENESIS_HASH, &row(&a)),
            chain_hash(&[1u8; 32], &row(&a))
        );
    }

    #[test]
    fn the_canonical_bytes_of_a_row_are_those_of_its_parts() {
        let (payload, metadata) = (br#"{"a":1}"#.as_slice(), b"{}".as_slice());
        let row = CanonicalRow {
            global_position: 41,
            event_id: Uuid::from_u128(7),
            stream_id: "exec-1",
            stream_version: 3,
            event_type: "ExecutionCompleted",
            schema_version: 2,
            payload_json: payload,
            metadata_json: metadata,
            occurred_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            recorded_at: DateTime::from_timestamp_micros(1_700_000_000_654_321).unwrap(),
        };
        let identity = canonical_identity(row.event_id, row.stream_id);
        let body = canonical_body(&row);
        let parts = canonical_bytes_of_parts(41, &identity, 3, &body);
        assert_eq!(parts, canonical_bytes(&row));
        assert!(parts.starts_with(CANONICAL_TAG));
        assert_ne!(parts, canonical_bytes_of_parts(42, &identity, 3, &body));
        assert_ne!(parts, canonical_bytes_of_parts(41, &identity, 4, &body));
    }

    /// The persisted format, pinned: every chain hash in every stored log was computed from these
    /// bytes. If this test fails, the format changed — old logs would no longer verify. Keep the
    /// old format readable (a new canonical tag, an upcaster) instead of editing the vector.
    #[test]
    fn golden_vector_canonical_bytes_and_chain_hash() {
        let payload = to_json_bytes(&json!({"node_id": "n-1", "latency_ms": 12.5, "ok": true}));
        let metadata = to_json_bytes(&json!({"correlation_id": "c-1", "producer": "deepnode"}));
        let row = CanonicalRow {
            global_position: 41,
            event_id: Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
            stream_id: "exec-r-1",
            stream_version: 3,
            event_type: "ExecutionCompleted",
            schema_version: 1,
            payload_json: &payload,
            metadata_json: &metadata,
            occurred_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            recorded_at: DateTime::from_timestamp_micros(1_700_000_000_654_321).unwrap(),
        };
        let bytes = canonical_bytes(&row);
        assert_eq!(hex::encode(&bytes), GOLDEN_CANONICAL);
        assert_eq!(
            hex::encode(chain_hash(&GENESIS_HASH, &bytes)),
            GOLDEN_CHAIN_FROM_GENESIS
        );
        assert_eq!(
            hex::encode(chain_hash(&[0xab; 32], &bytes)),
            GOLDEN_CHAIN_FROM_AB
        );
    }

    #[test]
    fn stored_json_is_checked_json_equal_whatever_its_layout() {
        assert!(StoredJson::from_text("{\"a\": ".into()).is_err());
        let text = r#"{"b": 1, "a": [1, 2]}"#;
        let stored = StoredJson::from_text(text.into()).unwrap();
        assert_eq!(stored.text(), text);
        assert_eq!(stored, StoredJson::from(json!({"a": [1, 2], "b": 1})));
        assert_ne!(stored, StoredJson::from(json!({"a": [1, 2], "b": 2})));
        assert_eq!(stored.to_value(), json!({"a": [1, 2], "b": 1}));
    }

    /// A row read back from the database carries jsonb's text (keys by length, then bytes; a space
    /// after each colon and comma): its canonical bytes are still the pinned ones.
    #[test]
    fn a_row_read_as_jsonb_text_has_the_pinned_canonical_bytes() {
        let text = |t: &str| StoredJson::from_text(t.into()).unwrap();
        let row = RecordedEvent {
            global_position: 41,
            event_id: Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
            stream_id: "exec-r-1".into(),
            stream_version: 3,
            event_type: "ExecutionCompleted".into(),
            schema_version: 1,
            payload: text(r#"{"ok": true, "node_id": "n-1", "latency_ms": 12.5}"#),
            metadata: text(r#"{"producer": "deepnode", "correlation_id": "c-1"}"#),
            occurred_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            recorded_at: DateTime::from_timestamp_micros(1_700_000_000_654_321).unwrap(),
            prev_hash: GENESIS_HASH.to_vec(),
            hash: Vec::new(),
        };
        assert_eq!(hex::encode(row.canonical_bytes()), GOLDEN_CANONICAL);
        assert_eq!(
            hex::encode(row.expected_hash(&GENESIS_HASH)),
            GOLDEN_CHAIN_FROM_GENESIS
        );
    }

    const GOLDEN_CANONICAL: &str = concat!(
        "646565706e6f64652d6576656e742d763100000000000000290123456789abcdef0123456789abcdef",
        "0000000000000008657865632d722d3100000000000000030000000000000012457865637574696f6e",
        "436f6d706c6574656400000001000000000000002d7b226c6174656e63795f6d73223a31322e352c22",
        "6e6f64655f6964223a226e2d31222c226f6b223a747275657d000000000000002e7b22636f7272656c",
        "6174696f6e5f6964223a22632d31222c2270726f6475636572223a22646565706e6f6465227d00060a",
        "241820224000060a2418283bf1"
    );
    const GOLDEN_CHAIN_FROM_GENESIS: &str =
        "6bccab6d97a814ae2c18cc340d1745b7ec782a02897990de7399b45f58f94fd0";
    const GOLDEN_CHAIN_FROM_AB: &str =
        "45a6f188005cdf67fffc5bd6852ea31df9bf355de0e6519f8127f9e7da2173ee";
}
