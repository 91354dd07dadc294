//! Hostile input (issue 5): ≥ 10,000 generated malformed commands across every request/reply subject
//! of CONTRACT §3 (register, deregister, deploy, schedule, exec) plus malformed reports on the ingest
//! subject, sent with bounded concurrency to the three services running in-process.
//!
//! Checks: every command gets a reply with `ok:false` and one of the codes its mutation allows
//! (`bad_request`, `payload_too_large`, `unknown_*`); nothing is appended to the log; every ingest
//! report is terminated; no service task ends; RSS growth stays under 200 MiB. The generator is a
//! seeded RNG (`DEEPNODE_FUZZ_SEED`, default fixed) so a failure reproduces; it deliberately does not
//! shrink (the failing body is printed instead).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use deepnode_bus::async_nats::HeaderMap;
use deepnode_bus::{rpc, MAX_COMMAND_BYTES};
use deepnode_domain::config::PolicyConfig;
use deepnode_e2e::Cluster;
use deepnode_reputation::Stats;
use deepnode_security_tests::rss_bytes;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

/// Commands per subject (5 subjects → 10,000).
const PER_SUBJECT: usize = 2_000;
/// Malformed ingest reports.
const INGEST: usize = 1_000;
/// Requests in flight at once.
const CONCURRENCY: usize = 48;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Id,
    Text,
    F64,
    U32,
    OptU32,
    OptU64,
    Any,
    Uuid,
    Outcome,
    Time,
}

struct Template {
    name: &'static str,
    fields: Vec<(&'static str, Kind, Value)>,
    /// A body that parses but names something that does not exist, and its allowed codes.
    unknown: Option<(Value, &'static [&'static str])>,
}

fn templates() -> Vec<Template> {
    use Kind::*;
    vec![
        Template {
            name: "register",
            fields: vec![
                ("node_id", Id, json!("fz-n1")),
                ("domain", Text, json!("text")),
                ("stake", F64, json!(10.0)),
                ("capacity", U32, json!(2)),
            ],
            unknown: None,
        },
        Template {
            name: "deregister",
            fields: vec![
                ("node_id", Id, json!("ctl-n1")),
                ("reason", Text, json!("r")),
            ],
            unknown: Some((
                json!({"node_id": "never-registered", "reason": "r"}),
                &["unknown_node"],
            )),
        },
        Template {
            name: "deploy",
            fields: vec![
                ("model_id", Id, json!("m1")),
                ("domain", Text, json!("text")),
                ("replicas", OptU32, json!(2)),
            ],
            unknown: None,
        },
        Template {
            name: "schedule",
            fields: vec![("model_id", Id, json!("m1"))],
            unknown: Some((json!({"model_id": "no-such-model"}), &["unknown_model"])),
        },
        Template {
            name: "exec",
            fields: vec![
                ("request_id", Id, json!("r1")),
                ("model_id", Id, json!("m1")),
                ("input", Any, json!({"x": 1})),
                ("timeout_ms", OptU64, json!(1000)),
            ],
            unknown: None,
        },
    ]
}

fn ingest_template() -> Template {
    use Kind::*;
    Template {
        name: "ingest",
        fields: vec![
            (
                "event_id",
                Uuid,
                json!("6f1c2a8e-1b7d-4c1e-9a53-1f0c7b2d9e41"),
            ),
            ("request_id", Id, json!("ext-1")),
            ("model_id", Id, json!("m1")),
            ("node_id", Id, json!("ctl-n1")),
            ("outcome", Outcome, json!("success")),
            ("latency_ms", OptU64, json!(12)),
            ("occurred_at", Time, json!("2026-01-01T00:00:00Z")),
        ],
        unknown: None,
    }
}

