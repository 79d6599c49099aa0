//! Guest memory through vm-memory's traits, on the real /dev/kvm: the region table follows
//! remap, a device-side write survives a remap, and confidential gmem has no view.

use std::sync::Arc;

use gmem::memory::{ChunkIndex, ChunkLayout, GmemFlags, GmemOffset, GuestMemory, MemoryError};
use gmem::migrate::{
    MechanismChoice, MechanismKind, MigrationRequest, Migrator, NothingToQuiesce, PlacementPolicy,
};
use gmem::numa::Topology;
use gmem::testing::kvm_or_skip;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};

const MIB: u64 = 1 << 20;

/// What a device writes: distinct bytes per address, so a misplaced copy shows.
fn device_bytes(gpa: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((gpa + i) % 253) as u8 ^ 0x5A)
        .collect()
}

/// A page in every chunk and one write across each chunk boundary.
fn device_writes(layout: &ChunkLayout) -> Vec<(u64, usize)> {
    let mut writes = Vec::new();
    for chunk in 0..layout.chunks() {
        let start = chunk * layout.chunk_size;
        writes.push((start + 3 * 4096 + 17, 4096));
        if chunk > 0 {
            writes.push((start - 100, 300));
        }
    }
    writes
}

#[test]
fn the_region_table_follows_a_rebound_chunk() {
    let Some((_kvm, vm)) = kvm_or_skip("the_region_table_follows_a_rebound_chunk") else {
        return;
    };
    let mem = GuestMemory::create(
        vm,
        ChunkLayout::chunked(4 * MIB, MIB, 1),
        GmemFlags::HOST_MAPPABLE,
    )
    .unwrap();
    mem.bind_to_vm().unwrap();
    let space = mem.vm_memory().unwrap();
    let before = space.memory();
    assert_eq!(before.num_regions(), 4);
    let offsets: Vec<GmemOffset> = before.iter().map(|r| r.gmem_offset()).collect();
    assert_eq!(offsets, mem.chunk_offsets());

    let spare = mem.take_spare().unwrap();
    mem.mapping()
        .unwrap()
        .write(spare.index(), b"the chunk's new place");
    let old = mem.rebind_chunk(ChunkIndex(2), spare).unwrap();
    mem.return_spare(old);

    let after = space.memory();
    let region = after.find_region(GuestAddress(2 * MIB)).unwrap();
    assert_eq!(region.gmem_offset(), spare);
    assert_eq!(region.start_addr(), GuestAddress(2 * MIB));
    let mut seen = [0u8; 21];
    after.read_slice(&mut seen, GuestAddress(2 * MIB)).unwrap();
    assert_eq!(&seen, b"the chunk's new place");
    // The snapshot taken before is whole: it still names the old place, nothing in between.
    let old_region = before.find_region(GuestAddress(2 * MIB)).unwrap();
    assert_eq!(old_region.gmem_offset(), old);
}

#[test]
fn a_device_write_through_vm_memory_survives_a_remap() {
    let Some((_kvm, vm)) = kvm_or_skip("a_device_write_through_vm_memory_survives_a_remap") else {
        return;
    };
    let layout = ChunkLayout::chunked(8 * MIB, 2 * MIB, 1);
    let mem = Arc::new(GuestMemory::create(vm, layout, GmemFlags::HOST_MAPPABLE).unwrap());
    mem.bind_to_vm().unwrap();
    let space = mem.vm_memory().unwrap();
    for (gpa, len) in device_writes(&layout) {
        space
            .memory()
            .write_slice(&device_bytes(gpa, len), GuestAddress(gpa))
            .unwrap();
    }
    let offsets_before = mem.chunk_offsets();

    let home = Topology::read().unwrap().nodes[0].id;
    let request = MigrationRequest {
        mechanism: MechanismChoice::Exactly(MechanismKind::Remap),
        relocate_in_place: true,
        ..MigrationRequest::new(PlacementPolicy::Bind(home))
    };
    let report = Migrator::new(&mem, &NothingToQuiesce)
        .migrate(&request)
        .unwrap();
    assert!(report.complete, "{report:#?}");
    assert_eq!(report.content_mismatches, 0);
    assert_eq!(report.steps, layout.chunks(), "remap moves every chunk");

    let after = space.memory();
    let offsets_after: Vec<GmemOffset> = after.iter().map(|r| r.gmem_offset()).collect();
    assert_eq!(
        offsets_after,
        mem.chunk_offsets(),
        "vm-memory sees the chunk table"
    );
    assert!(
        offsets_after
            .iter()
            .zip(&offsets_before)
            .all(|(a, b)| a != b),
        "every chunk has a new place: {offsets_before:?} -> {offsets_after:?}"
    );
    for (gpa, len) in device_writes(&layout) {
        let mut through_vm_memory = vec![0u8; len];
        after
            .read_slice(&mut through_vm_memory, GuestAddress(gpa))
            .unwrap();
        let mut through_gmem = vec![0u8; len];
        mem.read_guest(GuestAddress(gpa), &mut through_gmem)
            .unwrap();
        assert_eq!(through_vm_memory, device_bytes(gpa, len), "at {gpa:#x}");
        assert_eq!(through_gmem, through_vm_memory, "at {gpa:#x}");
    }
    // A write after the move lands where the guest sees it.
    after
        .write_obj(0xfeed_f00d_u64, GuestAddress(5 * MIB))
        .unwrap();
    let mut word = [0u8; 8];
    mem.read_guest(GuestAddress(5 * MIB), &mut word).unwrap();
    assert_eq!(u64::from_ne_bytes(word), 0xfeed_f00d);
}

#[test]
fn confidential_gmem_has_no_vm_memory_view() {
    let Some((_kvm, vm)) = kvm_or_skip("confidential_gmem_has_no_vm_memory_view") else {
        return;
    };
    let mem = GuestMemory::create(vm, ChunkLayout::single_slot(MIB), GmemFlags::NONE).unwrap();
    assert!(matches!(
        mem.vm_memory(),
        Err(MemoryError::NotHostMappable { .. })
    ));
}
