//! Liveness: every copy subscribes to every heartbeat (`deepnode.node.*.heartbeat`, `…node.*.*.heartbeat`
//! and so on for ids containing `.`; deliberately not a queue group) and keeps, in memory, when it last heard from each node. A periodic tick (wall
//! clock, here in the shell — never in the domain) then:
//! - declares offline (`NodeStatusChanged`, reason "missed heartbeats") an active or probation node
//!   silent for `offline_after` (policy: 2 × 30 s). A node is first "heard" when this copy first sees
//!   it eligible, so after a restart (or a node's registration, or its return from jail) every node
//!   gets one full grace period: a restart never marks the fleet offline;
//! - releases jails whose time has passed (the decision is `penalties::assess` at the wall-clock now).
//!
//! A beat from an offline node brings it back to the status it left (active or probation, see
//! [`crate::view::View::return_status`]). Beats are not logged one by one; only the transitions are
//! events. Every append goes through [`crate::decide`], so copies racing on the same transition log
//! it once. The beat's body (`{in_flight}`) is not needed for liveness and is not parsed: being able
//! to publish on its own subject is what counts (NATS permissions keep a node to its own subject).

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::Subscriber;
use chrono::Utc;
use deepnode_domain::events::{DomainEvent, Metadata, NodeStatus, NodeStatusChanged};
use deepnode_domain::ids::{NodeId, MAX_NODE_ID_TOKENS};
use deepnode_domain::penalties;
use futures::stream::SelectAll;
use futures::StreamExt;
use tokio::time::{Instant, MissedTickBehavior};

use crate::decide::{decide_and_append, Decision};
use crate::{Error, Shared, Stats};

/// Every node's heartbeat: plain subscriptions (each copy needs every beat), one per number of subject
/// tokens the registered node ids span — `node.*.heartbeat`, then `node.*.*.heartbeat` once a node id
/// with one dot is registered, and so on — read as one stream. Widening on demand keeps a NATS
/// account that permits only the token counts in use free of permission violations.
pub(crate) struct Beats {
    subscriptions: SelectAll<Subscriber>,
    tokens: usize,
}

impl Beats {
    /// Subscribes for the token counts up to `tokens` not yet covered.
    async fn widen(&mut self, shared: &Shared, tokens: usize) -> Result<(), Error> {
        while self.tokens < tokens.min(MAX_NODE_ID_TOKENS) {
            let subject = shared.ctx.subjects.heartbeat_wildcard_of(self.tokens + 1);
            self.subscriptions
                .push(shared.ctx.nats.subscribe(subject).await?);
            self.tokens += 1;
        }
        Ok(())
    }
}

/// Subject tokens the longest registered node id spans (at least 1).
fn tokens_in_use(shared: &Shared) -> usize {
    let view = shared.view.read();
    view.book
        .nodes()
        .keys()
        .map(|id| id.as_str().split('.').count())
        .max()
        .unwrap_or(1)
}

/// Subscribes to the heartbeats of every registered node, dotted ids included.
pub(crate) async fn subscribe(shared: &Shared) -> Result<Beats, Error> {
    let mut beats = Beats {
        subscriptions: SelectAll::new(),
        tokens: 0,
    };
    beats.widen(shared, tokens_in_use(shared).max(1)).await?;
    Ok(beats)
}

/// Handles beats and ticks until the service stops.
pub(crate) async fn run(shared: Arc<Shared>, mut beats: Beats) -> Result<(), Error> {
    let mut last_heard: HashMap<NodeId, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(shared.options.tick);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shared.stop.cancelled() => break,
            beat = beats.subscriptions.next() => match beat {
                Some(beat) => on_beat(&shared, &mut last_heard, &beat.subject).await,
                None => {
                    tracing::warn!("heartbeat subscription ended");
                    break;
                }
            },
            _ = tick.tick() => {
                // A node id with more dots than any before: hear its token count from now on (its
                // grace period starts when this copy first sees it, so no beat is missed for good).
                if let Err(e) = beats.widen(&shared, tokens_in_use(&shared)).await {
                    tracing::warn!(error = %e, "could not subscribe to more heartbeat subjects");
                }
                on_tick(&shared, &mut last_heard).await;
            }
        }
    }
    for subscription in beats.subscriptions.iter_mut() {
        let _ = subscription.unsubscribe().await;
    }
    Ok(())
}

