//! `MemoryError`: what can go wrong creating, mapping, binding and placing guest memory.

use std::io;

use super::GmemFlags;
use crate::numa::NodeId;

/// A failed guest-memory operation. Variants name the operation; user errors explain the fix.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The kernel has no KVM_CREATE_GUEST_MEMFD.
    #[error(
        "this kernel's KVM has no guest_memfd (KVM_CAP_GUEST_MEMFD is 0): use Linux 6.8 or newer"
    )]
    GuestMemfdUnsupported,
    /// The size was zero.
    #[error(
        "a guest memory size of 0 bytes is not allowed: give a positive multiple of the page size"
    )]
    ZeroSize,
    /// The size was not a multiple of the page size.
    #[error(
        "size {size} bytes is not a multiple of the {page} byte page size: round it to a whole number of pages"
    )]
    SizeNotPageAligned {
        /// Requested size.
        size: u64,
        /// Host page size.
        page: u64,
    },
    /// The kernel does not support some requested flags.
    #[error(
        "this kernel does not support guest_memfd flag(s) {missing} (it supports {supported}): drop them or use a kernel that has them"
    )]
    UnsupportedFlags {
        /// Flags asked for but not supported.
        missing: GmemFlags,
        /// What KVM_CAP_GUEST_MEMFD_FLAGS reported.
        supported: GmemFlags,
    },
    /// KVM_CREATE_GUEST_MEMFD failed.
    #[error("KVM_CREATE_GUEST_MEMFD of {size} bytes with flags {flags} failed")]
    CreateGuestMemfd {
        /// Requested size.
        size: u64,
        /// Requested flags.
        flags: GmemFlags,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The gmem is not host-mappable: we treat it as confidential and never map or copy it.
    #[error(
        "this guest_memfd was created with flags {flags}, without MMAP|INIT_SHARED: it is treated as confidential memory, which the host must never map or copy"
    )]
    NotHostMappable {
        /// The gmem's flags.
        flags: GmemFlags,
    },
    /// mmap of the gmem failed.
    #[error("mmap of the guest_memfd ({len} bytes) failed")]
    Mmap {
        /// Bytes asked for.
        len: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A chunk layout did not fit the memory.
    #[error("invalid memory layout: {0}")]
    Layout(String),
    /// KVM_SET_USER_MEMORY_REGION2 failed.
    #[error("KVM_SET_USER_MEMORY_REGION2 for slot {slot} failed")]
    SetMemslot {
        /// The memslot.
        slot: u32,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A range was not page-aligned or empty.
    #[error("range at offset {offset:#x} of {len:#x} bytes is empty or not page-aligned")]
    RangeNotPageAligned {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// A guest-physical range reached outside guest RAM.
    #[error("guest range {gpa:#x}+{len:#x} is outside guest RAM ({base:#x}, {size:#x} bytes)")]
    GuestRangeOutsideRam {
        /// Guest-physical address of the range.
        gpa: u64,
        /// Length.
        len: u64,
        /// Guest-physical address where RAM starts.
        base: u64,
        /// Bytes of guest RAM.
        size: u64,
    },
    /// A range ran past the end.
    #[error("range at offset {offset:#x} of {len:#x} bytes runs past the end ({size:#x} bytes)")]
    RangeOutOfBounds {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Size of the memory.
        size: u64,
    },
    /// A policy named a node that is not online.
    #[error(
        "NUMA node {node} does not exist on this host (online nodes: {online}): pick one of those"
    )]
    NoSuchNode {
        /// The node asked for.
        node: NodeId,
        /// The nodes that exist, in list syntax.
        online: String,
    },
    /// The node cannot supply an allocation without waking the OOM killer.
    #[error(
        "node {node} has {available_kib} KiB available above its high watermark, less than the {need_kib} KiB asked for: a node-bound allocation of that size would wake the OOM killer"
    )]
    NodeFull {
        /// The node.
        node: NodeId,
        /// KiB asked for.
        need_kib: u64,
        /// KiB the node can supply (its MemAvailable estimate).
        available_kib: u64,
    },
    /// The host topology could not be read.
    #[error(transparent)]
    Topology(#[from] crate::numa::topology::TopologyError),
    /// mbind failed.
    #[error("mbind of {len:#x} bytes at offset {offset:#x} failed")]
    Mbind {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// get_mempolicy failed.
    #[error("get_mempolicy at offset {offset:#x} failed")]
    GetMempolicy {
        /// Offset.
        offset: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// fallocate(KEEP_SIZE) failed; ENOMEM/ENOSPC means the allowed nodes are full.
    #[error("allocating {len:#x} bytes of guest_memfd at offset {offset:#x} failed")]
    Allocate {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// fallocate(PUNCH_HOLE) failed.
    #[error("punching {len:#x} bytes of guest_memfd at offset {offset:#x} failed")]
    Punch {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// MADV_POPULATE_WRITE failed.
    #[error("faulting in {len:#x} bytes at offset {offset:#x} failed")]
    Populate {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// move_pages (query) failed.
    #[error("move_pages query of {pages} pages failed")]
    QueryPlacement {
        /// Pages asked about.
        pages: usize,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl MemoryError {
    /// Whether the caller asked for something impossible (as opposed to a host fault).
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            MemoryError::ZeroSize
                | MemoryError::SizeNotPageAligned { .. }
                | MemoryError::UnsupportedFlags { .. }
                | MemoryError::NotHostMappable { .. }
                | MemoryError::NoSuchNode { .. }
                | MemoryError::Layout(_)
                | MemoryError::RangeNotPageAligned { .. }
                | MemoryError::RangeOutOfBounds { .. }
                | MemoryError::GuestRangeOutsideRam { .. }
                | MemoryError::GuestMemfdUnsupported
        )
    }
}
