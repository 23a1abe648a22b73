//! Virtual time for the pure core: an `Instant` the caller supplies, never read from a clock.
//!
//! The core never looks at a clock. Every input carries `now`, an [`Instant`]
//! measured from an origin the caller picks (the daemon maps its monotonic
//! clock onto it; the simulation runs a virtual clock). Durations are plain
//! [`std::time::Duration`] values.

use std::fmt;
use std::ops::{Add, Sub};
use std::time::Duration;

/// A point in time, as a duration since an origin chosen by the caller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(Duration);

impl Instant {
    /// The origin.
    pub const ZERO: Instant = Instant(Duration::ZERO);

    /// An instant `d` after the origin.
    pub const fn from_origin(d: Duration) -> Self {
        Instant(d)
    }

    /// An instant `ms` milliseconds after the origin.
    pub const fn from_millis(ms: u64) -> Self {
        Instant(Duration::from_millis(ms))
    }

    /// Time since the origin.
    pub const fn since_origin(self) -> Duration {
        self.0
    }

    /// `self - earlier`, or zero when `earlier` is later.
    pub fn saturating_since(self, earlier: Instant) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;
    fn add(self, rhs: Duration) -> Instant {
        Instant(self.0 + rhs)
    }
}

impl Sub<Duration> for Instant {
    type Output = Instant;
    fn sub(self, rhs: Duration) -> Instant {
        Instant(self.0.saturating_sub(rhs))
    }
}

impl fmt::Display for Instant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t+{}", fmt_duration(self.0))
    }
}

/// Formats a duration the way the reasons and `check-config` print it:
/// `1.5s`, `250ms`, `12s`.
pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".to_string()
    } else if ms < 1000 {
        format!("{ms}ms")
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        let s = format!("{:.3}", d.as_secs_f64());
        format!("{}s", s.trim_end_matches('0').trim_end_matches('.'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_durations_compactly() {
        assert_eq!(fmt_duration(Duration::from_millis(0)), "0s");
        assert_eq!(fmt_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(fmt_duration(Duration::from_secs(12)), "12s");
        assert_eq!(fmt_duration(Duration::from_millis(1234)), "1.234s");
    }

    #[test]
    fn instant_arithmetic_saturates() {
        let t = Instant::from_millis(1000);
        assert_eq!((t - Duration::from_secs(5)), Instant::ZERO);
        assert_eq!(
            t.saturating_since(Instant::from_millis(2000)),
            Duration::ZERO
        );
        assert_eq!(
            (t + Duration::from_millis(500)).since_origin(),
            Duration::from_millis(1500)
        );
    }
}
