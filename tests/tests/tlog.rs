//! The log made checkable from outside (issue 14), through the reputation service over real
//! Postgres and NATS: checkpoints of the whole log come out signed on the JetStream stream (outside
//! the database), `cmd.log.checkpoint` answers the latest, and `cmd.log.proof`'s inclusion and
//! consistency proofs verify against the signed roots with nothing but the domain's pure checks;
//! under exec traffic every receipt and every checkpoint holds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use deepnode_testkit::until_some;
use std::time::Duration;

use deepnode_bus::Subjects;
use deepnode_domain::config::PolicyConfig;
use deepnode_domain::merkle::{self, Hash};
use deepnode_domain::note::{Checkpoint, NoteSigner, SignedNote};
use deepnode_e2e::Cluster;
use deepnode_projections::tree;
use serde_json::{json, Value};

/// Registers `n` nodes from `first` on: one event each.
async fn register(c: &Cluster, first: usize, n: usize) {
    for i in first..first + n {
        let body =
            json!({"node_id": format!("n-{i}"), "domain": "text", "stake": 1.0, "capacity": 4});
        let reply = c
            .request(&c.subjects.cmd_node_register(), &body)
            .await
            .unwrap();
        assert_eq!(reply["ok"], json!(true), "{reply}");
    }
}

/// The latest checkpoint on the stream once it covers at least `size` events (the checkpointer
/// looks every second, the policy here asks for one a second).
async fn published_at_least(c: &Cluster, size: u64) -> (SignedNote, Checkpoint) {
    let js = async_nats::jetstream::new(c.client.clone());
    let what = format!("a checkpoint of {size} events on the stream");
    until_some(&what, Duration::from_secs(30), || async {
        let last = deepnode_bus::jetstream::latest_checkpoint(&js, &c.subjects)
            .await
            .ok()??;
        let note = SignedNote::parse(std::str::from_utf8(&last).unwrap()).unwrap();
        let checkpoint = Checkpoint::parse(&note.text).unwrap();
        (checkpoint.size >= size).then_some((note, checkpoint))
    })
    .await
}

