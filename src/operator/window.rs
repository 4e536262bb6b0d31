//! Window kinds and the assignment of event times to windows.
//!
//! Windows are `[start, end)` in event-time milliseconds, aligned to the epoch. A TUMBLE
//! window of size `s` holds `t` when `start = t - t mod s`; a HOP window of size `s` and
//! slide `d` holds `t` for every `start` that is a multiple of `d` in `(t - s, t]`; a
//! SESSION is built per key by the window operator (see `session.rs`).

use std::fmt;

/// Most windows one record may fall into (HOP `size / slide`); bounds the work per record.
pub const WINDOWS_PER_RECORD_MAX: i64 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    Tumble { size_ms: i64 },
    Hop { slide_ms: i64, size_ms: i64 },
    Session { gap_ms: i64 },
}

impl fmt::Display for WindowKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tumble { size_ms } => write!(f, "TUMBLE size {size_ms} ms"),
            Self::Hop { slide_ms, size_ms } => {
                write!(f, "HOP slide {slide_ms} ms, size {size_ms} ms")
            }
            Self::Session { gap_ms } => write!(f, "SESSION gap {gap_ms} ms"),
        }
    }
}

impl WindowKind {
    /// Checks sizes; the message is for the user.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            Self::Tumble { size_ms } if size_ms <= 0 => {
                Err("the window size must be positive".into())
            }
            Self::Hop { slide_ms, size_ms } if slide_ms <= 0 || size_ms <= 0 => {
                Err("HOP slide and size must be positive".into())
            }
            Self::Hop { slide_ms, size_ms } if size_ms / slide_ms > WINDOWS_PER_RECORD_MAX => {
                Err(format!(
                    "HOP size / slide is {}, more than {WINDOWS_PER_RECORD_MAX} windows per record",
                    size_ms / slide_ms
                ))
            }
            Self::Session { gap_ms } if gap_ms <= 0 => {
                Err("the session gap must be positive".into())
            }
            _ => Ok(()),
        }
    }

    /// Calls `f(start)` for every fixed window holding `t` (TUMBLE, HOP), oldest first.
    pub fn assign(&self, t: i64, mut f: impl FnMut(i64)) {
        match *self {
            Self::Tumble { size_ms } => f(t - t.rem_euclid(size_ms)),
            Self::Hop { slide_ms, size_ms } => {
                let last = t - t.rem_euclid(slide_ms);
                let mut start = last;
                while start - slide_ms > t - size_ms {
                    start -= slide_ms;
                }
                while start <= last {
                    // With slide > size there are gaps no window covers.
                    if start > t - size_ms {
                        f(start);
                    }
                    start += slide_ms;
                }
            }
            Self::Session { .. } => {}
        }
    }

    /// The end of the fixed window that starts at `start`.
    #[must_use]
    pub fn end(&self, start: i64) -> i64 {
        match *self {
            Self::Tumble { size_ms } | Self::Hop { size_ms, .. } => start.saturating_add(size_ms),
            Self::Session { gap_ms } => start.saturating_add(gap_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn starts(kind: WindowKind, t: i64) -> Vec<i64> {
        let mut v = Vec::new();
        kind.assign(t, |s| v.push(s));
        v
    }

    #[test]
    fn window_assign_tumble_aligns_to_epoch_including_negative_times() {
        let k = WindowKind::Tumble { size_ms: 10 };
        assert_eq!(starts(k, 0), vec![0]);
        assert_eq!(starts(k, 9), vec![0]);
        assert_eq!(starts(k, 10), vec![10]);
        assert_eq!(starts(k, -1), vec![-10]);
    }

    #[test]
    fn window_assign_hop_gives_every_window_that_holds_t() {
        let k = WindowKind::Hop {
            slide_ms: 2,
            size_ms: 10,
        };
        assert_eq!(starts(k, 10), vec![2, 4, 6, 8, 10]);
        assert_eq!(starts(k, 11), vec![2, 4, 6, 8, 10]);
        // Property: each start s satisfies s <= t < s + size and s % slide == 0.
        for t in -50..50 {
            let s = starts(k, t);
            assert_eq!(s.len(), 5);
            assert!(
                s.iter()
                    .all(|&s| s <= t && t < s + 10 && s.rem_euclid(2) == 0)
            );
        }
        let gaps = WindowKind::Hop {
            slide_ms: 10,
            size_ms: 5,
        };
        assert_eq!(starts(gaps, 7), Vec::<i64>::new());
        assert_eq!(starts(gaps, 12), vec![10]);
    }
}
