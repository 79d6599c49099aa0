//! `MovableMemory`: what the engine needs of guest memory, whoever owns it — a gmem with this
//! process's mapping of it, the layout of guest RAM over it, and a VM for scratch gmem.

use std::sync::Arc;

use kvm_ioctls::VmFd;

use crate::sys::mempolicy::{MPOL_MF_MOVE, MPOL_MF_MOVE_ALL};

use crate::memory::{
    AttachedGmem, ChunkIndex, ChunkLayout, GmemFlags, GmemOffset, GuestMemory, GuestOffset,
    MappedGmem, MemoryError, Placement, page_size,
};

/// Guest memory the [`Migrator`](super::Migrator) can move. Owned memory
/// ([`GuestMemory`]) and memory taken from another process ([`ForeignMemory`]) implement
/// it, so both go through the same planner, mechanisms, verification and report.
pub trait MovableMemory: Sync {
    /// The gmem and this process's mapping of it, through which every range operation
    /// (policy, punch, refault, placement) is made. `Err` for memory the engine must not
    /// touch at all.
    fn host(&self) -> Result<&MappedGmem, MemoryError>;

    /// How guest RAM is cut into chunks over the gmem.
    fn layout(&self) -> ChunkLayout;

    /// The gmem offset that backs guest chunk `chunk`.
    fn chunk_offset(&self, chunk: ChunkIndex) -> GmemOffset;

    /// A VM of this process, in which the engine creates scratch gmem (refault's
    /// reservations, the native probe).
    fn scratch_vm(&self) -> &Arc<VmFd>;

    /// Whether the gmem was created MIGRATABLE: `Some` where the flags are known, `None`
    /// where they cannot be told from outside.
    fn migratable(&self) -> Option<bool>;

    /// The move_pages flag that moves this memory's pages.
    fn move_flag(&self) -> u32 {
        MPOL_MF_MOVE
    }

    /// The owned memory, whose memslots this process can rebind (the remap mechanism and
    /// confidential memory need that); `None` for memory another process binds.
    fn remappable(&self) -> Option<&GuestMemory> {
        None
    }

    /// gmem offsets of all guest chunks, in guest order.
    fn chunk_offsets(&self) -> Vec<GmemOffset> {
        self.layout()
            .chunk_indices()
            .map(|chunk| self.chunk_offset(chunk))
            .collect()
    }

    /// The gmem offset that backs `offset` of guest RAM (through its chunk's current place).
    fn gmem_offset(&self, offset: GuestOffset) -> GmemOffset {
        let (chunk, within) = self.layout().chunk_of(offset);
        self.chunk_offset(chunk) + within
    }

    /// Where each page of guest RAM is, in guest-physical order (follows remapped chunks).
    fn guest_placement(&self) -> Result<Placement, MemoryError> {
        let page = page_size();
        let chunk_size = self.layout().chunk_size;
        let map = self.host()?.mapping()?;
        let offsets = self.chunk_offsets();
        for &offset in &offsets {
            crate::memory::map_resident(map, offset, chunk_size)?;
        }
        let addrs: Vec<usize> = offsets
            .iter()
            .flat_map(|&off| (0..chunk_size / page).map(move |p| off + p * page))
            .map(|off| map.addr() + off.index())
            .collect();
        Placement::query_addrs(0, &addrs, page)
    }
}

impl MovableMemory for GuestMemory {
    fn host(&self) -> Result<&MappedGmem, MemoryError> {
        Ok(self.mapped())
    }

    fn layout(&self) -> ChunkLayout {
        *GuestMemory::layout(self)
    }

    fn chunk_offset(&self, chunk: ChunkIndex) -> GmemOffset {
        GuestMemory::chunk_offset(self, chunk)
    }

    fn chunk_offsets(&self) -> Vec<GmemOffset> {
        GuestMemory::chunk_offsets(self)
    }

    fn scratch_vm(&self) -> &Arc<VmFd> {
        self.vm()
    }

    fn migratable(&self) -> Option<bool> {
        Some(self.gmem().flags().contains(GmemFlags::MIGRATABLE))
    }

    fn remappable(&self) -> Option<&GuestMemory> {
        Some(self)
    }
}

/// Another process's gmem, as the engine moves it: the whole file as one chunk (its
/// memslots are not visible from outside, and guest order does not matter for placement),
/// and a VM of this process for the scratch gmem the mechanisms need.
#[derive(Debug)]
pub struct ForeignMemory<'a> {
    gmem: &'a AttachedGmem,
    scratch_vm: Arc<VmFd>,
}

impl<'a> ForeignMemory<'a> {
    /// `gmem`, moved with scratch gmem created in `scratch_vm` (a VM of this process).
    pub fn new(gmem: &'a AttachedGmem, scratch_vm: Arc<VmFd>) -> Self {
        ForeignMemory { gmem, scratch_vm }
    }

    /// The attached gmem.
    pub fn gmem(&self) -> &AttachedGmem {
        self.gmem
    }
}

impl MovableMemory for ForeignMemory<'_> {
    fn host(&self) -> Result<&MappedGmem, MemoryError> {
        self.gmem.mapped()
    }

    fn layout(&self) -> ChunkLayout {
        self.gmem.layout()
    }

    fn chunk_offset(&self, _chunk: ChunkIndex) -> GmemOffset {
        GmemOffset(0)
    }

    fn scratch_vm(&self) -> &Arc<VmFd> {
        &self.scratch_vm
    }

    /// The VMM maps some of these pages too (what it loaded itself, its virtio rings), and
    /// move_pages leaves such folios alone unless told to move shared ones; `--pid` runs as
    /// root, which has the CAP_SYS_NICE that needs.
    fn move_flag(&self) -> u32 {
        MPOL_MF_MOVE_ALL
    }

    fn migratable(&self) -> Option<bool> {
        let flags = self.gmem.flags();
        if flags.set.contains(GmemFlags::MIGRATABLE) {
            Some(true)
        } else if flags.unknown.contains(GmemFlags::MIGRATABLE) {
            None
        } else {
            Some(false)
        }
    }
}
