//! Ejection: a pure per-node outlier tracker (Envoy outlier detection, Finagle failure accrual).
//! Consecutive failures eject a node for a growing, capped time; after it expires one probe decides.
//! "Never eject the last healthy replica" is enforced against the model's replica set. Time is always
//! an argument; this module never reads the clock and emits no events (the caller records them).

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::NodeId;

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

/// The outcome of one attempt, as the tracker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A valid reply.
    Success,
    /// A crash, timeout or error reply.
    Failure,
    /// Output that failed validation (counts towards both streaks).
    InvalidOutput,
}

/// One node's outlier state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHealth {
    /// Failures in a row (invalid outputs included).
    pub consecutive_failures: u32,
    /// Invalid outputs in a row.
    pub consecutive_invalid: u32,
    /// k: ejections in the current episode (reset by a successful probe).
    pub ejections: u32,
    /// Ejected until this instant.
    pub ejected_until: Option<DateTime<Utc>>,
    /// The single probe after expiry is in flight.
    pub probe_in_flight: bool,
}

/// Where a node stands at an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum HealthState {
    /// Serving normally.
    Healthy,
    /// Ejected until the given instant.
    Ejected {
        /// End of the ejection.
        until: DateTime<Utc>,
    },
    /// Ejection expired: the next request is the probe that decides.
    AwaitingProbe,
    /// The probe is in flight; no other traffic.
    Probing,
}

/// What recording an outcome changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "transition")]
pub enum Transition {
    /// Nothing worth an event.
    None,
    /// The node was ejected (k-th time) until `until`.
    Ejected {
        /// k.
        k: u32,
        /// End of the ejection.
        until: DateTime<Utc>,
    },
    /// The probe succeeded: the node is back.
    Restored,
    /// The node crossed the threshold but is the last healthy replica of a model it serves: kept,
    /// and the model needs an emergency re-placement.
    KeptLastHealthy,
}

impl NodeHealth {
    /// The node's state at `now`.
    pub fn state(&self, now: DateTime<Utc>) -> HealthState {
        match self.ejected_until {
            None => HealthState::Healthy,
            Some(until) if now < until => HealthState::Ejected { until },
            Some(_) if self.probe_in_flight => HealthState::Probing,
            Some(_) => HealthState::AwaitingProbe,
        }
    }

    /// Whether routing should treat the node as ejected at `now` (ejected, or its probe is out).
    pub fn is_ejected(&self, now: DateTime<Utc>) -> bool {
        matches!(
            self.state(now),
            HealthState::Ejected { .. } | HealthState::Probing
        )
    }

    /// Healthy in the sense of "counts as a healthy replica": not ejected and not on probation-probe.
    pub fn is_healthy(&self, now: DateTime<Utc>) -> bool {
        self.state(now) == HealthState::Healthy
    }

    /// Marks the probe as dispatched; returns false (and changes nothing) unless a probe was due.
    pub fn start_probe(&mut self, now: DateTime<Utc>) -> bool {
        if self.state(now) == HealthState::AwaitingProbe {
            self.probe_in_flight = true;
            true
        } else {
            false
        }
    }

    /// Length of the k-th ejection: `base × k`, capped.
    pub fn ejection_length(k: u32, policy: &EjectionPolicy) -> Duration {
        let ms = policy
            .base_ejection_ms
            .saturating_mul(i64::from(k.max(1)))
            .min(policy.max_ejection_ms);
        Duration::milliseconds(ms)
    }

    /// Records one outcome at `now`. `may_eject` is the answer of [`may_eject`] for this node:
    /// when false the node is never ejected (the last healthy replica) and `KeptLastHealthy` is
    /// returned instead.
    pub fn record(
        &mut self,
        outcome: Outcome,
        now: DateTime<Utc>,
        policy: &EjectionPolicy,
        may_eject: bool,
    ) -> Transition {
        let probing = self.ejected_until.is_some_and(|u| now >= u);
        match outcome {
            Outcome::Success => {
                self.consecutive_failures = 0;
                self.consecutive_invalid = 0;
                if probing {
                    *self = NodeHealth::default();
                    return Transition::Restored;
                }
                Transition::None
            }
            Outcome::Failure | Outcome::InvalidOutput => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                if outcome == Outcome::InvalidOutput {
                    self.consecutive_invalid = self.consecutive_invalid.saturating_add(1);
                } else {
                    self.consecutive_invalid = 0;
                }
                let tripped = probing
                    || self.consecutive_failures >= policy.consecutive_failures
                    || self.consecutive_invalid >= policy.consecutive_invalid;
                if !tripped || (self.is_ejected(now) && !probing) {
                    return Transition::None;
                }
                if !may_eject {
                    return Transition::KeptLastHealthy;
                }
                self.ejections = self.ejections.saturating_add(1);
                let until = now + Self::ejection_length(self.ejections, policy);
                self.ejected_until = Some(until);
                self.probe_in_flight = false;
                self.consecutive_failures = 0;
                self.consecutive_invalid = 0;
                Transition::Ejected {
                    k: self.ejections,
                    until,
                }
            }
        }
    }
}

