//! Integration tests of the bus against the real NATS server at `NATS_URL` (default
//! `nats://127.0.0.1:4222`). Every test uses its own random subject prefix and stream names, and
//! deletes the streams it created.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use deepnode_bus::envelope::{parse_command, ErrorCode, Reply};
use deepnode_bus::jetstream::{
    durable_pull_config, ensure_pull_consumer, ensure_streams, publish_with_id, Retention,
    DEFAULT_EVENTS_RETENTION, DEFAULT_INGEST_RETENTION, DUPLICATE_WINDOW,
};
use deepnode_bus::rpc::{self, request_bytes, request_json, serve, serve_with_limit};
use deepnode_bus::{connect, Subjects, CORRELATION_HEADER};
use deepnode_domain::ids::NodeId;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::oneshot;

const T: Duration = Duration::from_secs(5);

async fn client() -> Client {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    connect(&url, "deepnode-bus-test").await.unwrap()
}

fn stopper() -> (oneshot::Sender<()>, impl std::future::Future<Output = ()>) {
    let (tx, rx) = oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
    })
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct Register {
    node_id: NodeId,
    domain: String,
    stake: f64,
    capacity: u32,
}

/// Waits until `subject` has a responder, so a test never races its own server's SUB.
async fn wait_for_responder(client: &Client, subject: &str) {
    for _ in 0..100 {
        match request_bytes(client, subject, Bytes::from_static(b"{}"), T).await {
            Err(rpc::Error::NoResponders { .. }) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            _ => return,
        }
    }
    panic!("no responder on {subject}");
}

