//! `Placement`: which NUMA node holds each page of a range, as run-length ranges.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{GmemOffset, MemoryError};
use crate::numa::NodeId;
use crate::sys::mempolicy;
use crate::sys::mman::Mmap;

/// Pages asked about per move_pages call: bounds the status arrays (128 KiB each).
const QUERY_BATCH: usize = 32 * 1024;

/// Where one page is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PageLocation {
    /// Resident on this node.
    Node(NodeId),
    /// Not allocated yet (or punched): move_pages says ENOENT.
    NotPresent,
    /// move_pages gave this (positive) errno for the page.
    Error(i32),
}

/// A run of consecutive pages in the same place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PlacementRange {
    /// Index of the first page, counted from the start of the queried range.
    pub first_page: u64,
    /// Number of pages.
    pub pages: u64,
    /// Where they are.
    pub location: PageLocation,
}

/// The location of every page of a range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Placement {
    /// Page size of the counts, bytes.
    pub page_size: u64,
    /// Consecutive, non-empty runs covering the range.
    pub ranges: Vec<PlacementRange>,
}

impl Placement {
    /// Asks the kernel where each page of gmem mapping `map[offset..offset+len]` is (move_pages with
    /// nodes = NULL, which moves nothing).
    ///
    /// move_pages only sees pages mapped in this process, and gmem pages that only the
    /// guest (through KVM) or fallocate touched are not. So resident pages are found with
    /// mincore first and mapped (MADV_POPULATE_READ, which allocates nothing for them);
    /// holes stay holes.
    pub fn query(map: &Mmap, offset: GmemOffset, len: u64) -> Result<Self, MemoryError> {
        super::check_range(offset, len, map.len() as u64)?;
        let page = super::page_size();
        map_resident(map, offset, len)?;
        let addrs: Vec<usize> = (0..len / page)
            .map(|i| map.addr() + (offset + i * page).index())
            .collect();
        Self::query_addrs(0, &addrs, page)
    }

    /// Same as [`query`](Self::query) for arbitrary page addresses of process `pid`.
    pub fn query_addrs(pid: i32, addrs: &[usize], page_size: u64) -> Result<Self, MemoryError> {
        let mut placement = Placement {
            page_size,
            ranges: Vec::new(),
        };
        let mut status = vec![0i32; QUERY_BATCH.min(addrs.len())];
        for batch in addrs.chunks(QUERY_BATCH) {
            let status = &mut status[..batch.len()];
            // Sentinel: a page the kernel skips must not read as node 0.
            status.fill(i32::MIN);
            mempolicy::move_pages(pid, batch, None, status, 0).map_err(|source| {
                MemoryError::QueryPlacement {
                    pages: batch.len(),
                    source,
                }
            })?;
            for &s in status.iter() {
                placement.push(match s {
                    s if s >= 0 => PageLocation::Node(NodeId(s as u32)),
                    s if s == -libc::ENOENT => PageLocation::NotPresent,
                    i32::MIN => PageLocation::Error(libc::EIO),
                    s => PageLocation::Error(-s),
                });
            }
        }
        Ok(placement)
    }

    fn push(&mut self, location: PageLocation) {
        match self.ranges.last_mut() {
            Some(last) if last.location == location => last.pages += 1,
            _ => {
                let first_page = self.pages();
                self.ranges.push(PlacementRange {
                    first_page,
                    pages: 1,
                    location,
                })
            }
        }
    }

    /// Builds a placement from per-page locations (tests, merging).
    pub fn from_pages(page_size: u64, pages: impl IntoIterator<Item = PageLocation>) -> Self {
        let mut placement = Placement {
            page_size,
            ranges: Vec::new(),
        };
        pages.into_iter().for_each(|l| placement.push(l));
        placement
    }

    /// Total pages covered.
    pub fn pages(&self) -> u64 {
        self.ranges.last().map_or(0, |r| r.first_page + r.pages)
    }

    /// Resident pages per node.
    pub fn per_node(&self) -> BTreeMap<NodeId, u64> {
        let mut counts = BTreeMap::new();
        for r in &self.ranges {
            if let PageLocation::Node(node) = r.location {
                *counts.entry(node).or_insert(0) += r.pages;
            }
        }
        counts
    }

    /// Pages not allocated.
    pub fn not_present(&self) -> u64 {
        self.ranges
            .iter()
            .filter(|r| r.location == PageLocation::NotPresent)
            .map(|r| r.pages)
            .sum()
    }

    /// Whether every page is resident on `node`.
    pub fn all_on(&self, node: NodeId) -> bool {
        self.ranges
            .iter()
            .all(|r| r.location == PageLocation::Node(node))
    }

    /// The location of page `index`.
    pub fn location_of(&self, index: u64) -> Option<PageLocation> {
        let at = self
            .ranges
            .partition_point(|r| r.first_page + r.pages <= index);
        self.ranges.get(at).map(|r| r.location)
    }
}

/// Maps the resident pages of a range, run by run, so move_pages can see them.
pub(crate) fn map_resident(map: &Mmap, offset: GmemOffset, len: u64) -> Result<(), MemoryError> {
    let page = super::page_size();
    let resident = map
        .resident_pages(offset.index(), len as usize)
        .map_err(|source| MemoryError::QueryPlacement {
            pages: (len / page) as usize,
            source,
        })?;
    let mut i = 0;
    while i < resident.len() {
        if !resident[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < resident.len() && resident[i] {
            i += 1;
        }
        let (at, run) = (offset + start as u64 * page, (i - start) as u64 * page);
        map.populate_read(at.index(), run as usize)
            .map_err(|source| MemoryError::Populate {
                offset: at.raw(),
                len: run,
                source,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_location() -> impl Strategy<Value = PageLocation> {
        prop_oneof![
            (0u32..3).prop_map(|n| PageLocation::Node(NodeId(n))),
            Just(PageLocation::NotPresent),
        ]
    }

    proptest! {
        #[test]
        fn run_length_preserves_every_page(pages in proptest::collection::vec(arb_location(), 0..300)) {
            let placement = Placement::from_pages(4096, pages.iter().copied());
            prop_assert_eq!(placement.pages(), pages.len() as u64);
            for (i, loc) in pages.iter().enumerate() {
                prop_assert_eq!(placement.location_of(i as u64), Some(*loc));
            }
            // Runs are maximal: neighbours differ.
            for pair in placement.ranges.windows(2) {
                prop_assert_ne!(pair[0].location, pair[1].location);
            }
            let counted: u64 = placement.per_node().values().sum::<u64>() + placement.not_present();
            prop_assert_eq!(counted, pages.len() as u64);
        }
    }
}
