//! With the event store unreachable, `cmd.exec` answers `unavailable` (safe to retry) instead of
//! executing unrecorded, and the service keeps answering.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use common::{node, test_policy, Harness};
use deepnode_sim::{Behaviour, Latency, SimNode};
use deepnode_store::EventStore;
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use sqlx::{ConnectOptions, Connection};

#[tokio::test]
async fn an_unreachable_store_is_unavailable() {
    let mut h = Harness::new().await;
    h.given().node("a", 8).await;
    h.given().node("b", 8).await;
    h.given().deployment("m-1", &["a", "b"]).await;
    h.start_sim(vec![
        SimNode::new(node("a"), "text").with_behaviour(Behaviour::healthy(Latency::fixed_ms(0))),
        SimNode::new(node("b"), "text").with_behaviour(Behaviour::healthy(Latency::fixed_ms(0))),
    ])
    .await;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
        .connect(h.db.url())
        .await
        .unwrap();
    h.start_scheduler_on(EventStore::from_pool(pool), test_policy(), "scheduler")
        .await;
    let ok = h
        .exec(json!({"request_id": "r-0", "model_id": "m-1", "input": 0}))
        .await;
    assert_eq!(ok["ok"], json!(true), "{ok}");

    // Cut the database off: refuse new connections and kill the open ones.
    let admin_url = deepnode_testkit::with_database(h.db.url(), "postgres");
    let mut admin = sqlx::postgres::PgConnectOptions::from_url(&admin_url.parse().unwrap())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let name = h.db.name().to_owned();
    sqlx::query(&format!(
        "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false"
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    h.db.kill_connections().await;

    let reply = h
        .exec(json!({"request_id": "r-1", "model_id": "m-1", "input": 1}))
        .await;
    assert_eq!(reply["error"]["code"], json!("unavailable"), "{reply}");
    // Still serving other subjects.
    let schedule = h.schedule(json!({"model_id": "m-1"})).await;
    assert_eq!(schedule["ok"], json!(true), "{schedule}");

    sqlx::query(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true"))
        .execute(&mut admin)
        .await
        .unwrap();
    admin.close().await.unwrap();
    h.stop().await;
}
