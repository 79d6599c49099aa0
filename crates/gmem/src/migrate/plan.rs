//! The planner: turns a placement policy into steps that move only what is out of place.
//!
//! Policy lives here, in userspace, as the KVM maintainers asked: the kernel is told only
//! "these pages, that node".

use std::fmt;

use serde::{Deserialize, Serialize};

use super::MigrateError;
use crate::memory::{GuestOffset, PageLocation, Placement};
use crate::numa::{NodeId, NodeMask, Topology};

/// Where guest memory should live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "policy", content = "nodes")]
pub enum PlacementPolicy {
    /// Everything on this node.
    Bind(NodeId),
    /// Everything off this node (what memory offlining needs), spread over the others.
    Drain(NodeId),
    /// Units (chunks, or 2 MiB batches) round-robin over these nodes.
    Interleave(NodeMask),
    /// On the node(s) of these CPUs, e.g. where the vCPUs run.
    Follow(Vec<u32>),
}

/// The placement policies by name, as the API's JSON and the command line spell them; the
/// nodes or CPUs they take come separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// Everything on one node.
    Bind,
    /// Everything off one node, spread over the others.
    Drain,
    /// Chunks round-robin over the nodes given.
    Interleave,
    /// On the nodes of the CPUs given.
    Follow,
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyKind::Bind => "bind",
            PolicyKind::Drain => "drain",
            PolicyKind::Interleave => "interleave",
            PolicyKind::Follow => "follow",
        })
    }
}

impl PlacementPolicy {
    /// The policy's name.
    pub fn kind(&self) -> PolicyKind {
        match self {
            PlacementPolicy::Bind(_) => PolicyKind::Bind,
            PlacementPolicy::Drain(_) => PolicyKind::Drain,
            PlacementPolicy::Interleave(_) => PolicyKind::Interleave,
            PlacementPolicy::Follow(_) => PolicyKind::Follow,
        }
    }
}

impl fmt::Display for PlacementPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlacementPolicy::Bind(n) => write!(f, "bind {n}"),
            PlacementPolicy::Drain(n) => write!(f, "drain {n}"),
            PlacementPolicy::Interleave(set) => write!(f, "interleave {set}"),
            PlacementPolicy::Follow(cpus) => {
                let cpus: Vec<String> = cpus.iter().map(u32::to_string).collect();
                write!(f, "follow cpus {}", cpus.join(","))
            }
        }
    }
}

/// One contiguous range of guest memory to move to one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Step {
    /// Offset from the start of guest RAM.
    pub guest_offset: GuestOffset,
    /// Bytes; never crosses a unit (chunk) boundary.
    pub len: u64,
    /// Destination node.
    pub target: NodeId,
    /// Pages in the range that are resident and out of place (or all resident ones when
    /// relocating in place).
    pub pages_to_move: u64,
}

/// The steps of one migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Steps in guest address order.
    pub steps: Vec<Step>,
    /// Bytes per unit: targets are chosen per unit.
    pub unit: u64,
    /// Pages to move, over all steps.
    pub pages_to_move: u64,
    /// Resident pages already where they belong (left alone).
    pub pages_in_place: u64,
    /// The target of every unit in guest order, holes included: where the guest's first
    /// touches there should be allocated once the memory has moved.
    pub unit_targets: Vec<NodeId>,
}

/// What the planner needs to know about the memory.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    /// Location of every guest page, in guest order.
    pub placement: &'a Placement,
    /// Bytes per unit (the chunk size of a chunked layout; 2 MiB otherwise).
    pub unit: u64,
    /// Move whole units whenever any page in them must move (remap).
    pub whole_units: bool,
    /// Also move pages already on their target (a relocation within the node).
    pub relocate_in_place: bool,
}

