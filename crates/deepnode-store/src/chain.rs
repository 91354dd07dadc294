//! Verifying the hash chain: every event's `prev_hash` must be its predecessor's `hash`, its `hash`
//! must be `sha256(prev_hash ‖ canonical bytes)` recomputed from the stored columns, and positions must
//! run 1, 2, 3… without a gap. The first position where any of that fails is reported, so an auditor
//! learns exactly which row was altered.

use deepnode_domain::log::GENESIS_HASH;
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
    let mut expected_prev: Vec<u8> = if from == 1 {
        GENESIS_HASH.to_vec()
    } else {
        sqlx::query_scalar("SELECT hash FROM events WHERE global_position = $1")
            .bind(from - 1)
            .fetch_optional(pool)
            .await?
            .unwrap_or_else(|| GENESIS_HASH.to_vec())
    };
    let mut report = ChainReport {
        verified: 0,
        last_position: from - 1,
        first_break: None,
    };
    let mut pages = stream_all(pool.clone(), from - 1, to);
    while let Some(page) = pages.recv().await {
        for event in page? {
            let position = event.global_position;
            let kind = if position != report.last_position + 1 {
                Some(BreakKind::Gap)
            } else if event.prev_hash != expected_prev {
                Some(BreakKind::PrevHashMismatch)
            } else if event.expected_hash(&event.prev_hash)[..] != event.hash[..] {
                Some(BreakKind::HashMismatch)
            } else {
                None
            };
            if let Some(kind) = kind {
                report.first_break = Some(ChainBreak { position, kind });
                return Ok(report);
            }
            report.verified += 1;
            report.last_position = position;
            expected_prev = event.hash;
        }
        progress(report.verified);
    }
    Ok(report)
}
