//! Where the built-in guest keeps its tables, code and stacks, and which RAM each vCPU checks.
//!
//! The first 2 MiB of guest RAM are the reserved system area; the workload never touches
//! them. Everything above is split into one slice per vCPU.

use crate::config::GUEST_PAGE_BYTES;

/// The reserved system area: guest physical `0..RESERVED_BYTES`.
pub const RESERVED_BYTES: u64 = 2 << 20;
/// Global descriptor table (see `cpu.rs` for its entries).
pub const GDT_GPA: u64 = 0x1000;
/// The 64-bit TSS the task register points at (all zero: the guest never changes
/// privilege level, so nothing reads it).
pub const TSS_GPA: u64 = 0x1800;
/// Page-map level 4: one entry, for the first 512 GiB.
pub const PML4_GPA: u64 = 0x2000;
/// Page-directory-pointer table: one entry per GiB of RAM.
pub const PDPT_GPA: u64 = 0x3000;
/// Page directories, one 4 KiB page per GiB, right after the PDPT.
pub const PD_GPA: u64 = 0x4000;
/// Page directories that fit below [`CODE_GPA`].
const MAX_PAGE_DIRECTORIES: u64 = 64;
/// The largest guest RAM the page tables cover.
pub const MAX_GUEST_BYTES: u64 = MAX_PAGE_DIRECTORIES << 30;
/// The workload code.
pub const CODE_GPA: u64 = 0x10_0000;
/// Room for the code.
pub const CODE_MAX_BYTES: u64 = 0x1_0000;
/// Per-vCPU stacks, one page each, growing down from the end of each page.
pub const STACKS_GPA: u64 = 0x18_0000;
/// Bytes per stack.
pub const STACK_BYTES: u64 = 0x1000;
/// vCPUs that get a stack in the system area.
pub const MAX_VCPUS: u32 = 64;

const _: () = assert!(PD_GPA + MAX_PAGE_DIRECTORIES * 0x1000 <= CODE_GPA);
const _: () = assert!(CODE_GPA + CODE_MAX_BYTES <= STACKS_GPA);
const _: () = assert!(STACKS_GPA + MAX_VCPUS as u64 * STACK_BYTES <= RESERVED_BYTES);

/// Page-table entry bits.
const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
/// User/supervisor: the guest runs at CPL3, so every level must allow user access.
const USER: u64 = 1 << 2;
/// In a page-directory entry: maps a 2 MiB page instead of pointing at a page table.
const HUGE_PAGE: u64 = 1 << 7;

/// A range of guest RAM one vCPU writes and verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    /// Guest physical address of the first byte (page-aligned).
    pub start: u64,
    /// Length in bytes (a whole number of pages).
    pub len: u64,
}

impl Slice {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// Splits the workload area (`RESERVED_BYTES..mem_size`) into `vcpus` page-aligned slices;
/// the last one takes the remainder.
pub fn vcpu_slices(mem_size: u64, vcpus: u32) -> Vec<Slice> {
    let page = gmem::memory::page_size();
    let workload = mem_size - RESERVED_BYTES;
    let per_vcpu = workload / u64::from(vcpus) / page * page;
    (0..u64::from(vcpus))
        .map(|i| {
            let start = RESERVED_BYTES + i * per_vcpu;
            let len = if i + 1 == u64::from(vcpus) {
                mem_size - start
            } else {
                per_vcpu
            };
            Slice { start, len }
        })
        .collect()
}

/// Top of vCPU `index`'s stack.
pub fn stack_top(index: u32) -> u64 {
    STACKS_GPA + (u64::from(index) + 1) * STACK_BYTES
}

/// The page tables, as bytes to place at [`PML4_GPA`]: PML4, PDPT, then page directories
/// that identity-map `0..mem_size` (rounded up to 2 MiB) with user-accessible 2 MiB pages.
pub fn page_tables(mem_size: u64) -> Vec<u8> {
    let directories = mem_size.div_ceil(1 << 30);
    let mut entries = vec![0u64; (2 + directories as usize) * 512];
    let table_flags = PRESENT | WRITABLE | USER;
    entries[0] = PDPT_GPA | table_flags;
    for gib in 0..directories {
        entries[512 + gib as usize] = (PD_GPA + gib * 0x1000) | table_flags;
    }
    for (page, gpa) in (0..mem_size).step_by(GUEST_PAGE_BYTES as usize).enumerate() {
        entries[1024 + page] = gpa | table_flags | HUGE_PAGE;
    }
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_the_workload_area_exactly() {
        let mem = 256 << 20;
        for vcpus in 1..=5 {
            let slices = vcpu_slices(mem, vcpus);
            assert_eq!(slices.len(), vcpus as usize);
            assert_eq!(slices[0].start, RESERVED_BYTES);
            for pair in slices.windows(2) {
                assert_eq!(pair[0].end(), pair[1].start);
            }
            assert_eq!(slices.last().unwrap().end(), mem);
            assert!(
                slices
                    .iter()
                    .all(|s| s.start % 4096 == 0 && s.len % 4096 == 0)
            );
        }
    }

    #[test]
    fn page_tables_identity_map_with_user_huge_pages() {
        let mem = (1 << 30) + (4 << 20);
        let bytes = page_tables(mem);
        let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(bytes.len(), 4 * 4096);
        assert_eq!(word(0), PDPT_GPA | 7);
        assert_eq!(word(512), PD_GPA | 7);
        assert_eq!(word(513), (PD_GPA + 0x1000) | 7);
        assert_eq!(word(1024), 0x87);
        assert_eq!(word(1025), (2 << 20) | 0x87);
        // The second GiB's directory maps 1 GiB and 1 GiB + 2 MiB, and nothing beyond RAM.
        assert_eq!(word(1536), (1 << 30) | 0x87);
        assert_eq!(word(1537), ((1 << 30) + (2 << 20)) | 0x87);
        assert_eq!(word(1538), 0);
    }
}
