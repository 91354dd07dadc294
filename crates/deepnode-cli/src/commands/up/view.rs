//! What `deepnode up` shows while it runs: once a second a [`Frame`] is built from the traffic
//! [`Stats`], `node_reputation` (top and bottom three of the demo's nodes) and the log's
//! `RotationCompleted` events since the run began. On a terminal the frame is redrawn in place;
//! headless (no terminal, or `--duration`) one plain line is printed every five seconds.
//!
//! It only reads; a failed query shows as a note in the frame and never stops the run.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use deepnode_domain::book::NodeRow;
use sqlx::PgPool;

use super::traffic::Stats;

/// The label of each demo node (`healthy`, `always times out`, ...), by id.
pub type Labels = BTreeMap<String, String>;

/// One refresh of the view.
pub struct Frame {
    /// Seconds since traffic started.
    pub elapsed: Duration,
    /// Requests answered per second since the previous frame.
    pub answered_per_sec: f64,
    /// Totals so far.
    pub stats: Stats,
    /// The demo's nodes, best score first.
    pub nodes: Vec<NodeRow>,
    /// `RotationCompleted` events since the run began.
    pub rotations: i64,
    /// Current deployments of the demo's models.
    pub deployments: i64,
    /// A query that failed this time, if any.
    pub note: Option<String>,
}

/// Reads the demo's rows of `node_reputation`, best score first.
pub async fn nodes(pool: &PgPool, labels: &Labels) -> Result<Vec<NodeRow>, String> {
    let mut rows: Vec<NodeRow> = deepnode_projections::load_nodes(pool)
        .await
        .map_err(|e| format!("reading node_reputation: {e}"))?
        .into_iter()
        .filter(|r| labels.contains_key(&r.node_id))
        .collect();
    rows.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.node_id.cmp(&b.node_id)));
    Ok(rows)
}

/// `RotationCompleted` events after `from_position`.
pub async fn rotations(pool: &PgPool, from_position: i64) -> Result<i64, String> {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'RotationCompleted' AND global_position > $1",
    )
    .bind(from_position)
    .fetch_one(pool)
    .await
    .map_err(|e| format!("counting rotations: {e}"))
}

/// Current deployments of `models`.
pub async fn deployments(pool: &PgPool, models: &[String]) -> Result<i64, String> {
    sqlx::query_scalar("SELECT count(*) FROM deployments WHERE model_id = ANY($1)")
        .bind(models)
        .fetch_one(pool)
        .await
        .map_err(|e| format!("counting deployments: {e}"))
}

fn node_cell(r: &NodeRow, labels: &Labels) -> String {
    let label = labels.get(&r.node_id).map(String::as_str).unwrap_or("");
    format!(
        "{:<10} {:>6.3} {:<10} ok {:>5}  err {:>4}  tmo {:>4}  inv {:>4}  {}",
        r.node_id, r.score, r.status, r.successes, r.errors, r.timeouts, r.invalid_outputs, label
    )
}

/// Redraws the whole view in place (terminal mode).
pub fn draw(frame: &Frame, labels: &Labels) {
    let s = &frame.stats;
    let mut out = String::new();
    out.push_str("\x1b[2J\x1b[H");
    out.push_str(&format!(
        "deepnode up — {:>4}s   (Ctrl-C stops everything and prints a summary)\n\n",
        frame.elapsed.as_secs()
    ));
    out.push_str(&format!(
        "  requests/s      {:>8.1}\n  sent            {:>8}   in flight {}   shed {}\n",
        frame.answered_per_sec,
        s.sent,
        s.sent.saturating_sub(s.answered() + s.unanswered),
        s.shed
    ));
    out.push_str(&format!(
        "  succeeded       {:>8}   ({:.1} %, charged)\n  fallbacks       {:>8}   (served by the backup)\n  not charged     {:>8}   (all_replicas_failed)\n  other errors    {:>8}   ({})   unanswered {}\n",
        s.succeeded,
        percent(s.succeeded, s.answered()),
        s.fallbacks,
        s.not_charged,
        s.other_errors.values().sum::<u64>(),
        s.other_errors_text(),
        s.unanswered
    ));
    out.push_str(&format!(
        "  latency         p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms\n",
        s.quantile_ms(0.5),
        s.quantile_ms(0.99),
        s.quantile_ms(1.0)
    ));
    out.push_str(&format!(
        "  rotations       {:>8}   deployments {}\n\n",
        frame.rotations, frame.deployments
    ));
    out.push_str("  top nodes by reputation\n");
    for r in frame.nodes.iter().take(3) {
        out.push_str(&format!("    {}\n", node_cell(r, labels)));
    }
    out.push_str("  bottom nodes by reputation\n");
    let bottom = frame.nodes.len().saturating_sub(3);
    for r in frame
        .nodes
        .iter()
        .skip(bottom.max(3.min(frame.nodes.len())))
    {
        out.push_str(&format!("    {}\n", node_cell(r, labels)));
    }
    if let Some(note) = &frame.note {
        out.push_str(&format!("\n  note: {note}\n"));
    }
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
}

/// One plain line (headless mode).
pub fn line(frame: &Frame) -> String {
    let s = &frame.stats;
    let top = frame
        .nodes
        .first()
        .map(|r| format!("{} {:.3}", r.node_id, r.score))
        .unwrap_or_else(|| "-".into());
    let bottom = frame
        .nodes
        .last()
        .map(|r| format!("{} {:.3}", r.node_id, r.score))
        .unwrap_or_else(|| "-".into());
    let mut line = format!(
        "[{:>4}s] {:.0} req/s | sent {} | ok {} (fallback {}) | not charged {} | other errors {} | unanswered {} | p50 {:.1} ms p99 {:.1} ms | top {} | bottom {} | rotations {}",
        frame.elapsed.as_secs(),
        frame.answered_per_sec,
        s.sent,
        s.succeeded,
        s.fallbacks,
        s.not_charged,
        s.other_errors.values().sum::<u64>(),
        s.unanswered,
        s.quantile_ms(0.5),
        s.quantile_ms(0.99),
        top,
        bottom,
        frame.rotations
    );
    if let Some(note) = &frame.note {
        line.push_str(&format!(" | note: {note}"));
    }
    line
}

/// `part / whole` in percent (0 when `whole` is 0).
pub fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}
