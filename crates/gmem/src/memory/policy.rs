//! `Policy`: a NUMA memory policy for a range of guest memory, in mbind's terms.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{GmemOffset, MemoryError};
use crate::numa::{NodeId, NodeMask, Topology};
use crate::sys::mempolicy::{
    MPOL_BIND, MPOL_DEFAULT, MPOL_INTERLEAVE, MPOL_LOCAL, MPOL_PREFERRED, MPOL_PREFERRED_MANY,
    MPOL_WEIGHTED_INTERLEAVE, RawNodeMask,
};

/// Where future allocations of a range may come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode", content = "nodes")]
pub enum Policy {
    /// The task's policy (usually: the local node).
    Default,
    /// Only these nodes.
    Bind(NodeMask),
    /// This node first, others if it is full.
    Preferred(NodeId),
    /// Page by page across these nodes.
    Interleave(NodeMask),
    /// The node of the allocating CPU.
    Local,
    /// A mode this crate does not model (kernel number).
    Other(i32),
}

impl Policy {
    /// Mode and nodes in mbind's terms.
    pub(crate) fn to_raw(&self) -> (i32, NodeMask) {
        match self {
            Policy::Default => (MPOL_DEFAULT, NodeMask::new()),
            Policy::Bind(nodes) => (MPOL_BIND, *nodes),
            Policy::Preferred(node) => (MPOL_PREFERRED, NodeMask::single(*node)),
            Policy::Interleave(nodes) => (MPOL_INTERLEAVE, *nodes),
            Policy::Local => (MPOL_LOCAL, NodeMask::new()),
            Policy::Other(mode) => (*mode, NodeMask::new()),
        }
    }

    /// Decodes what get_mempolicy returned. Mode flags (STATIC/RELATIVE) are dropped.
    pub(crate) fn from_raw(mode: i32, nodes: RawNodeMask) -> Self {
        let nodes = NodeMask::from_raw(nodes);
        match mode & 0xff {
            MPOL_DEFAULT => Policy::Default,
            MPOL_BIND => Policy::Bind(nodes),
            MPOL_PREFERRED => nodes.first().map_or(Policy::Local, Policy::Preferred),
            MPOL_INTERLEAVE => Policy::Interleave(nodes),
            MPOL_LOCAL => Policy::Local,
            m @ (MPOL_PREFERRED_MANY | MPOL_WEIGHTED_INTERLEAVE) => Policy::Other(m),
            m => Policy::Other(m),
        }
    }

    /// Sets this policy on a page-aligned range of a mapping for future allocations
    /// (`mbind(2)` without MOVE). Nodes are not checked here; see [`validate`](Self::validate).
    pub(crate) fn apply(
        &self,
        map: &crate::sys::mman::Mmap,
        offset: GmemOffset,
        len: u64,
    ) -> Result<(), MemoryError> {
        let (mode, nodes) = self.to_raw();
        crate::sys::mempolicy::mbind(map, offset.index(), len as usize, mode, nodes.as_raw(), 0)
            .map_err(|source| MemoryError::Mbind {
                offset: offset.raw(),
                len,
                source,
            })
    }

    /// The nodes the policy names.
    pub fn nodes(&self) -> NodeMask {
        self.to_raw().1
    }

    /// Fails with `NoSuchNode` if the policy names a node that is not online.
    pub fn validate(&self, topology: &Topology) -> Result<(), MemoryError> {
        let online = topology.node_mask();
        match self.nodes().difference(&online).first() {
            Some(node) => Err(MemoryError::NoSuchNode {
                node,
                online: online.to_string(),
            }),
            None => Ok(()),
        }
    }
}

/// The policy as numa_maps prints it: "default", "bind:0-1", "prefer:1", ...
impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::Default => f.write_str("default"),
            Policy::Bind(nodes) => write!(f, "bind:{nodes}"),
            Policy::Preferred(node) => write!(f, "prefer:{node}"),
            Policy::Interleave(nodes) => write!(f, "interleave:{nodes}"),
            Policy::Local => f.write_str("local"),
            Policy::Other(mode) => write!(f, "mode-{mode}"),
        }
    }
}

/// The first kernel that keeps a guest_memfd's NUMA policy per inode (shared by every mapping
/// and by KVM's own faults for the guest) rather than per mapping (pull "kvm-x86-gmem-6.19").
/// The lab's `gmem-policy` test checks it on the kernels it boots.
pub const PER_INODE_POLICY_SINCE: (u32, u32) = (6, 19);

/// Whether a kernel of `release` ("6.18.44-fc-v657", "7.3.4+deb13-cloud-amd64") keeps a
/// guest_memfd's policy per inode; `None` if the release cannot be read.
pub fn policy_is_per_inode(release: &str) -> Option<bool> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let version: (u32, u32) = (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
    Some(version >= PER_INODE_POLICY_SINCE)
}

/// The running kernel's release (`/proc/sys/kernel/osrelease`), or "unknown".
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_which_kernels_keep_the_policy_per_inode() {
        assert_eq!(policy_is_per_inode("6.18.44-fc-v657"), Some(false));
        assert_eq!(policy_is_per_inode("7.3.4+deb13-cloud-amd64"), Some(true));
        assert_eq!(policy_is_per_inode("6.19"), Some(true));
        assert_eq!(policy_is_per_inode("garbage"), None);
    }

    #[test]
    fn raw_round_trip() {
        for policy in [
            Policy::Default,
            Policy::Bind("0-1".parse().unwrap()),
            Policy::Preferred(NodeId(1)),
            Policy::Interleave("0,2".parse().unwrap()),
            Policy::Local,
        ] {
            let (mode, nodes) = policy.to_raw();
            let back = Policy::from_raw(mode, *nodes.as_raw());
            // The kernel reports no nodes for default/local.
            assert_eq!(back, policy);
        }
        assert_eq!(Policy::Bind("0-1".parse().unwrap()).to_string(), "bind:0-1");
    }
}
