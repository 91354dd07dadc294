//! Test harness for the scheduler: a fresh database, a random subject prefix, the log seeded
//! directly with nodes and deployments (the reputation and rotation services are not needed),
//! simulated nodes, and scheduler copies run in-process.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use deepnode_bus::{rpc, Subjects};
use deepnode_domain::config::PolicyConfig;
use deepnode_domain::events::{AttemptSucceeded, DomainEvent, NodeDeregistered};
use deepnode_domain::fixed::Bps;
use deepnode_domain::ids::RequestId;
use deepnode_runtime::ServiceContext;
use deepnode_scheduler::{run, SchedulerOptions};
use deepnode_sim::{Sim, SimConfig, SimHandle, SimNode};
use deepnode_store::EventStore;
use deepnode_testkit::{copies_counted, given, nats_url, Given, Services, TestDb};
use serde_json::Value;

pub use deepnode_testkit::node_id as node;

/// The policy tests run with: the lower-ranked replica never takes primary traffic, so the
/// better-ranked node is always attempt 1 and tests can choose it.
pub fn test_policy() -> PolicyConfig {
    let mut policy = PolicyConfig::default();
    policy.routing.backup_min_share = Bps::ZERO;
    policy.routing.backup_max_share = Bps::ZERO;
    policy
}

pub struct Harness {
    /// Options every scheduler copy started from now on runs with.
    pub options: SchedulerOptions,
    pub db: TestDb,
    pub store: EventStore,
    pub client: async_nats::Client,
    pub subjects: Subjects,
    pub sims: Vec<SimHandle>,
    schedulers: Services,
}

impl Harness {
    pub async fn new() -> Harness {
        let db = TestDb::new().await;
        let store = db.store().await;
        let client = async_nats::connect(nats_url())
            .await
            .expect("NATS is running");
        Harness {
            options: SchedulerOptions {
                // Copies find each other within a few milliseconds here; tests wait on the
                // announcements, so a short interval only bounds how late a missed one repeats.
                presence_interval: Duration::from_millis(200),
                presence_settle: Duration::from_millis(50),
                ..SchedulerOptions::default()
            },
            db,
            store,
            client,
            subjects: Subjects::random(),
            sims: Vec::new(),
            schedulers: Services::default(),
        }
    }

