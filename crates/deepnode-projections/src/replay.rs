//! [`replay()`]: the state of the network as it was at a past position or instant, folded in memory
//! from the log with `NodeBook::evolve` — the same fold the projection uses.
//!
//! The log is streamed page by page, so memory holds the book and a few pages, never the log. An
//! event the binary cannot fold stops the replay with [`Error::Decode`] naming its position: skipping
//! it would silently show a state that never existed.

use chrono::{DateTime, Utc};
use deepnode_domain::book::NodeBook;
use deepnode_domain::config::PolicyConfig;
use deepnode_store::EventStore;

use crate::{Error, LogSource};

/// Where a replay stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// Every event up to and including this global position.
    Position(i64),
    /// Every event that had occurred by this instant (`occurred_at ≤ t`), in log order.
    Time(DateTime<Utc>),
    /// The whole log as it is when the replay starts.
    Head,
}

/// How far a replay has got, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayProgress {
    /// The last position read.
    pub position: i64,
    /// The position the replay stops at.
    pub target: i64,
}

/// Folds the log up to `until` with `config`, calling `progress` after each page.
///
/// With [`Until::Time`], the replay reads up to the last event that occurred by `t` and folds only
/// the events with `occurred_at ≤ t` (a late-arriving event stamped after `t` is left out).
pub async fn replay(
    store: &EventStore,
    until: Until,
    config: &PolicyConfig,
    progress: impl FnMut(ReplayProgress),
) -> Result<NodeBook, Error> {
    replay_from(LogSource::Store(store), until, config, progress).await
}

/// [`replay`] from either source: the database or an export's files.
pub async fn replay_from(
    source: LogSource<'_>,
    until: Until,
    config: &PolicyConfig,
    mut progress: impl FnMut(ReplayProgress),
) -> Result<NodeBook, Error> {
    let head = source.head().await?;
    let (target, cutoff) = match (until, source) {
        (Until::Position(position), _) => (position.clamp(0, head), None),
        (Until::Head, _) => (head, None),
        (Until::Time(t), LogSource::Store(store)) => {
            let last: Option<i64> = sqlx::query_scalar(
                "SELECT max(global_position) FROM events WHERE occurred_at <= $1",
            )
            .bind(t)
            .fetch_one(store.pool())
            .await?;
            (last.unwrap_or(0), Some(t))
        }
        // Files have no index by time: read them all, fold what occurred by `t` (the same events).
        (Until::Time(t), LogSource::Export(_)) => (head, Some(t)),
    };
    let mut book = NodeBook::new(config);
    if target == 0 {
        progress(ReplayProgress {
            position: 0,
            target,
        });
        return Ok(book);
    }
    let mut pages = source.pages(0, Some(target));
    while let Some(page) = pages.recv().await {
        let page = page?;
        for event in &page {
            if cutoff.is_some_and(|t| event.occurred_at > t) {
                continue;
            }
            book.evolve(event).map_err(|source| Error::Decode {
                position: event.global_position,
                source,
            })?;
        }
        if let Some(last) = page.last() {
            progress(ReplayProgress {
                position: last.global_position,
                target,
            });
        }
    }
    Ok(book)
}
