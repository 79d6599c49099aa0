//! A log-linear latency histogram: fixed memory, ~3% value resolution, exact count and max.
//!
//! Stop latencies are recorded for the life of the VM, so samples are binned rather than
//! kept. Values below 64 ns get a bucket each; above that every power of two is split into
//! 32 equal buckets.

use std::time::Duration;

use serde::Serialize;

/// Buckets per power of two, as a power of two.
const SUB_BUCKET_BITS: u32 = 5;
const SUB_BUCKETS: u64 = 1 << SUB_BUCKET_BITS;
/// Values below this get one bucket each.
const LINEAR_LIMIT: u64 = 2 * SUB_BUCKETS;
/// Enough buckets for any u64 nanosecond value.
const BUCKETS: usize = (LINEAR_LIMIT + (64 - 6) * SUB_BUCKETS) as usize;

/// Counts of durations, binned by nanoseconds.
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    counts: Vec<u64>,
    count: u64,
    sum_ns: u128,
    max_ns: u64,
}

/// What a histogram says, in microseconds (fractional), for reports and JSON.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Samples recorded.
    pub count: u64,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Largest sample (exact).
    pub max_us: f64,
    /// Arithmetic mean (exact).
    pub mean_us: f64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: vec![0; BUCKETS],
            count: 0,
            sum_ns: 0,
            max_ns: 0,
        }
    }
}

fn bucket_of(ns: u64) -> usize {
    if ns < LINEAR_LIMIT {
        return ns as usize;
    }
    let exponent = 63 - ns.leading_zeros(); // >= 6
    let sub = (ns >> (exponent - SUB_BUCKET_BITS)) - SUB_BUCKETS;
    (LINEAR_LIMIT + u64::from(exponent - 6) * SUB_BUCKETS + sub) as usize
}

/// Smallest value that falls in `bucket`.
fn bucket_floor(bucket: usize) -> u64 {
    let bucket = bucket as u64;
    if bucket < LINEAR_LIMIT {
        return bucket;
    }
    let k = bucket - LINEAR_LIMIT;
    let exponent = k / SUB_BUCKETS + 6;
    (SUB_BUCKETS + k % SUB_BUCKETS) << (exponent - u64::from(SUB_BUCKET_BITS))
}

impl LatencyHistogram {
    /// Adds one sample.
    pub fn record(&mut self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.counts[bucket_of(ns)] += 1;
        self.count += 1;
        self.sum_ns += u128::from(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The `q` quantile (0..=1): the middle of the bucket holding it, never above the max.
    /// `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let low = bucket_floor(bucket);
                let high = if bucket + 1 < BUCKETS {
                    bucket_floor(bucket + 1) - 1
                } else {
                    u64::MAX
                };
                let middle = low + (high - low) / 2;
                return Some(Duration::from_nanos(middle.min(self.max_ns)));
            }
        }
        Some(Duration::from_nanos(self.max_ns))
    }

    /// Largest sample.
    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.max_ns)
    }

    /// p50, p99, max and mean in microseconds.
    pub fn summary(&self) -> LatencySummary {
        let us = |d: Option<Duration>| d.map_or(0.0, |d| d.as_nanos() as f64 / 1000.0);
        LatencySummary {
            count: self.count,
            p50_us: us(self.quantile(0.50)),
            p99_us: us(self.quantile(0.99)),
            max_us: us(Some(self.max())),
            mean_us: if self.count == 0 {
                0.0
            } else {
                self.sum_ns as f64 / self.count as f64 / 1000.0
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_ordered() {
        for ns in [
            0,
            1,
            63,
            64,
            65,
            127,
            128,
            1000,
            123_456_789,
            u64::MAX / 2,
            u64::MAX,
        ] {
            let b = bucket_of(ns);
            assert!(b < BUCKETS, "{ns}");
            assert!(bucket_floor(b) <= ns, "{ns}");
            if b + 1 < BUCKETS {
                assert!(ns < bucket_floor(b + 1), "{ns}");
            }
        }
        for b in 1..BUCKETS {
            assert!(bucket_floor(b) > bucket_floor(b - 1));
        }
    }

    #[test]
    fn quantiles_are_within_resolution() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.quantile(0.5), None);
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let close = |got: Duration, want_us: f64| {
            let got = got.as_nanos() as f64 / 1000.0;
            assert!((got - want_us).abs() / want_us < 0.04, "{got} vs {want_us}");
        };
        close(h.quantile(0.5).unwrap(), 500.0);
        close(h.quantile(0.99).unwrap(), 990.0);
        assert_eq!(h.max(), Duration::from_micros(1000));
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert!((s.mean_us - 500.5).abs() < 1e-6);
    }
}
