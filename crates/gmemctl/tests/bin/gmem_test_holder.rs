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
//! close (or its parent to die) before it exits.

use std::io::{BufRead, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;

use gmem::memory::{ChunkLayout, GmemFlags, GuestMemfd, GuestMemory, page_size};
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

fn main() {
    if let Err(e) = run() {
        eprintln!("gmem-test-holder: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let kvm = gmem::kvm::open(std::path::Path::new(gmem::kvm::DEFAULT_KVM_DEVICE))
        .map_err(|e| e.to_string())?;
    let vm = Arc::new(gmem::kvm::create_vm(&kvm).map_err(|e| e.to_string())?);
    let fail = |what: &'static str| move |e: gmem::memory::MemoryError| format!("{what}: {e}");

    let system = GuestMemory::create(
        Arc::clone(&vm),
        ChunkLayout::single_slot(SYSTEM_SIZE),
        GmemFlags::HOST_MAPPABLE,
    )
    .map_err(fail("system gmem"))?;
    let mem_size = DATA_GPA + DATA_SIZE;
    let code = asm::workload(layout::CODE_GPA).map_err(|e| format!("assembling: {e}"))?;
    let host_written = [
        (layout::GDT_GPA, cpu::gdt()),
        (layout::PML4_GPA, layout::page_tables(mem_size)),
        (layout::CODE_GPA, code),
    ];
    for (gpa, bytes) in &host_written {
        system.write_guest(*gpa, bytes).map_err(fail("loading"))?;
    }
    system.bind_to_vm().map_err(fail("system memslot"))?;

    let data_layout = ChunkLayout {
        base_gpa: DATA_GPA,
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
    for (index, (offset, pages)) in DATA_RUNS.iter().enumerate() {
        let index = index as u32;
        let kvm_err = |what: &'static str| move |e: kvm_ioctls::Error| format!("{what}: {e}");
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
        loop {
            match vcpu.run().map_err(kvm_err("KVM_RUN"))? {
                VcpuExit::IoOut(PORT_HELLO | PORT_MISMATCH, _) => {}
                VcpuExit::IoOut(PORT_SWEEP_DONE, data) => {
                    let mismatches = u32::from_le_bytes(data.try_into().unwrap_or([0xff; 4]));
                    if mismatches != 0 {
                        return Err(format!("vCPU {index}: {mismatches} mismatches"));
                    }
                    break;
                }
                other => return Err(format!("vCPU {index}: unexpected exit {other:?}")),
            }
        }
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
    {}
    Ok(())
}
