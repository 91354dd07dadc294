//! Routing: which replica of a model serves a request. Filter, then a weighted, normalised score in
//! integer basis points (Kubernetes-scheduler style), then deterministic tie-breaks, then a seeded
//! traffic share for the lower-ranked replica so it keeps being observed (Envoy slow start). The
//! result is a self-contained [`RouteDecision`] that can be re-checked from the recorded event alone.
//! This module does no IO, reads no clock and keeps no state: ejection tracking lives in
//! `ejection.rs`, the failover loop in the scheduler service.

use serde::{Deserialize, Serialize};

use crate::fixed::Bps;

/// Weights of the four routing/placement factors, in basis points (default 0.40/0.25/0.25/0.10).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Weights {
    /// Weight of reputation R.
    pub reputation: Bps,
    /// Weight of spare capacity (1 − L).
    pub load: Bps,
    /// Weight of reliability (1 − F).
    pub failure_rate: Bps,
    /// Weight of stake S; ignored (and the others renormalised) when the domain disables stake.
    pub stake: Bps,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            reputation: Bps::saturating(4_000),
            load: Bps::saturating(2_500),
            failure_rate: Bps::saturating(2_500),
            stake: Bps::saturating(1_000),
        }
    }
}

/// One tie-break rule, applied in order when two candidates have the same score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TieBreak {
    /// Fewer requests in flight first.
    FewerInFlight,
    /// Fewer total assignments first.
    FewerAssignments,
    /// Lower `hash(seed, node_id)` first.
    SeededHash,
    /// Lexicographically smaller node id first (always applied last so the order is total).
    NodeId,
}

/// Routing policy (POLICY.md "Routing score").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RoutingPolicy {
    /// Factor weights.
    pub weights: Weights,
    /// Tie-break order; `NodeId` is appended implicitly if missing.
    pub tie_break: Vec<TieBreak>,
    /// Minimum traffic share of the lower-ranked healthy replica (0.10).
    pub backup_min_share: Bps,
    /// Maximum traffic share of the lower-ranked healthy replica (0.50).
    pub backup_max_share: Bps,
}

impl Default for RoutingPolicy {
    fn default() -> Self {
        Self {
            weights: Weights::default(),
            tie_break: vec![
                TieBreak::FewerInFlight,
                TieBreak::FewerAssignments,
                TieBreak::SeededHash,
                TieBreak::NodeId,
            ],
            backup_min_share: Bps::saturating(1_000),
            backup_max_share: Bps::saturating(5_000),
        }
    }
}
