//! `cmd.schedule` replies (factors reproduce scores, filter reasons, unknown model, no eligible
//! nodes) and bad input on both subjects: the right code, nothing appended, the service stays up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::{node, test_policy, Harness};
use deepnode_domain::config::PolicyConfig;
use serde_json::{json, Value};

#[tokio::test]
async fn a_domain_named_in_the_policy_file_weighs_stake() {
    let mut h = Harness::new().await;
    for (id, boost) in [("n-1", 0), ("n-2", 6)] {
        h.given().node(id, 8).await;
        h.boost(id, boost).await;
    }
    h.given().deployment("m-1", &["n-1", "n-2"]).await;
    // given a policy file that enables stake for the nodes' domain
    let policy = PolicyConfig::from_toml_str("[routing]\nstake_domains = [\"text\"]\n").unwrap();
    h.start_scheduler(policy, "scheduler").await;

    let reply = h.schedule(json!({"model_id": "m-1"})).await;
    assert_eq!(reply["ok"], json!(true), "{reply}");
    assert_eq!(reply["stake_enabled"], json!(true), "{reply}");
    let w = &reply["weights"];
    let bps = |v: &Value| (v.as_f64().unwrap() * 10_000.0).round() as u64;
    let (wr, wl, wf, ws) = (
        bps(&w["reputation"]),
        bps(&w["load"]),
        bps(&w["failure_rate"]),
        bps(&w["stake"]),
    );
    assert_eq!((wr, wl, wf, ws), (4_000, 2_500, 2_500, 1_000));
    for c in reply["candidates"].as_array().unwrap() {
        let f = &c["factors"];
        // Equal stakes: S = stake / (stake + the domain's median) = 0.5.
        assert_eq!(bps(&f["stake"]), 5_000, "{c}");
        let sum = wr * bps(&f["reputation"])
            + wl * (10_000 - bps(&f["load"]))
            + wf * (10_000 - bps(&f["failure_rate"]))
            + ws * bps(&f["stake"]);
        assert_eq!(sum / (wr + wl + wf + ws), bps(&c["score"]), "{c}");
    }
    h.stop().await;
}

#[tokio::test]
async fn schedule_reply_factors_reproduce_each_score() {
    let mut h = Harness::new().await;
    for (id, boost) in [("n-1", 0), ("n-2", 4), ("n-3", 12)] {
        h.given().node(id, 8).await;
        h.boost(id, boost).await;
    }
    h.given().deployment("m-1", &["n-1", "n-2", "n-3"]).await;
    h.given().node("off", 8).await;
    h.deregister("off").await;
    h.given().deployment("m-off", &["off"]).await;
    h.start_scheduler(PolicyConfig::default(), "scheduler")
        .await;

    let reply = h.schedule(json!({"model_id": "m-1"})).await;
    assert_eq!(reply["ok"], json!(true), "{reply}");
    let candidates = reply["candidates"].as_array().unwrap();
    assert_eq!(candidates.len(), 3);
    let w = &reply["weights"];
    let bps = |v: &Value| (v.as_f64().unwrap() * 10_000.0).round() as u64;
    let (wr, wl, wf) = (
        bps(&w["reputation"]),
        bps(&w["load"]),
        bps(&w["failure_rate"]),
    );
    assert_eq!((wr, wl, wf), (4_000, 2_500, 2_500));
    assert_eq!(reply["stake_enabled"], json!(false));
    for c in candidates {
        let f = &c["factors"];
        // score = (wR·R + wL·(1−L) + wF·(1−F)) / Σw (stake off: renormalised), in basis points.
        let sum = wr * bps(&f["reputation"])
            + wl * (10_000 - bps(&f["load"]))
            + wf * (10_000 - bps(&f["failure_rate"]));
        let score = sum / (wr + wl + wf);
        assert_eq!(score, bps(&c["score"]), "{c}");
        assert!((0.0..=1.0).contains(&c["score"].as_f64().unwrap()));
    }
    // Ranked best first; the most successful node is primary (default policy: share ≤ 50 %).
    let scores: Vec<f64> = candidates
        .iter()
        .map(|c| c["score"].as_f64().unwrap())
        .collect();
    assert!(scores.windows(2).all(|p| p[0] >= p[1]), "{scores:?}");
    assert_eq!(candidates[0]["node_id"], json!("n-3"));
    assert!(reply["primary"].is_string() && reply["backup"].is_string());
    assert_ne!(reply["primary"], reply["backup"]);
    assert_eq!(reply["config_hash"].as_str().unwrap().len(), 64);

    let unknown = h.schedule(json!({"model_id": "nope"})).await;
    assert_eq!(
        unknown["error"]["code"],
        json!("unknown_model"),
        "{unknown}"
    );
    let none = h.schedule(json!({"model_id": "m-off"})).await;
    assert_eq!(none["error"]["code"], json!("no_eligible_nodes"), "{none}");
    let exec_none = h
        .exec(json!({"request_id": "r-1", "model_id": "m-off", "input": 1}))
        .await;
    assert_eq!(exec_none["error"]["code"], json!("no_eligible_nodes"));
    let exec_unknown = h
        .exec(json!({"request_id": "r-2", "model_id": "nope", "input": 1}))
        .await;
    assert_eq!(exec_unknown["error"]["code"], json!("unknown_model"));
    // CONTRACT §3: a refused exec is not charged and lists no attempts.
    // Nothing was recorded for either id, and a later request may run: they say so.
    for refused in [&exec_none, &exec_unknown] {
        assert_eq!(refused["charged"], json!(false), "{refused}");
        assert_eq!(refused["attempts"], json!([]), "{refused}");
        assert_eq!(refused["retryable"], json!(true), "{refused}");
    }
    assert_eq!(h.count("ExecutionRequested", "r-1").await, 0);
    h.stop().await;
}

