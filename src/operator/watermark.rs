//! Watermarks: per partition `max event time seen - watermark_delay_ms`, combined as the
//! minimum over the partitions that are not idle.
//!
//! A partition silent for `idle_timeout_ms` (wall clock) stops holding the watermark back
//! and holds it again as soon as it produces. When every partition is idle the watermark
//! is the largest of theirs. A drained bounded source's watermark is `i64::MAX`, which
//! closes every window. Watermarks never go backwards.
//!
//! Alignment: [`WatermarkTracker::slowest`] is the smallest watermark of the partitions
//! that are producing; partitions more than `max_drift_ms` ahead of the slowest one over
//! every source ([`WatermarkTracker::ahead_of`]) are paused by the pipeline, so that a
//! fast partition waits at the broker instead of filling window state with records the
//! watermark cannot close yet. The slowest partition is never paused, so progress never
//! stops; an idle partition does not count as slowest.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The clock that decides when a partition is idle: wall-clock time minus the time the
/// pipeline spent blocked (in sinks), so that backpressure never makes a partition look
/// idle and its records late.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdleClock {
    excluded: Duration,
}

impl IdleClock {
    /// Time the pipeline could not read (blocked writing or flushing).
    pub fn exclude(&mut self, blocked: Duration) {
        self.excluded += blocked;
    }

    /// Time excluded so far.
    #[must_use]
    pub fn excluded(&self) -> Duration {
        self.excluded
    }

    /// The idle clock's reading at wall-clock `now`.
    #[must_use]
    pub fn at(&self, now: Instant) -> Instant {
        now.checked_sub(self.excluded).unwrap_or(now)
    }
}

/// No watermark yet (nothing seen).
pub const WATERMARK_NONE: i64 = i64::MIN;

#[derive(Debug, Clone, Copy)]
struct PartitionTime {
    max_event_ms: i64,
    last_seen: Instant,
}

#[derive(Debug, Clone)]
pub struct WatermarkTracker {
    delay_ms: i64,
    idle_timeout: Option<Duration>,
    partitions: BTreeMap<i32, PartitionTime>,
    current: i64,
    finished: bool,
}

impl WatermarkTracker {
    #[must_use]
    pub fn new(delay_ms: u64, idle_timeout_ms: Option<u64>) -> Self {
        Self {
            delay_ms: i64::try_from(delay_ms).unwrap_or(i64::MAX),
            idle_timeout: idle_timeout_ms.map(Duration::from_millis),
            partitions: BTreeMap::new(),
            current: WATERMARK_NONE,
            finished: false,
        }
    }

    /// Records that `partition` produced an event at `event_ms` (observed at `now`).
    pub fn observe(&mut self, partition: i32, event_ms: i64, now: Instant) {
        let p = self.partitions.entry(partition).or_insert(PartitionTime {
            max_event_ms: i64::MIN,
            last_seen: now,
        });
        p.max_event_ms = p.max_event_ms.max(event_ms);
        p.last_seen = now;
    }

    /// The partitions the source reads now. A partition assigned but silent holds the
    /// watermark back (it may still bring old records) until it has been idle for
    /// `idle_timeout_ms`; partitions no longer assigned stop counting.
    pub fn set_partitions(&mut self, partitions: &[i32], now: Instant) {
        self.partitions.retain(|p, _| partitions.contains(p));
        for &p in partitions {
            self.partitions.entry(p).or_insert(PartitionTime {
                max_event_ms: i64::MIN,
                last_seen: now,
            });
        }
    }

    /// The source has handed out its last record: every window may close.
    pub fn finish(&mut self) {
        self.finished = true;
    }

    fn partition_watermark(&self, p: &PartitionTime) -> i64 {
        if p.max_event_ms == i64::MIN {
            WATERMARK_NONE
        } else {
            p.max_event_ms.saturating_sub(self.delay_ms)
        }
    }

    fn is_idle(&self, p: &PartitionTime, now: Instant) -> bool {
        self.idle_timeout
            .is_some_and(|t| now.duration_since(p.last_seen) >= t)
    }

    /// The smallest watermark of the partitions that have produced and are not idle;
    /// `None` when there are none (or the source is drained).
    #[must_use]
    pub fn slowest(&self, now: Instant) -> Option<i64> {
        if self.finished {
            return None;
        }
        self.partitions
            .values()
            .filter(|p| p.max_event_ms != i64::MIN && !self.is_idle(p, now))
            .map(|p| self.partition_watermark(p))
            .min()
    }

    /// The partitions whose watermark is above `limit`.
    #[must_use]
    pub fn ahead_of(&self, limit: i64) -> Vec<i32> {
        self.partitions
            .iter()
            .filter(|(_, p)| p.max_event_ms != i64::MIN && self.partition_watermark(p) > limit)
            .map(|(&id, _)| id)
            .collect()
    }

    /// Recomputes the watermark at `now`; returns it (monotonic).
    pub fn advance(&mut self, now: Instant) -> i64 {
        if self.finished {
            self.current = i64::MAX;
            return self.current;
        }
        let active = self
            .partitions
            .values()
            .filter(|p| !self.is_idle(p, now))
            .map(|p| self.partition_watermark(p))
            .min();
        let candidate = active.or_else(|| {
            self.partitions
                .values()
                .map(|p| self.partition_watermark(p))
                .max()
        });
        if let Some(c) = candidate.filter(|&c| c != WATERMARK_NONE) {
            self.current = self.current.max(c);
        }
        self.current
    }

