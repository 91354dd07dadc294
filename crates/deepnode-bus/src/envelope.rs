//! The CONTRACT §2 reply envelope: `{"ok": true, ...}` or
//! `{"ok": false, "error": {"code", "message"}, ...}`, the error codes, and [`parse_command`], which
//! turns a raw command body into a typed command or the right `bad_request` / `payload_too_large`
//! error.
//!
//! It deliberately does no IO and knows no command shapes: services define their command structs
//! (with the domain's id newtypes so ids are validated while parsing) and their reply fields.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Largest accepted command body (CONTRACT §2): 512 KiB.
pub const MAX_COMMAND_BYTES: usize = 512 * 1024;

/// Machine-readable reason of a failed reply, serialized in snake_case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed JSON, a missing field, or a field of the wrong type or format.
    BadRequest,
    /// A command body over [`MAX_COMMAND_BYTES`].
    PayloadTooLarge,
    /// The named node is not registered.
    UnknownNode,
    /// The named model is not deployed.
    UnknownModel,
    /// Already exists, or the expected version did not match.
    Conflict,
    /// No node can serve the model right now.
    NoEligibleNodes,
    /// Every replica that could serve is busy, and no slot freed within the request's deadline (or
    /// its queue is full); the reply carries `retry_after_ms`. Not charged.
    Overloaded,
    /// Primary and backup both failed; the caller is not charged.
    AllReplicasFailed,
    /// Store or bus down; safe to retry.
    Unavailable,
    /// A bug on our side; the message says what.
    Internal,
}

impl ErrorCode {
    /// The wire name, e.g. `"bad_request"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnknownNode => "unknown_node",
            Self::UnknownModel => "unknown_model",
            Self::Conflict => "conflict",
            Self::NoEligibleNodes => "no_eligible_nodes",
            Self::Overloaded => "overloaded",
            Self::AllReplicasFailed => "all_replicas_failed",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `error` object of a failed reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ErrorBody {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// A human sentence.
    pub message: String,
}

impl ErrorBody {
    /// An error with the given code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// A `bad_request` error.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    /// An `unavailable` error (safe to retry).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }

    /// An `internal` error.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

/// Why a reply could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The reply is not JSON.
    #[error("reply is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The reply is JSON but not a §2 envelope.
    #[error("reply is not a deepnode envelope: {0}")]
    Shape(String),
}

/// One reply, in either direction: services build it with [`Reply::ok`] / [`Reply::err`] and send
/// [`Reply::to_bytes`]; clients decode with [`Reply::from_slice`].
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `{"ok": true, ...fields}`; `fields` never contains `ok`.
    Ok(Map<String, Value>),
    /// `{"ok": false, "error": {...}, ...extra}`; `extra` never contains `ok` or `error`.
    Err {
        /// The error.
        error: ErrorBody,
        /// Further fields, e.g. exec's `charged` and `attempts`.
        extra: Map<String, Value>,
    },
}

impl From<ErrorBody> for Reply {
    fn from(error: ErrorBody) -> Self {
        Self::err(error)
    }
}

