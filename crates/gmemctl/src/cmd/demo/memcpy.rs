//! Single-thread memcpy bandwidth on this machine, the yardstick for copy-based moves.

use std::hint::black_box;
use std::time::Instant;

use serde::Serialize;

/// Bytes per buffer: well beyond any CPU cache, so the copy runs at memory speed.
const BUFFER_BYTES: usize = 128 << 20;
/// Copies timed; the best one counts (the others lost time to interruptions).
const REPEATS: usize = 5;

/// The measured bandwidth.
#[derive(Debug, Clone, Serialize)]
pub struct MemcpyBandwidth {
    /// Best of the runs, GB/s (10^9 bytes copied per second).
    pub gbps: f64,
    /// Bytes per copy.
    pub buffer_bytes: u64,
    /// Every run, GB/s.
    pub runs_gbps: Vec<f64>,
}

/// Copies one anonymous buffer into another a few times and keeps the best rate.
pub fn measure() -> MemcpyBandwidth {
    // Non-zero fills, so every page is faulted in before the timed copies.
    let source = vec![0x5au8; BUFFER_BYTES];
    let mut destination = vec![0xa5u8; BUFFER_BYTES];
    let runs_gbps: Vec<f64> = (0..REPEATS)
        .map(|_| {
            let started = Instant::now();
            destination.copy_from_slice(black_box(&source));
            black_box(&mut destination);
            BUFFER_BYTES as f64 / started.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    MemcpyBandwidth {
        gbps: runs_gbps.iter().copied().fold(0.0, f64::max),
        buffer_bytes: BUFFER_BYTES as u64,
        runs_gbps,
    }
}