impl PlacementPolicy {
    /// The target node of each unit, or `None` where the unit's pages may stay where they
    /// are (drain only moves pages off the drained node).
    fn targets(&self, topology: &Topology, units: u64) -> Result<Vec<NodeId>, MigrateError> {
        let memory_nodes = topology.memory_nodes();
        let check = |node: NodeId| -> Result<NodeId, MigrateError> {
            match topology.node(node) {
                None => Err(MigrateError::BadTarget {
                    node,
                    reason: format!("it does not exist (online nodes: {})", topology.node_mask()),
                }),
                Some(n) if n.total_bytes == 0 => Err(MigrateError::BadTarget {
                    node,
                    reason: "it has no memory".into(),
                }),
                Some(_) => Ok(node),
            }
        };
        let round_robin = |nodes: &[NodeId]| {
            (0..units)
                .map(|k| nodes[(k % nodes.len() as u64) as usize])
                .collect()
        };
        Ok(match self {
            PlacementPolicy::Bind(node) => vec![check(*node)?; units as usize],
            PlacementPolicy::Interleave(set) => {
                if set.is_empty() {
                    return Err(MigrateError::InvalidRequest(
                        "interleave needs at least one node".into(),
                    ));
                }
                let nodes = set.iter().map(check).collect::<Result<Vec<_>, _>>()?;
                round_robin(&nodes)
            }
            PlacementPolicy::Drain(node) => {
                check(*node)?;
                let others: Vec<NodeId> = memory_nodes.into_iter().filter(|n| n != node).collect();
                if others.is_empty() {
                    return Err(MigrateError::BadTarget {
                        node: *node,
                        reason: "it is the only node with memory, so there is nowhere to drain to"
                            .into(),
                    });
                }
                round_robin(&others)
            }
            PlacementPolicy::Follow(cpus) => {
                if cpus.is_empty() {
                    return Err(MigrateError::InvalidRequest(
                        "follow needs at least one CPU".into(),
                    ));
                }
                let mut nodes = NodeMask::new();
                for &cpu in cpus {
                    let node = topology.node_of_cpu(cpu).ok_or_else(|| {
                        MigrateError::InvalidRequest(format!(
                            "CPU {cpu} is not online on any NUMA node"
                        ))
                    })?;
                    nodes.insert(node);
                }
                let nodes = nodes.iter().map(check).collect::<Result<Vec<_>, _>>()?;
                round_robin(&nodes)
            }
        })
    }

    /// Whether a resident page on `node` must move to `target` under this policy.
    fn must_move(&self, node: NodeId, target: NodeId, relocate_in_place: bool) -> bool {
        match self {
            PlacementPolicy::Drain(drained) => node == *drained,
            _ => node != target || relocate_in_place,
        }
    }

