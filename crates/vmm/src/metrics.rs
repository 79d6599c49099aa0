//! What the VM measures: guest progress and mismatches, stop latency, time to first output.
//!
//! vCPU threads update lock-free counters as the guest reports; [`Metrics`] is a snapshot of
//! them for callers and for JSON.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::guest::layout::Slice;
use crate::histogram::{LatencyHistogram, LatencySummary};

/// Mismatch details kept for inspection; later ones are only counted.
const MAX_KEPT_MISMATCHES: usize = 64;

/// One word the guest found wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MismatchReport {
    /// The vCPU that found it.
    pub vcpu: u32,
    /// Guest physical address of the word.
    pub gpa: u64,
    /// What the guest had written there.
    pub expected: u64,
    /// What it read back.
    pub found: u64,
}

/// How the guest ended its VM by itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ResetCause {
    /// The guest pulsed the CPU reset line through the i8042 keyboard controller (0xFE to
    /// port 0x64): the reboot Linux does with `reboot=k`. A clean end the guest asked for.
    KeyboardController {
        /// The vCPU that wrote the command.
        vcpu: u32,
    },
    /// KVM_EXIT_SHUTDOWN: the vCPU triple-faulted (an exception while delivering a double
    /// fault), which resets a PC. A crash unless the guest meant it (`reboot=t`).
    TripleFault {
        /// The vCPU that faulted.
        vcpu: u32,
        /// Its registers when KVM reported the shutdown.
        state: Box<VcpuSnapshot>,
    },
}

impl ResetCause {
    /// Whether the guest asked for it: only the keyboard controller's reset line is a
    /// request; a triple fault is a crash.
    pub fn is_requested(&self) -> bool {
        matches!(self, ResetCause::KeyboardController { .. })
    }
}

impl std::fmt::Display for ResetCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResetCause::KeyboardController { vcpu } => write!(
                f,
                "vCPU {vcpu} pulsed the reset line through the i8042 keyboard controller"
            ),
            ResetCause::TripleFault { vcpu, state } => {
                write!(f, "vCPU {vcpu} triple-faulted (KVM_EXIT_SHUTDOWN): {state}")
            }
        }
    }
}

/// A vCPU's architectural state, kept when it crashed (KVM_GET_REGS, KVM_GET_SREGS,
/// KVM_GET_VCPU_EVENTS, and KVM_TRANSLATE of RIP and RSP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuSnapshot {
    /// General registers: rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8..r15 in that order.
    pub gprs: [u64; 16],
    /// Instruction pointer.
    pub rip: u64,
    /// Flags.
    pub rflags: u64,
    /// Control registers CR0, CR2 (last page-fault address), CR3, CR4, CR8.
    pub cr: [u64; 5],
    /// EFER.
    pub efer: u64,
    /// Code segment selector and base.
    pub cs: (u16, u64),
    /// Stack segment selector.
    pub ss: u16,
    /// IDT base and limit.
    pub idt: (u64, u16),
    /// GDT base and limit.
    pub gdt: (u64, u16),
    /// Guest-physical address of RIP, if its page is mapped.
    pub rip_gpa: Option<u64>,
    /// Guest-physical address of RSP, if its page is mapped.
    pub rsp_gpa: Option<u64>,
    /// The exception KVM had pending or injected, if any: (vector, error code).
    pub exception: Option<(u8, Option<u32>)>,
    /// What could not be read (an ioctl that failed), if anything.
    pub unreadable: Vec<String>,
    /// The registers are the INIT state (CS:IP f000:fff0, real mode): KVM on AMD
    /// re-initialises a vCPU before it reports the shutdown, as its VMCB is undefined after
    /// one, so the crash's own registers are gone. Intel keeps them.
    pub reinitialised: bool,
}

impl std::fmt::Display for VcpuSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gpa = |a: Option<u64>| a.map_or_else(|| "unmapped".to_string(), |a| format!("{a:#x}"));
        write!(
            f,
            "RIP {:#x} (gpa {}) RSP {:#x} (gpa {}) RFLAGS {:#x} CR0 {:#x} CR2 {:#x} CR3 {:#x} \
             CR4 {:#x} EFER {:#x} CS {:#x}@{:#x} SS {:#x} IDT {:#x}/{:#x} GDT {:#x}/{:#x}",
            self.rip,
            gpa(self.rip_gpa),
            self.gprs[7],
            gpa(self.rsp_gpa),
            self.rflags,
            self.cr[0],
            self.cr[1],
            self.cr[2],
            self.cr[3],
            self.efer,
            self.cs.0,
            self.cs.1,
            self.ss,
            self.idt.0,
            self.idt.1,
            self.gdt.0,
            self.gdt.1
        )?;
        if let Some((vector, code)) = self.exception {
            write!(f, "; pending exception {vector}")?;
            if let Some(code) = code {
                write!(f, " (error code {code:#x})")?;
            }
        }
        let names = [
            "RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "RSP", "R8", "R9", "R10", "R11",
            "R12", "R13", "R14", "R15",
        ];
        for (name, value) in names.iter().zip(self.gprs) {
            write!(f, " {name} {value:#x}")?;
        }
        if !self.unreadable.is_empty() {
            write!(f, "; unreadable: {}", self.unreadable.join(", "))?;
        }
        if self.reinitialised {
            write!(
                f,
                "; these are the vCPU's INIT registers: KVM re-initialised it before reporting \
                 the shutdown (AMD does), so the crash's own state is lost"
            )?;
        }
        Ok(())
    }
}

