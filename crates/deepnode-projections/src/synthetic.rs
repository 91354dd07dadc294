//! A deterministic, realistic synthetic event history — nodes registering, models deployed on two
//! tiers, executions with successes, failovers, errors, timeouts and invalid outputs, external
//! reports, status changes (probation, active, jail), slashes, revocations and re-placements,
//! deregistrations and rotation epochs — for integration tests and benchmarks.
//!
//! It is a generator of *events*, not a simulation of the policy: it does not decide anything the
//! way the services would, it only produces plausible, valid sequences through the domain's own
//! constructors (`DomainEvent::to_new_event`). Same [`Spec`] → byte-identical history (event ids,
//! times and payloads included); randomness is a seeded xorshift, time advances from `Spec::start`.

use chrono::{DateTime, Duration, Utc};
use deepnode_domain::events::{
    AttemptDispatched, AttemptFailed, AttemptSucceeded, DeploymentAssigned, DeploymentRevoked,
    DomainEvent, ExecutionCompleted, ExecutionFailed, ExecutionReported, ExecutionRequested,
    Failure, FaultKind, Metadata, ModelDeployed, NodeDeregistered, NodeRegistered, NodeSlashed,
    NodeStatus, NodeStatusChanged, Outcome, Role, RotationCompleted, Tier,
};
use deepnode_domain::fixed::Bps;
use deepnode_domain::ids::{IdError, ModelId, NodeId, RequestId};
use deepnode_domain::log::{NewEvent, StreamId};
use deepnode_domain::scoring::{
    route, CandidateSnapshot, RouteDecision, RouteInput, RoutingPolicy,
};
use uuid::Uuid;

/// The shape of a synthetic history.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Nodes registered up front.
    pub nodes: usize,
    /// Models deployed up front (two replicas each).
    pub models: usize,
    /// Executions after the setup.
    pub executions: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// `occurred_at` of the first event.
    pub start: DateTime<Utc>,
}

/// One append: events of one stream, in order.
#[derive(Debug, Clone)]
pub struct Append {
    /// The stream.
    pub stream: StreamId,
    /// Its events.
    pub events: Vec<NewEvent>,
}

/// The history as a sequence of appends (see the module docs).
pub struct History {
    spec: Spec,
    rng: u64,
    counter: u128,
    now: DateTime<Utc>,
    nodes: Vec<(NodeId, NodeStatus)>,
    models: Vec<(ModelId, Vec<NodeId>)>,
    setup: std::vec::IntoIter<DomainEvent>,
    done: usize,
}

impl History {
    /// Builds the generator; fails only if the spec makes invalid ids (it cannot with these formats).
    pub fn new(spec: Spec) -> Result<History, IdError> {
        let mut nodes = Vec::with_capacity(spec.nodes);
        let mut setup = Vec::new();
        for i in 0..spec.nodes {
            let node_id = NodeId::parse(&format!("n{i:05}"))?;
            setup.push(DomainEvent::NodeRegistered(NodeRegistered {
                node_id: node_id.clone(),
                domain: format!("d{}", i % 2),
                // Non-round floats, so the exact round trip of stored floats is exercised.
                stake: 100.0 + (i as f64) * 1.37,
                capacity: 4 + (i % 5) as u32,
            }));
            nodes.push((node_id, NodeStatus::Probation));
        }
        let mut models = Vec::with_capacity(spec.models);
        let n = spec.nodes.max(2);
        for m in 0..spec.models {
            let model_id = ModelId::parse(&format!("m{m:04}"))?;
            setup.push(DomainEvent::ModelDeployed(ModelDeployed {
                model_id: model_id.clone(),
                domain: format!("d{}", m % 2),
                replicas: 2,
            }));
            let a = nodes[m % n % nodes.len().max(1)].0.clone();
            let b = nodes[(m * 7 + 1) % n % nodes.len().max(1)].0.clone();
            let mut replicas = vec![a.clone()];
            if b != a {
                replicas.push(b);
            }
            for (k, node_id) in replicas.iter().enumerate() {
                setup.push(DomainEvent::DeploymentAssigned(DeploymentAssigned {
                    model_id: model_id.clone(),
                    node_id: node_id.clone(),
                    tier: if k == 0 { Tier::Top } else { Tier::Lower },
                    reason: "placement".into(),
                }));
            }
            models.push((model_id, replicas));
        }
        Ok(History {
            rng: spec.seed ^ 0x9E37_79B9_7F4A_7C15,
            counter: 0,
            now: spec.start,
            nodes,
            models,
            setup: setup.into_iter(),
            done: 0,
            spec,
        })
    }

