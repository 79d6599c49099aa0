//! `GuestMemory`: a gmem, its host mapping, and its memslots, laid out as equal chunks.
//!
//! Guest physical memory is cut into `chunks` equal pieces, one KVM memslot each, over one
//! guest_memfd that is larger by `spare_chunks` pieces. A chunk can be rebound to a spare
//! offset (delete and re-create its memslot) — the remap mechanism's only guest-visible step.
//! A single-slot layout is the special case of one chunk and no spares.

use std::os::fd::AsFd;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use kvm_ioctls::VmFd;
use serde::{Serialize, Serializer};
use vm_memory::{Address, GuestAddress, GuestMemoryAtomic};

use super::regions::{ChunkRegion, chunk_region, chunk_regions, region_table};
use super::{
    ChunkIndex, GmemAddressSpace, GmemFlags, GmemOffset, GuestMemfd, GuestOffset, MappedGmem,
    MemoryError, Placement, Policy, check_range, page_size,
};
use crate::sys::kvm::{MemslotRegion, set_user_memory_region2};
use crate::sys::mman::Mmap;

/// How guest memory is cut into memslots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ChunkLayout {
    /// Guest RAM in bytes (multiple of `chunk_size`).
    pub guest_size: u64,
    /// Bytes per chunk and memslot.
    pub chunk_size: u64,
    /// Extra chunk-sized room in the gmem, for remapping.
    pub spare_chunks: u64,
    /// Guest physical address of chunk 0.
    #[serde(serialize_with = "raw_gpa")]
    pub base_gpa: GuestAddress,
    /// KVM slot id of chunk 0; chunk i uses `first_slot + i`.
    pub first_slot: u32,
}

impl ChunkLayout {
    /// One memslot over the whole memory, no spare room.
    pub fn single_slot(guest_size: u64) -> Self {
        ChunkLayout {
            guest_size,
            chunk_size: guest_size,
            spare_chunks: 0,
            base_gpa: GuestAddress(0),
            first_slot: 0,
        }
    }

    /// Equal chunks of `chunk_size`, plus `spare_chunks` of room.
    pub fn chunked(guest_size: u64, chunk_size: u64, spare_chunks: u64) -> Self {
        ChunkLayout {
            guest_size,
            chunk_size,
            spare_chunks,
            base_gpa: GuestAddress(0),
            first_slot: 0,
        }
    }

    /// Number of guest chunks (memslots).
    pub fn chunks(&self) -> u64 {
        self.guest_size / self.chunk_size
    }

    /// Every guest chunk, in guest order.
    pub fn chunk_indices(&self) -> impl Iterator<Item = ChunkIndex> + use<> {
        (0..self.chunks()).map(ChunkIndex)
    }

    /// Where guest chunk `chunk` starts in guest RAM.
    pub fn chunk_start(&self, chunk: ChunkIndex) -> GuestOffset {
        GuestOffset(chunk.raw() * self.chunk_size)
    }

    /// The chunk that holds `offset`, and how far into it `offset` is.
    pub fn chunk_of(&self, offset: GuestOffset) -> (ChunkIndex, u64) {
        (
            ChunkIndex(offset.raw() / self.chunk_size),
            offset.raw() % self.chunk_size,
        )
    }

    /// The guest-physical address of `offset`.
    pub fn gpa(&self, offset: GuestOffset) -> GuestAddress {
        self.base_gpa.unchecked_add(offset.raw())
    }

    /// The offset into guest RAM of guest-physical `gpa`, or `None` outside RAM.
    pub fn guest_offset(&self, gpa: GuestAddress) -> Option<GuestOffset> {
        gpa.checked_offset_from(self.base_gpa)
            .filter(|&rel| rel < self.guest_size)
            .map(GuestOffset)
    }

    /// The gmem offset of the `n`-th chunk-sized piece of the gmem (where guest chunk `n`
    /// starts before any remap, and where the spares follow the guest chunks).
    pub(crate) fn gmem_piece(&self, n: u64) -> GmemOffset {
        GmemOffset(n * self.chunk_size)
    }

