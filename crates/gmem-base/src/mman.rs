//! Memory mappings and file-space calls: mmap/munmap, madvise, fallocate.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

/// `fallocate` mode that leaves `st_size` alone. gmem refuses mode 0 (EOPNOTSUPP), so every
/// gmem fallocate carries it.
pub const FALLOC_FL_KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
/// `fallocate` mode that frees the range's pages; must be combined with KEEP_SIZE.
pub const FALLOC_FL_PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE;

/// Host page size (4 KiB on x86-64; read once from the kernel).
pub fn page_size() -> usize {
    use std::sync::OnceLock;
    static PAGE_SIZE: OnceLock<usize> = OnceLock::new();
    *PAGE_SIZE.get_or_init(|| {
        // SAFETY: sysconf has no memory-safety preconditions.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(size).unwrap_or(4096)
    })
}

/// An owned host mapping, unmapped on drop.
///
/// Guest memory is shared with vCPUs and with other host threads, so this type never hands
/// out Rust references to its bytes: all access is by copy through raw pointers, the way
/// vm-memory treats guest memory.
#[derive(Debug)]
pub struct Mmap {
    addr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; access goes through copies that
// tolerate concurrent writers, so sharing or moving it between threads is fine.
unsafe impl Send for Mmap {}
// SAFETY: as above; no method hands out references into the mapping.
unsafe impl Sync for Mmap {}

impl Mmap {
    /// Maps `len` bytes of `fd` from `offset`, `MAP_SHARED`, read/write (`mmap(2)`).
    pub fn shared(fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<Self> {
        let offset = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        Self::map(len, libc::MAP_SHARED, fd.as_raw_fd(), offset)
    }

    /// Maps `len` bytes of private anonymous memory (bounce buffers, test controls).
    pub fn anonymous(len: usize) -> io::Result<Self> {
        Self::map(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    }

    fn map(len: usize, flags: i32, fd: i32, offset: libc::off_t) -> io::Result<Self> {
        if len == 0 {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: a fresh mapping at a kernel-chosen address cannot alias any Rust object.
        let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, offset) };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr = NonNull::new(addr.cast::<u8>()).ok_or(io::ErrorKind::AddrNotAvailable)?;
        Ok(Mmap { addr, len })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: empty mappings cannot be created.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Host virtual address of the first byte (for memslots, move_pages and numa_maps).
    pub fn addr(&self) -> usize {
        self.addr.as_ptr() as usize
    }

    /// Pointer arithmetic is safe by itself; only the dereference needs the range check.
    fn ptr_at(&self, offset: usize) -> *mut u8 {
        self.addr.as_ptr().wrapping_add(offset)
    }

    fn check(&self, offset: usize, len: usize) {
        let end = offset.checked_add(len);
        assert!(
            end.is_some_and(|end| end <= self.len),
            "range {offset:#x}+{len:#x} outside a mapping of {:#x} bytes",
            self.len
        );
    }

    /// Copies `dst.len()` bytes from `offset` into `dst`.
    pub fn read(&self, offset: usize, dst: &mut [u8]) {
        self.check(offset, dst.len());
        // SAFETY: the source range is inside this live mapping (checked) and `dst` is a
        // distinct Rust buffer, so the ranges cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr_at(offset), dst.as_mut_ptr(), dst.len()) };
    }

    /// Copies `src` into the mapping at `offset`.
    pub fn write(&self, offset: usize, src: &[u8]) {
        self.check(offset, src.len());
        // SAFETY: the destination range is inside this live mapping (checked) and `src` is a
        // distinct Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr_at(offset), src.len()) };
    }

    /// Sets `len` bytes at `offset` to `byte`.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) {
        self.check(offset, len);
        // SAFETY: the range is inside this live mapping (checked).
        unsafe { std::ptr::write_bytes(self.ptr_at(offset), byte, len) };
    }

    /// Copies `len` bytes from `self` at `src_offset` to `dst` at `dst_offset`. The mappings
    /// may be the same one; the ranges may overlap.
    pub fn copy_to(&self, src_offset: usize, dst: &Mmap, dst_offset: usize, len: usize) {
        self.check(src_offset, len);
        dst.check(dst_offset, len);
        // SAFETY: both ranges are inside live mappings (checked); `copy` allows overlap.
        unsafe { std::ptr::copy(self.ptr_at(src_offset), dst.ptr_at(dst_offset), len) };
    }

    /// Whether `len` bytes at `offset` equal `len` bytes of `other` at `other_offset`
    /// (`memcmp(3)`, byte-exact; no Rust references into either mapping are formed).
    pub fn equal(&self, offset: usize, other: &Mmap, other_offset: usize, len: usize) -> bool {
        self.check(offset, len);
        other.check(other_offset, len);
        // SAFETY: both ranges are inside live mappings (checked); memcmp only reads them.
        let diff = unsafe {
            libc::memcmp(
                self.ptr_at(offset).cast(),
                other.ptr_at(other_offset).cast(),
                len,
            )
        };
        diff == 0
    }

    /// Host address of the byte at `offset` (inside the mapping), for callers that hand
    /// addresses to the kernel or to vm-memory; it is only dereferenced by them.
    pub fn host_address(&self, offset: usize) -> *mut u8 {
        self.check(offset, 1);
        self.ptr_at(offset)
    }

    /// `len` bytes at `offset` as a vm-memory `VolatileSlice`, the view rust-vmm devices and
    /// linux-loader read and write guest memory through.
    pub fn volatile_slice(&self, offset: usize, len: usize) -> vm_memory::VolatileSlice<'_> {
        self.check(offset, len);
        // SAFETY: the range is inside this live mapping (checked), and the slice borrows
        // `self`, so it cannot outlive the mapping. VolatileSlice only copies through
        // volatile accesses, which tolerate the vCPUs writing the same bytes.
        unsafe { vm_memory::VolatileSlice::new(self.ptr_at(offset), len) }
    }