    fn rand(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.rand() % (n.max(1) as u64)) as usize
    }

    fn new_event(&mut self, event: &DomainEvent) -> NewEvent {
        self.counter += 1;
        let id = Uuid::from_u128((u128::from(self.spec.seed) << 64) | self.counter);
        let meta = Metadata::new("synthetic", format!("c{}", self.counter));
        event.to_new_event(id, meta, self.now)
    }

    fn append(&mut self, events: &[DomainEvent]) -> Option<Append> {
        let stream = events.first()?.stream_id();
        let events = events.iter().map(|e| self.new_event(e)).collect();
        Some(Append { stream, events })
    }

    fn tick(&mut self, max_ms: usize) {
        let ms = 1 + self.below(max_ms);
        self.now += Duration::milliseconds(ms as i64);
    }

    /// One execution, or now and then a lifecycle event.
    fn step(&mut self) -> Result<Option<Append>, IdError> {
        self.tick(2_000);
        let i = self.done;
        self.done += 1;
        let roll = self.below(1_000);
        if roll < 8 && !self.nodes.is_empty() {
            return Ok(self.lifecycle(roll));
        }
        if self.models.is_empty() {
            return Ok(None);
        }
        let pick = self.below(self.models.len());
        let (model_id, replicas) = self.models[pick].clone();
        let request_id = RequestId::parse(&format!("r{i:08}"))?;
        if roll < 30 {
            // An execution reported from outside.
            let node_id = replicas[0].clone();
            let outcome = [Outcome::Success, Outcome::Error, Outcome::Timeout][self.below(3)];
            let reported = DomainEvent::ExecutionReported(ExecutionReported {
                event_id: None,
                request_id,
                model_id,
                node_id,
                outcome,
                latency_ms: self.below(500) as u64,
                reported_occurred_at: self.now,
            });
            return Ok(self.append(&[reported]));
        }
        let mut events = vec![DomainEvent::ExecutionRequested(ExecutionRequested {
            request_id: request_id.clone(),
            model_id: model_id.clone(),
            timeout_ms: 5_000,
        })];
        let decision = Box::new(route_between(&model_id, &request_id, &replicas, i as u64));
        let order: Vec<NodeId> = std::iter::once(decision.primary.clone())
            .chain(decision.backup.clone())
            .collect();
        let mut attempts = 0u8;
        let mut served = None;
        for (k, node_id) in order.iter().enumerate() {
            attempts += 1;
            events.push(DomainEvent::AttemptDispatched(AttemptDispatched {
                request_id: request_id.clone(),
                model_id: model_id.clone(),
                node_id: node_id.clone(),
                role: if k == 0 { Role::Primary } else { Role::Backup },
                attempt: attempts,
                decision: decision.clone(),
            }));
            let r = self.below(100);
            if r < 85 {
                events.push(DomainEvent::AttemptSucceeded(AttemptSucceeded {
                    request_id: request_id.clone(),
                    node_id: node_id.clone(),
                    latency_ms: 5 + self.below(200) as u64,
                }));
                served = Some(node_id.clone());
                break;
            }
            let outcome = match r {
                85..=92 => Failure::Error,
                93..=97 => Failure::Timeout,
                _ => Failure::InvalidOutput,
            };
            events.push(DomainEvent::AttemptFailed(AttemptFailed {
                request_id: request_id.clone(),
                node_id: node_id.clone(),
                outcome,
                latency_ms: 5_000,
                detail: "synthetic".into(),
            }));
        }
        events.push(match served {
            Some(node_id) => DomainEvent::ExecutionCompleted(ExecutionCompleted {
                request_id,
                model_id,
                node_id,
                attempts,
                charged: true,
                output: serde_json::Value::Null,
            }),
            None => DomainEvent::ExecutionFailed(ExecutionFailed {
                request_id,
                model_id,
                attempts,
                charged: false,
                error_code: "all_replicas_failed".into(),
                message: None,
                abandoned: false,
            }),
        });
        // A few executions stay in flight: drop the outcome (and the completion).
        if roll >= 995 {
            events.truncate(2);
        }
        Ok(self.append(&events))
    }

    fn lifecycle(&mut self, roll: usize) -> Option<Append> {
        let k = self.below(self.nodes.len());
        let (node_id, from) = self.nodes[k].clone();
        if from.is_terminal() {
            return None;
        }
        let event = match roll {
            0..=2 => {
                let to = match from {
                    NodeStatus::Probation | NodeStatus::Offline => NodeStatus::Active,
                    NodeStatus::Active => NodeStatus::Jailed,
                    _ => NodeStatus::Probation,
                };
                self.nodes[k].1 = to;
                DomainEvent::NodeStatusChanged(NodeStatusChanged {
                    node_id,
                    from,
                    to,
                    reason: "synthetic".into(),
                    until: (to == NodeStatus::Jailed).then(|| self.now + Duration::seconds(600)),
                })
            }
            3..=4 => {
                let fault = self.counter;
                DomainEvent::NodeSlashed(NodeSlashed {
                    node_id,
                    fault_id: format!("fault-{fault}"),
                    kind: if roll == 3 {
                        FaultKind::Downtime
                    } else {
                        FaultKind::InvalidOutput
                    },
                    fraction_bps: 10,
                    amount: 0.137 + (fault % 7) as f64 * 0.01,
                    reason: "synthetic".into(),
                })
            }
            5..=6 => {
                // Move one replica of a model to another node: revoke, then assign.
                let m = self.below(self.models.len());
                let (model_id, replicas) = self.models.get(m)?.clone();
                let old = replicas.last()?.clone();
                let pick = self.below(self.nodes.len());
                let new = self.nodes[pick].0.clone();
                if replicas.contains(&new) {
                    return None;
                }
                let revoke = DomainEvent::DeploymentRevoked(DeploymentRevoked {
                    model_id: model_id.clone(),
                    node_id: old,
                    reason: "rotation".into(),
                });
                let assign = DomainEvent::DeploymentAssigned(DeploymentAssigned {
                    model_id,
                    node_id: new.clone(),
                    tier: Tier::Lower,
                    reason: "rotation".into(),
                });
                if let Some(last) = self.models[m].1.last_mut() {
                    *last = new;
                }
                return self.append(&[revoke, assign]);
            }
            _ => {
                if self.below(4) == 0 {
                    self.nodes[k].1 = NodeStatus::Deregistered;
                    DomainEvent::NodeDeregistered(NodeDeregistered {
                        node_id,
                        reason: "leaving".into(),
                    })
                } else {
                    let epoch = self.counter as u64;
                    DomainEvent::RotationCompleted(RotationCompleted {
                        epoch,
                        moves: 1,
                        plan: None,
                        config_hash: String::new(),
                    })
                }
            }
        };
        self.append(&[event])
    }
}

