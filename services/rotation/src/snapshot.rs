//! Builds the explicit input snapshots the pure deciders take ([`PlacementInput`] for a deploy,
//! [`RotationInput`] for a round) from the folded [`RotationView`] and a `now` chosen by the caller.
//! Each node goes through [`PlacementNode::of`], the one conversion from the book's floating-point
//! state to basis points, so the decision itself is integer arithmetic (and a node's
//! `max_deployments` is its registered `capacity`). Nothing here decides or does IO.

use chrono::{DateTime, Utc};
use deepnode_domain::config::PolicyConfig;
use deepnode_domain::ids::ModelId;
use deepnode_domain::placement::{stake_micros, PlacementInput, PlacementNode};
use deepnode_domain::rotation::{Departure, Deployment, ModelSpec, RotationInput};

use crate::view::RotationView;

/// Median stake (micro-units) of the nodes of `domain`, 0 when it has none.
pub fn median_stake(view: &RotationView, domain: &str) -> u64 {
    let mut stakes: Vec<u64> = view
        .book
        .nodes()
        .values()
        .filter(|n| n.domain == domain)
        .map(|n| stake_micros(n.stake))
        .collect();
    stakes.sort_unstable();
    match stakes.len() {
        0 => 0,
        n if n % 2 == 1 => stakes[n / 2],
        n => (stakes[n / 2 - 1] / 2) + (stakes[n / 2] / 2),
    }
}

/// The placement snapshot for a new model: every node of its domain (placement filters the
/// ineligible and full ones and records why), the epoch in progress and `seed`.
pub fn placement_input(
    view: &RotationView,
    model_id: &ModelId,
    domain: &str,
    now: DateTime<Utc>,
    seed: u64,
    stake_enabled: bool,
    cfg: &PolicyConfig,
) -> PlacementInput {
    PlacementInput {
        model_id: model_id.clone(),
        domain: domain.to_owned(),
        epoch: view.current_epoch(),
        seed,
        now,
        domain_stake_enabled: stake_enabled,
        domain_median_stake_micros: median_stake(view, domain),
        nodes: view
            .book
            .nodes()
            .values()
            .filter(|n| n.domain == domain)
            .map(|n| PlacementNode::of(n, now, cfg))
            .collect(),
    }
}

/// The rotation snapshot for the epoch in progress.
pub fn rotation_input(
    view: &RotationView,
    now: DateTime<Utc>,
    seed: u64,
    stake_domains: &[String],
    cfg: &PolicyConfig,
) -> RotationInput {
    let book = &view.book;
    let models: Vec<ModelSpec> = book
        .models()
        .iter()
        .map(|(id, m)| ModelSpec {
            model_id: id.clone(),
            domain: m.domain.clone(),
        })
        .collect();
    let mut domains: Vec<String> = models.iter().map(|m| m.domain.clone()).collect();
    domains.sort();
    domains.dedup();
    let epoch = view.current_epoch();
    let deployments = book
        .deployments()
        .iter()
        .flat_map(|(model, replicas)| {
            replicas.iter().map(move |(node, d)| Deployment {
                model_id: model.clone(),
                node_id: node.clone(),
                tier: d.tier,
                assigned_epoch: view
                    .assigned_epoch
                    .get(&(model.clone(), node.clone()))
                    .copied()
                    .unwrap_or(epoch),
            })
        })
        .collect();
    RotationInput {
        epoch,
        seed,
        now,
        stake_domains: stake_domains.to_vec(),
        median_stake_micros: domains
            .iter()
            .map(|d| (d.clone(), median_stake(view, d)))
            .collect(),
        models,
        nodes: book
            .nodes()
            .values()
            .map(|n| PlacementNode::of(n, now, cfg))
            .collect(),
        deployments,
        departures: view
            .departures
            .iter()
            .map(|((model, node), e)| Departure {
                model_id: model.clone(),
                node_id: node.clone(),
                epoch: *e,
            })
            .collect(),
    }
}
