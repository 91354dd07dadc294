//! The time a service decides by (ejection windows, retry budgets, jail ends), injectable: the
//! system clock in production, and in tests one that [`Clock::advance`] moves ahead — so a test
//! that needs a window to pass moves the clock instead of sleeping through it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

/// The system clock, or the system clock plus however far a test has advanced it.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// Milliseconds added to the system's time; `None` for the plain system clock.
    ahead_ms: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// The system clock (the default).
    pub fn system() -> Clock {
        Clock::default()
    }

    /// A clock that runs with the system's and can be [`Clock::advance`]d (a test's).
    pub fn adjustable() -> Clock {
        Clock {
            ahead_ms: Some(Arc::new(AtomicU64::new(0))),
        }
    }

    /// Moves this clock, and every clone of it, `by` ahead.
    ///
    /// # Panics
    /// On the system clock, which nobody may move.
    pub fn advance(&self, by: Duration) {
        let ahead = self
            .ahead_ms
            .as_ref()
            .expect("only an adjustable clock can be advanced");
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        ahead.fetch_add(ms, Ordering::Relaxed);
    }

    fn ahead(&self) -> Duration {
        let ms = self
            .ahead_ms
            .as_ref()
            .map_or(0, |a| a.load(Ordering::Relaxed));
        Duration::from_millis(ms)
    }

    /// The wall-clock time.
    pub fn now(&self) -> DateTime<Utc> {
        let ahead = chrono::Duration::from_std(self.ahead()).unwrap_or(chrono::Duration::MAX);
        Utc::now() + ahead
    }

    /// The monotonic time, for intervals.
    pub fn instant(&self) -> Instant {
        Instant::now() + self.ahead()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adjustable_clock_and_its_clones_move_ahead_together_without_sleeping() {
        let clock = Clock::adjustable();
        let clone = clock.clone();
        let (wall, mono) = (Utc::now(), Instant::now());
        clock.advance(Duration::from_secs(90));
        assert!(clone.now() >= wall + chrono::Duration::seconds(90));
        assert!(clone.instant() >= mono + Duration::from_secs(90));
        // …while the system clock is where it was (well within the 90 s)
        assert!(Clock::system().now() < wall + chrono::Duration::seconds(60));
    }

    #[test]
    #[should_panic(expected = "only an adjustable clock")]
    fn the_system_clock_cannot_be_moved() {
        Clock::system().advance(Duration::from_secs(1));
    }
}
