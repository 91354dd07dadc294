//! Classifying a node's answer to `node.<id>.infer` (CONTRACT §3, issue 4 item 3): a JSON object
//! with `output` is a success; an object with `error` and no `output` is an error; no answer in time
//! is a timeout; no responders (or a broken connection) is an error; anything else — bytes that are
//! not JSON, a JSON value that is not an object, an object with neither field — is invalid output.
//!
//! Pure: no IO. Late and duplicate answers never reach here: each attempt is one NATS request whose
//! reply inbox is forgotten after the first answer or the timeout.

use deepnode_domain::events::Failure;
use serde_json::Value;

/// Longest excerpt of a bad answer kept in `AttemptFailed.detail`.
const DETAIL_LIMIT: usize = 200;

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Classified {
    /// A valid answer; the node's `output`.
    Success(Value),
    /// A failed attempt and a short human detail.
    Failed(Failure, String),
}

/// What the transport reported for one attempt.
#[derive(Debug)]
pub enum Transport<'a> {
    /// The node answered with these bytes.
    Answer(&'a [u8]),
    /// No answer within the attempt timeout.
    TimedOut,
    /// Nobody subscribes to the node's subject.
    NoResponders,
    /// Any other request failure (connection lost…).
    Broken(String),
}

/// Classifies one attempt's result.
pub fn classify(result: Transport<'_>) -> Classified {
    match result {
        Transport::TimedOut => Classified::Failed(Failure::Timeout, "no answer in time".into()),
        Transport::NoResponders => Classified::Failed(Failure::Error, "no responders".into()),
        Transport::Broken(reason) => Classified::Failed(Failure::Error, clip(&reason)),
        Transport::Answer(bytes) => match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(mut map)) => {
                if let Some(output) = map.remove("output") {
                    Classified::Success(output)
                } else if let Some(error) = map.get("error") {
                    Classified::Failed(Failure::Error, clip(&error.to_string()))
                } else {
                    Classified::Failed(
                        Failure::InvalidOutput,
                        "answer object has neither output nor error".into(),
                    )
                }
            }
            Ok(other) => Classified::Failed(
                Failure::InvalidOutput,
                clip(&format!("answer is not an object: {other}")),
            ),
            Err(e) => Classified::Failed(
                Failure::InvalidOutput,
                clip(&format!("answer is not JSON: {e}")),
            ),
        },
    }
}

fn clip(text: &str) -> String {
    if text.len() <= DETAIL_LIMIT {
        return text.to_owned();
    }
    let mut end = DETAIL_LIMIT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn answer(bytes: &[u8]) -> Classified {
        classify(Transport::Answer(bytes))
    }

    #[test]
    fn output_is_success_even_next_to_an_error_field() {
        assert_eq!(
            answer(br#"{"output":{"a":1}}"#),
            Classified::Success(json!({"a":1}))
        );
        assert_eq!(
            answer(br#"{"output":null,"error":"x"}"#),
            Classified::Success(Value::Null)
        );
    }

    #[test]
    fn error_without_output_is_an_error() {
        let c = answer(br#"{"ok":false,"error":{"code":"internal","message":"boom"}}"#);
        assert!(matches!(c, Classified::Failed(Failure::Error, _)));
        assert!(matches!(
            classify(Transport::NoResponders),
            Classified::Failed(Failure::Error, _)
        ));
    }

    #[test]
    fn everything_else_is_invalid_output() {
        for bad in [
            &b"not json"[..],
            b"[1,2]",
            b"\"output\"",
            b"{}",
            b"{\"result\":1}",
            b"",
        ] {
            assert!(
                matches!(answer(bad), Classified::Failed(Failure::InvalidOutput, _)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn silence_is_a_timeout_and_details_are_clipped() {
        assert!(matches!(
            classify(Transport::TimedOut),
            Classified::Failed(Failure::Timeout, _)
        ));
        let long = "é".repeat(500);
        let Classified::Failed(_, detail) = classify(Transport::Broken(long)) else {
            panic!("broken transport must fail");
        };
        assert!(detail.len() <= DETAIL_LIMIT + "…".len());
    }
}
