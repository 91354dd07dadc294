//! How a simulated node answers: rates of error / timeout / invalid output, a latency
//! distribution, and the special behaviours fault tests need (always timeout, always invalid,
//! answer twice, answer late). Pure: sampling takes the node's seeded RNG as an argument.

use std::time::Duration;

use rand::Rng;

/// Longest latency ever sampled, so a heavy-tailed distribution cannot park a request for hours.
const MAX_LATENCY: Duration = Duration::from_secs(60);

/// The distribution of the delay before a node answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Latency {
    /// Always this long.
    Fixed(Duration),
    /// Uniform between `min` and `max` (inclusive).
    Uniform {
        /// Shortest delay.
        min: Duration,
        /// Longest delay.
        max: Duration,
    },
    /// Log-normal with the given median and `sigma` (spread of the underlying normal, e.g. 0.5):
    /// mostly near the median with a long tail, like real inference. Capped at 60 s.
    LogNormal {
        /// The median delay.
        median: Duration,
        /// Standard deviation of `ln(delay)`.
        sigma: f64,
    },
}

impl Default for Latency {
    fn default() -> Self {
        Self::Fixed(Duration::ZERO)
    }
}

impl Latency {
    /// Fixed latency in milliseconds.
    pub fn fixed_ms(ms: u64) -> Self {
        Self::Fixed(Duration::from_millis(ms))
    }

    /// Draws one delay.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> Duration {
        let d = match self {
            Self::Fixed(d) => *d,
            Self::Uniform { min, max } => {
                let (lo, hi) = (min.as_micros() as u64, max.as_micros() as u64);
                Duration::from_micros(if lo >= hi { lo } else { rng.gen_range(lo..=hi) })
            }
            Self::LogNormal { median, sigma } => {
                // Box–Muller; 1 - u keeps ln away from 0.
                let u1: f64 = 1.0 - rng.gen::<f64>();
                let u2: f64 = rng.gen::<f64>();
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                let secs = median.as_secs_f64() * (sigma * z).exp();
                Duration::try_from_secs_f64(secs).unwrap_or(MAX_LATENCY)
            }
        };
        d.min(MAX_LATENCY)
    }

    fn validate(&self) -> Result<(), String> {
        match self {
            Self::Fixed(_) => Ok(()),
            Self::Uniform { min, max } if min > max => {
                Err(format!("latency min {min:?} exceeds max {max:?}"))
            }
            Self::Uniform { .. } => Ok(()),
            Self::LogNormal { sigma, .. } if !(sigma.is_finite() && *sigma >= 0.0) => Err(format!(
                "latency sigma {sigma} must be a non-negative number"
            )),
            Self::LogNormal { .. } => Ok(()),
        }
    }
}

/// How one node answers. Rates are probabilities in `[0, 1]`, checked in the order timeout,
/// error, invalid (so their sum above 1 starves the later ones). The `always_*` switches win over
/// the rates; `answers_twice` and `answers_late` apply to otherwise valid answers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Behaviour {
    /// Probability of answering an error object.
    pub error_rate: f64,
    /// Probability of never answering.
    pub timeout_rate: f64,
    /// Probability of answering garbage, a non-object, or an object without `output`.
    pub invalid_rate: f64,
    /// Delay before answering.
    pub latency: Latency,
    /// Never answer anything.
    pub always_timeout: bool,
    /// Always answer invalid output.
    pub always_invalid: bool,
    /// Send every valid answer twice.
    pub answers_twice: bool,
    /// Wait this much longer than the sampled latency before a valid answer (to land after the
    /// caller's timeout); counted as `late`.
    pub answers_late: Option<Duration>,
}

/// What a node will answer to one request, decided when it arrives. "Never answer" is `None`
/// where a plan is optional.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Plan {
    Valid,
    Error,
    Invalid(InvalidKind),
}

/// The flavours of invalid output, cycled at random.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InvalidKind {
    NotJson,
    NotAnObject,
    NoOutputField,
}

impl Behaviour {
    /// A node that answers correctly after `latency`.
    pub fn healthy(latency: Latency) -> Self {
        Self {
            latency,
            ..Self::default()
        }
    }

