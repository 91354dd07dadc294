//! Classifying a node's answer to `node.<id>.infer` (CONTRACT §3, issue 4 item 3): a JSON object
//! with `output` is a success; an object with `error` and no `output` is an error; no answer in time
//! is a timeout; no responders (or a broken connection) is an error; anything else — bytes that are
//! not JSON, a JSON value that is not an object, an object with neither field — is invalid output.
//!
//! An attempt that got no answer while our own connection to the bus was disturbed (lost, or
//! restored only moments before) is not the node's failure: it is [`Classified::Unjudged`]
//! ([`judge`], issue 12 item 7). An answer is judged on its merits whatever the bus did.
//!
//! Pure: no IO. Late and duplicate answers never reach here: each attempt is one NATS request whose
//! reply inbox is forgotten after the first answer or the timeout.

use crate::events::Failure;
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
    /// No answer, but our own bus connection was disturbed meanwhile: the outcome is unknown and
    /// held against nobody. The detail says what happened.
    Unjudged(String),
}

/// What our own connection to the bus did during an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bus {
    /// Connected throughout, and not just reconnected.
    Steady,
    /// Lost during the attempt, or reconnected so recently that nodes may not be back yet.
    Disturbed,
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

/// Classifies one attempt's result given what our bus did meanwhile: silence, no responders or a
/// broken request while the bus was [`Bus::Disturbed`] is [`Classified::Unjudged`]; anything else
/// is [`classify`]'s verdict.
pub fn judge(result: Transport<'_>, bus: Bus) -> Classified {
    match (result, bus) {
        (Transport::Answer(bytes), _) => classify(Transport::Answer(bytes)),
        (other, Bus::Steady) => classify(other),
        (other, Bus::Disturbed) => {
            let what = match classify(other) {
                Classified::Failed(_, detail) => detail,
                _ => "no answer".to_owned(),
            };
            Classified::Unjudged(format!(
                "{what}, while our own connection to the bus was disturbed"
            ))
        }
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
    fn no_answer_while_our_bus_was_disturbed_is_held_against_nobody_but_an_answer_is_judged() {
        for silent in [
            Transport::TimedOut,
            Transport::NoResponders,
            Transport::Broken("connection closed".into()),
        ] {
            assert!(matches!(
                judge(silent, Bus::Disturbed),
                Classified::Unjudged(_)
            ));
        }
        assert!(matches!(
            judge(Transport::TimedOut, Bus::Steady),
            Classified::Failed(Failure::Timeout, _)
        ));
        assert!(matches!(
            judge(Transport::Answer(b"garbage"), Bus::Disturbed),
            Classified::Failed(Failure::InvalidOutput, _)
        ));
        assert_eq!(
            judge(Transport::Answer(br#"{"output":1}"#), Bus::Disturbed),
            Classified::Success(json!(1))
        );
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
