//! Building the routing snapshot ([`RouteInput`]) from the log-folded [`NodeBook`] plus this
//! process's live state, and rendering a [`RouteDecision`] as the `cmd.schedule` reply.
//!
//! The decision itself is `deepnode_domain::scoring::route`, a pure function; this module only
//! gathers its inputs. Reputation and failure rate are evaluated at the request's wall-clock instant
//! and rounded to basis points here, so the recorded decision (in `AttemptDispatched`) holds exactly
//! the numbers that were scored.
//!
//! Scores and factors in the schedule reply are numbers in [0, 1] (basis points / 10,000); the
//! exact basis points are also given as `score_bps` and `factors_bps`.

use chrono::{DateTime, Utc};
use deepnode_bus::envelope::{ErrorBody, ErrorCode};
use deepnode_domain::book::NodeBook;
use deepnode_domain::fixed::Bps;
use deepnode_domain::ids::{ModelId, RequestId};
use deepnode_domain::scoring::{
    route, waits_for_capacity, CandidateSnapshot, FilterReason, RouteDecision, RouteError,
    RouteInput, RoutingPolicy,
};
use serde_json::{json, Value};

use crate::live::Live;

/// The static parts of every snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotParams {
    /// Decision seed (tie-break hash).
    pub seed: u64,
    /// Hash of the policy in force.
    pub config_hash: String,
    /// Domains whose routing weighs stake.
    pub stake_domains: Vec<String>,
}

/// Why no decision could be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRoute {
    /// The model is neither declared nor deployed.
    UnknownModel,
    /// Declared, but no replica can serve.
    NoEligibleNodes,
    /// Every replica that could serve is at capacity (a freed slot would let it start).
    Busy,
}

impl NoRoute {
    /// The reply's error body.
    pub fn to_error(&self, model_id: &ModelId) -> ErrorBody {
        match self {
            NoRoute::UnknownModel => ErrorBody::new(
                ErrorCode::UnknownModel,
                format!("model {model_id} is not deployed"),
            ),
            NoRoute::NoEligibleNodes => ErrorBody::new(
                ErrorCode::NoEligibleNodes,
                format!("no replica of model {model_id} can serve right now"),
            ),
            NoRoute::Busy => ErrorBody::new(
                ErrorCode::Overloaded,
                format!("every replica of model {model_id} that can serve is at capacity"),
            ),
        }
    }
}

fn micros(stake: f64) -> u64 {
    if stake.is_finite() && stake > 0.0 {
        // Saturating float-to-int cast: absurd stakes pin at u64::MAX.
        (stake * 1e6) as u64
    } else {
        0
    }
}

/// The snapshot for one request: every deployed replica of `model_id` with its status, reputation
/// and failure rate (from the log, at `now`), stake and assignments, plus this process's in-flight
/// count, ejection state and share of the node's capacity (the capacity the decision sees).
pub fn snapshot(
    book: &NodeBook,
    live: &Live,
    params: &SnapshotParams,
    model_id: &ModelId,
    request_id: &RequestId,
    now: DateTime<Utc>,
) -> Result<RouteInput, NoRoute> {
    let model = book.models().get(model_id);
    let replicas = book.deployments().get(model_id);
    if model.is_none() && replicas.is_none() {
        return Err(NoRoute::UnknownModel);
    }
    let rep = book.reputation_policy();
    let mut candidates = Vec::new();
    let mut domain = model.map(|m| m.domain.clone());
    for node_id in replicas.into_iter().flat_map(|r| r.keys()) {
        let Some(node) = book.node(node_id) else {
            continue; // assigned to a node the log never registered: nothing to route to
        };
        if domain.is_none() {
            domain = Some(node.domain.clone());
        }
        candidates.push(CandidateSnapshot {
            node_id: node_id.clone(),
            deployed: true,
            status: node.status,
            ejected: live.is_ejected(node_id, now),
            in_flight: live.in_flight(node_id),
            capacity: live.capacity(node_id, node.capacity),
            reputation: Bps::from_f64(node.reputation.score_at(now, rep)),
            failure_rate: Bps::from_f64(node.reputation.failure_rate_at(now, rep)),
            stake_micros: micros(node.stake),
            assignments: u64::from(node.deployments),
        });
    }
    let domain = domain.unwrap_or_default();
    let stake_enabled = params.stake_domains.contains(&domain);
    let median = if stake_enabled {
        let mut stakes: Vec<u64> = book
            .nodes()
            .values()
            .filter(|n| n.domain == domain && !n.status.is_terminal())
            .map(|n| micros(n.stake))
            .collect();
        stakes.sort_unstable();
        stakes.get(stakes.len() / 2).copied().unwrap_or(0)
    } else {
        0
    };
    Ok(RouteInput {
        model_id: model_id.clone(),
        request_id: request_id.clone(),
        seed: params.seed,
        epoch: u64::try_from(book.last_position()).unwrap_or(0),
        config_hash: params.config_hash.clone(),
        domain_stake_enabled: stake_enabled,
        domain_median_stake_micros: median,
        candidates,
    })
}

