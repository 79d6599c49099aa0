//! A snapshot of where guest memory is: node and page frames of every chunk, and numa_maps.

use std::collections::BTreeMap;

use gmem::memory::{PageLocation, Placement, page_size};
use gmem::numa::pagemap::PagemapError;
use gmem::numa::{NodeId, NumaMap, NumaMaps, Pagemap};
use serde::Serialize;
use vmm::Vm;

use super::DemoError;

/// Where one chunk's pages are.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkPlacement {
    /// The node holding most of its resident pages, `None` if none is resident.
    pub node: Option<NodeId>,
    /// Resident pages per node.
    pub pages_per_node: BTreeMap<NodeId, u64>,
}

/// How many of a chunk's pages got new frames between two snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ChunkRelocation {
    /// Pages present in both snapshots whose frame differs.
    pub changed: u64,
    /// Pages present in both snapshots.
    pub compared: u64,
}

impl ChunkRelocation {
    /// Every compared page got a new frame.
    pub fn all(&self) -> bool {
        self.compared > 0 && self.changed == self.compared
    }
}

/// Guest memory's placement at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// "before", "after move 1 (...)", ...
    pub label: String,
    /// Resident guest pages per node.
    pub pages_per_node: BTreeMap<NodeId, u64>,
    /// The guest_memfd lines of this process's numa_maps.
    pub numa_maps: Vec<NumaMap>,
    /// Per chunk, in guest order.
    #[serde(skip)]
    pub chunks: Vec<ChunkPlacement>,
    /// Page frame number of every guest page, in guest order; `None` where PFNs are hidden.
    #[serde(skip)]
    pfns: Option<Vec<Option<u64>>>,
}

impl Snapshot {
    /// Reads placement, page frames and numa_maps now. The guest keeps running.
    pub fn take(vm: &Vm, label: &str) -> Result<Self, DemoError> {
        let memory = vm.memory();
        // Also maps every resident page for the host, so numa_maps and pagemap see them all.
        let placement = memory.guest_placement().map_err(DemoError::Memory)?;
        let pages_per_chunk = memory.layout().chunk_size / page_size();
        Ok(Snapshot {
            label: label.to_owned(),
            pages_per_node: placement.per_node(),
            numa_maps: gmem_numa_maps()?,
            chunks: chunk_placements(&placement, pages_per_chunk),
            pfns: guest_pfns(vm)?,
        })
    }

    /// Per chunk, how many pages got new frames since `earlier`; `None` without PFNs.
    pub fn relocations_since(&self, earlier: &Snapshot) -> Option<Vec<ChunkRelocation>> {
        let (now, then) = (self.pfns.as_ref()?, earlier.pfns.as_ref()?);
        let pages_per_chunk = now.len() / self.chunks.len().max(1);
        Some(
            now.chunks(pages_per_chunk)
                .zip(then.chunks(pages_per_chunk))
                .map(|(now, then)| compare_frames(now, then))
                .collect(),
        )
    }
}

fn compare_frames(now: &[Option<u64>], then: &[Option<u64>]) -> ChunkRelocation {
    let both: Vec<(u64, u64)> = now
        .iter()
        .zip(then)
        .filter_map(|(a, b)| Some(((*a)?, (*b)?)))
        .collect();
    ChunkRelocation {
        changed: both.iter().filter(|(a, b)| a != b).count() as u64,
        compared: both.len() as u64,
    }
}

/// Splits a guest-order placement into chunks.
fn chunk_placements(placement: &Placement, pages_per_chunk: u64) -> Vec<ChunkPlacement> {
    let chunks = placement.pages().div_ceil(pages_per_chunk);
    let mut out: Vec<ChunkPlacement> = (0..chunks)
        .map(|_| ChunkPlacement {
            node: None,
            pages_per_node: BTreeMap::new(),
        })
        .collect();
    for range in &placement.ranges {
        let PageLocation::Node(node) = range.location else {
            continue;
        };
        let mut page = range.first_page;
        let end = range.first_page + range.pages;
        while page < end {
            let chunk = page / pages_per_chunk;
            let run = ((chunk + 1) * pages_per_chunk).min(end) - page;
            *out[chunk as usize].pages_per_node.entry(node).or_insert(0) += run;
            page += run;
        }
    }
    for chunk in &mut out {
        chunk.node = chunk
            .pages_per_node
            .iter()
            .max_by_key(|&(_, pages)| *pages)
            .map(|(node, _)| *node);
    }
    out
}

/// The guest_memfd VMAs of this process.
fn gmem_numa_maps() -> Result<Vec<NumaMap>, DemoError> {
    let maps = NumaMaps::read_self().map_err(DemoError::NumaMaps)?;
    Ok(maps.gmem().cloned().collect())
}

/// Every guest page's frame, in guest order (following remapped chunks).
fn guest_pfns(vm: &Vm) -> Result<Option<Vec<Option<u64>>>, DemoError> {
    let memory = vm.memory();
    let base = memory.mapping().map_err(DemoError::Memory)?.addr() as u64;
    let pages_per_chunk = (memory.layout().chunk_size / page_size()) as usize;
    let pagemap = Pagemap::open_self().map_err(DemoError::Pagemap)?;
    let mut pfns = Vec::with_capacity(memory.chunk_offsets().len() * pages_per_chunk);
    for offset in memory.chunk_offsets() {
        match pagemap.pfns(base + offset.raw(), pages_per_chunk) {
            Ok(chunk) => pfns.extend(chunk),
            Err(PagemapError::PfnsHidden { .. }) => return Ok(None),
            Err(e) => return Err(DemoError::Pagemap(e)),
        }
    }
    Ok(Some(pfns))
}
