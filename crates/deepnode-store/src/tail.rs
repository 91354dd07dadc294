//! [`LogTail`]: the most recent committed events, held once per process and shared by every reader
//! in it (followers, the projection runner), so that following the log costs the database nothing
//! while the tail keeps up.
//!
//! Two ways to fill it, one behaviour for its readers:
//! - **the process's shared reader** (the default for a service, see
//!   [`crate::EventStore::with_shared_reader`]): one task reads the database for the whole process —
//!   one LISTEN connection, one read and one decode per commit interval — and offers what it read; a
//!   reader that needs a position sooner asks it to read now ([`crate::Urgency`]);
//! - **offered from elsewhere** ([`LogTail::new`]): its owner offers events as they are learned (a
//!   service with `DEEPNODE_LOG_TAIL=on` offers what the relay published on the bus, which is only
//!   ever what has committed).
//!
//! It holds a window of *contiguous* positions: an offered event at or below the window's end is a
//! duplicate and ignored; one that leaves a gap (a message lost on the way) starts a new window
//! there. A reader whose next position is not in the window reads the database instead (see
//! [`crate::Subscription`]), so a lost, late or duplicated message never loses or reorders an event —
//! the tail is an accelerator, never the source of truth.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use deepnode_domain::log::RecordedEvent;
use tokio::sync::watch;

use crate::read::{Subscription, Urgency};

/// What a reader at some position finds in the tail.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// The events right after the reader's position (at least one), shared, not copied.
    Events(Vec<Arc<RecordedEvent>>),
    /// The tail starts after the reader's next position: read the database.
    Behind,
    /// Nothing after the reader's position yet (or the tail is empty).
    Nothing,
}

/// What [`LogTail::offer`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// Appended to the window.
    Appended,
    /// Already held (or older than the window): ignored.
    Duplicate,
    /// It left a gap after the window's end; the window starts again at it.
    Restarted,
}

struct Window {
    events: VecDeque<Arc<RecordedEvent>>,
    capacity: usize,
}

impl Window {
    fn first(&self) -> Option<i64> {
        self.events.front().map(|e| e.global_position)
    }

    fn last(&self) -> Option<i64> {
        self.events.back().map(|e| e.global_position)
    }
}

/// The recent, contiguous end of the log as this process has learned it. Cheap to clone (shared).
#[derive(Clone)]
pub struct LogTail {
    window: Arc<Mutex<Window>>,
    last: watch::Sender<i64>,
    /// Set when the process's shared reader fills this tail.
    reader: Option<Arc<SharedReader>>,
}

/// The process's one database reader, as the tail's readers see it.
struct SharedReader {
    /// Cuts its linger short: someone waits for a position it has not read yet.
    urgency: Urgency,
    /// It stopped (the log could not be read): every reader reads the database itself.
    stopped: AtomicBool,
}

impl std::fmt::Debug for LogTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogTail")
            .field("last", &*self.last.borrow())
            .finish_non_exhaustive()
    }
}

impl LogTail {
    /// A tail holding at most `capacity` events (the oldest are dropped first).
    pub fn new(capacity: usize) -> LogTail {
        let (last, _) = watch::channel(0);
        LogTail {
            window: Arc::new(Mutex::new(Window {
                events: VecDeque::with_capacity(capacity.min(4_096)),
                capacity: capacity.max(1),
            })),
            last,
            reader: None,
        }
    }

    /// A tail filled by `subscription` (a database subscription lingering with `urgency`), read by a
    /// task spawned here until the subscription fails or every other handle on the tail is gone.
    pub(crate) fn read_by(
        capacity: usize,
        subscription: Subscription,
        urgency: Urgency,
    ) -> LogTail {
        let mut tail = LogTail::new(capacity);
        tail.reader = Some(Arc::new(SharedReader {
            urgency,
            stopped: AtomicBool::new(false),
        }));
        tokio::spawn(read_into(subscription, tail.clone()));
        tail
    }

    /// When the process's shared reader fills this tail: the signal that makes it read now.
    pub(crate) fn reader_urgency(&self) -> Option<&Urgency> {
        self.reader.as_ref().map(|r| &r.urgency)
    }

