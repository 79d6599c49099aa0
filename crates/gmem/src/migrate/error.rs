//! `MigrateError`: why a migration could not start or had to stop.

use crate::memory::{GuestOffset, MemoryError};
use crate::numa::NodeId;

use super::{MechanismKind, QuiesceError};

/// A migration that could not run. Failures of single steps after the migration started are
/// not errors: they are in the report, with what was restored.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The memory is not host-mappable and no firmware-assisted copier was supplied.
    #[error(
        "refusing to migrate confidential guest memory (gmem flags {flags}): the host must never map or copy it; a firmware-assisted ContentCopier is required"
    )]
    Confidential {
        /// The gmem's flags.
        flags: crate::memory::GmemFlags,
    },
    /// The kernel refused to migrate gmem folios.
    #[error("kernel does not migrate gmem folios: {evidence}")]
    NativeUnsupported {
        /// What the kernel did.
        evidence: String,
    },
    /// A mechanism cannot serve this memory or request.
    #[error("the {mechanism} mechanism cannot do this: {reason}")]
    MechanismUnavailable {
        /// The mechanism asked for.
        mechanism: MechanismKind,
        /// Why not.
        reason: String,
    },
    /// A policy named a node that cannot take memory.
    #[error("NUMA node {node} cannot be a target: {reason}")]
    BadTarget {
        /// The node.
        node: NodeId,
        /// Why.
        reason: String,
    },
    /// The request itself is malformed.
    #[error("invalid migration request: {0}")]
    InvalidRequest(String),
    /// Pausing or resuming the guest failed.
    #[error("could not stop or restart the guest")]
    Quiesce(#[from] QuiesceError),
    /// A guest-memory operation failed outside any step.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The journal could not record a batch before its punch; the batch was left untouched
    /// and the guest resumed.
    #[error("cannot journal a batch before punching it; nothing of it was touched")]
    Journal(#[source] super::JournalError),
    /// A batch is back in guest memory and verified, but its journal record could not be
    /// removed. The guest stays paused: resumed, it could write over memory that a later
    /// recovery would then put the recorded bytes back into.
    #[error(
        "the batch at guest offset {offset:#x} ({len:#x} bytes) is back in place and verified, \
         but its journal record could not be removed; the guest is left paused (gmemctl \
         recover restores the same bytes and resumes it)"
    )]
    JournalNotCleared {
        /// Guest offset of the batch.
        offset: GuestOffset,
        /// Its length.
        len: u64,
        /// The cause.
        #[source]
        source: super::JournalError,
    },
    /// Content could not be put back after a failed step. The guest stays paused so that it
    /// does not run on missing memory.
    #[error(
        "restoring guest memory at guest offset {offset:#x} ({len:#x} bytes) failed; the guest is left paused"
    )]
    RestoreFailed {
        /// Guest offset of the range.
        offset: GuestOffset,
        /// Its length.
        len: u64,
        /// The last cause.
        #[source]
        source: MemoryError,
    },
}

impl MigrateError {
    /// Whether the caller asked for something impossible (as opposed to a host fault).
    pub fn is_user_error(&self) -> bool {
        match self {
            MigrateError::Confidential { .. }
            | MigrateError::NativeUnsupported { .. }
            | MigrateError::MechanismUnavailable { .. }
            | MigrateError::BadTarget { .. }
            | MigrateError::InvalidRequest(_) => true,
            MigrateError::Memory(e) => e.is_user_error(),
            _ => false,
        }
    }
}
