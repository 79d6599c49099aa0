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

use iced_x86::code_asm::{
    CodeAssembler, al, byte_ptr, dword_ptr, dx, eax, ebx, ecx, edi, esi, rdi, rsi,
};
use vmm::{LinuxBoot, Vm, VmConfig, VmState};

const MIB: u64 = 1 << 20;
const KERNEL_GPA: u64 = 0x10_0000;
const COM1: u32 = 0x3F8;
const I8042_COMMAND: u32 = 0x64;

/// One VM at a time (two cores).
fn one_vm_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where the pointers the stand-in prints live, per protocol.
#[derive(Clone, Copy)]
enum Protocol {
    /// RSI = zero page: cmd_line_ptr at 0x228, ramdisk_image/size at 0x218/0x21C,
    /// e820_entries at 0x1E8.
    Linux64,
    /// EBX = start_info: cmdline_paddr at 24, modlist_paddr at 16 (module paddr at 0, size at
    /// 8), memmap_entries at 48.
    Pvh,
}

/// The stand-in kernel's code: "<cmdline>|<initramfs bytes>|<memory map entries>", then a
/// reset through the keyboard controller.
fn stand_in(protocol: Protocol, base: u64) -> Vec<u8> {
    let bits = match protocol {
        Protocol::Linux64 => 64,
        Protocol::Pvh => 32,
    };
    let mut a = CodeAssembler::new(bits).unwrap();
    let mut cmdline_loop = a.create_label();
    let mut cmdline_done = a.create_label();
    let mut initrd_loop = a.create_label();
    let mut initrd_done = a.create_label();
    let mut halt = a.create_label();
    a.mov(dx, COM1).unwrap();
    match protocol {
        Protocol::Linux64 => a.mov(edi, dword_ptr(rsi + 0x228)).unwrap(),
        Protocol::Pvh => a.mov(edi, dword_ptr(ebx + 24)).unwrap(),
    }
    a.set_label(&mut cmdline_loop).unwrap();
    match protocol {
        Protocol::Linux64 => a.mov(al, byte_ptr(rdi)).unwrap(),
        Protocol::Pvh => a.mov(al, byte_ptr(edi)).unwrap(),
    }
    a.test(al, al).unwrap();
    a.jz(cmdline_done).unwrap();
    a.out(dx, al).unwrap();
    a.inc(edi).unwrap();
    a.jmp(cmdline_loop).unwrap();
    a.set_label(&mut cmdline_done).unwrap();
    a.mov(al, b'|' as u32).unwrap();
    a.out(dx, al).unwrap();
    match protocol {
        Protocol::Linux64 => {
            a.mov(edi, dword_ptr(rsi + 0x218)).unwrap();
            a.mov(ecx, dword_ptr(rsi + 0x21C)).unwrap();
        }
        Protocol::Pvh => {
            a.mov(esi, dword_ptr(ebx + 16)).unwrap();
            a.mov(edi, dword_ptr(esi)).unwrap();
            a.mov(ecx, dword_ptr(esi + 8)).unwrap();
        }
    }
    a.set_label(&mut initrd_loop).unwrap();
    a.test(ecx, ecx).unwrap();
    a.jz(initrd_done).unwrap();
    match protocol {
        Protocol::Linux64 => a.mov(al, byte_ptr(rdi)).unwrap(),
        Protocol::Pvh => a.mov(al, byte_ptr(edi)).unwrap(),
    }
    a.out(dx, al).unwrap();
    a.inc(edi).unwrap();
    a.dec(ecx).unwrap();
    a.jmp(initrd_loop).unwrap();
    a.set_label(&mut initrd_done).unwrap();
    a.mov(al, b'|' as u32).unwrap();
    a.out(dx, al).unwrap();
    match protocol {
        Protocol::Linux64 => a.movzx(eax, byte_ptr(rsi + 0x1E8)).unwrap(),
        Protocol::Pvh => a.mov(eax, dword_ptr(ebx + 48)).unwrap(),
    }
    a.add(al, b'0' as u32).unwrap();
    a.out(dx, al).unwrap();
    a.mov(al, 0xFE).unwrap();
    a.out(I8042_COMMAND, al).unwrap();
    a.set_label(&mut halt).unwrap();
    a.hlt().unwrap();
    a.jmp(halt).unwrap();
    a.assemble(base).unwrap()
}

fn put(image: &mut [u8], offset: usize, bytes: &[u8]) {
    image[offset..offset + bytes.len()].copy_from_slice(bytes);
}

