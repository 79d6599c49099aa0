//! The machine the demo ran on: kernel release, CPU model and count, NUMA nodes.

use gmem::numa::Topology;
use serde::Serialize;

use super::DemoError;

/// What the report says about the host.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// `uname -r`.
    pub kernel_release: String,
    /// The first "model name" in /proc/cpuinfo.
    pub cpu_model: Option<String>,
    /// CPUs this process may run on.
    pub cpus: usize,
    /// Online NUMA nodes.
    pub topology: Topology,
    /// Runnable tasks averaged over the last minute when the demo started (/proc/loadavg):
    /// above the CPU count, other work competed with the guest and the moves.
    pub load_average_1min: Option<f64>,
}

impl Machine {
    /// Reads it from /proc and /sys.
    pub fn read() -> Result<Self, DemoError> {
        Ok(Machine {
            kernel_release: read_trimmed("/proc/sys/kernel/osrelease")
                .unwrap_or_else(|| "unknown".into()),
            cpu_model: cpu_model(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            topology: Topology::read().map_err(DemoError::Topology)?,
            load_average_1min: read_trimmed("/proc/loadavg")
                .and_then(|l| l.split_whitespace().next()?.parse().ok()),
        })
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

fn cpu_model() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, model)| model.trim().to_owned())
}
