//! The log's Merkle tree in the database (issue 14): [`TreeProjection`] keeps `merkle_subtrees` equal
//! to the tree of the log (leaf *i* is the event at position *i + 1*: the leaf hash of its chain
//! hash, itself the hash of its canonical bytes), and the functions below take checkpoints of it (`log_checkpoints`) and put
//! proofs together from the stored subtrees — each proof O(log n) rows read by their keys.
//!
//! The hashing and the proofs' shape are `deepnode_domain::merkle`'s (pure); this module only reads
//! and writes rows.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deepnode_domain::merkle::{self, Frontier, Hash, Range, Subtree};
use deepnode_domain::note::{Checkpoint, NoteSigner};
use deepnode_store::{Projection, RecordedEvent};
use sqlx::{PgConnection, PgPool};

use crate::Error;

/// The checkpoint name of [`TreeProjection`] in `projection_checkpoints`: the tree's size.
pub const TREE_PROJECTION: &str = "merkle";

/// The lowest level of subtree stored: subtrees of 16 leaves and up (an eighth of the rows of
/// storing every level); a proof recomputes the few smaller ones it needs from their events.
pub const LOWEST_STORED_LEVEL: u32 = 4;

/// The leaf hash of one event as the log stores it: RFC 9162's leaf hash of the event's chain hash,
/// `SHA-256(prev_hash ‖ canonical bytes)` — so a leaf commits to its event's canonical bytes (and to
/// the chain before it) without serialising the event again. For the log's writer and the proof
/// server, who trust the stored `hash`; an auditor recomputes it ([`leaf_recomputed`]).
pub fn leaf_of(event: &RecordedEvent) -> Hash {
    merkle::leaf_hash(&event.hash)
}

/// The leaf hash of `event` from its fields alone: the chain hash recomputed from `prev_hash` (the
/// recomputed hash of the event before it) and its canonical bytes. Returns the leaf and that hash.
pub fn leaf_recomputed(event: &RecordedEvent, prev_hash: &[u8]) -> (Hash, [u8; 32]) {
    let hash = event.expected_hash(prev_hash);
    (merkle::leaf_hash(&hash), hash)
}

/// Keeps `merkle_subtrees` (see the module docs).
#[derive(Debug, Default)]
pub struct TreeProjection {
    frontier: Frontier,
}

impl TreeProjection {
    /// A projection starting from the empty tree.
    pub fn new() -> TreeProjection {
        TreeProjection::default()
    }

    /// The tree folded so far.
    pub fn frontier(&self) -> &Frontier {
        &self.frontier
    }

