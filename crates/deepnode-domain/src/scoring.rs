//! Routing: which replica of a model serves a request. Filter, then a weighted, normalised score in
//! integer basis points (Kubernetes-scheduler style), then deterministic tie-breaks, then a seeded
//! traffic share for the lower-ranked replica so it keeps being observed (Envoy slow start). The
//! result is a self-contained [`RouteDecision`] that can be re-checked from the recorded event alone.
//! This module does no IO, reads no clock and keeps no state: ejection tracking lives in
//! `ejection.rs`, the failover loop in the scheduler service.

use std::cmp::Ordering;
use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fixed::Bps;
use crate::ids::{ModelId, NodeId, RequestId};

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
    /// Domains whose routing and placement weigh stake (POLICY.md: "only where the domain enables
    /// it"); none by default.
    pub stake_domains: Vec<String>,
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
            stake_domains: Vec::new(),
        }
    }
}

/// A node's lifecycle status; the one shared with the events (CONTRACT §5).
pub use crate::events::NodeStatus;

/// Why a node was left out of a routing decision. Every filtered node carries exactly one (the first
/// check it failed, in the order listed here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FilterReason {
    /// Not deployed for the model.
    NotDeployed,
    /// Status is not active/probation.
    Ineligible(NodeStatus),
    /// Currently ejected by the outlier tracker.
    Ejected,
    /// `in_flight >= capacity`.
    AtCapacity,
}

/// One node as routing sees it at decision time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CandidateSnapshot {
    /// The node.
    pub node_id: NodeId,
    /// Deployed for the requested model.
    pub deployed: bool,
    /// Lifecycle status.
    pub status: NodeStatus,
    /// Currently ejected (see `ejection.rs`).
    pub ejected: bool,
    /// Requests in flight on the node.
    pub in_flight: u32,
    /// Concurrent requests the node accepts.
    pub capacity: u32,
    /// Reputation R.
    pub reputation: Bps,
    /// Recent failure rate F.
    pub failure_rate: Bps,
    /// Stake in micro-units.
    pub stake_micros: u64,
    /// Total assignments served so far (tie-break).
    pub assignments: u64,
}

/// The explicit snapshot a routing decision is a pure function of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteInput {
    /// The requested model.
    pub model_id: ModelId,
    /// The request; seeds the lower-ranked replica's traffic share.
    pub request_id: RequestId,
    /// Decision seed (tie-break hash).
    pub seed: u64,
    /// Epoch of the snapshot.
    pub epoch: u64,
    /// Hash of the effective config, copied into the record.
    pub config_hash: String,
    /// Whether the model's domain weighs stake.
    pub domain_stake_enabled: bool,
    /// Median stake of the domain in micro-units (the S normaliser).
    pub domain_median_stake_micros: u64,
    /// The nodes considered (usually the model's replicas); order does not matter.
    pub candidates: Vec<CandidateSnapshot>,
}

/// The factors of one candidate, each in basis points.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Factors {
    /// R.
    pub reputation: Bps,
    /// L = in_flight / capacity.
    pub load: Bps,
    /// F.
    pub failure_rate: Bps,
    /// S = stake / (stake + median), zero when the domain disables stake.
    pub stake: Bps,
}

/// One ranked candidate with everything needed to re-check its score.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScoredCandidate {
    /// The node.
    pub node_id: NodeId,
    /// 0 = best.
    pub rank: u32,
    /// Passed the filter (false only for last-resort nodes in a degraded decision).
    pub healthy: bool,
    /// Per-factor values.
    pub factors: Factors,
    /// `wR·R + wL·(1−L) + wF·(1−F) [+ wS·S]`, in bps².
    pub weighted_sum: u64,
    /// `weighted_sum / weight_total`, rounded down.
    pub score: Bps,
    /// Tie-break input: requests in flight.
    pub in_flight: u32,
    /// Tie-break input: total assignments.
    pub assignments: u64,
    /// Tie-break input: `hash(seed, node_id)`.
    pub tie_hash: u64,
}

