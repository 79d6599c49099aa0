//! Native: the kernel's own folio migration, move_pages(2) on the gmem mapping.
//!
//! The guest need not stop: the kernel unmaps, copies and remaps each folio, and KVM's
//! invalidation keeps the guest off it meanwhile. Stock kernels refuse gmem folios, in a
//! way that is easy to miss: move_pages returns how many pages it did not move and leaves
//! `status` unwritten. That is detected and reported, never taken for success.

use std::io;
use std::time::Duration;

use super::MigrateError;
use super::mechanism::{
    BatchMechanism, Batched, Mapped, Mechanism, Registration, Setup, StepContext, Wanted,
    check_result, report,
};
use super::movable::MovableMemory;
use super::plan::Step;
use super::quiesce::Paused;
use super::report::{ContentCheck, MechanismKind, StepOutcome, StepReport};
use super::verify::{self, BLOCK};
use crate::memory::{GmemFlags, GuestMemfd, page_size};
use crate::numa::Topology;
use crate::probe::{self, Verdict};
use crate::sys::mempolicy;

/// Marks a status entry the kernel did not write.
const UNWRITTEN: i32 = i32::MIN;

/// move_pages rounds per step while the guest runs: the first, then retries of the pages it
/// left behind.
const ROUNDS_RUNNING: u32 = 3;
/// Rounds for the pages still left, with the guest stopped.
const ROUNDS_STOPPED: u32 = 2;
/// Pause before the first retry, doubled for each later one: a vCPU that faulted on a folio
/// while it was being migrated holds a reference to it until its fault completes, and until
/// then every attempt to migrate that folio fails.
const BACKOFF: Duration = Duration::from_millis(1);

/// Moves `addrs` to `target` with move_pages, and moves again, up to `rounds` in all and
/// after a growing pause, the pages a round left behind. The kernel migrates a batch as a unit: if any page of it fails
/// (a running vCPU faulting on a folio can make it -EAGAIN for the whole pass), it returns the
/// count not moved and leaves `status` unwritten for the batch, although most of it moved.
/// So unwritten entries are filled by asking where each page is now.
///
/// Returns the first round's result if no round moved anything (a stock kernel refuses
/// every gmem page this way), else `Ok` with the pages still not on `target`. `status` ends
/// with each page's node or negative errno, or [`UNWRITTEN`] where even the query gave none.
fn move_with_retries(
    addrs: &[usize],
    target: i32,
    status: &mut [i32],
    rounds: u32,
    flag: u32,
) -> io::Result<usize> {
    let first = mempolicy::move_pages(0, addrs, Some(&vec![target; addrs.len()]), status, flag);
    if !matches!(first, Ok(left) if left > 0) {
        return first;
    }
    let mut moved_any = false;
    for round in 1..=rounds {
        if status.contains(&UNWRITTEN) {
            let mut now = vec![UNWRITTEN; addrs.len()];
            if mempolicy::move_pages(0, addrs, None, &mut now, 0).is_ok() {
                for (s, n) in status.iter_mut().zip(now) {
                    if *s == UNWRITTEN {
                        *s = n;
                    }
                }
            }
        }
        moved_any |= status.contains(&target);
        // Pages on another node are worth another try; errors like -ENOENT are not.
        let behind: Vec<usize> = (0..addrs.len())
            .filter(|&i| status[i] >= 0 && status[i] != target)
            .collect();
        if behind.is_empty() || round == rounds {
            break;
        }
        std::thread::sleep(BACKOFF * (1 << (round - 1)));
        let again: Vec<usize> = behind.iter().map(|&i| addrs[i]).collect();
        let mut again_status = vec![UNWRITTEN; again.len()];
        let nodes = vec![target; again.len()];
        if mempolicy::move_pages(0, &again, Some(&nodes), &mut again_status, flag).is_err() {
            break;
        }
        for (&i, s) in behind.iter().zip(again_status) {
            status[i] = s;
        }
    }
    if moved_any {
        Ok(status.iter().filter(|&&s| s != target).count())
    } else {
        status.fill(UNWRITTEN);
        first
    }
}

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

/// Native in the engine's registry.
pub(crate) const REGISTRATION: Registration = Registration {
    kind: MechanismKind::Native,
    check,
    build,
};

/// Native cannot relocate within a node; for `auto` it must also work here, tried live.
fn check(setup: &Setup<'_>, wanted: Wanted<'_>) -> Result<(), String> {
    if setup.request.relocate_in_place {
        return Err(
            "move_pages skips pages already on their target node, so it cannot relocate within a node"
                .into(),
        );
    }
    match wanted {
        Wanted::Asked => Ok(()),
        Wanted::Auto(topology) if works_here(setup.memory, topology) => Ok(()),
        Wanted::Auto(_) => Err("the kernel does not migrate this memory's folios".into()),
    }
}

