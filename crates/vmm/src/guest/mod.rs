//! The built-in guest: a memory checker that runs in 64-bit user mode on every vCPU.

pub mod abi;
pub mod asm;
pub mod cpu;
pub mod layout;

use gmem::memory::{GuestAddress, GuestMemory};

use crate::error::VmError;

/// Writes the system area — GDT, page tables, code — into guest memory of `mem_size`
/// bytes. The TSS and the stacks stay as the guest_memfd gives them: zero. A vCPU then
/// enters with [`cpu::long_mode_sregs`] and [`cpu::entry_regs`].
pub fn load(memory: &GuestMemory, mem_size: u64) -> Result<(), VmError> {
    let code = asm::workload(layout::CODE_GPA).map_err(VmError::AssembleGuest)?;
    debug_assert!(code.len() as u64 <= layout::CODE_MAX_BYTES);
    for (gpa, bytes) in [
        (layout::GDT_GPA, cpu::gdt()),
        (layout::PML4_GPA, layout::page_tables(mem_size)),
        (layout::CODE_GPA, code),
    ] {
        memory
            .write_guest(GuestAddress(gpa), &bytes)
            .map_err(VmError::LoadGuest)?;
    }
    Ok(())
}
