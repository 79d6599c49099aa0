//! Which moves the demo makes: to another node and back, or, on a one-node host, relocations within that node.

use std::collections::BTreeMap;

use gmem::migrate::PlacementPolicy;
use gmem::numa::{NodeId, Topology};
use serde::Serialize;
use vmm::Vm;

use super::DemoError;

/// One migration of all guest memory.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Move {
    /// Where it goes.
    pub to: NodeId,
    /// Whether it stays on its node and only gets new page frames.
    pub in_place: bool,
}

impl Move {
    /// The policy that asks for this move.
    pub fn policy(&self) -> PlacementPolicy {
        PlacementPolicy::Bind(self.to)
    }

    /// "to node 1", or "within node 0".
    pub fn describe(&self) -> String {
        if self.in_place {
            format!("within node {}", self.to)
        } else {
            format!("to node {}", self.to)
        }
    }

    /// The caption of the placement after this move (`index` counts from 0).
    pub fn after_label(&self, index: usize) -> String {
        format!("after move {} ({})", index + 1, self.describe())
    }
}

/// Whether the demo moves memory between nodes or within one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// To another node and back.
    CrossNode,
    /// Within the only node, proven by changed page frame numbers.
    SameNodeRelocation,
}

/// All moves of one demo run.
#[derive(Debug, Clone, Serialize)]
pub struct MovePlan {
    /// Cross-node or same-node.
    pub scope: Scope,
    /// The node holding most guest memory after boot.
    pub home: NodeId,
    /// Resident guest pages per node after boot.
    pub start: BTreeMap<NodeId, u64>,
    /// The node memory visits, if there is one.
    pub other: Option<NodeId>,
    /// The moves, in order.
    pub moves: Vec<Move>,
}

impl MovePlan {
    /// There and back `rounds` times: to the other node with the most free memory, or, on a
    /// host with one memory node, two relocations within it per round.
    pub fn for_host(topology: &Topology, vm: &Vm, rounds: u32) -> Result<Self, DemoError> {
        let start = vm
            .memory()
            .guest_placement()
            .map_err(DemoError::Memory)?
            .per_node();
        let home = start
            .iter()
            .max_by_key(|&(_, pages)| *pages)
            .map(|(node, _)| *node)
            .ok_or(DemoError::NoResidentMemory)?;
        let other = topology
            .nodes
            .iter()
            .filter(|n| n.id != home && n.total_bytes > 0)
            .max_by_key(|n| n.free_bytes)
            .map(|n| n.id);
        let round_trip = match other {
            Some(other) => [other, home].map(|to| Move {
                to,
                in_place: false,
            }),
            None => [home, home].map(|to| Move { to, in_place: true }),
        };
        Ok(MovePlan {
            scope: match other {
                Some(_) => Scope::CrossNode,
                None => Scope::SameNodeRelocation,
            },
            home,
            start,
            other,
            moves: (0..rounds).flat_map(|_| round_trip).collect(),
        })
    }

    /// One plain sentence on what the moves are and how they are proven.
    pub fn explanation(&self) -> String {
        let Some(other) = self.other else {
            return format!(
                "this host has one NUMA node, so nothing can move to another node: each move \
                 relocates all guest memory to new page frames within node {}, proven by the \
                 page frame numbers in /proc/self/pagemap, while the guest runs",
                self.home
            );
        };
        if self.start.len() == 1 {
            return format!(
                "all guest memory moves from node {} to node {other} and back, while the guest \
                 runs",
                self.home
            );
        }
        let spread: Vec<String> = self
            .start
            .iter()
            .map(|(node, pages)| format!("{pages} pages on node {node}"))
            .collect();
        format!(
            "guest memory starts where the kernel put it ({}); all of it moves to node {other}, \
             then all of it to node {}, while the guest runs",
            spread.join(", "),
            self.home
        )
    }
}
