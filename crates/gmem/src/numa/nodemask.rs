//! `NodeId` and `NodeMask`, with the kernel's list syntax ("0-2,5") both ways.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::sys::mempolicy::{MASK_BITS, MASK_WORDS, RawNodeMask};

/// A NUMA node number, as the kernel numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub u32);

impl NodeId {
    /// The largest node id a mask can hold, plus one.
    pub const LIMIT: u32 = MASK_BITS as u32;
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for NodeId {
    type Err = ParseNodeListError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let n: u32 = s
            .trim()
            .parse()
            .map_err(|_| ParseNodeListError::NotANumber(s.to_owned()))?;
        if n >= Self::LIMIT {
            return Err(ParseNodeListError::TooLarge(n));
        }
        Ok(NodeId(n))
    }
}

/// Why a node list such as "0-1,3" did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseNodeListError {
    /// A part was not a decimal number.
    #[error("'{0}' is not a node number")]
    NotANumber(String),
    /// A range ran backwards.
    #[error("node range {0}-{1} runs backwards")]
    Backwards(u32, u32),
    /// A node number was past what the kernel supports.
    #[error("node {0} is past the kernel's limit of {limit} nodes", limit = NodeId::LIMIT)]
    TooLarge(u32),
}

/// A set of NUMA nodes, in the kernel's bitmap layout.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeMask {
    bits: RawNodeMask,
}

impl Default for NodeMask {
    fn default() -> Self {
        NodeMask {
            bits: [0; MASK_WORDS],
        }
    }
}

impl NodeMask {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The set holding only `node`.
    pub fn single(node: NodeId) -> Self {
        let mut mask = Self::new();
        mask.insert(node);
        mask
    }

    /// Adds `node`.
    pub fn insert(&mut self, node: NodeId) {
        let n = node.0 as usize;
        self.bits[n / 64] |= 1 << (n % 64);
    }

    /// Removes `node`.
    pub fn remove(&mut self, node: NodeId) {
        let n = node.0 as usize;
        self.bits[n / 64] &= !(1 << (n % 64));
    }

    /// Whether `node` is in the set.
    pub fn contains(&self, node: NodeId) -> bool {
        let n = node.0 as usize;
        n < MASK_BITS && self.bits[n / 64] & (1 << (n % 64)) != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|w| *w == 0)
    }

    /// Number of nodes in the set.
    pub fn len(&self) -> usize {
        self.bits.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Nodes in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = NodeId> + '_ {
        (0..MASK_BITS as u32)
            .map(NodeId)
            .filter(|node| self.contains(*node))
    }

    /// The lowest node in the set.
    pub fn first(&self) -> Option<NodeId> {
        self.iter().next()
    }

    /// Nodes in both sets.
    pub fn intersection(&self, other: &NodeMask) -> NodeMask {
        let mut out = *self;
        for (word, theirs) in out.bits.iter_mut().zip(other.bits) {
            *word &= theirs;
        }
        out
    }

    /// Nodes in `self` but not in `other`.
    pub fn difference(&self, other: &NodeMask) -> NodeMask {
        let mut out = *self;
        for (word, theirs) in out.bits.iter_mut().zip(other.bits) {
            *word &= !theirs;
        }
        out
    }

    /// The raw bitmap for the mempolicy syscalls.
    pub fn as_raw(&self) -> &RawNodeMask {
        &self.bits
    }

    /// Builds a mask from a raw kernel bitmap.
    pub fn from_raw(bits: RawNodeMask) -> Self {
        NodeMask { bits }
    }
}

impl FromIterator<NodeId> for NodeMask {
    fn from_iter<I: IntoIterator<Item = NodeId>>(iter: I) -> Self {
        let mut mask = NodeMask::new();
        for node in iter {
            mask.insert(node);
        }
        mask
    }
}

