//! `Migrator`: plans a migration, runs it step by step within a stop budget, verifies every
//! step, and reports what moved and what did not.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::MigrateError;
use super::copier::ContentCopier;
use super::journal::BatchJournal;
use super::mechanism::{REGISTRY, Setup, StepContext, Wanted, registration};
use super::movable::MovableMemory;
use super::plan::{PlacementPolicy, Plan, PlanInput, Step};
use super::quiesce::Quiesce;
use super::remap::remap_confidential;
use super::report::{
    ContentCheck, MechanismChoice, MechanismKind, MigrationReport, StepOutcome, StepReport,
    StopPhaseStats, StopStats,
};
use super::verify::Verify;
use crate::memory::{GuestMemory, GuestOffset, MemoryError, Placement, Policy, page_size};
use crate::numa::{FrameNodes, NodeMask, Pagemap, Topology};

/// Unit of targets for layouts without chunks.
const DEFAULT_UNIT: u64 = 2 << 20;

/// A test hook: make step N fail at a given point, to prove the restore paths.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedFailure {
    /// Refault: the allocation after the punch fails.
    AllocateAfterPunch(usize),
    /// Remap: one byte of the destination is corrupted after the copy.
    CorruptCopy(usize),
    /// Remap: the memslot swap fails.
    SwapFails(usize),
}

/// What to migrate, how, and how carefully.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationRequest {
    /// Where memory should end up.
    pub policy: PlacementPolicy,
    /// How to move it.
    pub mechanism: MechanismChoice,
    /// Longest the guest may be stopped per step (batches are sized to fit).
    pub max_stop: Duration,
    /// What to check after every step.
    pub verify: Verify,
    /// Also relocate pages already on their target node (new frames, same node).
    pub relocate_in_place: bool,
    /// Largest share of wall time the guest may spend stopped (0 < share <= 1): a step
    /// whose stop took s lasts at least s / share, counted from the end of the step before,
    /// so its work outside the stop (preparing, checking) counts toward the guest's time.
    /// `None` runs steps back to back.
    #[serde(default)]
    pub max_stop_share: Option<f64>,
    /// Test hook.
    #[doc(hidden)]
    #[serde(skip)]
    pub inject: Option<InjectedFailure>,
}

impl MigrationRequest {
    /// A request with the defaults: auto mechanism, 1 ms stop budget, full verification.
    pub fn new(policy: PlacementPolicy) -> Self {
        MigrationRequest {
            policy,
            mechanism: MechanismChoice::Auto,
            max_stop: Duration::from_millis(1),
            verify: Verify::Full,
            relocate_in_place: false,
            max_stop_share: None,
            inject: None,
        }
    }
}

/// Progress, reported after every step.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Progress {
    /// The mechanism running.
    pub mechanism: MechanismKind,
    /// Pages moved so far.
    pub pages_moved: u64,
    /// Pages planned.
    pub pages_planned: u64,
    /// Steps run so far.
    pub steps: u64,
}

/// A migration planned and not yet run: the mechanism chosen, the steps, and the placement
/// they were planned from. [`Migrator::plan`] makes one (reading placement and topology and,
/// for `auto`, probing the kernel once); [`Migrator::run`] carries it out without planning
/// or probing again, so a caller that checks a request before running it plans only once.
#[derive(Debug, Clone)]
pub struct PlannedMigration {
    request: MigrationRequest,
    mechanism: MechanismKind,
    plan: Plan,
    before: Placement,
}

impl PlannedMigration {
    /// The request it was planned for.
    pub fn request(&self) -> &MigrationRequest {
        &self.request
    }

    /// The mechanism that will move the pages.
    pub fn mechanism(&self) -> MechanismKind {
        self.mechanism
    }

    /// The steps.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }
}

/// What the steps of a running migration have produced so far, summed into the report at
/// the end.
#[derive(Debug)]
struct Tally {
    started: Instant,
    reports: Vec<StepReport>,
    stops: Vec<Duration>,
    notes: Vec<String>,
}

/// Moves one guest memory's pages between nodes.
pub struct Migrator<'a> {
    memory: &'a dyn MovableMemory,
    quiesce: &'a dyn Quiesce,
    copier: Option<&'a dyn ContentCopier>,
    journal: Option<&'a dyn BatchJournal>,
    progress: Option<&'a (dyn Fn(&Progress) + Sync)>,
    stop_request: Option<&'a AtomicBool>,
}

impl std::fmt::Debug for Migrator<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migrator")
            .field("layout", &self.memory.layout())
            .field("copier", &self.copier.is_some())
            .field("journal", &self.journal.is_some())
            .finish()
    }
}

