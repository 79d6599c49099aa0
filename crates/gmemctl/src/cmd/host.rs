//! What `selftest` and `bench` need from the host: a VM, the gmem flags it offers, and the
//! two nodes to move between (the same node twice on a one-node host).

use std::path::Path;
use std::sync::Arc;

use gmem::memory::{GmemFlags, GuestMemfd, MemoryError};
use gmem::numa::{NodeId, Topology};
use kvm_ioctls::VmFd;

use crate::error::CliError;

/// The chunk size of the remap layouts these commands build.
pub const CHUNK: u64 = 2 << 20;

/// A VM to create test memory in, and where to move it.
#[derive(Debug)]
pub struct TestHost {
    pub vm: Arc<VmFd>,
    /// MMAP|INIT_SHARED, plus MIGRATABLE where the kernel offers it.
    pub flags: GmemFlags,
    pub topology: Topology,
    /// The first node with memory.
    pub home: NodeId,
    /// The second node with memory, or `home` on a one-node host.
    pub away: NodeId,
}

impl TestHost {
    /// Opens KVM at `kvm_device` and reads the topology.
    pub fn open(kvm_device: &Path) -> Result<Self, CliError> {
        let kvm = gmem::sys::kvm::open(kvm_device)?;
        let vm = Arc::new(gmem::sys::kvm::create_vm(&kvm)?);
        let flags = GuestMemfd::host_mappable_flags(&vm).ok_or(MemoryError::NotHostMappable {
            flags: GuestMemfd::supported_flags(&vm).unwrap_or_default(),
        })?;
        let topology = Topology::read().map_err(MemoryError::from)?;
        let nodes = topology.memory_nodes();
        let home = *nodes
            .first()
            .ok_or_else(|| CliError::CheckFailed("no NUMA node with memory found".into()))?;
        let away = nodes.get(1).copied().unwrap_or(home);
        Ok(TestHost {
            vm,
            flags,
            topology,
            home,
            away,
        })
    }
}

/// Refuses a `--size` that is not a positive multiple of [`CHUNK`].
pub fn check_chunked_size(size: u64) -> Result<(), CliError> {
    if size < CHUNK || !size.is_multiple_of(CHUNK) {
        return Err(CliError::InvalidArgument(format!(
            "--size {size} is not a positive multiple of 2 MiB: the remap layout uses 2 MiB chunks"
        )));
    }
    Ok(())
}
