//! A lock-free latency histogram: log-linear buckets (8 per power of two, so a quantile
//! is within 12.5% of the true value), counters only, safe to share between a reactor
//! that records and a thread that reads.

use std::sync::atomic::{AtomicU64, Ordering};

/// Sub-buckets per power of two.
const SUB_BITS: u32 = 3;
const SUB: usize = 1 << SUB_BITS;
/// Values up to 2^63 ns.
const BUCKETS: usize = 64 * SUB;

pub struct LatencyHistogram {
    counts: Box<[AtomicU64]>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

fn bucket(ns: u64) -> usize {
    if ns < SUB as u64 {
        return ns as usize;
    }
    let power = ns.ilog2();
    let sub = (ns >> (power - SUB_BITS)) as usize & (SUB - 1);
    ((power - SUB_BITS + 1) as usize * SUB + sub).min(BUCKETS - 1)
}

/// The largest value of a bucket (what a quantile reports: never an underestimate).
fn bucket_high(index: usize) -> u64 {
    if index < SUB {
        return index as u64;
    }
    let power = (index / SUB) as u32 + SUB_BITS - 1;
    let sub = (index % SUB) as u64;
    let low = (1u64 << power) | (sub << (power - SUB_BITS));
    low + (1u64 << (power - SUB_BITS)) - 1
}

impl LatencyHistogram {
    /// Counts `count` events that each took `ns` nanoseconds.
    pub fn record(&self, ns: u64, count: u64) {
        self.counts[bucket(ns)].fetch_add(count, Ordering::Relaxed);
    }

    /// Adds another histogram's counts.
    pub fn merge(&self, other: &Self) {
        for (a, b) in self.counts.iter().zip(other.counts.iter()) {
            a.fetch_add(b.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    #[must_use]
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The value below which a fraction `q` of the events fall (an upper bound within
    /// 12.5%); `None` when nothing was recorded.
    #[must_use]
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64 * q).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c.load(Ordering::Relaxed);
            if seen >= rank {
                return Some(bucket_high(i));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_bound_their_values() {
        let mut last = 0;
        for ns in (0..20_000u64).chain([1 << 20, (1 << 20) + 12_345, u64::MAX / 3]) {
            let b = bucket(ns);
            assert!(b >= last || ns > 20_000, "{ns}");
            last = b;
            let high = bucket_high(b);
            assert!(high >= ns, "{ns} in bucket {b} with high {high}");
            assert!(high as f64 <= ns as f64 * 1.125 + 1.0, "{ns}: {high}");
        }
    }

    #[test]
    fn quantiles_follow_the_counts() {
        let h = LatencyHistogram::default();
        assert_eq!(h.quantile(0.5), None);
        h.record(1_000, 98);
        h.record(50_000, 1);
        h.record(2_000_000, 1);
        let p50 = h.quantile(0.5).unwrap();
        assert!((1_000..=1_125).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99).unwrap();
        assert!((50_000..=56_250).contains(&p99), "{p99}");
        let p999 = h.quantile(0.999).unwrap();
        assert!((2_000_000..=2_250_000).contains(&p999), "{p999}");
    }
}
