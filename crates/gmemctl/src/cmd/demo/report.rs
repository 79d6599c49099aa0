//! `DemoReport`: everything the demo measured, as data (for `--json` and the human table).

use std::path::PathBuf;

use gmem::memory::page_size;
use gmem::migrate::MigrationReport;
use gmem::numa::NodeId;
use serde::Serialize;
use vmm::{LatencySummary, Metrics, MismatchReport, Vm};

use super::guest_rate::GuestRate;
use super::machine::Machine;
use super::memcpy::MemcpyBandwidth;
use super::moves::{Move, MovePlan, Scope};
use super::snapshot::Snapshot;

/// One move and what it did.
#[derive(Debug, Clone, Serialize)]
pub struct MoveResult {
    /// 1, 2, ...
    pub number: usize,
    /// From where to where.
    #[serde(flatten)]
    pub step: Move,
    /// The engine's verified report.
    pub migration: MigrationReport,
    /// The engine's throughput as a share of single-thread memcpy.
    pub throughput_vs_memcpy: f64,
    /// The guest's progress while this move ran.
    pub guest_rate: GuestRate,
    /// Chunks all of whose pages got new frames (own before/after pagemap comparison).
    pub chunks_with_new_frames: Option<u64>,
    /// Chunks some of whose pages did.
    pub chunks_with_some_new_frames: Option<u64>,
}

impl MoveResult {
    /// A move's result; the chunk counts are filled in from snapshots later.
    pub fn new(
        index: usize,
        step: &Move,
        migration: MigrationReport,
        guest_rate: GuestRate,
        memcpy: &MemcpyBandwidth,
    ) -> Self {
        MoveResult {
            number: index + 1,
            step: *step,
            throughput_vs_memcpy: migration.throughput_gbps / memcpy.gbps,
            migration,
            guest_rate,
            chunks_with_new_frames: None,
            chunks_with_some_new_frames: None,
        }
    }
}

/// The guest as configured.
#[derive(Debug, Clone, Serialize)]
pub struct GuestInfo {
    /// Guest RAM, bytes.
    pub mem_bytes: u64,
    /// Host pages of guest RAM.
    pub pages: u64,
    /// Bytes per page.
    pub page_size: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Bytes per chunk (memslot).
    pub chunk_bytes: u64,
    /// Chunks (cells in the placement map).
    pub chunks: u64,
    /// Spare chunks for remapping.
    pub spare_chunks: u64,
    /// Whether memslot deletion zaps only that slot (cheaper remaps).
    pub slot_zap_all_disabled: bool,
    /// Microseconds from VM start to the guest's first port write.
    pub first_port_write_us: Option<u64>,
}

/// All moves together.
#[derive(Debug, Clone, Serialize)]
pub struct Totals {
    /// Moves run.
    pub moves: usize,
    /// Pages moved and verified, over all moves.
    pub pages_moved: u64,
    /// Bytes moved.
    pub bytes_moved: u64,
    /// Pages whose frame changed, per the engine (None without pagemap access).
    pub pfns_changed: Option<u64>,
    /// Pages whose frames the engine compared.
    pub pfns_checked: Option<u64>,
    /// Host-side content checks (byte-exact, or by hash for native).
    pub content_checks: u64,
    /// Of which differed.
    pub content_mismatches: u64,
    /// Wall time of all moves, microseconds.
    pub elapsed_us: u64,
    /// Bytes moved per second of that time, GB/s.
    pub throughput_gbps: f64,
    /// As a share of single-thread memcpy.
    pub throughput_vs_memcpy: f64,
    /// Whether every move moved and verified every planned page.
    pub complete: bool,
}

/// The guest's progress before and during the moves.
#[derive(Debug, Clone, Serialize)]
pub struct GuestProgress {
    /// Undisturbed, before any move.
    pub before: GuestRate,
    /// While the moves ran (the time between moves left out).
    pub during: GuestRate,
    /// during / before, as rates.
    pub share_during: f64,
}