fn hashes(reply: &Value) -> Vec<Hash> {
    reply["hashes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| Hash::try_from(hex::decode(h.as_str().unwrap()).unwrap()).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_checkpoints_leave_the_database_and_proofs_against_them_verify() {
    let mut policy = PolicyConfig::default();
    policy.log.checkpoint_every_secs = 1;
    let mut c = Cluster::new(policy).await.unwrap();
    let key = NoteSigner::from_seed("deepnode.test/log", [9; 32]).unwrap();
    c.start_reputation_signing(Some(key.clone())).await.unwrap();

    // given 12 events in the log
    register(&c, 0, 12).await;
    let head = u64::try_from(c.head().await.unwrap()).unwrap();

    // then a checkpoint of all of them is on the stream, signed by the log key
    let (note, first) = published_at_least(&c, head).await;
    note.verify(&key.verifier()).unwrap();
    assert_eq!(first.origin, "deepnode.test/log");
    let latest = c
        .request(&c.subjects.cmd_log_checkpoint(), &json!({}))
        .await
        .unwrap();
    assert_eq!(latest["ok"], json!(true), "{latest}");
    let served = Checkpoint::parse(
        &SignedNote::parse(latest["checkpoint"].as_str().unwrap())
            .unwrap()
            .text,
    )
    .unwrap();
    assert!(served.size >= first.size);

    // a witness's cosignature published to the stream comes back with the checkpoint
    let witness = NoteSigner::from_seed("witness.test/w1", [10; 32]).unwrap();
    let mut cosigned = note.clone();
    cosigned.add(&witness.signature_line(&note.text)).unwrap();
    let js = async_nats::jetstream::new(c.client.clone());
    js.publish(c.subjects.checkpoints(), cosigned.render().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let latest = c
        .request(&c.subjects.cmd_log_checkpoint(), &json!({}))
        .await
        .unwrap();
    let cosignatures = latest["cosignatures"].as_array().unwrap();
    assert_eq!(cosignatures.len(), 1, "{latest}");
    assert!(
        cosignatures[0]
            .as_str()
            .unwrap()
            .starts_with("\u{2014} witness.test/w1 "),
        "{latest}"
    );

    // and an event's inclusion proof, by position and by id, verifies against the signed root
    let event = c.store.read_all(4, 1).await.unwrap().remove(0);
    for ask in [
        json!({"kind": "inclusion", "position": 5, "tree_size": first.size}),
        json!({"kind": "inclusion", "event_id": event.event_id, "tree_size": first.size}),
    ] {
        let proof = c.request(&c.subjects.cmd_log_proof(), &ask).await.unwrap();
        assert_eq!(proof["ok"], json!(true), "{proof}");
        assert_eq!(proof["leaf_index"], json!(4));
        merkle::verify_inclusion(
            4,
            first.size,
            &tree::leaf_of(&event),
            &hashes(&proof),
            &first.root,
        )
        .unwrap();
    }

    // when the log grows, the next checkpoint is consistent with the first
    register(&c, 12, 5).await;
    let head = u64::try_from(c.head().await.unwrap()).unwrap();
    let (_, second) = published_at_least(&c, head).await;
    let ask = json!({"kind": "consistency", "from_size": first.size, "to_size": second.size});
    let proof = c.request(&c.subjects.cmd_log_proof(), &ask).await.unwrap();
    assert_eq!(proof["ok"], json!(true), "{proof}");
    merkle::verify_consistency(
        first.size,
        second.size,
        &first.root,
        &second.root,
        &hashes(&proof),
    )
    .unwrap();

    // bad requests are refused, clearly
    for bad in [
        json!({"kind": "inclusion", "position": 0, "tree_size": 3}),
        json!({"kind": "inclusion", "position": 1, "tree_size": second.size + 1_000}),
        json!({"kind": "inclusion", "position": 1, "event_id": event.event_id, "tree_size": 3}),
        json!({"kind": "consistency", "from_size": 5, "to_size": 4}),
        json!({"kind": "rewrite"}),
    ] {
        let reply = c.request(&c.subjects.cmd_log_proof(), &bad).await.unwrap();
        assert_eq!(
            reply["error"]["code"],
            json!("bad_request"),
            "{bad} → {reply}"
        );
    }
    assert_ne!(
        Subjects::new().checkpoints_stream(),
        c.subjects.checkpoints_stream()
    );
    c.stop().await.unwrap();
}

/// Honest operation under traffic, a checkpoint every second: every `cmd.exec` reply's receipt is
/// signed by the log key, names the event the log holds at its position (chain hash recomputed
/// from the event's fields) and the outcome the reply states, and its inclusion proof verifies
/// under a signed checkpoint from the stream; every checkpoint on the stream extends the one
/// before it (what a witness checks) and its root is the tree of the events (what `verify` checks).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_traffic_every_receipt_and_every_checkpoint_holds() {
    use deepnode_domain::ids::NodeId;
    use deepnode_domain::note::receipt_text;
    use deepnode_sim::{Behaviour, Latency, Sim, SimConfig, SimNode};
    use futures::stream::{self, StreamExt};

    let mut policy = PolicyConfig::default();
    policy.log.checkpoint_every_secs = 1;
    let mut c = Cluster::new(policy).await.unwrap();
    let key = NoteSigner::from_seed("deepnode.test/log", [11; 32]).unwrap();
    c.start_reputation_signing(Some(key.clone())).await.unwrap();
    c.start_rotation().await.unwrap();
    c.start_scheduler_signing("scheduler", Some(key.clone()))
        .await
        .unwrap();
    // Three healthy nodes and one that answers garbage (its attempts fail; the backup serves).
    let latency = Latency::Uniform {
        min: Duration::from_millis(1),
        max: Duration::from_millis(3),
    };
    let mut nodes: Vec<SimNode> = (0..3)
        .map(|i| {
            SimNode::new(NodeId::parse(&format!("h-{i}")).unwrap(), "text")
                .with_behaviour(Behaviour::healthy(latency.clone()))
        })
        .collect();
    nodes.push(
        SimNode::new(NodeId::parse("bad").unwrap(), "text")
            .with_behaviour(Behaviour::always_invalid()),
    );
    let sim = Sim::start(
        c.client.clone(),
        c.subjects.clone(),
        SimConfig {
            nodes,
            seed: 3,
            register: true,
            register_timeout: Duration::from_secs(20),
            ..SimConfig::default()
        },
    )
    .await
    .unwrap();
    let deploy = json!({"model_id": "m", "domain": "text", "replicas": 4});
    let reply = c
        .request(&c.subjects.cmd_model_deploy(), &deploy)
        .await
        .unwrap();
    assert_eq!(reply["ok"], json!(true), "{reply}");

    // Traffic spread over more than two seconds, so over several checkpoints.
    let replies: Vec<Value> = stream::iter(0..120)
        .map(|i| {
            let body = json!({"request_id": format!("t-{i}"), "model_id": "m", "input": {"n": i}});
            let c = &c;
            async move {
                if i % 40 == 39 {
                    tokio::time::sleep(Duration::from_millis(1_100)).await;
                }
                c.request(&c.subjects.cmd_exec(), &body).await.unwrap()
            }
        })
        .buffered(8)
        .collect()
        .await;
    let furthest = replies
        .iter()
        .map(|r| {
            r["receipt"]["position"]
                .as_u64()
                .expect("every reply has a receipt")
        })
        .max()
        .unwrap();
    let (_, covering) = published_at_least(&c, furthest).await;

    let verifier = key.verifier();
    let mut failures = 0;
    for reply in &replies {
        let receipt = &reply["receipt"];
        let position = receipt["position"].as_u64().unwrap();
        let leaf =
            Hash::try_from(hex::decode(receipt["leaf_hash"].as_str().unwrap()).unwrap()).unwrap();
        // signed by the log key
        let text = receipt_text(receipt["origin"].as_str().unwrap(), position, &leaf);
        verifier
            .verify(&text, receipt["signature"].as_str().unwrap())
            .unwrap();
        // the event the log holds there, its hash recomputed from its fields
        let event = c
            .store
            .read_all(i64::try_from(position).unwrap() - 1, 1)
            .await
            .unwrap()
            .remove(0);
        assert_eq!(event.expected_hash(&event.prev_hash).to_vec(), event.hash);
        assert_eq!(merkle::leaf_hash(&event.hash), leaf);
        // the outcome the reply states
        let ok = reply["ok"] == json!(true);
        let recorded = if ok {
            "ExecutionCompleted"
        } else {
            "ExecutionFailed"
        };
        assert_eq!(event.event_type, recorded, "{reply}");
        failures += usize::from(!ok);
        // included under the signed checkpoint
        let ask = json!({"kind": "inclusion", "position": position, "tree_size": covering.size});
        let proof = c.request(&c.subjects.cmd_log_proof(), &ask).await.unwrap();
        merkle::verify_inclusion(
            position - 1,
            covering.size,
            &leaf,
            &hashes(&proof),
            &covering.root,
        )
        .unwrap();
    }

    // Every checkpoint on the stream: signed, extending the one before, the tree of the events.
    let js = async_nats::jetstream::new(c.client.clone());
    let mut stream = js
        .get_stream(c.subjects.checkpoints_stream())
        .await
        .unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut checkpoints = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        let message = stream.get_raw_message(seq).await.unwrap();
        let note = SignedNote::parse(std::str::from_utf8(&message.payload).unwrap()).unwrap();
        note.verify(&verifier).unwrap();
        checkpoints.push(Checkpoint::parse(&note.text).unwrap());
    }
    assert!(checkpoints.len() >= 2, "{} checkpoints", checkpoints.len());
    for pair in checkpoints.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let ask = json!({"kind": "consistency", "from_size": a.size, "to_size": b.size});
        let proof = c.request(&c.subjects.cmd_log_proof(), &ask).await.unwrap();
        merkle::verify_consistency(a.size, b.size, &a.root, &b.root, &hashes(&proof)).unwrap();
    }
    let events = c.store.read_all(0, 1_000_000).await.unwrap();
    let mut frontier = merkle::Frontier::new();
    let mut prev = vec![0u8; 32];
    let mut roots = std::collections::BTreeMap::new();
    for event in &events {
        let hash = event.expected_hash(&prev);
        prev = hash.to_vec();
        frontier.push(merkle::leaf_hash(&hash));
        roots.insert(frontier.size(), frontier.root());
    }
    for cp in &checkpoints {
        assert_eq!(
            roots.get(&cp.size),
            Some(&cp.root),
            "checkpoint of size {}",
            cp.size
        );
    }
    assert!(failures < replies.len(), "some replies were served");
    sim.stop().await;
    c.stop().await.unwrap();
}
