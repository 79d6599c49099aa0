//! Guest memory backed by guest_memfd: creation, host mapping, memslots, policy, placement,
//! and attaching to the guest_memfd of another process.

mod address;
mod attached;
mod error;
mod flags;
mod guest_memfd;
mod guest_memory;
mod mapped;
mod placement;
mod policy;
mod regions;

pub use address::{ChunkIndex, GmemOffset, GuestOffset};
pub(crate) use attached::procfs as gmem_procfs;
pub(crate) use attached::take_gmem_file;
pub use attached::{AttachError, AttachedGmem, LearnedFlags, Residency, VmmMapping};
pub use error::MemoryError;
pub use flags::GmemFlags;
pub use guest_memfd::GuestMemfd;
pub use guest_memory::{ChunkLayout, GuestMemory};
pub use mapped::MappedGmem;
pub(crate) use placement::map_resident;
pub use placement::{PageLocation, Placement, PlacementRange};
pub use policy::{PER_INODE_POLICY_SINCE, Policy, kernel_release, policy_is_per_inode};
pub use regions::{ChunkRegion, ChunkRegions, GmemAddressSpace};
/// Guest-physical addresses, as vm-memory and its users (devices, loaders) spell them.
pub use vm_memory::GuestAddress;

use crate::numa::{NodeId, NodeRoom};

/// Host page size in bytes.
pub fn page_size() -> u64 {
    crate::sys::mman::page_size() as u64
}

/// Fails with [`MemoryError::NodeFull`] unless `node` can supply `bytes` more while staying
/// above its high watermark. Call it before allocating on a chosen node: a node-bound
/// allocation the node cannot satisfy does not fail, it runs the OOM killer (see
/// [`crate::numa::room`]). Best effort: other allocations may race with the one checked.
pub fn ensure_room(node: NodeId, bytes: u64) -> Result<(), MemoryError> {
    room_for(node, bytes).map(drop)
}

/// [`ensure_room`], returning the bytes `node` could supply when it read them, for callers
/// that spend that room over several allocations.
pub(crate) fn room_for(node: NodeId, bytes: u64) -> Result<u64, MemoryError> {
    let available = NodeRoom::read(node)?.available();
    if available < bytes {
        return Err(MemoryError::NodeFull {
            node,
            need_kib: bytes >> 10,
            available_kib: available >> 10,
        });
    }
    Ok(available)
}

/// Bytes allocated on a node after which a [`RoomCredit`] reads the node's room again even
/// if its credit lasts, since other processes allocate too: the credit is at most this stale.
const ROOM_STALE_AFTER: u64 = 32 << 20;

/// What a node can still supply, read from /proc/zoneinfo (~0.1 ms a read here) once per
/// [`ROOM_STALE_AFTER`] bytes allocated, or sooner when the credit runs out: for a
/// migration that checks [`ensure_room`] before every allocation of a chunk or batch.
#[derive(Debug, Default)]
pub(crate) struct RoomCredit {
    node: Option<NodeId>,
    bytes: u64,
    spent: u64,
}

impl RoomCredit {
    /// Takes `len` bytes of credit on `node`, reading its room afresh when the credit is
    /// for another node, too old, or short. Fails as [`ensure_room`] does.
    pub fn ensure(&mut self, node: NodeId, len: u64) -> Result<(), MemoryError> {
        let fresh = self.node == Some(node) && self.spent < ROOM_STALE_AFTER && self.bytes >= len;
        if !fresh {
            self.bytes = room_for(node, len)?;
            self.node = Some(node);
            self.spent = 0;
        }
        self.bytes = self.bytes.saturating_sub(len);
        self.spent += len;
        Ok(())
    }
}

/// Checks that `offset..offset+len` is non-empty, page-aligned and inside `size` bytes.
pub(crate) fn check_range(offset: GmemOffset, len: u64, size: u64) -> Result<(), MemoryError> {
    let page = page_size();
    let offset = offset.raw();
    if len == 0 || !offset.is_multiple_of(page) || !len.is_multiple_of(page) {
        return Err(MemoryError::RangeNotPageAligned { offset, len });
    }
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(MemoryError::RangeOutOfBounds { offset, len, size });
    }
    Ok(())
}
