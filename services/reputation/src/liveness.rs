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
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

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

/// When this copy last heard from each eligible node, and which ones have been silent too long.
/// Pure: the time is an argument.
#[derive(Debug, Default)]
struct Hearing {
    last: HashMap<NodeId, Instant>,
}

impl Hearing {
    fn heard(&mut self, node: NodeId, at: Instant) {
        self.last.insert(node, at);
    }

    /// The eligible (active or probation) `nodes` silent for at least `limit` at `now`. A node this
    /// copy has not heard since it started, or since the node became eligible, counts as heard
    /// `now`: its grace period starts then, however long it was silent before. Nodes no longer
    /// eligible are forgotten, so they get a fresh grace when they are again.
    fn silent<'a>(
        &mut self,
        nodes: impl IntoIterator<Item = (&'a NodeId, NodeStatus)>,
        now: Instant,
        limit: Duration,
    ) -> Vec<NodeId> {
        let eligible: Vec<&NodeId> = nodes
            .into_iter()
            .filter(|(_, status)| matches!(status, NodeStatus::Active | NodeStatus::Probation))
            .map(|(id, _)| id)
            .collect();
        self.last.retain(|id, _| eligible.contains(&id));
        eligible
            .into_iter()
            .filter(|id| {
                let heard = *self.last.entry((*id).clone()).or_insert(now);
                now.duration_since(heard) >= limit
            })
            .cloned()
            .collect()
    }
}

/// Handles beats and ticks until the service stops.
pub(crate) async fn run(shared: Arc<Shared>, mut beats: Beats) -> Result<(), Error> {
    let mut hearing = Hearing::default();
    let mut tick = tokio::time::interval(shared.options.tick);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shared.stop.cancelled() => break,
            beat = beats.subscriptions.next() => match beat {
                Some(beat) => on_beat(&shared, &mut hearing, &beat.subject).await,
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
                on_tick(&shared, &mut hearing).await;
            }
        }
    }
    for subscription in beats.subscriptions.iter_mut() {
        let _ = subscription.unsubscribe().await;
    }
    Ok(())
}

async fn on_beat(shared: &Shared, hearing: &mut Hearing, subject: &str) {
    let Some(node) = shared.ctx.subjects.node_of_heartbeat(subject) else {
        return;
    };
    let status = shared.view.read().book.node(&node).map(|n| n.status);
    let Some(status) = status else {
        return; // not registered (yet): nothing to track
    };
    hearing.heard(node.clone(), Instant::now());
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

async fn on_tick(shared: &Shared, hearing: &mut Hearing) {
    let wall = shared.options.clock.now();
    let (silent, released, position) = {
        let view = shared.view.read();
        let nodes = view.book.nodes();
        let statuses = nodes.iter().map(|(id, node)| (id, node.status));
        let silent = hearing.silent(statuses, Instant::now(), shared.options.offline_after);
        let released: Vec<NodeId> = nodes
            .iter()
            .filter(|(_, node)| {
                node.status == NodeStatus::Jailed
                    && node.jailed_until.is_none_or(|until| until <= wall)
            })
            .map(|(id, _)| id.clone())
            .collect();
        (silent, released, view.book.last_position())
    };
    for node in silent {
        go_offline(shared, &node, wall).await;
    }
    for node in released {
        release(shared, &node, wall).await;
    }
    let position = u64::try_from(position).unwrap_or(0);
    shared
        .stats()
        .ticked_through
        .fetch_max(position, Ordering::Relaxed);
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn node(id: &str) -> NodeId {
        NodeId::parse(id).unwrap()
    }

    const LIMIT: Duration = Duration::from_secs(60);

    #[test]
    fn a_node_silent_for_the_limit_is_silent_and_one_that_beat_is_not() {
        let (quiet, beating) = (node("quiet"), node("beating"));
        let nodes = [
            (&quiet, NodeStatus::Active),
            (&beating, NodeStatus::Probation),
        ];
        let mut hearing = Hearing::default();
        let t0 = Instant::now();
        assert!(
            hearing.silent(nodes, t0, LIMIT).is_empty(),
            "first seen: grace starts"
        );
        hearing.heard(beating.clone(), t0 + Duration::from_secs(50));
        assert!(hearing
            .silent(nodes, t0 + Duration::from_secs(59), LIMIT)
            .is_empty());
        assert_eq!(
            hearing.silent(nodes, t0 + LIMIT, LIMIT),
            vec![quiet.clone()]
        );
        assert_eq!(
            hearing.silent(nodes, t0 + Duration::from_secs(110), LIMIT),
            [quiet.clone(), beating]
        );
    }

    #[test]
    fn a_copy_that_starts_gives_every_node_a_full_grace_however_long_it_was_silent() {
        // "quiet" last beat long before this copy started: its silence counts from the start.
        let quiet = node("quiet");
        let mut restarted = Hearing::default();
        let start = Instant::now() + Duration::from_secs(3_600);
        let nodes = [(&quiet, NodeStatus::Active)];
        assert!(restarted.silent(nodes, start, LIMIT).is_empty());
        let just_before = start + LIMIT - Duration::from_millis(1);
        assert!(restarted.silent(nodes, just_before, LIMIT).is_empty());
        assert_eq!(restarted.silent(nodes, start + LIMIT, LIMIT), [quiet]);
    }

    #[test]
    fn a_node_that_leaves_eligibility_gets_a_fresh_grace_when_it_returns() {
        let n = node("n");
        let mut hearing = Hearing::default();
        let t0 = Instant::now();
        assert!(hearing
            .silent([(&n, NodeStatus::Active)], t0, LIMIT)
            .is_empty());
        // jailed (or offline) for a long while: not tracked, never "silent"
        let later = t0 + 10 * LIMIT;
        assert!(hearing
            .silent([(&n, NodeStatus::Jailed)], later, LIMIT)
            .is_empty());
        // back in probation: a full grace from now, not from t0
        assert!(hearing
            .silent([(&n, NodeStatus::Probation)], later, LIMIT)
            .is_empty());
        assert_eq!(
            hearing.silent([(&n, NodeStatus::Probation)], later + LIMIT, LIMIT),
            [n]
        );
    }
}
