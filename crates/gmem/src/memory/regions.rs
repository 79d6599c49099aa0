//! Guest memory as vm-memory sees it: one region per chunk, its table published atomically.
//!
//! rust-vmm devices, virtio queues and linux-loader take guest memory as a vm-memory
//! `GuestMemoryBackend`. [`GuestMemory::vm_memory`](super::GuestMemory::vm_memory) gives
//! them a [`GmemAddressSpace`]: each `memory()` snapshot is one consistent region table,
//! and remap publishes a chunk's new place as one atomic swap of that table, so a device
//! never sees a half-swapped chunk.

use std::sync::Arc;

use vm_memory::guest_memory::Result as GuestMemoryResult;
use vm_memory::{
    GuestAddress, GuestMemoryAtomic, GuestMemoryError, GuestMemoryRegion, GuestMemoryRegionBytes,
    GuestRegionCollection, GuestUsize, MemoryRegionAddress, VolatileSlice,
};

use super::{ChunkIndex, ChunkLayout, GmemOffset, MemoryError};
use crate::sys::mman::Mmap;

/// One guest chunk as a vm-memory region: `len` bytes of the gmem mapping from
/// `map_offset`, at guest-physical `guest_base`. It holds the mapping, so a snapshot a
/// device keeps stays valid memory even after the [`GuestMemory`](super::GuestMemory) is
/// gone.
#[derive(Debug)]
pub struct ChunkRegion {
    map: Arc<Mmap>,
    map_offset: GmemOffset,
    len: usize,
    guest_base: GuestAddress,
}

impl ChunkRegion {
    /// The offset in the guest_memfd (and its mapping) where this chunk lives.
    pub fn gmem_offset(&self) -> GmemOffset {
        self.map_offset
    }
}

impl GuestMemoryRegion for ChunkRegion {
    type B = ();

    fn len(&self) -> GuestUsize {
        self.len as GuestUsize
    }

    fn start_addr(&self) -> GuestAddress {
        self.guest_base
    }

    fn bitmap(&self) {}

    fn get_host_address(&self, addr: MemoryRegionAddress) -> GuestMemoryResult<*mut u8> {
        let at = self
            .check_address(addr)
            .ok_or(GuestMemoryError::InvalidBackendAddress)?;
        Ok(self
            .map
            .host_address(self.map_offset.index() + at.0 as usize))
    }

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> GuestMemoryResult<VolatileSlice<'_>> {
        let start =
            usize::try_from(offset.0).map_err(|_| GuestMemoryError::InvalidBackendAddress)?;
        if start.checked_add(count).is_none_or(|end| end > self.len) {
            return Err(GuestMemoryError::InvalidBackendAddress);
        }
        Ok(self
            .map
            .volatile_slice(self.map_offset.index() + start, count))
    }
}

impl GuestMemoryRegionBytes for ChunkRegion {}

/// The guest's region table: one [`ChunkRegion`] per chunk, in guest-physical order.
pub type ChunkRegions = GuestRegionCollection<ChunkRegion>;

/// Guest memory that devices share: `memory()` is a consistent snapshot of the region
/// table, and a remap publishes the new one atomically.
pub type GmemAddressSpace = GuestMemoryAtomic<ChunkRegions>;

/// The regions of the chunks at `gmem_offsets` (guest order) of `layout`.
pub(crate) fn chunk_regions(
    map: &Arc<Mmap>,
    layout: &ChunkLayout,
    gmem_offsets: &[GmemOffset],
) -> Vec<Arc<ChunkRegion>> {
    gmem_offsets
        .iter()
        .enumerate()
        .map(|(chunk, &offset)| chunk_region(map, layout, chunk.into(), offset))
        .collect()
}

/// The region of guest chunk `chunk` of `layout` living at `gmem_offset`.
pub(crate) fn chunk_region(
    map: &Arc<Mmap>,
    layout: &ChunkLayout,
    chunk: ChunkIndex,
    gmem_offset: GmemOffset,
) -> Arc<ChunkRegion> {
    Arc::new(ChunkRegion {
        map: Arc::clone(map),
        map_offset: gmem_offset,
        len: layout.chunk_size as usize,
        guest_base: layout.gpa(layout.chunk_start(chunk)),
    })
}

/// A region table from chunk regions. They are sorted and disjoint by construction;
/// vm-memory checks again.
pub(crate) fn region_table(regions: &[Arc<ChunkRegion>]) -> Result<ChunkRegions, MemoryError> {
    GuestRegionCollection::from_arc_regions(regions.to_vec())
        .map_err(|e| MemoryError::Layout(format!("vm-memory refused the chunk table: {e}")))
}