    /// The KVM slot id of guest chunk `chunk`.
    fn slot(&self, chunk: ChunkIndex) -> u32 {
        self.first_slot + chunk.raw() as u32
    }

    /// Size of the backing gmem: guest chunks plus spares.
    pub fn gmem_size(&self) -> u64 {
        (self.chunks() + self.spare_chunks) * self.chunk_size
    }

    /// Checks that the pieces fit together.
    pub fn validate(&self) -> Result<(), MemoryError> {
        let page = page_size();
        if self.guest_size == 0 {
            return Err(MemoryError::ZeroSize);
        }
        if !self.guest_size.is_multiple_of(page) {
            return Err(MemoryError::SizeNotPageAligned {
                size: self.guest_size,
                page,
            });
        }
        if self.chunk_size == 0 || !self.chunk_size.is_multiple_of(page) {
            return Err(MemoryError::Layout(format!(
                "chunk size {} is not a positive multiple of the {page} byte page size",
                self.chunk_size
            )));
        }
        if !self.guest_size.is_multiple_of(self.chunk_size) {
            return Err(MemoryError::Layout(format!(
                "guest size {} is not a whole number of {} byte chunks",
                self.guest_size, self.chunk_size
            )));
        }
        if !self.base_gpa.raw_value().is_multiple_of(page) {
            return Err(MemoryError::Layout(format!(
                "base guest address {:#x} is not page-aligned",
                self.base_gpa.raw_value()
            )));
        }
        Ok(())
    }
}

/// The base address as the number it always was in JSON (vm-memory has no serde).
fn raw_gpa<S: Serializer>(gpa: &GuestAddress, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(gpa.raw_value())
}

/// Where each chunk lives in the gmem, and which gmem chunks are free.
#[derive(Debug, Clone)]
struct ChunkTable {
    /// gmem offset of guest chunk i.
    offsets: Vec<GmemOffset>,
    /// gmem offsets not backing any chunk.
    spare: Vec<GmemOffset>,
    /// Whether the memslots are registered with KVM.
    bound: bool,
    /// Guest chunk i as a vm-memory region (empty when the host cannot map the gmem).
    regions: Vec<Arc<ChunkRegion>>,
}

/// Guest RAM on one guest_memfd, mapped by the host and bound to a VM as chunk memslots.
#[derive(Debug)]
pub struct GuestMemory {
    vm: Arc<VmFd>,
    layout: ChunkLayout,
    /// The gmem and, unless it is confidential, its mapping.
    host: MappedGmem,
    table: RwLock<ChunkTable>,
    /// The chunk table as vm-memory regions, for devices and loaders (`None` when the host
    /// cannot map the gmem). Updated under the `table` write lock.
    address_space: Option<GmemAddressSpace>,
}

impl GuestMemory {
    /// Creates the gmem for `layout` and maps it if `flags` allow. No memslots yet.
    pub fn create(
        vm: Arc<VmFd>,
        layout: ChunkLayout,
        flags: GmemFlags,
    ) -> Result<Self, MemoryError> {
        layout.validate()?;
        let gmem = GuestMemfd::create(&vm, layout.gmem_size(), flags)?;
        let map = if gmem.is_host_mappable() {
            Some(gmem.map()?)
        } else {
            None
        };
        let chunks = layout.chunks();
        let offsets: Vec<GmemOffset> = (0..chunks).map(|i| layout.gmem_piece(i)).collect();
        let host = MappedGmem::new(gmem, map);
        let (regions, address_space) = match host.shared_mapping() {
            Ok(map) => {
                let regions = chunk_regions(map, &layout, &offsets);
                let space = GuestMemoryAtomic::new(region_table(&regions)?);
                (regions, Some(space))
            }
            Err(_) => (Vec::new(), None),
        };
        let table = ChunkTable {
            offsets,
            spare: (chunks..chunks + layout.spare_chunks)
                .rev()
                .map(|i| layout.gmem_piece(i))
                .collect(),
            bound: false,
            regions,
        };
        Ok(GuestMemory {
            vm,
            layout,
            host,
            table: RwLock::new(table),
            address_space,
        })
    }

