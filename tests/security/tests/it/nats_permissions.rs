//! NATS security (issue 5): starts a private `nats-server` with `deploy/nats.conf` (own port, store
//! directory and passwords in its environment) and proves the per-role permissions: a node cannot
//! publish a command, cannot subscribe to, answer or impersonate another node, can answer its own
//! infer subject and publish its own heartbeat; the ingest credential can publish ingest reports
//! (JetStream acks them) but not commands; anonymous and wrong-password connections are refused.
//!
//! Evidence is twofold: a watcher with the admin credential receives nothing for a refused publish,
//! and the offending client's connection reports the server's "Permissions Violation" error. The
//! services themselves run under the same file in `services_under_nats_conf`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deepnode_bus::async_nats::{self, Client, ConnectOptions, Event};
use deepnode_bus::connect::{connect_with_auth, Auth, ConnectPolicy};
use deepnode_bus::Subjects;
use deepnode_security_tests::NatsServer;
use futures::StreamExt;

pub(crate) const PASSWORDS: &[(&str, &str)] = &[
    ("DEEPNODE_NATS_SCHEDULER_PASSWORD", "sched-secret"),
    ("DEEPNODE_NATS_REPUTATION_PASSWORD", "rep-secret"),
    ("DEEPNODE_NATS_ROTATION_PASSWORD", "rot-secret"),
    ("DEEPNODE_NATS_INGEST_PASSWORD", "ingest-secret"),
    ("DEEPNODE_NATS_NODE_N1_PASSWORD", "n1-secret"),
    ("DEEPNODE_NATS_NODE_N2_PASSWORD", "n2-secret"),
    ("DEEPNODE_NATS_ADMIN_PASSWORD", "admin-secret"),
];

pub(crate) fn conf() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/nats.conf")
}

fn password(user: &str) -> &'static str {
    let var = match user {
        "node-n1" => "DEEPNODE_NATS_NODE_N1_PASSWORD",
        "node-n2" => "DEEPNODE_NATS_NODE_N2_PASSWORD",
        "scheduler" => "DEEPNODE_NATS_SCHEDULER_PASSWORD",
        "ingest" => "DEEPNODE_NATS_INGEST_PASSWORD",
        _ => "DEEPNODE_NATS_ADMIN_PASSWORD",
    };
    PASSWORDS.iter().find(|(k, _)| *k == var).unwrap().1
}

/// A client as `user`, with the server errors it receives collected.
async fn client_as(server: &NatsServer, user: &str) -> (Client, Arc<Mutex<Vec<String>>>) {
    let errors = Arc::new(Mutex::new(Vec::new()));
    let sink = errors.clone();
    let mut options = ConnectOptions::with_user_and_password(user.into(), password(user).into())
        .event_callback(move |event| {
            let sink = sink.clone();
            async move {
                if let Event::ServerError(e) = event {
                    sink.lock().unwrap().push(e.to_string());
                }
            }
        });
    if user == "ingest" {
        options = options.custom_inbox_prefix("_INBOX_INGEST");
    }
    let client = options.connect(server.url()).await.unwrap();
    (client, errors)
}

/// Waits briefly for a message; `None` if nothing arrives (for checks that nothing does).
async fn next(sub: &mut async_nats::Subscriber) -> Option<async_nats::Message> {
    tokio::time::timeout(Duration::from_millis(600), sub.next())
        .await
        .ok()
        .flatten()
}

/// Waits for a message that must arrive: generously, since on a loaded 2-core machine a delivery
/// can take longer than an absence check waits.
async fn expect_next(sub: &mut async_nats::Subscriber, what: &str) -> async_nats::Message {
    tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("{what}: nothing arrived within 10 s"))
}