    #[must_use]
    pub fn current(&self) -> i64 {
        self.current
    }

    /// The watermark and each partition's highest event time, for a commit entry.
    #[must_use]
    pub fn snapshot(&self) -> (i64, Vec<(i32, i64)>) {
        (
            self.current,
            self.partitions
                .iter()
                .map(|(&p, t)| (p, t.max_event_ms))
                .collect(),
        )
    }

    /// Restores a [`WatermarkTracker::snapshot`]; partitions count as seen at `now`.
    pub fn restore(&mut self, current: i64, partitions: &[(i32, i64)], now: Instant) {
        self.current = current;
        self.partitions = partitions
            .iter()
            .map(|&(p, max_event_ms)| {
                (
                    p,
                    PartitionTime {
                        max_event_ms,
                        last_seen: now,
                    },
                )
            })
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermark_is_min_over_partitions_minus_delay_and_monotonic() {
        let t0 = Instant::now();
        let mut w = WatermarkTracker::new(100, None);
        assert_eq!(w.advance(t0), WATERMARK_NONE);
        w.observe(0, 1000, t0);
        w.observe(1, 500, t0);
        assert_eq!(w.advance(t0), 400);
        w.observe(1, 300, t0);
        assert_eq!(
            w.advance(t0),
            400,
            "out-of-order records never move it back"
        );
        w.observe(1, 2000, t0);
        assert_eq!(w.advance(t0), 900);
        w.finish();
        assert_eq!(w.advance(t0), i64::MAX);
    }

    #[test]
    fn watermark_idle_partition_stops_holding_back_until_it_wakes() {
        let t0 = Instant::now();
        let mut w = WatermarkTracker::new(0, Some(1000));
        w.observe(0, 100, t0);
        w.observe(1, 5000, t0);
        assert_eq!(w.advance(t0), 100);
        let later = t0 + Duration::from_millis(1500);
        w.observe(1, 6000, later);
        assert_eq!(w.advance(later), 6000, "partition 0 is idle");
        w.observe(0, 200, later);
        assert_eq!(
            w.advance(later),
            6000,
            "it holds again but never moves the watermark back"
        );
        w.observe(0, 7000, later);
        w.observe(1, 8000, later);
        assert_eq!(w.advance(later), 7000);
    }

    #[test]
    fn alignment_names_partitions_ahead_of_the_slowest_active_one() {
        let t0 = Instant::now();
        let mut w = WatermarkTracker::new(100, Some(1000));
        w.set_partitions(&[0, 1, 2], t0);
        assert_eq!(w.slowest(t0), None, "nothing produced yet");
        w.observe(0, 1000, t0);
        w.observe(1, 5000, t0);
        assert_eq!(w.slowest(t0), Some(900), "partition 2 has no watermark");
        assert_eq!(w.ahead_of(900 + 3000), vec![1]);
        assert_eq!(w.ahead_of(900 + 5000), Vec::<i32>::new());
        // Partition 0 goes quiet: the slowest producing one is now partition 1.
        let later = t0 + Duration::from_millis(1500);
        w.observe(1, 5100, later);
        assert_eq!(w.slowest(later), Some(5000));
        w.finish();
        assert_eq!(w.slowest(later), None, "a drained source holds nobody back");
    }

    #[test]
    fn time_blocked_on_sinks_does_not_make_a_partition_idle() {
        let t0 = Instant::now();
        let mut clock = IdleClock::default();
        let mut w = WatermarkTracker::new(0, Some(1000));
        w.observe(0, 100, clock.at(t0));
        w.observe(1, 5000, clock.at(t0));
        // 1.6 s pass, 1.5 s of them blocked on a slow sink: partition 0 was silent for
        // only 0.1 s of reading, so it still holds the watermark.
        clock.exclude(Duration::from_millis(1500));
        let later = t0 + Duration::from_millis(1600);
        w.observe(1, 6000, clock.at(later));
        assert_eq!(w.advance(clock.at(later)), 100);
        // Without the exclusion it would have been idle.
        assert_eq!(w.clone().advance(later), 6000);
        // Reading time past the timeout makes it idle.
        let much_later = later + Duration::from_secs(1);
        assert_eq!(w.advance(clock.at(much_later)), 6000);
    }

    #[test]
    fn watermark_assigned_silent_partition_holds_back_until_idle() {
        let t0 = Instant::now();
        let mut w = WatermarkTracker::new(0, Some(1000));
        w.set_partitions(&[0, 1], t0);
        w.observe(0, 5000, t0);
        assert_eq!(
            w.advance(t0),
            WATERMARK_NONE,
            "partition 1 may still bring old records"
        );
        let later = t0 + Duration::from_millis(1500);
        w.observe(0, 6000, later);
        assert_eq!(w.advance(later), 6000, "partition 1 is idle now");
        w.set_partitions(&[0], later);
        assert_eq!(w.advance(later), 6000);
    }
}
