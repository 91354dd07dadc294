//! Placement: one model onto `k ≥ 2` distinct nodes, one from the top tier of the reputation ranking
//! and the rest drawn from the growth tier with a seeded, probation-boosted weighted draw. Pure and
//! deterministic: the same [`PlacementInput`] always yields the same [`Placement`], whatever the order
//! of its nodes. It never returns a single-node deployment and does not decide when to re-place (that
//! is `rotation.rs`).

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::book::NodeState;
use crate::config::PolicyConfig;
use crate::fixed::Bps;
use crate::ids::{ModelId, NodeId};
use crate::scoring::{
    normalised, seeded_hash, stake_factor, weighted, Factors, NodeStatus, Weights,
};

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

/// Which slot a replica fills: the tier the log records ([`crate::events::Tier`]).
pub use crate::events::Tier;

/// One node as placement and rotation see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementNode {
    /// The node.
    pub node_id: NodeId,
    /// Operator, when known; replicas prefer distinct operators.
    pub operator: Option<String>,
    /// Domain the node serves; must equal the model's.
    pub domain: String,
    /// Lifecycle status.
    pub status: NodeStatus,
    /// Replicas the node can host.
    pub max_deployments: u32,
    /// Replicas the node hosts now.
    pub deployments: u32,
    /// Reputation R.
    pub reputation: Bps,
    /// Recent failure rate F.
    pub failure_rate: Bps,
    /// Scored requests so far.
    pub observations: u64,
    /// Registration time (probation by age, phase-out order).
    pub registered_at: DateTime<Utc>,
    /// Stake in micro-units.
    pub stake_micros: u64,
}

impl PlacementNode {
    /// `node` as placement and rotation see it at `now`: reputation and failure rate in basis
    /// points (the one conversion from the book's floating point), its registered `capacity` as the
    /// most models it may host.
    pub fn of(node: &NodeState, now: DateTime<Utc>, cfg: &PolicyConfig) -> PlacementNode {
        PlacementNode {
            node_id: node.node_id.clone(),
            operator: None,
            domain: node.domain.clone(),
            status: node.status,
            max_deployments: node.capacity,
            deployments: node.deployments,
            reputation: Bps::from_f64(node.reputation.score_at(now, &cfg.reputation)),
            failure_rate: Bps::from_f64(node.reputation.failure_rate_at(now, &cfg.reputation)),
            observations: node.reputation.observations(),
            registered_at: node.registered_at,
            stake_micros: stake_micros(node.stake),
        }
    }
}

/// Stake in micro-units (negative or NaN stake counts as 0; absurd stakes saturate).
pub fn stake_micros(stake: f64) -> u64 {
    if stake.is_nan() || stake <= 0.0 {
        0
    } else {
        // Saturating float-to-int conversion is the intent.
        (stake * 1_000_000.0).round() as u64
    }
}

/// The explicit snapshot a placement is a pure function of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementInput {
    /// The model to place.
    pub model_id: ModelId,
    /// The model's domain.
    pub domain: String,
    /// Epoch (seeds the growth draw).
    pub epoch: u64,
    /// Seed (seeds the growth draw).
    pub seed: u64,
    /// "Now", for probation by age; never read from the clock.
    pub now: DateTime<Utc>,
    /// Whether the domain weighs stake.
    pub domain_stake_enabled: bool,
    /// Median stake of the domain in micro-units.
    pub domain_median_stake_micros: u64,
    /// Candidate nodes; order does not matter.
    pub nodes: Vec<PlacementNode>,
}

/// Why a node cannot host a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlacementFilter {
    /// Different domain from the model.
    WrongDomain,
    /// Status is not active/probation.
    Ineligible(NodeStatus),
    /// No free deployment slot.
    Full,
}

/// One eligible node's placement score and draw inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementScore {
    /// The node.
    pub node_id: NodeId,
    /// Factors (load = deployments / max_deployments).
    pub factors: Factors,
    /// Normalised weighted score.
    pub score: Bps,
    /// Observations.
    pub observations: u64,
    /// In probation (young, few observations, or status probation).
    pub probation: bool,
    /// Tier.
    pub tier: Tier,
}

/// One chosen replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The node.
    pub node_id: NodeId,
    /// The slot it fills.
    pub tier: Tier,
}

