//! NUMA memory-policy calls: mbind, get_mempolicy, set_mempolicy, move_pages, migrate_pages.
//!
//! Kernel quirk, once for all of them: `maxnode` counts one more than the bits the kernel
//! reads (get_nodes() decrements it before use), so a mask of N bits is passed as N + 1.
//! Passing exactly N silently drops the highest node.

use std::io;

use super::mman::Mmap;

/// `MPOL_DEFAULT`: fall back to the task policy.
pub const MPOL_DEFAULT: i32 = 0;
/// `MPOL_PREFERRED`: try the given node first.
pub const MPOL_PREFERRED: i32 = 1;
/// `MPOL_BIND`: only the given nodes.
pub const MPOL_BIND: i32 = 2;
/// `MPOL_INTERLEAVE`: round-robin over the given nodes, by page offset.
pub const MPOL_INTERLEAVE: i32 = 3;
/// `MPOL_LOCAL`: the node of the allocating CPU.
pub const MPOL_LOCAL: i32 = 4;
/// `MPOL_PREFERRED_MANY`: try the given nodes first.
pub const MPOL_PREFERRED_MANY: i32 = 5;
/// `MPOL_WEIGHTED_INTERLEAVE`: interleave with per-node weights.
pub const MPOL_WEIGHTED_INTERLEAVE: i32 = 6;

/// mbind flag: fail with EIO if existing pages do not follow the policy (after any move).
pub const MPOL_MF_STRICT: u32 = 1 << 0;
/// mbind/move_pages flag: move this process's pages to follow the policy.
pub const MPOL_MF_MOVE: u32 = 1 << 1;
/// move_pages flag: move pages other processes map too (needs CAP_SYS_NICE). Without it the
/// kernel skips a folio that may be mapped by another mm with EACCES.
pub const MPOL_MF_MOVE_ALL: u32 = 1 << 2;

/// get_mempolicy flag: return the policy of the VMA at `addr`, not of the task.
const MPOL_F_ADDR: i32 = 1 << 1;

/// Bits in the node masks we pass: the kernel's largest NODES_SHIFT (10).
pub const MASK_BITS: usize = 1024;
/// Words of a node mask.
pub const MASK_WORDS: usize = MASK_BITS / 64;
/// A node mask in the kernel's layout.
pub type RawNodeMask = [libc::c_ulong; MASK_WORDS];

const MAXNODE: libc::c_ulong = MASK_BITS as libc::c_ulong + 1;

/// Sets the memory policy of a page-aligned range of `map` (`mbind(2)`).
///
/// With `MPOL_MF_MOVE` the kernel also tries to move existing pages; it reports nothing
/// about pages it could not move unless `MPOL_MF_STRICT` is set too (then EIO).
pub fn mbind(
    map: &Mmap,
    offset: usize,
    len: usize,
    mode: i32,
    nodes: &RawNodeMask,
    flags: u32,
) -> io::Result<()> {
    assert!(offset.checked_add(len).is_some_and(|end| end <= map.len()));
    let addr = map.addr() + offset;
    // SAFETY: the range lies inside a live mapping we own; the mask is MASK_WORDS words
    // long and MAXNODE covers exactly those bits (plus the kernel's off-by-one).
    syscall!(syscall(
        libc::SYS_mbind,
        addr,
        len,
        mode,
        nodes.as_ptr(),
        MAXNODE,
        flags
    ))?;
    Ok(())
}

/// Returns the policy mode and nodes of the mapping at `addr` (`get_mempolicy(2)` with
/// `MPOL_F_ADDR`).
pub fn get_mempolicy_at(map: &Mmap, offset: usize) -> io::Result<(i32, RawNodeMask)> {
    assert!(offset < map.len());
    let mut mode: libc::c_int = 0;
    let mut nodes: RawNodeMask = [0; MASK_WORDS];
    // SAFETY: `mode` and `nodes` are writable locals of the sizes the kernel expects for
    // MAXNODE; `addr` lies inside a live mapping we own.
    syscall!(syscall(
        libc::SYS_get_mempolicy,
        &mut mode as *mut libc::c_int,
        nodes.as_mut_ptr(),
        MAXNODE,
        map.addr() + offset,
        MPOL_F_ADDR
    ))?;
    Ok((mode, nodes))
}

/// Sets the calling thread's default policy for future allocations (`set_mempolicy(2)`).
pub fn set_mempolicy(mode: i32, nodes: &RawNodeMask) -> io::Result<()> {
    // SAFETY: the mask is MASK_WORDS words, matching MAXNODE.
    syscall!(syscall(
        libc::SYS_set_mempolicy,
        mode,
        nodes.as_ptr(),
        MAXNODE
    ))?;
    Ok(())
}

/// Queries (`nodes` = None) or moves pages of process `pid` (0 = self) (`move_pages(2)`).
///
/// `status[i]` gets the node of `pages[i]` or a negative errno. Returns how many pages the
/// kernel did not move. Quirk: when the kernel refuses a whole batch (stock gmem), it
/// returns that count and leaves `status` unwritten, so callers pre-fill a sentinel.
pub fn move_pages(
    pid: i32,
    pages: &[usize],
    nodes: Option<&[i32]>,
    status: &mut [i32],
    flags: u32,
) -> io::Result<usize> {
    assert_eq!(pages.len(), status.len());
    if let Some(nodes) = nodes {
        assert_eq!(pages.len(), nodes.len());
    }
    let nodes_ptr = nodes.map_or(std::ptr::null(), <[i32]>::as_ptr);
    // SAFETY: `pages`, `nodes` and `status` are live slices of `pages.len()` entries. The
    // kernel only reads the page addresses (invalid ones get -EFAULT in status).
    let not_moved = syscall!(syscall(
        libc::SYS_move_pages,
        pid,
        pages.len(),
        pages.as_ptr(),
        nodes_ptr,
        status.as_mut_ptr(),
        flags
    ))?;
    Ok(not_moved as usize)
}

/// Moves every page of process `pid` on `from` nodes to `to` nodes (`migrate_pages(2)`).
/// Returns the number of pages that could not be moved.
pub fn migrate_pages(pid: i32, from: &RawNodeMask, to: &RawNodeMask) -> io::Result<usize> {
    // SAFETY: both masks are MASK_WORDS words, matching MAXNODE.
    let left = syscall!(syscall(
        libc::SYS_migrate_pages,
        pid,
        MAXNODE,
        from.as_ptr(),
        to.as_ptr()
    ))?;
    Ok(left as usize)
}