    /// The VM this memory belongs to.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// The layout.
    pub fn layout(&self) -> &ChunkLayout {
        &self.layout
    }

    /// The backing guest_memfd.
    pub fn gmem(&self) -> &GuestMemfd {
        self.host.gmem()
    }

    /// The gmem with its host mapping: the range operations owned and attached memory share.
    pub fn mapped(&self) -> &MappedGmem {
        &self.host
    }

    /// The host mapping of the whole gmem (spares included). Refused for confidential gmem.
    pub fn mapping(&self) -> Result<&Mmap, MemoryError> {
        self.host.mapping()
    }

    /// Guest RAM through vm-memory's traits, for rust-vmm devices, virtio queues and
    /// linux-loader: `memory()` gives a snapshot of the chunk table, and each
    /// [`rebind_chunk`](Self::rebind_chunk) publishes the new table in one atomic swap.
    /// Clones share the table. Refused for confidential gmem.
    ///
    /// A device should take `memory()` per access, as virtio devices do per request. A
    /// device that writes guest memory while a migration runs must be stopped with the vCPUs
    /// by the migration's [`Quiesce`](crate::migrate::Quiesce): a write between a chunk's
    /// copy and its swap would land in the chunk's old place.
    pub fn vm_memory(&self) -> Result<GmemAddressSpace, MemoryError> {
        self.address_space
            .clone()
            .ok_or(MemoryError::NotHostMappable {
                flags: self.gmem().flags(),
            })
    }

    fn table(&self) -> RwLockReadGuard<'_, ChunkTable> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn table_mut(&self) -> RwLockWriteGuard<'_, ChunkTable> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    fn region(
        &self,
        chunk: ChunkIndex,
        gmem_offset: GmemOffset,
        size: u64,
    ) -> Result<MemslotRegion, MemoryError> {
        let layout = &self.layout;
        Ok(MemslotRegion {
            slot: layout.slot(chunk),
            guest_phys_addr: layout.gpa(layout.chunk_start(chunk)).raw_value(),
            size,
            userspace_addr: (self.mapping()?.addr() as u64) + gmem_offset.raw(),
            gmem_offset: gmem_offset.raw(),
        })
    }

    fn set_slot(&self, region: MemslotRegion) -> Result<(), MemoryError> {
        set_user_memory_region2(&self.vm, self.gmem().as_fd(), region).map_err(|source| {
            MemoryError::SetMemslot {
                slot: region.slot,
                source,
            }
        })
    }

    /// Registers one memslot per chunk with KVM (`KVM_SET_USER_MEMORY_REGION2`).
    pub fn bind_to_vm(&self) -> Result<(), MemoryError> {
        let mut table = self.table_mut();
        for (chunk, &offset) in table.offsets.iter().enumerate() {
            let region = self.region(chunk.into(), offset, self.layout.chunk_size)?;
            if let Err(e) = self.set_slot(region) {
                // Leave no half-bound VM behind.
                for (done, &offset) in table.offsets[..chunk].iter().enumerate() {
                    let _ = self.set_slot(self.region(done.into(), offset, 0)?);
                }
                return Err(e);
            }
        }
        table.bound = true;
        Ok(())
    }

    /// Whether the chunks are bound to the VM as memslots ([`bind_to_vm`](Self::bind_to_vm)),
    /// so that rebinding one goes through KVM.
    pub fn bound_to_vm(&self) -> bool {
        self.table().bound
    }

    /// The gmem offset that backs guest chunk `chunk`.
    pub fn chunk_offset(&self, chunk: ChunkIndex) -> GmemOffset {
        self.table().offsets[chunk.index()]
    }

    /// gmem offsets of all guest chunks, in guest order.
    pub fn chunk_offsets(&self) -> Vec<GmemOffset> {
        self.table().offsets.clone()
    }

    /// Number of free spare chunks.
    pub fn spare_chunks(&self) -> usize {
        self.table().spare.len()
    }

