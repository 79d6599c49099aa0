//! Native: the kernel's own folio migration, move_pages(2) on the gmem mapping.
//!
//! The guest need not stop: the kernel unmaps, copies and remaps each folio, and KVM's
//! invalidation keeps the guest off it meanwhile. Stock kernels refuse gmem folios, in a
//! way that is easy to miss: move_pages returns how many pages it did not move and leaves
//! `status` unwritten. That is detected and reported, never taken for success.

use super::MigrateError;
use super::mechanism::{Mechanism, StepContext, check_result, report};
use super::plan::Step;
use super::quiesce::Paused;
use super::report::{HashCheck, StepOutcome, StepReport};
use super::verify::{self, BLOCK};
use crate::memory::page_size;
use crate::sys::mempolicy::{self, MPOL_MF_MOVE};

/// Marks a status entry the kernel did not write.
const UNWRITTEN: i32 = i32::MIN;

/// The native mechanism.
pub(crate) struct Native {
    block: Vec<u8>,
}

impl Native {
    pub fn new() -> Self {
        Native {
            block: vec![0; BLOCK],
        }
    }
}

impl Mechanism for Native {
    fn run(&mut self, cx: &StepContext<'_>, step: &Step) -> Result<StepReport, MigrateError> {
        let offset = cx.gmem_offset(step);
        let pages = step.len / page_size();
        let addrs: Vec<usize> = (0..pages)
            .map(|i| cx.map.addr() + (offset + i * page_size()) as usize)
            .collect();
        let nodes = vec![step.target.0 as i32; addrs.len()];
        let mut status = vec![UNWRITTEN; addrs.len()];
        let pfns_before = cx.pfns(offset, step.len);

        // Content hashes need a stopped guest; without them the guest keeps running.
        let paused = if cx.verify.hashes() {
            Some(Paused::new(cx.quiesce)?)
        } else {
            None
        };
        let hash_before = cx
            .verify
            .hashes()
            .then(|| verify::hash_range(cx.map, offset, step.len, &mut self.block));
        let result = mempolicy::move_pages(0, &addrs, Some(&nodes), &mut status, MPOL_MF_MOVE);
        let hash_after = cx
            .verify
            .hashes()
            .then(|| verify::hash_range(cx.map, offset, step.len, &mut self.block));
        let stop = paused.map(Paused::resume).transpose()?;

        let not_moved = match result {
            Ok(left) if left as u64 == pages && status.iter().all(|&s| s == UNWRITTEN) => {
                return Err(MigrateError::NativeUnsupported {
                    evidence: format!(
                        "move_pages left {left} of {pages} gmem pages unmoved and wrote no per-page status"
                    ),
                });
            }
            Ok(_) => status
                .iter()
                .filter(|&&s| s != step.target.0 as i32)
                .count() as u64,
            Err(e) => {
                return Err(MigrateError::NativeUnsupported {
                    evidence: format!("move_pages on gmem failed: {e}"),
                });
            }
        };
        let outcome = if not_moved == 0 {
            StepOutcome::Moved
        } else {
            let errors: std::collections::BTreeSet<String> = status
                .iter()
                .filter(|&&s| s < 0 && s != UNWRITTEN)
                .map(|&s| std::io::Error::from_raw_os_error(-s).to_string())
                .collect();
            StepOutcome::Partial {
                not_moved,
                reason: errors.into_iter().collect::<Vec<_>>().join("; "),
            }
        };
        let mut report = report(step, outcome);
        report.hash = match (hash_before, hash_after) {
            (Some(b), Some(a)) if a == b => HashCheck::Matched,
            (Some(_), Some(_)) => HashCheck::Mismatched,
            _ => HashCheck::NotTaken,
        };
        check_result(cx, &mut report, offset, pfns_before, stop)?;
        if matches!(report.outcome, StepOutcome::Partial { .. }) {
            report.pages_moved = pages - not_moved;
        }
        Ok(report)
    }
}