/// What the guest itself saw, at the end.
#[derive(Debug, Clone, Serialize)]
pub struct GuestCheck {
    /// Words the guest read back wrong. Must be 0.
    pub mismatches: u64,
    /// The first few of them.
    pub mismatch_reports: Vec<MismatchReport>,
    /// Full write-and-verify sweeps over all vCPUs.
    pub sweeps: u64,
    /// Bytes written and verified.
    pub bytes_verified: u64,
    /// vCPUs that stopped running the guest, with why.
    pub vcpu_failures: Vec<String>,
    /// Sweeps every vCPU finished after the last move.
    pub sweeps_after_last_move: u64,
    /// From pause request until every vCPU was parked.
    pub stop_latency: LatencySummary,
    /// From pause request until resume request: the guest's stop per step, as the VM saw it.
    pub quiesce_hold: LatencySummary,
    /// Pauses that had to kick a vCPU twice.
    pub kick_retries: u64,
}

/// The outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// No byte lost and everything verified.
    pub ok: bool,
    /// What went wrong, if anything.
    pub problems: Vec<String>,
}

impl Verdict {
    /// The problems, if there were any.
    pub fn lost_bytes(&self) -> Option<Vec<String>> {
        (!self.ok).then(|| self.problems.clone())
    }
}

/// Everything the demo reports.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    /// The host.
    pub machine: Machine,
    /// The guest.
    pub guest: GuestInfo,
    /// Cross-node, or a relocation within the only node.
    pub scope: Scope,
    /// The node memory started on.
    pub home_node: NodeId,
    /// What the moves are, in one sentence.
    pub explanation: String,
    /// The yardstick.
    pub memcpy: MemcpyBandwidth,
    /// Each move.
    pub moves: Vec<MoveResult>,
    /// All moves.
    pub totals: Totals,
    /// Guest progress before and during.
    pub guest_progress: GuestProgress,
    /// What the guest saw.
    pub guest_check: GuestCheck,
    /// Placement and numa_maps before and after each move.
    pub placement: Vec<Snapshot>,
    /// The placement map picture.
    pub placement_map: PathBuf,
    /// Things worth knowing.
    pub notes: Vec<String>,
    /// No byte lost?
    pub verdict: Verdict,
}

/// What `DemoReport::new` is made from.
#[derive(Debug)]
pub struct Inputs<'a> {
    pub machine: Machine,
    pub memcpy: MemcpyBandwidth,
    pub vm: &'a Vm,
    pub plan: &'a MovePlan,
    pub moves: Vec<MoveResult>,
    pub before_rate: GuestRate,
    pub during_rate: GuestRate,
    pub final_metrics: Metrics,
    pub sweeps_after_last_move: u64,
    pub snapshots: Vec<Snapshot>,
    pub svg_path: PathBuf,
}

impl DemoReport {
    /// Assembles the report and judges it.
    pub fn new(mut inputs: Inputs<'_>) -> Self {
        count_relocated_chunks(&mut inputs.moves, &inputs.snapshots);
        let totals = totals(&inputs.moves, &inputs.memcpy);
        let guest_check = guest_check(&inputs.final_metrics, inputs.sweeps_after_last_move);
        let verdict = judge(&totals, &guest_check, &inputs.moves);
        let notes = notes(&inputs);
        DemoReport {
            guest: guest_info(inputs.vm),
            scope: inputs.plan.scope,
            home_node: inputs.plan.home,
            explanation: inputs.plan.explanation(),
            guest_progress: GuestProgress {
                before: inputs.before_rate,
                during: inputs.during_rate,
                share_during: inputs.during_rate.share_of(&inputs.before_rate),
            },
            machine: inputs.machine,
            memcpy: inputs.memcpy,
            moves: inputs.moves,
            totals,
            guest_check,
            placement: inputs.snapshots,
            placement_map: inputs.svg_path,
            notes,
            verdict,
        }
    }
}

fn guest_info(vm: &Vm) -> GuestInfo {
    let config = vm.config();
    GuestInfo {
        mem_bytes: config.mem_size,
        pages: config.mem_size / page_size(),
        page_size: page_size(),
        vcpus: config.vcpus,
        chunk_bytes: config.chunk_size,
        chunks: config.chunks(),
        spare_chunks: config.spare_chunks,
        slot_zap_all_disabled: vm.slot_zap_all_disabled(),
        first_port_write_us: vm.metrics().first_port_write_us,
    }
}