/// The record of a placement: inputs' scores, tiers and exclusions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRecord {
    /// Epoch used in the seed.
    pub epoch: u64,
    /// Seed used.
    pub seed: u64,
    /// Weights used.
    pub weights: Weights,
    /// Every eligible node, sorted by node id.
    pub scored: Vec<PlacementScore>,
    /// Every ineligible node with its reason, sorted by node id.
    pub filtered: Vec<(NodeId, PlacementFilter)>,
}

/// A placement: `replicas` distinct nodes, the first one the top-tier primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The model.
    pub model_id: ModelId,
    /// Chosen replicas, primary first.
    pub assignments: Vec<Assignment>,
    /// How they were chosen.
    pub record: PlacementRecord,
}

/// Why a model cannot be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// Fewer eligible nodes than two (never a single deployment).
    #[error("no eligible nodes for model {model_id}: {eligible} eligible, 2 needed")]
    NoEligibleNodes {
        /// The model.
        model_id: ModelId,
        /// How many were eligible.
        eligible: usize,
    },
    /// The snapshot lists a node twice, so its order would matter.
    #[error("node {0} appears twice in the snapshot")]
    DuplicateNode(NodeId),
}

/// Whether a node is in probation: status probation, fewer observations than required, or younger
/// than the minimum age.
pub fn in_probation(node: &PlacementNode, now: DateTime<Utc>, policy: &PlacementPolicy) -> bool {
    node.status == NodeStatus::Probation
        || node.observations < policy.probation_min_observations
        || (now - node.registered_at).num_seconds() < policy.probation_min_age_secs
}

/// The placement score of a node (routing factors with load = deployments / max_deployments).
pub fn placement_score(
    node: &PlacementNode,
    stake_enabled: bool,
    median_stake_micros: u64,
    weights: &Weights,
) -> (Factors, Bps) {
    let factors = Factors {
        reputation: node.reputation,
        load: Bps::ratio(u64::from(node.deployments), u64::from(node.max_deployments)),
        failure_rate: node.failure_rate,
        stake: if stake_enabled {
            stake_factor(node.stake_micros, median_stake_micros)
        } else {
            Bps::ZERO
        },
    };
    let (total, sum) = weighted(weights, &factors, stake_enabled);
    (factors, normalised(total, sum))
}

/// Whether a node may host a new replica of a model in `domain`.
pub fn placement_filter(node: &PlacementNode, domain: &str) -> Option<PlacementFilter> {
    if node.domain != domain {
        Some(PlacementFilter::WrongDomain)
    } else if !node.status.is_eligible() {
        Some(PlacementFilter::Ineligible(node.status))
    } else if node.deployments >= node.max_deployments {
        Some(PlacementFilter::Full)
    } else {
        None
    }
}

/// Splits eligible, scored nodes into tiers (sets `tier` in place): the top ⌈fraction⌉ by R (ties by
/// node id) with enough observations; if none qualifies, the single best by score.
pub fn assign_tiers(scored: &mut [PlacementScore], policy: &PlacementPolicy) {
    let n = scored.len();
    if n == 0 {
        return;
    }
    let mut by_r: Vec<usize> = (0..n).collect();
    by_r.sort_by(|&a, &b| {
        scored[b]
            .factors
            .reputation
            .cmp(&scored[a].factors.reputation)
            .then_with(|| scored[a].node_id.cmp(&scored[b].node_id))
    });
    let frac = u64::from(policy.top_tier_fraction.raw());
    let top_n = usize::try_from((n as u64 * frac).div_ceil(u64::from(Bps::SCALE)))
        .unwrap_or(n)
        .max(1);
    for s in scored.iter_mut() {
        s.tier = Tier::Lower;
    }
    let mut any = false;
    for &i in by_r.iter().take(top_n) {
        if scored[i].observations >= policy.top_tier_min_observations {
            scored[i].tier = Tier::Top;
            any = true;
        }
    }
    if !any {
        if let Some(best) = best_by_score(scored, |_| true) {
            scored[best].tier = Tier::Top;
        }
    }
}

