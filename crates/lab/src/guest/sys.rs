//! Thin, checked wrappers over the NUMA and memory syscalls the in-guest tests use.

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

/// `MPOL_BIND` from linux/mempolicy.h.
pub const MPOL_BIND: i32 = 2;
/// `MPOL_MF_STRICT`: fail if existing pages do not follow the policy.
pub const MPOL_MF_STRICT: u32 = 1 << 0;
/// `MPOL_MF_MOVE`: move pages mapped only by this process.
pub const MPOL_MF_MOVE: u32 = 1 << 1;

/// The page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the running system; it has no memory effects.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).unwrap_or(4096)
}

/// A private mmap, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Anonymous private read-write memory (not populated).
    pub fn anonymous(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing cannot alias
        // any existing Rust object; the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        Self::from_raw(p, len)
    }

    /// A shared read-write mapping of `fd` from offset 0.
    pub fn shared(fd: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        // SAFETY: the kernel picks a fresh address, so the mapping aliases no Rust object;
        // `fd` is valid for the duration of the call (borrowed), and the mapping keeps its own
        // reference to the file afterwards.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        Self::from_raw(p, len)
    }

    fn from_raw(p: *mut c_void, len: usize) -> io::Result<Self> {
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null pointer"))?;
        Ok(Self { ptr, len })
    }

    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is readable, `len` bytes long, lives as long as `self`, and is
        // only written through `as_mut_slice`, which needs `&mut self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` makes this the only live reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The start address of every page, as move_pages wants them.
    pub fn pages(&self) -> Vec<*mut c_void> {
        let ps = page_size();
        (0..self.len / ps)
            .map(|i| self.ptr.as_ptr().wrapping_add(i * ps).cast::<c_void>())
            .collect()
    }

    /// Applies a NUMA policy to the whole mapping.
    pub fn mbind(&self, mode: i32, nodes: &[u32], flags: u32) -> io::Result<()> {
        let mut mask: u64 = 0;
        for n in nodes {
            mask |= 1u64 << n;
        }
        // SAFETY: the range is our own live mapping; the kernel reads one u64 of node mask
        // (maxnode 65 covers 64 bits, as the syscall counts one past the highest bit).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mbind,
                self.ptr.as_ptr(),
                self.len,
                mode,
                &mask as *const u64,
                65usize,
                flags,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the pointer and length came from a successful mmap and no slice borrowed
        // from `self` can outlive it.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// move_pages(2) for this process. With `nodes` it moves (returning the kernel's count of
/// pages *not* moved); without, it only writes each page's node into `status`.
pub fn move_pages(
    pages: &[*mut c_void],
    nodes: Option<&[i32]>,
    status: &mut [i32],
    flags: i32,
) -> io::Result<i64> {
    assert_eq!(pages.len(), status.len());
    if let Some(n) = nodes {
        assert_eq!(pages.len(), n.len());
    }
    let nodes_ptr = nodes.map_or(std::ptr::null(), <[i32]>::as_ptr);
    // SAFETY: every array holds `pages.len()` elements as checked above, `status` is writable,
    // and the pages are our own mappings (the kernel validates each address anyway).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0,
            pages.len(),
            pages.as_ptr(),
            nodes_ptr,
            status.as_mut_ptr(),
            flags,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// Each page's current node (or negative errno, e.g. -ENOENT for a page not present).
pub fn page_nodes(pages: &[*mut c_void]) -> io::Result<Vec<i32>> {
    let mut status = vec![i32::MIN; pages.len()];
    move_pages(pages, None, &mut status, 0)?;
    Ok(status)
}