/// Serializes `fields` to an object; `null` (e.g. `()`) counts as an empty object.
fn to_object<T: Serialize + ?Sized>(fields: &T) -> Result<Map<String, Value>, ErrorBody> {
    match serde_json::to_value(fields) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(Value::Null) => Ok(Map::new()),
        Ok(other) => Err(ErrorBody::internal(format!(
            "reply fields must be an object, got {}",
            json_kind(&other)
        ))),
        Err(e) => Err(ErrorBody::internal(format!(
            "reply could not be serialized: {e}"
        ))),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Reply {
    /// A success reply carrying `fields` (a struct or map serializing to an object). A value that
    /// does not serialize to an object becomes an `internal` error reply instead of a panic.
    pub fn ok<T: Serialize + ?Sized>(fields: &T) -> Self {
        match to_object(fields) {
            Ok(mut map) => {
                map.remove("ok");
                Self::Ok(map)
            }
            Err(error) => Self::err(error),
        }
    }

    /// A failure reply with no further fields.
    pub fn err(error: ErrorBody) -> Self {
        Self::Err {
            error,
            extra: Map::new(),
        }
    }

    /// A failure reply with further fields (an object) beside `error`.
    pub fn err_with<T: Serialize + ?Sized>(error: ErrorBody, extra: &T) -> Self {
        match to_object(extra) {
            Ok(mut map) => {
                map.remove("ok");
                map.remove("error");
                Self::Err { error, extra: map }
            }
            Err(e) => Self::err(ErrorBody::internal(format!(
                "{} (while reporting: {error})",
                e.message
            ))),
        }
    }

    /// exec's failure: `{"ok": false, "error", "charged": false, "attempts": [...]}`.
    pub fn exec_failure<A: Serialize + ?Sized>(error: ErrorBody, attempts: &A) -> Self {
        let attempts = match serde_json::to_value(attempts) {
            Ok(v) => v,
            Err(e) => {
                return Self::err(ErrorBody::internal(format!(
                    "attempts could not be serialized: {e} (while reporting: {error})"
                )))
            }
        };
        let mut extra = Map::new();
        extra.insert("charged".to_owned(), Value::Bool(false));
        extra.insert("attempts".to_owned(), attempts);
        Self::Err { error, extra }
    }

    /// Whether this is a success reply.
    pub fn is_ok(&self) -> bool {
        matches!(self, Self::Ok(_))
    }

    /// The error, if this is a failure reply.
    pub fn error(&self) -> Option<&ErrorBody> {
        match self {
            Self::Ok(_) => None,
            Self::Err { error, .. } => Some(error),
        }
    }

    /// A field beside `ok` / `error`, e.g. `reply.field("node_id")`.
    pub fn field(&self, name: &str) -> Option<&Value> {
        match self {
            Self::Ok(map) | Self::Err { extra: map, .. } => map.get(name),
        }
    }

    /// The success fields decoded as `T`, or the failure's error. A success whose fields do not
    /// decode as `T` becomes an `internal` error naming the mismatch.
    pub fn into_result<T: DeserializeOwned>(self) -> Result<T, ErrorBody> {
        match self {
            Self::Ok(map) => serde_json::from_value(Value::Object(map))
                .map_err(|e| ErrorBody::internal(format!("unexpected reply fields: {e}"))),
            Self::Err { error, .. } => Err(error),
        }
    }

    /// The full envelope as a JSON value.
    pub fn to_value(&self) -> Value {
        let mut out = Map::new();
        match self {
            Self::Ok(map) => {
                out.insert("ok".to_owned(), Value::Bool(true));
                out.extend(map.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            Self::Err { error, extra } => {
                out.insert("ok".to_owned(), Value::Bool(false));
                let mut err = Map::new();
                err.insert("code".to_owned(), Value::String(error.code.as_str().into()));
                err.insert("message".to_owned(), Value::String(error.message.clone()));
                out.insert("error".to_owned(), Value::Object(err));
                out.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        Value::Object(out)
    }

    /// The full envelope as JSON bytes, ready to publish (the bytes of [`Reply::to_value`]'s tree,
    /// written without building it).
    pub fn to_bytes(&self) -> Bytes {
        // Cannot fail: every key is a string and every value a `Value` or a string.
        Bytes::from(serde_json::to_vec(self).expect("a reply serialises: string keys, JSON values"))
    }

    /// Decodes an envelope received as a reply.
    pub fn from_slice(payload: &[u8]) -> Result<Self, Error> {
        Self::from_value(serde_json::from_slice(payload)?)
    }

    /// Decodes an envelope already parsed as JSON.
    pub fn from_value(value: Value) -> Result<Self, Error> {
        let Value::Object(mut map) = value else {
            return Err(Error::Shape(format!(
                "expected an object, got {}",
                json_kind(&value)
            )));
        };
        match map.remove("ok") {
            Some(Value::Bool(true)) => Ok(Self::Ok(map)),
            Some(Value::Bool(false)) => {
                let error = map
                    .remove("error")
                    .ok_or_else(|| Error::Shape("ok is false but error is missing".into()))?;
                let error: ErrorBody = serde_json::from_value(error)
                    .map_err(|e| Error::Shape(format!("bad error object: {e}")))?;
                Ok(Self::Err { error, extra: map })
            }
            Some(other) => Err(Error::Shape(format!(
                "ok must be a boolean, got {}",
                json_kind(&other)
            ))),
            None => Err(Error::Shape("field ok is missing".into())),
        }
    }
}

/// One field of a serialised [`Reply`], borrowed from it.
enum Field<'a> {
    Ok(bool),
    Error(&'a ErrorBody),
    Other(&'a Value),
}

impl Serialize for Field<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            Field::Ok(ok) => serializer.serialize_bool(*ok),
            // As `to_value` writes it: the code and the message, nothing else.
            Field::Error(error) => {
                let mut map = serializer.serialize_map(Some(2))?;
                map.serialize_entry("code", error.code.as_str())?;
                map.serialize_entry("message", &error.message)?;
                map.end()
            }
            Field::Other(value) => value.serialize(serializer),
        }
    }
}

impl Serialize for Reply {
    /// [`Reply::to_value`]'s object — the same keys, in the same (sorted) order, a field of the
    /// reply's own overriding `ok` and `error` as there — with the fields borrowed, not copied.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut fields = std::collections::BTreeMap::new();
        let others = match self {
            Self::Ok(map) => {
                fields.insert("ok", Field::Ok(true));
                map
            }
            Self::Err { error, extra } => {
                fields.insert("ok", Field::Ok(false));
                fields.insert("error", Field::Error(error));
                extra
            }
        };
        fields.extend(others.iter().map(|(k, v)| (k.as_str(), Field::Other(v))));
        serializer.collect_map(fields)
    }
}

/// Parses a command body into `T`, enforcing [`MAX_COMMAND_BYTES`].
///
/// Errors: `payload_too_large` over the limit; `bad_request` for an empty body, malformed JSON, a
/// non-object, a missing field, or a field of the wrong type or format (the message names the
/// field's path, e.g. `field "stake": invalid type: string "x", expected f64`).
pub fn parse_command<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ErrorBody> {
    if payload.len() > MAX_COMMAND_BYTES {
        return Err(ErrorBody::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "command body is {} bytes; the limit is {MAX_COMMAND_BYTES} bytes (512 KiB)",
                payload.len()
            ),
        ));
    }
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Err(ErrorBody::bad_request("empty body: expected a JSON object"));
    }
    // Serde's derived structs also accept arrays; commands are objects only.
    if payload.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(match serde_json::from_slice::<Value>(payload) {
            Ok(v) => ErrorBody::bad_request(format!(
                "invalid command: expected a JSON object, got {}",
                json_kind(&v)
            )),
            Err(e) => describe(e, ""),
        });
    }
    let mut de = serde_json::Deserializer::from_slice(payload);
    let value = serde_path_to_error::deserialize::<_, T>(&mut de).map_err(|err| {
        let path = err.path().to_string();
        describe(err.into_inner(), &path)
    })?;
    de.end().map_err(|e| describe(e, ""))?;
    Ok(value)
}

