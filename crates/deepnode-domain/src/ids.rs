//! Identifier newtypes, parsed once at the edge (`NodeId::parse`) so the rest of the code can trust
//! them. Ids are non-empty strings of at most 128 characters from `[A-Za-z0-9._:-]` (CONTRACT §3).
//! A node id is also part of NATS subjects (`deepnode.node.<id>.infer`), where `.` separates tokens,
//! so it may not start or end with `.` or hold `..` (an empty token makes no valid subject).

use serde::{Deserialize, Serialize};

use crate::log::is_id_char;

/// Longest accepted id.
pub const MAX_ID_LEN: usize = 128;

/// Most `.`-separated tokens a node id can span in a subject (128 characters, no empty token).
pub const MAX_NODE_ID_TOKENS: usize = MAX_ID_LEN.div_ceil(2);

/// Why a raw string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} must not be empty")]
    Empty { kind: &'static str },
    #[error("{kind} is {len} characters long; the limit is 128")]
    TooLong { kind: &'static str, len: usize },
    #[error("{kind} contains a character outside [A-Za-z0-9._:-]")]
    Charset { kind: &'static str },
    #[error("{kind} must not start or end with '.' or contain '..': it names NATS subjects")]
    EmptySubjectToken { kind: &'static str },
}

fn check(kind: &'static str, raw: &str) -> Result<(), IdError> {
    if raw.is_empty() {
        return Err(IdError::Empty { kind });
    }
    let len = raw.chars().count();
    if len > MAX_ID_LEN {
        return Err(IdError::TooLong { kind, len });
    }
    if !raw.chars().all(is_id_char) {
        return Err(IdError::Charset { kind });
    }
    if kind == "node_id" && raw.split('.').any(str::is_empty) {
        return Err(IdError::EmptySubjectToken { kind });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Parses and validates a raw id.
            pub fn parse(raw: &str) -> Result<Self, IdError> {
                check($kind, raw).map(|()| Self(raw.to_owned()))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                check($kind, &value).map(|()| Self(value))
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> Self {
                value.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }
    };
}

id_type!(
    /// An inference node run by an independent operator.
    NodeId,
    "node_id"
);
id_type!(
    /// A model that can be deployed on nodes.
    ModelId,
    "model_id"
);
id_type!(
    /// A caller's request id; also the idempotency key of an execution.
    RequestId,
    "request_id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_at_the_edge() {
        assert_eq!(
            NodeId::parse("n-1.a:b_c").map(String::from),
            Ok("n-1.a:b_c".to_owned())
        );
        assert_eq!(NodeId::parse(""), Err(IdError::Empty { kind: "node_id" }));
        assert_eq!(
            ModelId::parse("m 1"),
            Err(IdError::Charset { kind: "model_id" })
        );
        assert_eq!(
            RequestId::parse("é"),
            Err(IdError::Charset { kind: "request_id" })
        );
        assert!(matches!(
            NodeId::parse(&"x".repeat(129)),
            Err(IdError::TooLong { len: 129, .. })
        ));
        let json: Result<NodeId, _> = serde_json::from_str("\"bad id\"");
        assert!(json.is_err());
        for unusable in [".n1", "n1.", "gpu..n1"] {
            assert_eq!(
                NodeId::parse(unusable),
                Err(IdError::EmptySubjectToken { kind: "node_id" }),
                "{unusable}"
            );
        }
        assert!(NodeId::parse("gpu.rack-2.n01").is_ok());
        assert!(
            ModelId::parse("m..1").is_ok(),
            "only node ids name subjects"
        );
        let widest = ["x"; MAX_NODE_ID_TOKENS].join(".");
        assert_eq!(widest.len(), MAX_ID_LEN - 1);
        assert!(NodeId::parse(&widest).is_ok());
    }
}
