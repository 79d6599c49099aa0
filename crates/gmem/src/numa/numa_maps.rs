//! Parser for /proc/PID/numa_maps (joined with /proc/PID/maps for sizes), gmem-aware.
//!
//! The kernel names a gmem mapping differently across versions:
//! 6.18 prints `file=anon_inode:[kvm-gmem]`, 7.x prints `file=/[kvm-gmem]\040(deleted)`.

use std::collections::BTreeMap;
use std::fs;
use std::io;

use serde::Serialize;

use super::NodeId;

/// One line of numa_maps: a VMA with its policy and per-node page counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NumaMap {
    /// Start address of the VMA.
    pub start: u64,
    /// End address (exclusive), from /proc/PID/maps; equals `start` if unknown.
    pub end: u64,
    /// Policy as the kernel prints it: "default", "bind:0", "interleave:0-1", ...
    pub policy: String,
    /// The `file=` field, unescaped (`\040` becomes a space).
    pub file: Option<String>,
    /// Resident pages per node (`N<node>=<pages>`).
    pub pages_per_node: BTreeMap<NodeId, u64>,
    /// Page size of the counts (`kernelpagesize_kB`), in bytes.
    pub page_size: u64,
    /// Other `key=value` and bare fields, verbatim ("dirty" -> "12", "heap" -> "").
    pub fields: BTreeMap<String, String>,
}

impl NumaMap {
    /// Whether this VMA maps a guest_memfd.
    pub fn is_gmem(&self) -> bool {
        self.file
            .as_deref()
            .is_some_and(|f| f.contains("[kvm-gmem]"))
    }

    /// Size of the VMA in bytes.
    pub fn size(&self) -> u64 {
        self.end - self.start
    }

    /// Resident pages over all nodes.
    pub fn resident_pages(&self) -> u64 {
        self.pages_per_node.values().sum()
    }
}

/// All VMAs of one process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NumaMaps {
    /// The VMAs in address order.
    pub maps: Vec<NumaMap>,
}

impl NumaMaps {
    /// Reads /proc/PID/numa_maps and /proc/PID/maps of a live process.
    pub fn read(pid: u32) -> io::Result<Self> {
        let numa = fs::read_to_string(format!("/proc/{pid}/numa_maps"))?;
        let maps = fs::read_to_string(format!("/proc/{pid}/maps"))?;
        Ok(Self::parse(&numa, &maps))
    }

    /// Reads the calling process.
    pub fn read_self() -> io::Result<Self> {
        Self::read(std::process::id())
    }

    /// Parses numa_maps text, taking VMA ends from maps text. Malformed lines are skipped:
    /// the files are written by the kernel, and a line we cannot read must not hide others.
    pub fn parse(numa_maps: &str, maps: &str) -> Self {
        let ends: BTreeMap<u64, u64> = maps.lines().filter_map(parse_maps_range).collect();
        let maps = numa_maps
            .lines()
            .filter_map(parse_line)
            .map(|mut map| {
                map.end = ends.get(&map.start).copied().unwrap_or(map.start);
                map
            })
            .collect();
        NumaMaps { maps }
    }

    /// The gmem VMAs only.
    pub fn gmem(&self) -> impl Iterator<Item = &NumaMap> {
        self.maps.iter().filter(|m| m.is_gmem())
    }

    /// The VMA that starts at `addr`.
    pub fn at(&self, addr: u64) -> Option<&NumaMap> {
        self.maps.iter().find(|m| m.start == addr)
    }
}

/// "7f12a000-7f12b000 rw-s ..." -> (start, end).
fn parse_maps_range(line: &str) -> Option<(u64, u64)> {
    let range = line.split_whitespace().next()?;
    let (start, end) = range.split_once('-')?;
    Some((
        u64::from_str_radix(start, 16).ok()?,
        u64::from_str_radix(end, 16).ok()?,
    ))
}

