//! Placement: one model onto `k ≥ 2` distinct nodes, one from the top tier of the reputation ranking
//! and the rest drawn from the growth tier with a seeded, probation-boosted weighted draw. Pure and
//! deterministic: the same [`PlacementInput`] always yields the same [`Placement`], whatever the order
//! of its nodes. It never returns a single-node deployment and does not decide when to re-place (that
//! is `rotation.rs`).

use serde::{Deserialize, Serialize};

use crate::fixed::Bps;
use crate::scoring::Weights;

/// Placement policy (POLICY.md "Placement").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PlacementPolicy {
    /// Replicas per model (k ≥ 2; values below 2 are treated as 2).
    pub replicas: u32,
    /// Factor weights of the placement score (the routing factors with load = deployments/capacity).
    pub weights: Weights,
    /// Fraction of eligible nodes, by R, that may be top tier (⌈30 %⌉).
    pub top_tier_fraction: Bps,
    /// Observations a node needs to be top tier (50).
    pub top_tier_min_observations: u64,
    /// Below this many observations a node is in probation (50).
    pub probation_min_observations: u64,
    /// Nodes younger than this are in probation (24 h).
    pub probation_min_age_secs: i64,
    /// Draw-weight multiplier for probation nodes, in basis points over 1.0 (15,000 = ×1.5).
    pub probation_boost_bps: u32,
    /// Prefer replicas run by different operators when the operator is known.
    pub prefer_distinct_operators: bool,
}

impl Default for PlacementPolicy {
    fn default() -> Self {
        Self {
            replicas: 2,
            weights: Weights::default(),
            top_tier_fraction: Bps::saturating(3_000),
            top_tier_min_observations: 50,
            probation_min_observations: 50,
            probation_min_age_secs: 24 * 3600,
            probation_boost_bps: 15_000,
            prefer_distinct_operators: true,
        }
    }
}