async fn on_beat(shared: &Shared, last_heard: &mut HashMap<NodeId, Instant>, subject: &str) {
    let Some(node) = shared.ctx.subjects.node_of_heartbeat(subject) else {
        return;
    };
    let status = shared.view.read().book.node(&node).map(|n| n.status);
    let Some(status) = status else {
        return; // not registered (yet): nothing to track
    };
    last_heard.insert(node.clone(), Instant::now());
    if status == NodeStatus::Offline {
        back_online(shared, &node).await;
    }
}

async fn back_online(shared: &Shared, node: &NodeId) {
    let producer = shared.ctx.producer.clone();
    let decided = decide_and_append(shared, node, |view, version| {
        let state = view.book.node(node)?;
        (state.status == NodeStatus::Offline).then(|| Decision {
            events: vec![DomainEvent::NodeStatusChanged(NodeStatusChanged {
                node_id: node.clone(),
                from: NodeStatus::Offline,
                to: view.return_status(node),
                reason: "heartbeat resumed".to_owned(),
                until: None,
            })],
            id_seed: format!("liveness:{node}:{version}:online"),
            metadata: Metadata::new(&producer, format!("liveness:{node}")),
            occurred_at: Utc::now(),
        })
    })
    .await;
    match decided {
        Ok(Some(result)) if !result.duplicate => {
            Stats::bump(&shared.stats().came_back);
            tracing::info!(node_id = %node, "node back online");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(node_id = %node, error = %e, "could not bring node back online"),
    }
}

async fn on_tick(shared: &Shared, last_heard: &mut HashMap<NodeId, Instant>) {
    let now = Instant::now();
    let wall = Utc::now();
    let mut silent = Vec::new();
    let mut released = Vec::new();
    {
        let view = shared.view.read();
        // Forget nodes that are not eligible: when they become eligible again they get a fresh grace.
        last_heard.retain(|id, _| view.book.node(id).is_some_and(|n| n.status.is_eligible()));
        for (id, node) in view.book.nodes() {
            match node.status {
                NodeStatus::Active | NodeStatus::Probation => {
                    let heard = *last_heard.entry(id.clone()).or_insert(now);
                    if now.duration_since(heard) >= shared.options.offline_after {
                        silent.push(id.clone());
                    }
                }
                NodeStatus::Jailed if node.jailed_until.is_none_or(|until| until <= wall) => {
                    released.push(id.clone());
                }
                _ => {}
            }
        }
    }
    for node in silent {
        go_offline(shared, &node, wall).await;
    }
    for node in released {
        release(shared, &node, wall).await;
    }
}

async fn go_offline(shared: &Shared, node: &NodeId, wall: chrono::DateTime<Utc>) {
    let producer = shared.ctx.producer.clone();
    let decided = decide_and_append(shared, node, |view, version| {
        let state = view.book.node(node)?;
        state.status.is_eligible().then(|| Decision {
            events: vec![DomainEvent::NodeStatusChanged(NodeStatusChanged {
                node_id: node.clone(),
                from: state.status,
                to: NodeStatus::Offline,
                reason: "missed heartbeats".to_owned(),
                until: None,
            })],
            id_seed: format!("liveness:{node}:{version}:offline"),
            metadata: Metadata::new(&producer, format!("liveness:{node}")),
            occurred_at: wall,
        })
    })
    .await;
    match decided {
        Ok(Some(result)) if !result.duplicate => {
            Stats::bump(&shared.stats().went_offline);
            tracing::info!(node_id = %node, "node offline: missed heartbeats");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(node_id = %node, error = %e, "could not mark node offline"),
    }
}

async fn release(shared: &Shared, node: &NodeId, wall: chrono::DateTime<Utc>) {
    let (producer, policy) = (shared.ctx.producer.clone(), shared.ctx.policy.clone());
    let decided = decide_and_append(shared, node, |view, version| {
        let state = view.book.node(node)?;
        (state.status == NodeStatus::Jailed).then(|| Decision {
            events: penalties::assess(state, wall, &policy),
            id_seed: format!("jail:{node}:{version}:release"),
            metadata: Metadata::new(&producer, format!("jail:{node}")),
            occurred_at: wall,
        })
    })
    .await;
    match decided {
        Ok(Some(result)) if !result.duplicate => {
            Stats::bump(&shared.stats().jails_released);
            tracing::info!(node_id = %node, "jail ended; node in probation");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(node_id = %node, error = %e, "could not release jail"),
    }
}