/// Parses the kernel's list syntax, as in /sys/devices/system/node/online: "0-2,5".
/// The empty string is the empty set.
impl FromStr for NodeMask {
    type Err = ParseNodeListError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut mask = NodeMask::new();
        for part in s.trim().split(',').filter(|p| !p.trim().is_empty()) {
            match part.split_once('-') {
                Some((lo, hi)) => {
                    let (lo, hi) = (lo.parse::<NodeId>()?, hi.parse::<NodeId>()?);
                    if lo > hi {
                        return Err(ParseNodeListError::Backwards(lo.0, hi.0));
                    }
                    (lo.0..=hi.0).for_each(|n| mask.insert(NodeId(n)));
                }
                None => mask.insert(part.parse()?),
            }
        }
        Ok(mask)
    }
}

/// Formats in the kernel's list syntax, collapsing runs: "0-2,5".
impl fmt::Display for NodeMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes: Vec<u32> = self.iter().map(|n| n.0).collect();
        let mut parts = Vec::new();
        let mut i = 0;
        while i < nodes.len() {
            let start = nodes[i];
            let mut end = start;
            while i + 1 < nodes.len() && nodes[i + 1] == end + 1 {
                i += 1;
                end = nodes[i];
            }
            parts.push(if start == end {
                start.to_string()
            } else {
                format!("{start}-{end}")
            });
            i += 1;
        }
        f.write_str(&parts.join(","))
    }
}

impl fmt::Debug for NodeMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeMask({self})")
    }
}

impl Serialize for NodeMask {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for NodeMask {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let nodes = Vec::<u32>::deserialize(deserializer)?;
        nodes
            .into_iter()
            .map(|n| {
                if n < NodeId::LIMIT {
                    Ok(NodeId(n))
                } else {
                    Err(serde::de::Error::custom(ParseNodeListError::TooLarge(n)))
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_kernel_lists() {
        let mask: NodeMask = "0-2,5".parse().unwrap();
        assert_eq!(mask.iter().map(|n| n.0).collect::<Vec<_>>(), [0, 1, 2, 5]);
        assert!("".parse::<NodeMask>().unwrap().is_empty());
        assert!("0\n".parse::<NodeMask>().unwrap().contains(NodeId(0)));
        assert_eq!(
            "3-1".parse::<NodeMask>(),
            Err(ParseNodeListError::Backwards(3, 1))
        );
        assert!(matches!(
            "x".parse::<NodeMask>(),
            Err(ParseNodeListError::NotANumber(_))
        ));
        assert_eq!(
            "1024".parse::<NodeMask>(),
            Err(ParseNodeListError::TooLarge(1024))
        );
    }

    #[test]
    fn raw_layout_matches_the_kernel() {
        let mask: NodeMask = "0,63,64".parse().unwrap();
        assert_eq!(mask.as_raw()[0], 1 | 1 << 63);
        assert_eq!(mask.as_raw()[1], 1);
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(nodes in proptest::collection::btree_set(0u32..1024, 0..40)) {
            let mask: NodeMask = nodes.iter().copied().map(NodeId).collect();
            let text = mask.to_string();
            let back: NodeMask = text.parse().unwrap();
            prop_assert_eq!(back, mask);
            prop_assert_eq!(mask.len(), nodes.len());
        }

        #[test]
        fn set_algebra(a in proptest::collection::btree_set(0u32..200, 0..30),
                       b in proptest::collection::btree_set(0u32..200, 0..30)) {
            let ma: NodeMask = a.iter().copied().map(NodeId).collect();
            let mb: NodeMask = b.iter().copied().map(NodeId).collect();
            let inter: Vec<u32> = ma.intersection(&mb).iter().map(|n| n.0).collect();
            let diff: Vec<u32> = ma.difference(&mb).iter().map(|n| n.0).collect();
            prop_assert_eq!(inter, a.intersection(&b).copied().collect::<Vec<_>>());
            prop_assert_eq!(diff, a.difference(&b).copied().collect::<Vec<_>>());
        }

        #[test]
        fn json_round_trip(nodes in proptest::collection::btree_set(0u32..1024, 0..10)) {
            let mask: NodeMask = nodes.iter().copied().map(NodeId).collect();
            let json = serde_json::to_string(&mask).unwrap();
            prop_assert_eq!(serde_json::from_str::<NodeMask>(&json).unwrap(), mask);
        }
    }
}