impl<'a> Migrator<'a> {
    /// A migrator for `memory`, stopping its accessors through `quiesce`.
    pub fn new(memory: &'a GuestMemory, quiesce: &'a dyn Quiesce) -> Self {
        Self::over(memory, quiesce)
    }

    /// A migrator for any [`MovableMemory`] (owned, or another process's), stopping its
    /// accessors through `quiesce`.
    pub fn over(memory: &'a dyn MovableMemory, quiesce: &'a dyn Quiesce) -> Self {
        Migrator {
            memory,
            quiesce,
            copier: None,
            journal: None,
            progress: None,
            stop_request: None,
        }
    }

    /// Ends the migration after the step in flight once `flag` is set (an operator's
    /// SIGINT): that step finishes, is verified and reported, memory and guest as after any
    /// step, and the report says the rest was not attempted on request.
    pub fn with_stop_request(mut self, flag: &'a AtomicBool) -> Self {
        self.stop_request = Some(flag);
        self
    }

    /// Keeps refault's batches in `journal` while they hold the only copy, so that this
    /// process dying at any point of a batch loses nothing (memory of another process).
    pub fn with_journal(mut self, journal: &'a dyn BatchJournal) -> Self {
        self.journal = Some(journal);
        self
    }

    /// Uses a firmware-assisted copier for remap copies (required for confidential memory).
    pub fn with_copier(mut self, copier: &'a dyn ContentCopier) -> Self {
        self.copier = Some(copier);
        self
    }

    /// Calls `progress` after every step.
    pub fn with_progress(mut self, progress: &'a (dyn Fn(&Progress) + Sync)) -> Self {
        self.progress = Some(progress);
        self
    }

    fn setup<'s>(&'s self, request: &'s MigrationRequest) -> Setup<'s> {
        Setup {
            memory: self.memory,
            request,
            journal: self.journal,
        }
    }

    /// Picks the mechanism for `request`: the one it names, if that one can serve this
    /// memory, or for `auto` the first in the registry's order that works here.
    pub fn choose(
        &self,
        request: &MigrationRequest,
        topology: &Topology,
    ) -> Result<MechanismKind, MigrateError> {
        let setup = self.setup(request);
        match request.mechanism {
            MechanismChoice::Exactly(kind) => (registration(kind).check)(&setup, Wanted::Asked)
                .map(|()| kind)
                .map_err(|reason| MigrateError::MechanismUnavailable {
                    mechanism: kind,
                    reason,
                }),
            MechanismChoice::Auto => Ok(REGISTRY
                .iter()
                .find(|r| (r.check)(&setup, Wanted::Auto(topology)).is_ok())
                .map_or(MechanismKind::Refault, |r| r.kind)),
        }
    }

    fn unit(&self) -> u64 {
        let layout = self.memory.layout();
        if layout.chunks() > 1 {
            layout.chunk_size
        } else {
            DEFAULT_UNIT.min(layout.guest_size)
        }
    }

    /// Plans `request` without moving anything: every request the engine would refuse is
    /// refused here.
    pub fn plan(&self, request: &MigrationRequest) -> Result<PlannedMigration, MigrateError> {
        if request.max_stop.is_zero() {
            return Err(MigrateError::InvalidRequest(
                "max_stop must be positive".into(),
            ));
        }
        let topology = Topology::read().map_err(MemoryError::from)?;
        let mechanism = self.choose(request, &topology)?;
        let before = self.memory.guest_placement()?;
        let plan = request.policy.plan(
            &topology,
            PlanInput {
                placement: &before,
                unit: self.unit(),
                whole_units: mechanism == MechanismKind::Remap,
                relocate_in_place: request.relocate_in_place,
            },
        )?;
        Ok(PlannedMigration {
            request: request.clone(),
            mechanism,
            plan,
            before,
        })
    }

    /// Runs `request`. Returns `Err` only if the migration could not start or a restore
    /// failed; steps that failed and were restored are in the report.
    pub fn migrate(&self, request: &MigrationRequest) -> Result<MigrationReport, MigrateError> {
        let host = self.memory.host()?;
        if host.mapping().is_err() {
            if self.copier.is_none() {
                return Err(MigrateError::Confidential {
                    flags: host.gmem().flags(),
                });
            }
            return self.migrate_confidential(request);
        }
        self.run(self.plan(request)?)
    }

