//! `ContentCopier`: the extension point for a firmware-assisted copy of gmem content.
//!
//! Confidential gmem (SEV-SNP, TDX) is encrypted; only firmware can copy it. The seed's kernel
//! series leaves a hook for that: the firmware fills the destination folio and marks it
//! FOLIO_CONTENT_COPIED, and the kernel skips its own copy. This trait is the userspace
//! equivalent: when a copier reports [`CopyOutcome::Copied`], the engine does not copy.

use crate::memory::{GmemOffset, GuestMemfd};

/// What a copier did with one range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyOutcome {
    /// The destination holds the content; the engine must not copy (FOLIO_CONTENT_COPIED).
    Copied,
    /// The copier declined; the engine copies if the memory is host-mappable.
    NotCopied,
}

/// Why a copier failed.
#[derive(Debug, thiserror::Error)]
#[error("content copier failed: {0}")]
pub struct CopierError(pub String);

/// Copies gmem content between two offsets of the same guest_memfd without the host
/// reading it. Called with the guest paused; the destination is already allocated.
pub trait ContentCopier: Send + Sync {
    /// Copies `len` bytes from `src_offset` to `dst_offset` inside `gmem`.
    fn copy(
        &self,
        gmem: &GuestMemfd,
        src_offset: GmemOffset,
        dst_offset: GmemOffset,
        len: u64,
    ) -> Result<CopyOutcome, CopierError>;
}
