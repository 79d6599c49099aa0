//! What a mechanism is: the [`Mechanism`] trait every one implements, what it gets for a
//! step, and the [`REGISTRY`] the engine chooses from (one entry per mechanism, in `auto`'s
//! order of preference). Adding a mechanism is one file and one entry here.

use std::time::Duration;

use super::copier::ContentCopier;
use super::engine::MigrationRequest;
use super::journal::BatchJournal;
use super::movable::MovableMemory;
use super::plan::Step;
use super::quiesce::Quiesce;
use super::report::{ContentCheck, MechanismKind, StepOutcome, StepReport};
use super::verify::{self, Verify};
use super::{InjectedFailure, MigrateError};
use crate::memory::{GmemOffset, MappedGmem, Placement, page_size};
use crate::numa::{FrameNodes, NodeId, Pagemap, Topology};
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
    pub fn gmem_offset(&self, step: &Step) -> GmemOffset {
        self.memory.gmem_offset(step.guest_offset)
    }

    /// PFNs of a gmem range, if verification wants them and pagemap is readable.
    pub fn pfns(&self, offset: GmemOffset, len: u64) -> Option<Vec<Option<u64>>> {
        if !self.verify.placement() {
            return None;
        }
        verify::pfns(self.pagemap, self.map, offset, len / page_size())
    }

    /// Resident pages of a mapped gmem range per node: from PFNs when it can (one pagemap
    /// read), else from move_pages.
    pub fn pages_per_node(
        &self,
        offset: GmemOffset,
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

/// One way of moving pages: it runs the planned steps of a migration and reports each.
pub(crate) trait Mechanism {
    /// Moves `steps` to their targets, handing every step's (or batch's) report to
    /// `record` with its pages to move; stops when `record` says false. `Err` only for
    /// failures that must end the whole migration (nothing is lost either way).
    fn run(
        &mut self,
        cx: &StepContext<'_>,
        steps: &[Step],
        record: &mut dyn FnMut(StepReport, u64) -> bool,
    ) -> Result<(), MigrateError>;
}

/// A mechanism that moves one batch at a time (native, refault): [`Batched`] cuts the
/// planned steps into batches that fit the stop budget.
pub(crate) trait BatchMechanism {
    /// Moves one batch's range to its target. `Err` only for failures that must end the
    /// whole migration (nothing of this batch is lost either way).
    fn run_batch(&mut self, cx: &StepContext<'_>, batch: &Step)
    -> Result<StepReport, MigrateError>;
}

/// What a mechanism is checked against and built from.
pub(crate) struct Setup<'a> {
    pub memory: &'a dyn MovableMemory,
    pub request: &'a MigrationRequest,
    pub journal: Option<&'a dyn BatchJournal>,
}

/// Why a mechanism is being considered.
#[derive(Clone, Copy)]
pub(crate) enum Wanted<'t> {
    /// The request names it: refuse only what it cannot do at all.
    Asked,
    /// `auto` is looking for the first that works here (native probes the kernel).
    Auto(&'t Topology),
}

/// One mechanism, as the engine knows it.
pub(crate) struct Registration {
    pub kind: MechanismKind,
    /// `Err(why)` if it cannot serve this memory and request.
    pub check: fn(&Setup<'_>, Wanted<'_>) -> Result<(), String>,
    /// The mechanism, ready to run the request's steps.
    pub build: for<'a> fn(&Setup<'a>) -> Result<Box<dyn Mechanism + 'a>, MigrateError>,
}

/// Every mechanism, in `auto`'s order of preference.
pub(crate) const REGISTRY: [Registration; 3] = [
    super::native::REGISTRATION,
    super::remap::REGISTRATION,
    super::refault::REGISTRATION,
];

/// The registration of `kind`.
pub(crate) fn registration(kind: MechanismKind) -> &'static Registration {
    REGISTRY
        .iter()
        .find(|r| r.kind == kind)
        .expect("every MechanismKind is registered")
}

/// Largest refault/native batch, bytes: bounds the bounce buffer (and a journal's buffer).
pub const MAX_BATCH_BYTES: u64 = 4 << 20;
const MAX_BATCH: u64 = MAX_BATCH_BYTES;
/// Smallest batch the stop budget may shrink to, pages.
const MIN_BATCH_PAGES: u64 = 16;
/// First refault batch before any stop was measured, pages.
const FIRST_BATCH_PAGES: u64 = 64;

