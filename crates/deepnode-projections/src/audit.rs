//! [`audit()`]: does what is stored agree with the log? Three checks, each naming what it finds:
//!
//! 1. the hash chain over the whole log (`deepnode_store::verify_chain_with`), which names the first
//!    altered position;
//! 2. the log folds: an event this binary cannot fold is reported with its position;
//! 3. every projection table equals the in-memory fold of the log up to the projection's checkpoint,
//!    row by row and column by column (table, key, column, stored vs recomputed), including rows
//!    missing from or extra in the table. Floats are compared bit for bit.
//!
//! The checkpoint and the tables are read in one `REPEATABLE READ` snapshot, so a projector running
//! meanwhile cannot produce false differences. The log is streamed; `node_reputation` and `deployments` are
//! streamed in key order and merge-joined with the book; ended executions leave the fold one by one
//! and are looked up in batches, so memory holds the book (bounded by the network and what is in
//! flight) and one batch, never the log or a table. The chain
//! check runs on its own task in parallel with the fold. The audit changes nothing.

use std::cmp::Ordering;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use deepnode_domain::book::{DeploymentRow, ExecutionRow, NodeBook, NodeRow};
use deepnode_domain::config::PolicyConfig;
use deepnode_store::{ChainCheck, ChainReport, EventStore};
use futures::stream::BoxStream;
use futures::TryStreamExt;
use serde::Serialize;
use sqlx::Connection;

use crate::rows::{self, DEPLOYMENT_COLUMNS, EXECUTION_COLUMNS, NODE_COLUMNS};
use crate::{Error, ExportDir, BOOK_PROJECTION};

/// At most this many differences are listed in a report (all are counted).
pub const MAX_LISTED: usize = 1_000;

/// What kind of difference was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DifferenceKind {
    /// The row exists on both sides; one column differs.
    Value,
    /// The fold has the row; the table does not.
    Missing,
    /// The table has the row; the fold does not.
    Extra,
}

/// One difference between a stored table and the recomputed fold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// The table, e.g. `node_reputation`.
    pub table: &'static str,
    /// The row's key, e.g. `n1` or `m1/n1`.
    pub key: String,
    /// The differing column (`*` for a missing or extra row).
    pub column: &'static str,
    /// What kind of difference.
    pub kind: DifferenceKind,
    /// The stored value (`None` for a missing row).
    pub stored: Option<String>,
    /// The recomputed value (`None` for an extra row).
    pub recomputed: Option<String>,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            DifferenceKind::Value => write!(
                f,
                "{} key={} column={}: stored {} vs recomputed {}",
                self.table,
                self.key,
                self.column,
                self.stored.as_deref().unwrap_or("NULL"),
                self.recomputed.as_deref().unwrap_or("NULL"),
            ),
            DifferenceKind::Missing => write!(
                f,
                "{} key={}: row missing from the table (the log says it exists)",
                self.table, self.key
            ),
            DifferenceKind::Extra => write!(
                f,
                "{} key={}: extra row in the table (the log does not produce it)",
                self.table, self.key
            ),
        }
    }
}

/// An event the audit could not fold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unfoldable {
    /// Its global position.
    pub position: i64,
    /// Why.
    pub reason: String,
}

/// The result of an audit. [`AuditReport::is_clean`] is what the exit code follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditReport {
    /// The head of the log when the audit started.
    pub head: i64,
    /// The hash-chain verification up to `head`.
    pub chain: ChainReport,
    /// The checkpoint of the `deepnode_book` projection the tables were compared at.
    pub checkpoint: i64,
    /// Events folded in memory.
    pub folded: u64,
    /// The event that stopped the fold, if any (then the tables were not compared).
    pub unfoldable: Option<Unfoldable>,
    /// The differences, at most [`MAX_LISTED`].
    pub differences: Vec<Difference>,
    /// How many differences there are in all.
    pub differences_total: u64,
    /// Whether stored tables were compared (not for an export, which holds only the log).
    pub tables_compared: bool,
}

