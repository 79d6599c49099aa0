//! KVM: opening the device and creating VMs, with errors that say what to do, and the calls
//! kvm-ioctls leaves unsafe or raw (guest_memfd creation, memslot binding, pre-faulting).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_create_guest_memfd, kvm_userspace_memory_region2};
use kvm_ioctls::{Kvm, VmFd};

/// The KVM device every host has when virtualization is available.
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";

/// Why KVM could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The device node is absent.
    #[error(
        "{path} does not exist: this host has no KVM; load kvm-intel or kvm-amd, or run on a \
         host or VM with virtualization enabled"
    )]
    Missing {
        /// The device path tried.
        path: PathBuf,
    },
    /// The device exists but this user may not open it.
    #[error(
        "permission denied opening {path}: run as root or add this user to the group that \
         owns {path} (usually 'kvm')"
    )]
    PermissionDenied {
        /// The device path tried.
        path: PathBuf,
    },
    /// Opening failed for another reason.
    #[error("cannot open {path}")]
    Open {
        /// The device path tried.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The path opened, but what is behind it does not answer KVM's ioctls.
    #[error("{path} is not a KVM device: KVM_GET_API_VERSION gave {version}, not 12")]
    NotKvm {
        /// The device path tried.
        path: PathBuf,
        /// What the ioctl returned (-1: the device has no such ioctl).
        version: i32,
    },
    /// KVM_CREATE_VM failed.
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
}

impl KvmError {
    /// Whether the user can fix this (missing device, permissions), as opposed to a fault.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            KvmError::Missing { .. } | KvmError::PermissionDenied { .. } | KvmError::NotKvm { .. }
        )
    }
}

/// KVM_GET_API_VERSION has returned 12 since Linux 2.6.22.
pub const KVM_API_VERSION: i32 = 12;

/// Opens the KVM device at `path`, and checks that it is one (KVM_GET_API_VERSION).
pub fn open(path: &Path) -> Result<Kvm, KvmError> {
    let path_buf = path.to_owned();
    let kvm = Kvm::new_with_path(path_as_cstring(path)?).map_err(|e| {
        let source = io::Error::from_raw_os_error(e.errno());
        match source.kind() {
            io::ErrorKind::NotFound => KvmError::Missing { path: path_buf },
            io::ErrorKind::PermissionDenied => KvmError::PermissionDenied { path: path_buf },
            _ => KvmError::Open {
                path: path_buf,
                source,
            },
        }
    })?;
    match kvm.get_api_version() {
        KVM_API_VERSION => Ok(kvm),
        version => Err(KvmError::NotKvm {
            path: path.to_owned(),
            version,
        }),
    }
}

fn path_as_cstring(path: &Path) -> Result<std::ffi::CString, KvmError> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| KvmError::Open {
        path: path.to_owned(),
        source: io::ErrorKind::InvalidInput.into(),
    })
}

/// Creates a default-type VM (type 0: no private memory, so gmem may be host-mapped).
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, KvmError> {
    kvm.create_vm().map_err(KvmError::CreateVm)
}

/// `KVM_CAP_USER_MEMORY2`: `KVM_SET_USER_MEMORY_REGION2` exists.
pub const KVM_CAP_USER_MEMORY2: u64 = 231;
/// `KVM_CAP_MEMORY_ATTRIBUTES`: per-page private/shared attributes (confidential VMs).
pub const KVM_CAP_MEMORY_ATTRIBUTES: u64 = 233;
/// `KVM_CAP_GUEST_MEMFD`: `KVM_CREATE_GUEST_MEMFD` exists.
pub const KVM_CAP_GUEST_MEMFD: u64 = 234;
/// `KVM_CAP_VM_TYPES`: bitmap of the VM types `KVM_CREATE_VM` accepts.
pub const KVM_CAP_VM_TYPES: u64 = 235;
/// `KVM_CAP_GUEST_MEMFD_FLAGS`: bitmap of the `GUEST_MEMFD_FLAG_*` this VM accepts.
/// Not in kvm-bindings 0.14.
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u64 = 244;

/// The gmem may be mmap()ed by the host (`GUEST_MEMFD_FLAG_MMAP`). Not in kvm-bindings 0.14.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
/// Pages start out shared, so host faults succeed (`GUEST_MEMFD_FLAG_INIT_SHARED`).
/// Without it a host fault on an MMAP gmem gets SIGBUS.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;
/// Folios may be migrated by the kernel. Our kernel series (kernel/patches) adds it as bit 5:
/// bits 2 to 4 are what the series in flight take (direct map removal's `NO_DIRECT_MAP` is bit 2,
/// `WRITE` bit 2 or 3, HugeTLB's flag bit 2; see kernel/README.md). Stock kernels reject it, and
/// report it absent in the flags cap.
pub const GUEST_MEMFD_FLAG_MIGRATABLE: u64 = 1 << 5;

