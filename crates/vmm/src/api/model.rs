//! What the API answers with: the JSON shapes of every response (see api/openapi.yaml).

use std::collections::BTreeMap;

use gmem::memory::{GmemFlags, PlacementRange};
use gmem::migrate::{MechanismKind, MigrationReport, Progress};
use gmem::numa::NodeId;
use serde::{Deserialize, Serialize};

use super::request::MigrateBody;
use crate::config::VmConfig;
use crate::metrics::{Metrics, VmState};

/// `GET /vm`.
#[derive(Debug, Clone, Serialize)]
pub struct VmInfo {
    /// Running, Paused, Failed or Stopped.
    pub state: VmState,
    /// The VMM's process id (for `gmemctl status PID` and numa_maps).
    pub pid: u32,
    /// Milliseconds since the VM started.
    pub uptime_ms: u64,
    /// What the VM was started with (the schema of `gmemctl run --config`).
    pub config: VmConfig,
    /// How guest memory is laid out.
    pub memory: MemoryInfo,
    /// The vCPUs.
    pub vcpus: Vec<VcpuInfo>,
}

/// The guest memory layout.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryInfo {
    /// Guest RAM, bytes.
    pub guest_size: u64,
    /// Bytes per chunk (one memslot each).
    pub chunk_size: u64,
    /// Guest chunks.
    pub chunks: u64,
    /// Spare chunk-sized room in the guest_memfd, in total.
    pub spare_chunks: u64,
    /// Spare chunks not in use right now.
    pub spare_chunks_free: u64,
    /// Bytes of guest_memfd (guest chunks plus spares).
    pub gmem_size: u64,
    /// The guest_memfd's creation flags.
    pub gmem_flags: GmemFlags,
    /// Host page size, bytes (the unit of placement counts).
    pub page_size: u64,
    /// Whether deleting a memslot zaps only that slot's mappings (cheap remaps).
    pub slot_zap_all_disabled: bool,
}

/// One vCPU.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct VcpuInfo {
    /// Index.
    pub index: u32,
    /// First guest physical byte of the slice it writes and verifies.
    pub slice_start: u64,
    /// Bytes in the slice.
    pub slice_len: u64,
}

/// `GET /vm/state` and the answer to `PUT /vm/state`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct VmStateInfo {
    /// The state now.
    pub state: VmState,
}

/// `GET /memory/placement`: where every page of guest RAM is, in guest-physical order.
#[derive(Debug, Clone, Serialize)]
pub struct PlacementInfo {
    /// Bytes per page of the counts.
    pub page_size: u64,
    /// Pages of guest RAM.
    pub pages: u64,
    /// Resident pages per node.
    pub per_node: BTreeMap<NodeId, u64>,
    /// Pages not allocated yet.
    pub not_present: u64,
    /// Run-length ranges in guest order.
    pub ranges: Vec<PlacementRange>,
}

/// Where a migration job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Still moving pages.
    Running,
    /// Every planned page moved and verified, and the guest found no mismatch meanwhile.
    Succeeded,
    /// It finished, but something did not move or did not verify (see the report).
    Incomplete,
    /// It could not run or had to stop (see `error`).
    Failed,
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Incomplete => "incomplete",
            JobState::Failed => "failed",
        })
    }
}

/// What the guest saw while a migration ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestDuring {
    /// Words the guest found wrong between the job's start and end. Must be 0.
    pub mismatches: u64,
    /// Sweeps (write + verify passes) the guest completed meanwhile.
    pub sweeps: u64,
    /// The guest reset (rebooted or crashed) while the job ran: the job did not succeed,
    /// whatever it moved.
    pub reset: Option<crate::metrics::GuestReset>,
}

/// `GET /memory/migrations/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobView {
    /// The job's id.
    pub id: u64,
    /// Running, succeeded, incomplete or failed.
    pub state: JobState,
    /// The request, with defaults filled in.
    pub request: MigrateBody,
    /// Milliseconds since it was accepted (until it finished, once it has).
    pub elapsed_ms: u64,
    /// The latest progress (after each step), if a step has run.
    pub progress: Option<Progress>,
    /// The verified result, once finished.
    pub report: Option<MigrationReport>,
    /// What the guest saw during the job, once finished.
    pub guest: Option<GuestDuring>,
    /// Why it failed.
    pub error: Option<String>,
}

/// One line of `GET /memory/migrations`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct JobSummary {
    /// The job's id.
    pub id: u64,
    /// Where it is.
    pub state: JobState,
}

/// `GET /memory/migrations`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobList {
    /// The running job, if any.
    pub running: Option<u64>,
    /// Kept jobs, oldest first.
    pub migrations: Vec<JobSummary>,
}

/// The answer to `PUT /memory/migrate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobAccepted {
    /// Poll `GET /memory/migrations/{id}`.
    pub id: u64,
    /// The job's URL path.
    pub href: String,
}

/// Pages moved per mechanism.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PerMechanism {
    /// By the kernel's folio migration.
    pub native: u64,
    /// By chunk remapping.
    pub remap: u64,
    /// By refaulting.
    pub refault: u64,
}

impl PerMechanism {
    pub(crate) fn add(&mut self, mechanism: MechanismKind, pages: u64) {
        let counter = match mechanism {
            MechanismKind::Native => &mut self.native,
            MechanismKind::Remap => &mut self.remap,
            MechanismKind::Refault => &mut self.refault,
        };
        *counter += pages;
    }
}

/// Totals over every migration this VMM ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MigrationTotals {
    /// Jobs accepted.
    pub started: u64,
    /// Jobs that succeeded.
    pub succeeded: u64,
    /// Jobs that finished incomplete.
    pub incomplete: u64,
    /// Jobs that failed.
    pub failed: u64,
    /// Pages moved and verified, per mechanism.
    pub pages_moved: PerMechanism,
    /// Bytes moved.
    pub bytes_moved: u64,
    /// Present pages whose frame changed.
    pub pfns_changed: u64,
    /// Content hashes that differed (each restored or reported).
    pub content_mismatches: u64,
    /// Words the guest found wrong while a migration ran.
    pub guest_mismatches: u64,
}

/// `GET /metrics`.
#[derive(Debug, Clone, Serialize)]
pub struct MetricsInfo {
    /// The guest's progress, mismatches and stop-time histograms.
    pub guest: Metrics,
    /// Totals over all migrations.
    pub migrations: MigrationTotals,
}

/// The body of every 4xx and 5xx answer.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    /// One sentence: what was wrong, and what to do where that is clear.
    pub error: String,
}
