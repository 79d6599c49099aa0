//! A vCPU thread: runs the guest, hands its port I/O to the built-in guest's reports or to
//! a Linux guest's devices, parks when told.

use std::io;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use gmem::sys::signal::KickableVcpu;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::guest::abi::{PORT_HELLO, PORT_MISMATCH, PORT_SWEEP_DONE};
use crate::linux::devices::{LegacyDevices, PortOutcome};
use crate::metrics::{MismatchReport, ResetCause, VcpuSnapshot, VmCounters};
use crate::quiesce::{Checkpoint, RunControl};

/// What the guest's port I/O and MMIO reach.
#[derive(Debug, Clone)]
pub(crate) enum Platform {
    /// The built-in guest: its report ports, and nothing else.
    BuiltIn,
    /// A Linux guest: the legacy devices; MMIO nobody claims reads all ones.
    Linux(Arc<LegacyDevices>),
}

/// What a VM exit meant, copied out of the kvm_run area so the vCPU can be used again.
#[derive(Debug)]
enum Event {
    /// The built-in guest's `out` to `port` with up to 4 bytes of data (little-endian).
    PortWrite { port: u16, value: u32 },
    /// KVM gave up on the guest (KVM_EXIT_INTERNAL_ERROR), typically an instruction it
    /// could not emulate.
    InternalError,
    /// A device handled the exit.
    Handled,
    /// The guest pulsed the i8042 reset line; the VM stops.
    Reset,
    /// KVM_EXIT_SHUTDOWN: a triple fault; the VM stops.
    TripleFault,
    /// A kick: KVM_RUN returned EINTR.
    Kicked,
    /// Anything else: the guest can no longer run.
    Fatal(String),
}

/// Starts the thread of vCPU `index`. Its registers must already be set.
pub(crate) fn spawn(
    index: usize,
    vcpu: VcpuFd,
    platform: Platform,
    control: Arc<RunControl>,
    counters: Arc<VmCounters>,
) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || {
            // Whatever happens below, pauses must not wait for this thread any longer.
            let _exited = ExitGuard {
                index,
                control: &control,
            };
            if let Err(reason) = run(index, vcpu, &platform, &control, &counters) {
                counters.vcpus[index].fail(reason);
            }
        })
}

/// Marks the vCPU exited when its thread ends, panics included.
struct ExitGuard<'a> {
    index: usize,
    control: &'a RunControl,
}

impl Drop for ExitGuard<'_> {
    fn drop(&mut self) {
        self.control.exited(self.index);
    }
}

