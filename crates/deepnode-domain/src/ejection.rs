//! Ejection: a pure per-node outlier tracker (Envoy outlier detection, Finagle failure accrual).
//! Consecutive failures eject a node for a growing, capped time; after it expires one probe decides.
//! "Never eject the last healthy replica" is enforced against the model's replica set. Time is always
//! an argument; this module never reads the clock and emits no events (the caller records them).

use serde::{Deserialize, Serialize};

/// Ejection policy (POLICY.md "Ejection").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EjectionPolicy {
    /// Consecutive failures that eject (3).
    pub consecutive_failures: u32,
    /// Consecutive invalid outputs that eject (2).
    pub consecutive_invalid: u32,
    /// First ejection lasts this long; the k-th lasts k times as long (30 s).
    pub base_ejection_ms: i64,
    /// Cap on one ejection (300 s).
    pub max_ejection_ms: i64,
}

impl Default for EjectionPolicy {
    fn default() -> Self {
        Self {
            consecutive_failures: 3,
            consecutive_invalid: 2,
            base_ejection_ms: 30_000,
            max_ejection_ms: 300_000,
        }
    }
}
