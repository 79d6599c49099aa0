//! Criterion benches of each stage of one remap step on a real guest_memfd (needs /dev/kvm):
//! room check, prepare (bind + populate), retire, PFN read, placement query, copy and
//! compare, so that a regression in one stage shows by itself. (The memslot swap needs a
//! running VM's bound slots; `gmemctl bench` times it inside each stop.)

use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gmem::memory::{
    ChunkIndex, ChunkLayout, GuestMemfd, GuestMemory, Policy, ensure_room, page_size,
};
use gmem::numa::{NodeId, NodeMask, NodeRoom, Pagemap};

const CHUNK: u64 = 2 << 20;
const CHUNKS: u64 = 8;
const SPARE: u64 = 2;

/// A chunked guest memory of 8 chunks and 2 spares, every guest chunk populated, or `None`
/// (with a note) where /dev/kvm or a host-mappable guest_memfd is missing.
fn memory() -> Option<GuestMemory> {
    let kvm = gmem::sys::kvm::open(Path::new(gmem::sys::kvm::DEFAULT_KVM_DEVICE))
        .map_err(|e| eprintln!("remap_stages: no KVM ({e}); skipped"))
        .ok()?;
    let vm = Arc::new(gmem::sys::kvm::create_vm(&kvm).ok()?);
    let Some(flags) = GuestMemfd::host_mappable_flags(&vm) else {
        eprintln!("remap_stages: this KVM has no host-mappable guest_memfd; skipped");
        return None;
    };
    let layout = ChunkLayout::chunked(CHUNK * CHUNKS, CHUNK, SPARE);
    let memory = GuestMemory::create(vm, layout, flags).expect("guest memory");
    for chunk in layout.chunk_indices() {
        let offset = memory.chunk_offset(chunk);
        memory.populate(offset, CHUNK).expect("populate");
        memory
            .mapping()
            .expect("mapped")
            .fill(offset.index(), CHUNK as usize, 0x5a);
    }
    Some(memory)
}

fn stages(c: &mut Criterion) {
    let Some(memory) = memory() else { return };
    let map = memory.mapping().expect("mapped");
    let node = NodeId(0);
    let bind = Policy::Bind(NodeMask::single(node));
    let pagemap = Pagemap::open_self().ok();
    let old = memory.chunk_offset(ChunkIndex(0));
    let spare = memory.take_spare().expect("a spare chunk");
    let mut group = c.benchmark_group("remap_step_2MiB");
    group.throughput(Throughput::Bytes(CHUNK));

    group.bench_function("room_check", |b| {
        b.iter(|| ensure_room(node, CHUNK).expect("room"))
    });
    group.bench_function("node_room_read", |b| {
        b.iter(|| NodeRoom::read(node).expect("room"))
    });
    group.bench_function("prepare_bind_populate", |b| {
        b.iter(|| {
            memory.set_policy(spare, CHUNK, &bind).expect("mbind");
            memory.populate(spare, CHUNK).expect("populate");
            memory.discard(spare, CHUNK).expect("discard");
        })
    });
    group.bench_function("prepare_bind_fallocate_populate", |b| {
        b.iter(|| {
            memory.set_policy(spare, CHUNK, &bind).expect("mbind");
            memory.gmem().allocate(spare, CHUNK).expect("fallocate");
            memory.populate(spare, CHUNK).expect("populate");
            memory.discard(spare, CHUNK).expect("discard");
        })
    });
    group.bench_function("discard_only_after_populate", |b| {
        b.iter(|| {
            memory.populate(spare, CHUNK).expect("populate");
            memory.discard(spare, CHUNK).expect("discard");
        })
    });
    group.bench_function("retire_discard", |b| {
        b.iter_batched(
            || memory.populate(spare, CHUNK).expect("populate"),
            |()| memory.discard(spare, CHUNK).expect("discard"),
            criterion::BatchSize::PerIteration,
        )
    });
    memory.populate(spare, CHUNK).expect("populate");
    if let Some(pagemap) = &pagemap {
        group.bench_function("pfns_pagemap", |b| {
            b.iter(|| {
                pagemap
                    .pfns(
                        map.addr() as u64 + old.raw(),
                        (CHUNK / page_size()) as usize,
                    )
                    .expect("pagemap")
            })
        });
    }
    group.bench_function("placement_move_pages", |b| {
        b.iter(|| memory.placement(old, CHUNK).expect("placement"))
    });
    group.bench_function("copy", |b| {
        b.iter(|| map.copy_to(old.index(), map, spare.index(), CHUNK as usize))
    });
    group.bench_function("compare", |b| {
        b.iter(|| assert!(map.equal(old.index(), map, spare.index(), CHUNK as usize)))
    });
    group.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
