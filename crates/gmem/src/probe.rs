//! What this host can do with guest_memfd: KVM capabilities, NUMA nodes, and two live tests
//! (does mbind steer gmem allocations; does the kernel migrate gmem folios).

use std::path::Path;
use std::sync::Arc;

use kvm_ioctls::{Kvm, VmFd};
use serde::Serialize;

use crate::memory::{GmemFlags, GmemOffset, GuestMemfd, MemoryError, Placement, Policy, page_size};
use crate::numa::{NodeMask, Topology};
use crate::sys::kvm::{self, KvmError};
use crate::sys::kvm::{
    KVM_CAP_GUEST_MEMFD, KVM_CAP_GUEST_MEMFD_FLAGS, KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_CAP_USER_MEMORY2, KVM_CAP_VM_TYPES,
};
use crate::sys::mempolicy::{self, MPOL_MF_MOVE};

/// `KVM_CAP_NR_MEMSLOTS`: memslots per address space, which bounds the chunk layout.
const KVM_CAP_NR_MEMSLOTS: u64 = 10;

/// Pages the live tests use.
const TEST_PAGES: u64 = 64;

/// One KVM_CHECK_EXTENSION answer.
#[derive(Debug, Clone, Serialize)]
pub struct Capability {
    /// The KVM_CAP_* name.
    pub name: &'static str,
    /// Its number.
    pub number: u64,
    /// What the VM's KVM_CHECK_EXTENSION returned (0 = absent).
    pub value: i32,
}

/// The answer of a live test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Tried, and it works.
    Yes,
    /// Tried, and it does not.
    No,
    /// Could not be tried here.
    Unknown,
}

/// A verdict with the evidence behind it.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// The answer.
    pub verdict: Verdict,
    /// What was observed, in one sentence.
    pub evidence: String,
}

impl Finding {
    fn new(verdict: Verdict, evidence: impl Into<String>) -> Self {
        Finding {
            verdict,
            evidence: evidence.into(),
        }
    }
}

/// Everything `gmemctl probe` reports.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    /// `uname -r`.
    pub kernel_release: String,
    /// The KVM device path.
    pub kvm_device: String,
    /// KVM_GET_API_VERSION (12 on every kernel since 2.6.22).
    pub kvm_api_version: i32,
    /// The capabilities that matter for gmem.
    pub capabilities: Vec<Capability>,
    /// Decoded KVM_CAP_GUEST_MEMFD_FLAGS; `None` without guest_memfd.
    pub guest_memfd_flags: Option<GmemFlags>,
    /// Online NUMA nodes.
    pub numa: Topology,
    /// Whether mbind on a gmem mapping places its pages.
    pub mbind_on_gmem: Finding,
    /// Whether the kernel migrates gmem folios (move_pages on a gmem mapping).
    pub native_migration: Finding,
}

/// Why the probe could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// KVM is unusable.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// The topology could not be read.
    #[error(transparent)]
    Topology(#[from] crate::numa::topology::TopologyError),
}