impl AuditReport {
    /// True when the chain is intact, the log folds, and every table matches the fold.
    pub fn is_clean(&self) -> bool {
        self.chain.first_break.is_none() && self.unfoldable.is_none() && self.differences_total == 0
    }
}

/// Progress of an audit, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditProgress {
    /// Events whose hash has been checked so far, of `target`.
    Chain { verified: u64, target: i64 },
    /// The fold has reached `position`, of `target`.
    Fold { position: i64, target: i64 },
    /// Comparing a table.
    Compare { table: &'static str },
}

/// Audits the log and the projections; see the module docs. `Err` only for IO failures: everything
/// the audit *finds* is in the report.
pub async fn audit(
    store: &EventStore,
    config: &PolicyConfig,
    progress: impl Fn(AuditProgress) + Send + Sync + 'static,
) -> Result<AuditReport, Error> {
    let progress = Arc::new(progress);
    let head = store.head_position().await?;

    let chain = {
        let pool = store.pool().clone();
        let progress = Arc::clone(&progress);
        tokio::spawn(async move {
            deepnode_store::verify_chain_with(&pool, 1, Some(head), |verified| {
                progress(AuditProgress::Chain {
                    verified,
                    target: head,
                })
            })
            .await
        })
    };

    // One snapshot for the checkpoint and every table.
    let mut conn = store.pool().acquire().await?;
    let mut tx = conn.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let checkpoint: i64 = sqlx::query_scalar(
        "SELECT COALESCE((SELECT global_position FROM projection_checkpoints WHERE projection = $1), 0)",
    )
    .bind(BOOK_PROJECTION)
    .fetch_one(&mut *tx)
    .await?;

    let mut report = AuditReport {
        head,
        chain: ChainReport {
            verified: 0,
            last_position: 0,
            first_break: None,
        },
        checkpoint,
        folded: 0,
        unfoldable: None,
        differences: Vec::new(),
        differences_total: 0,
        tables_compared: true,
    };

    let mut book = NodeBook::new(config);
    let mut fold_end = 0;
    // Ended executions leave the fold as rows; they are compared in batches as they come, so memory
    // holds one batch, never every execution.
    let mut executions = ExecutionCheck::default();
    let mut pages = store.stream_all(0, Some(checkpoint));
    'fold: while let Some(page) = pages.recv().await {
        let page = page?;
        for event in &page {
            match book.evolve(event) {
                Ok(touched) => executions.ended.extend(touched.ended),
                Err(e) => {
                    report.unfoldable = Some(Unfoldable {
                        position: event.global_position,
                        reason: e.to_string(),
                    });
                    break 'fold;
                }
            }
            report.folded += 1;
            fold_end = event.global_position;
        }
        if executions.ended.len() >= EXECUTION_BATCH {
            executions.compare_ended(&mut tx).await?;
        }
        progress(AuditProgress::Fold {
            position: fold_end,
            target: checkpoint,
        });
    }
    drop(pages);

    if report.unfoldable.is_none() {
        let mut found = Found::default();
        if fold_end != checkpoint {
            // The checkpoint claims events the log does not have.
            found.push(Difference {
                table: "projection_checkpoints",
                key: BOOK_PROJECTION.to_owned(),
                column: "global_position",
                kind: DifferenceKind::Value,
                stored: Some(checkpoint.to_string()),
                recomputed: Some(fold_end.to_string()),
            });
        }
        progress(AuditProgress::Compare {
            table: "node_reputation",
        });
        let sql =
            format!("SELECT {NODE_COLUMNS} FROM node_reputation ORDER BY node_id COLLATE \"C\"");
        let stored = rows::stream_rows(&mut tx, &sql, rows::node_from_row);
        diff_table(
            &mut found,
            "node_reputation",
            stored,
            book.node_rows(),
            |r: &NodeRow| (r.node_id.clone(), String::new()),
            compare_node,
        )
        .await?;

        progress(AuditProgress::Compare {
            table: "deployments",
        });
        let sql = format!(
            "SELECT {DEPLOYMENT_COLUMNS} FROM deployments ORDER BY model_id COLLATE \"C\", node_id COLLATE \"C\""
        );
        let stored = rows::stream_rows(&mut tx, &sql, rows::deployment_from_row);
        diff_table(
            &mut found,
            "deployments",
            stored,
            book.deployment_rows(),
            |r: &DeploymentRow| (r.model_id.clone(), r.node_id.clone()),
            compare_deployment,
        )
        .await?;

        progress(AuditProgress::Compare {
            table: "executions",
        });
        executions.ended.extend(book.execution_rows());
        executions.compare_ended(&mut tx).await?;
        executions.find_extra(&mut tx, checkpoint).await?;
        let unlisted = executions.found.total - executions.found.listed.len() as u64;
        for difference in executions.found.listed {
            found.push(difference);
        }
        found.total += unlisted;
        report.differences = found.listed;
        report.differences_total = found.total;
    }
    tx.commit().await?;

    report.chain = chain.await.map_err(|e| {
        Error::Store(deepnode_store::Error::Migration(format!(
            "chain verification task failed: {e}"
        )))
    })??;
    Ok(report)
}