    /// Plans the steps that bring `input.placement` in line with this policy.
    pub fn plan(&self, topology: &Topology, input: PlanInput<'_>) -> Result<Plan, MigrateError> {
        let page_size = input.placement.page_size;
        if input.unit == 0 || !input.unit.is_multiple_of(page_size) {
            return Err(MigrateError::InvalidRequest(format!(
                "unit {} is not a multiple of the page size",
                input.unit
            )));
        }
        let pages_per_unit = input.unit / page_size;
        let total_pages = input.placement.pages();
        let units = total_pages.div_ceil(pages_per_unit);
        let targets = self.targets(topology, units)?;

        let mut plan = Plan {
            steps: Vec::new(),
            unit: input.unit,
            pages_to_move: 0,
            pages_in_place: 0,
            unit_targets: targets.clone(),
        };
        for (unit, &target) in targets.iter().enumerate() {
            let first = unit as u64 * pages_per_unit;
            let last = (first + pages_per_unit).min(total_pages);
            // Runs of pages that must move, within this unit.
            let mut runs: Vec<(u64, u64, u64)> = Vec::new(); // (first page, pages, to move)
            for range in &input.placement.ranges {
                let (start, end) = (
                    range.first_page.max(first),
                    (range.first_page + range.pages).min(last),
                );
                if start >= end {
                    continue;
                }
                let PageLocation::Node(node) = range.location else {
                    continue;
                };
                if !self.must_move(node, target, input.relocate_in_place) {
                    plan.pages_in_place += end - start;
                    continue;
                }
                match runs.last_mut() {
                    Some(run) if run.0 + run.1 == start => {
                        run.1 += end - start;
                        run.2 += end - start;
                    }
                    _ => runs.push((start, end - start, end - start)),
                }
            }
            let to_move: u64 = runs.iter().map(|r| r.2).sum();
            if to_move == 0 {
                continue;
            }
            plan.pages_to_move += to_move;
            if input.whole_units {
                runs = vec![(first, last - first, to_move)];
            }
            plan.steps
                .extend(runs.into_iter().map(|(page, pages, moving)| Step {
                    guest_offset: GuestOffset(page * page_size),
                    len: pages * page_size,
                    target,
                    pages_to_move: moving,
                }));
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numa::Node;

    fn two_nodes() -> Topology {
        let node = |id, cpus: &str| Node {
            id: NodeId(id),
            cpus: cpus.into(),
            total_bytes: 1 << 30,
            free_bytes: 1 << 29,
        };
        Topology {
            nodes: vec![node(0, "0"), node(1, "1")],
        }
    }

    fn on(node: u32) -> PageLocation {
        PageLocation::Node(NodeId(node))
    }

    fn input(placement: &Placement, whole_units: bool) -> PlanInput<'_> {
        PlanInput {
            placement,
            unit: 4 * 4096,
            whole_units,
            relocate_in_place: false,
        }
    }

    #[test]
    fn bind_moves_only_what_is_out_of_place() {
        // Two 4-page units: [0 0 1 -] [1 1 0 0]
        let pages = [
            on(0),
            on(0),
            on(1),
            PageLocation::NotPresent,
            on(1),
            on(1),
            on(0),
            on(0),
        ];
        let placement = Placement::from_pages(4096, pages);
        let plan = PlacementPolicy::Bind(NodeId(1))
            .plan(&two_nodes(), input(&placement, false))
            .unwrap();
        assert_eq!(plan.pages_to_move, 4);
        assert_eq!(plan.pages_in_place, 3);
        let ranges: Vec<(u64, u64)> = plan
            .steps
            .iter()
            .map(|s| (s.guest_offset.raw() / 4096, s.len / 4096))
            .collect();
        assert_eq!(ranges, [(0, 2), (6, 2)]);

        let whole = PlacementPolicy::Bind(NodeId(1))
            .plan(&two_nodes(), input(&placement, true))
            .unwrap();
        let ranges: Vec<(u64, u64)> = whole
            .steps
            .iter()
            .map(|s| (s.guest_offset.raw() / 4096, s.len / 4096))
            .collect();
        assert_eq!(ranges, [(0, 4), (4, 4)]);
        assert_eq!(whole.pages_to_move, 4);
    }

    #[test]
    fn already_in_place_moves_nothing_unless_relocating() {
        let placement = Placement::from_pages(4096, [on(0); 8]);
        let plan = PlacementPolicy::Bind(NodeId(0))
            .plan(&two_nodes(), input(&placement, false))
            .unwrap();
        assert!(plan.steps.is_empty());
        assert_eq!(plan.pages_in_place, 8);
        let relocate = PlanInput {
            relocate_in_place: true,
            ..input(&placement, false)
        };
        let plan = PlacementPolicy::Bind(NodeId(0))
            .plan(&two_nodes(), relocate)
            .unwrap();
        assert_eq!(plan.pages_to_move, 8);
    }

    #[test]
    fn drain_interleave_follow() {
        let placement = Placement::from_pages(
            4096,
            [on(0), on(1), on(0), on(1), on(0), on(0), on(0), on(0)],
        );
        let topo = two_nodes();
        let drain = PlacementPolicy::Drain(NodeId(1))
            .plan(&topo, input(&placement, false))
            .unwrap();
        assert_eq!(drain.pages_to_move, 2);
        assert!(drain.steps.iter().all(|s| s.target == NodeId(0)));

        let inter = PlacementPolicy::Interleave("0-1".parse().unwrap())
            .plan(&topo, input(&placement, false))
            .unwrap();
        // Unit 0 -> node 0 (moves its 2 node-1 pages), unit 1 -> node 1 (moves 4).
        assert_eq!(inter.pages_to_move, 6);

        let follow = PlacementPolicy::Follow(vec![1])
            .plan(&topo, input(&placement, false))
            .unwrap();
        assert!(follow.steps.iter().all(|s| s.target == NodeId(1)));
    }

    #[test]
    fn impossible_targets_are_refused() {
        let placement = Placement::from_pages(4096, [on(0); 4]);
        let one = Topology {
            nodes: vec![two_nodes().nodes[0].clone()],
        };
        let err = PlacementPolicy::Drain(NodeId(0))
            .plan(&one, input(&placement, false))
            .unwrap_err();
        assert!(err.to_string().contains("nowhere to drain to"), "{err}");
        let err = PlacementPolicy::Bind(NodeId(7))
            .plan(&one, input(&placement, false))
            .unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        let err = PlacementPolicy::Follow(vec![99])
            .plan(&one, input(&placement, false))
            .unwrap_err();
        assert!(err.to_string().contains("CPU 99"), "{err}");
    }
}
