//! `gmem-lab hold-kvm`: keeps one idle KVM VM alive for the whole run, so the lab's kernel
//! never live-patches its scheduler's text while the tests create and destroy VMs.
//!
//! KVM flips kernel static keys when the first VM appears and the last one goes:
//! `preempt_notifier_key` (the preempt-notifier calls in `__schedule`) with the VM count, and
//! `apic_sw_disabled` with the vCPUs whose APIC is still software-disabled. Each flip rewrites
//! code with `text_poke_bp` (int3 first, then the bytes, then IPIs). Under QEMU's
//! multi-threaded TCG another vCPU can still execute the stale int3 after the patching is
//! over, and the kernel dies with `Oops: int3` in `__schedule` (seen in about a third of the
//! stock suites before this). With this VM (an in-kernel irqchip and one vCPU that never
//! runs) held from boot, both keys stay on and are never patched again.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

/// Opens /dev/kvm, creates the VM, its irqchip and vCPU 0, says so on stdout, and sleeps
/// until it is killed (the machine powers off).
pub fn hold_kvm() -> ExitCode {
    let held = gmem::sys::kvm::open(Path::new("/dev/kvm"))
        .map_err(|e| crate::report::error_chain(&e))
        .and_then(|kvm| {
            let vm = gmem::sys::kvm::create_vm(&kvm).map_err(|e| crate::report::error_chain(&e))?;
            vm.create_irq_chip()
                .map_err(|e| format!("KVM_CREATE_IRQCHIP: {e}"))?;
            let vcpu = vm
                .create_vcpu(0)
                .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
            Ok((kvm, vm, vcpu))
        });
    let mut out = std::io::stdout().lock();
    match held {
        Ok(_held) => {
            let _ = writeln!(
                out,
                "gmem-lab: holding an idle KVM VM (irqchip, 1 vCPU) so KVM's static keys stay put"
            );
            let _ = out.flush();
            drop(out);
            loop {
                std::thread::park();
            }
        }
        Err(e) => {
            let _ = writeln!(out, "gmem-lab: hold-kvm: {e}");
            ExitCode::from(1)
        }
    }
}