/// Audits an export (`crate::export`): the hash chain and the fold over its events, in one pass.
/// An export holds the log, not the operator's tables, so no table is compared
/// (`tables_compared: false`); `checkpoint` is the export's last position.
pub async fn audit_export(
    dir: &ExportDir,
    config: &PolicyConfig,
    progress: impl Fn(AuditProgress),
) -> Result<AuditReport, Error> {
    let head = dir.manifest().events;
    let mut chain = ChainCheck::new();
    let mut book = NodeBook::new(config);
    let (mut folded, mut unfoldable) = (0, None);
    let mut pages = dir.pages(0, None);
    while let Some(page) = pages.recv().await {
        let page = page?;
        for event in &page {
            chain.push(event);
            if unfoldable.is_some() {
                continue;
            }
            match book.evolve(event) {
                Ok(_) => folded += 1,
                Err(e) => {
                    unfoldable = Some(Unfoldable {
                        position: event.global_position,
                        reason: e.to_string(),
                    })
                }
            }
        }
        let position = page.last().map_or(0, |e| e.global_position);
        progress(AuditProgress::Chain {
            verified: chain.report().verified,
            target: head,
        });
        progress(AuditProgress::Fold {
            position,
            target: head,
        });
    }
    Ok(AuditReport {
        head,
        chain: chain.into_report(),
        checkpoint: head,
        folded,
        unfoldable,
        differences: Vec::new(),
        differences_total: 0,
        tables_compared: false,
    })
}

/// Recomputed `executions` rows per lookup of the stored table.
const EXECUTION_BATCH: usize = 2_000;

/// The `executions` table checked in flat memory: the fold hands out each ended execution's row
/// once; batches of them are looked up by key in the audit's snapshot; rows the fold never made
/// are found by the database (an anti-join with the log) and named.
#[derive(Default)]
struct ExecutionCheck {
    /// Recomputed rows not yet compared.
    ended: Vec<ExecutionRow>,
    /// Recomputed rows found in the table so far.
    matched: u64,
    found: Found,
}

