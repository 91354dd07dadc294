//! The outbox relay: publishes every committed event, in global order, to JetStream
//! (`deepnode.events.<event_type>`, `Nats-Msg-Id = event_id`), resuming from its stored position.
//!
//! - Nothing is published before it commits: the relay reads the log, never the appenders' intent.
//! - Nothing is lost between commit and publish: the position (`projection_checkpoints`, key
//!   `relay`) only moves after JetStream acked every event up to it. It is stored at most every
//!   [`RelayOptions::save_every`] while events flow (not once per commit: a write per commit was a
//!   third of the database's transactions), and at a clean stop. After a crash the relay republishes
//!   from there and the stream's duplicate window drops what it already has.
//! - Exactly one relay publishes at a time: the holder keeps a session-level Postgres advisory lock
//!   on a dedicated connection. Other copies wait on standby; if the holder dies its connection (and
//!   lock) goes with it and a standby takes over within the retry interval.

use std::time::Duration;

use async_nats::jetstream::context::Publish;
use async_nats::jetstream::Context;
use deepnode_bus::jetstream::ensure_streams;
use deepnode_bus::subjects::Subjects;
use deepnode_store::{EventStore, Lease, RecordedEvent, Urgency};

use crate::lease::Progress;
use crate::shutdown::Shutdown;
use crate::wire;

/// Advisory lock key of the relay lease ("relay" in ASCII): whoever holds it publishes.
pub const RELAY_LOCK_KEY: i64 = 0x72_656c_6179;

/// The checkpoint row the relay keeps its position in.
pub const RELAY_CHECKPOINT: &str = "relay";

/// Why the relay stopped.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("setting up JetStream streams: {0}")]
    Streams(#[from] deepnode_bus::jetstream::Error),
}

/// Tunables of the relay.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// How often a standby tries to take the lease.
    pub lease_retry: Duration,
    /// Poll interval of the log subscription (LISTEN/NOTIFY wakes it earlier).
    pub poll: Duration,
    /// How often the published position is stored (and the lease checked) while events flow. After
    /// a crash the next holder republishes from the stored position; the stream's duplicate window
    /// (`Nats-Msg-Id`) drops what it already has, and every reader skips positions it has seen.
    pub save_every: Duration,
    /// How long the relay, at the head, lets commits gather before it reads and publishes them: one
    /// read per interval instead of one per commit (publication is at most this much later).
    pub linger: Duration,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            lease_retry: Duration::from_secs(1),
            poll: Duration::from_millis(500),
            save_every: Duration::from_millis(250),
            linger: Duration::from_millis(50),
        }
    }
}

/// Runs the relay (standby or active) until `shutdown` fires.
pub async fn run(
    store: EventStore,
    js: Context,
    subjects: Subjects,
    options: RelayOptions,
    shutdown: Shutdown,
) -> Result<(), RelayError> {
    ensure_streams(&js, &subjects).await?;
    crate::lease::hold(
        &store,
        RELAY_LOCK_KEY,
        options.lease_retry,
        &shutdown,
        "relay",
        |lease| publish_while_leased(&store, &js, &subjects, lease, &options, &shutdown),
    )
    .await;
    Ok(())
}

async fn publish_while_leased(
    store: &EventStore,
    js: &Context,
    subjects: &Subjects,
    mut lease: Lease,
    options: &RelayOptions,
    shutdown: &Shutdown,
) -> Result<(), String> {
    let mut progress = Progress::load(store, RELAY_CHECKPOINT, options.save_every)
        .await
        .map_err(|e| e.to_string())?;
    // The relay feeds the bus (and so every bus-fed tail), so it follows only what was read from
    // the database: its own reads, or the process's shared reader's.
    let mut subscription = store
        .subscribe_database(progress.position(), options.poll)
        .linger(options.linger, Urgency::default());
    loop {
        let batch = tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = progress.save(store).await;
                lease.release().await;
                return Ok(());
            }
            batch = progress.next_batch(&mut subscription) => batch,
        };
        if let Some(batch) = batch {
            let batch = batch.map_err(|e| e.to_string())?;
            progress.advance(publish_batch(js, subjects, &batch).await?);
        }
        progress.save_if_due(store, &mut lease).await?;
    }
}

/// Publishes a batch in order, then waits for every ack; returns the last position.
async fn publish_batch(
    js: &Context,
    subjects: &Subjects,
    batch: &[std::sync::Arc<RecordedEvent>],
) -> Result<i64, String> {
    let mut acks = Vec::with_capacity(batch.len());
    for event in batch {
        let publish = Publish::build()
            .message_id(event.event_id.to_string())
            .payload(wire::to_bytes(event).into());
        let ack = js
            .send_publish(subjects.events(&event.event_type), publish)
            .await
            .map_err(|e| format!("publishing position {}: {e}", event.global_position))?;
        acks.push((event.global_position, ack));
    }
    let mut last = 0;
    for (position, ack) in acks {
        ack.await
            .map_err(|e| format!("ack for position {position}: {e}"))?;
        last = position;
    }
    Ok(last)
}
