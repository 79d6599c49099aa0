//! The host's NUMA topology, read from /sys/devices/system/node.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{NodeId, NodeMask};

const SYSFS_NODES: &str = "/sys/devices/system/node";

/// One online NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    /// Kernel node number.
    pub id: NodeId,
    /// CPUs local to the node, in list syntax ("0-3"). Empty for memory-only nodes.
    pub cpus: String,
    /// Bytes of memory the node holds (MemTotal).
    pub total_bytes: u64,
    /// Bytes free right now (MemFree).
    pub free_bytes: u64,
}

/// Online nodes of this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Topology {
    /// Online nodes in ascending order.
    pub nodes: Vec<Node>,
}

/// Why the topology could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// A sysfs file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A sysfs file did not have the expected form.
    #[error("unexpected contents in {path}: {detail}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
}

fn read(path: &Path) -> Result<String, TopologyError> {
    fs::read_to_string(path).map_err(|source| TopologyError::Read {
        path: path.to_owned(),
        source,
    })
}

impl Topology {
    /// Reads the live topology.
    pub fn read() -> Result<Self, TopologyError> {
        Self::read_from(Path::new(SYSFS_NODES))
    }

    /// Reads a topology from a sysfs-shaped directory.
    pub fn read_from(root: &Path) -> Result<Self, TopologyError> {
        let online_path = root.join("online");
        let online: NodeMask =
            read(&online_path)?
                .parse()
                .map_err(|e: super::ParseNodeListError| TopologyError::Parse {
                    path: online_path.clone(),
                    detail: e.to_string(),
                })?;
        let mut nodes = Vec::new();
        for id in online.iter() {
            let dir = root.join(format!("node{id}"));
            let cpus = read(&dir.join("cpulist"))?.trim().to_owned();
            let meminfo_path = dir.join("meminfo");
            let meminfo = read(&meminfo_path)?;
            let field = |name: &str| {
                meminfo_kib(&meminfo, name)
                    .map(|kib| kib * 1024)
                    .ok_or_else(|| TopologyError::Parse {
                        path: meminfo_path.clone(),
                        detail: format!("no {name} line"),
                    })
            };
            nodes.push(Node {
                id,
                cpus,
                total_bytes: field("MemTotal")?,
                free_bytes: field("MemFree")?,
            });
        }
        Ok(Topology { nodes })
    }

    /// The set of online nodes.
    pub fn node_mask(&self) -> NodeMask {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// Online nodes that have memory, ascending (memory-less nodes cannot be targets).
    pub fn memory_nodes(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|n| n.total_bytes > 0)
            .map(|n| n.id)
            .collect()
    }

    /// Looks up an online node.
    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The node whose CPU list contains `cpu`.
    pub fn node_of_cpu(&self, cpu: u32) -> Option<NodeId> {
        self.nodes.iter().find_map(|n| {
            let cpus: NodeMask = n.cpus.parse().ok()?;
            cpus.contains(NodeId(cpu)).then_some(n.id)
        })
    }
}

/// Reads "Node 0 MemTotal:   24576000 kB" style lines; returns KiB.
pub(super) fn meminfo_kib(meminfo: &str, field: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        let (_node, _id, name, value) =
            (words.next()?, words.next()?, words.next()?, words.next()?);
        (name.strip_suffix(':') == Some(field))
            .then(|| value.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Head of /sys/devices/system/node/node0/meminfo on a 6.18 host.
    const MEMINFO_618: &str = "Node 0 MemTotal:       24634228 kB
Node 0 MemFree:        23329672 kB
Node 0 MemUsed:         1304556 kB
Node 0 SwapCached:            0 kB
";

    #[test]
    fn parses_node_meminfo() {
        assert_eq!(meminfo_kib(MEMINFO_618, "MemTotal"), Some(24634228));
        assert_eq!(meminfo_kib(MEMINFO_618, "MemFree"), Some(23329672));
        assert_eq!(meminfo_kib(MEMINFO_618, "Nope"), None);
    }

    #[test]
    fn reads_a_sysfs_shaped_tree() {
        let dir = std::env::temp_dir().join(format!("gmem-topo-{}", std::process::id()));
        for (node, cpus) in [(0, "0"), (1, "1")] {
            let nd = dir.join(format!("node{node}"));
            fs::create_dir_all(&nd).unwrap();
            fs::write(nd.join("cpulist"), format!("{cpus}\n")).unwrap();
            fs::write(
                nd.join("meminfo"),
                MEMINFO_618.replace("Node 0", &format!("Node {node}")),
            )
            .unwrap();
        }
        fs::write(dir.join("online"), "0-1\n").unwrap();
        let topo = Topology::read_from(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(topo.nodes.len(), 2);
        assert_eq!(topo.node_of_cpu(1), Some(NodeId(1)));
        assert_eq!(topo.node(NodeId(1)).unwrap().total_bytes, 24634228 * 1024);
    }

    #[test]
    fn reads_the_live_host() {
        let topo = Topology::read().expect("this host has /sys/devices/system/node");
        assert!(!topo.nodes.is_empty());
        assert!(topo.nodes.iter().all(|n| n.total_bytes >= n.free_bytes));
    }
}