impl ExecutionCheck {
    /// Compares every pending recomputed row with its stored row (or its absence).
    async fn compare_ended(&mut self, conn: &mut sqlx::PgConnection) -> Result<(), Error> {
        if self.ended.is_empty() {
            return Ok(());
        }
        let mut computed = std::mem::take(&mut self.ended);
        computed.sort_by(|a, b| a.request_id.cmp(&b.request_id));
        let keys: Vec<&str> = computed.iter().map(|r| r.request_id.as_str()).collect();
        let sql = format!(
            "SELECT {EXECUTION_COLUMNS} FROM executions WHERE request_id = ANY($1::text[])"
        );
        let stored: std::collections::HashMap<String, ExecutionRow> = sqlx::query(&sql)
            .bind(&keys)
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|row| rows::execution_from_row(row).map(|r| (r.request_id.clone(), r)))
            .collect::<Result<_, _>>()?;
        let mut columns = Columns::new();
        for c in &computed {
            let Some(s) = stored.get(&c.request_id) else {
                self.found.push(Difference {
                    table: "executions",
                    key: c.request_id.clone(),
                    column: "*",
                    kind: DifferenceKind::Missing,
                    stored: None,
                    recomputed: Some("present".into()),
                });
                continue;
            };
            self.matched += 1;
            columns.clear();
            compare_execution(s, c, &mut columns);
            for (column, stored, recomputed) in columns.drain(..) {
                self.found.push(Difference {
                    table: "executions",
                    key: c.request_id.clone(),
                    column,
                    kind: DifferenceKind::Value,
                    stored: Some(stored),
                    recomputed: Some(recomputed),
                });
            }
        }
        Ok(())
    }

    /// Names the stored rows the fold up to `checkpoint` never made: the table holds more rows
    /// than were matched, so the database lists those with no `ExecutionRequested` or
    /// `AttemptDispatched` for their request id (the two events that make an execution).
    async fn find_extra(
        &mut self,
        conn: &mut sqlx::PgConnection,
        checkpoint: i64,
    ) -> Result<(), Error> {
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM executions")
            .fetch_one(&mut *conn)
            .await?;
        let extra = u64::try_from(stored)
            .unwrap_or(0)
            .saturating_sub(self.matched);
        if extra == 0 {
            return Ok(());
        }
        let named: Vec<String> = sqlx::query_scalar(
            "SELECT e.request_id FROM executions e
              WHERE NOT EXISTS (
                    SELECT 1 FROM events v
                     WHERE v.global_position <= $1
                       AND v.event_type IN ('ExecutionRequested', 'AttemptDispatched')
                       AND v.payload->>'request_id' = e.request_id)
              ORDER BY e.request_id COLLATE \"C\"
              LIMIT $2",
        )
        .bind(checkpoint)
        .bind(i64::try_from(MAX_LISTED).unwrap_or(i64::MAX))
        .fetch_all(&mut *conn)
        .await?;
        let listed = named.len() as u64;
        for key in named {
            self.found.push(Difference {
                table: "executions",
                key,
                column: "*",
                kind: DifferenceKind::Extra,
                stored: Some("present".into()),
                recomputed: None,
            });
        }
        // Counted even where the log holds an event for the id that the fold did not turn into
        // an execution (which would be a fold bug, not a stored row to name).
        self.found.total += extra.saturating_sub(listed);
        Ok(())
    }
}

#[derive(Default)]
struct Found {
    listed: Vec<Difference>,
    total: u64,
}

impl Found {
    fn push(&mut self, difference: Difference) {
        self.total += 1;
        if self.listed.len() < MAX_LISTED {
            self.listed.push(difference);
        }
    }
}

/// The differing columns of two rows with the same key: (column, stored, recomputed).
type Columns = Vec<(&'static str, String, String)>;

/// Merge-joins the stored rows (in key order) with the recomputed rows (in the same order).
async fn diff_table<T>(
    found: &mut Found,
    table: &'static str,
    mut stored: BoxStream<'_, Result<T, sqlx::Error>>,
    computed: impl Iterator<Item = T>,
    key: fn(&T) -> (String, String),
    compare: fn(&T, &T, &mut Columns),
) -> Result<(), Error> {
    let key_text = |k: (String, String)| {
        if k.1.is_empty() {
            k.0
        } else {
            format!("{}/{}", k.0, k.1)
        }
    };
    let mut computed = computed.peekable();
    let mut next_stored = stored.try_next().await?;
    let mut columns = Columns::new();
    loop {
        let order = match (&next_stored, computed.peek()) {
            (None, None) => return Ok(()),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(s), Some(c)) => key(s).cmp(&key(c)),
        };
        match order {
            Ordering::Less => {
                if let Some(s) = next_stored.take() {
                    found.push(Difference {
                        table,
                        key: key_text(key(&s)),
                        column: "*",
                        kind: DifferenceKind::Extra,
                        stored: Some("present".into()),
                        recomputed: None,
                    });
                }
                next_stored = stored.try_next().await?;
            }
            Ordering::Greater => {
                if let Some(c) = computed.next() {
                    found.push(Difference {
                        table,
                        key: key_text(key(&c)),
                        column: "*",
                        kind: DifferenceKind::Missing,
                        stored: None,
                        recomputed: Some("present".into()),
                    });
                }
            }
            Ordering::Equal => {
                if let (Some(s), Some(c)) = (next_stored.take(), computed.next()) {
                    columns.clear();
                    compare(&s, &c, &mut columns);
                    for (column, stored, recomputed) in columns.drain(..) {
                        found.push(Difference {
                            table,
                            key: key_text(key(&s)),
                            column,
                            kind: DifferenceKind::Value,
                            stored: Some(stored),
                            recomputed: Some(recomputed),
                        });
                    }
                }
                next_stored = stored.try_next().await?;
            }
        }
    }
}

