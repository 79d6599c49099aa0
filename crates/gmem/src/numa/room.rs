//! How much memory a node can still hand out before a NUMA-bound allocation wakes the OOM killer.
//!
//! An allocation bound to a node (mbind MPOL_BIND, as guest memory placement uses) that the
//! node cannot satisfy does not fail with ENOMEM: the kernel reclaims, then runs the OOM
//! killer, constrained to that node's memory policy, and kills whichever process holds most
//! of it. The two-node lab saw it kill a node-filling process and then the migrating VMM
//! itself. So anything that allocates on a chosen node asks first how much room it has.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::NodeId;
use super::topology::{TopologyError, meminfo_kib};

const SYSFS_NODES: &str = "/sys/devices/system/node";
const ZONEINFO: &str = "/proc/zoneinfo";

/// A node's free and reclaimable memory against its watermarks, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct NodeRoom {
    /// The node.
    pub node: NodeId,
    /// MemFree: free pages in the buddy allocator.
    pub free: u64,
    /// Free pages on the per-CPU lists of the node's zones (`count:` in /proc/zoneinfo).
    /// With a few CPUs they can hold tens of MiB, and MemFree leaves them out. They are
    /// not counted as available: the lab saw a node-bound allocation run the OOM killer
    /// with 30 MiB of them on the node.
    pub free_pcp: u64,
    /// File-backed page cache (Active(file) + Inactive(file)), which reclaim can free.
    pub file_cache: u64,
    /// Reclaimable kernel memory (KReclaimable, else SReclaimable).
    pub reclaimable_kernel: u64,
    /// The sum of the `low` watermarks of the node's zones.
    pub watermark_low: u64,
    /// The sum of the `high` watermarks of the node's zones.
    pub watermark_high: u64,
}

impl NodeRoom {
    /// Reads the live figures of `node`.
    pub fn read(node: NodeId) -> Result<Self, TopologyError> {
        let zoneinfo_path = PathBuf::from(ZONEINFO);
        let zoneinfo =
            fs::read_to_string(&zoneinfo_path).map_err(|source| TopologyError::Read {
                path: zoneinfo_path.clone(),
                source,
            })?;
        let meminfo_path = Path::new(SYSFS_NODES).join(format!("node{node}/meminfo"));
        let meminfo = fs::read_to_string(&meminfo_path).map_err(|source| TopologyError::Read {
            path: meminfo_path.clone(),
            source,
        })?;
        Self::parse(node, &meminfo, &zoneinfo).ok_or_else(|| TopologyError::Parse {
            path: meminfo_path,
            detail: format!("no MemFree line, or no zone of node {node} in {ZONEINFO}"),
        })
    }

    /// Builds the figures from a node's meminfo and /proc/zoneinfo.
    pub fn parse(node: NodeId, meminfo: &str, zoneinfo: &str) -> Option<Self> {
        let kib = |field: &str| meminfo_kib(meminfo, field).map(|k| k * 1024);
        let zones = zone_figures(zoneinfo, node)?;
        Some(NodeRoom {
            node,
            free: kib("MemFree")?,
            free_pcp: zones.pcp,
            file_cache: kib("Active(file)").unwrap_or(0) + kib("Inactive(file)").unwrap_or(0),
            reclaimable_kernel: kib("KReclaimable")
                .or_else(|| kib("SReclaimable"))
                .unwrap_or(0),
            watermark_low: zones.low,
            watermark_high: zones.high,
        })
    }

    /// Bytes the node can supply while staying above its high watermark: the kernel's own
    /// MemAvailable estimate (si_mem_available) for one node. Free memory above the high
    /// watermark, plus the page cache and reclaimable kernel memory reclaim could free,
    /// less what reclaim cannot get at (at most half of each, at most the low watermark).
    pub fn available(&self) -> u64 {
        let reclaimable = |bytes: u64| bytes - (bytes / 2).min(self.watermark_low);
        self.free.saturating_sub(self.watermark_high)
            + reclaimable(self.file_cache)
            + reclaimable(self.reclaimable_kernel)
    }
}

/// Watermarks and per-CPU free pages of one node's zones, summed, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct ZoneFigures {
    low: u64,
    high: u64,
    pcp: u64,
}