    /// The shared reader that filled this tail has stopped: its readers must read the database.
    pub(crate) fn reader_stopped(&self) -> bool {
        self.reader
            .as_ref()
            .is_some_and(|r| r.stopped.load(Ordering::Acquire))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        // A poisoned lock means a reader panicked mid-copy; the window itself is whole.
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Offers one committed event; events must be offered in the order they were learned.
    pub fn offer(&self, event: RecordedEvent) -> Offered {
        let offered = Self::place(&mut self.lock(), Arc::new(event));
        if offered != Offered::Duplicate {
            self.notify();
        }
        offered
    }

    /// Offers several events in order, waking readers once.
    pub fn offer_all(&self, events: impl IntoIterator<Item = RecordedEvent>) {
        self.offer_shared(events.into_iter().map(Arc::new));
    }

    /// Offers events already shared (the shared reader's, read once for the whole process), in
    /// order, waking readers once.
    fn offer_shared(&self, events: impl IntoIterator<Item = Arc<RecordedEvent>>) {
        let mut held = false;
        {
            let mut window = self.lock();
            for event in events {
                held |= Self::place(&mut window, event) != Offered::Duplicate;
            }
        }
        if held {
            self.notify();
        }
    }

    fn place(window: &mut Window, event: Arc<RecordedEvent>) -> Offered {
        let position = event.global_position;
        let offered = match window.last() {
            Some(last) if position <= last => return Offered::Duplicate,
            Some(last) if position == last + 1 => Offered::Appended,
            Some(_) => {
                window.events.clear();
                Offered::Restarted
            }
            None => Offered::Appended,
        };
        if window.events.len() >= window.capacity {
            window.events.pop_front();
        }
        window.events.push_back(event);
        offered
    }

    fn notify(&self) {
        let last = self.lock().last().unwrap_or(0);
        self.last.send_replace(last);
    }

    /// The last position held (0 when empty).
    pub fn last(&self) -> i64 {
        *self.last.borrow()
    }

    /// A receiver that changes whenever an event is offered and held.
    pub fn watch(&self) -> watch::Receiver<i64> {
        self.last.subscribe()
    }

    /// At most `limit` events after position `after`.
    pub(crate) fn after(&self, after: i64, limit: usize) -> Lookup {
        let window = self.lock();
        let (Some(first), Some(last)) = (window.first(), window.last()) else {
            return Lookup::Nothing;
        };
        if after >= last {
            return Lookup::Nothing;
        }
        if after + 1 < first {
            return Lookup::Behind;
        }
        let skip = usize::try_from(after + 1 - first).unwrap_or(0);
        Lookup::Events(
            window
                .events
                .iter()
                .skip(skip)
                .take(limit.max(1))
                .cloned()
                .collect(),
        )
    }
}

/// The shared reader's task: every batch `subscription` reads goes into `tail`. A read error it
/// could not retry stops it (readers then read the database themselves, and meet the error there);
/// it also ends once nobody but itself holds the tail (looked at every second).
async fn read_into(mut subscription: Subscription, tail: LogTail) {
    let orphaned = || async {
        while Arc::strong_count(&tail.window) > 1 {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    };
    loop {
        // `next_batch` is cancel-safe: nothing read is lost if the tail is found orphaned meanwhile.
        let batch = tokio::select! {
            batch = subscription.next_batch() => batch,
            () = orphaned() => return,
        };
        match batch {
            Ok(batch) => tail.offer_shared(batch),
            Err(e) => {
                tracing::error!(error = %e, "the process's log reader stopped; each reader reads the database itself");
                if let Some(reader) = &tail.reader {
                    reader.stopped.store(true, Ordering::Release);
                }
                tail.last.send_modify(|_| {}); // wake every reader to notice
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(position: i64) -> RecordedEvent {
        RecordedEvent {
            global_position: position,
            event_id: uuid::Uuid::nil(),
            stream_id: "s".into(),
            stream_version: position,
            event_type: "T".into(),
            schema_version: 1,
            payload: serde_json::json!({}).into(),
            metadata: serde_json::json!({}).into(),
            occurred_at: chrono::DateTime::UNIX_EPOCH,
            recorded_at: chrono::DateTime::UNIX_EPOCH,
            prev_hash: Vec::new(),
            hash: Vec::new(),
        }
    }

    fn positions(lookup: Lookup) -> Vec<i64> {
        match lookup {
            Lookup::Events(events) => events.iter().map(|e| e.global_position).collect(),
            other => panic!("expected events, got {other:?}"),
        }
    }

    #[test]
    fn serves_contiguous_events_after_a_position() {
        let tail = LogTail::new(100);
        assert!(matches!(tail.after(0, 10), Lookup::Nothing));
        for p in 5..=9 {
            assert_eq!(tail.offer(event(p)), Offered::Appended);
        }
        assert_eq!(tail.last(), 9);
        assert_eq!(positions(tail.after(4, 10)), vec![5, 6, 7, 8, 9]);
        assert_eq!(positions(tail.after(6, 2)), vec![7, 8]);
        assert!(matches!(tail.after(9, 10), Lookup::Nothing));
        assert!(matches!(tail.after(12, 10), Lookup::Nothing));
        // A reader whose next event (4) is older than the window must go to the database.
        assert!(matches!(tail.after(3, 10), Lookup::Behind));
    }

    #[test]
    fn duplicates_are_ignored_and_a_gap_restarts_the_window() {
        let tail = LogTail::new(100);
        tail.offer(event(1));
        tail.offer(event(2));
        assert_eq!(tail.offer(event(2)), Offered::Duplicate);
        assert_eq!(tail.offer(event(1)), Offered::Duplicate);
        assert_eq!(tail.offer(event(5)), Offered::Restarted);
        assert_eq!(tail.last(), 5);
        // Positions 3 and 4 were never seen: a reader at 2 is sent to the database, never past them.
        assert!(matches!(tail.after(2, 10), Lookup::Behind));
        assert_eq!(positions(tail.after(4, 10)), vec![5]);
    }

    #[test]
    fn a_burst_is_placed_in_order() {
        let tail = LogTail::new(100);
        tail.offer_all([event(1), event(2), event(2), event(3)]);
        assert_eq!(tail.last(), 3);
        assert_eq!(positions(tail.after(0, 10)), vec![1, 2, 3]);
    }

    #[test]
    fn the_window_is_bounded() {
        let tail = LogTail::new(3);
        for p in 1..=10 {
            tail.offer(event(p));
        }
        assert_eq!(positions(tail.after(7, 10)), vec![8, 9, 10]);
        assert!(matches!(tail.after(6, 10), Lookup::Behind));
    }
}
