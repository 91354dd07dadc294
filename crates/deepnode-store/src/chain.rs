//! Verifying the hash chain: every event's `prev_hash` must be its predecessor's `hash`, its `hash`
//! must be `sha256(prev_hash ‖ canonical bytes)` recomputed from the stored columns, and positions must
//! run 1, 2, 3… without a gap. The first position where any of that fails is reported, so an auditor
//! learns exactly which row was altered.

use deepnode_domain::log::{RecordedEvent, GENESIS_HASH};
use serde::Serialize;
use sqlx::PgPool;

use crate::read::stream_all;
use crate::Error;

/// Why the chain breaks at a position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakKind {
    /// The row's contents no longer hash to its stored `hash`.
    HashMismatch,
    /// The row's `prev_hash` is not the previous row's `hash`.
    PrevHashMismatch,
    /// A position is missing before this one.
    Gap,
}

/// The first place the chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainBreak {
    pub position: i64,
    pub kind: BreakKind,
}

/// The result of [`verify_chain`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    /// Events checked.
    pub verified: u64,
    /// Last position checked.
    pub last_position: i64,
    /// The first break, if any.
    pub first_break: Option<ChainBreak>,
}

/// Verifies positions `from..=to` (`to = None`: to the end). Reads the log as a stream: memory is flat.
pub async fn verify_chain(pool: &PgPool, from: i64, to: Option<i64>) -> Result<ChainReport, Error> {
    verify_chain_with(pool, from, to, |_| {}).await
}

/// Like [`verify_chain`], calling `progress(events checked so far)` after each page.
pub async fn verify_chain_with(
    pool: &PgPool,
    from: i64,
    to: Option<i64>,
    mut progress: impl FnMut(u64),
) -> Result<ChainReport, Error> {
    let from = from.max(1);
    let expected_prev: Vec<u8> = if from == 1 {
        GENESIS_HASH.to_vec()
    } else {
        sqlx::query_scalar("SELECT hash FROM events WHERE global_position = $1")
            .bind(from - 1)
            .fetch_optional(pool)
            .await?
            .unwrap_or_else(|| GENESIS_HASH.to_vec())
    };
    let mut check = ChainCheck::after(from - 1, expected_prev);
    let mut pages = stream_all(pool.clone(), from - 1, to);
    while let Some(page) = pages.recv().await {
        for event in page? {
            if !check.push(&event) {
                return Ok(check.report);
            }
        }
        progress(check.report.verified);
    }
    Ok(check.report)
}

/// The chain checked one event at a time, in log order, from wherever the events come (the
/// database, an export's files): positions contiguous, each `prev_hash` the hash before it, each
/// `hash` recomputed from the event's fields.
#[derive(Debug, Clone)]
pub struct ChainCheck {
    report: ChainReport,
    expected_prev: Vec<u8>,
}

impl ChainCheck {
    /// A check of the log from position 1.
    pub fn new() -> ChainCheck {
        ChainCheck::after(0, GENESIS_HASH.to_vec())
    }

    /// A check continuing after `position`, whose hash is `hash`.
    pub fn after(position: i64, hash: Vec<u8>) -> ChainCheck {
        ChainCheck {
            report: ChainReport {
                verified: 0,
                last_position: position,
                first_break: None,
            },
            expected_prev: hash,
        }
    }

    /// Checks the next event; `false` once the chain is broken (the break is in the report, and
    /// every later event is ignored).
    pub fn push(&mut self, event: &RecordedEvent) -> bool {
        if self.report.first_break.is_some() {
            return false;
        }
        let position = event.global_position;
        let kind = if position != self.report.last_position + 1 {
            Some(BreakKind::Gap)
        } else if event.prev_hash != self.expected_prev {
            Some(BreakKind::PrevHashMismatch)
        } else if event.expected_hash(&event.prev_hash)[..] != event.hash[..] {
            Some(BreakKind::HashMismatch)
        } else {
            None
        };
        if let Some(kind) = kind {
            self.report.first_break = Some(ChainBreak { position, kind });
            return false;
        }
        self.report.verified += 1;
        self.report.last_position = position;
        self.expected_prev.clone_from(&event.hash);
        true
    }

    /// What was found so far.
    pub fn report(&self) -> &ChainReport {
        &self.report
    }

    /// The report.
    pub fn into_report(self) -> ChainReport {
        self.report
    }
}

impl Default for ChainCheck {
    fn default() -> Self {
        ChainCheck::new()
    }
}
