//! NUMA vocabulary: node ids and masks, host topology, numa_maps and pagemap readers.

mod frames;
mod nodemask;
pub mod numa_maps;
pub mod pagemap;
pub mod room;
pub mod topology;

pub use frames::FrameNodes;
pub use nodemask::{NodeId, NodeMask, ParseNodeListError};
pub use numa_maps::{NumaMap, NumaMaps};
pub use pagemap::Pagemap;
pub use room::NodeRoom;
pub use topology::{Node, Topology};