    /// Carries out a planned migration (see [`plan`](Self::plan)). Returns `Err` only if the
    /// migration could not start or a restore failed; steps that failed and were restored
    /// are in the report.
    pub fn run(&self, planned: PlannedMigration) -> Result<MigrationReport, MigrateError> {
        let started = Instant::now();
        let host = self.memory.host()?;
        let map = host.mapping()?;
        let (request, mechanism, plan) = (&planned.request, planned.mechanism, &planned.plan);
        let pagemap = Pagemap::open_self().ok();
        let frames = FrameNodes::read();
        let mut notes = Vec::new();
        if request.verify.placement() && !crate::testing::can_read_pfns() {
            notes
                .push("PFNs not checked: /proc/self/pagemap hides them from non-root users".into());
        }
        if self.copier.is_some() {
            notes.push(match mechanism {
                MechanismKind::Remap => {
                    "remap copies went through the supplied ContentCopier".into()
                }
                other => format!("the ContentCopier is not used by {other}"),
            });
        }
        let cx = StepContext {
            memory: self.memory,
            host,
            map,
            quiesce: self.quiesce,
            verify: request.verify,
            pagemap: pagemap.as_ref(),
            frames: frames.as_ref(),
            copier: self.copier,
            inject: request.inject,
            index: 0,
        };

        // Bind the ranges before moving them too: a page the guest touches for the first time
        // during the move is then allocated on the target, not left behind on the old node.
        // (Seen in the lab: 4 of 20,940 pages of a running Linux guest.)
        self.apply_future_policy(request, plan, |_| true)?;
        let mut reports: Vec<StepReport> = Vec::new();
        let mut stops: Vec<Duration> = Vec::new();
        let mut pages_moved = 0u64;
        let running = Cell::new(mechanism);
        let interrupted = Cell::new(false);
        // When the step before ended: each step is paced from there.
        let mut step_began = std::time::Instant::now();
        // Records one step's report; false once a step failed (the migration stops there).
        let mut record = |mut report: StepReport, pages_to_move: u64| -> bool {
            stops.extend(report.stop);
            if let (Some(stop), Some(share)) = (report.stop, request.max_stop_share) {
                // Pace: the guest's share of this step's time is what it ran of it.
                let lasted = step_began.elapsed();
                if let Some(wait) = stop.div_f64(share).checked_sub(lasted) {
                    std::thread::sleep(wait);
                }
            }
            step_began = std::time::Instant::now();
            report.pages_moved = match &report.outcome {
                StepOutcome::Moved if report.content != ContentCheck::Mismatched => pages_to_move,
                StepOutcome::Partial { not_moved, .. } => pages_to_move.saturating_sub(*not_moved),
                _ => 0,
            };
            pages_moved += report.pages_moved;
            let ok = report.outcome == StepOutcome::Moved;
            reports.push(report);
            if let Some(progress) = self.progress {
                progress(&Progress {
                    mechanism: running.get(),
                    pages_moved,
                    pages_planned: plan.pages_to_move,
                    steps: reports.len() as u64,
                });
            }
            if ok && self.stop_request.is_some_and(|f| f.load(Ordering::Relaxed)) {
                interrupted.set(true);
                return false;
            }
            ok
        };
        // Native chosen for memory whose MIGRATABLE flag cannot be seen is a guess: if the
        // kernel refuses its very first batch, nothing moved, and refault takes over.
        let tentative = mechanism == MechanismKind::Native
            && request.mechanism == MechanismChoice::Auto
            && self.memory.migratable().is_none();
        let recorded = Cell::new(0usize);
        let mut counted = |report: StepReport, pages: u64| {
            recorded.set(recorded.get() + 1);
            record(report, pages)
        };
        let ran = match self.run_mechanism(mechanism, &cx, &plan.steps, request, &mut counted) {
            Err(MigrateError::NativeUnsupported { evidence })
                if tentative && recorded.get() == 0 =>
            {
                notes.push(format!(
                    "native was tried first (this gmem's MIGRATABLE flag cannot be seen from \
                     outside) and the kernel refused it: {evidence}; refault moved it instead"
                ));
                running.set(MechanismKind::Refault);
                self.run_mechanism(
                    MechanismKind::Refault,
                    &cx,
                    &plan.steps,
                    request,
                    &mut counted,
                )
            }
            other => other,
        };
        let attempted: std::collections::BTreeSet<GuestOffset> =
            reports.iter().map(|r| r.guest_offset).collect();
        // A step moved when it was started and every batch of it that ran moved (a failed
        // batch ends the migration, so the batches after it never ran).
        let moved = |step: &Step| {
            let range = step.guest_offset..step.guest_offset + step.len;
            let mut batches = reports.iter().filter(|r| range.contains(&r.guest_offset));
            attempted.contains(&step.guest_offset)
                && batches.all(|r| r.outcome == StepOutcome::Moved)
        };
        if let Err(e) = ran {
            // The ranges were bound before the move; what did not move must not stay bound
            // to a target it never reached (a refused native left a VMM's whole gmem bound
            // to node 1 with every page on node 0).
            self.apply_future_policy(request, plan, moved)?;
            return Err(e);
        }
        let mechanism = running.get();
        let not_attempted = plan
            .steps
            .iter()
            .filter(|s| !attempted.contains(&s.guest_offset))
            .count();
        let stopped_early = (not_attempted > 0).then_some(not_attempted);
        if let Some(left) = stopped_early {
            notes.push(if interrupted.get() {
                format!(
                    "stopped on request (SIGINT or SIGTERM) after {} steps; {left} later \
                     planned steps were not attempted",
                    reports.len()
                )
            } else {
                format!(
                    "stopped after the first failed step; {left} later planned steps were not \
                     attempted"
                )
            });
        }
        // Again after, for the steps that moved (remap has moved chunks to other guest_memfd
        // offsets). The others go back to the default policy: binding a range to a target
        // that could not take it would make the guest's next first touch there an OOM kill.
        self.apply_future_policy(request, plan, moved)?;
        let after = self.memory.guest_placement()?;
        let tally = Tally {
            started,
            reports,
            stops,
            notes,
        };
        Ok(tally.finish(mechanism, &planned, after))
    }