fn object(fields: &[(&'static str, Kind, Value)]) -> Map<String, Value> {
    fields
        .iter()
        .map(|(k, _, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

fn bad_id(rng: &mut StdRng) -> Value {
    let options: Vec<String> = vec![
        String::new(),
        "a b".into(),
        "n\u{0}1".into(),
        "n\n1".into(),
        "\u{7f}".into(),
        "ñode".into(),
        "🦀".into(),
        "\u{202e}evil".into(),
        "a".repeat(129),
        "a*".into(),
        "a>".into(),
        "a/b".into(),
        "node\u{200b}".into(),
        "\t".into(),
    ];
    Value::String(options[rng.gen_range(0..options.len())].clone())
}

/// A value of the wrong type (or out of range) for `kind`; never `null` for optional fields.
fn wrong_value(kind: Kind, rng: &mut StdRng) -> Value {
    let pick = |rng: &mut StdRng, v: Vec<Value>| v[rng.gen_range(0..v.len())].clone();
    match kind {
        Kind::Id => {
            if rng.gen_bool(0.5) {
                bad_id(rng)
            } else {
                pick(
                    rng,
                    vec![json!(1), json!(true), json!([]), json!({}), Value::Null],
                )
            }
        }
        Kind::Text => pick(
            rng,
            vec![
                json!(1),
                json!(false),
                json!(["x"]),
                json!({"a": 1}),
                Value::Null,
            ],
        ),
        Kind::F64 => pick(
            rng,
            vec![
                json!("1"),
                json!(true),
                json!([1]),
                json!({}),
                Value::Null,
                json!(-1),
                json!(-1e300),
                json!(-0.5),
            ],
        ),
        Kind::U32 => pick(
            rng,
            vec![
                json!("2"),
                json!(-1),
                json!(1.5),
                json!(4_294_967_296u64),
                json!(0),
                Value::Null,
                json!([2]),
            ],
        ),
        Kind::OptU32 => pick(
            rng,
            vec![
                json!("2"),
                json!(-1),
                json!(0),
                json!(1),
                json!(65),
                json!(2.5),
                json!(u64::MAX),
            ],
        ),
        Kind::OptU64 => pick(
            rng,
            vec![json!("5"), json!(-5), json!(0.5), json!([]), json!(true)],
        ),
        Kind::Uuid => pick(
            rng,
            vec![json!("not-a-uuid"), json!(""), json!(7), Value::Null],
        ),
        Kind::Outcome => pick(
            rng,
            vec![
                json!("great"),
                json!(""),
                json!(1),
                Value::Null,
                json!("SUCCESS"),
            ],
        ),
        Kind::Time => pick(
            rng,
            vec![
                json!("yesterday"),
                json!(""),
                json!(1),
                Value::Null,
                json!("2026-13-45T99:00:00Z"),
            ],
        ),
        Kind::Any => unreachable!("input takes any JSON value"),
    }
}

fn deep(levels: usize, open: char, close: char) -> String {
    let mut s = String::with_capacity(levels * 2 + 1);
    s.extend(std::iter::repeat_n(open, levels));
    s.push('1');
    s.extend(std::iter::repeat_n(close, levels));
    s
}

/// A number literal JSON refuses or the field's type cannot hold; `float` excludes the long integer,
/// which is a valid (finite, positive) `f64`.
fn raw_number_literal(rng: &mut StdRng, float: bool) -> &'static str {
    let literals = [
        "NaN",
        "Infinity",
        "-Infinity",
        "nan",
        "1e999",
        "-1e999",
        "0x10",
        "+1",
        "1.",
        ".5",
        "01",
        "99999999999999999999999999999999999999",
    ];
    let n = if float {
        literals.len() - 1
    } else {
        literals.len()
    };
    literals[rng.gen_range(0..n)]
}

/// One malformed body for `t` and the error codes it may be answered with.
fn mutate(t: &Template, rng: &mut StdRng) -> (Vec<u8>, &'static [&'static str]) {
    const BAD: &[&str] = &["bad_request"];
    let base = object(&t.fields);
    let field_ix = rng.gen_range(0..t.fields.len());
    let (field, kind, _) = t.fields[field_ix];
    match rng.gen_range(0..15) {
        0 => {
            let ws = [&b""[..], b" ", b"\n\t ", b"\r\n"];
            (ws[rng.gen_range(0..ws.len())].to_vec(), BAD)
        }
        1 => {
            let len = rng.gen_range(1..2048);
            ((0..len).map(|_| rng.gen()).collect(), BAD)
        }
        2 => {
            let full = Value::Object(base).to_string();
            let cut = rng.gen_range(1..full.len());
            (full.as_bytes()[..cut].to_vec(), BAD)
        }
        3 | 4 if kind != Kind::Any => {
            let mut o = base;
            o.insert(field.into(), wrong_value(kind, rng));
            (Value::Object(o).to_string().into_bytes(), BAD)
        }
        5 => {
            // Huge / non-JSON numbers spliced raw into the first numeric field (or the first field).
            let (target, target_kind) = t
                .fields
                .iter()
                .find(|(_, k, _)| matches!(k, Kind::F64 | Kind::U32 | Kind::OptU32 | Kind::OptU64))
                .map_or((field, kind), |(f, k, _)| (*f, *k));
            let mut o = base;
            o.insert(target.into(), json!("__SPLICE__"));
            let literal = raw_number_literal(rng, target_kind == Kind::F64);
            let body = Value::Object(o)
                .to_string()
                .replace("\"__SPLICE__\"", literal);
            (body.into_bytes(), BAD)
        }
        6 if t.fields.iter().any(|(_, k, _)| *k == Kind::Id) => {
            let id = t.fields.iter().filter(|(_, k, _)| *k == Kind::Id).count();
            let which = rng.gen_range(0..id);
            let (f, _, _) = t
                .fields
                .iter()
                .filter(|(_, k, _)| *k == Kind::Id)
                .nth(which)
                .unwrap();
            let mut o = base;
            o.insert((*f).into(), bad_id(rng));
            (Value::Object(o).to_string().into_bytes(), BAD)
        }
        7 if !matches!(kind, Kind::OptU32 | Kind::OptU64) => {
            let mut o = base;
            o.remove(field);
            (Value::Object(o).to_string().into_bytes(), BAD)
        }
        8 => {
            // 10,000 levels of nesting, as a field value or as the whole body.
            let nest = if rng.gen_bool(0.5) {
                deep(10_000, '[', ']')
            } else {
                let mut s = "{\"a\":".repeat(10_000);
                s.push('1');
                s.push_str(&"}".repeat(10_000));
                s
            };
            let body = if rng.gen_bool(0.3) {
                nest
            } else {
                let mut o = base;
                o.insert(field.into(), json!("__SPLICE__"));
                Value::Object(o)
                    .to_string()
                    .replace("\"__SPLICE__\"", &nest)
            };
            (body.into_bytes(), BAD)
        }
        9 if rng.gen_bool(0.25) => {
            // 512 KiB + 1 (or more): refused by size before parsing, valid JSON or not.
            let mut o = base;
            let pad = MAX_COMMAND_BYTES + 1;
            o.insert("padding".into(), Value::String("x".repeat(pad)));
            let mut body = Value::Object(o).to_string().into_bytes();
            if rng.gen_bool(0.5) {
                body = vec![b'{'; MAX_COMMAND_BYTES + 1];
            }
            (body, &["payload_too_large"])
        }
        10 => {
            let others = ["[]", "[1,2]", "\"x\"", "42", "null", "true", "-0", "[{}]"];
            (
                others[rng.gen_range(0..others.len())].as_bytes().to_vec(),
                BAD,
            )
        }
        11 => {
            // A duplicated key: serde refuses `duplicate field`.
            let body = Value::Object(base).to_string();
            let dup = format!("{{\"{field}\":{},{}", t.fields[field_ix].2, &body[1..]);
            (dup.into_bytes(), BAD)
        }
        12 => {
            // Invalid UTF-8 or a lone surrogate inside a string.
            let mut o = base;
            o.insert(field.into(), json!("__SPLICE__"));
            let s = Value::Object(o).to_string();
            let body = if rng.gen_bool(0.5) {
                s.replace("__SPLICE__", "\\ud800").into_bytes()
            } else {
                let mut b = s.replace("__SPLICE__", "AB").into_bytes();
                let at = b.windows(2).position(|w| w == b"AB").unwrap();
                b[at] = 0xff;
                b[at + 1] = 0xfe;
                b
            };
            (body, BAD)
        }
        13 if t.unknown.is_some() => {
            let (v, codes) = t.unknown.as_ref().unwrap();
            (v.to_string().into_bytes(), codes)
        }
        _ => {
            // Control characters in every id field at once.
            let mut o = base;
            for (f, k, _) in &t.fields {
                if *k == Kind::Id {
                    o.insert((*f).into(), json!(format!("id\u{1}{}", rng.gen::<u8>())));
                }
            }
            if t.fields.iter().all(|(_, k, _)| *k != Kind::Id) {
                return (b"{".to_vec(), BAD);
            }
            (Value::Object(o).to_string().into_bytes(), BAD)
        }
    }
}

fn subject_of(stack: &Cluster, name: &str) -> String {
    let s = &stack.subjects;
    match name {
        "register" => s.cmd_node_register(),
        "deregister" => s.cmd_node_deregister(),
        "deploy" => s.cmd_model_deploy(),
        "schedule" => s.cmd_schedule(),
        "exec" => s.cmd_exec(),
        other => unreachable!("{other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_malformed_messages_are_refused_and_append_nothing() {
    let seed: u64 = std::env::var("DEEPNODE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_f00d);
    let mut stack = Cluster::with_services(PolicyConfig::default())
        .await
        .unwrap();

    // Control: one valid registration (so deregister/ingest can name a real node).
    let reply = stack
        .request(
            &stack.subjects.cmd_node_register(),
            &json!({"node_id": "ctl-n1", "domain": "text", "stake": 1.0, "capacity": 2}),
        )
        .await
        .unwrap();
    assert_eq!(reply["ok"], json!(true), "control registration: {reply}");
    // Let the services' views settle so warm-up allocations are not counted as growth.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let head_before = stack.head().await.unwrap();
    let rss_before = rss_bytes();
    let started = Instant::now();

    let mut rng = StdRng::seed_from_u64(seed);
    let mut work = Vec::with_capacity(PER_SUBJECT * 5);
    for t in templates() {
        let subject = subject_of(&stack, t.name);
        for _ in 0..PER_SUBJECT {
            let (body, codes) = mutate(&t, &mut rng);
            work.push((t.name, subject.clone(), body, codes));
        }
    }
    let sent = work.len();
    let client = stack.client.clone();
    let results: Vec<Result<(&str, String), String>> = futures::stream::iter(work)
        .map(|(name, subject, body, codes)| {
            let client = client.clone();
            async move {
                let reply = rpc::request_bytes(
                    &client,
                    &subject,
                    Bytes::from(body.clone()),
                    Duration::from_secs(20),
                )
                .await
                .map_err(|e| format!("{name}: no reply ({e}) to {}", preview(&body)))?;
                let v: Value = serde_json::from_slice(&reply)
                    .map_err(|e| format!("{name}: reply not JSON ({e})"))?;
                if v["ok"] != json!(false) {
                    return Err(format!("{name}: accepted {} -> {v}", preview(&body)));
                }
                let code = v["error"]["code"].as_str().unwrap_or("<none>").to_owned();
                if !codes.contains(&code.as_str()) {
                    return Err(format!(
                        "{name}: code {code} (allowed {codes:?}) for {} -> {v}",
                        preview(&body)
                    ));
                }
                Ok((name, code))
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let command_time = started.elapsed();

    let mut by_code: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok((name, code)) => *by_code.entry((name.to_owned(), code)).or_default() += 1,
            Err(e) => failures.push(e),
        }
    }

    // Ingest: malformed reports through JetStream; each must be terminated, none appended.
    let js = deepnode_bus::async_nats::jetstream::new(stack.client.clone());
    let ingest = ingest_template();
    let terminated_before = Stats::get(&stack.reputation_stats.ingest_terminated);
    let mut published = 0u64;
    let mut refused_by_server = 0u64;
    for i in 0..INGEST {
        let (body, _) = mutate(&ingest, &mut rng);
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("fuzz-{seed}-{i}").as_str());
        match js
            .publish_with_headers(stack.subjects.ingest_execution(), headers, body.into())
            .await
        {
            Ok(ack) => match ack.await {
                Ok(_) => published += 1,
                Err(_) => refused_by_server += 1,
            },
            Err(_) => refused_by_server += 1,
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut terminated = 0;
    while Instant::now() < deadline {
        terminated = Stats::get(&stack.reputation_stats.ingest_terminated) - terminated_before;
        if terminated >= published {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ingested = Stats::get(&stack.reputation_stats.ingested);

    let head_after = stack.head().await.unwrap();
    let rss_after = rss_bytes();
    let ended = stack.ended();
    let elapsed = started.elapsed();

    println!("fuzz seed {seed:#x}: {sent} commands in {command_time:?} (concurrency {CONCURRENCY}), total {elapsed:?}");
    for ((name, code), n) in &by_code {
        println!("  {name:<10} {code:<18} {n}");
    }
    println!(
        "  ingest: {INGEST} generated, {published} stored by JetStream, {refused_by_server} refused by the server, {terminated} terminated, {ingested} ingested"
    );
    println!(
        "  head {head_before} -> {head_after}; RSS {:.1} MiB -> {:.1} MiB",
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0
    );
    for f in failures.iter().take(20) {
        println!("  FAIL {f}");
    }

    assert!(
        failures.is_empty(),
        "{} commands mishandled",
        failures.len()
    );
    assert!(sent >= 10_000);
    assert_eq!(
        terminated, published,
        "every malformed report is terminated"
    );
    assert_eq!(ingested, 0, "no malformed report is ingested");
    assert_eq!(
        head_after, head_before,
        "nothing appended by malformed input"
    );
    assert!(ended.is_empty(), "service tasks ended: {ended:?}");
    assert!(
        rss_after.saturating_sub(rss_before) < 200 * 1024 * 1024,
        "RSS grew by more than 200 MiB"
    );

    // Still serving: a valid registration succeeds afterwards.
    let reply = stack
        .request(
            &stack.subjects.cmd_node_register(),
            &json!({"node_id": "ctl-n2", "domain": "text", "stake": 1.0, "capacity": 2}),
        )
        .await
        .unwrap();
    assert_eq!(reply["ok"], json!(true), "after the fuzz: {reply}");
    stack.stop().await.unwrap();
}

fn preview(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(&body[..body.len().min(120)]).into_owned();
    format!("{s:?} ({} bytes)", body.len())
}