#[tokio::test]
async fn served_subject_answers_bad_input_with_envelope_codes() {
    let client = client().await;
    let subjects = Subjects::random();
    let subject = subjects.cmd_node_register();
    let (stop, shutdown) = stopper();
    let server = tokio::spawn({
        let client = client.clone();
        let subject = subject.clone();
        async move {
            serve(
                &client,
                &subject,
                "registry",
                |req: rpc::Request| async move {
                    match parse_command::<Register>(&req.payload) {
                        Ok(cmd) => Reply::ok(&json!({
                            "node_id": cmd.node_id,
                            "correlation_id": req.correlation_id,
                        })),
                        Err(e) => Reply::err(e),
                    }
                },
                shutdown,
            )
            .await
        }
    });
    wait_for_responder(&client, &subject).await;

    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(600 * 1024));
    let cases: Vec<(Bytes, ErrorCode, &str)> = vec![
        (
            Bytes::from_static(b"{oops"),
            ErrorCode::BadRequest,
            "malformed JSON",
        ),
        (Bytes::from_static(b""), ErrorCode::BadRequest, "empty"),
        (
            Bytes::from_static(b"\"str\""),
            ErrorCode::BadRequest,
            "object",
        ),
        (
            Bytes::from_static(br#"{"domain":"d","stake":1,"capacity":2}"#),
            ErrorCode::BadRequest,
            "node_id",
        ),
        (
            Bytes::from_static(br#"{"node_id":"n1","domain":"d","stake":1,"capacity":"two"}"#),
            ErrorCode::BadRequest,
            "capacity",
        ),
        (
            Bytes::from_static(br#"{"node_id":"n 1","domain":"d","stake":1,"capacity":2}"#),
            ErrorCode::BadRequest,
            "node_id",
        ),
        (Bytes::from(big), ErrorCode::PayloadTooLarge, "512 KiB"),
    ];
    for (payload, code, needle) in cases {
        let raw = request_bytes(&client, &subject, payload, T).await.unwrap();
        let reply = Reply::from_slice(&raw).unwrap();
        let err = reply
            .error()
            .unwrap_or_else(|| panic!("not an error: {reply:?}"));
        assert_eq!(err.code, code, "{err:?}");
        assert!(
            err.message.contains(needle),
            "{:?} lacks {needle}",
            err.message
        );
    }

    // A good command still works after all that, and the correlation id travels.
    let mut headers = HeaderMap::new();
    headers.insert(CORRELATION_HEADER, "corr-42");
    let msg = client
        .send_request(
            subject.clone(),
            async_nats::Request::new()
                .headers(headers)
                .payload(Bytes::from_static(
                    br#"{"node_id":"n1","domain":"d","stake":1,"capacity":2}"#,
                ))
                .timeout(Some(T)),
        )
        .await
        .unwrap();
    let reply = Reply::from_slice(&msg.payload).unwrap();
    assert_eq!(reply.field("node_id"), Some(&json!("n1")));
    assert_eq!(reply.field("correlation_id"), Some(&json!("corr-42")));
    let echoed = msg.headers.as_ref().and_then(|h| h.get(CORRELATION_HEADER));
    assert_eq!(echoed.map(|v| v.as_str()), Some("corr-42"));

    // Without the header, a fresh id is generated.
    let value = request_json(
        &client,
        &subject,
        &json!({"node_id":"n2","domain":"d","stake":1,"capacity":2}),
        T,
    )
    .await
    .unwrap();
    assert_eq!(value["ok"], json!(true));
    assert!(!value["correlation_id"].as_str().unwrap().is_empty());

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_panicking_handler_answers_internal_and_keeps_serving() {
    let client = client().await;
    let subject = Subjects::random().cmd_schedule();
    let (stop, shutdown) = stopper();
    let server = tokio::spawn({
        let client = client.clone();
        let subject = subject.clone();
        async move {
            serve(
                &client,
                &subject,
                "q",
                |req: rpc::Request| async move {
                    if req.payload.as_ref() == b"\"boom\"" {
                        panic!("boom");
                    }
                    Reply::ok(&())
                },
                shutdown,
            )
            .await
        }
    });
    wait_for_responder(&client, &subject).await;
    let v = request_json(&client, &subject, &json!("boom"), T)
        .await
        .unwrap();
    assert_eq!(v["error"]["code"], json!("internal"));
    let v = request_json(&client, &subject, &json!({}), T)
        .await
        .unwrap();
    assert_eq!(v, json!({"ok": true}));
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn ensure_streams_is_idempotent() {
    let client = client().await;
    let js = async_nats::jetstream::new(client);
    let subjects = Subjects::random();
    ensure_streams(&js, &subjects, &Retention::default())
        .await
        .unwrap();
    ensure_streams(&js, &subjects, &Retention::default())
        .await
        .unwrap();
    for (name, wildcard) in [
        (subjects.events_stream(), subjects.events_wildcard()),
        (subjects.ingest_stream(), subjects.ingest_wildcard()),
    ] {
        let mut stream = js.get_stream(&name).await.unwrap();
        let info = stream.info().await.unwrap();
        assert_eq!(info.config.subjects, vec![wildcard]);
        assert_eq!(info.config.duplicate_window, DUPLICATE_WINDOW);
        assert_eq!(
            info.config.storage,
            async_nats::jetstream::stream::StorageType::File
        );
    }
    // Consumers too.
    let config = durable_pull_config("reputation", Some(subjects.events("AttemptFailed")));
    ensure_pull_consumer(&js, &subjects.events_stream(), config.clone())
        .await
        .unwrap();
    ensure_pull_consumer(&js, &subjects.events_stream(), config)
        .await
        .unwrap();
    let mut no_name = durable_pull_config("x", None);
    no_name.durable_name = None;
    assert!(
        ensure_pull_consumer(&js, &subjects.events_stream(), no_name)
            .await
            .is_err()
    );

    js.delete_stream(subjects.events_stream()).await.unwrap();
    js.delete_stream(subjects.ingest_stream()).await.unwrap();
    js.delete_stream(subjects.checkpoints_stream())
        .await
        .unwrap();
}

/// A deployment's streams as an older build left them (kept for good) take the retention the
/// services start with, and `FOR_GOOD` takes it back off; the checkpoints stream never gets one.
#[tokio::test]
async fn ensure_streams_applies_the_retention_to_streams_that_exist() {
    let client = client().await;
    let js = async_nats::jetstream::new(client);
    let subjects = Subjects::random();
    let max_age = |name: String| {
        let js = js.clone();
        async move {
            let mut stream = js.get_stream(&name).await.unwrap();
            stream.info().await.unwrap().config.max_age
        }
    };
    let ages = || async {
        [
            max_age(subjects.events_stream()).await,
            max_age(subjects.ingest_stream()).await,
            max_age(subjects.checkpoints_stream()).await,
        ]
    };

    ensure_streams(&js, &subjects, &Retention::FOR_GOOD)
        .await
        .unwrap();
    assert_eq!(ages().await, [Duration::ZERO; 3]);
    let kept = [
        (
            Retention::default(),
            [DEFAULT_EVENTS_RETENTION, DEFAULT_INGEST_RETENTION],
        ),
        (
            Retention {
                events: Some(DUPLICATE_WINDOW),
                ingest: None,
            },
            [DUPLICATE_WINDOW, Duration::ZERO],
        ),
        (Retention::FOR_GOOD, [Duration::ZERO; 2]),
    ];
    for (retention, [events, ingest]) in kept {
        ensure_streams(&js, &subjects, &retention).await.unwrap();
        assert_eq!(
            ages().await,
            [events, ingest, Duration::ZERO],
            "{retention:?}"
        );
    }
    // What JetStream itself refuses, and why `Retention::from_secs` refuses it first.
    let too_short = Retention {
        events: Some(Duration::from_secs(60)),
        ingest: None,
    };
    let e = ensure_streams(&js, &subjects, &too_short)
        .await
        .unwrap_err();
    assert!(e.to_string().contains(&subjects.events_stream()), "{e}");
    assert!(Retention::from_secs(60).is_err());

    for name in [
        subjects.events_stream(),
        subjects.ingest_stream(),
        subjects.checkpoints_stream(),
    ] {
        js.delete_stream(name).await.unwrap();
    }
}

#[tokio::test]
async fn publish_with_id_deduplicates_by_msg_id() {
    let client = client().await;
    let js = async_nats::jetstream::new(client);
    let subjects = Subjects::random();
    ensure_streams(&js, &subjects, &Retention::default())
        .await
        .unwrap();

    let subject = subjects.events("NodeRegistered");
    let id = uuid::Uuid::new_v4().to_string();
    let first = publish_with_id(&js, &subject, &id, Bytes::from_static(b"{\"a\":1}"))
        .await
        .unwrap();
    let again = publish_with_id(&js, &subject, &id, Bytes::from_static(b"{\"a\":1}"))
        .await
        .unwrap();
    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!(first.sequence, again.sequence);
    assert_eq!(first.stream, subjects.events_stream());
    let other = publish_with_id(&js, &subject, "other-id", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    assert!(!other.duplicate);

    let ingest = publish_with_id(
        &js,
        &subjects.ingest_execution(),
        &id,
        Bytes::from_static(b"{}"),
    )
    .await
    .unwrap();
    assert_eq!(ingest.stream, subjects.ingest_stream());

    // Exactly two messages reach a consumer of the events stream.
    let consumer = ensure_pull_consumer(
        &js,
        &subjects.events_stream(),
        durable_pull_config("check", None),
    )
    .await
    .unwrap();
    let mut batch = consumer
        .fetch()
        .max_messages(10)
        .expires(Duration::from_millis(500))
        .messages()
        .await
        .unwrap();
    let mut seen = 0;
    while let Some(msg) = batch.next().await {
        msg.unwrap().ack().await.unwrap();
        seen += 1;
    }
    assert_eq!(seen, 2);

    // Publishing where no stream listens is an error, not a hang.
    let nowhere = Subjects::random().events("X");
    assert!(publish_with_id(&js, &nowhere, "i", Bytes::new())
        .await
        .is_err());

    js.delete_stream(subjects.events_stream()).await.unwrap();
    js.delete_stream(subjects.ingest_stream()).await.unwrap();
    js.delete_stream(subjects.checkpoints_stream())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_queue_group_of_two_handles_each_request_once() {
    let client = client().await;
    let subject = Subjects::random().cmd_exec();
    let counts = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let mut stops = Vec::new();
    let mut servers = Vec::new();
    for (i, count) in counts.iter().enumerate() {
        let (stop, shutdown) = stopper();
        stops.push(stop);
        // Each copy has its own connection, as separate processes would.
        let own = self::client().await;
        let count = count.clone();
        let subject = subject.clone();
        servers.push(tokio::spawn(async move {
            serve(
                &own,
                &subject,
                "scheduler",
                move |_req: rpc::Request| {
                    let count = count.clone();
                    async move {
                        count.fetch_add(1, Ordering::SeqCst);
                        Reply::ok(&json!({ "server": i }))
                    }
                },
                shutdown,
            )
            .await
        }));
    }
    // Both subscriptions must be live before counting: probe until each copy has answered one.
    wait_for_responder(&client, &subject).await;
    let mut probes = 0;
    while counts.iter().any(|c| c.load(Ordering::SeqCst) == 0) {
        probes += 1;
        assert!(probes <= 1_000, "one copy never answered a probe");
        request_json(&client, &subject, &json!({}), T)
            .await
            .unwrap();
    }
    let before = counts[0].load(Ordering::SeqCst) + counts[1].load(Ordering::SeqCst);

    let n = 200;
    let empty = json!({});
    let replies =
        futures::future::join_all((0..n).map(|_| request_json(&client, &subject, &empty, T))).await;
    let mut served_by = [0usize; 2];
    for reply in replies {
        let reply = reply.unwrap();
        served_by[reply["server"].as_u64().unwrap() as usize] += 1;
    }
    let handled = counts[0].load(Ordering::SeqCst) + counts[1].load(Ordering::SeqCst) - before;
    assert_eq!(handled, n, "each request handled exactly once");
    assert_eq!(served_by[0] + served_by[1], n);
    assert!(served_by[0] > 0 && served_by[1] > 0, "{served_by:?}");

    for stop in stops {
        stop.send(()).unwrap();
    }
    for s in servers {
        s.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_then_returns() {
    let client = client().await;
    let subject = Subjects::random().cmd_model_deploy();
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (stop, shutdown) = stopper();
    let server_client = self::client().await;
    let server = tokio::spawn({
        let subject = subject.clone();
        async move {
            serve_with_limit(
                &server_client,
                &subject,
                "rotation",
                2,
                move |req: rpc::Request| {
                    let started_tx = started_tx.clone();
                    async move {
                        if req.payload.as_ref() == b"{}" {
                            return Reply::ok(&());
                        }
                        let _ = started_tx.send(());
                        tokio::time::sleep(Duration::from_millis(400)).await;
                        Reply::ok(&json!({"slow": true}))
                    }
                },
                shutdown,
            )
            .await
        }
    });
    wait_for_responder(&client, &subject).await;

    // Four slow requests with a limit of two: two run, two wait in the buffer.
    let requests: Vec<_> = (0..4)
        .map(|_| {
            let client = client.clone();
            let subject = subject.clone();
            tokio::spawn(async move { request_json(&client, &subject, &json!({"x": 1}), T).await })
        })
        .collect();
    started_rx.recv().await.unwrap();
    started_rx.recv().await.unwrap();
    stop.send(()).unwrap();

    for r in requests {
        let v = r.await.unwrap().unwrap();
        assert_eq!(v, json!({"ok": true, "slow": true}));
    }
    tokio::time::timeout(T, server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // Nobody serves the subject any more.
    let after = request_bytes(&client, &subject, Bytes::from_static(b"{}"), T).await;
    assert!(
        matches!(after, Err(rpc::Error::NoResponders { .. })),
        "{after:?}"
    );
}

#[tokio::test]
async fn shutdown_on_an_idle_connection_returns_promptly() {
    // A drained subscription ends only when the connection task wakes; with no traffic at all that
    // used to be the next server ping, so a service stopped while idle hung for up to minutes.
    let client = client().await;
    let subject = Subjects::random().cmd_schedule();
    let (stop, shutdown) = stopper();
    let server_client = self::client().await;
    let server = tokio::spawn({
        let subject = subject.clone();
        async move {
            serve(
                &server_client,
                &subject,
                "scheduler",
                |_req: rpc::Request| async { Reply::ok(&()) },
                shutdown,
            )
            .await
        }
    });
    wait_for_responder(&client, &subject).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // idle
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(1), server)
        .await
        .expect("serve returns within 1 s of shutdown on an idle connection")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn request_without_responder_is_reported() {
    let client = client().await;
    let subject = Subjects::random().cmd_exec();
    let err = request_json(&client, &subject, &json!({}), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, rpc::Error::NoResponders { .. }), "{err:?}");
}

#[tokio::test]
async fn connect_gives_up_on_an_unreachable_server() {
    let policy = deepnode_bus::ConnectPolicy {
        deadline: Duration::from_millis(500),
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(100),
        attempt_timeout: Duration::from_millis(200),
    };
    let err = deepnode_bus::connect_with("nats://127.0.0.1:1", "nobody", policy)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
}
