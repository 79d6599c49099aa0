//! The contract between the built-in guest and the VMM: entry registers, ports, the pattern.
//!
//! The guest talks to the VMM only with `out` instructions, each a VM exit. The common
//! report carries everything in its 32-bit data; the rare mismatch report leaves its 64-bit
//! details in registers, which the VMM reads with KVM_GET_REGS.

/// First `out` of every vCPU, before it touches its slice. Data: the vCPU index.
pub const PORT_HELLO: u16 = 0xE0;
/// End of a sweep (one write pass and one verify pass over the slice).
/// Data: the number of mismatching words the verify pass found.
pub const PORT_SWEEP_DONE: u16 = 0xE1;
/// One mismatching word. Data: its number within this sweep (1-based).
/// R8 = guest physical address, R9 = expected value, R10 = value found.
pub const PORT_MISMATCH: u16 = 0xE2;

/// Mismatches per sweep that get their own [`PORT_MISMATCH`] report; the rest are only
/// counted, so that a wholly lost chunk cannot flood the VMM with exits.
pub const MAX_DETAILED_MISMATCHES_PER_SWEEP: u32 = 8;

/// Odd 64-bit constant (2^64 / golden ratio) that spreads a generation number over all bits.
pub const GENERATION_MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15;

/// Entry registers: RDI = vCPU index, RSI = slice start (guest physical), RDX = slice
/// length in bytes. The slice is page-aligned and identity-mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryArgs {
    /// The vCPU's index.
    pub vcpu_index: u32,
    /// First byte of the slice the vCPU checks.
    pub slice_start: u64,
    /// Bytes in the slice.
    pub slice_len: u64,
}

/// The word the guest writes at guest physical address `gpa` in sweep `generation` (from 1):
/// the address itself — page index << 12 | word index << 3 — XOR a per-generation key. A
/// word copied from another address, left from another sweep, or zeroed never matches.
pub fn pattern(gpa: u64, generation: u64) -> u64 {
    gpa ^ generation.wrapping_mul(GENERATION_MULTIPLIER)
}
