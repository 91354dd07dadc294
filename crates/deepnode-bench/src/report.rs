//! Measurement plumbing shared by the scenarios: a latency histogram in microseconds, the result of
//! one timed scenario, and its rendering as a Markdown table row.
//!
//! Numbers are only formatted here; deciding what to compare is the scenarios' business.

use std::time::Duration;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;

/// A latency histogram in microseconds, 1 µs .. 10 min at 3 significant digits.
pub fn new_histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 600_000_000, 3).context("creating a latency histogram")
}

/// Records one operation's duration.
pub fn record(histogram: &mut Histogram<u64>, took: Duration) {
    let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
    histogram.saturating_record(micros.max(1));
}

/// What one scenario measured.
pub struct Outcome {
    /// Short name, e.g. `raw 1-row INSERT`.
    pub name: String,
    /// Concurrent clients (connections or writer tasks).
    pub clients: usize,
    /// Rows (events) per transaction (append).
    pub per_op: usize,
    /// Rows (events) committed inside the measurement window.
    pub events: u64,
    /// Length of the measurement window.
    pub elapsed: Duration,
    /// Latency of each transaction (append), in µs.
    pub latency: Histogram<u64>,
    /// Free-form note (e.g. observed group-commit batch sizes).
    pub note: String,
}

impl Outcome {
    /// Committed events per second.
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.events as f64 / secs
        } else {
            0.0
        }
    }

    /// `| name | clients | per op | events/s | p50 | p99 | max | note |`.
    pub fn row(&self) -> String {
        let ms = |q: f64| self.latency.value_at_quantile(q) as f64 / 1000.0;
        format!(
            "| {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {} |",
            self.name,
            self.clients,
            self.per_op,
            thousands(self.rate()),
            ms(0.50),
            ms(0.99),
            self.latency.max() as f64 / 1000.0,
            self.note,
        )
    }
}

/// Header of the table whose rows are [`Outcome::row`].
pub const TABLE_HEADER: &str = "| scenario | clients | rows/append | events/s | p50 ms | p99 ms | max ms | notes |\n|---|---:|---:|---:|---:|---:|---:|---|";

/// `1234567.8` → `1,234,568`.
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
