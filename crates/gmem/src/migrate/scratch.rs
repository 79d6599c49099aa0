//! Scratch gmem for the refault mechanism: reserves room on the target before a step
//! touches anything, and, for relocations within a node, soaks up the frames a punch just
//! freed so the batch cannot get them back.

use std::sync::Arc;

use kvm_ioctls::VmFd;

use crate::memory::{GmemFlags, GmemOffset, GuestMemfd, MemoryError, Policy, RoomCredit};
use crate::numa::{NodeId, NodeMask};
use crate::sys::mman::Mmap;

/// A private gmem twice the largest batch: the first half reserves, the second soaks.
#[derive(Debug)]
pub(crate) struct Scratch {
    gmem: GuestMemfd,
    map: Mmap,
    size: u64,
    /// The target's room, read once per many batches rather than before each.
    room: std::sync::Mutex<RoomCredit>,
}

impl Scratch {
    /// Scratch room for batches of up to `max_batch` bytes.
    pub fn new(vm: &Arc<VmFd>, max_batch: u64) -> Result<Self, MemoryError> {
        let gmem = GuestMemfd::create(vm, 2 * max_batch, GmemFlags::HOST_MAPPABLE)?;
        let map = gmem.map()?;
        Ok(Scratch {
            gmem,
            map,
            size: max_batch,
            room: std::sync::Mutex::default(),
        })
    }

    fn allocate_on(&self, offset: GmemOffset, len: u64, node: NodeId) -> Result<(), MemoryError> {
        Policy::Bind(NodeMask::single(node)).apply(&self.map, offset, len)?;
        self.gmem.allocate(offset, len).inspect_err(|_| {
            let _ = self.gmem.punch(offset, len);
        })
    }

    /// Takes `len` bytes on `node`, proving the node (and the memory cgroup) can supply them.
    /// A node without room for them is refused before anything is allocated: there the
    /// allocation would run the OOM killer rather than fail.
    pub fn reserve(&self, len: u64, node: NodeId) -> Result<(), MemoryError> {
        let len = len.min(self.size);
        self.room
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ensure(node, len)?;
        self.allocate_on(GmemOffset(0), len, node)
    }

    /// Gives back `len` bytes of the reservation from `at`, so an allocation on this CPU
    /// takes their frames next.
    pub fn release(&self, at: u64, len: u64) {
        let _ = self.gmem.punch(GmemOffset(at), len);
    }

    /// Allocates `len` bytes on `node` in the soak half at `at`, right after a punch: the
    /// freed frames are the hottest on this CPU's free lists, so the soak takes them and
    /// holds them while the batch allocates. Best effort: a failed soak only weakens the
    /// new-frame guarantee.
    pub fn soak(&self, at: u64, len: u64, node: NodeId) -> bool {
        self.allocate_on(GmemOffset(self.size + at), len, node)
            .is_ok()
    }

    /// Allocates `len` bytes on `node` in the (released) reservation half at `at`: like a
    /// soak, it takes frames just freed on this CPU and holds them. Best effort.
    pub fn hold(&self, at: u64, len: u64, node: NodeId) -> bool {
        self.allocate_on(GmemOffset(at), len, node).is_ok()
    }

    /// Frees whatever is still reserved or soaked.
    pub fn release_all(&self) {
        let _ = self.gmem.punch(GmemOffset(0), 2 * self.size);
    }
}
