//! Guest memory on the real /dev/kvm: create, map, bind, place, punch, and every error path.

use std::sync::Arc;

use gmem::memory::{
    ChunkIndex, ChunkLayout, GmemFlags, GmemOffset, GuestAddress, GuestMemfd, GuestMemory,
    MemoryError, PageLocation, Policy, page_size,
};
use gmem::numa::{NodeId, NodeMask, NumaMaps, Pagemap, Topology};
use gmem::sys::mempolicy::{self, MPOL_BIND};
use gmem::sys::sched;
use gmem::testing::{can_read_pfns, kvm_or_skip};

const MIB: u64 = 1 << 20;

fn first_node() -> NodeId {
    Topology::read().unwrap().nodes[0].id
}

fn fill_pattern(mem: &GuestMemory, len: u64) {
    let map = mem.mapping().unwrap();
    for i in 0..len / page_size() {
        map.fill(
            (i * page_size()) as usize,
            page_size() as usize,
            (i & 0xff) as u8,
        );
    }
}

#[test]
fn create_map_bind_write_and_place() {
    let Some((_kvm, vm)) = kvm_or_skip("create_map_bind_write_and_place") else {
        return;
    };
    let layout = ChunkLayout::chunked(8 * MIB, 2 * MIB, 1);
    let mem = GuestMemory::create(vm, layout, GmemFlags::HOST_MAPPABLE).unwrap();
    assert_eq!(mem.gmem().size(), 10 * MIB);
    mem.bind_to_vm().unwrap();

    // Nothing is allocated before the first touch.
    assert_eq!(
        mem.guest_placement().unwrap().not_present(),
        8 * MIB / page_size()
    );

    let pattern: Vec<u8> = (0..3 * MIB).map(|i| (i % 251) as u8).collect();
    mem.write_guest(GuestAddress(MIB), &pattern).unwrap(); // spans chunks 0 and 1
    let mut back = vec![0u8; pattern.len()];
    mem.read_guest(GuestAddress(MIB), &mut back).unwrap();
    assert_eq!(back, pattern);

    let placement = mem.placement(GmemOffset(MIB), 3 * MIB).unwrap();
    let online = Topology::read().unwrap().node_mask();
    assert_eq!(placement.pages(), 3 * MIB / page_size());
    for range in &placement.ranges {
        match range.location {
            PageLocation::Node(node) => {
                assert!(online.contains(node), "page on unknown node {node}")
            }
            other => panic!("written page reported as {other:?}"),
        }
    }
    assert!(
        mem.read_guest(GuestAddress(7 * MIB), &mut vec![0u8; 2 << 20])
            .is_err(),
        "read past guest RAM must fail"
    );
}

#[test]
fn mbind_policy_appears_in_numa_maps() {
    let Some((_kvm, vm)) = kvm_or_skip("mbind_policy_appears_in_numa_maps") else {
        return;
    };
    let node = first_node();
    let len = 4 * MIB;
    let mem =
        GuestMemory::create(vm, ChunkLayout::single_slot(len), GmemFlags::HOST_MAPPABLE).unwrap();
    let policy = Policy::Bind(NodeMask::single(node));
    mem.set_policy(GmemOffset(0), len, &policy).unwrap();
    mem.populate(GmemOffset(0), len).unwrap();
    assert_eq!(mem.policy_at(GmemOffset(0)).unwrap(), policy);
    assert!(mem.placement(GmemOffset(0), len).unwrap().all_on(node));

    let addr = mem.mapping().unwrap().addr() as u64;
    let maps = NumaMaps::read_self().unwrap();
    let vma = maps.at(addr).expect("gmem VMA in numa_maps");
    assert!(vma.is_gmem(), "numa_maps names it {:?}", vma.file);
    assert_eq!(vma.policy, format!("bind:{node}"));
    assert_eq!(vma.size(), len);
    assert_eq!(
        vma.pages_per_node.get(&node).copied(),
        Some(len / page_size())
    );
}

