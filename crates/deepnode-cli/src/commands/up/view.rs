//! What `deepnode up` shows while it runs: once a second a [`Frame`] is built from the traffic
//! [`Stats`], `node_reputation` (top and bottom three of the demo's nodes), the log's
//! `RotationCompleted` events since the run began, the latest decisions of the run (moves,
//! ejections, jails, slashes, phase-outs, promotions, each with its reason, from the log) and the
//! scheduler's queue figures (read from its `/metrics`: requests waiting per model, how long the
//! admitted ones waited, `overloaded` refusals). On a terminal the frame is redrawn in place;
//! headless (no terminal, or `--duration`) one plain line is printed every five seconds, followed
//! by each decision made since the last one.
//!
//! It only reads; a failed query shows as a note in the frame and never stops the run.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use deepnode_domain::book::NodeRow;
use sqlx::PgPool;

use super::decisions::Decision;
use super::traffic::Stats;

/// Decisions in the live view's "latest decisions" pane.
pub const DECISIONS_SHOWN: i64 = 6;

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
    /// The scheduler's queue figures, when its `/metrics` answered.
    pub queue: Option<Queue>,
    /// The latest decisions (live), or those since the last printed (headless); oldest first.
    pub decisions: Vec<Decision>,
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

/// The scheduler's flow-control figures (issue 12), from its Prometheus text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Queue {
    /// Requests waiting for a slot now, by model (models with none omitted).
    pub waiting: BTreeMap<String, u64>,
    /// Requests that waited and then started.
    pub waited: u64,
    /// Their mean wait, in milliseconds.
    pub mean_wait_ms: f64,
    /// The bucket bound under which 99 % of them started, in milliseconds.
    pub p99_wait_ms: f64,
    /// Requests refused `overloaded` so far.
    pub overloaded: u64,
}

impl Queue {
    /// Reads the figures from a `/metrics` body.
    pub fn parse(text: &str) -> Queue {
        let mut q = Queue::default();
        let (mut wait_sum, mut buckets) = (0.0, BTreeMap::<u64, f64>::new());
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let label = |key: &str| {
                let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
                labels[start..].split('"').next()
            };
            match name {
                "deepnode_exec_queue_depth" if value > 0.0 => {
                    let model = label("model_id").unwrap_or("?").to_owned();
                    q.waiting.insert(model, value as u64);
                }
                "deepnode_exec_queue_wait_seconds_count" => q.waited += value as u64,
                "deepnode_exec_queue_wait_seconds_sum" => wait_sum += value,
                "deepnode_exec_queue_wait_seconds_bucket" => {
                    if let Some(le) = label("le").and_then(|le| le.parse::<f64>().ok()) {
                        // Keyed by the bound in microseconds, so the map is ordered by it.
                        *buckets
                            .entry((le * 1e6).min(u64::MAX as f64) as u64)
                            .or_default() += value;
                    }
                }
                "deepnode_exec_refusals_total" if label("code") == Some("overloaded") => {
                    q.overloaded += value as u64;
                }
                _ => {}
            }
        }
        if q.waited > 0 {
            q.mean_wait_ms = wait_sum * 1e3 / q.waited as f64;
            let needed = q.waited as f64 * 0.99;
            q.p99_wait_ms = buckets
                .iter()
                .find(|(_, n)| **n >= needed)
                .map_or(f64::INFINITY, |(le, _)| *le as f64 / 1e3);
        }
        q
    }

    fn waiting_text(&self) -> String {
        let total: u64 = self.waiting.values().sum();
        if total == 0 {
            return "0".to_owned();
        }
        let each: Vec<String> = self
            .waiting
            .iter()
            .map(|(m, n)| format!("{m} {n}"))
            .collect();
        format!("{total} ({})", each.join(", "))
    }
}

/// The scheduler's queue figures, from its `/metrics` at `addr`.
pub async fn queue(addr: std::net::SocketAddr) -> Result<Queue, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut body = Vec::new();
        stream.read_to_end(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    let body = tokio::time::timeout(Duration::from_millis(500), fetch)
        .await
        .map_err(|_| format!("the scheduler's metrics at {addr} did not answer in time"))?
        .map_err(|e| format!("reading the scheduler's metrics at {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&body);
    Ok(Queue::parse(
        text.split_once("\r\n\r\n").map_or(&text, |(_, b)| b),
    ))
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
    if let Some(q) = &frame.queue {
        out.push_str(&format!(
            "  queue           waiting {}   waited {} (mean {:.1} ms, p99 ≤ {:.0} ms)   overloaded {}\n",
            q.waiting_text(),
            q.waited,
            q.mean_wait_ms,
            q.p99_wait_ms,
            q.overloaded
        ));
    }
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
    out.push_str("  latest decisions (from the log)\n");
    if frame.decisions.is_empty() {
        out.push_str("    none yet\n");
    }
    for d in &frame.decisions {
        out.push_str(&format!("    {}\n", d.line()));
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
    if let Some(q) = &frame.queue {
        line.push_str(&format!(
            " | queue {} waited {} (mean {:.1} ms) overloaded {}",
            q.waiting_text(),
            q.waited,
            q.mean_wait_ms,
            q.overloaded
        ));
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn queue_figures_are_read_from_the_prometheus_text() {
        let text = r#"# TYPE deepnode_exec_queue_depth gauge
deepnode_exec_queue_depth{model_id="m-1"} 3
deepnode_exec_queue_depth{model_id="m-2"} 0
# TYPE deepnode_exec_queue_wait_seconds histogram
deepnode_exec_queue_wait_seconds_bucket{model_id="m-1",le="0.001"} 10
deepnode_exec_queue_wait_seconds_bucket{model_id="m-1",le="0.01"} 90
deepnode_exec_queue_wait_seconds_bucket{model_id="m-1",le="0.1"} 100
deepnode_exec_queue_wait_seconds_bucket{model_id="m-1",le="+Inf"} 100
deepnode_exec_queue_wait_seconds_sum{model_id="m-1"} 0.5
deepnode_exec_queue_wait_seconds_count{model_id="m-1"} 100
deepnode_exec_refusals_total{code="overloaded",priority="standard"} 4
deepnode_exec_refusals_total{code="overloaded",priority="sheddable"} 2
deepnode_exec_refusals_total{code="no_eligible_nodes",priority="standard"} 7
"#;
        let q = Queue::parse(text);
        assert_eq!(q.waiting, BTreeMap::from([("m-1".to_owned(), 3)]));
        assert_eq!(q.waited, 100);
        assert!((q.mean_wait_ms - 5.0).abs() < 1e-9);
        assert!((q.p99_wait_ms - 100.0).abs() < 1e-9, "{}", q.p99_wait_ms);
        assert_eq!(q.overloaded, 6);
        assert_eq!(q.waiting_text(), "3 (m-1 3)");
        assert_eq!(Queue::parse("").waiting_text(), "0");
    }
}
