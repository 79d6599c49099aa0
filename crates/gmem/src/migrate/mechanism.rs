//! What every mechanism gets for a step, and the one method each implements.

use std::time::Duration;

use super::copier::ContentCopier;
use super::movable::MovableMemory;
use super::plan::Step;
use super::quiesce::Quiesce;
use super::report::{ContentCheck, StepOutcome, StepReport};
use super::verify::{self, Verify};
use super::{InjectedFailure, MigrateError};
use crate::memory::{MappedGmem, Placement, page_size};
use crate::numa::{FrameNodes, NodeId, Pagemap};
use crate::sys::mman::Mmap;

/// Everything a step may use.
#[derive(Clone)]
pub(crate) struct StepContext<'a> {
    pub memory: &'a dyn MovableMemory,
    /// The gmem with this process's mapping: every range operation goes through it.
    pub host: &'a MappedGmem,
    pub map: &'a Mmap,
    pub quiesce: &'a dyn Quiesce,
    pub verify: Verify,
    pub pagemap: Option<&'a Pagemap>,
    /// PFN -> node, when memory blocks are visible: placement from one pagemap read.
    pub frames: Option<&'a FrameNodes>,
    pub copier: Option<&'a dyn ContentCopier>,
    pub inject: Option<InjectedFailure>,
    /// Index of this step in the migration, for fault injection.
    pub index: usize,
}

impl StepContext<'_> {
    /// Whether the test hook asks this step to fail at `point`.
    pub fn injected(&self, point: fn(usize) -> InjectedFailure) -> bool {
        self.inject == Some(point(self.index))
    }

    /// gmem offset of a step that lies within one chunk.
    pub fn gmem_offset(&self, step: &Step) -> u64 {
        let chunk_size = self.memory.layout().chunk_size;
        let chunk = step.guest_offset / chunk_size;
        self.memory.chunk_offset(chunk) + step.guest_offset % chunk_size
    }

    /// PFNs of a gmem range, if verification wants them and pagemap is readable.
    pub fn pfns(&self, offset: u64, len: u64) -> Option<Vec<Option<u64>>> {
        if !self.verify.placement() {
            return None;
        }
        verify::pfns(self.pagemap, self.map, offset, len / page_size())
    }

    /// Resident pages of a mapped gmem range per node: from PFNs when it can (one pagemap
    /// read), else from move_pages.
    pub fn pages_per_node(
        &self,
        offset: u64,
        len: u64,
        pfns: Option<&[Option<u64>]>,
    ) -> Result<std::collections::BTreeMap<NodeId, u64>, MigrateError> {
        if let (Some(pfns), Some(frames)) = (pfns, self.frames) {
            let nodes: Option<Vec<NodeId>> = pfns
                .iter()
                .flatten()
                .map(|&pfn| frames.node_of(pfn))
                .collect();
            if let Some(nodes) = nodes {
                let mut counts = std::collections::BTreeMap::new();
                for node in nodes {
                    *counts.entry(node).or_insert(0) += 1;
                }
                return Ok(counts);
            }
        }
        Ok(Placement::query(self.map, offset, len)?.per_node())
    }
}

/// One way of moving pages.
pub(crate) trait Mechanism {
    /// Moves one step's range to its target. `Err` only for failures that must end the
    /// whole migration (nothing of this step is lost either way).
    fn run(&mut self, cx: &StepContext<'_>, step: &Step) -> Result<StepReport, MigrateError>;
}

/// A report skeleton for `step`.
pub(crate) fn report(step: &Step, outcome: StepOutcome) -> StepReport {
    StepReport {
        guest_offset: step.guest_offset,
        len: step.len,
        target: step.target,
        outcome,
        stop: None,
        stop_entry: None,
        stop_phases: None,
        pages_moved: 0,
        pages_off_target: 0,
        pfns_changed: None,
        pfns_checked: None,
        content: ContentCheck::NotTaken,
    }
}

/// Whether this process maps every page of a finished step's range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mapped {
    /// Every page: its PFNs say where all of them are (remap populates its destination).
    Fully,
    /// Perhaps not: ask the kernel (move_pages) for every resident page.
    Unknown,
}

/// Fills the placement and PFN fields of a finished step from the range's new state.
pub(crate) fn check_result(
    cx: &StepContext<'_>,
    report: &mut StepReport,
    offset: u64,
    pfns_before: Option<Vec<Option<u64>>>,
    stop: Option<Duration>,
    mapped: Mapped,
) -> Result<(), MigrateError> {
    report.stop = stop;
    let pfns_after = cx.pfns(offset, report.len);
    // One pagemap read (~20 us per 2 MiB here) instead of a move_pages query (~200 us).
    let per_node = match (mapped, &pfns_after) {
        (Mapped::Fully, Some(pfns)) if pfns.iter().all(Option::is_some) => {
            cx.pages_per_node(offset, report.len, Some(pfns))?
        }
        _ => Placement::query(cx.map, offset, report.len)?.per_node(),
    };
    let on_target = per_node.get(&report.target).copied().unwrap_or(0);
    let resident: u64 = per_node.values().sum();
    report.pages_off_target = resident - on_target;
    if let (Some(before), Some(after)) = (pfns_before, pfns_after) {
        report.pfns_changed = Some(verify::pfns_changed(&before, &after));
        report.pfns_checked = Some(
            before
                .iter()
                .zip(&after)
                .filter(|(b, a)| b.is_some() && a.is_some())
                .count() as u64,
        );
    }
    if report.outcome == StepOutcome::Moved {
        report.pages_moved = on_target;
    }
    Ok(())
}
