//! A test VMM, as the kernel's KVM selftests build one, whose guest writes gmem pages that
//! this process never maps: the foreign process `gmemctl status PID` tests look into.
//!
//! It creates a VM with three guest_memfd files:
//! - system (2 MiB at guest address 0, slot 0): GDT, page tables and the built-in guest's
//!   code, which this process writes through its own mapping, like any VMM loading a guest;
//! - data (8 MiB at guest address 2 MiB, slot 1): mapped here (for the memslot) but never
//!   touched; vCPU i writes and verifies one sweep over `DATA_RUNS[i]` only;
//! - hidden (2 MiB, no MMAP flag, no memslot): a gmem the host cannot map.
//!
//! Once every vCPU has reported a clean sweep it stops running them, prints one JSON line
//! (`{"ready": ...}`) with the descriptors and what was written, and waits for stdin to
//! close (or its parent to die) before it exits. Each `verify` line on stdin makes every
//! vCPU run a verify-only pass over its run (no write first), and the guest's mismatch
//! counts come back as one line, `{"verified": {"mismatches": N, "per_vcpu": [...]}}`: so
//! a test can ask the guest itself whether memory moved under it is intact.
//!
//! With `GMEM_TEST_HOLDER_OPEN=PATH[,PATH...]` it also holds those files open (O_PATH,
//! which needs no driver behind a device node) for as long as it runs: a stand-in for a
//! VMM's vhost or VFIO devices.

