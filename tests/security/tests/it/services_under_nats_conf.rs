//! The services themselves under `deploy/nats.conf`: a private `nats-server` with that file, the
//! scheduler, reputation and rotation services each connected with its own credentials (production
//! prefix `deepnode`), two simulated nodes connected as `node-n1` / `node-n2`, and an operator (the
//! admin credential) that registers the nodes, deploys a model and sends requests. Every request is
//! served by a node and recorded, and no connection — service or node, with the nodes beating every
//! 200 ms and reputation subscribed to their heartbeats — is refused anything: the file grants each
//! role what it uses (and the other tests in `nats_permissions` that it grants nothing more).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use deepnode_bus::async_nats::{Client, ConnectOptions, Event};
use deepnode_bus::{rpc, Subjects};
use deepnode_domain::config::PolicyConfig;
use deepnode_domain::ids::NodeId;
use deepnode_runtime::ServiceContext;
use deepnode_security_tests::NatsServer;
use deepnode_sim::{Behaviour, Latency, Sim, SimConfig, SimNode};
use deepnode_testkit::{answering, Services, TestDb};
use futures::StreamExt;
use serde_json::{json, Value};

use super::nats_permissions::{conf, PASSWORDS};

/// A connection as `user` (password from [`PASSWORDS`]) whose server errors are collected.
async fn connect_as(server: &NatsServer, user: &str) -> (Client, Arc<Mutex<Vec<String>>>) {
    let var = format!(
        "DEEPNODE_NATS_{}_PASSWORD",
        user.replace('-', "_").to_uppercase()
    );
    let password = PASSWORDS.iter().find(|(k, _)| *k == var).unwrap().1;
    let errors = Arc::new(Mutex::new(Vec::new()));
    let sink = errors.clone();
    let client = ConnectOptions::with_user_and_password(user.into(), password.into())
        .event_callback(move |event| {
            let sink = sink.clone();
            async move {
                if let Event::ServerError(e) = event {
                    sink.lock().unwrap().push(e.to_string());
                }
            }
        })
        .connect(server.url())
        .await
        .unwrap();
    (client, errors)
}

async fn request(admin: &Client, subject: &str, body: Value) -> Value {
    rpc::request_json(admin, subject, &body, Duration::from_secs(5))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_services_and_nodes_run_under_the_shipped_nats_conf() {
    let server = NatsServer::start(&conf(), PASSWORDS).await.unwrap();
    let db = TestDb::new().await;
    let subjects = Subjects::new();
    let (admin, _) = connect_as(&server, "admin").await;
    let js = deepnode_bus::async_nats::jetstream::new(admin.clone());
    deepnode_bus::jetstream::ensure_streams(&js, &subjects, &Default::default())
        .await
        .unwrap();

    // The three services, each on its own credential.
    let mut services = Services::default();
    let mut errors = Vec::new();
    let mut connections = Vec::new();
    for user in ["reputation", "rotation", "scheduler"] {
        let (nats, errs) = connect_as(&server, user).await;
        errors.push((user, errs));
        connections.push(nats.clone());
        let ctx = ServiceContext::new(
            db.store().await,
            nats,
            subjects.clone(),
            PolicyConfig::default(),
            user,
        );
        services.start(user, |stop| async move {
            match user {
                "reputation" => {
                    let options = deepnode_reputation::ReputationOptions::from_policy(&ctx.policy);
                    deepnode_reputation::run(ctx, options, stop)
                        .await
                        .map_err(|e| e.to_string())
                }
                "rotation" => {
                    let options = deepnode_rotation::RotationOptions {
                        periodic: false,
                        ..Default::default()
                    };
                    deepnode_rotation::run(ctx, options, stop)
                        .await
                        .map_err(|e| e.to_string())
                }
                _ => {
                    let options = deepnode_scheduler::SchedulerOptions::default();
                    deepnode_scheduler::run(ctx, options, stop)
                        .await
                        .map_err(|e| e.to_string())
                }
            }
        });
    }
    for subject in [
        subjects.cmd_node_register(),
        subjects.cmd_model_deploy(),
        subjects.cmd_schedule(),
    ] {
        answering(&admin, &subject, Duration::from_secs(10)).await;
    }

    // The operator registers the nodes; each node runs on its own credential and beats.
    let mut sims = Vec::new();
    for id in ["n1", "n2"] {
        let reply = request(
            &admin,
            &subjects.cmd_node_register(),
            json!({"node_id": id, "domain": "text", "stake": 10.0, "capacity": 8}),
        )
        .await;
        assert_eq!(reply["ok"], true, "{reply}");
        let (nats, errs) = connect_as(&server, &format!("node-{id}")).await;
        errors.push((if id == "n1" { "node-n1" } else { "node-n2" }, errs));
        connections.push(nats.clone());
        let node = SimNode::new(NodeId::parse(id).unwrap(), "text")
            .with_behaviour(Behaviour::healthy(Latency::fixed_ms(1)));
        let config = SimConfig {
            nodes: vec![node],
            seed: 5,
            heartbeat_interval: Duration::from_millis(200),
            register: false,
            ..SimConfig::default()
        };
        sims.push(Sim::start(nats, subjects.clone(), config).await.unwrap());
    }
    let reply = request(
        &admin,
        &subjects.cmd_model_deploy(),
        json!({"model_id": "m-1", "domain": "text", "replicas": 2}),
    )
    .await;
    assert_eq!(reply["ok"], true, "{reply}");

    // Requests are served by the nodes and recorded.
    let mut served = std::collections::BTreeSet::new();
    for i in 0..20 {
        let reply = request(
            &admin,
            &subjects.cmd_exec(),
            json!({"request_id": format!("sec-{i}"), "model_id": "m-1", "input": i}),
        )
        .await;
        assert_eq!(reply["ok"], true, "{reply}");
        served.insert(reply["node_id"].as_str().unwrap().to_owned());
    }
    assert!(!served.is_empty() && served.iter().all(|n| n == "n1" || n == "n2"));
    let pool = db.pool().await;
    let recorded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'ExecutionCompleted' AND stream_id LIKE 'exec-sec-%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(recorded, 20);

    // Nobody was refused anything: each node beats once more after the requests, then every
    // connection's round trip to the server completes (the server answers a flush after any error
    // for what came before it), and no connection was told of a permissions violation.
    let mut beats = admin
        .subscribe(subjects.heartbeat_wildcard())
        .await
        .unwrap();
    let mut beaten = std::collections::BTreeSet::new();
    while beaten.len() < 2 {
        let beat = tokio::time::timeout(Duration::from_secs(5), beats.next())
            .await
            .expect("both nodes beat within 5 s")
            .unwrap();
        beaten.insert(beat.subject.to_string());
    }
    for nats in &connections {
        nats.flush().await.unwrap();
    }
    for (user, errs) in &errors {
        let errs = errs.lock().unwrap();
        assert!(errs.is_empty(), "{user} was refused: {errs:?}");
    }

    for sim in sims {
        sim.stop().await;
    }
    services.stop().await.unwrap();
}
