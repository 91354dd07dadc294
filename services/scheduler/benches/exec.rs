//! Benchmark of `cmd.exec` (run: `cargo bench -p deepnode-scheduler --bench exec`): with simulated
//! nodes answering instantly, p50/p99 of a direct NATS request to a node vs `cmd.exec` through the
//! scheduler at ~1,000 requests/s (open loop), sustained exec/s at saturation (closed loop, many
//! concurrent clients), and failover time when the primary never answers (when the backup is asked,
//! and when the caller has its answer).
//!
//! Everything (Postgres aside) runs in this one process on the same cores: the clients, the
//! simulated nodes and the scheduler. Real Postgres (durable commits) and real NATS, as in the tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/it/common.rs"]
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{node, test_policy, Harness};
use deepnode_bus::rpc;
use deepnode_sim::{Behaviour, Latency, SimNode};
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::json;

const RATE: u64 = 1_000;
const PACED_REQUESTS: u64 = 5_000;
const SATURATION_CLIENTS: usize = 256;
const SATURATION_SECS: u64 = 10;
/// Models whose primary never answers; each serves two failovers before that node is ejected.
const FAILOVER_MODELS: usize = 25;

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1_000.0
}

/// Sends `n` requests at `RATE`/s (open loop) and records each reply's latency in microseconds.
async fn paced<F, Fut>(n: u64, send: F) -> (Histogram<u64>, u64)
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let hist = Arc::new(std::sync::Mutex::new(Histogram::<u64>::new(3).unwrap()));
    let failures = Arc::new(AtomicU64::new(0));
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        tick.tick().await;
        let fut = send(i);
        let (hist, failures) = (hist.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let ok = fut.await;
            let us = started.elapsed().as_micros() as u64;
            if !ok {
                failures.fetch_add(1, Ordering::Relaxed);
            }
            hist.lock().unwrap().record(us.max(1)).unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let h = hist.lock().unwrap().clone();
    (h, failures.load(Ordering::Relaxed))
}

