//! Many simulated inference nodes in one process, for tests, benchmarks, `deepnode up` and
//! `deepnode sim`. Each node answers `<prefix>.node.<id>.infer` with a deterministic `{"output"}`
//! after a sampled latency, or misbehaves at configured rates (error, timeout = never answers,
//! invalid output), publishes `<prefix>.node.<id>.heartbeat` `{"in_flight"}` periodically, and can
//! register itself through `<prefix>.cmd.node.register`.
//!
//! It deliberately does not model real inference, does not enforce `capacity` (it is reported at
//! registration only; requests beyond it are still answered) and never reads the event log: it is a
//! black-box node as the scheduler sees it. Randomness comes from `seed`, so a run's sequence of
//! decisions per node depends only on the seed and the order requests arrive in.
//!
//! Wire shapes of a node's answers (what the scheduler classifies):
//! - valid: `{"output": {"model_id", "digest", "echo"}}`, identical on every node for one input;
//! - error: `{"ok": false, "error": {"code": "internal", "message": ...}}` (an object with `error`
//!   and no `output`);
//! - invalid: bytes that are not JSON, a JSON value that is not an object, or an object without
//!   `output` or `error`;
//! - timeout: no answer at all.

mod behaviour;
mod node;

use backon::{BackoffBuilder, ExponentialBuilder};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use deepnode_bus::envelope::{ErrorCode, Reply};
use deepnode_bus::{rpc, Subjects};
use deepnode_domain::ids::NodeId;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use behaviour::{Behaviour, Latency};
pub use node::Counters;

use node::NodeState;

/// What went wrong starting the simulator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration cannot be run (bad rate, duplicate node id, ...).
    #[error("invalid simulator config: {0}")]
    InvalidConfig(String),
    /// Subscribing a node to its infer subject failed.
    #[error("node {node}: subscribing to {subject}: {source}")]
    Subscribe {
        /// The node.
        node: NodeId,
        /// Its infer subject.
        subject: String,
        /// The client's error.
        #[source]
        source: async_nats::SubscribeError,
    },
    /// Registration was refused with an error other than `conflict`.
    #[error("node {node}: registration refused: {code}: {message}")]
    Refused {
        /// The node.
        node: NodeId,
        /// The reply's error code.
        code: ErrorCode,
        /// The reply's message.
        message: String,
    },
    /// Registration got no usable answer before the deadline.
    #[error("node {node}: registration got no answer: {reason}")]
    Register {
        /// The node.
        node: NodeId,
        /// The last failure.
        reason: String,
    },
}

/// One simulated node.
#[derive(Debug, Clone, PartialEq)]
pub struct SimNode {
    /// Its id; its subjects are built from it.
    pub node_id: NodeId,
    /// The domain it registers for.
    pub domain: String,
    /// The stake it registers with (non-negative).
    pub stake: f64,
    /// The capacity it registers with (positive; not enforced by the simulator).
    pub capacity: u32,
    /// How it answers.
    pub behaviour: Behaviour,
}

impl SimNode {
    /// A healthy node with stake 100 and capacity 16.
    pub fn new(node_id: NodeId, domain: impl Into<String>) -> Self {
        Self {
            node_id,
            domain: domain.into(),
            stake: 100.0,
            capacity: 16,
            behaviour: Behaviour::default(),
        }
    }

    /// The same node with another behaviour.
    pub fn with_behaviour(mut self, behaviour: Behaviour) -> Self {
        self.behaviour = behaviour;
        self
    }
}

/// The whole simulated fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// The nodes; ids must be distinct.
    pub nodes: Vec<SimNode>,
    /// Seeds every node's random decisions.
    pub seed: u64,
    /// Time between heartbeats (CONTRACT §3: 30 s). The first beat is sent at start.
    pub heartbeat_interval: Duration,
    /// Register every node through `cmd.node.register` at start (a `conflict` reply is fine).
    pub register: bool,
    /// How long registration keeps retrying while nobody answers the command subject.
    pub register_timeout: Duration,
    /// On stop, how long in-flight answers (sleeping out their latency) may still be sent.
    pub stop_grace: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            nodes: Vec::new(),
            seed: 0,
            heartbeat_interval: Duration::from_secs(30),
            register: false,
            register_timeout: Duration::from_secs(30),
            stop_grace: Duration::from_secs(5),
        }
    }
}

