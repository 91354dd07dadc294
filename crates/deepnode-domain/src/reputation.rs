//! Per-node reputation as a pure fold of outcomes: the time-decayed Beta score R ([`BetaScore`]), the
//! recent failure rate F ([`FailureWindow`]) and the outcome counters, bundled in [`Reputation`].
//!
//! Beta reputation with decay [Jøsang & Ismail 2002]: before each update the counts (r, s) decay by
//! `2^(−Δt/H)`; a success adds 1 to r, an error or timeout 1 to s, an invalid output 3 to s; and
//! `R = (r+1)/(r+s+2)`, so a new node starts at 0.5 and, without events, drifts back toward 0.5. Time
//! is the event's `occurred_at`, passed in; this module never reads a clock. An event older than the
//! last one applied (reports arrive late) is counted without decay — time never runs backwards, so
//! the fold stays a function of the event sequence. Memory per node is bounded by the policy's window
//! size (a ring of the last N outcomes plus 60 time buckets); nothing here allocates per event once the
//! ring is full.

use std::collections::VecDeque;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::ReputationPolicy;
use crate::events::Outcome;

/// Number of time buckets covering the failure window's duration (1 h → 1-minute buckets).
pub const WINDOW_BUCKETS: usize = 60;

/// The decay factor `2^(−Δt/H)` for `dt_micros ≥ 0`.
pub fn decay_factor(dt_micros: i64, half_life_secs: i64) -> f64 {
    if dt_micros <= 0 || half_life_secs <= 0 {
        return 1.0;
    }
    let half_lives = dt_micros as f64 / (half_life_secs as f64 * 1_000_000.0);
    (-half_lives).exp2()
}

/// The time-decayed Beta counts (r, s) and the instant they were last decayed to.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct BetaScore {
    r: f64,
    s: f64,
    /// Microseconds since the Unix epoch of the latest applied outcome; `None` before the first.
    at_micros: Option<i64>,
}

impl BetaScore {
    /// The neutral prior: no evidence, R = 0.5.
    pub const fn new() -> BetaScore {
        BetaScore {
            r: 0.0,
            s: 0.0,
            at_micros: None,
        }
    }

    /// Decays the counts to `at` and applies one outcome.
    pub fn observe(&mut self, outcome: Outcome, at: DateTime<Utc>, policy: &ReputationPolicy) {
        let at = at.timestamp_micros();
        if let Some(last) = self.at_micros {
            if at > last {
                let f = decay_factor(at - last, policy.half_life_secs);
                self.r *= f;
                self.s *= f;
                self.at_micros = Some(at);
            }
        } else {
            self.at_micros = Some(at);
        }
        match outcome {
            Outcome::Success => self.r += policy.success_weight,
            Outcome::Error | Outcome::Timeout => self.s += policy.failure_weight,
            Outcome::InvalidOutput => self.s += policy.invalid_output_weight,
        }
    }

    /// R as of the latest applied outcome.
    pub fn score(&self) -> f64 {
        (self.r + 1.0) / (self.r + self.s + 2.0)
    }

    /// R as of `now`, with the counts decayed to it (never earlier than the latest outcome).
    pub fn score_at(&self, now: DateTime<Utc>, policy: &ReputationPolicy) -> f64 {
        let f = match self.at_micros {
            Some(last) => decay_factor(now.timestamp_micros() - last, policy.half_life_secs),
            None => 1.0,
        };
        let (r, s) = (self.r * f, self.s * f);
        (r + 1.0) / (r + s + 2.0)
    }

    /// The decayed counts (r, s) as of the latest outcome.
    pub fn counts(&self) -> (f64, f64) {
        (self.r, self.s)
    }

