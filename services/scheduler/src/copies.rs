//! The scheduler copies sharing the work, so that together they keep each node within its
//! registered capacity (issue 12 item 4). Each copy counts only its own requests in flight; what
//! makes the sum hold is that each copy admits only its share of a node's capacity.
//!
//! Every copy announces itself on `<prefix>.scheduler.presence` (core NATS): `hello` when it
//! starts (after subscribing to its command subjects, so a peer or a test that hears it knows it
//! serves), `here` every `interval` and at once whenever its view of the copies changes or a new
//! copy says hello, and `leaving` when it stops, after its last request ended. A copy not heard from
//! for [`EXPIRY_INTERVALS`] intervals has gone. With `n` copies, the one of rank `r` among their
//! ids admits [`scoring::capacity_share`] of each node: the shares add up to the capacity.
//!
//! While the view changes, the sum may briefly exceed a node's capacity: a copy that has just
//! learnt of a new peer keeps the requests it admitted under its larger share until they end (at
//! most one attempt's timeout). A new copy admits nothing until it has listened for `settle`, so it
//! knows its peers before it takes its share.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use deepnode_domain::ids::NodeId;
use deepnode_domain::scoring;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

/// A copy silent for this many intervals has gone.
pub const EXPIRY_INTERVALS: u32 = 4;

/// What a copy says on the presence subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Saying {
    Hello,
    Here,
    Leaving,
}

/// One announcement: who, how many copies it counts (itself included), and what it says.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Announcement {
    copy: Uuid,
    producer: String,
    copies: u32,
    state: Saying,
}

/// This copy's place among the copies, read on every admission.
#[derive(Debug)]
pub struct Copies {
    /// `copies << 32 | rank`.
    view: AtomicU64,
    settled: watch::Receiver<bool>,
}

impl Copies {
    /// How many of `node`'s `capacity` slots this copy may hold.
    pub fn share(&self, node: &NodeId, capacity: u32) -> u32 {
        let (copies, rank) = unpack(self.view.load(Ordering::Relaxed));
        scoring::capacity_share(capacity, node, copies, rank)
    }

    /// Resolves once this copy has listened long enough to know its peers.
    pub async fn settled(&self) {
        let mut settled = self.settled.clone();
        // An error means the presence task is gone; admit rather than wait for ever.
        let _ = settled.wait_for(|s| *s).await;
    }
}

fn pack(copies: u32, rank: u32) -> u64 {
    (u64::from(copies) << 32) | u64::from(rank)
}

fn unpack(view: u64) -> (u32, u32) {
    ((view >> 32) as u32, view as u32)
}

/// The running presence task; [`Presence::leave`] says goodbye.
#[derive(Debug)]
pub struct Presence {
    leave: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Presence {
    /// Announces `leaving` (call once this copy's last request has ended) and stops.
    pub async fn leave(self) {
        let _ = self.leave.send(());
        let _ = self.task.await;
    }
}

/// Timing of the presence protocol.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How often a copy says it is still here.
    pub interval: Duration,
    /// How long a new copy listens for its peers before it admits requests.
    pub settle: Duration,
}

/// Subscribes to the presence subject, says hello, and keeps this copy's view of the copies.
pub async fn start(
    nats: &Client,
    subject: String,
    producer: &str,
    timing: Timing,
) -> Result<(Arc<Copies>, Presence), async_nats::SubscribeError> {
    let sub = nats.subscribe(subject.clone()).await?;
    let (settled_tx, settled) = watch::channel(false);
    let copies = Arc::new(Copies {
        view: AtomicU64::new(pack(1, 0)),
        settled,
    });
    let (leave, left) = oneshot::channel();
    let me = Me {
        nats: nats.clone(),
        subject,
        announcement: Announcement {
            copy: Uuid::new_v4(),
            producer: producer.to_owned(),
            copies: 1,
            state: Saying::Hello,
        },
    };
    let task = tokio::spawn(run(me, sub, copies.clone(), settled_tx, timing, left));
    Ok((copies, Presence { leave, task }))
}

struct Me {
    nats: Client,
    subject: String,
    announcement: Announcement,
}

impl Me {
    async fn say(&mut self, state: Saying, copies: u32) {
        self.announcement.state = state;
        self.announcement.copies = copies;
        let body = match serde_json::to_vec(&self.announcement) {
            Ok(body) => body,
            Err(e) => {
                return tracing::error!(error = %e, "could not encode a presence announcement")
            }
        };
        if let Err(e) = self.nats.publish(self.subject.clone(), body.into()).await {
            tracing::warn!(error = %e, "could not announce this scheduler copy");
        }
    }
}

async fn run(
    mut me: Me,
    mut sub: async_nats::Subscriber,
    copies: Arc<Copies>,
    settled: watch::Sender<bool>,
    timing: Timing,
    mut left: oneshot::Receiver<()>,
) {
    let expiry = timing.interval * EXPIRY_INTERVALS;
    let id = me.announcement.copy;
    // Every copy heard of, with when it last spoke; this one never expires.
    let mut seen: BTreeMap<Uuid, Instant> = BTreeMap::new();
    seen.insert(id, Instant::now() + Duration::from_secs(86_400 * 365));
    metrics::gauge!("deepnode_scheduler_copies").set(1.0);
    me.say(Saying::Hello, 1).await;
    let settle = tokio::time::sleep(timing.settle);
    tokio::pin!(settle);
    let mut tick = tokio::time::interval_at(Instant::now() + timing.interval, timing.interval);
    loop {
        let mut answer = false;
        tokio::select! {
            _ = &mut left => break,
            () = &mut settle, if !*settled.borrow() => {
                settled.send_replace(true);
                tracing::info!(copies = seen.len(), "scheduler copies settled");
            }
            _ = tick.tick() => {
                let now = Instant::now();
                seen.retain(|_, at| now.duration_since(*at) < expiry);
                answer = true;
            }
            msg = sub.next() => {
                let Some(msg) = msg else { break };
                match serde_json::from_slice::<Announcement>(&msg.payload) {
                    Ok(a) if a.copy == id => {}
                    Ok(a) if a.state == Saying::Leaving => {
                        seen.remove(&a.copy);
                    }
                    Ok(a) => {
                        answer = seen.insert(a.copy, Instant::now()).is_none() || a.state == Saying::Hello;
                    }
                    Err(e) => tracing::warn!(error = %e, "ignored a malformed presence announcement"),
                }
            }
        }
        let count = u32::try_from(seen.len()).unwrap_or(u32::MAX);
        let rank = seen.keys().position(|c| *c == id).unwrap_or(0);
        let view = pack(count, u32::try_from(rank).unwrap_or(0));
        if copies.view.swap(view, Ordering::Relaxed) != view {
            tracing::info!(copies = count, rank, "scheduler copies changed");
            metrics::gauge!("deepnode_scheduler_copies").set(f64::from(count));
            answer = true;
        }
        if answer {
            me.say(Saying::Here, count).await;
        }
    }
    me.say(Saying::Leaving, 0).await;
    if let Err(e) = me.nats.flush().await {
        tracing::debug!(error = %e, "could not flush the leaving announcement");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_packs_and_unpacks() {
        assert_eq!(unpack(pack(3, 2)), (3, 2));
        assert_eq!(unpack(pack(u32::MAX, 0)), (u32::MAX, 0));
    }
}
