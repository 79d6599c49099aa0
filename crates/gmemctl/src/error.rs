//! `CliError`: every way a command can fail, and the exit code it maps to.

use gmem::kvm::KvmError;
use gmem::memory::MemoryError;
use gmem::probe::ProbeError;

/// Exit code for a mistake the user can fix (bad input, missing device, no such process).
pub const EXIT_USER: u8 = 2;
/// Exit code for a failure of the host or of gmemctl itself.
pub const EXIT_FAILURE: u8 = 1;

/// A failed command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// KVM could not be used.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// A guest-memory operation failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The probe could not run.
    #[error(transparent)]
    Probe(#[from] ProbeError),
    /// The PID names no process.
    #[error("no process with PID {pid}: check the PID (is the VMM still running?)")]
    NoSuchProcess {
        /// The PID given.
        pid: u32,
    },
    /// The process's maps may not be read by this user.
    #[error(
        "permission denied reading /proc/{pid}/numa_maps: run as root or as the process's owner"
    )]
    ProcessPermission {
        /// The PID given.
        pid: u32,
    },
    /// Reading /proc failed otherwise.
    #[error("cannot read the memory maps of process {pid}")]
    ReadMaps {
        /// The PID given.
        pid: u32,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A migration could not run.
    #[error(transparent)]
    Migrate(#[from] gmem::migrate::MigrateError),
    /// A command-line value is out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// A check the command exists to make did not hold (lost data, a failed selftest).
    #[error("{0}")]
    CheckFailed(String),
    /// Writing JSON failed.
    #[error("cannot write JSON output")]
    Json(#[from] serde_json::Error),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        let user = match self {
            CliError::Kvm(e) | CliError::Probe(ProbeError::Kvm(e)) => e.is_user_error(),
            CliError::Memory(e) => e.is_user_error(),
            CliError::Migrate(e) => e.is_user_error(),
            CliError::InvalidArgument(_) => true,
            CliError::NoSuchProcess { .. } | CliError::ProcessPermission { .. } => true,
            _ => false,
        };
        if user { EXIT_USER } else { EXIT_FAILURE }
    }
}
