//! Moving guest memory between NUMA nodes without losing a byte.
//!
//! Three mechanisms sit behind one engine: `native` (the kernel's folio migration, where
//! the kernel has it), `remap` (copy a chunk to spare room, rebind its memslot) and
//! `refault` (copy out, punch, re-allocate, copy back). The [`Migrator`] plans from a
//! userspace [`PlacementPolicy`], stops the guest through [`Quiesce`] only for the steps
//! that need it, verifies every step, and restores content on any failure.

mod copier;
mod engine;
mod error;
mod journal;
mod mechanism;
mod movable;
mod native;
mod plan;
mod quiesce;
mod refault;
mod remap;
mod report;
mod scratch;
pub mod verify;

pub use copier::{ContentCopier, CopierError, CopyOutcome};
pub use engine::{InjectedFailure, MigrationRequest, Migrator, PlannedMigration, Progress};
pub use error::MigrateError;
pub use journal::{BatchJournal, BatchPoint, JournalError};
pub use mechanism::MAX_BATCH_BYTES;
pub use movable::{ForeignMemory, MovableMemory};
pub use plan::{PlacementPolicy, Plan, PlanInput, PolicyKind, Step};
pub use quiesce::{NothingToQuiesce, Paused, Quiesce, QuiesceError};
pub use report::{
    ContentCheck, MechanismChoice, MechanismKind, MigrationReport, RestoredTo, StepOutcome,
    StepReport, StopPhaseStats, StopPhases, StopStats,
};
pub use verify::Verify;
