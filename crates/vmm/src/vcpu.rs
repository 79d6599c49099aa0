//! A vCPU thread: runs the guest, turns its port writes into metrics, parks when told.

use std::io;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use gmem::sys::signal::KickableVcpu;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::guest::abi::{PORT_HELLO, PORT_MISMATCH, PORT_SWEEP_DONE};
use crate::metrics::{MismatchReport, VmCounters};
use crate::quiesce::{Checkpoint, RunControl};

/// What a VM exit meant, copied out of the kvm_run area so the vCPU can be used again.
#[derive(Debug)]
enum Event {
    /// `out` to `port` with up to 4 bytes of data (little-endian).
    PortWrite { port: u16, value: u32 },
    /// A kick: KVM_RUN returned EINTR.
    Kicked,
    /// Anything else: the guest can no longer run.
    Fatal(String),
}

/// Starts the thread of vCPU `index`. Its registers must already be set.
pub(crate) fn spawn(
    index: usize,
    vcpu: VcpuFd,
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
            if let Err(reason) = run(index, vcpu, &control, &counters) {
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

/// The run loop. Returns `Ok` on shutdown, or why the guest stopped.
fn run(
    index: usize,
    vcpu: VcpuFd,
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
        let event = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut bytes = [0u8; 4];
                let n = data.len().min(4);
                bytes[..n].copy_from_slice(&data[..n]);
                Event::PortWrite {
                    port,
                    value: u32::from_le_bytes(bytes),
                }
            }
            Ok(VcpuExit::Shutdown) => Event::Fatal(
                "the guest triple-faulted (KVM_EXIT_SHUTDOWN): it took an exception, and it \
                 has no IDT"
                    .into(),
            ),
            Ok(VcpuExit::MemoryFault { flags, gpa, size }) => Event::Fatal(format!(
                "KVM could not map guest memory at {gpa:#x} (+{size:#x}, flags {flags:#x})"
            )),
            Ok(other) => Event::Fatal(format!("unexpected VM exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR => Event::Kicked,
            Err(e) => Event::Fatal(format!("KVM_RUN failed: {e}")),
        };
        stats.exit();
        match event {
            Event::Kicked => vcpu.clear_immediate_exit(),
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
