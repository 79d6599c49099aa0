//! x86 bits both guests' entry states are made of: control-register and EFER flags, and the
//! GDT encoding of a segment.

use kvm_bindings::{kvm_segment, kvm_sregs};

/// CR0: protected mode, x87 present, native FPU errors, paging.
pub(crate) const CR0_PE: u64 = 1 << 0;
pub(crate) const CR0_ET: u64 = 1 << 4;
pub(crate) const CR0_NE: u64 = 1 << 5;
pub(crate) const CR0_PG: u64 = 1 << 31;
/// CR4: physical address extension, required for long mode.
pub(crate) const CR4_PAE: u64 = 1 << 5;
/// EFER: long mode enabled, and active.
pub(crate) const EFER_LME: u64 = 1 << 8;
pub(crate) const EFER_LMA: u64 = 1 << 10;
/// Bit 1 of RFLAGS is always set.
pub(crate) const RFLAGS_RESERVED: u64 = 1 << 1;

/// Turns on paging and long mode in `sregs`, with the page tables at `pml4`.
pub(crate) fn enter_long_mode(sregs: &mut kvm_sregs, pml4: u64) {
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
    sregs.cr3 = pml4;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// The 8-byte GDT descriptor of `segment`, from the same fields KVM caches, so the table in
/// memory and KVM_SET_SREGS cannot disagree. (A 64-bit system descriptor's upper half is a
/// separate entry.)
pub(crate) fn gdt_entry(segment: &kvm_segment) -> u64 {
    let limit = if segment.g == 1 {
        u64::from(segment.limit >> 12)
    } else {
        u64::from(segment.limit)
    };
    let access = (u64::from(segment.present) << 7)
        | (u64::from(segment.dpl) << 5)
        | (u64::from(segment.s) << 4)
        | u64::from(segment.type_);
    let flags =
        (u64::from(segment.g) << 3) | (u64::from(segment.db) << 2) | (u64::from(segment.l) << 1);
    (limit & 0xFFFF)
        | ((segment.base & 0xFF_FFFF) << 16)
        | (access << 40)
        | (((limit >> 16) & 0xF) << 48)
        | (flags << 52)
        | (((segment.base >> 24) & 0xFF) << 56)
}
