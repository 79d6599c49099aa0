//! Refault: copy a batch out, punch it, re-allocate it on the target, copy it back.
//!
//! Works on any layout, but the guest is stopped for the whole batch, so batches are sized
//! to the stop budget. Before the stop, a scratch reservation proves the target (and the
//! memory cgroup) can supply the batch, so a full node fails before anything is touched.
//! The reservation is released right after the punch: free lists are LIFO, so the batch
//! then gets the reservation's frames. Within one node, a soak first takes the frames the
//! punch freed and holds them while the batch allocates, so a relocation really changes
//! every frame. After the punch, the bounce buffer
//! holds the only copy: every failure from there on writes it back before resuming. Where
//! this process dying must not lose it either (another process's memory), the bounce
//! buffer is a [`BatchJournal`]'s, recorded before the punch and cleared after the copy back.

use super::journal::{BatchJournal, BatchPoint};
use super::mechanism::{
    BatchMechanism, Batched, MAX_BATCH_BYTES, Mapped, Mechanism, Registration, Setup, StepContext,
    Wanted, check_result, report,
};
use super::plan::Step;
use super::quiesce::Paused;
use super::report::{ContentCheck, MechanismKind, RestoredTo, StepOutcome, StepReport};
use super::scratch::Scratch;
use super::{InjectedFailure, MigrateError};
use crate::memory::{GmemOffset, MemoryError, Policy};
use crate::numa::NodeMask;
use crate::sys::mman::Mmap;
use crate::sys::sched;

/// A share of a batch: bytes `at..at+len` of it, and the same bytes of the bounce buffer
/// and of each scratch half (the whole batch, or the pages a redo covers).
#[derive(Debug, Clone, Copy)]
struct Part {
    at: u64,
    len: u64,
}

/// Where a batch waits while its pages are replaced.
enum Bounce<'j> {
    /// Memory of this process: enough where this process is the guest's owner.
    Owned(Mmap),
    /// The journal's buffer, which outlives this process.
    Journal(&'j dyn BatchJournal),
}

/// The refault mechanism, with its bounded buffers.
pub(crate) struct Refault<'j> {
    /// Holds one batch while its pages are replaced; never the whole guest.
    bounce: Bounce<'j>,
    scratch: Scratch,
}

impl<'j> Refault<'j> {
    /// Buffers for batches of up to `max_batch` bytes: the journal's, if there is one.
    pub fn new(
        cx_vm: &std::sync::Arc<kvm_ioctls::VmFd>,
        max_batch: u64,
        journal: Option<&'j dyn BatchJournal>,
    ) -> Result<Self, MigrateError> {
        let bounce = match journal {
            Some(journal) => {
                if (journal.buffer().len() as u64) < max_batch {
                    return Err(MigrateError::InvalidRequest(format!(
                        "the journal's buffer holds {} bytes, less than a {max_batch} byte batch",
                        journal.buffer().len()
                    )));
                }
                Bounce::Journal(journal)
            }
            None => Bounce::Owned(Mmap::anonymous(max_batch as usize).map_err(|source| {
                MemoryError::Mmap {
                    len: max_batch,
                    source,
                }
            })?),
        };
        let refault = Refault {
            bounce,
            scratch: Scratch::new(cx_vm, max_batch)?,
        };
        // Fault the bounce buffer in once, not inside every stop.
        refault
            .bounce()
            .populate_write(0, max_batch as usize)
            .map_err(|source| MemoryError::Populate {
                offset: 0,
                len: max_batch,
                source,
            })?;
        Ok(refault)
    }

    fn bounce(&self) -> &Mmap {
        match &self.bounce {
            Bounce::Owned(map) => map,
            Bounce::Journal(journal) => journal.buffer(),
        }
    }

