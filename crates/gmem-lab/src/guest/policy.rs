//! `gmem-policy`: does a NUMA policy set through one mapping of a guest_memfd reach the
//! allocations of another mapping, and of KVM? This is what `gmemctl migrate --pid` relies
//! on for a VMM's future allocations: it can only set the policy through its own mapping.
//!
//! One guest_memfd, two mappings: the VMM's and gmemctl's. The thread's own policy binds to
//! node 0, gmemctl's mapping binds to node 1 (mbind, nothing moved). Then three allocations:
//! - a write fault through the VMM's mapping;
//! - fallocate, which allocates with no mapping at all, through the same kvm_gmem_get_folio
//!   that KVM's own faults for the guest use;
//!
//! and the policy the VMM's mapping reports (get_mempolicy MPOL_F_ADDR). Node 1 means the
//! policy is the inode's; node 0 means it stayed with gmemctl's mapping.

use std::path::Path;

use gmem::memory::{GmemFlags, GmemOffset, GuestMemfd, Placement};
use gmem::numa::{NodeId, NodeMask};
use gmem::sys::kvm::DEFAULT_KVM_DEVICE;
use gmem::sys::mempolicy::{self, MPOL_BIND, MPOL_DEFAULT};
use gmem::sys::mman::Mmap;
use serde_json::{Value, json};

use super::Verdict;
use super::checks::GuestError;
use super::gmemctl::verdict;

const MIB: u64 = 1 << 20;
/// Each of the two allocations gets this much of the file.
const PART: u64 = 2 * MIB;
/// The node gmemctl's mapping binds to, and the node the thread's own policy binds to.
const TARGET: u32 = 1;
const TASK_NODE: u32 = 0;

/// Pages per node of `map[offset..offset + PART]`, after touching each page through `map`
/// with a read: a folio fallocate allocated is not uptodate, so mincore does not see it,
/// and the read fault maps the existing folio without allocating another.
fn nodes_of(map: &Mmap, offset: GmemOffset) -> Result<Value, GuestError> {
    let page = gmem::memory::page_size();
    for i in 0..PART / page {
        map.read_u64((offset + i * page).index());
    }
    let placement = Placement::query(map, offset, PART)?;
    Ok(json!(placement.per_node()))
}

/// Whether every page of a per-node count is on `node`.
fn all_on(per_node: &Value, node: u32) -> bool {
    per_node.as_object().is_some_and(|o| {
        o.iter()
            .all(|(n, p)| n == &node.to_string() || p.as_u64() == Some(0))
            && o.get(&node.to_string())
                .and_then(Value::as_u64)
                .unwrap_or(0)
                > 0
    })
}

/// The experiment, with the thread's policy bound to [`TASK_NODE`] by the caller.
fn observe() -> Result<Value, GuestError> {
    let kvm = gmem::sys::kvm::open(Path::new(DEFAULT_KVM_DEVICE))?;
    let vm = gmem::sys::kvm::create_vm(&kvm)?;
    let gmem = GuestMemfd::create(&vm, 2 * PART, GmemFlags::HOST_MAPPABLE)?;
    let vmm = gmem.map()?;
    let ours = gmem.map()?;
    let target = NodeMask::single(NodeId(TARGET));
    mempolicy::mbind(&ours, 0, ours.len(), MPOL_BIND, target.as_raw(), 0).map_err(|source| {
        GuestError::Mbind {
            node: TARGET,
            source,
        }
    })?;
    let seen = mempolicy::get_mempolicy_at(&vmm, 0).map_err(|source| GuestError::ReadSys {
        path: "get_mempolicy(MPOL_F_ADDR) at the VMM's mapping".into(),
        source,
    })?;
    let seen_mask = NodeMask::from_raw(seen.1);
    let vmm_sees_bind = seen.0 == MPOL_BIND && seen_mask == target;
    vmm.fill(0, PART as usize, 0x5a);
    let fault = nodes_of(&vmm, GmemOffset(0))?;
    gmem.allocate(GmemOffset(PART), PART)?;
    let fallocate = nodes_of(&vmm, GmemOffset(PART))?;
    Ok(json!({
        "vmm_mapping_policy": {"mode": seen.0, "nodes": seen_mask.to_string()},
        "vmm_mapping_sees_bind": vmm_sees_bind,
        "fault_through_vmm_mapping": fault,
        "fallocate_kvm_path": fallocate,
    }))
}

/// `gmem-policy`: the experiment above; passes when every allocation followed the policy
/// as gmemctl's report says this kernel does (per inode from 6.19: all on node 1; per
/// mapping before: none of it).
pub fn gmem_policy() -> Result<Verdict, GuestError> {
    let task = NodeMask::single(NodeId(TASK_NODE));
    mempolicy::set_mempolicy(MPOL_BIND, task.as_raw()).map_err(|source| GuestError::Mbind {
        node: TASK_NODE,
        source,
    })?;
    let observed = observe();
    let _ = mempolicy::set_mempolicy(MPOL_DEFAULT, NodeMask::new().as_raw());
    let observed = observed?;
    let release = gmem::memory::kernel_release();
    // What gmemctl's report claims for this kernel; the test checks the claim.
    let per_inode = gmem::memory::policy_is_per_inode(&release).unwrap_or(false);
    let expect = if per_inode { TARGET } else { TASK_NODE };
    let mut problems = Vec::new();
    if observed["vmm_mapping_sees_bind"] != per_inode {
        problems.push(format!(
            "the VMM's mapping reports {} after gmemctl's mapping was bound to node {TARGET}; \
             expected {} on {release}",
            observed["vmm_mapping_policy"],
            if per_inode {
                "that bind"
            } else {
                "its own policy"
            }
        ));
    }
    for key in ["fault_through_vmm_mapping", "fallocate_kvm_path"] {
        if !all_on(&observed[key], expect) {
            problems.push(format!(
                "{key}: pages per node {}, not all on node {expect} as a policy kept per {} \
                 puts them",
                observed[key],
                if per_inode { "inode" } else { "mapping" }
            ));
        }
    }
    let summary = format!(
        "{release}: a bind set through another mapping {} the VMM's mapping; a fault through \
         the VMM's mapping went to {}, fallocate (KVM's allocation path) to {}",
        if observed["vmm_mapping_sees_bind"] == true {
            "shows in"
        } else {
            "does not show in"
        },
        observed["fault_through_vmm_mapping"],
        observed["fallocate_kvm_path"]
    );
    let detail = json!({
        "kernel": release,
        "policy_per_inode_expected": per_inode,
        "observed": observed,
        "summary": summary,
        "problems": problems,
    });
    Ok(verdict(&problems, detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_on_needs_pages_and_none_elsewhere() {
        assert!(all_on(&json!({"1": 512}), 1));
        assert!(all_on(&json!({"0": 0, "1": 512}), 1));
        assert!(!all_on(&json!({"0": 3, "1": 509}), 1));
        assert!(!all_on(&json!({}), 1));
        assert!(!all_on(&json!({"1": 0}), 1));
    }
}