/// How the lower-ranked healthy replica's share was applied to this request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficShare {
    /// `clamp(s_b / (s_p + s_b), min, max)`.
    pub lower_ranked_share: Bps,
    /// `hash(seed, request_id) mod 10,000`.
    pub draw: Bps,
    /// `draw < share`: the second-ranked node serves this request.
    pub lower_ranked_chosen: bool,
}

/// A routing decision and its full record (recorded in `AttemptDispatched`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteDecision {
    /// The model.
    pub model_id: ModelId,
    /// The request.
    pub request_id: RequestId,
    /// Seed used.
    pub seed: u64,
    /// Epoch of the snapshot.
    pub epoch: u64,
    /// Config hash of the policy used.
    pub config_hash: String,
    /// Attempt 1 goes here.
    pub primary: NodeId,
    /// Attempt 2 goes here (always a different node), if any.
    pub backup: Option<NodeId>,
    /// Weights used.
    pub weights: Weights,
    /// Whether the stake factor counted.
    pub stake_enabled: bool,
    /// Σ of the weights that counted (the normaliser).
    pub weight_total: u32,
    /// Tie-break order used after the score.
    pub tie_break: Vec<TieBreak>,
    /// Ranked candidates: healthy ones first, then last-resort ones.
    pub candidates: Vec<ScoredCandidate>,
    /// Every node that failed the filter, with its reason, sorted by node id.
    pub filtered: Vec<FilteredNode>,
    /// The traffic share, when two healthy replicas exist.
    pub share: Option<TrafficShare>,
    /// Healthy (unfiltered) nodes.
    pub healthy_replicas: u32,
    /// No healthy replica: routed to the least bad one; rotation should re-place now.
    pub emergency_replacement: bool,
}

/// A node left out of a decision and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilteredNode {
    /// The node.
    pub node_id: NodeId,
    /// Why.
    pub reason: FilterReason,
}

/// Why no route exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No node can serve the model, not even a last-resort (ejected or saturated) replica.
    #[error("no eligible nodes for model {model_id}")]
    NoEligibleNodes {
        /// The model.
        model_id: ModelId,
    },
    /// The snapshot lists a node twice, so its order would matter.
    #[error("node {0} appears twice in the snapshot")]
    DuplicateNode(NodeId),
}

/// A 64-bit hash of `(seed, tag, key)` from SHA-256: the only source of "randomness" in policy.
pub fn seeded_hash(seed: u64, tag: &str, key: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(seed.to_be_bytes());
    h.update(tag.as_bytes());
    h.update([0u8]);
    h.update(key.as_bytes());
    let out = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&out[..8]);
    u64::from_be_bytes(first)
}

/// S = stake / (stake + median): bounded and diminishing. Zero stake gives 0.
pub fn stake_factor(stake_micros: u64, median_micros: u64) -> Bps {
    if stake_micros == 0 {
        return Bps::ZERO;
    }
    Bps::ratio(stake_micros, stake_micros.saturating_add(median_micros))
}

/// Σ of the weights that count, and Σ weight × factor (bps²).
pub fn weighted(weights: &Weights, f: &Factors, stake_enabled: bool) -> (u32, u64) {
    let mut total = weights.reputation.raw() + weights.load.raw() + weights.failure_rate.raw();
    let mut sum = u64::from(weights.reputation.raw()) * u64::from(f.reputation.raw())
        + u64::from(weights.load.raw()) * u64::from(f.load.complement().raw())
        + u64::from(weights.failure_rate.raw()) * u64::from(f.failure_rate.complement().raw());
    if stake_enabled {
        total += weights.stake.raw();
        sum += u64::from(weights.stake.raw()) * u64::from(f.stake.raw());
    }
    (total, sum)
}

/// The normalised score: `sum / total`, rounded down; 0 when every weight is 0.
pub fn normalised(total: u32, sum: u64) -> Bps {
    if total == 0 {
        return Bps::ZERO;
    }
    Bps::saturating(sum / u64::from(total))
}

