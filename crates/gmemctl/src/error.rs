//! `CliError`: every way a command can fail, and the exit code it maps to.

use gmem::memory::MemoryError;
use gmem::probe::ProbeError;
use gmem::sys::kvm::KvmError;

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
    /// Another process's guest_memfd could not be reached or surveyed.
    #[error(transparent)]
    Attach(#[from] gmem::memory::AttachError),
    /// The process has no guest_memfd open.
    #[error(
        "process {pid} has no guest_memfd open: it is not a VMM whose guest memory is on \
         guest_memfd (anonymous or memfd guest memory does not show here)"
    )]
    NoGuestMemfd {
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
    /// Another process could not be stopped or resumed.
    #[error(transparent)]
    Stop(#[from] gmem::foreign::StopError),
    /// /proc could not be read.
    #[error("cannot read {what}")]
    ReadProc {
        /// What, in words.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A migration journal could not be written or read.
    #[error(transparent)]
    Journal(#[from] gmem::migrate::JournalError),
    /// A journal could not be recovered.
    #[error(transparent)]
    Recover(#[from] gmem::foreign::RecoverError),
    /// gmemctl will not do this, because it cannot be made safe; the sentence says why.
    #[error("{0}")]
    Refused(String),
    /// A command-line value is out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// A check the command exists to make did not hold (lost data, a failed selftest).
    #[error("{0}")]
    CheckFailed(String),
    /// `gmemctl demo` failed or lost bytes.
    #[error(transparent)]
    Demo(#[from] crate::cmd::demo::DemoError),
    /// The VM could not be started or stopped.
    #[error(transparent)]
    Vm(#[from] vmm::VmError),
    /// The VM's control API could not be served.
    #[error(transparent)]
    ApiServer(#[from] vmm::api::ApiServerError),
    /// The VM's control API could not be reached or answered nonsense.
    #[error(transparent)]
    ApiClient(#[from] vmm::api::ApiClientError),
    /// The VM's control API refused the request; its sentence says why.
    #[error("{sentence}")]
    ApiRefused {
        /// The HTTP status.
        status: u16,
        /// The API's `error` sentence.
        sentence: String,
    },
    /// A VM configuration file could not be read.
    #[error("cannot read the VM configuration {}", path.display())]
    ReadConfig {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A VM configuration file is not a valid configuration.
    #[error("the VM configuration {} is not valid", path.display())]
    ParseConfig {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// The SIGINT/SIGTERM handlers could not be installed.
    #[error("cannot install the SIGINT and SIGTERM handlers")]
    InstallSignalHandler(#[source] std::io::Error),
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
            CliError::Demo(e) => e.is_user_error(),
            CliError::Migrate(e) => e.is_user_error(),
            CliError::InvalidArgument(_) => true,
            CliError::Vm(e) => vm_user_error(e),
            CliError::ApiServer(e) => e.is_user_error(),
            CliError::ApiClient(e) => e.no_server(),
            CliError::ApiRefused { status, .. } => (400..500).contains(status),
            CliError::ReadConfig { .. } | CliError::ParseConfig { .. } => true,
            CliError::Attach(e) => e.is_user_error(),
            CliError::NoGuestMemfd { .. } | CliError::Refused(_) => true,
            CliError::Journal(gmem::migrate::JournalError::Busy { .. })
            | CliError::Recover(gmem::foreign::RecoverError::Journal(
                gmem::migrate::JournalError::Busy { .. },
            )) => true,
            CliError::Stop(e) => matches!(
                e,
                gmem::foreign::StopError::Gone { .. }
                    | gmem::foreign::StopError::PartlyStopped { .. }
            ),
            _ => false,
        };
        if user { EXIT_USER } else { EXIT_FAILURE }
    }
}

/// Whether a VM failure is the user's to fix (configuration, host limits, no KVM access).
fn vm_user_error(error: &vmm::VmError) -> bool {
    match error {
        vmm::VmError::InvalidConfig(_)
        | vmm::VmError::TooManyVcpus { .. }
        | vmm::VmError::TooManyChunks { .. }
        | vmm::VmError::NotEnoughHostMemory { .. } => true,
        vmm::VmError::OpenKvm(e) => e.is_user_error(),
        vmm::VmError::BootLinux(e) => e.is_user_error(),
        _ => false,
    }
}