#[test]
fn punched_range_reads_zero_with_new_pfns() {
    let Some((_kvm, vm)) = kvm_or_skip("punched_range_reads_zero_with_new_pfns") else {
        return;
    };
    if !can_read_pfns() {
        panic!("this test proves relocation by PFN and must run as root");
    }
    let len = 4 * MIB;
    let mem = GuestMemory::create(
        vm,
        ChunkLayout::chunked(len, len, 1),
        GmemFlags::HOST_MAPPABLE,
    )
    .unwrap();
    fill_pattern(&mem, len);
    let map = mem.mapping().unwrap();
    let pagemap = Pagemap::open_self().unwrap();
    let pages = (MIB / page_size()) as usize;
    let before = pagemap.pfns(map.addr() as u64 + MIB, pages).unwrap();
    assert!(before.iter().all(Option::is_some));

    // Freed pages return to this CPU's free lists; stay on one CPU and soak them up with
    // another allocation so the refault must take different frames.
    let cpus = sched::affinity().unwrap();
    sched::set_affinity(&cpus[..1]).unwrap();
    mem.gmem().punch(GmemOffset(MIB), MIB).unwrap();
    mem.gmem().allocate(GmemOffset(len), MIB).unwrap(); // the spare chunk soaks the freed frames
    mem.populate(GmemOffset(MIB), MIB).unwrap();
    sched::set_affinity(&cpus).unwrap();

    let mut buf = vec![0xffu8; MIB as usize];
    map.read(MIB as usize, &mut buf);
    assert!(
        buf.iter().all(|&b| b == 0),
        "punched range must read as zeros"
    );
    let mut after = pagemap.pfns(map.addr() as u64 + MIB, pages).unwrap();
    if before.iter().zip(&after).any(|(b, a)| b == a) {
        // Other test threads allocate and free on this CPU too: a freed frame can come
        // straight back. Try once more, the way the refault mechanism does.
        mem.discard(GmemOffset(MIB), MIB).unwrap();
        mem.gmem().allocate(GmemOffset(len + MIB), MIB).unwrap();
        mem.populate(GmemOffset(MIB), MIB).unwrap();
        after = pagemap.pfns(map.addr() as u64 + MIB, pages).unwrap();
    }
    let reused = before.iter().zip(&after).filter(|(b, a)| b == a).count();
    assert_eq!(
        reused, 0,
        "{reused} of {pages} punched pages came back on the same frame"
    );
    // Pages outside the punched range kept their contents.
    map.read(0, &mut buf);
    assert!(
        buf.chunks(page_size() as usize)
            .enumerate()
            .all(|(i, p)| p.iter().all(|&b| b == (i & 0xff) as u8))
    );
}

#[test]
fn rebind_chunk_moves_the_memslot_and_table() {
    let Some((_kvm, vm)) = kvm_or_skip("rebind_chunk_moves_the_memslot_and_table") else {
        return;
    };
    let mem = GuestMemory::create(
        vm,
        ChunkLayout::chunked(4 * MIB, MIB, 2),
        GmemFlags::HOST_MAPPABLE,
    )
    .unwrap();
    mem.bind_to_vm().unwrap();
    mem.write_guest(GuestAddress(MIB), b"chunk one").unwrap();
    let spare = mem.take_spare().unwrap();
    let map = mem.mapping().unwrap();
    map.copy_to(
        mem.chunk_offset(ChunkIndex(1)).index(),
        map,
        spare.index(),
        MIB as usize,
    );
    let old = mem.rebind_chunk(ChunkIndex(1), spare).unwrap();
    assert_eq!(old, GmemOffset(MIB));
    assert_eq!(mem.chunk_offset(ChunkIndex(1)), spare);
    assert_eq!(mem.host_offset(GuestAddress(MIB)), Some(spare));
    let mut buf = [0u8; 9];
    mem.read_guest(GuestAddress(MIB), &mut buf).unwrap();
    assert_eq!(&buf, b"chunk one");
    mem.return_spare(old);
    assert_eq!(mem.spare_chunks(), 2);
}

fn expect_user_error(result: Result<impl std::fmt::Debug, MemoryError>, needle: &str) {
    let err = result.expect_err("must fail");
    assert!(err.is_user_error(), "{err:?} should be a user error");
    let text = err.to_string();
    assert!(
        text.contains(needle),
        "message {text:?} should mention {needle:?}"
    );
}