    /// Runs the steps with one mechanism; `record` gets every report.
    fn run_mechanism(
        &self,
        mechanism: MechanismKind,
        cx: &StepContext<'_>,
        steps: &[Step],
        request: &MigrationRequest,
        record: &mut dyn FnMut(StepReport, u64) -> bool,
    ) -> Result<(), MigrateError> {
        let mut mechanism = (registration(mechanism).build)(&self.setup(request))?;
        mechanism.run(cx, steps, record)
    }

    /// Sets the policy for future allocations (pages the guest has not touched yet) of every
    /// unit, holes included, so the placement holds after the move: a unit whose steps all
    /// count as `bound` gets its target; one with a step that does not gets the default
    /// policy, as do units with no step when any step does not count (binding memory to a
    /// target that could not take it would make the guest's next first touch there an OOM
    /// kill).
    fn apply_future_policy(
        &self,
        request: &MigrationRequest,
        plan: &Plan,
        bound: impl Fn(&Step) -> bool,
    ) -> Result<(), MigrateError> {
        if let PlacementPolicy::Drain(_) = request.policy {
            return Ok(()); // pages elsewhere stay where they are; only moved units changed
        }
        let layout = self.memory.layout();
        let all_bound = plan.steps.iter().all(&bound);
        let mut steps = plan.steps.iter().peekable();
        for (unit, &target) in plan.unit_targets.iter().enumerate() {
            let start = GuestOffset(unit as u64 * plan.unit);
            let end = (start + plan.unit).min(GuestOffset(layout.guest_size));
            let mut unit_steps = 0;
            let mut unit_bound = true;
            while let Some(step) = steps.next_if(|s| s.guest_offset < end) {
                unit_steps += 1;
                unit_bound &= bound(step);
            }
            if unit_steps == 0 {
                unit_bound = all_bound;
            }
            let policy = if unit_bound {
                Policy::Bind(NodeMask::single(target))
            } else {
                Policy::Default
            };
            let offset = self.memory.gmem_offset(start);
            self.memory
                .host()?
                .set_policy_unchecked(offset, end.bytes_since(start), &policy)?;
        }
        Ok(())
    }