    /// Takes a free gmem chunk offset from the spare pool.
    pub fn take_spare(&self) -> Option<GmemOffset> {
        self.table_mut().spare.pop()
    }

    /// Returns a gmem chunk offset to the spare pool (its pages should be punched first).
    pub fn return_spare(&self, offset: GmemOffset) {
        let mut table = self.table_mut();
        debug_assert!(!table.offsets.contains(&offset) && !table.spare.contains(&offset));
        table.spare.push(offset);
    }

    /// Points guest chunk `chunk` at gmem offset `new_offset`: deletes the memslot and
    /// re-creates it there (KVM cannot move a slot's gmem binding in place). Returns the old
    /// offset. The caller must have stopped every vCPU: a vCPU touching the chunk between
    /// delete and create would exit with a fault. If the re-create fails, the old binding is
    /// restored before the error is returned.
    pub fn rebind_chunk(
        &self,
        chunk: ChunkIndex,
        new_offset: GmemOffset,
    ) -> Result<GmemOffset, MemoryError> {
        let size = self.layout.chunk_size;
        check_range(new_offset, size, self.gmem().size())?;
        let mut table = self.table_mut();
        let old_offset = table.offsets[chunk.index()];
        // The new region table is built before any slot changes, so nothing can fail after.
        let published = match (&self.address_space, self.host.shared_mapping()) {
            (Some(_), Ok(map)) => {
                let mut regions = table.regions.clone();
                regions[chunk.index()] = chunk_region(map, &self.layout, chunk, new_offset);
                let next = region_table(&regions)?;
                Some((regions, next))
            }
            _ => None,
        };
        if table.bound {
            self.set_slot(self.region(chunk, old_offset, 0)?)?;
            if let Err(e) = self.set_slot(self.region(chunk, new_offset, size)?) {
                self.set_slot(self.region(chunk, old_offset, size)?)?;
                return Err(e);
            }
        }
        table.offsets[chunk.index()] = new_offset;
        if let (Some(space), Some((regions, next))) = (&self.address_space, published) {
            table.regions = regions;
            space
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .replace(next);
        }
        Ok(old_offset)
    }

    /// The gmem offset (and mapping offset) of guest physical address `gpa`, or `None`
    /// outside RAM.
    pub fn host_offset(&self, gpa: GuestAddress) -> Option<GmemOffset> {
        let (chunk, within) = self.layout.chunk_of(self.layout.guest_offset(gpa)?);
        Some(self.table().offsets[chunk.index()] + within)
    }

    /// Splits `gpa..gpa+len` into (gmem offset, length) pieces that stay within chunks.
    fn host_pieces(
        &self,
        gpa: GuestAddress,
        len: u64,
    ) -> Result<Vec<(GmemOffset, u64)>, MemoryError> {
        let layout = &self.layout;
        let start = gpa
            .checked_offset_from(layout.base_gpa)
            .map(GuestOffset)
            .filter(|rel| {
                rel.checked_add(len)
                    .is_some_and(|e| e.raw() <= layout.guest_size)
            });
        let Some(start) = start else {
            return Err(MemoryError::GuestRangeOutsideRam {
                gpa: gpa.raw_value(),
                len,
                base: layout.base_gpa.raw_value(),
                size: layout.guest_size,
            });
        };
        let table = self.table();
        let mut pieces = Vec::new();
        let (mut at, end) = (start, start + len);
        while at < end {
            let (chunk, within) = layout.chunk_of(at);
            let take = (layout.chunk_size - within).min(end.bytes_since(at));
            pieces.push((table.offsets[chunk.index()] + within, take));
            at += take;
        }
        Ok(pieces)
    }

    /// Copies guest memory at `gpa` into `buf`.
    pub fn read_guest(&self, gpa: GuestAddress, buf: &mut [u8]) -> Result<(), MemoryError> {
        let map = self.mapping()?;
        let mut done = 0usize;
        for (offset, len) in self.host_pieces(gpa, buf.len() as u64)? {
            map.read(offset.index(), &mut buf[done..done + len as usize]);
            done += len as usize;
        }
        Ok(())
    }