/// Fills each move's chunk counts from the snapshots before and after it.
fn count_relocated_chunks(moves: &mut [MoveResult], snapshots: &[Snapshot]) {
    for (result, pair) in moves.iter_mut().zip(snapshots.windows(2)) {
        if let Some(chunks) = pair[1].relocations_since(&pair[0]) {
            result.chunks_with_new_frames = Some(chunks.iter().filter(|c| c.all()).count() as u64);
            result.chunks_with_some_new_frames =
                Some(chunks.iter().filter(|c| c.changed > 0).count() as u64);
        }
    }
}

fn totals(moves: &[MoveResult], memcpy: &MemcpyBandwidth) -> Totals {
    let sum = |f: fn(&MigrationReport) -> u64| moves.iter().map(|m| f(&m.migration)).sum::<u64>();
    let sum_optional = |f: fn(&MigrationReport) -> Option<u64>| {
        moves
            .iter()
            .map(|m| f(&m.migration))
            .try_fold(0u64, |acc, v| v.map(|v| acc + v))
    };
    let bytes_moved = sum(|r| r.bytes_moved);
    let elapsed_us = sum(|r| r.elapsed_us);
    let throughput_gbps = bytes_moved as f64 / (elapsed_us.max(1) as f64 * 1e-6) / 1e9;
    Totals {
        moves: moves.len(),
        pages_moved: sum(|r| r.pages_moved),
        bytes_moved,
        pfns_changed: sum_optional(|r| r.pfns_changed),
        pfns_checked: sum_optional(|r| r.pfns_checked),
        content_checks: sum(|r| r.content_checks),
        content_mismatches: sum(|r| r.content_mismatches),
        elapsed_us,
        throughput_gbps,
        throughput_vs_memcpy: throughput_gbps / memcpy.gbps,
        complete: moves.iter().all(|m| m.migration.complete),
    }
}

fn guest_check(metrics: &Metrics, sweeps_after_last_move: u64) -> GuestCheck {
    GuestCheck {
        mismatches: metrics.mismatches,
        mismatch_reports: metrics.mismatch_reports.clone(),
        sweeps: metrics.sweeps,
        bytes_verified: metrics.bytes_verified,
        vcpu_failures: metrics
            .vcpus
            .iter()
            .filter_map(|v| v.failure.as_ref().map(|f| format!("vCPU {}: {f}", v.index)))
            .collect(),
        sweeps_after_last_move,
        stop_latency: metrics.stop_latency,
        quiesce_hold: metrics.quiesce_hold,
        kick_retries: metrics.kick_retries,
    }
}

/// Every reason to say bytes were lost or not verified.
fn judge(totals: &Totals, guest: &GuestCheck, moves: &[MoveResult]) -> Verdict {
    let mut problems = Vec::new();
    if guest.mismatches > 0 {
        problems.push(format!(
            "the guest read back {} wrong words",
            guest.mismatches
        ));
    }
    if !guest.vcpu_failures.is_empty() {
        problems.push(format!("vCPUs stopped: {}", guest.vcpu_failures.join(", ")));
    }
    if totals.content_mismatches > 0 {
        problems.push(format!(
            "{} host-side content checks found a difference",
            totals.content_mismatches
        ));
    }
    for m in moves.iter().filter(|m| !m.migration.complete) {
        problems.push(format!(
            "move {} did not complete: {} of {} pages moved",
            m.number, m.migration.pages_moved, m.migration.pages_planned
        ));
    }
    Verdict {
        ok: problems.is_empty(),
        problems,
    }
}

fn notes(inputs: &Inputs<'_>) -> Vec<String> {
    let mut notes = vec![
        "guest RAM was pre-faulted at boot (MADV_POPULATE_WRITE), so every page is resident \
         and every move moves all of it"
            .to_owned(),
        format!(
            "memcpy was measured in this run before the guest started: best of {} copies of \
             {} MiB on one thread",
            inputs.memcpy.runs_gbps.len(),
            inputs.memcpy.buffer_bytes >> 20
        ),
    ];
    if inputs.during_rate.coarse || inputs.before_rate.coarse {
        notes.push(
            "some vCPU finished fewer than two sweeps within a move, so its rate there is a \
             count of whole sweeps (coarse); more memory per move, or more rounds, refine it"
                .to_owned(),
        );
    }
    for m in &inputs.moves {
        notes.extend(
            m.migration
                .notes
                .iter()
                .map(|n| format!("move {}: {n}", m.number)),
        );
    }
    notes
}
