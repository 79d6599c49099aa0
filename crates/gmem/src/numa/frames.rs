//! `FrameNodes`: which NUMA node a page frame belongs to, from the memory-block layout in
//! /sys/devices/system/memory. With pagemap PFNs this gives placement in one read, without
//! asking move_pages page by page.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use super::NodeId;

/// Memory block -> node, for the blocks online now.
#[derive(Debug, Clone, Default)]
pub struct FrameNodes {
    block_bytes: u64,
    page_bytes: u64,
    nodes: HashMap<u64, NodeId>,
}

impl FrameNodes {
    /// Reads the live layout; `None` where the kernel does not expose memory blocks.
    pub fn read() -> Option<Self> {
        Self::read_from(Path::new("/sys/devices/system"))
    }

    /// Reads a sysfs-shaped tree: memory/block_size_bytes (hex) and node/nodeN/memoryM links.
    pub fn read_from(system: &Path) -> Option<Self> {
        let block_text = fs::read_to_string(system.join("memory/block_size_bytes")).ok()?;
        let block_bytes = u64::from_str_radix(block_text.trim(), 16).ok()?;
        let mut nodes = HashMap::new();
        for node_dir in fs::read_dir(system.join("node")).ok()?.flatten() {
            let name = node_dir.file_name();
            let Some(node) = name
                .to_str()
                .and_then(|n| n.strip_prefix("node"))
                .and_then(|n| n.parse().ok())
            else {
                continue;
            };
            for entry in fs::read_dir(node_dir.path()).ok()?.flatten() {
                let name = entry.file_name();
                if let Some(block) = name
                    .to_str()
                    .and_then(|n| n.strip_prefix("memory"))
                    .and_then(|n| n.parse().ok())
                {
                    nodes.insert(block, NodeId(node));
                }
            }
        }
        (block_bytes > 0 && !nodes.is_empty()).then(|| FrameNodes {
            block_bytes,
            page_bytes: crate::sys::mman::page_size() as u64,
            nodes,
        })
    }

    /// The node holding page frame `pfn`, if its memory block is known.
    pub fn node_of(&self, pfn: u64) -> Option<NodeId> {
        self.nodes
            .get(&(pfn * self.page_bytes / self.block_bytes))
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_frames_through_blocks() {
        let root = std::env::temp_dir().join(format!("gmem-frames-{}", std::process::id()));
        fs::create_dir_all(root.join("memory")).unwrap();
        fs::write(root.join("memory/block_size_bytes"), "8000000\n").unwrap();
        for (node, block) in [(0, 0), (0, 1), (1, 2)] {
            let dir = root.join(format!("node/node{node}/memory{block}"));
            fs::create_dir_all(dir).unwrap();
        }
        let frames = FrameNodes::read_from(&root).unwrap();
        fs::remove_dir_all(&root).unwrap();
        // 128 MiB blocks of 4 KiB frames: 32768 frames each.
        assert_eq!(frames.node_of(0), Some(NodeId(0)));
        assert_eq!(frames.node_of(32768 + 5), Some(NodeId(0)));
        assert_eq!(frames.node_of(2 * 32768), Some(NodeId(1)));
        assert_eq!(frames.node_of(3 * 32768), None);
    }

    #[test]
    fn agrees_with_move_pages_on_this_host() {
        let Some(frames) = FrameNodes::read() else {
            return;
        };
        if !crate::testing::can_read_pfns() {
            return;
        }
        let map = crate::sys::mman::Mmap::anonymous(64 << 12).unwrap();
        map.populate_write(0, 64 << 12).unwrap();
        let pfns = super::super::Pagemap::open_self()
            .unwrap()
            .pfns(map.addr() as u64, 64)
            .unwrap();
        let placement =
            crate::memory::Placement::query(&map, crate::memory::GmemOffset(0), 64 << 12).unwrap();
        for (i, pfn) in pfns.iter().enumerate() {
            let by_frame = frames
                .node_of(pfn.unwrap())
                .map(crate::memory::PageLocation::Node);
            assert_eq!(by_frame, placement.location_of(i as u64));
        }
    }
}