/// Runs a [`BatchMechanism`]: each planned step cut into batches sized to the stop budget,
/// or the largest batches for one that never stops the guest.
pub(crate) struct Batched<M> {
    pub mechanism: M,
    pub max_stop: Duration,
    pub never_stops: bool,
}

impl<M: BatchMechanism> Mechanism for Batched<M> {
    fn run(
        &mut self,
        cx: &StepContext<'_>,
        steps: &[Step],
        record: &mut dyn FnMut(StepReport, u64) -> bool,
    ) -> Result<(), MigrateError> {
        let mut batch_pages = FIRST_BATCH_PAGES;
        let mut index = 0;
        for step in steps {
            let mut at = 0;
            while at < step.len {
                let size = if self.never_stops {
                    MAX_BATCH
                } else {
                    batch_pages * page_size()
                };
                let len = size.min(step.len - at);
                let batch = Step {
                    guest_offset: step.guest_offset + at,
                    len,
                    target: step.target,
                    pages_to_move: len / page_size(),
                };
                at += len;
                let report = self.mechanism.run_batch(
                    &StepContext {
                        index,
                        ..cx.clone()
                    },
                    &batch,
                )?;
                index += 1;
                if let Some(stop) = report.stop {
                    let entry = report.stop_entry.unwrap_or_default();
                    batch_pages = next_batch(batch.len, stop, entry, self.max_stop);
                }
                if !record(report, batch.pages_to_move) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// The next batch size, in pages, that should fit the stop budget, within [MIN_BATCH_PAGES,
/// MAX_BATCH]. A stop is `entry` (getting the pause granted: the same for any batch) plus
/// work that grows with the batch; the last batch's work rate fills what 80% of the budget
/// leaves after the entry. Where the entry alone takes all of that (stopping every thread of
/// a foreign VMM: 0.5-5 ms), no batch fits the budget, and a batch whose work takes as long
/// as the entry keeps each stop within about twice the least possible while moving far more
/// per stop than the smallest batch would.
fn next_batch(len: u64, stop: Duration, entry: Duration, budget: Duration) -> u64 {
    let work = stop.saturating_sub(entry).as_secs_f64().max(1e-6);
    let rate = len as f64 / work;
    let (usable, entry) = (budget.as_secs_f64() * 0.8, entry.as_secs_f64());
    let room = if entry < usable {
        usable - entry
    } else {
        entry
    };
    let bytes = rate * room;
    ((bytes as u64) / page_size()).clamp(MIN_BATCH_PAGES, MAX_BATCH / page_size())
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
    offset: GmemOffset,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mechanism_is_registered_once_in_autos_order() {
        let kinds: Vec<MechanismKind> = REGISTRY.iter().map(|r| r.kind).collect();
        assert_eq!(kinds, MechanismKind::ALL);
    }

    #[test]
    fn batches_follow_the_budget() {
        // 256 KiB took 1 ms: at a 1 ms budget the next batch is 80% of that.
        let ms = Duration::from_millis;
        let us = Duration::from_micros;
        assert_eq!(next_batch(256 << 10, ms(1), Duration::ZERO, ms(1)), 51);
        // 0.3 ms of it was the pause: the other 0.7 ms moved 256 KiB, and 0.5 ms of the 0.8
        // left after the pause moves 183 KiB (45 pages).
        assert_eq!(next_batch(256 << 10, ms(1), us(300), ms(1)), 45);
        // A pause of 5 ms against a 1 ms budget: the work may take as long as the pause.
        // 64 KiB took 0.2 ms of work, so 5 ms of work moves 1.6 MiB (400 pages).
        assert_eq!(next_batch(64 << 10, us(5200), ms(5), ms(1)), 400);
        // A pause just inside the budget leaves room for the smallest batch only.
        assert_eq!(
            next_batch(64 << 10, us(900), us(700), ms(1)),
            MIN_BATCH_PAGES
        );
        // Very slow steps bottom out; very fast ones are capped by the bounce buffer.
        assert_eq!(
            next_batch(4096, Duration::from_secs(1), Duration::ZERO, ms(1)),
            MIN_BATCH_PAGES
        );
        assert_eq!(
            next_batch(4 << 20, us(1), Duration::ZERO, ms(10)),
            MAX_BATCH / page_size()
        );
    }
}