/// Whether the kernel migrates this memory's folios: tried live on a scratch gmem with the
/// same flags, which needs two nodes with memory. Where the MIGRATABLE flag cannot be known
/// (another process's gmem), the probe assumes it set, so a yes is tentative.
fn works_here(memory: &dyn MovableMemory, topology: &Topology) -> bool {
    let vm = memory.scratch_vm();
    let migratable = match memory.migratable() {
        Some(known) => known,
        None => GuestMemfd::supported_flags(vm).is_some_and(|f| f.contains(GmemFlags::MIGRATABLE)),
    };
    let flags = if migratable {
        GmemFlags::HOST_MAPPABLE | GmemFlags::MIGRATABLE
    } else {
        GmemFlags::HOST_MAPPABLE
    };
    probe::native_migration(vm, topology, flags).verdict == Verdict::Yes
}

fn build<'a>(setup: &Setup<'a>) -> Result<Box<dyn Mechanism + 'a>, MigrateError> {
    Ok(Box::new(Batched {
        mechanism: Native::new(),
        max_stop: setup.request.max_stop,
        // Without content checks native never stops the guest: take the largest batches.
        never_stops: !setup.request.verify.checks_content(),
    }))
}

impl BatchMechanism for Native {
    fn run_batch(&mut self, cx: &StepContext<'_>, step: &Step) -> Result<StepReport, MigrateError> {
        let offset = cx.gmem_offset(step);
        let pages = step.len / page_size();
        let addrs: Vec<usize> = (0..pages)
            .map(|i| cx.map.addr() + (offset + i * page_size()).index())
            .collect();
        let mut status = vec![UNWRITTEN; addrs.len()];
        let pfns_before = cx.pfns(offset, step.len);

        // Content hashes need a stopped guest; without them the guest keeps running.
        let paused = if cx.verify.checks_content() {
            Some(Paused::new(cx.quiesce)?)
        } else {
            None
        };
        let hash_before = cx
            .verify
            .checks_content()
            .then(|| verify::hash_range(cx.map, offset.raw(), step.len, &mut self.block));
        let target = step.target.0 as i32;
        let flag = cx.memory.move_flag();
        let mut result = move_with_retries(&addrs, target, &mut status, ROUNDS_RUNNING, flag);
        // A folio that a running vCPU keeps faulting on (its page tables, say) can lose every
        // race against the fault, which holds a folio reference while it waits for the lock
        // that migration holds. Once the kernel has shown it moves gmem, such stragglers are
        // moved with the guest stopped: a short stop for a few pages, and it is reported.
        let mut straggler_stop = None;
        if paused.is_none() && matches!(result, Ok(left) if left > 0) && status.contains(&target) {
            let behind: Vec<usize> = (0..addrs.len())
                .filter(|&i| status[i] >= 0 && status[i] != target)
                .collect();
            if !behind.is_empty() {
                let again: Vec<usize> = behind.iter().map(|&i| addrs[i]).collect();
                let mut again_status = vec![UNWRITTEN; again.len()];
                let stopped = Paused::new(cx.quiesce)?;
                let moved =
                    move_with_retries(&again, target, &mut again_status, ROUNDS_STOPPED, flag);
                straggler_stop = Some(stopped.resume()?);
                if moved.is_ok() {
                    for (&i, s) in behind.iter().zip(again_status) {
                        if s != UNWRITTEN {
                            status[i] = s;
                        }
                    }
                }
                result = Ok(status.iter().filter(|&&s| s != target).count());
            }
        }
        let hash_after = cx
            .verify
            .checks_content()
            .then(|| verify::hash_range(cx.map, offset.raw(), step.len, &mut self.block));
        let stop = paused.map(Paused::resume).transpose()?.or(straggler_stop);

        let not_moved = match result {
            Ok(left) if left as u64 == pages && status.iter().all(|&s| s == UNWRITTEN) => {
                return Err(MigrateError::NativeUnsupported {
                    evidence: format!(
                        "move_pages left {left} of {pages} gmem pages unmoved and wrote no per-page status"
                    ),
                });
            }
            Ok(_) => status.iter().filter(|&&s| s != target).count() as u64,
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
        report.content = match (hash_before, hash_after) {
            (Some(b), Some(a)) if a == b => ContentCheck::Matched,
            (Some(_), Some(_)) => ContentCheck::Mismatched,
            _ => ContentCheck::NotTaken,
        };
        check_result(cx, &mut report, offset, pfns_before, stop, Mapped::Unknown)?;
        if matches!(report.outcome, StepOutcome::Partial { .. }) {
            report.pages_moved = pages - not_moved;
        }
        Ok(report)
    }
}
