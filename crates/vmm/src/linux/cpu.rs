//! vCPU state at a Linux kernel's entry: segments, page tables, CPUID, local APIC pins.
//!
//! The 64-bit boot protocol wants long mode with flat 64-bit code at selector 0x10 and data
//! at 0x18, paging that identity-maps the kernel, and RSI pointing at the zero page. PVH
//! wants 32-bit protected mode without paging, with EBX pointing at start_info.

use kvm_bindings::{CpuId, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};

use super::loader::Entry;
use crate::x86::{CR0_ET, CR0_NE, CR0_PE, RFLAGS_RESERVED, enter_long_mode, gdt_entry};

/// The boot GDT: null, null, code (0x10), data (0x18), TSS (0x20, two slots).
pub(crate) const GDT_GPA: u64 = 0x500;
/// The kernel's first stack, below the page tables.
const BOOT_STACK_TOP: u64 = 0x8FF0;
/// Identity page tables for the first GiB: PML4, PDPT, one page directory of 2 MiB pages.
pub(crate) const PML4_GPA: u64 = 0x9000;
const PDPT_GPA: u64 = 0xA000;
const PD_GPA: u64 = 0xB000;

const CODE_SELECTOR: u16 = 0x10;
const DATA_SELECTOR: u16 = 0x18;
const TSS_SELECTOR: u16 = 0x20;

const PAGE_PRESENT_WRITABLE: u64 = 0b11;
const PAGE_HUGE: u64 = 1 << 7;

/// A flat kernel segment (DPL 0): `kind` is the descriptor type, `long` selects 64-bit code.
fn flat_segment(selector: u16, kind: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector,
        type_: kind,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        ..Default::default()
    }
}

/// A busy TSS at base 0: KVM (VMX) wants a usable task register; Linux loads its own.
fn boot_tss() -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0x67,
        selector: TSS_SELECTOR,
        type_: 0xB,
        present: 1,
        ..Default::default()
    }
}

/// The segments a protocol enters with: (code, data).
fn segments(long: bool) -> (kvm_segment, kvm_segment) {
    (
        flat_segment(CODE_SELECTOR, 0xB, long),
        flat_segment(DATA_SELECTOR, 0x3, false),
    )
}

/// The boot GDT's bytes, matching the segments of [`entry_sregs`].
pub(crate) fn gdt(entry: Entry) -> Vec<u8> {
    let (code, data) = segments(matches!(entry, Entry::Linux64 { .. }));
    let entries = [
        0,
        0,
        gdt_entry(&code),
        gdt_entry(&data),
        gdt_entry(&boot_tss()),
        0,
    ];
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// Identity page tables for the first GiB (2 MiB pages), as (address, bytes) writes.
pub(crate) fn page_tables() -> Vec<(u64, Vec<u8>)> {
    let pml4 = (PDPT_GPA | PAGE_PRESENT_WRITABLE).to_le_bytes().to_vec();
    let pdpt = (PD_GPA | PAGE_PRESENT_WRITABLE).to_le_bytes().to_vec();
    let pd = (0..512u64)
        .flat_map(|i| ((i << 21) | PAGE_PRESENT_WRITABLE | PAGE_HUGE).to_le_bytes())
        .collect();
    vec![(PML4_GPA, pml4), (PDPT_GPA, pdpt), (PD_GPA, pd)]
}

/// Special registers at the kernel's entry, on top of the vCPU's reset state.
pub(crate) fn entry_sregs(mut sregs: kvm_sregs, entry: Entry) -> kvm_sregs {
    let long = matches!(entry, Entry::Linux64 { .. });
    let (code, data) = segments(long);
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = boot_tss();
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = (gdt(entry).len() - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    if long {
        enter_long_mode(&mut sregs, PML4_GPA);
    } else {
        sregs.cr0 = CR0_PE | CR0_ET | CR0_NE;
        sregs.cr3 = 0;
        sregs.cr4 = 0;
        sregs.efer = 0;
    }
    sregs
}

/// General registers at the kernel's entry (interrupts off).
pub(crate) fn entry_regs(entry: Entry) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rsp: BOOT_STACK_TOP,
        rbp: BOOT_STACK_TOP,
        ..Default::default()
    };
    match entry {
        Entry::Linux64 { rip, zero_page } => {
            regs.rip = rip;
            regs.rsi = zero_page;
        }
        Entry::Pvh { eip, start_info } => {
            regs.rip = eip;
            regs.rbx = start_info;
        }
    }
    regs
}

/// KVM's supported CPUID, told which vCPU it runs on: the initial APIC ID in leaf 1 and the
/// x2APIC ID of the topology leaves, so Linux matches each CPU to its MP table or MADT entry.
pub(crate) fn vcpu_cpuid(supported: &CpuId, index: u32) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => entry.ebx = (entry.ebx & 0x00FF_FFFF) | ((index & 0xFF) << 24),
            0xB | 0x1F => entry.edx = index,
            _ => {}
        }
    }
    cpuid
}

/// Local APIC register offsets and the delivery modes of the LINT pins.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0b100;
const APIC_MODE_EXTINT: u32 = 0b111;

/// Wires LINT0 to the 8259 (ExtINT) and LINT1 to NMI, as firmware would, so timer
/// interrupts reach the boot CPU before Linux has set up the IOAPIC.
pub(crate) fn wire_lint_pins(mut lapic: kvm_lapic_state) -> kvm_lapic_state {
    for (offset, mode) in [
        (APIC_LVT_LINT0, APIC_MODE_EXTINT),
        (APIC_LVT_LINT1, APIC_MODE_NMI),
    ] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !(0b111 << 8)) | (mode << 8);
        for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
            lapic.regs[offset + i] = byte as _;
        }
    }
    lapic
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_textbook_encodings() {
        let (code64, data) = segments(true);
        assert_eq!(gdt_entry(&code64), 0x00AF_9B00_0000_FFFF);
        assert_eq!(gdt_entry(&data), 0x00CF_9300_0000_FFFF);
        let (code32, _) = segments(false);
        assert_eq!(gdt_entry(&code32), 0x00CF_9B00_0000_FFFF);
        assert_eq!(gdt_entry(&boot_tss()), 0x0000_8B00_0000_0067);
    }

    #[test]
    fn page_tables_map_the_first_gib_one_to_one() {
        let tables = page_tables();
        let pd = &tables[2].1;
        let entry = |i: usize| u64::from_le_bytes(pd[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(entry(0), PAGE_PRESENT_WRITABLE | PAGE_HUGE);
        assert_eq!(entry(511), (511 << 21) | PAGE_PRESENT_WRITABLE | PAGE_HUGE);
        const _: () = assert!(BOOT_STACK_TOP < PML4_GPA);
    }

    #[test]
    fn lint_pins_get_extint_and_nmi() {
        let lapic = wire_lint_pins(kvm_lapic_state::default());
        assert_eq!(lapic.regs[APIC_LVT_LINT0 + 1] as u8 & 0b111, 0b111);
        assert_eq!(lapic.regs[APIC_LVT_LINT1 + 1] as u8 & 0b111, 0b100);
    }
}
