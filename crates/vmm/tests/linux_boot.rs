//! Linux boot protocols on the real /dev/kvm, with stand-in kernels: a bzImage and a PVH ELF
//! whose entry code (assembled here) prints the command line and the initramfs it was handed
//! to the serial console, then resets through the i8042.
//!
//! A real kernel does not get through boot under PVM (its CPL0 code is emulated); these
//! stand-ins run a few hundred instructions, which PVM emulates in well under a second, and
//! check everything the VMM does for a Linux guest up to the kernel's first instruction:
//! linux-loader's placement, the zero page or start_info, the entry state, the e820/PVH
//! memory map, the serial console and the reset path. The lab boots real Linux.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm::linux::stand_in::{EXPECTED_CONSOLE_TAIL, bzimage, pvh_elf, triple_fault_bzimage};
use vmm::{LinuxBoot, ResetCause, Vm, VmConfig, VmState};

const MIB: u64 = 1 << 20;

/// One VM at a time (two cores).
fn one_vm_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Boots `kernel` with an initramfs and a command line, waits for the guest's reset, and
/// checks what the stand-in printed: the command line, the initramfs, and
/// [`EXPECTED_CONSOLE_TAIL`] (four memory-map entries, the RSDP, a local APIC).
fn assert_boots(test: &str, kernel: Vec<u8>) {
    let dir = temp_dir(test);
    if let Some((console, cause)) = boot(test, &dir, kernel) {
        assert_eq!(
            cause,
            ResetCause::KeyboardController { vcpu: 0 },
            "{test}: the stand-in resets through the i8042"
        );
        assert!(cause.is_requested());
        assert_eq!(
            console,
            format!("console=ttyS0 gmemctl=yes|initramfs-bytes{EXPECTED_CONSOLE_TAIL}"),
            "{test}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Boots `kernel` with an initramfs and a command line, waits for the guest's reset, and
/// returns the console text and how the guest reset.
fn boot(test: &str, dir: &Path, kernel: Vec<u8>) -> Option<(String, ResetCause)> {
    gmem::testing::kvm_or_skip(test)?;
    let _one = one_vm_at_a_time();
    let kernel_path = dir.join("kernel");
    let initramfs_path = dir.join("initramfs");
    let console_path = dir.join("console");
    std::fs::write(&kernel_path, kernel).unwrap();
    std::fs::write(&initramfs_path, b"initramfs-bytes").unwrap();
    let config = VmConfig {
        mem_size: 64 * MIB,
        vcpus: 2,
        linux: Some(LinuxBoot {
            kernel: kernel_path,
            initramfs: Some(initramfs_path),
            cmdline: Some("console=ttyS0 gmemctl=yes".into()),
            console: Some(console_path.clone()),
        }),
        ..VmConfig::default()
    };
    let vm = Vm::start(config).unwrap_or_else(|e| panic!("{test}: {e:?}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while vm.metrics().guest_reset_ms.is_none() {
        let metrics = vm.metrics();
        for v in &metrics.vcpus {
            assert_eq!(v.failure, None, "{test}: vCPU {} failed", v.index);
        }
        assert!(
            Instant::now() < deadline,
            "{test}: no reset within 60 s; console so far: {:?}",
            std::fs::read_to_string(&console_path)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(vm.state(), VmState::Stopped, "{test}: a reset stops the VM");
    let metrics = vm.metrics();
    eprintln!(
        "{test}: Vm::start to the first console byte {:?} us, to the reset {:?} ms",
        metrics.first_port_write_us, metrics.guest_reset_ms
    );
    vm.shutdown().unwrap();
    let summary = vm.linux_summary().expect("a Linux guest has a summary");
    let (start, end) = summary.initramfs.expect("the initramfs was loaded");
    assert_eq!(end - start, b"initramfs-bytes".len() as u64);
    assert_eq!(start % 4096, 0, "{test}: the initramfs is page-aligned");
    assert!(end <= 64 * MIB, "{test}: the initramfs is inside RAM");
    let cause = metrics.guest_reset.expect("a reset is recorded").cause;
    Some((std::fs::read_to_string(&console_path).unwrap(), cause))
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-linux-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_bzimage_gets_its_zero_page_command_line_and_initramfs() {
    assert_boots("bzimage", bzimage().unwrap());
}

#[test]
fn a_pvh_kernel_gets_its_start_info_command_line_and_module() {
    assert_boots("pvh", pvh_elf().unwrap());
}

#[test]
fn a_triple_fault_is_reported_as_a_crash_with_the_vcpus_registers() {
    let dir = temp_dir("triple-fault");
    let (image, faulting_rip) = triple_fault_bzimage().unwrap();
    if let Some((console, cause)) = boot("triple-fault", &dir, image) {
        assert_eq!(console, "T", "the crashing stand-in ran");
        let ResetCause::TripleFault { vcpu, state } = &cause else {
            panic!("a triple fault was reported as {cause:?}");
        };
        assert!(!cause.is_requested(), "a triple fault is a crash");
        assert_eq!(*vcpu, 0);
        assert_eq!(
            state.rip, faulting_rip,
            "RIP is the instruction that faulted"
        );
        assert_eq!(state.idt.1, 0, "the empty IDT the stand-in loaded");
        assert_eq!(
            state.rip_gpa,
            Some(faulting_rip),
            "identity-mapped boot page tables"
        );
        assert!(state.unreadable.is_empty(), "{:?}", state.unreadable);
        let text = cause.to_string();
        assert!(
            text.contains("triple-faulted") && text.contains(&format!("RIP {faulting_rip:#x}")),
            "{text}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn kernels_that_cannot_boot_are_refused_with_the_reason() {
    if gmem::testing::kvm_or_skip("refusals").is_none() {
        return;
    }
    let _one = one_vm_at_a_time();
    let dir = temp_dir("refusals");
    let not_a_kernel = dir.join("not-a-kernel");
    std::fs::write(&not_a_kernel, vec![0u8; 4096]).unwrap();
    let mut elf_without_note = pvh_elf().unwrap();
    elf_without_note[64 + 56] = 0; // PT_NOTE becomes PT_NULL
    let no_note = dir.join("no-note");
    std::fs::write(&no_note, elf_without_note).unwrap();
    let cases = [
        (dir.join("missing"), "cannot open the kernel"),
        (not_a_kernel, "not a kernel this VMM can boot"),
        (no_note, "without a PVH entry note"),
    ];
    for (kernel, expected) in cases {
        let config = VmConfig {
            mem_size: 64 * MIB,
            linux: Some(LinuxBoot {
                kernel,
                initramfs: None,
                cmdline: None,
                console: Some(dir.join("console")),
            }),
            ..VmConfig::default()
        };
        let err = Vm::start(config).expect_err(expected);
        let text = format!("{}: {}", err, std::error::Error::source(&err).unwrap());
        assert!(text.contains(expected), "{text:?} lacks {expected:?}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