#[tokio::main]
async fn main() {
    let mut h = Harness::new().await;
    for id in ["a", "b"] {
        h.given().node(id, 1_000_000).await;
    }
    h.given().deployment("m-1", &["a", "b"]).await;
    let mut nodes = vec![
        SimNode::new(node("a"), "text").with_behaviour(Behaviour::healthy(Latency::fixed_ms(0))),
        SimNode::new(node("b"), "text").with_behaviour(Behaviour::healthy(Latency::fixed_ms(0))),
    ];
    // Failover fixtures: models whose boosted primary never answers.
    for k in 0..FAILOVER_MODELS {
        let (bad, good) = (format!("dead-{k}"), format!("spare-{k}"));
        h.given().node(&bad, 1_000).await;
        h.given().node(&good, 1_000).await;
        h.given()
            .deployment(&format!("f-{k}"), &[&bad, &good])
            .await;
        h.boost(&bad, 5).await;
        nodes.push(SimNode::new(node(&bad), "text").with_behaviour(Behaviour::always_timeout()));
        nodes.push(
            SimNode::new(node(&good), "text")
                .with_behaviour(Behaviour::healthy(Latency::fixed_ms(0))),
        );
    }
    for n in &mut nodes {
        n.capacity = 1_000_000;
    }
    h.start_sim(nodes).await;
    // The lower-ranked replica gets no share, so each failover fixture's dead node is attempt 1.
    h.start_scheduler(test_policy(), "bench").await;
    let client = h.client.clone();
    let infer = h.subjects.node_infer(&node("a"));
    let exec = h.subjects.cmd_exec();
    let timeout = Duration::from_secs(30);

    // Warm-up (connections, JIT-free but caches and pools).
    for i in 0..500u64 {
        let body = json!({"request_id": format!("w-{i}"), "model_id": "m-1", "input": i});
        let _ = rpc::request_json(&client, &exec, &body, timeout).await;
    }

    let (direct, direct_fail) = paced(PACED_REQUESTS, |i| {
        let (client, subject) = (client.clone(), infer.clone());
        async move {
            let body = Bytes::from(
                json!({"request_id": format!("d-{i}"), "model_id": "m-1", "input": i}).to_string(),
            );
            rpc::request_bytes(&client, &subject, body, timeout)
                .await
                .is_ok()
        }
    })
    .await;
    let (through, through_fail) = paced(PACED_REQUESTS, |i| {
        let (client, subject) = (client.clone(), exec.clone());
        async move {
            let body = json!({"request_id": format!("p-{i}"), "model_id": "m-1", "input": i});
            matches!(rpc::request_json(&client, &subject, &body, timeout).await, Ok(v) if v["ok"] == json!(true))
        }
    })
    .await;

    // Failover: attempt timeout 100 ms on a primary that never answers (before the saturation run,
    // whose backlog — the log follower folding it, autovacuum — would be measured too).
    // Two measures: when the backup is asked (a copy of each request to the spare node, timestamped
    // as it arrives here), and when the caller has the answer (the backup's answer, recorded).
    let mut failover = Histogram::<u64>::new(3).unwrap();
    let mut backup_asked = Histogram::<u64>::new(3).unwrap();
    for k in 0..FAILOVER_MODELS {
        let mut copies = client
            .subscribe(h.subjects.node_infer(&node(&format!("spare-{k}"))))
            .await
            .unwrap();
        client.flush().await.unwrap();
        let (arrived, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
        let watcher = tokio::spawn(async move {
            while copies.next().await.is_some() {
                let _ = arrived.send(Instant::now());
            }
        });
        for j in 0..2 {
            let body = json!({"request_id": format!("f-{k}-{j}"), "model_id": format!("f-{k}"), "input": j, "timeout_ms": 100});
            let t = Instant::now();
            let v = rpc::request_json(&client, &exec, &body, timeout)
                .await
                .unwrap();
            assert_eq!(v["attempts"].as_array().map(Vec::len), Some(2), "{v}");
            failover.record(t.elapsed().as_micros() as u64).unwrap();
            let asked = arrivals.recv().await.unwrap();
            backup_asked
                .record(asked.duration_since(t).as_micros() as u64)
                .unwrap();
        }
        watcher.abort();
    }

    // Saturation: closed loop, many clients.
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(SATURATION_SECS);
    let started = Instant::now();
    let workers: Vec<_> = (0..SATURATION_CLIENTS)
        .map(|w| {
            let (client, subject, done, failed) =
                (client.clone(), exec.clone(), done.clone(), failed.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let body =
                        json!({"request_id": format!("s-{w}-{i}"), "model_id": "m-1", "input": i});
                    match rpc::request_json(&client, &subject, &body, timeout).await {
                        Ok(v) if v["ok"] == json!(true) => done.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    i += 1;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let rate = done.load(Ordering::Relaxed) as f64 / secs;

    // What bounds it: one durable append (4 events to a new stream, as an exec's record) measured alone,
    // sequentially.
    let mut append = Histogram::<u64>::new(3).unwrap();
    let placed_before = h.store.writer_stats().placed();
    for i in 0..300 {
        let event = deepnode_domain::events::DomainEvent::ExecutionRequested(
            deepnode_domain::events::ExecutionRequested {
                request_id: deepnode_domain::ids::RequestId::parse(&format!("a-{i}")).unwrap(),
                model_id: deepnode_domain::ids::ModelId::parse("m-1").unwrap(),
                timeout_ms: 1,
            },
        );
        let stream = event.stream_id();
        let meta = deepnode_domain::events::Metadata::new("bench", "append");
        let events = (0..4)
            .map(|_| event.to_new_event(uuid::Uuid::new_v4(), meta.clone(), chrono::Utc::now()))
            .collect();
        let t = Instant::now();
        h.store
            .append(
                &stream,
                deepnode_domain::log::ExpectedVersion::NoStream,
                events,
            )
            .await
            .unwrap();
        append.record(t.elapsed().as_micros() as u64).unwrap();
    }
    let placed = h.store.writer_stats().placed() - placed_before;

    println!("## cmd.exec benchmark (simulated nodes answering instantly)\n");
    println!("| measure | p50 ms | p99 ms | failures |");
    println!("|---|---|---|---|");
    println!(
        "| direct NATS request to a node @ {RATE}/s | {:.3} | {:.3} | {direct_fail} |",
        ms(&direct, 0.5),
        ms(&direct, 0.99)
    );
    println!(
        "| cmd.exec through the scheduler @ {RATE}/s | {:.3} | {:.3} | {through_fail} |",
        ms(&through, 0.5),
        ms(&through, 0.99)
    );
    println!(
        "| added by the scheduler | {:.3} | {:.3} | |",
        ms(&through, 0.5) - ms(&direct, 0.5),
        ms(&through, 0.99) - ms(&direct, 0.99)
    );
    println!(
        "| failover: backup asked, beyond the 100 ms attempt timeout (from the caller's send) | {:.3} | {:.3} | |",
        ms(&backup_asked, 0.5) - 100.0,
        ms(&backup_asked, 0.99) - 100.0
    );
    println!(
        "| failover, attempt timeout 100 ms (end to end) | {:.3} | {:.3} | |",
        ms(&failover, 0.5),
        ms(&failover, 0.99)
    );
    println!(
        "| failover overhead beyond the timeout | {:.3} | {:.3} | |",
        ms(&failover, 0.5) - 100.0,
        ms(&failover, 0.99) - 100.0
    );
    println!(
        "| one durable 4-event append, alone (an exec's one record; {placed} of 300 placed) | {:.3} | {:.3} | |",
        ms(&append, 0.5),
        ms(&append, 0.99)
    );
    println!(
        "\nsaturation: {:.0} exec/s sustained ({} ok, {} failed, {SATURATION_CLIENTS} concurrent clients, {secs:.1} s), every outcome durable before its reply",
        rate,
        done.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    h.stop().await;
}
