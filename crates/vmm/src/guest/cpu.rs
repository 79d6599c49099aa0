//! The vCPU state that starts the guest directly in 64-bit user mode (no firmware, no CPL0).
//!
//! Under PVM, CPL0 guest code is emulated instruction by instruction, while CPL3 long-mode
//! code runs natively. So the VMM does what a boot loader would, through KVM_SET_SREGS:
//! paging and long mode on, a 64-bit code segment with DPL 3, and IOPL 3 so `out` works.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use super::abi::EntryArgs;
use super::layout::{CODE_GPA, GDT_GPA, PML4_GPA, TSS_GPA, stack_top};
use crate::x86::{RFLAGS_RESERVED, enter_long_mode, gdt_entry};

/// I/O privilege level 3: `in`/`out` allowed at CPL3 without an I/O bitmap.
const RFLAGS_IOPL3: u64 = 3 << 12;

/// A segment, described once and rendered both as a GDT entry and as KVM's cached state, so
/// the two cannot disagree.
#[derive(Debug, Clone, Copy)]
struct Segment {
    gdt_index: u16,
    /// Descriptor type (the low 4 bits of the access byte).
    kind: u8,
    /// Code/data (true) or system (false) descriptor.
    code_or_data: bool,
    dpl: u8,
    base: u64,
    /// Limit in bytes minus one, after granularity scaling.
    limit: u32,
    long_mode: bool,
    default_32bit: bool,
}

/// Execute/read, accessed: the 64-bit user code segment.
const USER_CODE: Segment = Segment {
    gdt_index: 1,
    kind: 0xB,
    code_or_data: true,
    dpl: 3,
    base: 0,
    limit: u32::MAX,
    long_mode: true,
    default_32bit: false,
};
/// Read/write, accessed: the user data and stack segment. SS.DPL is what makes CPL 3.
const USER_DATA: Segment = Segment {
    gdt_index: 2,
    kind: 0x3,
    code_or_data: true,
    dpl: 3,
    base: 0,
    limit: u32::MAX,
    long_mode: false,
    default_32bit: true,
};
/// A busy 64-bit TSS (it takes two GDT slots).
const TASK_STATE: Segment = Segment {
    gdt_index: 3,
    kind: 0xB,
    code_or_data: false,
    dpl: 0,
    base: TSS_GPA,
    limit: 0x67,
    long_mode: false,
    default_32bit: false,
};

impl Segment {
    fn selector(&self) -> u16 {
        (self.gdt_index << 3) | u16::from(self.dpl)
    }

    /// Page granularity is needed for limits past 1 MiB.
    fn page_granular(&self) -> bool {
        self.limit > 0xF_FFFF
    }

    /// The 8-byte GDT descriptor (a system descriptor's upper half is a separate entry).
    fn descriptor(&self) -> u64 {
        gdt_entry(&self.to_kvm())
    }

    fn to_kvm(self) -> kvm_segment {
        kvm_segment {
            base: self.base,
            limit: self.limit,
            selector: self.selector(),
            type_: self.kind,
            present: 1,
            dpl: self.dpl,
            db: u8::from(self.default_32bit),
            s: u8::from(self.code_or_data),
            l: u8::from(self.long_mode),
            g: u8::from(self.page_granular()),
            avl: 0,
            unusable: 0,
            padding: 0,
        }
    }
}

/// The GDT to place at [`GDT_GPA`]: null, user code, user data, TSS (two entries).
pub fn gdt() -> Vec<u8> {
    let entries = [
        0,
        USER_CODE.descriptor(),
        USER_DATA.descriptor(),
        TASK_STATE.descriptor(),
        TASK_STATE.base >> 32,
    ];
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// Special registers for 64-bit CPL3 execution, on top of the vCPU's current ones.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    enter_long_mode(&mut sregs, PML4_GPA);
    sregs.cs = USER_CODE.to_kvm();
    let data = USER_DATA.to_kvm();
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = TASK_STATE.to_kvm();
    sregs.ldt = kvm_segment {
        unusable: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = (gdt().len() - 1) as u16;
    // No IDT: any exception becomes a triple fault, which KVM reports as a shutdown exit.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs
}

/// General registers at entry: the workload's arguments, its stack, and IOPL 3.
pub fn entry_regs(args: EntryArgs) -> kvm_regs {
    kvm_regs {
        rip: CODE_GPA,
        rsp: stack_top(args.vcpu_index),
        rflags: RFLAGS_RESERVED | RFLAGS_IOPL3,
        rdi: u64::from(args.vcpu_index),
        rsi: args.slice_start,
        rdx: args.slice_len,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_textbook_encodings() {
        assert_eq!(USER_CODE.descriptor(), 0x00AF_FB00_0000_FFFF);
        assert_eq!(USER_DATA.descriptor(), 0x00CF_F300_0000_FFFF);
        assert_eq!(TASK_STATE.descriptor(), 0x0000_8B00_1800_0067);
        assert_eq!(USER_CODE.selector(), 0x0B);
        assert_eq!(USER_DATA.selector(), 0x13);
    }
}
