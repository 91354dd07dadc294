//! Rotation: once per epoch, a bounded, idempotent set of make-before-break moves (assign, then
//! revoke) that improves placements, gives every probation node a turn in the growth slot, and lists
//! phase-out candidates. Pure: the planner reads an explicit snapshot and returns a plan; it does not
//! apply moves, emit events or read the clock.

use serde::{Deserialize, Serialize};

use crate::fixed::Bps;

/// Rotation policy (POLICY.md "Rotation" and "Phase-out").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RotationPolicy {
    /// A challenger must beat the incumbent's score by at least this much (0.10).
    pub hysteresis: Bps,
    /// Moves per epoch ≤ max(`min_moves_per_epoch`, this fraction of deployments) (5 %).
    pub max_moves_fraction: Bps,
    /// Floor of the per-epoch move cap (1).
    pub min_moves_per_epoch: u32,
    /// Replicas a node may gain per epoch (2).
    pub max_in_per_node: u32,
    /// Replicas a node may lose per epoch (2).
    pub max_out_per_node: u32,
    /// A replica stays at least this many epochs (2).
    pub min_residency_epochs: u64,
    /// A node that left a model may not get it back within this many epochs (6).
    pub no_move_back_epochs: u64,
    /// Redraw the growth slot every this many epochs (demo 5; 24 h worth in production).
    pub growth_redraw_every_epochs: u64,
    /// Phase-out when R is below this (0.3) …
    pub phase_out_reputation: Bps,
    /// … with at least this many observations (100) …
    pub phase_out_min_observations: u64,
    /// … outside immunity: younger than this is immune (24 h) …
    pub immunity_secs: i64,
    /// … or fewer scored requests than this is immune (50).
    pub immunity_min_scored_requests: u64,
}

impl Default for RotationPolicy {
    fn default() -> Self {
        Self {
            hysteresis: Bps::saturating(1_000),
            max_moves_fraction: Bps::saturating(500),
            min_moves_per_epoch: 1,
            max_in_per_node: 2,
            max_out_per_node: 2,
            min_residency_epochs: 2,
            no_move_back_epochs: 6,
            growth_redraw_every_epochs: 5,
            phase_out_reputation: Bps::saturating(3_000),
            phase_out_min_observations: 100,
            immunity_secs: 24 * 3600,
            immunity_min_scored_requests: 50,
        }
    }
}