/// The run loop. Returns `Ok` on shutdown (or the guest's reset), or why the guest stopped.
fn run(
    index: usize,
    vcpu: VcpuFd,
    platform: &Platform,
    control: &RunControl,
    counters: &VmCounters,
) -> Result<(), String> {
    let mut vcpu =
        KickableVcpu::new(vcpu).map_err(|e| format!("cannot bind the vCPU to its thread: {e}"))?;
    let stats = &counters.vcpus[index];
    loop {
        if control.checkpoint(index) == Checkpoint::Exit {
            return Ok(());
        }
        let event = match (vcpu.run(), platform) {
            (Ok(VcpuExit::IoOut(port, data)), Platform::BuiltIn) => {
                let mut bytes = [0u8; 4];
                let n = data.len().min(4);
                bytes[..n].copy_from_slice(&data[..n]);
                Event::PortWrite {
                    port,
                    value: u32::from_le_bytes(bytes),
                }
            }
            (Ok(VcpuExit::IoOut(port, data)), Platform::Linux(devices)) => {
                counters.port_written();
                match devices.write(port, data) {
                    PortOutcome::Continue => Event::Handled,
                    PortOutcome::Reset => Event::Reset,
                }
            }
            (Ok(VcpuExit::IoIn(port, data)), Platform::Linux(devices)) => {
                devices.read(port, data);
                Event::Handled
            }
            (Ok(VcpuExit::MmioRead(_, data)), Platform::Linux(_)) => {
                data.fill(0xFF);
                Event::Handled
            }
            (Ok(VcpuExit::MmioWrite(..)), Platform::Linux(_)) => Event::Handled,
            // A triple fault resets a PC. Linux reboots this way only when told to
            // (`reboot=t`) or when every other way failed; otherwise it is a crash.
            (Ok(VcpuExit::Shutdown), Platform::Linux(_)) => Event::TripleFault,
            (Ok(VcpuExit::Shutdown), Platform::BuiltIn) => Event::Fatal(
                "the guest triple-faulted (KVM_EXIT_SHUTDOWN): it took an exception, and it \
                 has no IDT"
                    .into(),
            ),
            (Ok(VcpuExit::MemoryFault { flags, gpa, size }), _) => Event::Fatal(format!(
                "KVM could not map guest memory at {gpa:#x} (+{size:#x}, flags {flags:#x})"
            )),
            (Ok(VcpuExit::InternalError), _) => Event::InternalError,
            (Ok(other), _) => Event::Fatal(format!("unexpected VM exit {other:?}")),
            (Err(e), _) if e.errno() == libc::EINTR => Event::Kicked,
            // An application processor waiting for its startup IPI returns EAGAIN once it
            // gets INIT/SIPI (x86 KVM_RUN's "uninitialized" state): run it again.
            (Err(e), Platform::Linux(_)) if e.errno() == libc::EAGAIN => Event::Handled,
            (Err(e), _) => Event::Fatal(format!("KVM_RUN failed: {e}")),
        };
        stats.exit();
        match event {
            Event::Kicked => vcpu.clear_immediate_exit(),
            Event::Handled => {}
            Event::InternalError => {
                let at = vcpu.fd().get_regs().map_or_else(
                    |e| format!("(KVM_GET_REGS failed: {e})"),
                    |regs| format!("at RIP {:#x}", regs.rip),
                );
                return Err(format!(
                    "KVM could not continue the guest (KVM_EXIT_INTERNAL_ERROR) {at}, e.g. an \
                     instruction it cannot emulate"
                ));
            }
            Event::Reset => {
                counters.guest_reset(ResetCause::KeyboardController { vcpu: index as u32 });
                control.begin_shutdown();
                return Ok(());
            }
            Event::TripleFault => {
                let state = Box::new(snapshot(vcpu.fd()));
                counters.guest_reset(ResetCause::TripleFault {
                    vcpu: index as u32,
                    state,
                });
                control.begin_shutdown();
                return Ok(());
            }
            Event::PortWrite { port, value } => {
                counters.port_written();
                match port {
                    PORT_HELLO => {}
                    PORT_SWEEP_DONE => stats.sweep_done(value),
                    PORT_MISMATCH => {
                        let regs = vcpu
                            .fd()
                            .get_regs()
                            .map_err(|e| format!("KVM_GET_REGS after a mismatch report: {e}"))?;
                        counters.mismatch(MismatchReport {
                            vcpu: index as u32,
                            gpa: regs.r8,
                            expected: regs.r9,
                            found: regs.r10,
                        });
                    }
                    other => {
                        return Err(format!(
                            "the guest wrote {value:#x} to unknown port {other:#x}"
                        ));
                    }
                }
            }
            Event::Fatal(reason) => return Err(reason),
        }
    }
}

/// The registers of a vCPU that stopped, for the post-mortem: whatever KVM can still tell.
fn snapshot(vcpu: &VcpuFd) -> VcpuSnapshot {
    let mut unreadable = Vec::new();
    let regs = vcpu
        .get_regs()
        .inspect_err(|e| unreadable.push(format!("KVM_GET_REGS: {e}")))
        .unwrap_or_default();
    let sregs = vcpu
        .get_sregs()
        .inspect_err(|e| unreadable.push(format!("KVM_GET_SREGS: {e}")))
        .unwrap_or_default();
    let events = vcpu
        .get_vcpu_events()
        .inspect_err(|e| unreadable.push(format!("KVM_GET_VCPU_EVENTS: {e}")))
        .ok();
    let translate = |gva: u64| {
        vcpu.translate_gva(gva)
            .ok()
            .filter(|t| t.valid != 0)
            .map(|t| t.physical_address)
    };
    let exception = events.and_then(|e| {
        let x = e.exception;
        (x.injected != 0 || x.pending != 0)
            .then(|| (x.nr, (x.has_error_code != 0).then_some(x.error_code)))
    });
    VcpuSnapshot {
        gprs: [
            regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi, regs.rbp, regs.rsp,
            regs.r8, regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
        ],
        rip: regs.rip,
        rflags: regs.rflags,
        cr: [sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.cr8],
        efer: sregs.efer,
        cs: (sregs.cs.selector, sregs.cs.base),
        ss: sregs.ss.selector,
        idt: (sregs.idt.base, sregs.idt.limit),
        gdt: (sregs.gdt.base, sregs.gdt.limit),
        rip_gpa: translate(regs.rip),
        rsp_gpa: translate(regs.rsp),
        exception,
        unreadable,
        reinitialised: sregs.cs.selector == 0xF000 && regs.rip == 0xFFF0 && sregs.cr0 & 1 == 0,
    }
}