/// When and how the guest ended its VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestReset {
    /// Milliseconds from `Vm::start`.
    pub at_ms: u64,
    /// What the guest did.
    pub cause: ResetCause,
    /// Whether a memory migration held the slot (was planned or running) at that moment.
    pub during_migration: bool,
}

/// Whether the guest is running, from the user's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum VmState {
    /// vCPUs run (a quiesce for a memory move may be holding them for a moment).
    Running,
    /// Paused by the user (`Vm::pause`).
    Paused,
    /// A vCPU stopped on its own (see its `failure`); the others may still run.
    Failed,
    /// Shut down.
    Stopped,
}

/// One vCPU's counters, updated by its thread.
#[derive(Debug)]
pub(crate) struct VcpuCounters {
    pub(crate) slice: Slice,
    sweeps: AtomicU64,
    bytes_verified: AtomicU64,
    mismatches: AtomicU64,
    exits: AtomicU64,
    failure: Mutex<Option<String>>,
}

impl VcpuCounters {
    fn new(slice: Slice) -> Self {
        VcpuCounters {
            slice,
            sweeps: AtomicU64::new(0),
            bytes_verified: AtomicU64::new(0),
            mismatches: AtomicU64::new(0),
            exits: AtomicU64::new(0),
            failure: Mutex::new(None),
        }
    }

    /// Counts one VM exit.
    pub(crate) fn exit(&self) {
        self.exits.fetch_add(1, Ordering::Relaxed);
    }

    /// A sweep over the whole slice finished with `mismatches` wrong words.
    pub(crate) fn sweep_done(&self, mismatches: u32) {
        self.sweeps.fetch_add(1, Ordering::Relaxed);
        self.bytes_verified
            .fetch_add(self.slice.len, Ordering::Relaxed);
        self.mismatches
            .fetch_add(u64::from(mismatches), Ordering::Relaxed);
    }

    /// The vCPU stopped running the guest, for `reason`.
    pub(crate) fn fail(&self, reason: String) {
        *lock(&self.failure) = Some(reason);
    }

    fn failure(&self) -> Option<String> {
        lock(&self.failure).clone()
    }
}

/// Counters of the whole VM, shared by the VM and its vCPU threads.
#[derive(Debug)]
pub(crate) struct VmCounters {
    started: Instant,
    vcpus_launched: OnceLock<Duration>,
    first_port_write: OnceLock<Duration>,
    guest_reset: OnceLock<GuestReset>,
    /// Set while a migration job holds the VM's migration slot.
    migrating: std::sync::atomic::AtomicBool,
    pub(crate) vcpus: Vec<VcpuCounters>,
    mismatch_reports: Mutex<Vec<MismatchReport>>,
    stop_latency: Mutex<LatencyHistogram>,
    quiesce_hold: Mutex<LatencyHistogram>,
    kick_retries: AtomicU64,
}

impl VmCounters {
    pub(crate) fn new(started: Instant, slices: &[Slice]) -> Self {
        VmCounters {
            started,
            vcpus_launched: OnceLock::new(),
            first_port_write: OnceLock::new(),
            guest_reset: OnceLock::new(),
            migrating: std::sync::atomic::AtomicBool::new(false),
            vcpus: slices.iter().copied().map(VcpuCounters::new).collect(),
            mismatch_reports: Mutex::new(Vec::new()),
            stop_latency: Mutex::new(LatencyHistogram::default()),
            quiesce_hold: Mutex::new(LatencyHistogram::default()),
            kick_retries: AtomicU64::new(0),
        }
    }

    /// `Vm::start` has launched every vCPU thread: the VMM's part of startup is over.
    pub(crate) fn vcpus_launched(&self) {
        self.vcpus_launched.get_or_init(|| self.started.elapsed());
    }

    /// The guest wrote to a port; the first such write marks the end of startup.
    pub(crate) fn port_written(&self) {
        self.first_port_write.get_or_init(|| self.started.elapsed());
    }

    /// The guest ended its VM (a Linux guest rebooted, or a vCPU triple-faulted). The first
    /// cause is kept.
    pub(crate) fn guest_reset(&self, cause: ResetCause) {
        self.guest_reset.get_or_init(|| GuestReset {
            at_ms: self.started.elapsed().as_millis() as u64,
            cause,
            during_migration: self.migrating.load(Ordering::SeqCst),
        });
    }

    /// A migration took (`true`) or gave back (`false`) the VM's migration slot.
    pub(crate) fn set_migrating(&self, migrating: bool) {
        self.migrating.store(migrating, Ordering::SeqCst);
    }

