//! Watching our own connection to the bus, so an attempt lost to our outage is not held against
//! the node (issue 12 item 7, [`deepnode_domain::execution::judge`]).
//!
//! An attempt is [`Bus::Disturbed`] when the connection was not up at its end, when it reconnected
//! while the attempt ran (async-nats counts connections), or when it had reconnected less than
//! [`BusWatch::grace`] before the attempt began: after a NATS restart, the nodes come back on their
//! own schedule and the server answers "no responders" for them meanwhile. A reconnect is noticed at
//! the next attempt's start or end (no polling), so the grace may start a little late: it errs on
//! the side of the nodes.

use std::sync::atomic::{AtomicU64, Ordering};
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
    /// The connection count last seen.
    seen: AtomicU64,
    /// When a new connection (a reconnect) was last noticed.
    reconnected: Mutex<Option<Instant>>,
    grace: Duration,
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
        let seen = client.statistics().connects.load(Ordering::Relaxed);
        BusWatch {
            client,
            seen: AtomicU64::new(seen),
            reconnected: Mutex::new(None),
            grace,
        }
    }

    /// Notes the start of an attempt.
    pub fn begin(&self) -> Epoch {
        Epoch {
            connects: self.observe(),
            at: Instant::now(),
        }
    }

    /// What the bus did since `epoch` began.
    pub fn since(&self, epoch: Epoch) -> Bus {
        let connects = self.observe();
        let reconnected = *self.reconnected.lock().unwrap_or_else(|p| p.into_inner());
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

    fn observe(&self) -> u64 {
        let connects = self.client.statistics().connects.load(Ordering::Relaxed);
        if self.seen.swap(connects, Ordering::Relaxed) != connects {
            *self.reconnected.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            tracing::warn!(
                connects,
                "our NATS connection was re-established: attempts without an answer are not held against nodes for a while"
            );
        }
        connects
    }
}