use std::io::{BufRead, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use gmem::memory::{ChunkLayout, GmemFlags, GuestAddress, GuestMemfd, GuestMemory, page_size};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::VcpuExit;
use vmm::guest::abi::{EntryArgs, PORT_HELLO, PORT_MISMATCH, PORT_SWEEP_DONE};
use vmm::guest::{asm, cpu, layout};

const MIB: u64 = 1 << 20;
const SYSTEM_SIZE: u64 = 2 * MIB;
const DATA_GPA: u64 = SYSTEM_SIZE;
const DATA_SIZE: u64 = 8 * MIB;
const HIDDEN_SIZE: u64 = 2 * MIB;
/// (gmem offset, pages) of the data gmem that vCPU i writes: two runs with holes around.
const DATA_RUNS: [(u64, u64); 2] = [(MIB, 300), (5 * MIB + 3 * 4096, 77)];
/// Where the verify-only guest code goes: the second half of the code area.
const VERIFY_GPA: u64 = layout::CODE_GPA + layout::CODE_MAX_BYTES / 2;
/// The generation the one write-and-verify sweep used (the workload counts from 1).
const WRITTEN_GENERATION: u64 = 1;

fn main() {
    if let Err(e) = run() {
        eprintln!("gmem-test-holder: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let _held: Vec<std::fs::File> = match std::env::var("GMEM_TEST_HOLDER_OPEN") {
        Ok(paths) => paths
            .split(',')
            .map(|path| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_PATH)
                    .open(path)
                    .map_err(|e| format!("opening {path}: {e}"))
            })
            .collect::<Result<_, _>>()?,
        Err(_) => Vec::new(),
    };
    let kvm = gmem::sys::kvm::open(std::path::Path::new(gmem::sys::kvm::DEFAULT_KVM_DEVICE))
        .map_err(|e| e.to_string())?;
    let vm = Arc::new(gmem::sys::kvm::create_vm(&kvm).map_err(|e| e.to_string())?);
    let fail = |what: &'static str| move |e: gmem::memory::MemoryError| format!("{what}: {e}");

    let system = GuestMemory::create(
        Arc::clone(&vm),
        ChunkLayout::single_slot(SYSTEM_SIZE),
        GmemFlags::HOST_MAPPABLE,
    )
    .map_err(fail("system gmem"))?;
    let mem_size = DATA_GPA + DATA_SIZE;
    let code = asm::workload(layout::CODE_GPA).map_err(|e| format!("assembling: {e}"))?;
    let verify = asm::verify_pass(VERIFY_GPA).map_err(|e| format!("assembling: {e}"))?;
    let host_written = [
        (layout::GDT_GPA, cpu::gdt()),
        (layout::PML4_GPA, layout::page_tables(mem_size)),
        (layout::CODE_GPA, code),
        (VERIFY_GPA, verify),
    ];
    for (gpa, bytes) in &host_written {
        system
            .write_guest(GuestAddress(*gpa), bytes)
            .map_err(fail("loading"))?;
    }
    system.bind_to_vm().map_err(fail("system memslot"))?;

    let data_layout = ChunkLayout {
        base_gpa: GuestAddress(DATA_GPA),
        first_slot: 1,
        ..ChunkLayout::single_slot(DATA_SIZE)
    };
    let data = GuestMemory::create(Arc::clone(&vm), data_layout, GmemFlags::HOST_MAPPABLE)
        .map_err(fail("data gmem"))?;
    data.bind_to_vm().map_err(fail("data memslot"))?;
    let hidden = GuestMemfd::create(&vm, HIDDEN_SIZE, GmemFlags::NONE).map_err(fail("hidden"))?;

    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
    let kvm_err = |what: &'static str| move |e: kvm_ioctls::Error| format!("{what}: {e}");
    let mut vcpus = Vec::new();
    for (index, (offset, pages)) in DATA_RUNS.iter().enumerate() {
        let index = index as u32;
        let mut vcpu = vm
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&cpu::long_mode_sregs(sregs))
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&cpu::entry_regs(EntryArgs {
            vcpu_index: index,
            slice_start: DATA_GPA + offset,
            slice_len: pages * page_size(),
        }))
        .map_err(kvm_err("KVM_SET_REGS"))?;
        // One sweep: the guest writes every word of its run, verifies it, and reports.
        let mismatches = run_one_sweep(&mut vcpu, index)?;
        if mismatches != 0 {
            return Err(format!("vCPU {index}: {mismatches} mismatches"));
        }
        vcpus.push(vcpu);
    }

    let page = page_size();
    let host_pages: u64 = host_written
        .iter()
        .map(|(gpa, bytes)| (gpa + bytes.len() as u64).div_ceil(page) - gpa / page)
        .sum();
    let ready = serde_json::json!({
        "ready": {
            "pid": std::process::id(),
            "system": {
                "fd": system.gmem().as_fd().as_raw_fd(),
                "size": SYSTEM_SIZE,
                "host_written_pages": host_pages,
                "mapping": system.mapping().map_err(fail("system"))?.addr(),
            },
            "data": {
                "fd": data.gmem().as_fd().as_raw_fd(),
                "size": DATA_SIZE,
                "guest_written": DATA_RUNS
                    .iter()
                    .map(|(offset, pages)| serde_json::json!({"offset": offset, "pages": pages}))
                    .collect::<Vec<_>>(),
                "mapping": data.mapping().map_err(fail("data"))?.addr(),
            },
            "hidden": {"fd": hidden.as_fd().as_raw_fd(), "size": HIDDEN_SIZE},
        }
    });
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{ready}").map_err(|e| e.to_string())?;
    stdout.flush().map_err(|e| e.to_string())?;
    drop(stdout);
    // Hold everything until the test is done with us: it closes our stdin.
    let mut line = String::new();
    while std::io::stdin()
        .lock()
        .read_line(&mut line)
        .is_ok_and(|n| n > 0)
    {
        if line.trim() == "verify" {
            let mut per_vcpu = Vec::new();
            for (index, (vcpu, (offset, pages))) in vcpus.iter_mut().zip(DATA_RUNS).enumerate() {
                let index = index as u32;
                let mut regs = cpu::entry_regs(EntryArgs {
                    vcpu_index: index,
                    slice_start: DATA_GPA + offset,
                    slice_len: pages * page_size(),
                });
                regs.rip = VERIFY_GPA;
                regs.rcx = WRITTEN_GENERATION;
                vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
                per_vcpu.push(run_one_sweep(vcpu, index)?);
            }
            let verified = serde_json::json!({"verified": {
                "mismatches": per_vcpu.iter().map(|&m| u64::from(m)).sum::<u64>(),
                "per_vcpu": per_vcpu,
            }});
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "{verified}").map_err(|e| e.to_string())?;
            stdout.flush().map_err(|e| e.to_string())?;
        }
        line.clear();
    }
    Ok(())
}

/// Runs the vCPU until its guest reports the end of a sweep; returns the mismatch count.
fn run_one_sweep(vcpu: &mut kvm_ioctls::VcpuFd, index: u32) -> Result<u32, String> {
    loop {
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            // A stop and continue (gmemctl migrate --pid) interrupts KVM_RUN: run on.
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(format!("vCPU {index}: KVM_RUN: {e}")),
        };
        match exit {
            VcpuExit::IoOut(PORT_HELLO | PORT_MISMATCH, _) => {}
            VcpuExit::IoOut(PORT_SWEEP_DONE, data) => {
                return Ok(u32::from_le_bytes(data.try_into().unwrap_or([0xff; 4])));
            }
            other => return Err(format!("vCPU {index}: unexpected exit {other:?}")),
        }
    }
}
