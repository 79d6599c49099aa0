//! Criterion benches of the engine's inner loops: the copy (plain and hashing) that sits
//! inside every guest stop, the content hash, and the planner over a 1 GiB placement.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use gmem::memory::{PageLocation, Placement};
use gmem::migrate::verify::{BLOCK, copy_and_hash, hash_range};
use gmem::migrate::{PlacementPolicy, PlanInput};
use gmem::numa::{Node, NodeId, Topology};
use gmem::sys::mman::Mmap;

const CHUNK: usize = 2 << 20;

fn populated(len: usize) -> Mmap {
    let map = Mmap::anonymous(len).expect("mmap");
    map.populate_write(0, len).expect("populate");
    map.fill(0, len, 0xa5);
    map
}

/// The stopped part of a remap step: 2 MiB copied, plain (the memcpy baseline) and hashed.
fn chunk_copy(c: &mut Criterion) {
    let map = populated(2 * CHUNK);
    let mut buf = vec![0u8; BLOCK];
    let mut group = c.benchmark_group("chunk_copy_2MiB");
    group.throughput(Throughput::Bytes(CHUNK as u64));
    group.bench_function("memcpy", |b| b.iter(|| map.copy_to(0, &map, CHUNK, CHUNK)));
    group.bench_function("copy_and_hash", |b| {
        b.iter(|| black_box(copy_and_hash(&map, 0, CHUNK as u64, CHUNK as u64, &mut buf)))
    });
    group.bench_function("hash_only", |b| {
        b.iter(|| black_box(hash_range(&map, 0, CHUNK as u64, &mut buf)))
    });
    group.finish();
}

/// Planning a 1 GiB guest whose pages alternate between nodes in 2 MiB runs.
fn planner(c: &mut Criterion) {
    let node = |id: u32| Node {
        id: NodeId(id),
        cpus: id.to_string(),
        total_bytes: 1 << 34,
        free_bytes: 1 << 33,
    };
    let topology = Topology {
        nodes: vec![node(0), node(1)],
    };
    let pages = (1u64 << 30) / 4096;
    let placement = Placement::from_pages(
        4096,
        (0..pages).map(|p| PageLocation::Node(NodeId(((p / 512) % 2) as u32))),
    );
    let mut group = c.benchmark_group("plan_1GiB");
    for (name, whole_units) in [("batched", false), ("whole_chunks", true)] {
        group.bench_with_input(
            BenchmarkId::from_parameter(name),
            &whole_units,
            |b, &whole_units| {
                b.iter(|| {
                    let input = PlanInput {
                        placement: &placement,
                        unit: CHUNK as u64,
                        whole_units,
                        relocate_in_place: false,
                    };
                    black_box(
                        PlacementPolicy::Bind(NodeId(1))
                            .plan(&topology, input)
                            .expect("plan"),
                    )
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, chunk_copy, planner);
criterion_main!(benches);