/// Probes the host through the KVM device at `kvm_device`.
pub fn probe(kvm_device: &Path) -> Result<ProbeReport, ProbeError> {
    let kvm = kvm::open(kvm_device)?;
    let vm = Arc::new(kvm::create_vm(&kvm)?);
    let numa = Topology::read()?;
    let capabilities = capabilities(&vm);
    let guest_memfd_flags = GuestMemfd::supported_flags(&vm);
    let mbind_on_gmem = match guest_memfd_flags {
        Some(flags) if flags.contains(GmemFlags::HOST_MAPPABLE) => probe_mbind(&vm, &numa),
        _ => Finding::new(
            Verdict::Unknown,
            "guest_memfd is not host-mappable on this kernel",
        ),
    };
    let native_migration = match guest_memfd_flags {
        Some(flags) if flags.contains(GmemFlags::HOST_MAPPABLE) => {
            native_migration(&vm, &numa, GmemFlags(flags.0 & GmemFlags::MIGRATABLE.0))
        }
        _ => Finding::new(
            Verdict::Unknown,
            "guest_memfd is not host-mappable on this kernel",
        ),
    };
    Ok(ProbeReport {
        kernel_release: kernel_release(),
        kvm_device: kvm_device.display().to_string(),
        kvm_api_version: kvm.get_api_version(),
        capabilities,
        guest_memfd_flags,
        numa,
        mbind_on_gmem,
        native_migration,
    })
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

fn capabilities(vm: &VmFd) -> Vec<Capability> {
    [
        ("KVM_CAP_NR_MEMSLOTS", KVM_CAP_NR_MEMSLOTS),
        ("KVM_CAP_USER_MEMORY2", KVM_CAP_USER_MEMORY2),
        ("KVM_CAP_MEMORY_ATTRIBUTES", KVM_CAP_MEMORY_ATTRIBUTES),
        ("KVM_CAP_GUEST_MEMFD", KVM_CAP_GUEST_MEMFD),
        ("KVM_CAP_VM_TYPES", KVM_CAP_VM_TYPES),
        ("KVM_CAP_GUEST_MEMFD_FLAGS", KVM_CAP_GUEST_MEMFD_FLAGS),
    ]
    .into_iter()
    .map(|(name, number)| Capability {
        name,
        number,
        value: vm.check_extension_raw(number),
    })
    .collect()
}

/// Fills page i with byte (i & 0xff): the seed selftest's pattern.
fn fill_pattern(gmem_map: &crate::sys::mman::Mmap, pages: u64) {
    let page = page_size();
    for i in 0..pages {
        gmem_map.fill((i * page) as usize, page as usize, (i & 0xff) as u8);
    }
}

/// Index of the first page whose bytes are not all (i & 0xff).
fn first_corrupt_page(gmem_map: &crate::sys::mman::Mmap, pages: u64) -> Option<u64> {
    let page = page_size();
    let mut buf = vec![0u8; page as usize];
    (0..pages).find(|&i| {
        gmem_map.read((i * page) as usize, &mut buf);
        buf.iter().any(|&b| b != (i & 0xff) as u8)
    })
}

fn probe_mbind(vm: &Arc<VmFd>, numa: &Topology) -> Finding {
    let Some(&node) = numa.memory_nodes().first() else {
        return Finding::new(Verdict::Unknown, "no NUMA node with memory found");
    };
    let run = || -> Result<Finding, MemoryError> {
        let len = TEST_PAGES * page_size();
        let gmem = crate::memory::GuestMemory::create(
            vm.clone(),
            crate::memory::ChunkLayout::single_slot(len),
            GmemFlags::HOST_MAPPABLE,
        )?;
        let policy = Policy::Bind(NodeMask::single(node));
        let start = GmemOffset(0);
        gmem.set_policy(start, len, &policy)?;
        gmem.populate(start, len)?;
        let placed = gmem.placement(start, len)?;
        let read_back = gmem.policy_at(start)?;
        Ok(if placed.all_on(node) && read_back == policy {
            Finding::new(
                Verdict::Yes,
                format!(
                    "mbind({policy}) placed all {TEST_PAGES} gmem pages on node {node}, and get_mempolicy reads it back"
                ),
            )
        } else {
            Finding::new(
                Verdict::No,
                format!(
                    "after mbind({policy}) pages are at {:?}, policy reads {read_back}",
                    placed.per_node()
                ),
            )
        })
    };
    run().unwrap_or_else(|e| Finding::new(Verdict::No, format!("{e}: {}", chain(&e))))
}

/// Tries the kernel's own migration on a scratch gmem created with `flags` (plus
/// HOST_MAPPABLE): moves its pages from the first memory node to the second and checks
/// node and bytes. Needs two nodes with memory; says `Unknown` otherwise.
pub fn native_migration(vm: &Arc<VmFd>, numa: &Topology, flags: GmemFlags) -> Finding {
    let advertised = flags.contains(GmemFlags::MIGRATABLE);
    let nodes = numa.memory_nodes();
    let (from, to) = match nodes.as_slice() {
        [from, to, ..] => (*from, *to),
        _ => {
            let hint = if advertised {
                "the kernel advertises GUEST_MEMFD_FLAG_MIGRATABLE, but"
            } else {
                "the kernel does not advertise GUEST_MEMFD_FLAG_MIGRATABLE, and"
            };
            return Finding::new(
                Verdict::Unknown,
                format!("unknown: one node; {hint} a cross-node move cannot be tried here"),
            );
        }
    };
    let run = || -> Result<Finding, MemoryError> {
        let len = TEST_PAGES * page_size();
        let gmem = GuestMemfd::create(vm, len, flags | GmemFlags::HOST_MAPPABLE)?;
        let map = gmem.map()?;
        let bind = Policy::Bind(NodeMask::single(from));
        bind.apply(&map, GmemOffset(0), len)?;
        fill_pattern(&map, TEST_PAGES);
        let addrs: Vec<usize> = (0..TEST_PAGES)
            .map(|i| map.addr() + (i * page_size()) as usize)
            .collect();
        let targets = vec![to.0 as i32; addrs.len()];
        let mut status = vec![i32::MIN; addrs.len()];
        let not_moved = mempolicy::move_pages(0, &addrs, Some(&targets), &mut status, MPOL_MF_MOVE);
        let after = Placement::query_addrs(0, &addrs, page_size())?;
        let intact = first_corrupt_page(&map, TEST_PAGES).is_none();
        let on_target = after.per_node().get(&to).copied().unwrap_or(0);
        let flag_note = if advertised {
            " (gmem created MIGRATABLE)"
        } else {
            ""
        };
        Ok(match not_moved {
            Ok(0) if on_target == TEST_PAGES && intact => Finding::new(
                Verdict::Yes,
                format!(
                    "move_pages moved {TEST_PAGES}/{TEST_PAGES} gmem pages from node {from} to node {to}{flag_note}, contents intact"
                ),
            ),
            Ok(left) => Finding::new(
                Verdict::No,
                format!(
                    "move_pages left {left} of {TEST_PAGES} gmem pages unmoved{flag_note}{}; {on_target} on node {to} afterwards; contents {}",
                    if status.iter().all(|&s| s == i32::MIN) {
                        " and did not write status[]"
                    } else {
                        ""
                    },
                    if intact { "intact" } else { "CORRUPTED" }
                ),
            ),
            Err(e) => Finding::new(
                Verdict::No,
                format!(
                    "move_pages on gmem failed: {e}; contents {}",
                    if intact { "intact" } else { "CORRUPTED" }
                ),
            ),
        })
    };
    run().unwrap_or_else(|e| Finding::new(Verdict::No, format!("{e}: {}", chain(&e))))
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cause = e.source();
    while let Some(c) = cause {
        parts.push(c.to_string());
        cause = c.source();
    }
    parts.join(": ")
}

/// Convenience for callers that already hold a `Kvm`.
pub fn guest_memfd_flags(kvm: &Kvm) -> Result<Option<GmemFlags>, KvmError> {
    let vm = kvm::create_vm(kvm)?;
    Ok(GuestMemfd::supported_flags(&vm))
}
