//! The guest's progress rate: bytes it wrote and verified per second, timed by when each
//! vCPU finished its sweeps.
//!
//! The VM counts whole sweeps (a write and a read-back pass over a vCPU's slice), which at
//! the default size is about a tenth of a second of work. Counting sweeps in a window would
//! be off by up to one sweep per vCPU; instead the counters are sampled often, and a vCPU's
//! rate is taken between the first and the last sweep it finished within the window.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use vmm::{Metrics, Vm};

use super::DemoError;

/// How often the waits look at the guest's counters.
const POLL: Duration = Duration::from_millis(2);

/// Sweeps finished by each vCPU at one instant.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    sweeps: Vec<u64>,
}

impl Sample {
    fn of(metrics: &Metrics) -> Self {
        Sample {
            at: Instant::now(),
            sweeps: metrics.vcpus.iter().map(|v| v.sweeps).collect(),
        }
    }
}

/// Samples of the guest's counters over one window.
#[derive(Debug)]
pub struct RateMeter {
    slice_bytes: Vec<u64>,
    samples: Mutex<Vec<Sample>>,
}

impl RateMeter {
    /// Starts a window now.
    pub fn start(vm: &Vm) -> Self {
        let metrics = vm.metrics();
        RateMeter {
            slice_bytes: metrics.vcpus.iter().map(|v| v.slice_len).collect(),
            samples: Mutex::new(vec![Sample::of(&metrics)]),
        }
    }

    /// Records the counters now (callable from a progress callback).
    pub fn sample(&self, vm: &Vm) {
        let sample = Sample::of(&vm.metrics());
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(sample);
    }

    /// Samples every [`POLL`] for `span`, then ends the window.
    pub fn watch_for(self, vm: &Vm, span: Duration) -> GuestRate {
        let until = Instant::now() + span;
        while Instant::now() < until {
            std::thread::sleep(POLL);
            self.sample(vm);
        }
        self.finish(vm)
    }

    /// Ends the window now and estimates the rate over it.
    pub fn finish(self, vm: &Vm) -> GuestRate {
        self.sample(vm);
        let samples = self.samples.into_inner().unwrap_or_else(|e| e.into_inner());
        let (first, last) = (&samples[0], &samples[samples.len() - 1]);
        let window = (last.at - first.at).as_secs_f64();
        let mut rate = GuestRate {
            seconds: window,
            ..GuestRate::default()
        };
        for (vcpu, &slice) in self.slice_bytes.iter().enumerate() {
            let timeline: Vec<(Instant, u64)> =
                samples.iter().map(|s| (s.at, s.sweeps[vcpu])).collect();
            rate.sweeps += last.sweeps[vcpu] - first.sweeps[vcpu];
            match timed_rate(&timeline, slice) {
                Some(bytes_per_second) => rate.bytes_per_second += bytes_per_second,
                None => {
                    rate.coarse = true;
                    let sweeps = last.sweeps[vcpu] - first.sweeps[vcpu];
                    rate.bytes_per_second += (sweeps * slice) as f64 / window.max(1e-9);
                }
            }
        }
        rate
    }
}

/// A vCPU's bytes per second between the first and last sweep it finished in `timeline`;
/// `None` if it finished fewer than two.
fn timed_rate(timeline: &[(Instant, u64)], slice_bytes: u64) -> Option<f64> {
    let finished: Vec<(Instant, u64)> = timeline
        .windows(2)
        .filter(|pair| pair[1].1 > pair[0].1)
        .map(|pair| pair[1])
        .collect();
    let (first, last) = (finished.first()?, finished.last()?);
    let seconds = (last.0 - first.0).as_secs_f64();
    (last.1 > first.1 && seconds > 0.0)
        .then(|| (last.1 - first.1) as f64 * slice_bytes as f64 / seconds)
}

