//! Reader for /proc/PID/pagemap: the page frame number behind each virtual page.
//!
//! A changed PFN is the proof that a page really moved, even within one node. The kernel
//! zeroes PFNs for readers without CAP_SYS_ADMIN, so a present page with PFN 0 means "no
//! permission", which we report as an error instead of returning zeros.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

const PRESENT: u64 = 1 << 63;
const PFN_MASK: u64 = (1 << 55) - 1;

/// Why PFNs could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PagemapError {
    /// The pagemap file could not be opened or read.
    #[error("cannot read /proc/{pid}/pagemap")]
    Read {
        /// The process.
        pid: u32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The kernel hid the PFNs.
    #[error(
        "/proc/{pid}/pagemap hides page frame numbers from this user: run as root (CAP_SYS_ADMIN)"
    )]
    PfnsHidden {
        /// The process.
        pid: u32,
    },
}

/// An open pagemap of one process.
#[derive(Debug)]
pub struct Pagemap {
    pid: u32,
    file: File,
    page_size: u64,
}

impl Pagemap {
    /// Opens /proc/PID/pagemap.
    pub fn open(pid: u32) -> Result<Self, PagemapError> {
        let file = File::open(format!("/proc/{pid}/pagemap"))
            .map_err(|source| PagemapError::Read { pid, source })?;
        let page_size = crate::sys::mman::page_size() as u64;
        Ok(Pagemap {
            pid,
            file,
            page_size,
        })
    }

    /// Opens the calling process's pagemap.
    pub fn open_self() -> Result<Self, PagemapError> {
        Self::open(std::process::id())
    }

    /// PFNs of `pages` consecutive pages from `addr`; `None` for a page not present.
    pub fn pfns(&self, addr: u64, pages: usize) -> Result<Vec<Option<u64>>, PagemapError> {
        let mut raw = vec![0u8; pages * 8];
        let offset = addr / self.page_size * 8;
        self.file
            .read_exact_at(&mut raw, offset)
            .map_err(|source| PagemapError::Read {
                pid: self.pid,
                source,
            })?;
        raw.chunks_exact(8)
            .map(|entry| {
                let entry = u64::from_ne_bytes(entry.try_into().expect("8-byte chunk"));
                decode(entry).map_err(|()| PagemapError::PfnsHidden { pid: self.pid })
            })
            .collect()
    }
}

/// Decodes one entry: `Ok(None)` not present, `Err` present but PFN hidden.
fn decode(entry: u64) -> Result<Option<u64>, ()> {
    if entry & PRESENT == 0 {
        return Ok(None);
    }
    match entry & PFN_MASK {
        0 => Err(()),
        pfn => Ok(Some(pfn)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_entries() {
        assert_eq!(decode(0), Ok(None));
        assert_eq!(decode(PRESENT | 0x1234), Ok(Some(0x1234)));
        // Soft-dirty and exclusive bits do not leak into the PFN.
        assert_eq!(decode(PRESENT | 1 << 55 | 1 << 56 | 7), Ok(Some(7)));
        assert_eq!(decode(PRESENT), Err(()));
    }
}
