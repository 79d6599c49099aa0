//! Before each run: proves the lab reads a dead kernel's registers, with a kernel that dies.
//!
//! The stand-in is a 72-byte multiboot image (QEMU's `-kernel` loads it at 1 MiB) that loads
//! an empty IDT and executes `int3`: the exception cannot be delivered, nor the #GP and #DF
//! that follow, so the CPU triple-faults at a known address. The check passes when
//! [`Machine::boot`] reports a triple fault with CPU 0's instruction pointer inside the
//! stand-in's code. A lab that misread a crash (as it once read SeaBIOS's own deliberate
//! triple fault after a warm reboot as the kernel's) fails here, not in a suite.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::emulator::Emulator;
use crate::qemu::{CpuCount, Machine, QemuError};

/// Where QEMU's multiboot loader puts the image, and so its first byte.
const LOAD_ADDRESS: u32 = 0x10_0000;
/// The entry point: the first instruction after the 32-byte multiboot header.
const ENTRY: u32 = LOAD_ADDRESS + 32;
/// The empty IDT's descriptor (limit 0, base 0).
const IDT_DESCRIPTOR: u32 = LOAD_ADDRESS + 64;
/// One past the stand-in's last instruction.
const CODE_END: u32 = ENTRY + 11;

/// The stand-in kernel: a multiboot header with load addresses (flag bit 16), then
/// `cli; lidt [IDT_DESCRIPTOR]; int3; jmp $`, then the descriptor.
fn triple_fault_kernel() -> Vec<u8> {
    const MAGIC: u32 = 0x1BAD_B002;
    const FLAGS: u32 = 1 << 16;
    let mut image = Vec::with_capacity(72);
    for word in [
        MAGIC,
        FLAGS,
        MAGIC.wrapping_add(FLAGS).wrapping_neg(),
        LOAD_ADDRESS, // header_addr
        LOAD_ADDRESS, // load_addr
        0,            // load_end_addr: the whole file
        0,            // bss_end_addr: none
        ENTRY,
    ] {
        image.extend_from_slice(&word.to_le_bytes());
    }
    image.extend_from_slice(&[0xfa, 0x0f, 0x01, 0x1d]); // cli; lidt [disp32]
    image.extend_from_slice(&IDT_DESCRIPTOR.to_le_bytes());
    image.extend_from_slice(&[0xcc, 0xeb, 0xfe]); // int3; jmp $
    image.resize(72, 0);
    image
}

/// The lab could not show that it catches a dead kernel's registers.
#[derive(Debug, Error)]
pub enum CrashCheckError {
    #[error("cannot write the crash check's stand-in kernel {path}")]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot boot the crash check's stand-in kernel")]
    Boot(#[source] QemuError),
    #[error(
        "the lab does not catch a crashed kernel's registers: a stand-in that triple-faults at \
         {ENTRY:#x}..{CODE_END:#x} was reported as: {0}"
    )]
    Missed(String),
}

/// Boots the stand-in with `qemu` in `dir` and checks the report; returns what it caught and
/// how long it took.
pub fn run(qemu: &Emulator, dir: &Path) -> Result<(String, Duration), CrashCheckError> {
    let kernel = dir.join("crash-check.bin");
    fs::write(&kernel, triple_fault_kernel()).map_err(|source| CrashCheckError::Write {
        path: kernel.clone(),
        source,
    })?;
    let machine = Machine {
        qemu: qemu.clone(),
        kernel: kernel.clone(),
        // Multiboot takes -initrd as its module list; the image serves as one.
        initrd: kernel.clone(),
        append: "crash-check".into(),
        node_mib: 32,
        cpus: CpuCount::DEFAULT,
        hotplug_dimm_mib: None,
        timeout: Duration::from_secs(60),
        serial_log: dir.join("crash-check-serial.log"),
        qemu_log: dir.join("crash-check-qemu.log"),
        reset_log: dir.join("crash-check-reset.log"),
        qmp_socket: dir.join("crash-check-qmp.sock"),
        cpu_state_log: dir.join("crash-check-cpu-state.log"),
    };
    let start = Instant::now();
    let boot = machine.boot(|_| false).map_err(CrashCheckError::Boot)?;
    let took = start.elapsed();
    let stop = boot.stop.ok_or_else(|| {
        CrashCheckError::Missed(if boot.timed_out {
            "no stop before the timeout".into()
        } else {
            "QEMU exited without a stop".into()
        })
    })?;
    let caught = stop.to_string();
    let ip = stop
        .cpus
        .first()
        .and_then(|c| c.split_whitespace().find(|w| w.starts_with("EIP=")))
        .and_then(|w| u32::from_str_radix(&w[4..], 16).ok());
    if !stop.triple_fault || !ip.is_some_and(|ip| (ENTRY..CODE_END).contains(&ip)) {
        return Err(CrashCheckError::Missed(caught));
    }
    for log in [
        &machine.kernel,
        &machine.serial_log,
        &machine.qemu_log,
        &machine.reset_log,
        &machine.cpu_state_log,
    ] {
        let _ = fs::remove_file(log);
    }
    Ok((caught, took))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stand_in_is_a_multiboot_image_whose_code_faults_where_expected() {
        let image = triple_fault_kernel();
        let word = |i: usize| u32::from_le_bytes(image[i..i + 4].try_into().unwrap());
        assert_eq!(word(0), 0x1BAD_B002);
        assert_eq!(word(0).wrapping_add(word(4)).wrapping_add(word(8)), 0);
        assert_eq!(word(28), ENTRY);
        let code = (ENTRY - LOAD_ADDRESS) as usize;
        assert_eq!(image[code..code + 4], [0xfa, 0x0f, 0x01, 0x1d]);
        assert_eq!(word(code + 4), IDT_DESCRIPTOR);
        assert_eq!(image[code + 8], 0xcc);
        let idt = (IDT_DESCRIPTOR - LOAD_ADDRESS) as usize;
        assert_eq!(image[idt..idt + 6], [0; 6]);
        assert_eq!(image.len(), 72);
    }
}
