//! Fixed-point basis points (`Bps`, 0..=10,000 = 0.0..=1.0), the unit every policy score and weight is
//! carried in so that a replay recomputes decisions bit for bit. Conversions from `f64` happen once, at
//! the edge (config, projections); arithmetic inside decisions is integer and saturating. This module
//! deliberately holds no policy: it is only the number type.

use serde::{Deserialize, Serialize};

/// Basis points: an integer in `0..=10_000` standing for a fraction in `[0, 1]`.
///
/// The field is private so the range invariant always holds; serde rejects values above 10,000.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(try_from = "u32", into = "u32")]
pub struct Bps(u16);

/// A raw value outside `0..=10_000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} basis points is outside 0..=10000")]
pub struct BpsRangeError(pub u32);

impl Bps {
    /// The scale: 10,000 basis points = 1.0.
    pub const SCALE: u32 = 10_000;
    /// 0.0.
    pub const ZERO: Bps = Bps(0);
    /// 1.0.
    pub const ONE: Bps = Bps(10_000);

    /// `raw` basis points, or `None` above 10,000.
    pub const fn new(raw: u32) -> Option<Bps> {
        if raw <= Self::SCALE {
            Some(Bps(raw as u16))
        } else {
            None
        }
    }

    /// `raw` basis points clamped to `0..=10_000`.
    pub const fn saturating(raw: u64) -> Bps {
        if raw >= Self::SCALE as u64 {
            Bps::ONE
        } else {
            Bps(raw as u16)
        }
    }

    /// The nearest basis point to a fraction; NaN and negatives give 0, values above 1 give 10,000.
    pub fn from_f64(x: f64) -> Bps {
        if x.is_nan() || x <= 0.0 {
            return Bps::ZERO;
        }
        if x >= 1.0 {
            return Bps::ONE;
        }
        // In range (0, 1) so the product fits a u16 after rounding.
        Bps::saturating((x * f64::from(Self::SCALE)).round() as u64)
    }

    /// `num / den` rounded down, saturating at 1.0; a zero denominator counts as full (1.0).
    pub fn ratio(num: u64, den: u64) -> Bps {
        if den == 0 {
            return Bps::ONE;
        }
        Bps::saturating(u64::from(Self::SCALE).saturating_mul(num) / den)
    }

    /// The fraction as `f64` (exact for display and projections).
    pub fn to_f64(self) -> f64 {
        f64::from(self.0) / f64::from(Self::SCALE)
    }

    /// The raw basis points.
    pub const fn get(self) -> u16 {
        self.0
    }

    /// The raw basis points widened to `u32`.
    pub const fn raw(self) -> u32 {
        self.0 as u32
    }

    /// `1.0 − self`.
    pub const fn complement(self) -> Bps {
        Bps(Self::SCALE as u16 - self.0)
    }

    /// Sum clamped at 1.0.
    pub const fn saturating_add(self, other: Bps) -> Bps {
        Bps::saturating(self.0 as u64 + other.0 as u64)
    }

    /// Difference clamped at 0.0.
    pub const fn saturating_sub(self, other: Bps) -> Bps {
        Bps(self.0.saturating_sub(other.0))
    }

    /// Product of two fractions, rounded down.
    pub const fn mul(self, other: Bps) -> Bps {
        Bps(((self.0 as u32 * other.0 as u32) / Self::SCALE) as u16)
    }

    /// `self` clamped into `[lo, hi]` (if `lo > hi`, `lo` wins).
    pub fn clamp_to(self, lo: Bps, hi: Bps) -> Bps {
        if self > hi {
            hi.max(lo)
        } else if self < lo {
            lo
        } else {
            self
        }
    }
}

impl TryFrom<u32> for Bps {
    type Error = BpsRangeError;
    fn try_from(value: u32) -> Result<Self, Self::Error> {
        Bps::new(value).ok_or(BpsRangeError(value))
    }
}

impl From<Bps> for u32 {
    fn from(value: Bps) -> Self {
        value.raw()
    }
}

impl std::fmt::Display for Bps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}bps", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_clamp_and_round() {
        assert_eq!(Bps::from_f64(0.4), Bps(4000));
        assert_eq!(Bps::from_f64(-1.0), Bps::ZERO);
        assert_eq!(Bps::from_f64(f64::NAN), Bps::ZERO);
        assert_eq!(Bps::from_f64(7.0), Bps::ONE);
        assert_eq!(Bps::from_f64(0.123_46), Bps(1235));
        assert_eq!(Bps(2500).to_f64(), 0.25);
        assert_eq!(Bps::ratio(1, 3), Bps(3333));
        assert_eq!(Bps::ratio(5, 0), Bps::ONE);
        assert_eq!(Bps::new(10_001), None);
    }

    #[test]
    fn saturating_ops_stay_in_range() {
        assert_eq!(Bps(9000).saturating_add(Bps(2000)), Bps::ONE);
        assert_eq!(Bps(1000).saturating_sub(Bps(2000)), Bps::ZERO);
        assert_eq!(Bps(5000).mul(Bps(5000)), Bps(2500));
        assert_eq!(Bps(3000).complement(), Bps(7000));
        assert_eq!(Bps(600).clamp_to(Bps(1000), Bps(5000)), Bps(1000));
    }

    #[test]
    fn serde_is_a_plain_number_and_rejects_out_of_range() {
        assert_eq!(
            serde_json::to_string(&Bps(4000)).ok(),
            Some("4000".to_owned())
        );
        assert!(serde_json::from_str::<Bps>("10001").is_err());
        assert_eq!(serde_json::from_str::<Bps>("25").ok(), Some(Bps(25)));
    }
}
