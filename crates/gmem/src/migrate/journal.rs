//! `BatchJournal`: where refault keeps a batch while it holds the only copy, so that the copy
//! outlives this process (a `kill -9` of gmemctl between a punch and the copy back).

use std::io;
use std::path::PathBuf;
use std::str::FromStr;

use crate::memory::GmemOffset;
use crate::sys::mman::Mmap;

/// A place for refault's batches that survives this process. Refault copies each batch
/// into [`buffer`](Self::buffer), calls [`record`](Self::record) before the punch and
/// [`clear`](Self::clear) after the verified copy back, all with the guest stopped: so at
/// any moment either guest memory or the journal holds every byte.
pub trait BatchJournal: Send + Sync {
    /// The buffer batches are copied into, at least as long as the largest batch: the
    /// journal's own data, e.g. a shared mapping of a file.
    fn buffer(&self) -> &Mmap;

    /// Bytes `0..len` of the buffer are from now on the only copy of gmem bytes
    /// `gmem_offset..gmem_offset+len`: record that where it outlives this process. Called
    /// before the punch; after an error the batch is left untouched.
    fn record(&self, gmem_offset: GmemOffset, len: u64) -> Result<(), JournalError>;

    /// The batch is back in guest memory and verified (or restored): forget it. Called
    /// before the guest resumes; while a record is left, the guest must stay stopped, or a
    /// later recovery would put old bytes over newer ones.
    fn clear(&self) -> Result<(), JournalError>;

    /// Test hook: refault reached `point` of a batch.
    #[doc(hidden)]
    fn reached(&self, _point: BatchPoint) {}
}

/// The points of a refault batch after which this process dying leaves work for recovery.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchPoint {
    /// The batch is copied out and recorded; nothing is punched yet.
    Journalled,
    /// The batch's pages are punched: the journal holds the only copy.
    Punched,
    /// Fresh pages are allocated on the target; they hold zeros.
    Refaulted,
    /// The bytes are back and compared; the record is still there.
    CopiedBack,
}

impl FromStr for BatchPoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "after-journal" => Ok(BatchPoint::Journalled),
            "after-punch" => Ok(BatchPoint::Punched),
            "after-refault" => Ok(BatchPoint::Refaulted),
            "after-copy-back" => Ok(BatchPoint::CopiedBack),
            other => Err(format!(
                "unknown batch point '{other}': use after-journal, after-punch, after-refault \
                 or after-copy-back"
            )),
        }
    }
}

/// A journal operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The journal's directory or files could not be created.
    #[error("cannot create the migration journal at {}", path.display())]
    Create {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Another gmemctl holds the journal of this process.
    #[error(
        "another gmemctl (pid {holder}) is migrating process {pid} (its journal {} is locked)",
        path.display()
    )]
    Busy {
        /// The VMM.
        pid: u32,
        /// The gmemctl that holds it, as its session record says.
        holder: String,
        /// The session file.
        path: PathBuf,
    },
    /// Writing a record failed.
    #[error("cannot write the journal record {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Syncing the journal to disk failed.
    #[error("cannot sync the journal {} to disk", path.display())]
    Sync {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Removing a record failed.
    #[error("cannot remove the journal record {}", path.display())]
    Remove {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_points_parse_by_their_hook_names() {
        assert_eq!("after-punch".parse(), Ok(BatchPoint::Punched));
        assert_eq!("after-copy-back".parse(), Ok(BatchPoint::CopiedBack));
        assert!(
            "before-lunch"
                .parse::<BatchPoint>()
                .unwrap_err()
                .contains("after-journal")
        );
    }
}