/// A column value that can be compared exactly and shown.
trait Cell {
    fn same(&self, other: &Self) -> bool;
    fn show(&self) -> String;
}

impl Cell for f64 {
    fn same(&self, other: &Self) -> bool {
        // Bit for bit: a rebuild must reproduce floats exactly.
        self.to_bits() == other.to_bits()
    }
    fn show(&self) -> String {
        format!("{self:?}")
    }
}

macro_rules! plain_cell {
    ($($t:ty),*) => {$(
        impl Cell for $t {
            fn same(&self, other: &Self) -> bool { self == other }
            fn show(&self) -> String { self.to_string() }
        }
    )*};
}
plain_cell!(i64, i32, bool, String);

impl Cell for DateTime<Utc> {
    fn same(&self, other: &Self) -> bool {
        self == other
    }
    fn show(&self) -> String {
        self.to_rfc3339_opts(SecondsFormat::AutoSi, true)
    }
}

impl<T: Cell> Cell for Option<T> {
    fn same(&self, other: &Self) -> bool {
        match (self, other) {
            (Some(a), Some(b)) => a.same(b),
            (None, None) => true,
            _ => false,
        }
    }
    fn show(&self) -> String {
        self.as_ref().map_or_else(|| "NULL".to_owned(), Cell::show)
    }
}

fn cell<T: Cell>(out: &mut Columns, column: &'static str, stored: &T, recomputed: &T) {
    if !stored.same(recomputed) {
        out.push((column, stored.show(), recomputed.show()));
    }
}

fn compare_node(s: &NodeRow, c: &NodeRow, out: &mut Columns) {
    cell(out, "domain", &s.domain, &c.domain);
    cell(out, "stake", &s.stake, &c.stake);
    cell(out, "capacity", &s.capacity, &c.capacity);
    cell(out, "score", &s.score, &c.score);
    cell(out, "successes", &s.successes, &c.successes);
    cell(out, "errors", &s.errors, &c.errors);
    cell(out, "timeouts", &s.timeouts, &c.timeouts);
    cell(
        out,
        "invalid_outputs",
        &s.invalid_outputs,
        &c.invalid_outputs,
    );
    cell(
        out,
        "recent_failure_rate",
        &s.recent_failure_rate,
        &c.recent_failure_rate,
    );
    cell(out, "status", &s.status, &c.status);
    cell(out, "slashed_amount", &s.slashed_amount, &c.slashed_amount);
    cell(out, "registered_at", &s.registered_at, &c.registered_at);
    cell(out, "updated_at", &s.updated_at, &c.updated_at);
}

fn compare_deployment(s: &DeploymentRow, c: &DeploymentRow, out: &mut Columns) {
    cell(out, "tier", &s.tier, &c.tier);
    cell(out, "assigned_at", &s.assigned_at, &c.assigned_at);
}

fn compare_execution(s: &ExecutionRow, c: &ExecutionRow, out: &mut Columns) {
    cell(out, "model_id", &s.model_id, &c.model_id);
    cell(out, "status", &s.status, &c.status);
    cell(out, "node_id", &s.node_id, &c.node_id);
    cell(out, "attempts", &s.attempts, &c.attempts);
    cell(out, "charged", &s.charged, &c.charged);
    cell(out, "requested_at", &s.requested_at, &c.requested_at);
    cell(out, "completed_at", &s.completed_at, &c.completed_at);
}