#[test]
fn bad_input_gets_a_clear_error() {
    let Some((_kvm, vm)) = kvm_or_skip("bad_input_gets_a_clear_error") else {
        return;
    };
    expect_user_error(
        GuestMemfd::create(&vm, 4097, GmemFlags::HOST_MAPPABLE),
        "not a multiple of the 4096 byte page size",
    );
    expect_user_error(
        GuestMemfd::create(&vm, 0, GmemFlags::HOST_MAPPABLE),
        "0 bytes is not allowed",
    );

    let supported = GuestMemfd::supported_flags(&vm).unwrap();
    let unsupported = (0..63)
        .map(|b| GmemFlags(1 << b))
        .find(|f| !supported.contains(*f))
        .unwrap();
    expect_user_error(
        GuestMemfd::create(&vm, MIB, unsupported | GmemFlags::HOST_MAPPABLE),
        "does not support guest_memfd flag",
    );

    expect_user_error(
        GuestMemory::create(
            vm.clone(),
            ChunkLayout::chunked(3 * MIB, 2 * MIB, 0),
            GmemFlags::HOST_MAPPABLE,
        ),
        "not a whole number of",
    );

    let mem = GuestMemory::create(
        vm.clone(),
        ChunkLayout::single_slot(MIB),
        GmemFlags::HOST_MAPPABLE,
    )
    .unwrap();
    let topo = Topology::read().unwrap();
    let absent = (0..NodeId::LIMIT)
        .map(NodeId)
        .find(|n| topo.node(*n).is_none())
        .unwrap();
    expect_user_error(
        mem.set_policy(GmemOffset(0), MIB, &Policy::Bind(NodeMask::single(absent))),
        &format!("NUMA node {absent} does not exist"),
    );
    expect_user_error(
        mem.set_policy(GmemOffset(100), MIB, &Policy::Default),
        "not page-aligned",
    );
    expect_user_error(
        mem.gmem().punch(GmemOffset(0), 2 * MIB),
        "runs past the end",
    );
}

#[test]
fn confidential_gmem_is_never_mapped() {
    let Some((_kvm, vm)) = kvm_or_skip("confidential_gmem_is_never_mapped") else {
        return;
    };
    let mem = GuestMemory::create(
        Arc::clone(&vm),
        ChunkLayout::single_slot(MIB),
        GmemFlags::NONE,
    )
    .unwrap();
    assert!(!mem.gmem().is_host_mappable());
    expect_user_error(mem.mapping().map(|_| ()), "treated as confidential");
    expect_user_error(mem.gmem().map().map(|_| ()), "never map or copy");
    expect_user_error(
        mem.read_guest(GuestAddress(0), &mut [0u8; 8]),
        "confidential",
    );
}

/// What `migrate --pid`'s report claims about a VMM's future allocations rests on this: a bind
/// made through one mapping of a guest_memfd shows at another mapping of it only where the
/// kernel keeps the policy per inode (6.19 on); before, it stays with the mapping it was set
/// through. On one node only the visibility can be told; the lab's `gmem-policy` test also
/// checks where the other mapping's faults and fallocate land.
#[test]
fn a_policy_set_through_one_mapping_shows_in_another_only_where_it_is_per_inode() {
    let Some((_kvm, vm)) = kvm_or_skip("a_policy_set_through_one_mapping_shows_in_another") else {
        return;
    };
    let gmem = GuestMemfd::create(&vm, 2 * MIB, GmemFlags::HOST_MAPPABLE).unwrap();
    let (vmm, ours) = (gmem.map().unwrap(), gmem.map().unwrap());
    let node = NodeMask::single(first_node());
    let len = ours.len();
    mempolicy::mbind(&ours, 0, len, MPOL_BIND, node.as_raw(), 0).unwrap();
    let (mode, nodes) = mempolicy::get_mempolicy_at(&vmm, 0).unwrap();
    let seen = mode == MPOL_BIND && NodeMask::from_raw(nodes) == node;
    let release = gmem::memory::kernel_release();
    let per_inode = gmem::memory::policy_is_per_inode(&release).unwrap();
    assert_eq!(
        seen,
        per_inode,
        "on {release}, the other mapping reports mode {mode} nodes {}",
        NodeMask::from_raw(nodes)
    );
    // The mapping it was set through always has it.
    let (mode, _) = mempolicy::get_mempolicy_at(&ours, 0).unwrap();
    assert_eq!(mode, MPOL_BIND);
}