/// `KVM_MEM_GUEST_MEMFD`: the memslot's private backing is a guest_memfd.
pub const KVM_MEM_GUEST_MEMFD: u32 = kvm_bindings::KVM_MEM_GUEST_MEMFD;

/// Creates a guest_memfd of `size` bytes with `flags` (`KVM_CREATE_GUEST_MEMFD`).
///
/// The returned descriptor is owned from the moment the ioctl returns it.
pub fn create_guest_memfd(vm: &VmFd, size: u64, flags: u64) -> Result<OwnedFd, kvm_ioctls::Error> {
    let request = kvm_create_guest_memfd {
        size,
        flags,
        ..Default::default()
    };
    let raw = vm.create_guest_memfd(request)?;
    // SAFETY: `raw` was just returned by a successful KVM_CREATE_GUEST_MEMFD; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// One memslot as `KVM_SET_USER_MEMORY_REGION2` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemslotRegion {
    /// KVM memslot id.
    pub slot: u32,
    /// Guest physical address of the first byte.
    pub guest_phys_addr: u64,
    /// Bytes covered; 0 deletes the slot.
    pub size: u64,
    /// Host virtual address of the same bytes (the gmem's own mmap).
    pub userspace_addr: u64,
    /// Offset of the slot's first byte inside the guest_memfd.
    pub gmem_offset: u64,
}

/// Creates, moves or deletes a gmem-backed memslot (`KVM_SET_USER_MEMORY_REGION2` with
/// `KVM_MEM_GUEST_MEMFD`).
///
/// Crate-private: the caller must keep `userspace_addr..+size` mapped until the slot is
/// deleted. `memory::GuestMemory` upholds that by deleting its slots before it unmaps.
pub fn set_user_memory_region2(
    vm: &VmFd,
    gmem: BorrowedFd<'_>,
    region: MemslotRegion,
) -> Result<(), kvm_ioctls::Error> {
    let raw = kvm_userspace_memory_region2 {
        slot: region.slot,
        flags: KVM_MEM_GUEST_MEMFD,
        guest_phys_addr: region.guest_phys_addr,
        memory_size: region.size,
        userspace_addr: region.userspace_addr,
        guest_memfd_offset: region.gmem_offset,
        guest_memfd: gmem.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: the host range is a live shared mapping of the same gmem, kept mapped by the
    // caller until this slot is deleted (see the function's contract).
    unsafe { vm.set_user_memory_region2(raw) }
}

/// `KVM_CAP_PRE_FAULT_MEMORY`: `KVM_PRE_FAULT_MEMORY` exists (Linux 6.10+, TDP only).
pub const KVM_CAP_PRE_FAULT_MEMORY: u64 = 236;

/// `KVM_PRE_FAULT_MEMORY` = `_IOWR(KVMIO, 0xd5, struct kvm_pre_fault_memory)`; kvm-ioctls 0.25
/// does not wrap it.
const KVM_PRE_FAULT_MEMORY: libc::c_ulong = 0xC040_AED5;

/// Maps `gpa..gpa+size` into the VM's stage-2 page tables now, as the vCPU's own faults would
/// (`KVM_PRE_FAULT_MEMORY` on a vCPU fd), so that the guest takes no stage-2 fault there.
///
/// The vCPU must not be in `KVM_RUN` (the ioctl takes the vCPU's mutex). The kernel may stop
/// early (EINTR, EAGAIN) with the range advanced; this loops until it is done. Fails with
/// EOPNOTSUPP where the VM has no two-dimensional paging (e.g. shadow paging).
pub fn pre_fault_memory(vcpu: BorrowedFd<'_>, gpa: u64, size: u64) -> std::io::Result<()> {
    let mut range = kvm_bindings::kvm_pre_fault_memory {
        gpa,
        size,
        ..Default::default()
    };
    while range.size > 0 {
        // SAFETY: `vcpu` is a live KVM vCPU fd and `range` a valid kvm_pre_fault_memory that
        // the kernel reads and updates in place; it outlives the call.
        match syscall!(ioctl(
            vcpu.as_raw_fd(),
            KVM_PRE_FAULT_MEMORY,
            &raw mut range
        )) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A second descriptor for `vcpu`'s vCPU, for the vCPU ioctls another thread may make while
/// the vCPU's own thread is outside `KVM_RUN` (such as [`pre_fault_memory`]).
pub fn dup_vcpu_fd(vcpu: &kvm_ioctls::VcpuFd) -> std::io::Result<OwnedFd> {
    // SAFETY: a VcpuFd owns its descriptor until it is dropped, and `vcpu` is borrowed for
    // the whole call, so the raw fd stays open while it is borrowed here.
    let borrowed = unsafe { BorrowedFd::borrow_raw(vcpu.as_raw_fd()) };
    borrowed.try_clone_to_owned()
}
