//! Watching our own connection to the bus, so an attempt lost to our outage is not held against
//! the node (issue 12 item 7, [`deepnode_domain::execution::judge`]).
//!
//! An attempt is [`Bus::Disturbed`] when the connection was not up at its end, when it reconnected
//! while the attempt ran (async-nats counts connections), or when it had reconnected less than
//! [`BusWatch::grace`] before the attempt began: after a NATS restart, the nodes come back on their
//! own schedule and the server answers "no responders" for them meanwhile. A reconnect is noticed at
//! the next attempt's start or end (no polling), so the grace may start a little late: it errs on
//! the side of the nodes.

use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::Client;
use tokio::time::Instant;

use deepnode_domain::execution::Bus;

/// The connection's history as attempts see it.
#[derive(Debug)]
pub struct BusWatch {
    client: Client,
    /// What the attempts have seen so far, read and changed under one lock: an attempt that sees
    /// a new connection count also sees when it was noticed (two separate cells let an attempt
    /// read the new count before the time was stored, and judge a failure inside the grace).
    seen: Mutex<Seen>,
    grace: Duration,
}

#[derive(Debug)]
struct Seen {
    /// The connection count last seen.
    connects: u64,
    /// When a new connection (a reconnect) was last noticed.
    reconnected: Option<Instant>,
}

/// The connection count and time at the start of an attempt.
#[derive(Debug, Clone, Copy)]
pub struct Epoch {
    connects: u64,
    at: Instant,
}

impl BusWatch {
    /// Watches `client`; failures within `grace` of a reconnect are unjudged.
    pub fn new(client: Client, grace: Duration) -> BusWatch {
        let connects = client.statistics().connects.load(Ordering::Relaxed);
        BusWatch {
            client,
            seen: Mutex::new(Seen {
                connects,
                reconnected: None,
            }),
            grace,
        }
    }

    /// Notes the start of an attempt.
    pub fn begin(&self) -> Epoch {
        let (connects, _) = self.observe();
        Epoch {
            connects,
            at: Instant::now(),
        }
    }

    /// What the bus did since `epoch` began.
    pub fn since(&self, epoch: Epoch) -> Bus {
        let (connects, reconnected) = self.observe();
        let recent =
            reconnected.is_some_and(|at| epoch.at.saturating_duration_since(at) < self.grace);
        if connects != epoch.connects
            || recent
            || self.client.connection_state() != State::Connected
        {
            Bus::Disturbed
        } else {
            Bus::Steady
        }
    }

    /// The connection count now and when the latest reconnect was noticed.
    fn observe(&self) -> (u64, Option<Instant>) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let connects = self.client.statistics().connects.load(Ordering::Relaxed);
        if seen.connects == connects {
            return (connects, seen.reconnected);
        }
        seen.connects = connects;
        let noticed = Instant::now();
        seen.reconnected = Some(noticed);
        drop(seen);
        tracing::warn!(
            connects,
            "our NATS connection was re-established: attempts without an answer are not held against nodes for a while"
        );
        (connects, Some(noticed))
    }
}