impl Iterator for History {
    type Item = Result<Append, IdError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(event) = self.setup.next() {
            self.tick(50);
            return self.append(&[event]).map(Ok);
        }
        while self.done < self.spec.executions {
            match self.step() {
                Ok(Some(append)) => return Some(Ok(append)),
                Ok(None) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
        None
    }
}

/// The routing decision record of a request for `model` between its `replicas` (the first one
/// better reputed), made by the domain's router so that it verifies like a scheduler's.
fn route_between(
    model: &ModelId,
    request: &RequestId,
    replicas: &[NodeId],
    epoch: u64,
) -> RouteDecision {
    let candidates = replicas
        .iter()
        .zip([9_000, 7_000, 5_000])
        .map(|(node_id, reputation)| CandidateSnapshot {
            node_id: node_id.clone(),
            deployed: true,
            status: NodeStatus::Active,
            ejected: false,
            in_flight: 0,
            capacity: 8,
            reputation: Bps::saturating(reputation),
            failure_rate: Bps::saturating(0),
            stake_micros: 1_000_000,
            assignments: 0,
        })
        .collect();
    let input = RouteInput {
        model_id: model.clone(),
        request_id: request.clone(),
        seed: epoch,
        epoch,
        config_hash: "synthetic".to_owned(),
        domain_stake_enabled: false,
        domain_median_stake_micros: 1_000_000,
        candidates,
    };
    route(&input, &RoutingPolicy::default())
        .expect("a model with an idle, active replica always routes")
}