    fn journal(&self) -> Option<&'j dyn BatchJournal> {
        match self.bounce {
            Bounce::Owned(_) => None,
            Bounce::Journal(journal) => Some(journal),
        }
    }

    /// Test hook: tells the journal (if any) that the batch reached `point`.
    fn reached(&self, point: BatchPoint) {
        if let Some(journal) = self.journal() {
            journal.reached(point);
        }
    }

    /// Copies the bounce buffer into the range; with checking on, returns whether what
    /// landed equals the bounce buffer byte for byte.
    fn write_back(&self, cx: &StepContext<'_>, offset: GmemOffset, part: Part) -> bool {
        let (at, len) = (part.at as usize, part.len as usize);
        let dst = (offset + part.at).index();
        self.bounce().copy_to(at, cx.map, dst, len);
        !cx.verify.checks_content() || cx.map.equal(dst, self.bounce(), at, len)
    }

    /// The stopped work for a part: punch, (soak), take the reservation's frames, allocate
    /// and map on the target, copy back. Any error leaves the part punched or partly
    /// allocated; the caller restores the whole batch.
    fn replace_part(
        &self,
        cx: &StepContext<'_>,
        offset: GmemOffset,
        part: Part,
        step: &Step,
        same_node: bool,
    ) -> Result<bool, MemoryError> {
        let (start, len) = (offset + part.at, part.len);
        cx.host.discard(start, len)?;
        self.reached(BatchPoint::Punched);
        if same_node {
            // Hold the frames just freed, so this part must take others.
            self.scratch.soak(part.at, len, step.target);
        }
        self.scratch.release(part.at, len);
        if part.at == 0 && cx.injected(InjectedFailure::AllocateAfterPunch) {
            return Err(MemoryError::Allocate {
                offset: start.raw(),
                len,
                source: std::io::Error::other("injected failure after punch"),
            });
        }
        // Allocates under the new policy and maps in one pass; a node that cannot supply
        // the pages fails here with ENOMEM (never a SIGBUS on a later touch).
        cx.host.populate(start, len)?;
        self.reached(BatchPoint::Refaulted);
        Ok(self.write_back(cx, offset, part))
    }

    /// Replaces again the pages of the batch whose frame did not change, holding each old
    /// frame in the (already released) reservation half while the page re-faults.
    fn redo_kept_frames(
        &self,
        cx: &StepContext<'_>,
        offset: GmemOffset,
        step: &Step,
        before: &[Option<u64>],
    ) -> Result<bool, MemoryError> {
        let page = crate::memory::page_size();
        let Some(now) = cx.pfns(offset, before.len() as u64 * page) else {
            return Ok(true);
        };
        let mut intact = true;
        let mut i = 0;
        while i < now.len() {
            if now[i].is_none() || now[i] != before[i] {
                i += 1;
                continue;
            }
            let start = i;
            while i < now.len() && now[i].is_some() && now[i] == before[i] {
                i += 1;
            }
            let part = Part {
                at: start as u64 * page,
                len: (i - start) as u64 * page,
            };
            cx.host.discard(offset + part.at, part.len)?;
            self.scratch.hold(part.at, part.len, step.target);
            cx.host.populate(offset + part.at, part.len)?;
            intact &= self.write_back(cx, offset, part);
        }
        Ok(intact)
    }

    /// Puts the bounce buffer's content back: on the original nodes if they can take it,
    /// else anywhere. Returns where it went.
    fn restore(
        &self,
        cx: &StepContext<'_>,
        offset: GmemOffset,
        len: u64,
        original: NodeMask,
    ) -> Result<RestoredTo, MemoryError> {
        let mut last = None;
        for (policy, to) in [
            (Policy::Bind(original), RestoredTo::Original),
            (Policy::Default, RestoredTo::AnyNode),
        ] {
            let _ = cx.host.discard(offset, len);
            let attempt = cx
                .host
                .set_policy_unchecked(offset, len, &policy)
                .and_then(|()| cx.host.populate(offset, len));
            match attempt {
                Ok(()) if self.write_back(cx, offset, Part { at: 0, len }) => return Ok(to),
                Ok(()) => {
                    last = Some(MemoryError::Layout(
                        "restored content differs from the saved copy".into(),
                    ));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }
}

/// Refault in the engine's registry.
pub(crate) const REGISTRATION: Registration = Registration {
    kind: MechanismKind::Refault,
    check,
    build,
};

/// Refault serves any layout, owned or not.
fn check(_setup: &Setup<'_>, _wanted: Wanted<'_>) -> Result<(), String> {
    Ok(())
}

fn build<'a>(setup: &Setup<'a>) -> Result<Box<dyn Mechanism + 'a>, MigrateError> {
    let refault = Refault::new(setup.memory.scratch_vm(), MAX_BATCH_BYTES, setup.journal)?;
    Ok(Box::new(Batched {
        mechanism: refault,
        max_stop: setup.request.max_stop,
        never_stops: false,
    }))
}

