//! Scratch gmem for the refault mechanism: reserves room on the target before a step
//! touches anything, and, for relocations within a node, soaks up the frames a punch just
//! freed so the batch cannot get them back.

use std::sync::Arc;

use kvm_ioctls::VmFd;

use crate::memory::{GmemFlags, GuestMemfd, MemoryError, Policy};
use crate::numa::{NodeId, NodeMask};
use crate::sys::mempolicy;
use crate::sys::mman::Mmap;

/// A private gmem twice the largest batch: the first half reserves, the second soaks.
#[derive(Debug)]
pub(crate) struct Scratch {
    gmem: GuestMemfd,
    map: Mmap,
    size: u64,
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
        })
    }

    fn allocate_on(&self, offset: u64, len: u64, node: NodeId) -> Result<(), MemoryError> {
        let (mode, nodes) = Policy::Bind(NodeMask::single(node)).to_raw();
        mempolicy::mbind(
            &self.map,
            offset as usize,
            len as usize,
            mode,
            nodes.as_raw(),
            0,
        )
        .map_err(|source| MemoryError::Mbind {
            offset,
            len,
            source,
        })?;
        self.gmem.allocate(offset, len).inspect_err(|_| {
            let _ = self.gmem.punch(offset, len);
        })
    }

    /// Takes `len` bytes on `node`, proving the node (and the memory cgroup) can supply them.
    pub fn reserve(&self, len: u64, node: NodeId) -> Result<(), MemoryError> {
        self.allocate_on(0, len.min(self.size), node)
    }

    /// Gives the reservation back, so the step's own allocation can take its frames.
    pub fn release(&self) {
        let _ = self.gmem.punch(0, self.size);
    }

    /// Allocates `len` bytes on `node` right after a punch: the freed frames are the
    /// hottest on the free lists, so the soak takes them and holds them while the batch
    /// allocates. Best effort: a failed soak only weakens the new-frame guarantee.
    pub fn soak(&self, len: u64, node: NodeId) -> bool {
        self.allocate_on(self.size, len.min(self.size), node)
            .is_ok()
    }

    /// Frees the soak.
    pub fn drain_soak(&self) {
        let _ = self.gmem.punch(self.size, self.size);
    }
}
