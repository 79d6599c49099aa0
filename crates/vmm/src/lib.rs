//! vmm: a small KVM monitor whose built-in guest checks its own memory while gmem moves.
//!
//! [`Vm::start`] creates a VM on guest_memfd memory laid out in chunk memslots (so every
//! migration mechanism of `gmem` works), loads the built-in guest — a write-and-verify loop
//! assembled from Rust, entered directly in 64-bit user mode — or a Linux kernel (`linux`),
//! and runs one thread per vCPU.
//! [`VmQuiesce`] implements `gmem::migrate::Quiesce` by kicking and parking those threads.
//! All unsafe code lives in `gmem::sys`.
#![forbid(unsafe_code)]

pub mod api;
mod config;
mod error;
pub mod guest;
mod histogram;
pub mod linux;
mod metrics;
mod quiesce;
mod vcpu;
mod vm;
mod x86;

pub use config::{
    DEFAULT_LINUX_CMDLINE, GUEST_PAGE_BYTES, LinuxBoot, MAX_LINUX_GUEST_BYTES,
    MIN_LINUX_GUEST_BYTES, VmConfig,
};
pub use error::VmError;
pub use guest::layout::Slice;
pub use histogram::{LatencyHistogram, LatencySummary};
pub use metrics::{
    GuestReset, Metrics, MismatchReport, ResetCause, VcpuMetrics, VcpuSnapshot, VmState,
};
pub use quiesce::VmQuiesce;
pub use vm::{LinuxSummary, Vm};