/// Subscribes `client` to `subject` and returns once the server routes to it: a probe the client
/// publishes to `probe` (a subject the subscription matches) comes back. `flush` alone is not that
/// signal — async-nats only writes its buffer to the socket — so under load another connection's
/// message could reach the server before this subscription does, and be lost (or an absence check
/// pass without testing anything).
async fn watch(client: &Client, subject: String, probe: String) -> async_nats::Subscriber {
    let mut sub = client.subscribe(subject).await.unwrap();
    client.publish(probe, "probe".into()).await.unwrap();
    client.flush().await.unwrap();
    let echo = expect_next(&mut sub, "the watch's own probe").await;
    assert_eq!(&echo.payload[..], b"probe");
    sub
}

async fn violations(errors: &Arc<Mutex<Vec<String>>>, expect: &str) -> bool {
    for _ in 0..20 {
        if errors
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.to_lowercase().contains("permissions violation") && e.contains(expect))
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_conf_confines_nodes_ingest_and_services() {
    let server = NatsServer::start(&conf(), PASSWORDS).await.unwrap();
    let s = Subjects::new();
    let n1 = deepnode_domain::ids::NodeId::parse("n1").unwrap();
    let n2 = deepnode_domain::ids::NodeId::parse("n2").unwrap();
    let (admin, _) = client_as(&server, "admin").await;
    let (node1, node1_errors) = client_as(&server, "node-n1").await;

    // Credentials are required and checked.
    assert!(
        async_nats::connect(server.url()).await.is_err(),
        "anonymous connection accepted"
    );
    assert!(
        ConnectOptions::with_user_and_password("node-n1".into(), "wrong".into())
            .connect(server.url())
            .await
            .is_err(),
        "wrong password accepted"
    );
    // The runtime's connect path authenticates from explicit (normally environment) credentials.
    let quick = ConnectPolicy {
        deadline: Duration::from_secs(2),
        ..ConnectPolicy::default()
    };
    let via_bus = connect_with_auth(
        &server.url(),
        "scheduler",
        quick,
        &Auth::UserPassword("scheduler".into(), password("scheduler").into()),
    )
    .await
    .unwrap();

    // 1. A node cannot publish a command.
    let mut exec_watch = watch(&admin, s.cmd_exec(), s.cmd_exec()).await;
    node1.publish(s.cmd_exec(), "{}".into()).await.unwrap();
    node1.flush().await.unwrap();
    assert!(
        next(&mut exec_watch).await.is_none(),
        "node published cmd.exec"
    );
    assert!(violations(&node1_errors, "deepnode.cmd.exec").await);
    // ...nor register itself or anyone else.
    let mut reg_watch = watch(&admin, s.cmd_node_register(), s.cmd_node_register()).await;
    node1
        .publish(s.cmd_node_register(), "{}".into())
        .await
        .unwrap();
    node1.flush().await.unwrap();
    assert!(
        next(&mut reg_watch).await.is_none(),
        "node published cmd.node.register"
    );

    // 2. A node answers its own infer subject (positive control)...
    let mut own = node1.subscribe(s.node_infer(&n1)).await.unwrap();
    node1.flush().await.unwrap();
    let answering = tokio::spawn({
        let node1 = node1.clone();
        async move {
            if let Some(m) = own.next().await {
                if let Some(reply) = m.reply {
                    node1
                        .publish(reply, r#"{"output":"n1"}"#.into())
                        .await
                        .unwrap();
                    node1.flush().await.unwrap();
                }
            }
        }
    });
    // Interest can take a moment to be visible to the requester: retry "no responders" briefly.
    let mut answer = None;
    for _ in 0..30 {
        match tokio::time::timeout(
            Duration::from_secs(3),
            admin.request(s.node_infer(&n1), "{}".into()),
        )
        .await
        {
            Ok(Ok(m)) => {
                answer = Some(m);
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let answer = answer.expect("own infer answered");
    assert_eq!(&answer.payload[..], br#"{"output":"n1"}"#);
    answering.await.unwrap();

    // ...but cannot subscribe to another node's infer subject...
    // (the server's refusal is the signal that it has seen the subscription)
    let mut stolen = node1.subscribe(s.node_infer(&n2)).await.unwrap();
    node1.flush().await.unwrap();
    assert!(violations(&node1_errors, "deepnode.node.n2.infer").await);
    admin.publish(s.node_infer(&n2), "{}".into()).await.unwrap();
    admin.flush().await.unwrap();
    assert!(
        next(&mut stolen).await.is_none(),
        "node 1 received node 2's infer request"
    );

    // ...nor answer it: the request's reply inbox is not a subject it may publish to.
    let inbox = format!("_INBOX.forged.{}", uuid::Uuid::new_v4().simple());
    let mut reply_watch = watch(&admin, inbox.clone(), inbox.clone()).await;
    node1
        .publish(inbox.clone(), r#"{"output":"forged"}"#.into())
        .await
        .unwrap();
    node1.flush().await.unwrap();
    assert!(
        next(&mut reply_watch).await.is_none(),
        "node 1 answered someone else's request"
    );
    assert!(violations(&node1_errors, "_INBOX.forged").await);

    // 3. Heartbeats: its own is delivered, another node's is refused.
    let probe_node = deepnode_domain::ids::NodeId::parse("probe").unwrap();
    let mut beats = watch(
        &admin,
        s.heartbeat_wildcard(),
        s.node_heartbeat(&probe_node),
    )
    .await;
    node1
        .publish(s.node_heartbeat(&n1), r#"{"in_flight":0}"#.into())
        .await
        .unwrap();
    node1
        .publish(s.node_heartbeat(&n2), r#"{"in_flight":0}"#.into())
        .await
        .unwrap();
    node1.flush().await.unwrap();
    let first = expect_next(&mut beats, "own heartbeat delivered").await;
    assert_eq!(first.subject.as_str(), s.node_heartbeat(&n1));
    assert!(next(&mut beats).await.is_none(), "node 1 spoke for node 2");
    assert!(violations(&node1_errors, "deepnode.node.n2.heartbeat").await);

    // 4. Ingest publishes reports (JetStream acks them) but no command.
    deepnode_bus::jetstream::ensure_streams(
        &async_nats::jetstream::new(admin.clone()),
        &s,
        &Default::default(),
    )
    .await
    .unwrap();
    let (ingest, ingest_errors) = client_as(&server, "ingest").await;
    let ack = async_nats::jetstream::new(ingest.clone())
        .publish(s.ingest_execution(), "{}".into())
        .await
        .unwrap()
        .await
        .expect("ingest report acknowledged by JetStream");
    assert_eq!(ack.stream, s.ingest_stream());
    ingest.publish(s.cmd_exec(), "{}".into()).await.unwrap();
    ingest.flush().await.unwrap();
    assert!(
        next(&mut exec_watch).await.is_none(),
        "ingest published cmd.exec"
    );
    assert!(violations(&ingest_errors, "deepnode.cmd.exec").await);
    // It cannot read other clients' replies either.
    // (the server's refusal is the signal that it has seen the subscription)
    let mut snoop = ingest.subscribe("_INBOX.>").await.unwrap();
    ingest.flush().await.unwrap();
    assert!(violations(&ingest_errors, "_INBOX.>").await);
    admin.publish(inbox.clone(), "secret".into()).await.unwrap();
    admin.flush().await.unwrap();
    assert!(
        next(&mut snoop).await.is_none(),
        "ingest read another client's inbox"
    );

    // 5. A service is confined too: the scheduler cannot forge ingest reports or heartbeats.
    let mut ingest_watch = watch(&admin, s.ingest_wildcard(), s.ingest_execution()).await;
    via_bus
        .publish(s.ingest_execution(), "{}".into())
        .await
        .unwrap();
    via_bus
        .publish(s.node_heartbeat(&n1), "{}".into())
        .await
        .unwrap();
    via_bus.flush().await.unwrap();
    assert!(
        next(&mut ingest_watch).await.is_none(),
        "scheduler published ingest"
    );
    assert!(
        next(&mut beats).await.is_none(),
        "scheduler published a heartbeat"
    );

    println!(
        "nats permissions: node-n1 violations {:?}; ingest violations {:?}",
        node1_errors.lock().unwrap(),
        ingest_errors.lock().unwrap()
    );
    drop(server);
}