    /// When the latest outcome was applied.
    pub fn last_at(&self) -> Option<DateTime<Utc>> {
        self.at_micros.and_then(DateTime::from_timestamp_micros)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Bucket {
    index: i64,
    attempts: u32,
    failures: u32,
}

/// Samples and failures in a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WindowStats {
    pub samples: u32,
    pub failures: u32,
}

impl WindowStats {
    /// `failures / samples`, or `prior` below `min_samples`.
    pub fn failure_rate(self, min_samples: u32, prior: f64) -> f64 {
        if self.samples < min_samples.max(1) {
            prior
        } else {
            f64::from(self.failures) / f64::from(self.samples)
        }
    }

    /// Successes over samples (1.0 for an empty window).
    pub fn success_ratio(self) -> f64 {
        if self.samples == 0 {
            1.0
        } else {
            f64::from(self.samples - self.failures.min(self.samples)) / f64::from(self.samples)
        }
    }
}

/// Recent failures: the last N attempts or every attempt of the last window duration, whichever holds
/// more. The duration part is kept in [`WINDOW_BUCKETS`] time buckets, so it is exact to one bucket
/// width (one minute for a one-hour window) and bounded in memory however busy the node is.
#[derive(Debug, Clone, PartialEq)]
pub struct FailureWindow {
    /// Failure flags of the last N attempts, oldest first.
    recent: VecDeque<bool>,
    recent_failures: u32,
    buckets: [Bucket; WINDOW_BUCKETS],
}

impl Default for FailureWindow {
    fn default() -> Self {
        FailureWindow::new()
    }
}

fn bucket_width_micros(policy: &ReputationPolicy) -> i64 {
    (policy.failure_window_secs.max(1) * 1_000_000 / WINDOW_BUCKETS as i64).max(1)
}

impl FailureWindow {
    /// An empty window.
    pub const fn new() -> FailureWindow {
        FailureWindow {
            recent: VecDeque::new(),
            recent_failures: 0,
            buckets: [Bucket {
                index: i64::MIN,
                attempts: 0,
                failures: 0,
            }; WINDOW_BUCKETS],
        }
    }

    /// Records one attempt at `at`.
    pub fn record(&mut self, failed: bool, at: DateTime<Utc>, policy: &ReputationPolicy) {
        let cap = policy.failure_window_attempts.max(1) as usize;
        while self.recent.len() >= cap {
            if self.recent.pop_front() == Some(true) {
                self.recent_failures -= 1;
            }
        }
        self.recent.push_back(failed);
        self.recent_failures += u32::from(failed);

        let index = at
            .timestamp_micros()
            .div_euclid(bucket_width_micros(policy));
        let slot = &mut self.buckets[index.rem_euclid(WINDOW_BUCKETS as i64) as usize];
        if slot.index < index {
            *slot = Bucket {
                index,
                attempts: 0,
                failures: 0,
            };
        }
        // An attempt older than the bucket's current occupant is already outside the time window.
        if slot.index == index {
            slot.attempts = slot.attempts.saturating_add(1);
            slot.failures = slot.failures.saturating_add(u32::from(failed));
        }
    }

    /// The window as of `now`: the larger of the last-N part and the time part.
    pub fn stats_at(&self, now: DateTime<Utc>, policy: &ReputationPolicy) -> WindowStats {
        let last_n = WindowStats {
            samples: self.recent.len() as u32,
            failures: self.recent_failures,
        };
        let now_index = now
            .timestamp_micros()
            .div_euclid(bucket_width_micros(policy));
        let oldest = now_index - (WINDOW_BUCKETS as i64 - 1);
        let mut timed = WindowStats::default();
        for b in &self.buckets {
            if b.index >= oldest && b.index <= now_index {
                timed.samples = timed.samples.saturating_add(b.attempts);
                timed.failures = timed.failures.saturating_add(b.failures);
            }
        }
        if timed.samples > last_n.samples {
            timed
        } else {
            last_n
        }
    }