    /// Keeps a mismatch's details (the first few only).
    pub(crate) fn mismatch(&self, report: MismatchReport) {
        let mut reports = lock(&self.mismatch_reports);
        if reports.len() < MAX_KEPT_MISMATCHES {
            reports.push(report);
        }
    }

    /// Records how long it took from a pause request until every vCPU was parked.
    pub(crate) fn stopped_in(&self, latency: Duration) {
        lock(&self.stop_latency).record(latency);
    }

    /// A pause had to kick again: some vCPU had not parked after the first kick.
    pub(crate) fn kick_retried(&self) {
        self.kick_retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Records how long a quiesce held the guest, from pause request to resume request.
    pub(crate) fn quiesce_held_for(&self, held: Duration) {
        lock(&self.quiesce_hold).record(held);
    }

    /// Time from `Vm::start` to the guest's first port write, once it happened.
    pub(crate) fn first_port_write(&self) -> Option<Duration> {
        self.first_port_write.get().copied()
    }

    pub(crate) fn any_failed(&self) -> bool {
        self.vcpus.iter().any(|v| v.failure().is_some())
    }

    pub(crate) fn snapshot(&self, state: VmState) -> Metrics {
        let vcpus: Vec<VcpuMetrics> = self
            .vcpus
            .iter()
            .enumerate()
            .map(|(index, v)| VcpuMetrics {
                index: index as u32,
                slice_start: v.slice.start,
                slice_len: v.slice.len,
                sweeps: v.sweeps.load(Ordering::Relaxed),
                bytes_verified: v.bytes_verified.load(Ordering::Relaxed),
                mismatches: v.mismatches.load(Ordering::Relaxed),
                exits: v.exits.load(Ordering::Relaxed),
                failure: v.failure(),
            })
            .collect();
        Metrics {
            state,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            vcpus_launched_us: self.vcpus_launched.get().map(|d| d.as_micros() as u64),
            first_port_write_us: self.first_port_write().map(|d| d.as_micros() as u64),
            guest_reset_ms: self.guest_reset.get().map(|r| r.at_ms),
            guest_reset: self.guest_reset.get().cloned(),
            sweeps: vcpus.iter().map(|v| v.sweeps).sum(),
            bytes_verified: vcpus.iter().map(|v| v.bytes_verified).sum(),
            mismatches: vcpus.iter().map(|v| v.mismatches).sum(),
            mismatch_reports: lock(&self.mismatch_reports).clone(),
            stop_latency: lock(&self.stop_latency).summary(),
            quiesce_hold: lock(&self.quiesce_hold).summary(),
            kick_retries: self.kick_retries.load(Ordering::Relaxed),
            vcpus,
        }
    }
}

/// A snapshot of what the VM measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metrics {
    /// Running, paused, failed or stopped.
    pub state: VmState,
    /// Milliseconds since `Vm::start` began.
    pub uptime_ms: u64,
    /// Microseconds from `Vm::start` until it had launched every vCPU thread.
    pub vcpus_launched_us: Option<u64>,
    /// Microseconds from `Vm::start` to the guest's first port write (`None` until then).
    pub first_port_write_us: Option<u64>,
    /// Milliseconds from `Vm::start` until the guest reset (asked for it or crashed), which
    /// stops the VM (`None` while it has not).
    pub guest_reset_ms: Option<u64>,
    /// How the guest reset, with a crashed vCPU's registers (`None` while it has not).
    pub guest_reset: Option<GuestReset>,
    /// Per-vCPU progress.
    pub vcpus: Vec<VcpuMetrics>,
    /// Sweeps of all vCPUs.
    pub sweeps: u64,
    /// Bytes verified by all vCPUs.
    pub bytes_verified: u64,
    /// Words any vCPU found wrong. Must stay 0 whatever happens to the memory underneath.
    pub mismatches: u64,
    /// Details of the first mismatches.
    pub mismatch_reports: Vec<MismatchReport>,
    /// How long pauses took, from request until every vCPU was parked.
    pub stop_latency: LatencySummary,
    /// How long each quiesce kept the guest stopped, from the pause request to the resume
    /// request (nested pauses count once): the guest's stop time in a memory move, free of
    /// the mover's own scheduling delays after it resumes the vCPUs.
    pub quiesce_hold: LatencySummary,
    /// Times a pause found a vCPU still running 10 ms after kicking it, and kicked again.
    pub kick_retries: u64,
}

/// One vCPU's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VcpuMetrics {
    /// vCPU index.
    pub index: u32,
    /// First guest physical byte of its slice.
    pub slice_start: u64,
    /// Bytes in its slice.
    pub slice_len: u64,
    /// Sweeps (write pass + verify pass over the whole slice) completed.
    pub sweeps: u64,
    /// Bytes written and read back correctly or not (`sweeps * slice_len`).
    pub bytes_verified: u64,
    /// Words it found wrong.
    pub mismatches: u64,
    /// VM exits it took (port accesses, kicks, MMIO).
    pub exits: u64,
    /// Why it stopped running the guest, if it did.
    pub failure: Option<String>,
}

/// Locks a mutex, ignoring poisoning: these counters stay meaningful after a panic elsewhere.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