/// Index of the best node by (score desc, R desc, node id) among those passing `keep`.
pub fn best_by_score(
    scored: &[PlacementScore],
    keep: impl Fn(&PlacementScore) -> bool,
) -> Option<usize> {
    (0..scored.len())
        .filter(|&i| keep(&scored[i]))
        .min_by(|&a, &b| {
            scored[b]
                .score
                .cmp(&scored[a].score)
                .then_with(|| {
                    scored[b]
                        .factors
                        .reputation
                        .cmp(&scored[a].factors.reputation)
                })
                .then_with(|| scored[a].node_id.cmp(&scored[b].node_id))
        })
}

/// Draw weight of a growth candidate: `max(score, 1) × (boost if probation else 1)`, in bps².
pub fn draw_weight(s: &PlacementScore, policy: &PlacementPolicy) -> u64 {
    let boost = if s.probation {
        u64::from(policy.probation_boost_bps)
    } else {
        u64::from(Bps::SCALE)
    };
    u64::from(s.score.raw().max(1)) * boost
}

/// A seeded weighted draw over `pool` (indices into `scored`, any order): deterministic in
/// `(seed, key)`, independent of the pool's order.
pub fn weighted_draw(
    scored: &[PlacementScore],
    pool: &[usize],
    policy: &PlacementPolicy,
    seed: u64,
    key: &str,
) -> Option<usize> {
    let mut sorted = pool.to_vec();
    sorted.sort_by(|&a, &b| scored[a].node_id.cmp(&scored[b].node_id));
    let total: u64 = sorted
        .iter()
        .map(|&i| draw_weight(&scored[i], policy))
        .sum();
    if total == 0 {
        return sorted.first().copied();
    }
    let mut ticket = seeded_hash(seed, "placement-draw", key) % total;
    for &i in &sorted {
        let w = draw_weight(&scored[i], policy);
        if ticket < w {
            return Some(i);
        }
        ticket -= w;
    }
    sorted.last().copied()
}

/// Scores every node of the snapshot: eligible ones (with tiers) and filtered ones with reasons.
pub fn score_nodes(
    nodes: &[PlacementNode],
    domain: &str,
    now: DateTime<Utc>,
    stake_enabled: bool,
    median_stake_micros: u64,
    policy: &PlacementPolicy,
) -> (Vec<PlacementScore>, Vec<(NodeId, PlacementFilter)>) {
    let mut scored = Vec::new();
    let mut filtered = Vec::new();
    for node in nodes {
        if let Some(reason) = placement_filter(node, domain) {
            filtered.push((node.node_id.clone(), reason));
            continue;
        }
        let (factors, score) =
            placement_score(node, stake_enabled, median_stake_micros, &policy.weights);
        scored.push(PlacementScore {
            node_id: node.node_id.clone(),
            factors,
            score,
            observations: node.observations,
            probation: in_probation(node, now, policy),
            tier: Tier::Lower,
        });
    }
    scored.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    filtered.sort();
    assign_tiers(&mut scored, policy);
    (scored, filtered)
}