fn describe(inner: serde_json::Error, path: &str) -> ErrorBody {
    match inner.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            ErrorBody::bad_request(format!("malformed JSON: {inner}"))
        }
        _ if path.is_empty() || path == "." => {
            ErrorBody::bad_request(format!("invalid command: {inner}"))
        }
        _ => ErrorBody::bad_request(format!("field {path:?}: {inner}")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_reply_serialises_to_the_bytes_of_its_tree() {
        let mut own_ok = Map::new();
        own_ok.insert("ok".to_owned(), json!("a field of its own"));
        own_ok.insert("a".to_owned(), json!(1));
        let replies = [
            Reply::ok(&()),
            Reply::ok(
                &json!({"request_id": "r1", "output": {"z": [1, 2.5, null], "a": "é\n\u{0}"},
                              "node_id": "n1", "charged": true, "attempts": [{"role": "primary"}]}),
            ),
            Reply::err(ErrorBody::new(ErrorCode::Overloaded, "try \"later\"")),
            Reply::exec_failure(
                ErrorBody::new(ErrorCode::AllReplicasFailed, "both failed"),
                &[json!({"node_id": "n1"})],
            ),
            Reply::Ok(own_ok),
        ];
        for reply in replies {
            let tree = reply.to_value().to_string();
            assert_eq!(std::str::from_utf8(&reply.to_bytes()).unwrap(), tree);
        }
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Register {
        node_id: deepnode_domain::ids::NodeId,
        domain: String,
        stake: f64,
        capacity: u32,
    }

    #[test]
    fn replies_have_the_contract_shape() {
        let ok = Reply::ok(&json!({"node_id": "n1", "ok": "ignored"}));
        assert_eq!(ok.to_value(), json!({"ok": true, "node_id": "n1"}));
        assert_eq!(Reply::ok(&()).to_value(), json!({"ok": true}));
        let err = Reply::err(ErrorBody::new(ErrorCode::UnknownNode, "no node n9"));
        assert_eq!(
            err.to_value(),
            json!({"ok": false, "error": {"code": "unknown_node", "message": "no node n9"}})
        );
        let exec = Reply::exec_failure(
            ErrorBody::new(ErrorCode::AllReplicasFailed, "both failed"),
            &json!([{"node_id": "n1"}]),
        );
        assert_eq!(
            exec.to_value(),
            json!({"ok": false, "error": {"code": "all_replicas_failed", "message": "both failed"},
                   "charged": false, "attempts": [{"node_id": "n1"}]})
        );
        assert_eq!(
            Reply::ok(&42).error().map(|e| e.code),
            Some(ErrorCode::Internal)
        );
    }

    #[test]
    fn replies_round_trip_through_the_decoder() {
        for reply in [
            Reply::ok(&json!({"a": 1})),
            Reply::err_with(ErrorBody::bad_request("x"), &json!({"b": [1]})),
        ] {
            let back = Reply::from_slice(&reply.to_bytes()).unwrap();
            assert_eq!(back, reply);
        }
        assert!(Reply::from_slice(b"[]").is_err());
        assert!(Reply::from_slice(b"{\"ok\":false}").is_err());
        assert!(Reply::from_slice(b"nope").is_err());
        #[derive(Deserialize)]
        struct R {
            node_id: String,
        }
        let r: R = Reply::ok(&json!({"node_id": "n1"})).into_result().unwrap();
        assert_eq!(r.node_id, "n1");
    }

    #[test]
    fn parse_command_maps_bad_input_to_codes() {
        let good = br#"{"node_id":"n1","domain":"d","stake":1.5,"capacity":4}"#;
        assert!(parse_command::<Register>(good).is_ok());

        let cases: [(&[u8], &str); 7] = [
            (b"", "empty"),
            (b"{not json", "malformed JSON"),
            (b"[1,2]", "invalid command"),
            (br#"{"domain":"d","stake":1,"capacity":1}"#, "node_id"),
            (
                br#"{"node_id":"n1","domain":"d","stake":"x","capacity":1}"#,
                "stake",
            ),
            (
                br#"{"node_id":"bad id","domain":"d","stake":1,"capacity":1}"#,
                "node_id",
            ),
            (
                br#"{"node_id":"n1","domain":"d","stake":1,"capacity":1} x"#,
                "malformed JSON",
            ),
        ];
        for (input, needle) in cases {
            let err = parse_command::<Register>(input).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest, "{input:?}");
            assert!(
                err.message.contains(needle),
                "{:?} lacks {needle}",
                err.message
            );
        }

        let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(MAX_COMMAND_BYTES));
        let err = parse_command::<Value>(big.as_bytes()).unwrap_err();
        assert_eq!(err.code, ErrorCode::PayloadTooLarge);
    }
}