    /// Seeds the log: see [`deepnode_testkit::given`].
    pub fn given(&self) -> Given<'_> {
        given(&self.store)
    }

    pub async fn deregister(&self, id: &str) {
        self.given()
            .event(DomainEvent::NodeDeregistered(NodeDeregistered {
                node_id: node(id),
                reason: "test".into(),
            }))
            .await;
    }

    /// Raises a node's reputation with `k` recorded successes (so it ranks first).
    pub async fn boost(&self, id: &str, k: usize) {
        for i in 0..k {
            self.given()
                .event(DomainEvent::AttemptSucceeded(AttemptSucceeded {
                    request_id: RequestId::parse(&format!("seed-{id}-{i}")).unwrap(),
                    node_id: node(id),
                    latency_ms: 1,
                }))
                .await;
        }
    }

    pub async fn start_sim(&mut self, nodes: Vec<SimNode>) {
        let config = SimConfig {
            nodes,
            seed: 7,
            ..SimConfig::default()
        };
        let sim = Sim::start(self.client.clone(), self.subjects.clone(), config)
            .await
            .expect("sim starts");
        self.sims.push(sim);
    }

    /// Watches the infer requests sent to `ids` (a second subscriber, flushed before this returns,
    /// that never answers): [`Dispatches::wait`] says when nodes hold requests.
    pub async fn dispatches_to(&self, ids: &[&str]) -> Dispatches {
        let mut requests = Vec::new();
        for id in ids {
            let subject = self.subjects.node_infer(&node(id));
            requests.push(self.client.subscribe(subject).await.unwrap());
        }
        self.client.flush().await.unwrap();
        Dispatches(futures::stream::select_all(requests))
    }

    /// Starts one scheduler copy in-process and waits until it answers.
    pub async fn start_scheduler(&mut self, policy: PolicyConfig, producer: &str) {
        let store = self.db.store().await;
        self.start_scheduler_on(store, policy, producer).await;
    }

    /// Starts one scheduler copy on the given store.
    pub async fn start_scheduler_on(
        &mut self,
        store: EventStore,
        policy: PolicyConfig,
        producer: &str,
    ) {
        let nats = async_nats::connect(nats_url()).await.unwrap();
        let ctx = ServiceContext::new(store, nats, self.subjects.clone(), policy, producer);
        // Every copy says on the presence subject how many copies it counts, after it has
        // subscribed to its command subjects: when each says all of them, all serve and each
        // knows its share of the nodes' capacity.
        let mut presence = self
            .client
            .subscribe(self.subjects.scheduler_presence())
            .await
            .unwrap();
        let options = self.options.clone();
        self.schedulers
            .start(producer, |stop| run(ctx, options, stop));
        let copies = self.schedulers.len() as u64;
        copies_counted(&mut presence, copies, Duration::from_secs(30)).await;
    }

    pub async fn request(&self, subject: &str, payload: Vec<u8>) -> Value {
        request_on(&self.client, subject, payload).await
    }

    /// A connection of its own: another caller, as far as the scheduler can tell.
    pub async fn caller(&self) -> async_nats::Client {
        async_nats::connect(nats_url()).await.unwrap()
    }

    /// `cmd.exec` sent on `caller`'s connection.
    pub async fn exec_as(&self, caller: &async_nats::Client, body: Value) -> Value {
        request_on(
            caller,
            &self.subjects.cmd_exec(),
            body.to_string().into_bytes(),
        )
        .await
    }

    pub async fn exec(&self, body: Value) -> Value {
        self.request(&self.subjects.cmd_exec(), body.to_string().into_bytes())
            .await
    }

    pub async fn schedule(&self, body: Value) -> Value {
        self.request(&self.subjects.cmd_schedule(), body.to_string().into_bytes())
            .await
    }

    /// Events of `event_type` in stream `exec-<request_id>`.
    pub async fn count(&self, event_type: &str, request_id: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = $1 AND stream_id = $2")
            .bind(event_type)
            .bind(format!("exec-{request_id}"))
            .fetch_one(self.store.pool())
            .await
            .unwrap()
    }

    /// Every event of stream `exec-<request_id>`: (type, payload, metadata).
    pub async fn stream(&self, request_id: &str) -> Vec<(String, Value, Value)> {
        let stream = deepnode_store::StreamId::parse(&format!("exec-{request_id}")).unwrap();
        self.store
            .read_stream(&stream, 1)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.event_type, e.payload.to_value(), e.metadata.to_value()))
            .collect()
    }

    pub async fn head(&self) -> i64 {
        self.store.head_position().await.unwrap()
    }

    pub async fn stop(mut self) {
        let stopped = self.schedulers.stop().await;
        stopped.expect("every scheduler copy stops cleanly");
        for sim in self.sims.drain(..) {
            sim.stop().await;
        }
    }
}

async fn request_on(client: &async_nats::Client, subject: &str, payload: Vec<u8>) -> Value {
    let reply = rpc::request_bytes(
        client,
        subject,
        Bytes::from(payload),
        Duration::from_secs(30),
    )
    .await
    .expect("scheduler answers");
    serde_json::from_slice(&reply).expect("reply is JSON")
}

/// See [`Harness::dispatches_to`].
pub struct Dispatches(futures::stream::SelectAll<async_nats::Subscriber>);

impl Dispatches {
    /// Waits until `n` more requests have been sent to the watched nodes; panics after 10 s.
    pub async fn wait(&mut self, n: usize) {
        for seen in 0..n {
            let next = futures::StreamExt::next(&mut self.0);
            tokio::time::timeout(Duration::from_secs(10), next)
                .await
                .unwrap_or_else(|_| panic!("{seen} of {n} requests reached a node in 10 s"))
                .expect("the infer subscription ended");
        }
    }
}