#[tokio::test]
async fn bad_input_gets_the_right_code_appends_nothing_and_the_service_stays_up() {
    let mut h = Harness::new().await;
    h.given().node("a", 8).await;
    h.given().node("b", 8).await;
    h.given().deployment("m-1", &["a", "b"]).await;
    h.start_scheduler(test_policy(), "scheduler").await;
    let head = h.head().await;

    let long_id = "r".repeat(129);
    let big = format!(
        r#"{{"request_id":"r-big","model_id":"m-1","input":"{}"}}"#,
        "x".repeat(600 * 1024)
    );
    let exec_cases: Vec<(Vec<u8>, &str)> = vec![
        (b"not json".to_vec(), "bad_request"),
        (b"{\"request_id\": \"r-1\",".to_vec(), "bad_request"),
        (b"".to_vec(), "bad_request"),
        (b"[1,2,3]".to_vec(), "bad_request"),
        (
            json!({"model_id": "m-1", "input": 1})
                .to_string()
                .into_bytes(),
            "bad_request",
        ),
        (
            json!({"request_id": "r-1", "input": 1})
                .to_string()
                .into_bytes(),
            "bad_request",
        ),
        (
            json!({"request_id": "r-1", "model_id": "m-1"})
                .to_string()
                .into_bytes(),
            "bad_request",
        ),
        (
            json!({"request_id": 7, "model_id": "m-1", "input": 1})
                .to_string()
                .into_bytes(),
            "bad_request",
        ),
        (
            json!({"request_id": "r 1", "model_id": "m-1", "input": 1})
                .to_string()
                .into_bytes(),
            "bad_request",
        ),
        (
            json!({"request_id": "", "model_id": "m-1", "input": 1})
                .to_string()
                .into_bytes(),
            "bad_request",
        ),
        (
            json!({"request_id": long_id, "model_id": "m-1", "input": 1})
                .to_string()
                .into_bytes(),
            "bad_request",
        ),
        (
            json!({"request_id": "r-1", "model_id": "m/1", "input": 1})
                .to_string()
                .into_bytes(),
            "bad_request",
        ),
        (
            json!({"request_id": "r-1", "model_id": "m-1", "input": 1, "timeout_ms": "soon"})
                .to_string()
                .into_bytes(),
            "bad_request",
        ),
        (
            json!({"request_id": "r-1", "model_id": "m-1", "input": 1, "timeout_ms": 0})
                .to_string()
                .into_bytes(),
            "bad_request",
        ),
        (
            json!({"request_id": "r-1", "model_id": "m-1", "input": 1, "timeout_ms": -5})
                .to_string()
                .into_bytes(),
            "bad_request",
        ),
        (
            json!({"request_id": "r-1", "model_id": "m-1", "input": 1, "timeout_ms": 999_999_999})
                .to_string()
                .into_bytes(),
            "bad_request",
        ),
        (big.into_bytes(), "payload_too_large"),
    ];
    for (payload, code) in exec_cases {
        let shown = String::from_utf8_lossy(&payload[..payload.len().min(80)]).into_owned();
        let reply = h.request(&h.subjects.cmd_exec(), payload).await;
        assert_eq!(reply["ok"], json!(false), "{shown}");
        assert_eq!(reply["error"]["code"], json!(code), "{shown}: {reply}");
        assert_eq!(reply["charged"], json!(false), "{shown}: {reply}");
        assert_eq!(reply["attempts"], json!([]), "{shown}: {reply}");
        assert_eq!(reply["retryable"], json!(false), "{shown}: {reply}");
        assert!(reply["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    let missing = h
        .request(
            &h.subjects.cmd_exec(),
            json!({"request_id": "r-1", "model_id": "m-1"})
                .to_string()
                .into_bytes(),
        )
        .await;
    assert!(
        missing["error"]["message"]
            .as_str()
            .unwrap()
            .contains("input"),
        "{missing}"
    );

    let schedule_cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{".to_vec(), "bad_request"),
        (b"{}".to_vec(), "bad_request"),
        (
            json!({"model_id": 5}).to_string().into_bytes(),
            "bad_request",
        ),
        (
            json!({"model_id": "a b"}).to_string().into_bytes(),
            "bad_request",
        ),
        (vec![b' '; 513 * 1024], "payload_too_large"),
    ];
    for (payload, code) in schedule_cases {
        let reply = h.request(&h.subjects.cmd_schedule(), payload).await;
        assert_eq!(reply["error"]["code"], json!(code), "{reply}");
    }
    assert_eq!(h.head().await, head, "bad input appends nothing");
    // Still serving.
    let ok = h.schedule(json!({"model_id": "m-1"})).await;
    assert_eq!(ok["ok"], json!(true), "{ok}");
    assert_eq!(ok["filtered"], json!([]));
    let _ = node("a");
    h.stop().await;
}
