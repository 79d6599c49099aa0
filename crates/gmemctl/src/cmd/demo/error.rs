//! `DemoError`: why the demo could not run, or why it failed, and whether the user can fix it.

use std::path::PathBuf;
use std::time::Duration;

use gmem::memory::MemoryError;
use gmem::migrate::MigrateError;
use gmem::numa::pagemap::PagemapError;
use gmem::numa::topology::TopologyError;
use vmm::VmError;

/// A demo that could not run or lost bytes.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The flags do not make a valid VM.
    #[error("{0}")]
    BadFlags(String),
    /// The VM could not start (or stop); the cause chain is folded into one sentence.
    #[error("cannot run the demo guest: {reason}")]
    Vm {
        /// The whole cause chain.
        reason: String,
        /// Whether the user can fix it (no KVM, too big for this host, ...).
        user_error: bool,
    },
    /// A migration could not start, or a restore failed.
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    /// A guest-memory query failed.
    #[error("cannot inspect guest memory")]
    Memory(#[source] MemoryError),
    /// The guest has no resident memory to move (should not happen after boot).
    #[error("no guest page is resident, so there is nothing to move")]
    NoResidentMemory,
    /// The NUMA topology could not be read.
    #[error(transparent)]
    Topology(TopologyError),
    /// This process's numa_maps could not be read.
    #[error("cannot read /proc/self/numa_maps")]
    NumaMaps(#[source] std::io::Error),
    /// Page frame numbers could not be read.
    #[error(transparent)]
    Pagemap(PagemapError),
    /// A vCPU stopped running the guest before the moves began.
    #[error("the guest stopped before any memory moved: {0}")]
    GuestFailed(String),
    /// The guest did not finish a sweep in time.
    #[error("the guest made no progress within {0:?}")]
    GuestStalled(Duration),
    /// The placement map could not be written.
    #[error("cannot write the placement map to {path}")]
    WriteSvg {
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The demo ran, and something was lost or not verified.
    #[error("bytes were lost or not verified: {}", .0.join("; "))]
    BytesLost(Vec<String>),
}

impl DemoError {
    /// Wraps a VM failure, folding its cause chain into one line.
    pub fn vm(error: VmError) -> Self {
        let user_error = match &error {
            VmError::OpenKvm(e) => e.is_user_error(),
            VmError::InvalidConfig(_)
            | VmError::TooManyVcpus { .. }
            | VmError::TooManyChunks { .. }
            | VmError::NotEnoughHostMemory { .. } => true,
            _ => false,
        };
        DemoError::Vm {
            reason: cause_chain(&error),
            user_error,
        }
    }

    /// Whether the user can fix this (exit code 2) rather than a failure (exit code 1).
    pub fn is_user_error(&self) -> bool {
        match self {
            DemoError::BadFlags(_) => true,
            DemoError::Vm { user_error, .. } => *user_error,
            DemoError::Migrate(e) => e.is_user_error(),
            _ => false,
        }
    }
}

/// "outer: cause: root cause".
fn cause_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}