    /// Pushes `events` as leaves, refusing a gap in positions (leaf *i* must be position *i + 1*).
    fn push(
        &mut self,
        events: &[RecordedEvent],
        mut completed: impl FnMut(Subtree, Hash),
    ) -> Result<(), deepnode_store::Error> {
        for event in events {
            let expected = i64::try_from(self.frontier.size() + 1).unwrap_or(i64::MAX);
            if event.global_position != expected {
                return Err(deepnode_store::Error::Decode {
                    position: event.global_position,
                    reason: format!("the tree expected position {expected} next"),
                });
            }
            for (subtree, hash) in self.frontier.push(leaf_of(event)) {
                completed(subtree, hash);
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Projection for TreeProjection {
    fn name(&self) -> &str {
        TREE_PROJECTION
    }

    async fn apply(
        &mut self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<(), deepnode_store::Error> {
        let (mut levels, mut indexes, mut hashes) = (Vec::new(), Vec::new(), Vec::new());
        self.push(events, |subtree, hash| {
            if subtree.level < LOWEST_STORED_LEVEL {
                return;
            }
            levels.push(i16::try_from(subtree.level).unwrap_or(i16::MAX));
            indexes.push(i64::try_from(subtree.index).unwrap_or(i64::MAX));
            hashes.push(hash.to_vec());
        })?;
        // Another copy may have written some after a failed commit of ours: the rows are the same.
        sqlx::query(
            "INSERT INTO merkle_subtrees (level, idx, hash)
             SELECT * FROM UNNEST($1::smallint[], $2::bigint[], $3::bytea[])
             ON CONFLICT (level, idx) DO NOTHING",
        )
        .bind(&levels)
        .bind(&indexes)
        .bind(&hashes)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    fn observe(&mut self, events: &[RecordedEvent]) -> Result<(), deepnode_store::Error> {
        self.push(events, |_, _| {})
    }

    fn reset(&mut self) {
        self.frontier = Frontier::new();
    }

    async fn clear(&mut self, conn: &mut PgConnection) -> Result<(), deepnode_store::Error> {
        sqlx::query("DELETE FROM merkle_subtrees")
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}

/// Reads the stored hashes of `subtrees` (any order); missing ones are absent from the result.
pub async fn subtrees(
    pool: &PgPool,
    subtrees: &[Subtree],
) -> Result<std::collections::HashMap<Subtree, Hash>, Error> {
    let levels: Vec<i16> = subtrees
        .iter()
        .map(|s| i16::try_from(s.level).unwrap_or(i16::MAX))
        .collect();
    let indexes: Vec<i64> = subtrees
        .iter()
        .map(|s| i64::try_from(s.index).unwrap_or(i64::MAX))
        .collect();
    let rows: Vec<(i16, i64, Vec<u8>)> = sqlx::query_as(
        "SELECT t.level, t.idx, t.hash FROM merkle_subtrees t
           JOIN UNNEST($1::smallint[], $2::bigint[]) AS k(level, idx)
             ON t.level = k.level AND t.idx = k.idx",
    )
    .bind(&levels)
    .bind(&indexes)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(level, idx, hash)| {
            Some((
                Subtree {
                    level: u32::try_from(level).ok()?,
                    index: u64::try_from(idx).ok()?,
                },
                Hash::try_from(hash).ok()?,
            ))
        })
        .collect())
}

/// The hashes of `ranges` (a proof's), from the stored subtrees and, below
/// [`LOWEST_STORED_LEVEL`], from the events themselves; `None` if the tree does not hold them yet.
pub async fn range_hashes(pool: &PgPool, ranges: &[Range]) -> Result<Option<Vec<Hash>>, Error> {
    let needed: Vec<Subtree> = ranges
        .iter()
        .flat_map(|r| merkle::perfect_cover(*r))
        .collect();
    let (stored, small): (Vec<Subtree>, Vec<Subtree>) = needed
        .into_iter()
        .partition(|t| t.level >= LOWEST_STORED_LEVEL);
    let mut found = subtrees(pool, &stored).await?;
    // The small ones lie in blocks of 2^LOWEST_STORED_LEVEL leaves: read each block's events once.
    let block = 1u64 << LOWEST_STORED_LEVEL;
    let first_leaf = |t: &Subtree| t.index << t.level;
    let blocks: std::collections::BTreeSet<u64> =
        small.iter().map(|t| first_leaf(t) / block).collect();
    for b in blocks {
        let after = i64::try_from(b * block).unwrap_or(i64::MAX);
        let limit = i64::try_from(block).unwrap_or(16);
        let events = deepnode_store::read_all(pool, after, limit).await?;
        let leaves: Vec<Hash> = events.iter().map(leaf_of).collect();
        for t in small.iter().filter(|t| first_leaf(t) / block == b) {
            let start = usize::try_from(first_leaf(t) - b * block).unwrap_or(usize::MAX);
            let end = start.saturating_add(1usize << t.level);
            if let Some(slice) = leaves.get(start..end) {
                found.insert(*t, perfect(slice));
            }
        }
    }
    Ok(ranges
        .iter()
        .map(|r| merkle::range_hash(*r, |t| found.get(&t).copied()))
        .collect())
}

/// The hash of a complete subtree from its leaves (a power of two of them).
fn perfect(leaves: &[Hash]) -> Hash {
    let mut level = leaves.to_vec();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| merkle::node_hash(&pair[0], &pair[pair.len() - 1]))
            .collect();
    }
    level.first().copied().unwrap_or_else(merkle::empty_root)
}

/// The position of the event `id` in the log, if it is there.
pub async fn position_of(pool: &PgPool, id: uuid::Uuid) -> Result<Option<u64>, Error> {
    let position: Option<i64> =
        sqlx::query_scalar("SELECT global_position FROM events WHERE event_id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?;
    Ok(position.and_then(|p| u64::try_from(p).ok()))
}

/// How many leaves the stored tree holds (the projection's checkpoint).
pub async fn tree_size(pool: &PgPool) -> Result<u64, Error> {
    let size = deepnode_store::checkpoint(pool, TREE_PROJECTION).await?;
    Ok(u64::try_from(size).unwrap_or(0))
}

/// The root of the stored tree at `size` leaves (`None` if it does not hold that many).
pub async fn root_at(pool: &PgPool, size: u64) -> Result<Option<Hash>, Error> {
    Ok(range_hashes(
        pool,
        &[Range {
            start: 0,
            end: size,
        }],
    )
    .await?
    .and_then(|h| h.first().copied()))
}

/// A checkpoint as `log_checkpoints` holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCheckpoint {
    pub tree_size: u64,
    pub root: Hash,
    /// The signed note (or, unsigned, the checkpoint's text alone).
    pub note: String,
    pub signed: bool,
    pub taken_at: DateTime<Utc>,
}

type CheckpointRow = (i64, Vec<u8>, String, bool, DateTime<Utc>);

fn stored(row: CheckpointRow) -> Option<StoredCheckpoint> {
    Some(StoredCheckpoint {
        tree_size: u64::try_from(row.0).ok()?,
        root: Hash::try_from(row.1).ok()?,
        note: row.2,
        signed: row.3,
        taken_at: row.4,
    })
}

/// Every stored checkpoint, smallest tree first.
pub async fn checkpoints(pool: &PgPool) -> Result<Vec<StoredCheckpoint>, Error> {
    checkpoints_after(pool, None).await
}

/// The stored checkpoints of more than `size` events (all with `None`), smallest tree first.
pub async fn checkpoints_after(
    pool: &PgPool,
    size: Option<u64>,
) -> Result<Vec<StoredCheckpoint>, Error> {
    let after = size.map_or(-1, |s| i64::try_from(s).unwrap_or(i64::MAX));
    let rows: Vec<CheckpointRow> = sqlx::query_as(
        "SELECT tree_size, root, note, signed, taken_at FROM log_checkpoints
          WHERE tree_size > $1 ORDER BY tree_size",
    )
    .bind(after)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().filter_map(stored).collect())
}

/// The latest stored checkpoint.
pub async fn latest_checkpoint(pool: &PgPool) -> Result<Option<StoredCheckpoint>, Error> {
    let row: Option<CheckpointRow> = sqlx::query_as(
        "SELECT tree_size, root, note, signed, taken_at FROM log_checkpoints
          ORDER BY tree_size DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.and_then(stored))
}

/// When a checkpoint is due: after `every_events` more events, or `every` since the last one if
/// any event arrived since.
#[derive(Debug, Clone, Copy)]
pub struct Cadence {
    pub every_events: u64,
    pub every: chrono::Duration,
}

/// Takes a checkpoint of the stored tree if one is due at `now` (see [`Cadence`]): its root, as a
/// C2SP checkpoint of `origin`, signed by `signer` when there is one; stored in `log_checkpoints`.
/// Returns it, or `None` when none was due (or another copy took the same one).
pub async fn take_checkpoint(
    pool: &PgPool,
    origin: &str,
    signer: Option<&NoteSigner>,
    cadence: Cadence,
    now: DateTime<Utc>,
) -> Result<Option<StoredCheckpoint>, Error> {
    let size = tree_size(pool).await?;
    let last = latest_checkpoint(pool).await?;
    let due = match &last {
        None => size > 0,
        Some(last) => {
            size > last.tree_size
                && (size - last.tree_size >= cadence.every_events
                    || now - last.taken_at >= cadence.every)
        }
    };
    if !due {
        return Ok(None);
    }
    let Some(root) = root_at(pool, size).await? else {
        return Ok(None);
    };
    let text = Checkpoint {
        origin: origin.to_owned(),
        size,
        root,
        extensions: Vec::new(),
    }
    .text();
    let (note, signed) = match signer {
        Some(signer) => (
            signer
                .sign(&text)
                .map_err(|e| deepnode_store::Error::Decode {
                    position: i64::try_from(size).unwrap_or(i64::MAX),
                    reason: e.to_string(),
                })?,
            true,
        ),
        None => (text, false),
    };
    let row: Option<CheckpointRow> = sqlx::query_as(
        "INSERT INTO log_checkpoints (tree_size, root, note, signed, taken_at)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (tree_size) DO NOTHING
         RETURNING tree_size, root, note, signed, taken_at",
    )
    .bind(i64::try_from(size).unwrap_or(i64::MAX))
    .bind(root.to_vec())
    .bind(&note)
    .bind(signed)
    .bind(now)
    .fetch_optional(pool)
    .await?;
    Ok(row.and_then(stored))
}