    /// Reads the 8-byte word at `offset` without tearing, for racing readers and writers.
    pub fn read_u64(&self, offset: usize) -> u64 {
        self.check(offset, 8);
        assert!(
            offset.is_multiple_of(8),
            "unaligned u64 read at {offset:#x}"
        );
        // SAFETY: aligned and inside the live mapping; volatile because others write it.
        unsafe { self.ptr_at(offset).cast::<u64>().read_volatile() }
    }

    /// Writes the 8-byte word at `offset` without tearing.
    pub fn write_u64(&self, offset: usize, value: u64) {
        self.check(offset, 8);
        assert!(
            offset.is_multiple_of(8),
            "unaligned u64 write at {offset:#x}"
        );
        // SAFETY: aligned and inside the live mapping; volatile because others read it.
        unsafe { self.ptr_at(offset).cast::<u64>().write_volatile(value) };
    }

    /// `madvise(2)` on a page-aligned sub-range.
    pub fn madvise(&self, offset: usize, len: usize, advice: i32) -> io::Result<()> {
        self.check(offset, len);
        // SAFETY: the range is inside this mapping; advice never invalidates Rust objects
        // here since nothing holds references into the mapping.
        syscall!(madvise(self.ptr_at(offset).cast(), len, advice))?;
        Ok(())
    }

    /// Which pages of a page-aligned range are resident in the backing file's page cache
    /// (`mincore(2)`), whether or not this process has them mapped. Never allocates.
    pub fn resident_pages(&self, offset: usize, len: usize) -> io::Result<Vec<bool>> {
        self.check(offset, len);
        let mut vec = vec![0u8; len.div_ceil(page_size())];
        // SAFETY: the range is inside this mapping; `vec` has one byte per page of it.
        syscall!(mincore(self.ptr_at(offset).cast(), len, vec.as_mut_ptr()))?;
        Ok(vec.into_iter().map(|b| b & 1 != 0).collect())
    }

    /// Maps already-resident pages of the range into this process (`MADV_POPULATE_READ`).
    pub fn populate_read(&self, offset: usize, len: usize) -> io::Result<()> {
        self.madvise(offset, len, libc::MADV_POPULATE_READ)
    }

    /// Faults in (allocating if needed) every page of the range for writing, in one call
    /// (`MADV_POPULATE_WRITE`, Linux 5.14+). Far cheaper than touching pages one by one.
    pub fn populate_write(&self, offset: usize, len: usize) -> io::Result<()> {
        self.madvise(offset, len, libc::MADV_POPULATE_WRITE)
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: `addr..addr+len` is exactly the mapping this value created and owns.
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
    }
}

/// `fallocate(2)`: allocate (KEEP_SIZE) or free (PUNCH_HOLE|KEEP_SIZE) file space.
pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let offset = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    let len = libc::off_t::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: plain integer arguments on a descriptor we borrow for the call.
    syscall!(fallocate(fd.as_raw_fd(), mode, offset, len))?;
    Ok(())
}