/// Places a model on `max(2, policy.replicas)` distinct eligible nodes: the best top-tier node as
/// primary, then backups drawn from the growth tier (weight ∝ score × probation boost, seeded by
/// `(seed, epoch, model_id)`), preferring operators not yet used; if the growth tier runs out the
/// remaining top-tier nodes fill in by score. Fewer than two eligible nodes is an error.
pub fn place(
    input: &PlacementInput,
    policy: &PlacementPolicy,
) -> Result<Placement, PlacementError> {
    let mut seen = BTreeSet::new();
    for n in &input.nodes {
        if !seen.insert(&n.node_id) {
            return Err(PlacementError::DuplicateNode(n.node_id.clone()));
        }
    }
    let (scored, filtered) = score_nodes(
        &input.nodes,
        &input.domain,
        input.now,
        input.domain_stake_enabled,
        input.domain_median_stake_micros,
        policy,
    );
    if scored.len() < 2 {
        return Err(PlacementError::NoEligibleNodes {
            model_id: input.model_id.clone(),
            eligible: scored.len(),
        });
    }
    let operator_of = |id: &NodeId| -> Option<&String> {
        input
            .nodes
            .iter()
            .find(|n| &n.node_id == id)
            .and_then(|n| n.operator.as_ref())
    };
    let want = usize::try_from(policy.replicas.max(2))
        .unwrap_or(2)
        .min(scored.len());
    let mut chosen: Vec<usize> = Vec::new();
    let mut operators: BTreeSet<&String> = BTreeSet::new();
    // The tier split guarantees a top node; `best_by_score` over a non-empty set is Some.
    if let Some(primary) = best_by_score(&scored, |s| s.tier == Tier::Top) {
        chosen.push(primary);
        if let Some(op) = operator_of(&scored[primary].node_id) {
            operators.insert(op);
        }
    }
    let mut draw_no = 0u32;
    while chosen.len() < want {
        let growth: Vec<usize> = (0..scored.len())
            .filter(|i| !chosen.contains(i) && scored[*i].tier == Tier::Lower)
            .collect();
        let pick = if growth.is_empty() {
            best_by_score(&scored, |s| {
                !chosen.iter().any(|&c| scored[c].node_id == s.node_id)
            })
        } else {
            let distinct: Vec<usize> = growth
                .iter()
                .copied()
                .filter(|&i| match operator_of(&scored[i].node_id) {
                    None => true,
                    Some(op) => !operators.contains(op),
                })
                .collect();
            let pool = if policy.prefer_distinct_operators && !distinct.is_empty() {
                distinct
            } else {
                growth
            };
            let key = format!("{}:{}:{}", input.epoch, input.model_id, draw_no);
            weighted_draw(&scored, &pool, policy, input.seed, &key)
        };
        draw_no += 1;
        match pick {
            Some(i) => {
                if let Some(op) = operator_of(&scored[i].node_id) {
                    operators.insert(op);
                }
                chosen.push(i);
            }
            None => break,
        }
    }
    let assignments = chosen
        .iter()
        .map(|&i| Assignment {
            node_id: scored[i].node_id.clone(),
            tier: if i == chosen[0] {
                Tier::Top
            } else {
                Tier::Lower
            },
        })
        .collect();
    Ok(Placement {
        model_id: input.model_id.clone(),
        assignments,
        record: PlacementRecord {
            epoch: input.epoch,
            seed: input.seed,
            weights: policy.weights.clone(),
            scored,
            filtered,
        },
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
    }

    pub(crate) fn pnode(i: usize, r: u32, obs: u64, age_h: i64) -> PlacementNode {
        PlacementNode {
            node_id: NodeId::parse(&format!("n-{i:02}")).unwrap(),
            operator: Some(format!("op-{}", i % 3)),
            domain: "llm".to_owned(),
            status: NodeStatus::Active,
            max_deployments: 4,
            deployments: 0,
            reputation: Bps::saturating(u64::from(r)),
            failure_rate: Bps::saturating(1_000),
            observations: obs,
            registered_at: t0() - chrono::Duration::hours(age_h),
            stake_micros: 0,
        }
    }

    fn pinput(nodes: Vec<PlacementNode>) -> PlacementInput {
        PlacementInput {
            model_id: ModelId::parse("m-1").unwrap(),
            domain: "llm".to_owned(),
            epoch: 4,
            seed: 11,
            now: t0(),
            domain_stake_enabled: false,
            domain_median_stake_micros: 0,
            nodes,
        }
    }

    fn arb_nodes() -> impl Strategy<Value = (Vec<PlacementNode>, Vec<usize>)> {
        (1usize..12).prop_flat_map(|n| {
            (
                proptest::collection::vec(
                    (
                        0u32..=10_000,
                        0u64..200,
                        0i64..72,
                        0usize..6,
                        0u32..3,
                        0u32..5,
                    ),
                    n,
                ),
                Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
            )
                .prop_map(|(raw, perm)| {
                    let nodes = raw
                        .into_iter()
                        .enumerate()
                        .map(|(i, (r, obs, age, st, dep, maxd))| {
                            let mut n = pnode(i, r, obs, age);
                            n.status = [
                                NodeStatus::Active,
                                NodeStatus::Probation,
                                NodeStatus::Active,
                                NodeStatus::Jailed,
                                NodeStatus::Active,
                                NodeStatus::Offline,
                            ][st];
                            n.deployments = dep;
                            n.max_deployments = maxd;
                            if i % 5 == 4 {
                                n.domain = "img".to_owned();
                            }
                            n
                        })
                        .collect();
                    (nodes, perm)
                })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        // Properties 1 and 2 for placement.
        #[test]
        fn distinct_replicas_mixed_tiers_order_independent((nodes, perm) in arb_nodes(), k in 2u32..4) {
            let policy = PlacementPolicy { replicas: k, ..PlacementPolicy::default() };
            let inp = pinput(nodes.clone());
            let shuffled = pinput(perm.iter().map(|&i| nodes[i].clone()).collect());
            let a = place(&inp, &policy);
            let b = place(&shuffled, &policy);
            prop_assert_eq!(
                serde_json::to_vec(&a.as_ref().ok()).unwrap(),
                serde_json::to_vec(&b.as_ref().ok()).unwrap()
            );
            let eligible = nodes.iter().filter(|n| placement_filter(n, "llm").is_none()).count();
            match a {
                Err(PlacementError::NoEligibleNodes { eligible: e, .. }) => {
                    prop_assert!(eligible < 2);
                    prop_assert_eq!(e, eligible);
                }
                Err(e) => prop_assert!(false, "{e}"),
                Ok(p) => {
                    prop_assert!(eligible >= 2);
                    let want = usize::try_from(k).unwrap().min(eligible);
                    prop_assert_eq!(p.assignments.len(), want);
                    let ids: BTreeSet<&NodeId> = p.assignments.iter().map(|a| &a.node_id).collect();
                    prop_assert_eq!(ids.len(), p.assignments.len());
                    let tier_of = |id: &NodeId| {
                        p.record.scored.iter().find(|s| &s.node_id == id).map(|s| s.tier)
                    };
                    let tiers: BTreeSet<Tier> = p.assignments.iter().filter_map(|a| tier_of(&a.node_id)).collect();
                    let has_top = p.record.scored.iter().any(|s| s.tier == Tier::Top);
                    let has_lower = p.record.scored.iter().any(|s| s.tier == Tier::Lower);
                    prop_assert!(has_top);
                    if has_top && has_lower {
                        prop_assert!(tiers.contains(&Tier::Top) && tiers.contains(&Tier::Lower));
                    }
                    prop_assert_eq!(tier_of(&p.assignments[0].node_id), Some(Tier::Top));
                    prop_assert_eq!(p.record.scored.len() + p.record.filtered.len(), nodes.len());
                }
            }
        }
    }

    #[test]
    fn primary_is_best_top_tier_and_new_nodes_are_boosted() {
        // 10 nodes: top ⌈30 %⌉ = 3 by R, but n-02 lacks observations.
        let mut nodes: Vec<PlacementNode> = (0..10)
            .map(|i| pnode(i, 9_000 - 500 * u32::try_from(i).unwrap(), 100, 100))
            .collect();
        nodes[2].observations = 10;
        let p = place(&pinput(nodes), &PlacementPolicy::default()).unwrap();
        let top: Vec<&str> = p
            .record
            .scored
            .iter()
            .filter(|s| s.tier == Tier::Top)
            .map(|s| s.node_id.as_str())
            .collect();
        assert_eq!(top, vec!["n-00", "n-01"]);
        assert_eq!(p.assignments[0].node_id.as_str(), "n-00");
        assert_eq!(p.assignments[1].tier, Tier::Lower);
        let probation = p
            .record
            .scored
            .iter()
            .find(|s| s.node_id.as_str() == "n-02")
            .unwrap();
        assert!(probation.probation);
        assert_eq!(
            draw_weight(probation, &PlacementPolicy::default()),
            u64::from(probation.score.raw()) * 15_000
        );
    }

    #[test]
    fn one_eligible_node_is_an_error_never_a_single_deployment() {
        let mut b = pnode(1, 9_000, 100, 100);
        b.status = NodeStatus::Jailed;
        let err = place(
            &pinput(vec![pnode(0, 9_000, 100, 100), b]),
            &PlacementPolicy::default(),
        );
        assert!(matches!(
            err,
            Err(PlacementError::NoEligibleNodes { eligible: 1, .. })
        ));
    }

    #[test]
    fn prefers_a_different_operator_for_the_backup() {
        let mut nodes: Vec<PlacementNode> = (0..4).map(|i| pnode(i, 8_000, 100, 100)).collect();
        for n in nodes.iter_mut() {
            n.operator = Some("same".to_owned());
        }
        nodes[3].operator = Some("other".to_owned());
        nodes[0].reputation = Bps::saturating(9_900);
        let p = place(&pinput(nodes), &PlacementPolicy::default()).unwrap();
        assert_eq!(p.assignments[0].node_id.as_str(), "n-00");
        assert_eq!(p.assignments[1].node_id.as_str(), "n-03");
    }
}
