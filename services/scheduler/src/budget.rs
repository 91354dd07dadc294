//! The retry budget (POLICY "Failover per request", after Finagle's `RetryBudget`): retries are
//! allowed up to `ratio` of the requests seen plus a floor of `per_sec` retries every second, and
//! refused (fail fast) beyond that, so a failing fleet cannot double the load on itself.
//!
//! This is per-process, in-memory state with an explicit clock argument; it records nothing in the
//! log (a refused retry shows up as a one-attempt `ExecutionFailed`).

use std::time::{Duration, Instant};

/// Balance cap, in retries: deposits beyond this many unused retries are dropped, so a long quiet
/// spell cannot bank an unbounded burst of retries.
const MAX_BANKED_RETRIES: u64 = 100;

/// Token-bucket retry budget: each request deposits `ratio` of a retry; each second refills a
/// separate allowance of `per_sec` retries, spent first.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    /// Deposit per request, in thousandths of a retry.
    deposit_milli: u64,
    /// Banked retries, in thousandths.
    balance_milli: u64,
    per_sec: u32,
    free_left: u32,
    window_start: Option<Instant>,
}

impl RetryBudget {
    /// A budget of `ratio_bps` (2,000 = 20 %) of requests plus `per_sec` retries per second.
    pub fn new(ratio_bps: u32, per_sec: u32) -> RetryBudget {
        RetryBudget {
            deposit_milli: u64::from(ratio_bps) / 10,
            balance_milli: 0,
            per_sec,
            free_left: per_sec,
            window_start: None,
        }
    }

    /// Records one request (a deposit).
    pub fn on_request(&mut self) {
        self.balance_milli =
            (self.balance_milli + self.deposit_milli).min(MAX_BANKED_RETRIES * 1_000);
    }

    /// Takes one retry if the budget allows it at `now`.
    pub fn try_retry(&mut self, now: Instant) -> bool {
        match self.window_start {
            Some(start) if now.saturating_duration_since(start) < Duration::from_secs(1) => {}
            _ => {
                self.window_start = Some(now);
                self.free_left = self.per_sec;
            }
        }
        if self.free_left > 0 {
            self.free_left -= 1;
            true
        } else if self.balance_milli >= 1_000 {
            self.balance_milli -= 1_000;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_of_ten_per_second_then_twenty_percent_of_requests() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(2_000, 10);
        // No requests yet: only the per-second floor.
        assert_eq!((0..20).filter(|_| b.try_retry(t0)).count(), 10);
        // 100 requests deposit 20 retries.
        for _ in 0..100 {
            b.on_request();
        }
        assert_eq!((0..50).filter(|_| b.try_retry(t0)).count(), 20);
        // A new second refills the floor.
        let t1 = t0 + Duration::from_millis(1_001);
        assert_eq!((0..50).filter(|_| b.try_retry(t1)).count(), 10);
    }

    #[test]
    fn banked_retries_are_capped() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(2_000, 0);
        for _ in 0..100_000 {
            b.on_request();
        }
        assert_eq!((0..1_000).filter(|_| b.try_retry(t0)).count(), 100);
    }
}