/// Whether `node` may be ejected at `now`: in every replica set that contains it, some other
/// replica is healthy. Nodes missing from `health` count as healthy.
pub fn may_eject(
    node: &NodeId,
    replica_sets: &[Vec<NodeId>],
    health: &BTreeMap<NodeId, NodeHealth>,
    now: DateTime<Utc>,
) -> bool {
    replica_sets
        .iter()
        .filter(|set| set.contains(node))
        .all(|set| {
            set.iter()
                .any(|n| n != node && health.get(n).is_none_or(|h| h.is_healthy(now)))
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn t(ms: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + Duration::milliseconds(ms)
    }

    fn id(s: &str) -> NodeId {
        NodeId::parse(s).unwrap()
    }

    proptest! {
        // Property 4: a node failing every request is ejected within 3 (2 for invalid output).
        #[test]
        fn always_failing_node_is_ejected_quickly(invalid in any::<bool>(), step in 1i64..5_000) {
            let policy = EjectionPolicy::default();
            let mut h = NodeHealth::default();
            let outcome = if invalid { Outcome::InvalidOutput } else { Outcome::Failure };
            let limit = if invalid { 2 } else { 3 };
            let mut ejected_at = None;
            for k in 1..=limit {
                if let Transition::Ejected { k: 1, .. } = h.record(outcome, t(step * i64::from(k)), &policy, true) {
                    ejected_at = Some(k);
                    break;
                }
            }
            prop_assert_eq!(ejected_at, Some(limit));
        }

        // Property 5: the last healthy replica is never ejected, whatever the outcomes and timing.
        #[test]
        fn last_healthy_replica_is_never_ejected(
            steps in proptest::collection::vec((0usize..3, 0usize..3, 0i64..40_000), 1..200),
        ) {
            let policy = EjectionPolicy::default();
            let nodes = [id("a"), id("b"), id("c")];
            let sets = vec![vec![nodes[0].clone(), nodes[1].clone()], vec![nodes[1].clone(), nodes[2].clone()]];
            let mut book: BTreeMap<NodeId, NodeHealth> = BTreeMap::new();
            let mut now = 0i64;
            for (who, what, dt) in steps {
                now += dt;
                let node = &nodes[who];
                let outcome = [Outcome::Success, Outcome::Failure, Outcome::InvalidOutput][what];
                let allowed = may_eject(node, &sets, &book, t(now));
                book.entry(node.clone()).or_default().record(outcome, t(now), &policy, allowed);
                for set in &sets {
                    let healthy = set
                        .iter()
                        .filter(|n| book.get(*n).is_none_or(|h| h.is_healthy(t(now))))
                        .count();
                    prop_assert!(healthy >= 1, "set {:?} has no healthy replica at {}", set, now);
                }
            }
        }
    }

    #[test]
    fn ejection_grows_by_k_capped_and_a_probe_decides() {
        let policy = EjectionPolicy::default();
        let lengths: Vec<i64> = (1..=12)
            .map(|k| NodeHealth::ejection_length(k, &policy).num_seconds())
            .collect();
        assert_eq!(lengths[..3], [30, 60, 90]);
        assert_eq!(lengths[11], 300);

        let mut h = NodeHealth::default();
        for s in 0..3 {
            h.record(Outcome::Failure, t(s), &policy, true);
        }
        assert_eq!(
            h.state(t(10)),
            HealthState::Ejected {
                until: t(2 + 30_000)
            }
        );
        assert!(!h.start_probe(t(10)));
        // Late failures while ejected do not extend it.
        assert_eq!(
            h.record(Outcome::Failure, t(20), &policy, true),
            Transition::None
        );
        assert!(h.start_probe(t(40_000)));
        assert_eq!(h.state(t(40_000)), HealthState::Probing);
        // Probe fails: k = 2, 60 s.
        assert_eq!(
            h.record(Outcome::Failure, t(40_001), &policy, true),
            Transition::Ejected {
                k: 2,
                until: t(100_001)
            }
        );
        assert!(h.start_probe(t(100_001)));
        assert_eq!(
            h.record(Outcome::Success, t(100_002), &policy, true),
            Transition::Restored
        );
        assert!(h.is_healthy(t(100_002)));
        assert_eq!(h, NodeHealth::default());
    }

    #[test]
    fn success_resets_the_streak_and_protection_is_reported() {
        let policy = EjectionPolicy::default();
        let mut h = NodeHealth::default();
        h.record(Outcome::Failure, t(0), &policy, true);
        h.record(Outcome::Failure, t(1), &policy, true);
        h.record(Outcome::Success, t(2), &policy, true);
        assert_eq!(
            h.record(Outcome::Failure, t(3), &policy, true),
            Transition::None
        );
        h.record(Outcome::Failure, t(4), &policy, true);
        assert_eq!(
            h.record(Outcome::Failure, t(5), &policy, false),
            Transition::KeptLastHealthy
        );
        assert!(h.is_healthy(t(5)));
    }
}
