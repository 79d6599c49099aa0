//! Stand-in kernels: a bzImage and a PVH ELF whose few hundred instructions, assembled here,
//! print what the VMM handed them on the serial console and then reset through the i8042.
//!
//! They prove a Linux guest's boot path (linux-loader's placement, the zero page or
//! start_info, the entry state, the memory map, the console and the reset) on hosts where a
//! real kernel cannot boot, such as PVM's, which emulates every CPL0 instruction: these few
//! run there in well under a second. The console shows
//! `<cmdline>|<initramfs bytes>` followed by [`EXPECTED_CONSOLE_TAIL`]. A third one crashes
//! on purpose (a triple fault), for the VMM's crash report.

use iced_x86::code_asm::{
    CodeAssembler, al, byte_ptr, dword_ptr, dx, eax, ebx, ecx, edi, edx, esi, ptr, rdi, rsi,
};
use iced_x86::{BlockEncoderOptions, IcedError};

/// What follows the initramfs bytes on the console: "|", the number of memory-map entries
/// (4: low RAM, the reserved MP table, the reserved ACPI tables, RAM from 1 MiB), "|", the
/// signature found at the RSDP pointer (zero page `acpi_rsdp_addr`, or PVH `rsdp_paddr`),
/// then "A" for a local APIC in CPUID.
pub const EXPECTED_CONSOLE_TAIL: &str = "|4|RSD PTR A";

const KERNEL_GPA: u64 = 0x10_0000;
const COM1: u32 = 0x3F8;
const I8042_COMMAND: u32 = 0x64;

/// Where the pointers the stand-in prints live, per protocol.
#[derive(Debug, Clone, Copy)]
enum Protocol {
    /// RSI = zero page: cmd_line_ptr at 0x228, ramdisk_image/size at 0x218/0x21C,
    /// e820_entries at 0x1E8, acpi_rsdp_addr at 0x70.
    Linux64,
    /// EBX = start_info: cmdline_paddr at 24, modlist_paddr at 16 (module paddr at 0, size at
    /// 8), rsdp_paddr at 32, memmap_entries at 48.
    Pvh,
}

/// The stand-in kernel's code: "<cmdline>|<initramfs bytes>|<memory map entries>", then "A"
/// if CPUID shows a local APIC ("N" if not), then a reset through the keyboard controller.
fn stand_in(protocol: Protocol, base: u64) -> Result<Vec<u8>, IcedError> {
    let bits = match protocol {
        Protocol::Linux64 => 64,
        Protocol::Pvh => 32,
    };
    let mut a = CodeAssembler::new(bits)?;
    let mut cmdline_loop = a.create_label();
    let mut cmdline_done = a.create_label();
    let mut initrd_loop = a.create_label();
    let mut initrd_done = a.create_label();
    let mut halt = a.create_label();
    a.mov(dx, COM1)?;
    match protocol {
        Protocol::Linux64 => a.mov(edi, dword_ptr(rsi + 0x228))?,
        Protocol::Pvh => a.mov(edi, dword_ptr(ebx + 24))?,
    }
    a.set_label(&mut cmdline_loop)?;
    load_byte(&mut a, protocol)?;
    a.test(al, al)?;
    a.jz(cmdline_done)?;
    a.out(dx, al)?;
    a.inc(edi)?;
    a.jmp(cmdline_loop)?;
    a.set_label(&mut cmdline_done)?;
    print_separator(&mut a)?;
    match protocol {
        Protocol::Linux64 => {
            a.mov(edi, dword_ptr(rsi + 0x218))?;
            a.mov(ecx, dword_ptr(rsi + 0x21C))?;
        }
        Protocol::Pvh => {
            a.mov(esi, dword_ptr(ebx + 16))?;
            a.mov(edi, dword_ptr(esi))?;
            a.mov(ecx, dword_ptr(esi + 8))?;
        }
    }
    a.set_label(&mut initrd_loop)?;
    a.test(ecx, ecx)?;
    a.jz(initrd_done)?;
    load_byte(&mut a, protocol)?;
    a.out(dx, al)?;
    a.inc(edi)?;
    a.dec(ecx)?;
    a.jmp(initrd_loop)?;
    a.set_label(&mut initrd_done)?;
    print_separator(&mut a)?;
    match protocol {
        Protocol::Linux64 => a.movzx(eax, byte_ptr(rsi + 0x1E8))?,
        Protocol::Pvh => a.mov(eax, dword_ptr(ebx + 48))?,
    }
    a.add(al, b'0' as u32)?;
    a.out(dx, al)?;
    // "|" and the 8-byte signature at the RSDP pointer the protocol handed over.
    print_separator(&mut a)?;
    match protocol {
        Protocol::Linux64 => a.mov(edi, dword_ptr(rsi + 0x70))?,
        Protocol::Pvh => a.mov(edi, dword_ptr(ebx + 32))?,
    }
    a.mov(ecx, 8u32)?;
    let mut signature_loop = a.create_label();
    a.set_label(&mut signature_loop)?;
    load_byte(&mut a, protocol)?;
    a.out(dx, al)?;
    a.inc(edi)?;
    a.dec(ecx)?;
    a.jnz(signature_loop)?;
    // "A" if CPUID says there is a local APIC, "N" if not.
    let mut no_apic = a.create_label();
    a.mov(eax, 1u32)?;
    a.cpuid()?;
    a.mov(al, b'N' as u32)?;
    a.test(edx, 1u32 << 9)?;
    a.jz(no_apic)?;
    a.mov(al, b'A' as u32)?;
    a.set_label(&mut no_apic)?;
    a.mov(dx, COM1)?;
    a.out(dx, al)?;
    a.mov(al, 0xFE)?;
    a.out(I8042_COMMAND, al)?;
    a.set_label(&mut halt)?;
    a.hlt()?;
    a.jmp(halt)?;
    a.assemble(base)
}