fn parse_line(line: &str) -> Option<NumaMap> {
    let mut words = line.split_whitespace();
    let start = u64::from_str_radix(words.next()?, 16).ok()?;
    let policy = words.next()?.to_owned();
    let mut map = NumaMap {
        start,
        end: start,
        policy,
        file: None,
        pages_per_node: BTreeMap::new(),
        page_size: 4096,
        fields: BTreeMap::new(),
    };
    for word in words {
        let (key, value) = word.split_once('=').unwrap_or((word, ""));
        if let Some(node) = key.strip_prefix('N').and_then(|n| n.parse().ok()) {
            map.pages_per_node.insert(NodeId(node), value.parse().ok()?);
        } else if key == "file" {
            map.file = Some(value.replace("\\040", " "));
        } else if key == "kernelpagesize_kB" {
            map.page_size = value.parse::<u64>().ok()? * 1024;
        } else {
            map.fields.insert(key.to_owned(), value.to_owned());
        }
    }
    Some(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 256-page gmem on kernel 6.18 (this project's dev hosts), bound to node 0.
    const NUMA_MAPS_618: &str = "\
55d0c2a00000 default file=/usr/bin/sleep mapped=2 mapmax=3 N0=2 kernelpagesize_kB=4
7f3e40000000 bind:0 file=anon_inode:[kvm-gmem] dirty=256 N0=256 kernelpagesize_kB=4
7f3e50000000 default file=anon_inode:[kvm-gmem]
7ffd1c2f0000 default stack anon=3 dirty=3 N0=3 kernelpagesize_kB=4
";
    const MAPS_618: &str = "\
55d0c2a00000-55d0c2a02000 r--p 00000000 fe:00 1234 /usr/bin/sleep
7f3e40000000-7f3e40100000 rw-s 00000000 00:0f 5678 anon_inode:[kvm-gmem]
7f3e50000000-7f3e50200000 rw-s 00000000 00:0f 5679 anon_inode:[kvm-gmem]
7ffd1c2f0000-7ffd1c311000 rw-p 00000000 00:00 0 [stack]
";

    /// The same kind of mapping on Debian's 7.3.4 in the two-node lab.
    const NUMA_MAPS_73: &str = "\
7f8a00000000 interleave:0-1 file=/[kvm-gmem]\\040(deleted) dirty=512 active=0 N0=256 N1=256 kernelpagesize_kB=4
";
    const MAPS_73: &str = "\
7f8a00000000-7f8a00200000 rw-s 00000000 00:10 33 /[kvm-gmem] (deleted)
";

    #[test]
    fn finds_gmem_on_6_18() {
        let maps = NumaMaps::parse(NUMA_MAPS_618, MAPS_618);
        assert_eq!(maps.maps.len(), 4);
        let gmem: Vec<_> = maps.gmem().collect();
        assert_eq!(gmem.len(), 2);
        assert_eq!(gmem[0].policy, "bind:0");
        assert_eq!(gmem[0].size(), 1 << 20);
        assert_eq!(gmem[0].pages_per_node[&NodeId(0)], 256);
        assert_eq!(gmem[0].fields["dirty"], "256");
        assert_eq!(gmem[1].resident_pages(), 0);
        assert!(maps.maps[3].fields.contains_key("stack"));
    }

    #[test]
    fn finds_gmem_on_7_3() {
        let maps = NumaMaps::parse(NUMA_MAPS_73, MAPS_73);
        let gmem: Vec<_> = maps.gmem().collect();
        assert_eq!(gmem.len(), 1);
        assert_eq!(gmem[0].file.as_deref(), Some("/[kvm-gmem] (deleted)"));
        assert_eq!(gmem[0].pages_per_node[&NodeId(1)], 256);
        assert_eq!(gmem[0].resident_pages(), 512);
        assert_eq!(gmem[0].size(), 2 << 20);
    }

    #[test]
    fn skips_malformed_lines() {
        let maps = NumaMaps::parse("zz default\n7f00 bind:0 N0=x\n\n", "");
        assert!(maps.maps.is_empty());
    }

    #[test]
    fn reads_itself() {
        let maps = NumaMaps::read_self().expect("own numa_maps is readable");
        assert!(maps.maps.iter().any(|m| m.fields.contains_key("stack")));
    }
}