    /// The failure rate F as of `now`, the policy's prior below its minimum sample count.
    pub fn failure_rate_at(&self, now: DateTime<Utc>, policy: &ReputationPolicy) -> f64 {
        self.stats_at(now, policy)
            .failure_rate(policy.failure_min_samples, policy.failure_prior.to_f64())
    }

    /// Forgets everything (a fresh window, e.g. after a jail).
    pub fn clear(&mut self) {
        self.recent.clear();
        self.recent_failures = 0;
        self.buckets = FailureWindow::new().buckets;
    }
}

/// A node's reputation: R, the failure window and the outcome counters.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reputation {
    beta: BetaScore,
    window: FailureWindow,
    successes: u64,
    errors: u64,
    timeouts: u64,
    invalid_outputs: u64,
}

impl Reputation {
    /// A new node's reputation: R = 0.5, no observations.
    pub fn new() -> Reputation {
        Reputation::default()
    }

    /// Applies one outcome that happened at `at`.
    pub fn observe(&mut self, outcome: Outcome, at: DateTime<Utc>, policy: &ReputationPolicy) {
        self.beta.observe(outcome, at, policy);
        self.window.record(outcome != Outcome::Success, at, policy);
        match outcome {
            Outcome::Success => self.successes += 1,
            Outcome::Error => self.errors += 1,
            Outcome::Timeout => self.timeouts += 1,
            Outcome::InvalidOutput => self.invalid_outputs += 1,
        }
    }

    /// R as of the latest outcome.
    pub fn score(&self) -> f64 {
        self.beta.score()
    }

    /// R as of `now`.
    pub fn score_at(&self, now: DateTime<Utc>, policy: &ReputationPolicy) -> f64 {
        self.beta.score_at(now, policy)
    }

    /// The Beta counts.
    pub fn beta(&self) -> &BetaScore {
        &self.beta
    }

    /// The recent failure window.
    pub fn window(&self) -> &FailureWindow {
        &self.window
    }

    /// F as of `now`.
    pub fn failure_rate_at(&self, now: DateTime<Utc>, policy: &ReputationPolicy) -> f64 {
        self.window.failure_rate_at(now, policy)
    }

    /// Successful outcomes so far.
    pub fn successes(&self) -> u64 {
        self.successes
    }

    /// Error outcomes so far.
    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// Timeouts so far.
    pub fn timeouts(&self) -> u64 {
        self.timeouts
    }

    /// Invalid outputs so far.
    pub fn invalid_outputs(&self) -> u64 {
        self.invalid_outputs
    }

    /// Every scored outcome so far (the "observations" of POLICY.md).
    pub fn observations(&self) -> u64 {
        self.successes + self.errors + self.timeouts + self.invalid_outputs
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use chrono::TimeDelta;
    use proptest::prelude::*;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
    }

    fn policy() -> ReputationPolicy {
        ReputationPolicy::default()
    }

    #[test]
    fn a_new_node_starts_at_the_prior_and_rises_with_successes() {
        // given a new node
        let mut rep = Reputation::new();
        assert_eq!(rep.score(), 0.5);
        assert_eq!(rep.failure_rate_at(t(0), &policy()), 0.1);
        // when it succeeds three times
        let mut last = rep.score();
        for i in 0..3 {
            rep.observe(Outcome::Success, t(i), &policy());
            // then R rises every time
            assert!(rep.score() > last);
            last = rep.score();
        }
        assert_eq!(rep.successes(), 3);
        assert_eq!(rep.observations(), 3);
    }

    #[test]
    fn invalid_output_costs_three_failures() {
        // given two identical nodes
        let (mut a, mut b) = (BetaScore::new(), BetaScore::new());
        // when one times out and the other returns invalid output at the same instant
        a.observe(Outcome::Timeout, t(0), &policy());
        b.observe(Outcome::InvalidOutput, t(0), &policy());
        // then the invalid one scores lower: (0+1)/(0+3+2) = 0.2 vs 1/3
        assert!(b.score() < a.score());
        assert!((b.score() - 0.2).abs() < 1e-12);
    }