/// `mov al, [rdi]` (64-bit) or `mov al, [edi]` (32-bit): the next byte to print.
fn load_byte(a: &mut CodeAssembler, protocol: Protocol) -> Result<(), IcedError> {
    match protocol {
        Protocol::Linux64 => a.mov(al, byte_ptr(rdi)),
        Protocol::Pvh => a.mov(al, byte_ptr(edi)),
    }
}

/// Prints "|" (DX holds the serial port).
fn print_separator(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(al, b'|' as u32)?;
    a.out(dx, al)
}

fn put(image: &mut [u8], offset: usize, bytes: &[u8]) {
    image[offset..offset + bytes.len()].copy_from_slice(bytes);
}

/// A crashing kernel: it prints "T", loads an empty IDT and executes `ud2`. The #UD finds
/// no gate, nor does the #GP that follows, nor the #DF: a triple fault (KVM_EXIT_SHUTDOWN).
/// Returns the code and the address of its `ud2`.
fn triple_fault(base: u64) -> Result<(Vec<u8>, u64), IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut empty_idt = a.create_label();
    let mut faulting = a.create_label();
    a.mov(dx, COM1)?;
    a.mov(al, b'T' as u32)?;
    a.out(dx, al)?;
    a.lidt(ptr(empty_idt))?;
    a.set_label(&mut faulting)?;
    a.ud2()?;
    a.set_label(&mut empty_idt)?;
    a.db(&[0u8; 10])?;
    let assembled =
        a.assemble_options(base, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    let rip = assembled.label_ip(&faulting)?;
    Ok((assembled.inner.code_buffer, rip))
}

/// A bzImage (boot protocol 2.15) whose protected-mode part is `hlt`s up to `startup_64` at
/// +0x200, where the stand-in code starts.
pub fn bzimage() -> Result<Vec<u8>, IcedError> {
    bzimage_around(stand_in(Protocol::Linux64, KERNEL_GPA + 0x200)?)
}

/// A bzImage that triple-faults right after printing "T", and the guest address of the
/// instruction that faults.
pub fn triple_fault_bzimage() -> Result<(Vec<u8>, u64), IcedError> {
    let (code, rip) = triple_fault(KERNEL_GPA + 0x200)?;
    Ok((bzimage_around(code)?, rip))
}

/// A bzImage around `startup_64`'s code.
fn bzimage_around(startup_64: Vec<u8>) -> Result<Vec<u8>, IcedError> {
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
    image.extend(startup_64);
    Ok(image)
}

/// An ELF64 executable with one PT_LOAD at 1 MiB and a PT_NOTE holding Xen's PHYS32_ENTRY.
pub fn pvh_elf() -> Result<Vec<u8>, IcedError> {
    const PHDRS: usize = 64;
    const NOTE: usize = PHDRS + 2 * 56;
    const CODE: usize = 0x1000;
    let code = stand_in(Protocol::Pvh, KERNEL_GPA)?;
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
    Ok(image)
}