impl BatchMechanism for Refault<'_> {
    fn run_batch(&mut self, cx: &StepContext<'_>, step: &Step) -> Result<StepReport, MigrateError> {
        let offset = cx.gmem_offset(step);
        let len = step.len;
        assert!(
            len <= self.bounce().len() as u64,
            "batch larger than the bounce buffer"
        );
        let pfns_before = cx.pfns(offset, len);
        // From the PFNs where it can (one pagemap read), not a move_pages query per batch.
        let original: NodeMask = cx
            .pages_per_node(offset, len, pfns_before.as_deref())?
            .into_keys()
            .collect();
        let same_node = original == NodeMask::single(step.target);

        // Prove the target can supply the batch before touching it.
        if let Err(e) = self.scratch.reserve(len, step.target) {
            return Ok(report(
                step,
                StepOutcome::NotAttempted {
                    reason: format!(
                        "node {} cannot supply {} KiB: {}",
                        step.target,
                        len >> 10,
                        root_cause(&e)
                    ),
                },
            ));
        }
        // Free lists are per CPU: stay on one for the step, so the soak and the batch see
        // the same lists.
        let affinity = sched::affinity().unwrap_or_default();
        if let Some(&cpu) = affinity.first() {
            let _ = sched::set_affinity(&[cpu]);
        }

        let paused = Paused::new(cx.quiesce)?;
        // From the punch on, the bounce buffer is the only copy, and what comes back is
        // compared with it byte for byte.
        let whole = Part { at: 0, len };
        cx.map
            .copy_to(offset.index(), self.bounce(), 0, len as usize);
        if let Some(journal) = self.journal() {
            if let Err(e) = journal.record(offset, len) {
                // Nothing is touched yet: the guest resumes, and the migration ends here.
                paused.resume()?;
                self.scratch.release_all();
                let _ = sched::set_affinity(&affinity);
                return Err(MigrateError::Journal(e));
            }
            journal.reached(BatchPoint::Journalled);
        }
        let replaced = cx
            .host
            .set_policy_unchecked(offset, len, &Policy::Bind(NodeMask::single(step.target)))
            .and_then(|()| self.replace_part(cx, offset, whole, step, same_node));
        // A frame freed on one CPU can still come back when other threads allocate and free
        // there too. Within a node, redo (once) the pages that got their old frame back.
        let replaced = match (replaced, same_node, &pfns_before) {
            (Ok(true), true, Some(before)) => self.redo_kept_frames(cx, offset, step, before),
            (replaced, ..) => replaced,
        };
        let mut content = if cx.verify.checks_content() {
            ContentCheck::Matched
        } else {
            ContentCheck::NotTaken
        };
        let failure = match replaced {
            Ok(true) => None,
            Ok(false) => {
                content = ContentCheck::Mismatched;
                Some("content differs from the saved copy after the copy back".to_string())
            }
            Err(e) => Some(format!("{e}: {}", root_cause(&e))),
        };
        let outcome = match failure {
            None => StepOutcome::Moved,
            Some(reason) => match self.restore(cx, offset, len, original) {
                Ok(to) => StepOutcome::Restored { reason, to },
                Err(source) => {
                    // Leave the guest stopped: running it on missing memory would be worse.
                    self.scratch.release_all();
                    std::mem::forget(paused);
                    return Err(MigrateError::RestoreFailed {
                        offset: step.guest_offset,
                        len,
                        source,
                    });
                }
            },
        };
        self.reached(BatchPoint::CopiedBack);
        if let Some(journal) = self.journal()
            && let Err(source) = journal.clear()
        {
            // The record could be restored later over what the guest writes next.
            self.scratch.release_all();
            std::mem::forget(paused);
            return Err(MigrateError::JournalNotCleared {
                offset: step.guest_offset,
                len,
                source,
            });
        }
        if matches!(outcome, StepOutcome::Moved) {
            // As remap does: the guest resumes with the new frames already in its stage-2
            // tables, instead of faulting each page back in.
            cx.quiesce
                .prefault(cx.memory.layout().gpa(step.guest_offset), len);
        }
        let entry = paused.entry();
        let stop = paused.resume()?;
        self.scratch.release_all();
        let _ = sched::set_affinity(&affinity);

        let mut report = report(step, outcome);
        report.content = content;
        report.stop_entry = Some(entry);
        check_result(
            cx,
            &mut report,
            offset,
            pfns_before,
            Some(stop),
            Mapped::Unknown,
        )?;
        Ok(report)
    }
}

/// The innermost cause of an error, e.g. "Cannot allocate memory (os error 12)".
pub(crate) fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