/// A bzImage (boot protocol 2.15) whose protected-mode part is `hlt`s up to `startup_64` at
/// +0x200, where the stand-in code starts.
fn bzimage() -> Vec<u8> {
    let mut image = vec![0u8; 1024];
    image[0x1F1] = 1; // setup_sects: the boot sector plus one setup sector
    put(&mut image, 0x1FE, &0xAA55u16.to_le_bytes());
    put(&mut image, 0x202, b"HdrS");
    put(&mut image, 0x206, &0x020Fu16.to_le_bytes());
    image[0x211] = 0x01; // loadflags: LOADED_HIGH
    put(&mut image, 0x214, &(KERNEL_GPA as u32).to_le_bytes());
    put(&mut image, 0x22C, &0x37FF_FFFFu32.to_le_bytes()); // initrd_addr_max
    put(&mut image, 0x238, &2048u32.to_le_bytes()); // cmdline_size
    image.extend(std::iter::repeat_n(0xF4, 0x200));
    image.extend(stand_in(Protocol::Linux64, KERNEL_GPA + 0x200));
    image
}

/// An ELF64 executable with one PT_LOAD at 1 MiB and a PT_NOTE holding Xen's PHYS32_ENTRY.
fn pvh_elf() -> Vec<u8> {
    const PHDRS: usize = 64;
    const NOTE: usize = PHDRS + 2 * 56;
    const CODE: usize = 0x1000;
    let code = stand_in(Protocol::Pvh, KERNEL_GPA);
    let mut image = vec![0u8; CODE];
    put(&mut image, 0, b"\x7fELF\x02\x01\x01");
    put(&mut image, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut image, 18, &0x3Eu16.to_le_bytes()); // x86-64
    put(&mut image, 20, &1u32.to_le_bytes());
    put(&mut image, 24, &KERNEL_GPA.to_le_bytes()); // e_entry
    put(&mut image, 32, &(PHDRS as u64).to_le_bytes());
    put(&mut image, 52, &64u16.to_le_bytes());
    put(&mut image, 54, &56u16.to_le_bytes());
    put(&mut image, 56, &2u16.to_le_bytes());
    // PT_LOAD
    put(&mut image, PHDRS, &1u32.to_le_bytes());
    put(&mut image, PHDRS + 4, &5u32.to_le_bytes()); // R+X
    put(&mut image, PHDRS + 8, &(CODE as u64).to_le_bytes());
    put(&mut image, PHDRS + 16, &KERNEL_GPA.to_le_bytes());
    put(&mut image, PHDRS + 24, &KERNEL_GPA.to_le_bytes());
    put(&mut image, PHDRS + 32, &(code.len() as u64).to_le_bytes());
    put(&mut image, PHDRS + 40, &(code.len() as u64).to_le_bytes());
    // PT_NOTE: namesz 4, descsz 4, type 18, "Xen\0", entry
    let note_len = 12 + 4 + 4;
    put(&mut image, PHDRS + 56, &4u32.to_le_bytes());
    put(&mut image, PHDRS + 56 + 8, &(NOTE as u64).to_le_bytes());
    put(
        &mut image,
        PHDRS + 56 + 32,
        &(note_len as u64).to_le_bytes(),
    );
    put(&mut image, NOTE, &4u32.to_le_bytes());
    put(&mut image, NOTE + 4, &4u32.to_le_bytes());
    put(&mut image, NOTE + 8, &18u32.to_le_bytes());
    put(&mut image, NOTE + 12, b"Xen\0");
    put(&mut image, NOTE + 16, &(KERNEL_GPA as u32).to_le_bytes());
    image.extend(code);
    image
}

/// Boots `kernel` with an initramfs and a command line, waits for the guest's reset, and
/// returns the console text.
fn boot(test: &str, dir: &Path, kernel: Vec<u8>) -> Option<String> {
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
    vm.shutdown().unwrap();
    let summary = vm.linux_summary().expect("a Linux guest has a summary");
    let (start, end) = summary.initramfs.expect("the initramfs was loaded");
    assert_eq!(end - start, b"initramfs-bytes".len() as u64);
    assert_eq!(start % 4096, 0, "{test}: the initramfs is page-aligned");
    assert!(end <= 64 * MIB, "{test}: the initramfs is inside RAM");
    Some(std::fs::read_to_string(&console_path).unwrap())
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-linux-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_bzimage_gets_its_zero_page_command_line_and_initramfs() {
    let dir = temp_dir("bzimage");
    let Some(console) = boot("bzimage", &dir, bzimage()) else {
        return;
    };
    // Three e820 entries: low RAM, the reserved MP table, RAM from 1 MiB.
    assert_eq!(console, "console=ttyS0 gmemctl=yes|initramfs-bytes|3");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_pvh_kernel_gets_its_start_info_command_line_and_module() {
    let dir = temp_dir("pvh");
    let Some(console) = boot("pvh", &dir, pvh_elf()) else {
        return;
    };
    assert_eq!(console, "console=ttyS0 gmemctl=yes|initramfs-bytes|3");
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
    let mut elf_without_note = pvh_elf();
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
