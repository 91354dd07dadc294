//! Feeds a service's [`LogTail`] from the bus: every event the relay publishes on
//! `deepnode.events.<type>` (only ever what has committed) also reaches a plain NATS subscription
//! in each process, which offers it to the tail. The process's followers and projection then
//! follow the log without reading it; the database is read only to catch up or when the feed has
//! a gap (see `deepnode_store::Subscription`).
//!
//! Only the services may publish on `deepnode.events.>` (deploy/nats.conf); a message that is not a
//! stored event is logged and dropped.

use deepnode_bus::async_nats::Client;
use deepnode_bus::subjects::Subjects;
use deepnode_store::LogTail;
use futures::{FutureExt, StreamExt};

use crate::shutdown::Shutdown;
use crate::wire;

/// Events the tail keeps: about the last second at 1,000 executions per second (four events each).
pub const TAIL_CAPACITY: usize = 4_096;

/// Most messages offered to the tail in one go.
const BURST: usize = 256;

/// Subscribes to the events subjects now (so nothing published after this returns is missed) and
/// offers every message to `tail` until `shutdown`.
pub async fn feed(
    client: &Client,
    subjects: &Subjects,
    tail: LogTail,
    shutdown: Shutdown,
) -> Result<tokio::task::JoinHandle<()>, deepnode_bus::async_nats::SubscribeError> {
    let mut messages = client.subscribe(subjects.events_wildcard()).await?;
    Ok(tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                () = shutdown.cancelled() => return,
                message = messages.next() => message,
            };
            let Some(first) = message else {
                tracing::warn!("the events subscription ended; followers read the database");
                return;
            };
            // Everything already received goes in at once, so readers wake once per burst (an
            // execution is four events) rather than once per message.
            let mut burst = vec![first];
            while burst.len() < BURST {
                match messages.next().now_or_never() {
                    Some(Some(message)) => burst.push(message),
                    _ => break,
                }
            }
            let events = burst.iter().filter_map(|message| {
                wire::from_slice(&message.payload)
                    .map_err(|e| {
                        tracing::warn!(subject = %message.subject, error = %e, "dropped a message on the events subjects")
                    })
                    .ok()
            });
            tail.offer_all(events);
        }
    }))
}
