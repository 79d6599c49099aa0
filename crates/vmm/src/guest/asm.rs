//! The workload, assembled from Rust with iced-x86: write a pattern, verify it, report, repeat.
//!
//! Runs at CPL3 in 64-bit mode (native speed under PVM; CPL0 would be emulated). It uses no
//! stack, no interrupts and no memory outside its slice, and talks to the VMM only through
//! `out` (allowed at CPL3 because RFLAGS.IOPL = 3).

use iced_x86::IcedError;
use iced_x86::code_asm::{
    CodeAssembler, eax, ebp, edi, r8, r9, r10, r11, r12, r12d, r13, r14, r15, rax, rbx, rcx, rdx,
    rsi,
};
use iced_x86::code_asm::{ptr, qword_ptr};

use super::abi::{
    GENERATION_MULTIPLIER, MAX_DETAILED_MISMATCHES_PER_SWEEP, PORT_HELLO, PORT_MISMATCH,
    PORT_SWEEP_DONE,
};

/// Machine code of the workload, to be placed at guest address `base` and entered there with
/// the registers of [`EntryArgs`](super::abi::EntryArgs).
///
/// Registers while it runs: R13/R14 slice start/end, R12 generation, R15 the generation
/// multiplier, R11 this generation's key, RBX the cursor, EBP mismatches in this sweep.
pub fn workload(base: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut next_sweep = a.create_label();
    let mut write_loop = a.create_label();
    let mut verify_loop = a.create_label();
    let mut verify_next = a.create_label();
    let mut mismatch = a.create_label();

    a.mov(r13, rsi)?;
    a.lea(r14, ptr(rsi + rdx))?;
    a.mov(r15, GENERATION_MULTIPLIER)?;
    a.xor(r12d, r12d)?;
    a.mov(eax, edi)?;
    a.out(u32::from(PORT_HELLO), eax)?;

    // A new generation: key = generation * multiplier, so pattern = address ^ key.
    a.set_label(&mut next_sweep)?;
    a.inc(r12)?;
    a.mov(r11, r12)?;
    a.imul_2(r11, r15)?;

    // Write pass: every 8-byte word of the slice gets its pattern.
    a.mov(rbx, r13)?;
    a.set_label(&mut write_loop)?;
    a.mov(rax, rbx)?;
    a.xor(rax, r11)?;
    a.mov(qword_ptr(rbx), rax)?;
    a.add(rbx, 8)?;
    a.cmp(rbx, r14)?;
    a.jb(write_loop)?;

    // Verify pass: recompute each word's pattern and compare with memory.
    a.xor(ebp, ebp)?;
    a.mov(rbx, r13)?;
    a.set_label(&mut verify_loop)?;
    a.mov(rax, rbx)?;
    a.xor(rax, r11)?;
    a.cmp(qword_ptr(rbx), rax)?;
    a.jne(mismatch)?;
    a.set_label(&mut verify_next)?;
    a.add(rbx, 8)?;
    a.cmp(rbx, r14)?;
    a.jb(verify_loop)?;

    // One report per sweep keeps exits rare: the count of mismatches in this sweep.
    a.mov(eax, ebp)?;
    a.out(u32::from(PORT_SWEEP_DONE), eax)?;
    a.jmp(next_sweep)?;

    // A mismatch: count it, and detail the first few (address, expected, found).
    a.set_label(&mut mismatch)?;
    a.inc(ebp)?;
    a.cmp(ebp, MAX_DETAILED_MISMATCHES_PER_SWEEP)?;
    a.ja(verify_next)?;
    a.mov(r8, rbx)?;
    a.mov(r9, rax)?;
    a.mov(r10, qword_ptr(rbx))?;
    a.mov(eax, ebp)?;
    a.out(u32::from(PORT_MISMATCH), eax)?;
    a.jmp(verify_next)?;

    a.assemble(base)
}

/// Machine code that only verifies: one pass over the slice, comparing every word with
/// its pattern of generation RCX (as [`workload`]'s sweep RCX wrote it), then one
/// [`PORT_SWEEP_DONE`] report with the mismatch count, then a spin the VMM never returns
/// to. Entered with the registers of [`EntryArgs`](super::abi::EntryArgs) plus RCX; a VMM
/// uses it to ask its guest whether memory it did not write in the meantime is intact.
pub fn verify_pass(base: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut verify_loop = a.create_label();
    let mut verify_next = a.create_label();
    let mut mismatch = a.create_label();
    let mut done = a.create_label();

    a.mov(r13, rsi)?;
    a.lea(r14, ptr(rsi + rdx))?;
    a.mov(r11, GENERATION_MULTIPLIER)?;
    a.imul_2(r11, rcx)?;
    a.xor(ebp, ebp)?;
    a.mov(rbx, r13)?;
    a.set_label(&mut verify_loop)?;
    a.mov(rax, rbx)?;
    a.xor(rax, r11)?;
    a.cmp(qword_ptr(rbx), rax)?;
    a.jne(mismatch)?;
    a.set_label(&mut verify_next)?;
    a.add(rbx, 8)?;
    a.cmp(rbx, r14)?;
    a.jb(verify_loop)?;
    a.mov(eax, ebp)?;
    a.out(u32::from(PORT_SWEEP_DONE), eax)?;
    a.set_label(&mut done)?;
    a.jmp(done)?;

    a.set_label(&mut mismatch)?;
    a.inc(ebp)?;
    a.jmp(verify_next)?;

    a.assemble(base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::layout::{CODE_GPA, CODE_MAX_BYTES};

    #[test]
    fn assembles_into_the_code_area() {
        let code = workload(CODE_GPA).unwrap();
        assert!(!code.is_empty());
        assert!(code.len() as u64 <= CODE_MAX_BYTES);
        // It starts with `mov r13, rsi` (REX.WB 89 /r).
        assert_eq!(&code[..3], &[0x49, 0x89, 0xf5]);
    }
}