impl SimConfig {
    /// `count` nodes `<id_prefix>-0 …` in `domain`, all with `behaviour`. Fails if the prefix makes
    /// invalid ids.
    pub fn fleet(
        count: usize,
        id_prefix: &str,
        domain: &str,
        behaviour: Behaviour,
        seed: u64,
    ) -> Result<Self, Error> {
        let nodes = (0..count)
            .map(|i| {
                NodeId::parse(&format!("{id_prefix}-{i}"))
                    .map(|id| SimNode::new(id, domain).with_behaviour(behaviour.clone()))
                    .map_err(|e| Error::InvalidConfig(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            nodes,
            seed,
            ..Self::default()
        })
    }

    fn validate(&self) -> Result<(), Error> {
        let mut seen = BTreeSet::new();
        for node in &self.nodes {
            if !seen.insert(&node.node_id) {
                return Err(Error::InvalidConfig(format!(
                    "node id {} appears twice",
                    node.node_id
                )));
            }
            if !(node.stake.is_finite() && node.stake >= 0.0) {
                return Err(Error::InvalidConfig(format!(
                    "node {}: stake must be a non-negative number",
                    node.node_id
                )));
            }
            if node.capacity == 0 {
                return Err(Error::InvalidConfig(format!(
                    "node {}: capacity must be positive",
                    node.node_id
                )));
            }
            node.behaviour
                .validate()
                .map_err(|e| Error::InvalidConfig(format!("node {}: {e}", node.node_id)))?;
        }
        if self.heartbeat_interval.is_zero() {
            return Err(Error::InvalidConfig(
                "heartbeat_interval must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// Entry point of the simulator.
pub struct Sim;

impl Sim {
    /// Starts every node: subscribes each to its infer subject (all subscriptions are confirmed by
    /// the server before this returns), starts heartbeats, then registers the nodes if configured.
    /// On any error, the nodes already started are stopped.
    pub async fn start(
        client: Client,
        subjects: Subjects,
        config: SimConfig,
    ) -> Result<SimHandle, Error> {
        config.validate()?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut handle = SimHandle {
            stop_tx,
            tasks: Vec::new(),
            nodes: BTreeMap::new(),
        };
        for (index, node) in config.nodes.iter().enumerate() {
            let state = Arc::new(NodeState::new(node.clone(), config.seed, index));
            let subject = subjects.node_infer(&node.node_id);
            let sub = match client.subscribe(subject.clone()).await {
                Ok(sub) => sub,
                Err(source) => {
                    handle.stop().await;
                    return Err(Error::Subscribe {
                        node: node.node_id.clone(),
                        subject,
                        source,
                    });
                }
            };
            handle.tasks.push(tokio::spawn(node::serve(
                client.clone(),
                sub,
                state.clone(),
                stop_rx.clone(),
                config.stop_grace,
            )));
            handle.tasks.push(tokio::spawn(node::heartbeat(
                client.clone(),
                subjects.node_heartbeat(&node.node_id),
                state.clone(),
                config.heartbeat_interval,
                stop_rx.clone(),
            )));
            handle.nodes.insert(node.node_id.clone(), state);
        }
        if let Err(e) = client.flush().await {
            tracing::warn!(error = %e, "could not flush subscriptions");
        }
        if config.register {
            let results = futures::future::join_all(
                config
                    .nodes
                    .iter()
                    .map(|node| register_node(&client, &subjects, node, config.register_timeout)),
            )
            .await;
            if let Some(err) = results.into_iter().find_map(Result::err) {
                handle.stop().await;
                return Err(err);
            }
        }
        tracing::info!(nodes = handle.nodes.len(), "simulated nodes started");
        Ok(handle)
    }
}

/// Registers `node` through `cmd.node.register`; `ok` and `conflict` (already registered) both
/// count as success. Retries while nobody answers, until `deadline` has passed.
pub async fn register_node(
    client: &Client,
    subjects: &Subjects,
    node: &SimNode,
    deadline: Duration,
) -> Result<(), Error> {
    let body = serde_json::json!({
        "node_id": node.node_id,
        "domain": node.domain,
        "stake": node.stake,
        "capacity": node.capacity,
    });
    let subject = subjects.cmd_node_register();
    let started = tokio::time::Instant::now();
    let mut delays = ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(1))
        .without_max_times()
        .build();
    loop {
        let per_try = Duration::from_secs(5).min(deadline.max(Duration::from_millis(100)));
        let reason = match rpc::request_json(client, &subject, &body, per_try).await {
            Ok(value) => match Reply::from_value(value) {
                Ok(Reply::Ok(_)) => return Ok(()),
                Ok(Reply::Err { error, .. }) if error.code == ErrorCode::Conflict => return Ok(()),
                Ok(Reply::Err { error, .. }) if error.code == ErrorCode::Unavailable => {
                    error.message
                }
                Ok(Reply::Err { error, .. }) => {
                    return Err(Error::Refused {
                        node: node.node_id.clone(),
                        code: error.code,
                        message: error.message,
                    })
                }
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        let backoff = delays.next().unwrap_or(Duration::from_secs(1));
        if started.elapsed() + backoff > deadline {
            return Err(Error::Register {
                node: node.node_id.clone(),
                reason,
            });
        }
        tracing::debug!(node = %node.node_id, %reason, "registration not answered yet; retrying");
        tokio::time::sleep(backoff).await;
    }
}

/// The running fleet. Dropping it without [`SimHandle::stop`] also stops the nodes, without
/// waiting for them.
pub struct SimHandle {
    stop_tx: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    nodes: BTreeMap<NodeId, Arc<NodeState>>,
}

impl SimHandle {
    /// Stops taking requests and heartbeating, lets in-flight answers go out for at most the
    /// configured grace, then returns.
    pub async fn stop(mut self) {
        // Err only if every receiver is gone, i.e. the tasks already ended.
        let _ = self.stop_tx.send(true);
        for task in self.tasks.drain(..) {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "simulated node task failed");
            }
        }
    }

    /// The simulated node ids, sorted.
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.nodes.keys().cloned().collect()
    }

    /// One node's counters so far.
    pub fn counters(&self, node: &NodeId) -> Option<Counters> {
        self.nodes.get(node).map(|s| s.counters())
    }

    /// Every node's counters so far.
    pub fn all_counters(&self) -> BTreeMap<NodeId, Counters> {
        self.nodes
            .iter()
            .map(|(id, s)| (id.clone(), s.counters()))
            .collect()
    }

    /// The sum of every node's counters.
    pub fn totals(&self) -> Counters {
        self.nodes
            .values()
            .map(|s| s.counters())
            .fold(Counters::default(), |a, b| a + b)
    }
}