fn effective_tie_break(policy: &RoutingPolicy) -> Vec<TieBreak> {
    let mut order: Vec<TieBreak> = Vec::new();
    for t in &policy.tie_break {
        if !order.contains(t) {
            order.push(*t);
        }
    }
    if !order.contains(&TieBreak::NodeId) {
        order.push(TieBreak::NodeId);
    }
    order
}

fn rank_cmp(a: &ScoredCandidate, b: &ScoredCandidate, order: &[TieBreak]) -> Ordering {
    b.score.cmp(&a.score).then_with(|| {
        for t in order {
            let o = match t {
                TieBreak::FewerInFlight => a.in_flight.cmp(&b.in_flight),
                TieBreak::FewerAssignments => a.assignments.cmp(&b.assignments),
                TieBreak::SeededHash => a.tie_hash.cmp(&b.tie_hash),
                TieBreak::NodeId => a.node_id.cmp(&b.node_id),
            };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    })
}

fn filter(c: &CandidateSnapshot) -> Option<FilterReason> {
    if !c.deployed {
        Some(FilterReason::NotDeployed)
    } else if !c.status.is_eligible() {
        Some(FilterReason::Ineligible(c.status))
    } else if c.ejected {
        Some(FilterReason::Ejected)
    } else if c.in_flight >= c.capacity {
        Some(FilterReason::AtCapacity)
    } else {
        None
    }
}

/// Whether a request `route` refused could start once a slot frees: some replica is held back by
/// nothing but its capacity (deployed, eligible, not ejected, at capacity). Such a request waits for
/// a slot rather than being refused (`overloaded` only when none frees in time); one no replica
/// could ever serve is refused at once (`no_eligible_nodes`).
pub fn waits_for_capacity(input: &RouteInput) -> bool {
    input
        .candidates
        .iter()
        .any(|c| filter(c) == Some(FilterReason::AtCapacity))
}

/// One scheduler copy's share of a node's capacity when `copies` copies route to it and this one
/// ranks `rank` (0-based) among them: the copies split the capacity evenly, and the remainder's
/// slots go one each to the copies that follow, around the ring, a place fixed by the node's id — so
/// the shares always add up to the capacity, and different nodes' remainders fall on different
/// copies. A capacity below the number of copies leaves some copies no slot on that node.
pub fn capacity_share(capacity: u32, node: &NodeId, copies: u32, rank: u32) -> u32 {
    let copies = copies.max(1);
    let start = seeded_hash(0, "capacity-share", node.as_str()) % u64::from(copies);
    let offset = (u64::from(rank % copies) + u64::from(copies) - start) % u64::from(copies);
    capacity / copies + u32::from(offset < u64::from(capacity % copies))
}

/// Picks the primary and backup replica for one request.
///
/// Filter (deployed, active/probation, not ejected, below capacity), score in integer bps, rank with
/// the policy's tie-breaks, then give the second-ranked healthy replica its seeded share of traffic.
/// With fewer than two healthy replicas the missing slots fall back to deployed nodes that are only
/// ejected ("least bad": the last healthy replica is never ejected for good); with none healthy the
/// decision says `emergency_replacement`. A replica at capacity is never a fallback: capacity is the
/// admission limit, so a model whose replicas are all full gets `NoEligibleNodes` (backpressure)
/// rather than an overloaded node.
pub fn route(input: &RouteInput, policy: &RoutingPolicy) -> Result<RouteDecision, RouteError> {
    let mut seen = BTreeSet::new();
    for c in &input.candidates {
        if !seen.insert(&c.node_id) {
            return Err(RouteError::DuplicateNode(c.node_id.clone()));
        }
    }
    let order = effective_tie_break(policy);
    let stake_enabled = input.domain_stake_enabled;
    let mut healthy = Vec::new();
    let mut last_resort = Vec::new();
    let mut filtered = Vec::new();
    let mut weight_total = 0;
    for c in &input.candidates {
        let factors = Factors {
            reputation: c.reputation,
            load: Bps::ratio(u64::from(c.in_flight), u64::from(c.capacity)),
            failure_rate: c.failure_rate,
            stake: if stake_enabled {
                stake_factor(c.stake_micros, input.domain_median_stake_micros)
            } else {
                Bps::ZERO
            },
        };
        let (total, sum) = weighted(&policy.weights, &factors, stake_enabled);
        weight_total = total;
        let scored = ScoredCandidate {
            node_id: c.node_id.clone(),
            rank: 0,
            healthy: true,
            score: normalised(total, sum),
            weighted_sum: sum,
            factors,
            in_flight: c.in_flight,
            assignments: c.assignments,
            tie_hash: seeded_hash(input.seed, "route-tie", c.node_id.as_str()),
        };
        match filter(c) {
            None => healthy.push(scored),
            Some(reason) => {
                if reason == FilterReason::Ejected {
                    last_resort.push(ScoredCandidate {
                        healthy: false,
                        ..scored
                    });
                }
                filtered.push(FilteredNode {
                    node_id: c.node_id.clone(),
                    reason,
                });
            }
        }
    }
    filtered.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    healthy.sort_by(|a, b| rank_cmp(a, b, &order));
    last_resort.sort_by(|a, b| rank_cmp(a, b, &order));
    let healthy_replicas = u32::try_from(healthy.len()).unwrap_or(u32::MAX);
    let emergency_replacement = healthy.is_empty();
    let mut share = None;
    let mut candidates = healthy;
    if candidates.len() >= 2 {
        let (sp, sb) = (candidates[0].score.raw(), candidates[1].score.raw());
        let raw = if sp + sb == 0 {
            Bps::saturating(5_000)
        } else {
            Bps::ratio(u64::from(sb), u64::from(sp + sb))
        };
        let lower_ranked_share = raw.clamp_to(policy.backup_min_share, policy.backup_max_share);
        let draw = Bps::saturating(
            seeded_hash(input.seed, "route-share", input.request_id.as_str()) % 10_000,
        );
        share = Some(TrafficShare {
            lower_ranked_share,
            draw,
            lower_ranked_chosen: draw < lower_ranked_share,
        });
    }
    // Degraded: fill missing slots (up to two) with the least bad last-resort replicas.
    let need = 2usize.saturating_sub(candidates.len());
    candidates.extend(last_resort.into_iter().take(need));
    for (i, c) in candidates.iter_mut().enumerate() {
        c.rank = u32::try_from(i).unwrap_or(u32::MAX);
    }
    let (first, second) = match candidates.as_slice() {
        [] => {
            return Err(RouteError::NoEligibleNodes {
                model_id: input.model_id.clone(),
            })
        }
        [only] => (only.node_id.clone(), None),
        [a, b, ..] => (a.node_id.clone(), Some(b.node_id.clone())),
    };
    let (primary, backup) = match (&share, second) {
        (Some(s), Some(b)) if s.lower_ranked_chosen => (b, Some(first)),
        (_, second) => (first, second),
    };
    Ok(RouteDecision {
        model_id: input.model_id.clone(),
        request_id: input.request_id.clone(),
        seed: input.seed,
        epoch: input.epoch,
        config_hash: input.config_hash.clone(),
        primary,
        backup,
        weights: policy.weights.clone(),
        stake_enabled,
        weight_total,
        tie_break: order,
        candidates,
        filtered,
        share,
        healthy_replicas,
        emergency_replacement,
    })
}

impl RouteDecision {
    /// Re-checks the record on its own: every candidate's `Σ weight × factor` and normalised score
    /// recompute exactly, the ranking respects scores and tie-breaks, primary and backup are distinct
    /// ranked candidates, and every filtered node is absent from the healthy set.
    pub fn verify(&self) -> bool {
        let mut total_ok = true;
        for c in &self.candidates {
            let (total, sum) = weighted(&self.weights, &c.factors, self.stake_enabled);
            if total != self.weight_total || sum != c.weighted_sum {
                total_ok = false;
            }
            if normalised(total, sum) != c.score {
                total_ok = false;
            }
            if !self.stake_enabled && c.factors.stake != Bps::ZERO {
                total_ok = false;
            }
        }
        let healthy: Vec<&ScoredCandidate> = self.candidates.iter().filter(|c| c.healthy).collect();
        let ranked = healthy
            .windows(2)
            .all(|w| rank_cmp(w[0], w[1], &self.tie_break) != Ordering::Greater);
        let in_candidates = |n: &NodeId| self.candidates.iter().any(|c| &c.node_id == n);
        let ends_ok = in_candidates(&self.primary)
            && match &self.backup {
                None => true,
                Some(b) => b != &self.primary && in_candidates(b),
            };
        let filtered_ok = self
            .filtered
            .iter()
            .all(|f| !healthy.iter().any(|c| c.node_id == f.node_id));
        total_ok && ranked && ends_ok && filtered_ok
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(i: usize) -> NodeId {
        NodeId::parse(&format!("n-{i:02}")).unwrap()
    }

    fn cand(i: usize, r: u32, f: u32, in_flight: u32) -> CandidateSnapshot {
        CandidateSnapshot {
            node_id: node(i),
            deployed: true,
            status: NodeStatus::Active,
            ejected: false,
            in_flight,
            capacity: 10,
            reputation: Bps::saturating(u64::from(r)),
            failure_rate: Bps::saturating(u64::from(f)),
            stake_micros: 1_000,
            assignments: 0,
        }
    }

    fn input(candidates: Vec<CandidateSnapshot>, request: &str) -> RouteInput {
        RouteInput {
            model_id: ModelId::parse("m-1").unwrap(),
            request_id: RequestId::parse(request).unwrap(),
            seed: 7,
            epoch: 3,
            config_hash: "cfg".to_owned(),
            domain_stake_enabled: false,
            domain_median_stake_micros: 1_000,
            candidates,
        }
    }

    #[test]
    fn a_model_whose_servable_replicas_are_all_full_waits_and_one_with_none_is_refused() {
        // both replicas full: refused now, but a freed slot would let it start
        let full = input(vec![cand(1, 9_000, 0, 10), cand(2, 8_000, 0, 10)], "r-1");
        assert!(route(&full, &RoutingPolicy::default()).is_err());
        assert!(waits_for_capacity(&full));
        // one full, the other jailed: still worth waiting for the full one
        let mut jailed = cand(2, 8_000, 0, 0);
        jailed.status = NodeStatus::Jailed;
        let one_full = input(vec![cand(1, 9_000, 0, 10), jailed.clone()], "r-1");
        assert!(waits_for_capacity(&one_full));
        // jailed and offline, none at capacity: nothing to wait for
        let mut offline = cand(1, 9_000, 0, 10);
        offline.status = NodeStatus::Offline;
        let none = input(vec![offline, jailed], "r-1");
        assert!(route(&none, &RoutingPolicy::default()).is_err());
        assert!(!waits_for_capacity(&none));
    }

    #[test]
    fn the_copies_shares_of_a_capacity_add_up_to_it_and_differ_by_at_most_one() {
        for capacity in [1, 2, 7, 8, 9, 64, 1_000] {
            for copies in 1..=5 {
                let mut layouts = BTreeSet::new();
                for n in ["a", "b", "c", "d", "e", "f", "gpu.n-1"] {
                    let node = NodeId::parse(n).unwrap();
                    let shares: Vec<u32> = (0..copies)
                        .map(|rank| capacity_share(capacity, &node, copies, rank))
                        .collect();
                    assert_eq!(shares.iter().sum::<u32>(), capacity, "{n} {shares:?}");
                    let (lo, hi) = (shares.iter().min(), shares.iter().max());
                    assert!(hi.unwrap() - lo.unwrap() <= 1, "{n} {shares:?}");
                    layouts.insert(shares);
                }
                if capacity % copies != 0 {
                    assert!(layouts.len() > 1, "remainders spread over copies");
                }
            }
        }
        let node = NodeId::parse("a").unwrap();
        assert_eq!(capacity_share(8, &node, 1, 0), 8, "one copy has it all");
        assert_eq!(
            capacity_share(8, &node, 0, 0),
            8,
            "no copies counted yet: as one"
        );
    }

    fn arb_candidate(i: usize) -> impl Strategy<Value = CandidateSnapshot> {
        (
            any::<bool>(),
            0usize..7,
            any::<bool>(),
            0u32..12,
            1u32..12,
            0u32..=10_000,
            0u32..=10_000,
            0u64..5_000,
            0u64..4,
        )
            .prop_map(
                move |(deployed, st, ejected, in_flight, capacity, r, f, stake, assignments)| {
                    let status = [
                        NodeStatus::Active,
                        NodeStatus::Probation,
                        NodeStatus::Active,
                        NodeStatus::Offline,
                        NodeStatus::Jailed,
                        NodeStatus::PhasedOut,
                        NodeStatus::Active,
                    ][st];
                    CandidateSnapshot {
                        node_id: node(i),
                        deployed: deployed || i.is_multiple_of(2),
                        status,
                        ejected: ejected && i.is_multiple_of(3),
                        in_flight,
                        capacity,
                        reputation: Bps::saturating(u64::from(r)),
                        failure_rate: Bps::saturating(u64::from(f)),
                        stake_micros: stake,
                        assignments,
                    }
                },
            )
    }

    fn arb_input() -> impl Strategy<Value = (RouteInput, Vec<usize>)> {
        (1usize..7)
            .prop_flat_map(|n| {
                (
                    (0..n).map(arb_candidate).collect::<Vec<_>>(),
                    Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
                    any::<bool>(),
                    "[a-z0-9]{1,12}",
                )
            })
            .prop_map(|(cands, perm, stake, req)| {
                let mut i = input(cands, &req);
                i.domain_stake_enabled = stake;
                (i, perm)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        // Properties 1 and 9.
        #[test]
        fn same_snapshot_same_bytes_in_any_order_and_records_verify((inp, perm) in arb_input()) {
            let policy = RoutingPolicy::default();
            let a = route(&inp, &policy);
            let mut shuffled = inp.clone();
            shuffled.candidates = perm.iter().map(|&i| inp.candidates[i].clone()).collect();
            let b = route(&shuffled, &policy);
            match (a, b) {
                (Ok(a), Ok(b)) => {
                    prop_assert_eq!(serde_json::to_vec(&a).unwrap(), serde_json::to_vec(&b).unwrap());
                    prop_assert!(a.verify());
                    let back: RouteDecision = serde_json::from_slice(&serde_json::to_vec(&a).unwrap()).unwrap();
                    prop_assert!(back.verify());
                    let healthy = a.candidates.iter().filter(|c| c.healthy).count();
                    prop_assert_eq!(healthy + a.filtered.len(), inp.candidates.len());
                    prop_assert_eq!(a.emergency_replacement, healthy == 0);
                    prop_assert_ne!(Some(&a.primary), a.backup.as_ref());
                }
                (Err(a), Err(b)) => prop_assert_eq!(a, b),
                (a, b) => prop_assert!(false, "order changed the outcome: {:?} vs {:?}", a, b),
            }
        }


        // Property 3 (routing half): the lower-ranked replica gets at least 10 %.
        #[test]
        fn lower_ranked_replica_gets_at_least_ten_percent(
            r1 in 0u32..=10_000, r2 in 0u32..=10_000, f1 in 0u32..=10_000, f2 in 0u32..=10_000,
        ) {
            let policy = RoutingPolicy::default();
            let cands = vec![cand(1, r1, f1, 0), cand(2, r2, f2, 0)];
            let probe = route(&input(cands.clone(), "probe"), &policy).unwrap();
            let lower = probe.candidates[1].node_id.clone();
            let n = 2_000;
            let mut lower_hits = 0;
            for k in 0..n {
                let d = route(&input(cands.clone(), &format!("req-{k}")), &policy).unwrap();
                prop_assert_eq!(d.candidates[1].node_id.clone(), lower.clone());
                let backup = d.backup.clone().unwrap();
                prop_assert_ne!(&backup, &d.primary);
                if d.primary == lower {
                    lower_hits += 1;
                }
            }
            // 10 % expected at minimum; allow sampling noise (σ ≈ 0.7 % at n = 2,000).
            prop_assert!(lower_hits * 100 >= n * 8, "lower-ranked got {lower_hits}/{n}");
            prop_assert!(lower_hits * 100 <= n * 53, "lower-ranked got {lower_hits}/{n}");
        }
    }

    #[test]
    fn score_is_the_weighted_sum_and_renormalises_without_stake() {
        let policy = RoutingPolicy::default();
        let d = route(&input(vec![cand(1, 8_000, 1_000, 5)], "r"), &policy).unwrap();
        // 0.40·0.8 + 0.25·0.5 + 0.25·0.9 = 0.67, over 0.90 → 0.7444…
        assert_eq!(d.weight_total, 9_000);
        assert_eq!(
            d.candidates[0].weighted_sum,
            4_000 * 8_000 + 2_500 * 5_000 + 2_500 * 9_000
        );
        assert_eq!(d.candidates[0].score, Bps::saturating(7_444));
        assert!(d.verify());
        let mut tampered = d.clone();
        tampered.candidates[0].score = Bps::saturating(7_445);
        assert!(!tampered.verify());
    }

    #[test]
    fn ties_break_on_in_flight_then_node_id() {
        let policy = RoutingPolicy::default();
        let mut a = cand(1, 5_000, 0, 0);
        let mut b = cand(2, 5_000, 0, 0);
        a.capacity = 1_000_000;
        b.capacity = 1_000_000;
        b.in_flight = 1; // same bps load (rounds to 0), more in flight
        let d = route(&input(vec![b, a], "r"), &policy).unwrap();
        assert_eq!(d.candidates[0].node_id, node(1));
    }

    #[test]
    fn all_replicas_ejected_routes_to_least_bad_and_asks_for_replacement() {
        let policy = RoutingPolicy::default();
        let mut a = cand(1, 9_000, 0, 0);
        let mut b = cand(2, 4_000, 0, 0);
        a.ejected = true;
        b.ejected = true;
        let mut off = cand(3, 10_000, 0, 0);
        off.status = NodeStatus::Offline;
        let d = route(&input(vec![a, b, off], "r"), &policy).unwrap();
        assert!(d.emergency_replacement);
        assert_eq!(d.primary, node(1));
        assert_eq!(d.backup, Some(node(2)));
        assert_eq!(d.filtered.len(), 3);
        assert_eq!(
            d.filtered[2].reason,
            FilterReason::Ineligible(NodeStatus::Offline)
        );
        assert!(d.verify());
    }

    #[test]
    fn replicas_at_capacity_are_never_a_fallback() {
        // given both replicas full
        let policy = RoutingPolicy::default();
        let mut a = cand(1, 9_000, 0, 0);
        let mut b = cand(2, 4_000, 0, 0);
        a.in_flight = a.capacity;
        b.in_flight = b.capacity;
        // then the request is refused (backpressure), not sent to an overloaded node
        assert!(matches!(
            route(&input(vec![a.clone(), b.clone()], "r"), &policy),
            Err(RouteError::NoEligibleNodes { .. })
        ));
        // and with one of them ejected too, the ejected one is the least bad
        b.in_flight = 0;
        b.ejected = true;
        let d = route(&input(vec![a, b], "r"), &policy).unwrap();
        assert_eq!((d.primary.clone(), d.backup.clone()), (node(2), None));
        assert!(d.emergency_replacement);
    }

    #[test]
    fn nothing_deployed_is_an_error() {
        let mut a = cand(1, 9_000, 0, 0);
        a.deployed = false;
        assert!(matches!(
            route(&input(vec![a], "r"), &RoutingPolicy::default()),
            Err(RouteError::NoEligibleNodes { .. })
        ));
        let dup = vec![cand(1, 1, 1, 0), cand(1, 2, 2, 0)];
        assert!(matches!(
            route(&input(dup, "r"), &RoutingPolicy::default()),
            Err(RouteError::DuplicateNode(_))
        ));
    }
}