    /// Confidential memory: remap through the copier, chunk by chunk. The host cannot see
    /// placement, so every chunk is planned and nothing is verified but the copier's word.
    fn migrate_confidential(
        &self,
        request: &MigrationRequest,
    ) -> Result<MigrationReport, MigrateError> {
        let started = Instant::now();
        let copier = self.copier.expect("checked by the caller");
        let target = match &request.policy {
            PlacementPolicy::Bind(node) => *node,
            other => {
                return Err(MigrateError::InvalidRequest(format!(
                    "confidential memory supports only bind, not {other}"
                )));
            }
        };
        let owned = super::remap::remappable(self.memory).map_err(|why| {
            MigrateError::MechanismUnavailable {
                mechanism: MechanismKind::Remap,
                reason: format!("confidential memory moves only by remap, and {why}"),
            }
        })?;
        let layout = *owned.layout();
        let pages_per_chunk = layout.chunk_size / page_size();
        let plan = Plan {
            steps: layout
                .chunk_indices()
                .map(|c| Step {
                    guest_offset: layout.chunk_start(c),
                    len: layout.chunk_size,
                    target,
                    pages_to_move: pages_per_chunk,
                })
                .collect(),
            unit_targets: vec![target; layout.chunks() as usize],
            unit: layout.chunk_size,
            pages_to_move: layout.chunks() * pages_per_chunk,
            pages_in_place: 0,
        };
        let mut reports = Vec::new();
        let mut stops = Vec::new();
        for step in &plan.steps {
            let report = remap_confidential(owned, self.quiesce, copier, step)?;
            stops.extend(report.stop);
            let failed = report.outcome != StepOutcome::Moved;
            reports.push(report);
            if failed {
                break;
            }
        }
        let unknown = Placement {
            page_size: page_size(),
            ranges: Vec::new(),
        };
        let notes = vec![
            "confidential memory: content and placement verified by the ContentCopier only".into(),
        ];
        let planned = PlannedMigration {
            request: request.clone(),
            mechanism: MechanismKind::Remap,
            plan,
            before: unknown.clone(),
        };
        let tally = Tally {
            started,
            reports,
            stops,
            notes,
        };
        Ok(tally.finish(MechanismKind::Remap, &planned, unknown))
    }
}

impl Tally {
    /// The report of `planned`, run by `mechanism` (native may have handed over to
    /// refault), with the placement found `after` it.
    fn finish(
        self,
        mechanism: MechanismKind,
        planned: &PlannedMigration,
        after: Placement,
    ) -> MigrationReport {
        let Tally {
            started,
            reports,
            stops,
            mut notes,
        } = self;
        let (request, plan) = (&planned.request, &planned.plan);
        let elapsed = started.elapsed();
        let over = stops.iter().filter(|&&s| s > request.max_stop).count();
        if over > 0 {
            let shortest = stops.iter().min().copied().unwrap_or_default();
            notes.push(format!(
                "{over} of {} stops were longer than the {} us budget (the shortest took {} us)",
                stops.len(),
                request.max_stop.as_micros(),
                shortest.as_micros()
            ));
            let mut entries: Vec<Duration> = reports.iter().filter_map(|r| r.stop_entry).collect();
            entries.sort();
            if let Some(&median) = entries.get(entries.len() / 2)
                && median.as_secs_f64() >= request.max_stop.as_secs_f64() * 0.8
            {
                notes.push(format!(
                    "getting the guest stopped took {} us by itself (median), more than the \
                     budget leaves: batches were sized so that their work takes about as long",
                    median.as_micros()
                ));
            }
        }
        let pages_moved: u64 = reports.iter().map(|r| r.pages_moved).sum();
        let bytes_moved = pages_moved * page_size();
        let sum = |f: fn(&StepReport) -> Option<u64>| -> Option<u64> {
            reports
                .iter()
                .map(f)
                .try_fold(0u64, |acc, v| v.map(|v| acc + v))
        };
        let content_checks = reports
            .iter()
            .filter(|r| r.content != ContentCheck::NotTaken)
            .count() as u64;
        let content_mismatches = reports
            .iter()
            .filter(|r| r.content == ContentCheck::Mismatched)
            .count() as u64;
        let failures: Vec<StepReport> = reports
            .iter()
            .filter(|r| r.outcome != StepOutcome::Moved || r.content == ContentCheck::Mismatched)
            .cloned()
            .collect();
        MigrationReport {
            mechanism,
            policy: request.policy.to_string(),
            relocate_in_place: request.relocate_in_place,
            pages_planned: plan.pages_to_move,
            pages_moved,
            pages_not_moved: plan.pages_to_move - pages_moved,
            pages_in_place: plan.pages_in_place,
            bytes_moved,
            pfns_changed: if reports.is_empty() {
                None
            } else {
                sum(|r| r.pfns_changed)
            },
            pfns_checked: if reports.is_empty() {
                None
            } else {
                sum(|r| r.pfns_checked)
            },
            content_checks,
            content_mismatches,
            stops: StopStats::from_durations(&stops),
            stop_phases: StopPhaseStats::from_phases(
                &reports
                    .iter()
                    .filter_map(|r| r.stop_phases)
                    .collect::<Vec<_>>(),
            ),
            steps: reports.len() as u64,
            elapsed_us: elapsed.as_micros() as u64,
            throughput_gbps: bytes_moved as f64 / elapsed.as_secs_f64().max(1e-9) / 1e9,
            before: planned.before.per_node(),
            after: after.per_node(),
            complete: failures.is_empty() && pages_moved == plan.pages_to_move,
            failures,
            notes,
        }
    }
}