/// The guest's progress over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct GuestRate {
    /// Bytes written and verified per second, all vCPUs together.
    pub bytes_per_second: f64,
    /// Length of the window.
    pub seconds: f64,
    /// Sweeps finished in it, all vCPUs together.
    pub sweeps: u64,
    /// Some vCPU finished fewer than two sweeps in the window, so its rate is a plain count
    /// of whole sweeps over the window (off by up to one sweep).
    pub coarse: bool,
}

impl GuestRate {
    /// Both windows as one: rates weighted by their window's length.
    pub fn plus(self, other: GuestRate) -> Self {
        let seconds = self.seconds + other.seconds;
        GuestRate {
            bytes_per_second: (self.bytes_per_second * self.seconds
                + other.bytes_per_second * other.seconds)
                / seconds.max(1e-9),
            seconds,
            sweeps: self.sweeps + other.sweeps,
            coarse: self.coarse || other.coarse,
        }
    }

    /// This rate as a share of `base`.
    pub fn share_of(&self, base: &GuestRate) -> f64 {
        self.bytes_per_second / base.bytes_per_second.max(f64::MIN_POSITIVE)
    }
}

/// Waits until every vCPU has finished its first sweep (the one that faults its memory in).
pub fn wait_for_first_sweeps(vm: &Vm, timeout: Duration) -> Result<(), DemoError> {
    let metrics = wait_for_sweeps(vm, &vec![0; vm.config().vcpus as usize], 1, timeout)?;
    match failure(&metrics) {
        Some(failure) => Err(DemoError::GuestFailed(failure)),
        None => Ok(()),
    }
}

/// Waits until every vCPU has finished `more` sweeps beyond now, or one of them stopped, and
/// returns the metrics then.
pub fn wait_for_more_sweeps(vm: &Vm, more: u64, timeout: Duration) -> Result<Metrics, DemoError> {
    let from = Sample::of(&vm.metrics()).sweeps;
    wait_for_sweeps(vm, &from, more, timeout)
}

fn wait_for_sweeps(
    vm: &Vm,
    from: &[u64],
    more: u64,
    timeout: Duration,
) -> Result<Metrics, DemoError> {
    let deadline = Instant::now() + timeout;
    loop {
        let metrics = vm.metrics();
        let done = metrics
            .vcpus
            .iter()
            .zip(from)
            .all(|(v, start)| v.sweeps >= start + more);
        if done || failure(&metrics).is_some() {
            return Ok(metrics);
        }
        if Instant::now() > deadline {
            return Err(DemoError::GuestStalled(timeout));
        }
        std::thread::sleep(POLL);
    }
}

fn failure(metrics: &Metrics) -> Option<String> {
    metrics
        .vcpus
        .iter()
        .find_map(|v| v.failure.as_ref().map(|f| format!("vCPU {}: {f}", v.index)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_timed_between_finished_sweeps() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        // Sweeps finish at ~50, ~150 and ~250 ms: two sweeps in 200 ms, whatever the window.
        let timeline = [
            (at(0), 7),
            (at(50), 8),
            (at(100), 8),
            (at(150), 9),
            (at(250), 10),
            (at(290), 10),
        ];
        let rate = timed_rate(&timeline, 1000).unwrap();
        assert!((rate - 10_000.0).abs() < 1e-6, "{rate}");
        assert_eq!(timed_rate(&timeline[..3], 1000), None);
    }

    #[test]
    fn windows_combine_by_length() {
        let a = GuestRate {
            bytes_per_second: 100.0,
            seconds: 1.0,
            sweeps: 1,
            coarse: false,
        };
        let b = GuestRate {
            bytes_per_second: 40.0,
            seconds: 3.0,
            sweeps: 2,
            coarse: true,
        };
        let both = a.plus(b);
        assert!((both.bytes_per_second - 55.0).abs() < 1e-9);
        assert_eq!((both.sweeps, both.coarse), (3, true));
        assert!((both.share_of(&a) - 0.55).abs() < 1e-9);
    }
}