    #[test]
    fn without_events_r_returns_halfway_to_the_prior_in_one_half_life() {
        // given a node with r = 10, s = 0 (R = 11/12)
        let mut beta = BetaScore::new();
        for _ in 0..10 {
            beta.observe(Outcome::Success, t(0), &policy());
        }
        // when one half-life passes without events
        let later = t(0) + TimeDelta::seconds(policy().half_life_secs);
        // then the counts halve: R = (5+1)/(5+2)
        assert!((beta.score_at(later, &policy()) - 6.0 / 7.0).abs() < 1e-12);
    }

    #[test]
    fn the_window_prefers_whichever_part_holds_more() {
        let p = policy();
        let mut w = FailureWindow::new();
        // given 150 attempts within a minute, the first 100 failed
        for i in 0..150 {
            w.record(i < 100, t(0), &p);
        }
        // then the hour holds more than the last 100: 100 failures of 150
        let s = w.stats_at(t(30), &p);
        assert_eq!((s.samples, s.failures), (150, 100));
        // and two hours later only the last 100 remain (50 failures)
        let s = w.stats_at(t(7200), &p);
        assert_eq!((s.samples, s.failures), (100, 50));
        // and below 10 samples the prior applies
        let mut few = FailureWindow::new();
        for _ in 0..9 {
            few.record(true, t(0), &p);
        }
        assert_eq!(few.failure_rate_at(t(0), &p), 0.1);
        few.clear();
        assert_eq!(few.stats_at(t(0), &p), WindowStats::default());
    }

    fn outcome() -> impl Strategy<Value = Outcome> {
        prop_oneof![
            Just(Outcome::Success),
            Just(Outcome::Error),
            Just(Outcome::Timeout),
            Just(Outcome::InvalidOutput),
        ]
    }

    proptest! {
        #[test]
        fn a_success_never_lowers_r_and_a_failure_never_raises_it(
            history in proptest::collection::vec((outcome(), 0i64..200_000), 0..60),
            next in outcome(),
            gap in 0i64..200_000,
        ) {
            let p = policy();
            let mut beta = BetaScore::new();
            let mut now = 0;
            for (o, dt) in history {
                now += dt;
                beta.observe(o, t(now), &p);
            }
            let at = t(now + gap);
            let before = beta.score_at(at, &p);
            beta.observe(next, at, &p);
            let after = beta.score();
            if next == Outcome::Success {
                prop_assert!(after >= before);
            } else {
                prop_assert!(after <= before);
            }
            prop_assert!((0.0..=1.0).contains(&after));
        }

        #[test]
        fn without_events_r_moves_toward_the_prior(
            history in proptest::collection::vec(outcome(), 1..40),
            hours in 1i64..200,
        ) {
            let p = policy();
            let mut beta = BetaScore::new();
            for o in history {
                beta.observe(o, t(0), &p);
            }
            let then = beta.score_at(t(0), &p);
            let later = beta.score_at(t(hours * 3600), &p);
            prop_assert!((later - 0.5).abs() <= (then - 0.5).abs());
            // exactly: the distance to 0.5 follows the halved counts
            let (r, s) = beta.counts();
            let f = decay_factor(hours * 3600 * 1_000_000, p.half_life_secs);
            let expected = (r * f + 1.0) / (r * f + s * f + 2.0);
            prop_assert!((later - expected).abs() < 1e-12);
        }

        #[test]
        fn invalid_output_costs_more_than_a_timeout_from_any_state(
            history in proptest::collection::vec(outcome(), 0..40),
        ) {
            let p = policy();
            let mut a = BetaScore::new();
            for o in history {
                a.observe(o, t(0), &p);
            }
            let mut b = a;
            a.observe(Outcome::Timeout, t(1), &p);
            b.observe(Outcome::InvalidOutput, t(1), &p);
            prop_assert!(b.score() < a.score());
        }
    }
}