    /// A node that never answers.
    pub fn always_timeout() -> Self {
        Self {
            always_timeout: true,
            ..Self::default()
        }
    }

    /// A node that always answers invalid output.
    pub fn always_invalid() -> Self {
        Self {
            always_invalid: true,
            ..Self::default()
        }
    }

    /// A node that always answers an error.
    pub fn always_error() -> Self {
        Self {
            error_rate: 1.0,
            ..Self::default()
        }
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        for (name, rate) in [
            ("error_rate", self.error_rate),
            ("timeout_rate", self.timeout_rate),
            ("invalid_rate", self.invalid_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{name} {rate} is not in [0, 1]"));
            }
        }
        self.latency.validate()
    }

    /// The plan for one request; `None` means never answer.
    pub(crate) fn plan<R: Rng + ?Sized>(&self, rng: &mut R) -> Option<Plan> {
        let invalid = |rng: &mut R| {
            Some(Plan::Invalid(match rng.gen_range(0..3u8) {
                0 => InvalidKind::NotJson,
                1 => InvalidKind::NotAnObject,
                _ => InvalidKind::NoOutputField,
            }))
        };
        if self.always_timeout {
            return None;
        }
        if self.always_invalid {
            return invalid(rng);
        }
        let roll: f64 = rng.gen();
        if roll < self.timeout_rate {
            None
        } else if roll < self.timeout_rate + self.error_rate {
            Some(Plan::Error)
        } else if roll < self.timeout_rate + self.error_rate + self.invalid_rate {
            invalid(rng)
        } else {
            Some(Plan::Valid)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn rates_split_outcomes_roughly_as_configured() {
        let b = Behaviour {
            error_rate: 0.2,
            timeout_rate: 0.1,
            invalid_rate: 0.3,
            ..Behaviour::default()
        };
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = [0u32; 4];
        for _ in 0..10_000 {
            counts[match b.plan(&mut rng) {
                Some(Plan::Valid) => 0,
                Some(Plan::Error) => 1,
                None => 2,
                Some(Plan::Invalid(_)) => 3,
            }] += 1;
        }
        let near = |n: u32, p: f64| ((n as f64 / 10_000.0) - p).abs() < 0.03;
        assert!(near(counts[0], 0.4) && near(counts[1], 0.2), "{counts:?}");
        assert!(near(counts[2], 0.1) && near(counts[3], 0.3), "{counts:?}");
    }

    #[test]
    fn switches_override_rates_and_bad_configs_are_refused() {
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(Behaviour::always_timeout().plan(&mut rng), None);
        assert!(matches!(
            Behaviour::always_invalid().plan(&mut rng),
            Some(Plan::Invalid(_))
        ));
        assert_eq!(Behaviour::always_error().plan(&mut rng), Some(Plan::Error));
        let bad = Behaviour {
            error_rate: 1.5,
            ..Behaviour::default()
        };
        assert!(bad.validate().is_err());
        let bad = Behaviour::healthy(Latency::Uniform {
            min: Duration::from_millis(5),
            max: Duration::from_millis(1),
        });
        assert!(bad.validate().is_err());
    }

    #[test]
    fn latency_samples_stay_in_their_distribution() {
        let mut rng = StdRng::seed_from_u64(3);
        let u = Latency::Uniform {
            min: Duration::from_millis(10),
            max: Duration::from_millis(20),
        };
        for _ in 0..1000 {
            let d = u.sample(&mut rng);
            assert!(d >= Duration::from_millis(10) && d <= Duration::from_millis(20));
        }
        let ln = Latency::LogNormal {
            median: Duration::from_millis(10),
            sigma: 0.5,
        };
        let mut samples: Vec<_> = (0..2001).map(|_| ln.sample(&mut rng)).collect();
        samples.sort();
        let median = samples[1000].as_secs_f64() * 1000.0;
        assert!((8.0..12.5).contains(&median), "median {median} ms");
        assert_eq!(
            Latency::fixed_ms(5).sample(&mut rng),
            Duration::from_millis(5)
        );
    }
}
