//! `GuestMemfd`: one guest_memfd file, its flags, and its file-space operations.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use kvm_ioctls::{Kvm, VmFd};

use super::{GmemFlags, GmemOffset, MemoryError, check_range, page_size};
use crate::sys::kvm::{self as sys_kvm, KVM_CAP_GUEST_MEMFD, KVM_CAP_GUEST_MEMFD_FLAGS};
use crate::sys::mman::{self, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, Mmap};

/// A guest_memfd: guest memory that lives in its own file, not in a host VMA.
#[derive(Debug)]
pub struct GuestMemfd {
    fd: OwnedFd,
    size: u64,
    flags: GmemFlags,
}

impl GuestMemfd {
    /// Flags this VM's KVM accepts for guest_memfd (`KVM_CAP_GUEST_MEMFD_FLAGS`);
    /// `None` if the kernel has no guest_memfd at all.
    pub fn supported_flags(vm: &VmFd) -> Option<GmemFlags> {
        if vm.check_extension_raw(KVM_CAP_GUEST_MEMFD) <= 0 {
            return None;
        }
        Some(GmemFlags(
            vm.check_extension_raw(KVM_CAP_GUEST_MEMFD_FLAGS).max(0) as u64,
        ))
    }

    /// Flags this kernel's KVM knows for guest_memfd, over all VM types: the
    /// `KVM_CAP_GUEST_MEMFD_FLAGS` answer of /dev/kvm itself, before any VM exists. A flag
    /// it leaves out cannot be set on any gmem of this host. `None` without guest_memfd.
    pub fn kernel_flags(kvm: &Kvm) -> Option<GmemFlags> {
        if kvm.check_extension_raw(KVM_CAP_GUEST_MEMFD) <= 0 {
            return None;
        }
        Some(GmemFlags(
            kvm.check_extension_raw(KVM_CAP_GUEST_MEMFD_FLAGS).max(0) as u64,
        ))
    }

    /// The flags for host-mappable guest memory on this kernel: MMAP|INIT_SHARED, plus
    /// MIGRATABLE where the kernel offers it (our kernel series), so that the kernel's own
    /// migration can move it. `None` if guest_memfd is not host-mappable here.
    pub fn host_mappable_flags(vm: &VmFd) -> Option<GmemFlags> {
        let supported = Self::supported_flags(vm)?;
        if !supported.contains(GmemFlags::HOST_MAPPABLE) {
            return None;
        }
        Some(GmemFlags::HOST_MAPPABLE | GmemFlags(supported.0 & GmemFlags::MIGRATABLE.0))
    }

    /// Creates a guest_memfd of `size` bytes (`KVM_CREATE_GUEST_MEMFD`).
    ///
    /// Checks the size and the flags first so that bad input gets a sentence, not an errno.
    pub fn create(vm: &VmFd, size: u64, flags: GmemFlags) -> Result<Self, MemoryError> {
        let page = page_size();
        if size == 0 {
            return Err(MemoryError::ZeroSize);
        }
        if !size.is_multiple_of(page) {
            return Err(MemoryError::SizeNotPageAligned { size, page });
        }
        let supported = Self::supported_flags(vm).ok_or(MemoryError::GuestMemfdUnsupported)?;
        let missing = flags.without(supported);
        if missing != GmemFlags::NONE {
            return Err(MemoryError::UnsupportedFlags { missing, supported });
        }
        let fd = sys_kvm::create_guest_memfd(vm, size, flags.0).map_err(|source| {
            MemoryError::CreateGuestMemfd {
                size,
                flags,
                source,
            }
        })?;
        Ok(GuestMemfd { fd, size, flags })
    }

    /// A gmem this process did not create: a duplicate of another process's descriptor,
    /// with the flags known to be set on it (creation flags cannot be read back).
    pub(crate) fn from_attached(fd: OwnedFd, size: u64, flags: GmemFlags) -> Self {
        GuestMemfd { fd, size, flags }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Creation flags.
    pub fn flags(&self) -> GmemFlags {
        self.flags
    }

    /// Whether the host may map (and so copy) this memory. A gmem without MMAP|INIT_SHARED
    /// is treated as confidential: nothing in this crate maps or reads it.
    pub fn is_host_mappable(&self) -> bool {
        self.flags.contains(GmemFlags::HOST_MAPPABLE)
    }

    /// Maps the whole gmem shared, read/write. Refused for non-mappable (confidential) gmem.
    pub fn map(&self) -> Result<Mmap, MemoryError> {
        if !self.is_host_mappable() {
            return Err(MemoryError::NotHostMappable { flags: self.flags });
        }
        let len = usize::try_from(self.size)
            .map_err(|_| MemoryError::Layout("size exceeds the address space".into()))?;
        Mmap::shared(self.fd.as_fd(), 0, len).map_err(|source| MemoryError::Mmap {
            len: self.size,
            source,
        })
    }

    /// Allocates (and zeroes) the range's folios under the range's NUMA policy, without
    /// mapping them (`fallocate(KEEP_SIZE)`). A memory cgroup at its limit fails here with
    /// ENOMEM, not later with SIGBUS; a full node under a bind policy runs the OOM killer
    /// instead, so check it first with [`super::ensure_room`].
    pub fn allocate(&self, offset: GmemOffset, len: u64) -> Result<(), MemoryError> {
        check_range(offset, len, self.size)?;
        let offset = offset.raw();
        mman::fallocate(self.fd.as_fd(), FALLOC_FL_KEEP_SIZE, offset, len).map_err(|source| {
            MemoryError::Allocate {
                offset,
                len,
                source,
            }
        })
    }

    /// Frees the range's folios (`fallocate(PUNCH_HOLE|KEEP_SIZE)`); it then reads as zeros
    /// and the next touch allocates fresh folios.
    pub fn punch(&self, offset: GmemOffset, len: u64) -> Result<(), MemoryError> {
        check_range(offset, len, self.size)?;
        let offset = offset.raw();
        mman::fallocate(
            self.fd.as_fd(),
            FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
        .map_err(|source| MemoryError::Punch {
            offset,
            len,
            source,
        })
    }
}

impl AsFd for GuestMemfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