/// The figures of `node`'s zones in /proc/zoneinfo; `None` if it lists no zone of it.
fn zone_figures(zoneinfo: &str, node: NodeId) -> Option<ZoneFigures> {
    let header = format!("Node {node}, zone");
    let page = crate::sys::mman::page_size() as u64;
    let mut sums = ZoneFigures::default();
    let (mut inside, mut zones) = (false, 0);
    for line in zoneinfo.lines() {
        if line.starts_with("Node ") {
            inside = line.starts_with(&header);
            zones += u32::from(inside);
            continue;
        }
        if !inside {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(key), Some(value), None) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        let Ok(pages) = value.parse::<u64>() else {
            continue;
        };
        // `high` is a watermark; `high:` (with the colon) is a per-CPU list's limit.
        match key {
            "low" => sums.low += pages * page,
            "high" => sums.high += pages * page,
            "count:" => sums.pcp += pages * page,
            _ => {}
        }
    }
    (zones > 0).then_some(sums)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Abridged from a two-node QEMU guest (Debian 7.3.4) with node 1 nearly full.
    const ZONEINFO: &str = "Node 0, zone      DMA
  per-node stats
      nr_inactive_anon 10
  pages free     3840
        boost    0
        min      22
        low      27
        high     32
        spanned  4095
Node 0, zone    DMA32
  pages free     200000
        min      8000
        low      10000
        high     12000
Node 1, zone    DMA32
  pages free     12000
        boost    0
        min      8638
        low      10797
        high     12956
        spanned  262144
  pagesets
    cpu: 0
              count: 1200
              high:  4000
              batch: 63
  vm stats threshold: 24
    cpu: 1
              count: 800
              high:  4000
              batch: 63
  vm stats threshold: 24
  node_unreclaimable:  0
Node 1, zone   Normal
  pages free     0
        min      0
        low      0
        high     0
";

    const MEMINFO: &str = "Node 1 MemTotal:        1030584 kB
Node 1 MemFree:           60000 kB
Node 1 Active(file):       1000 kB
Node 1 Inactive(file):     3000 kB
Node 1 KReclaimable:        400 kB
Node 1 SReclaimable:        300 kB
";

    #[test]
    fn reads_a_nodes_room() {
        let page = crate::sys::mman::page_size() as u64;
        let room = NodeRoom::parse(NodeId(1), MEMINFO, ZONEINFO).unwrap();
        assert_eq!(room.free, 60000 << 10);
        assert_eq!(room.file_cache, 4000 << 10);
        assert_eq!(room.reclaimable_kernel, 400 << 10);
        assert_eq!(room.watermark_low, 10797 * page);
        assert_eq!(room.watermark_high, 12956 * page);
        assert_eq!(room.free_pcp, 2000 * page);
        // Free above high (per-CPU lists left out), plus half of the cache and of the slab.
        let expect = (60000 << 10) - 12956 * page + (2000 << 10) + (200 << 10);
        assert_eq!(room.available(), expect);
    }

    #[test]
    fn a_node_below_its_high_watermark_has_only_its_reclaimable_memory() {
        let meminfo = "Node 1 MemFree:   50000 kB\n";
        let room = NodeRoom::parse(NodeId(1), meminfo, ZONEINFO).unwrap();
        assert_eq!(room.available(), 0);
        assert!(NodeRoom::parse(NodeId(2), meminfo, ZONEINFO).is_none());
        assert!(NodeRoom::parse(NodeId(1), "nothing", ZONEINFO).is_none());
    }

    #[test]
    fn sums_the_zones_of_one_node() {
        let page = crate::sys::mman::page_size() as u64;
        let zones = zone_figures(ZONEINFO, NodeId(0)).unwrap();
        assert_eq!((zones.low, zones.high), (10027 * page, 12032 * page));
        assert_eq!(zones.pcp, 0);
    }

    #[test]
    fn reads_this_hosts_node_zero() {
        let room = NodeRoom::read(NodeId(0)).unwrap();
        assert!(room.free > 0 && room.watermark_high > 0, "{room:?}");
    }
}
