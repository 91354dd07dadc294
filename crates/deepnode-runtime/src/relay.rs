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
//! - At the head, a batch's publications are spread over [`RelayOptions::spread`] rather than sent
//!   at once: the process's shared reader hands the relay ~100 ms of commits at a time, and hundreds
//!   of JetStream publishes at once kept nats-server busy for milliseconds, with every request on
//!   the bus queued behind them (docs/BENCHMARKS-system.md, "The exec tail is a 100 ms cycle").

use std::time::Duration;

use async_nats::jetstream::context::Publish;
use async_nats::jetstream::Context;
use deepnode_bus::subjects::Subjects;
use deepnode_store::{EventStore, Lease, RecordedEvent, Urgency};

use crate::lease::Progress;
use crate::shutdown::Shutdown;
use crate::wire;

/// Advisory lock key of the relay lease ("relay" in ASCII): whoever holds it publishes.
pub const RELAY_LOCK_KEY: i64 = 0x72_656c_6179;

/// The checkpoint row the relay keeps its position in.
pub const RELAY_CHECKPOINT: &str = "relay";

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
    /// How long the relay, at the head, may take to send one batch: it sends it in chunks of at
    /// least [`SPREAD_MIN_CHUNK`] events, at most [`SPREAD_STEPS`] of them, `spread /
    /// SPREAD_STEPS` apart. Zero sends every batch at once; a batch read while catching up is
    /// always sent at once.
    pub spread: Duration,
}

/// The most chunks a spread batch is cut into.
pub const SPREAD_STEPS: u32 = 25;

/// The fewest events in a chunk of a spread batch: a batch of a few events goes in one or two.
pub const SPREAD_MIN_CHUNK: usize = 8;

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            lease_retry: Duration::from_secs(1),
            poll: Duration::from_millis(500),
            save_every: Duration::from_millis(250),
            linger: Duration::from_millis(50),
            spread: Duration::from_millis(50),
        }
    }
}

/// Runs the relay (standby or active) until `shutdown` fires. The streams it publishes to are its
/// caller's to ensure ([`deepnode_bus::jetstream::ensure_streams`]; [`crate::ServiceContext::connect`]
/// does, with the deployment's retention).
pub async fn run(
    store: EventStore,
    js: Context,
    subjects: Subjects,
    options: RelayOptions,
    shutdown: Shutdown,
) {
    crate::lease::hold(
        &store,
        RELAY_LOCK_KEY,
        options.lease_retry,
        &shutdown,
        "relay",
        |lease| publish_while_leased(&store, &js, &subjects, lease, &options, &shutdown),
    )
    .await;
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
                progress.finish(store, lease).await;
                return Ok(());
            }
            batch = progress.next_batch(&mut subscription) => batch,
        };
        if let Some(batch) = batch {
            let batch = batch.map_err(|e| e.to_string())?;
            let spread = match subscription.at_head() {
                true => options.spread,
                false => Duration::ZERO,
            };
            let pace = Pace::of(batch.len(), spread);
            progress.advance(publish_batch(js, subjects, &batch, pace).await?);
        }
        progress.save_if_due(store, &mut lease).await?;
    }
}

/// How a batch is sent: `chunk` events at a time, `pause` between two chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pace {
    chunk: usize,
    pause: Duration,
}

impl Pace {
    /// Cuts a batch of `len` events into at most [`SPREAD_STEPS`] chunks of at least
    /// [`SPREAD_MIN_CHUNK`] events, `spread / SPREAD_STEPS` apart: the whole batch is sent within
    /// `spread`, however large it is.
    fn of(len: usize, spread: Duration) -> Pace {
        let chunk = len.div_ceil(SPREAD_STEPS as usize).max(SPREAD_MIN_CHUNK);
        match len > chunk && !spread.is_zero() {
            true => Pace {
                chunk,
                pause: spread / SPREAD_STEPS,
            },
            false => Pace {
                chunk: len.max(1),
                pause: Duration::ZERO,
            },
        }
    }
}

/// Publishes a batch in order, paced by `pace`, then waits for every ack; returns the last
/// position.
async fn publish_batch(
    js: &Context,
    subjects: &Subjects,
    batch: &[std::sync::Arc<RecordedEvent>],
    pace: Pace,
) -> Result<i64, String> {
    let mut acks = Vec::with_capacity(batch.len());
    for (i, event) in batch.iter().enumerate() {
        if i > 0 && i % pace.chunk == 0 {
            tokio::time::sleep(pace.pause).await;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    const SPREAD: Duration = Duration::from_millis(50);

    #[test]
    fn a_batch_at_the_head_goes_in_chunks_within_the_spread() {
        // ~100 ms of 1,000 executions a second: 25 chunks of 16, 2 ms apart.
        let pace = Pace::of(400, SPREAD);
        assert_eq!((pace.chunk, pace.pause), (16, Duration::from_millis(2)));
        // A chunk is never smaller than the minimum: 40 events go in 5 chunks of 8.
        assert_eq!(Pace::of(40, SPREAD).chunk, 8);
        // However large the batch, at most SPREAD_STEPS chunks: 24 pauses, within the spread.
        for len in [401, 10_001] {
            let pace = Pace::of(len, SPREAD);
            let chunks = len.div_ceil(pace.chunk);
            assert!(
                chunks <= SPREAD_STEPS as usize,
                "{len} events in {chunks} chunks"
            );
            assert!(pace.pause * (chunks as u32 - 1) < SPREAD);
        }
    }

    #[test]
    fn a_few_events_and_a_zero_spread_go_at_once() {
        for (len, spread) in [(0, SPREAD), (1, SPREAD), (8, SPREAD), (400, Duration::ZERO)] {
            let pace = Pace::of(len, spread);
            assert_eq!(pace.pause, Duration::ZERO, "{len} events over {spread:?}");
            assert!(
                pace.chunk >= len,
                "{len} events in one chunk, not {}",
                pace.chunk
            );
        }
    }
}