/// Routes `input` with `policy`, mapping the domain's error to the reply's.
pub fn decide(input: &RouteInput, policy: &RoutingPolicy) -> Result<RouteDecision, NoRoute> {
    route(input, policy).map_err(|e| match e {
        RouteError::NoEligibleNodes { .. } if waits_for_capacity(input) => NoRoute::Busy,
        RouteError::NoEligibleNodes { .. } | RouteError::DuplicateNode(_) => {
            NoRoute::NoEligibleNodes
        }
    })
}

fn unit(b: Bps) -> f64 {
    b.to_f64()
}

fn reason(r: &FilterReason) -> String {
    match r {
        FilterReason::NotDeployed => "not_deployed".into(),
        FilterReason::Ineligible(status) => format!("ineligible:{}", status.as_str()),
        FilterReason::Ejected => "ejected".into(),
        FilterReason::AtCapacity => "at_capacity".into(),
    }
}

/// The `cmd.schedule` reply fields for a decision (without `ok`).
pub fn schedule_reply(d: &RouteDecision) -> Value {
    let candidates: Vec<Value> = d
        .candidates
        .iter()
        .map(|c| {
            json!({
                "node_id": c.node_id,
                "rank": c.rank,
                "healthy": c.healthy,
                "score": unit(c.score),
                "score_bps": c.score.raw(),
                "factors": {
                    "reputation": unit(c.factors.reputation),
                    "load": unit(c.factors.load),
                    "failure_rate": unit(c.factors.failure_rate),
                    "stake": unit(c.factors.stake),
                },
                "factors_bps": c.factors,
                "weighted_sum": c.weighted_sum,
                "in_flight": c.in_flight,
                "assignments": c.assignments,
            })
        })
        .collect();
    let filtered: Vec<Value> = d
        .filtered
        .iter()
        .map(|f| json!({"node_id": f.node_id, "reason": reason(&f.reason)}))
        .collect();
    json!({
        "model_id": d.model_id,
        "primary": d.primary,
        "backup": d.backup,
        "candidates": candidates,
        "filtered": filtered,
        "weights": {
            "reputation": unit(d.weights.reputation),
            "load": unit(d.weights.load),
            "failure_rate": unit(d.weights.failure_rate),
            "stake": unit(d.weights.stake),
        },
        "weights_bps": d.weights,
        "weight_total_bps": d.weight_total,
        "stake_enabled": d.stake_enabled,
        "formula": "score = (wR·R + wL·(1−L) + wF·(1−F) [+ wS·S]) / Σw, rounded down to a basis point",
        "share": d.share,
        "healthy_replicas": d.healthy_replicas,
        "emergency_replacement": d.emergency_replacement,
        "config_hash": d.config_hash,
        "snapshot_position": d.epoch,
    })
}