    /// Copies `buf` into guest memory at `gpa`.
    pub fn write_guest(&self, gpa: GuestAddress, buf: &[u8]) -> Result<(), MemoryError> {
        let map = self.mapping()?;
        let mut done = 0usize;
        for (offset, len) in self.host_pieces(gpa, buf.len() as u64)? {
            map.write(offset.index(), &buf[done..done + len as usize]);
            done += len as usize;
        }
        Ok(())
    }

    /// Sets the NUMA policy of a gmem range (mapping offsets) for future allocations
    /// (`mbind(2)` without MOVE). Nodes are checked against the live topology first.
    pub fn set_policy(
        &self,
        offset: GmemOffset,
        len: u64,
        policy: &Policy,
    ) -> Result<(), MemoryError> {
        self.host.set_policy(offset, len, policy)
    }

    /// [`set_policy`](Self::set_policy) without the topology check, for callers that
    /// validated their nodes once (the migration engine, inside a stop).
    pub(crate) fn set_policy_unchecked(
        &self,
        offset: GmemOffset,
        len: u64,
        policy: &Policy,
    ) -> Result<(), MemoryError> {
        self.host.set_policy_unchecked(offset, len, policy)
    }

    /// The NUMA policy in force at a gmem offset (`get_mempolicy(MPOL_F_ADDR)`).
    pub fn policy_at(&self, offset: GmemOffset) -> Result<Policy, MemoryError> {
        self.host.policy_at(offset)
    }

    /// Where each page of a gmem range (mapping offsets) is resident.
    pub fn placement(&self, offset: GmemOffset, len: u64) -> Result<Placement, MemoryError> {
        self.host.placement(offset, len)
    }

    /// Where each page of guest RAM is, in guest-physical order (follows remapped chunks).
    pub fn guest_placement(&self) -> Result<Placement, MemoryError> {
        crate::migrate::MovableMemory::guest_placement(self)
    }

    /// Frees a gmem range's pages (see [`MappedGmem::discard`]).
    pub fn discard(&self, offset: GmemOffset, len: u64) -> Result<(), MemoryError> {
        self.host.discard(offset, len)
    }

    /// Faults in a gmem range for writing in one call (`MADV_POPULATE_WRITE`).
    pub fn populate(&self, offset: GmemOffset, len: u64) -> Result<(), MemoryError> {
        self.host.populate(offset, len)
    }
}

impl Drop for GuestMemory {
    /// Deletes the memslots before the mapping goes away, so KVM never holds a dangling
    /// host address.
    fn drop(&mut self) {
        let table = self
            .table
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if table.bound {
            for (chunk, &offset) in table.offsets.iter().enumerate() {
                if let Ok(region) = self.region(chunk.into(), offset, 0) {
                    let _ = self.set_slot(region);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_converts_between_addresses_offsets_and_chunks() {
        let layout = ChunkLayout {
            base_gpa: GuestAddress(0x4000_0000),
            ..ChunkLayout::chunked(8 << 20, 2 << 20, 1)
        };
        let gpa = GuestAddress(0x4000_0000 + (5 << 20) + 12);
        let offset = layout.guest_offset(gpa).unwrap();
        assert_eq!(offset, GuestOffset((5 << 20) + 12));
        assert_eq!(layout.gpa(offset), gpa);
        assert_eq!(layout.chunk_of(offset), (ChunkIndex(2), (1 << 20) + 12));
        assert_eq!(layout.chunk_start(ChunkIndex(2)), GuestOffset(4 << 20));
        assert_eq!(layout.guest_offset(GuestAddress(0x3fff_ffff)), None);
        assert_eq!(
            layout.guest_offset(GuestAddress(0x4000_0000 + (8 << 20))),
            None
        );
        assert_eq!(
            layout.chunk_indices().collect::<Vec<_>>(),
            (0..4).map(ChunkIndex).collect::<Vec<_>>()
        );
        assert_eq!(
            serde_json::to_value(layout).unwrap()["base_gpa"],
            0x4000_0000u64
        );
    }
}
