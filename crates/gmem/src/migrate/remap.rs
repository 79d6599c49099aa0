//! Remap: copy a whole chunk into spare gmem room on the target and rebind its memslot.
//!
//! The destination is allocated, placed and mapped while the guest runs. Only the copy and
//! the memslot swap (delete, re-create) happen while it is stopped. The old chunk stays
//! intact until the guest has resumed on the new one, so any failure just swaps back, and
//! the check after the swap is a byte-exact comparison with it.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::copier::CopyOutcome;
use super::mechanism::{
    Mapped, Mechanism, Registration, Setup, StepContext, Wanted, check_result, report,
};
use super::movable::MovableMemory;
use super::plan::Step;
use super::quiesce::Paused;
use super::refault::root_cause;
use super::report::{ContentCheck, MechanismKind, RestoredTo, StepOutcome, StepReport, StopPhases};
use super::verify;
use super::{InjectedFailure, MigrateError};
use crate::memory::{GmemOffset, GuestMemory, MemoryError, Policy, RoomCredit, page_size};
use crate::numa::NodeMask;
use crate::sys::sched::{self, ThreadId};

/// Remap in the engine's registry.
pub(crate) const REGISTRATION: Registration = Registration {
    kind: MechanismKind::Remap,
    check,
    build,
};

/// The memory as remap needs it: owned (this process binds its memslots), with a free
/// spare chunk; else why not.
pub(crate) fn remappable(memory: &dyn MovableMemory) -> Result<&GuestMemory, String> {
    let owned = memory.remappable().ok_or_else(|| {
        "remap rebinds memslots, which only the VMM that owns this memory can do: use refault or native"
            .to_owned()
    })?;
    if owned.layout().spare_chunks == 0 || owned.spare_chunks() == 0 {
        return Err(
            "the memory layout has no free spare chunk (create it with spare chunks)".into(),
        );
    }
    Ok(owned)
}

fn check(setup: &Setup<'_>, _wanted: Wanted<'_>) -> Result<(), String> {
    remappable(setup.memory).map(drop)
}

fn build<'a>(setup: &Setup<'a>) -> Result<Box<dyn Mechanism + 'a>, MigrateError> {
    let memory = remappable(setup.memory).map_err(|reason| MigrateError::MechanismUnavailable {
        mechanism: MechanismKind::Remap,
        reason,
    })?;
    Ok(Box::new(Remap { memory }))
}

impl Mechanism for Remap<'_> {
    fn run(
        &mut self,
        cx: &StepContext<'_>,
        steps: &[Step],
        record: &mut dyn FnMut(StepReport, u64) -> bool,
    ) -> Result<(), MigrateError> {
        self.run_pipelined(cx, steps, record)
    }
}

/// The remap mechanism, for memory whose memslots this process binds.
#[derive(Clone, Copy)]
pub(crate) struct Remap<'m> {
    pub memory: &'m GuestMemory,
}

impl Remap<'_> {
    /// Allocates the spare chunk on the target and maps it, while the guest runs, then
    /// checks where the kernel put it.
    fn prepare(
        &self,
        cx: &StepContext<'_>,
        room: &mut RoomCredit,
        preparers: &Preparers,
        spare: GmemOffset,
        len: u64,
        step: &Step,
    ) -> Result<(), String> {
        let memory = self.memory;
        let fail = |e: MemoryError| {
            format!(
                "node {} cannot supply {} KiB: {}",
                step.target,
                len >> 10,
                root_cause(&e)
            )
        };
        // A node-bound allocation the node cannot supply runs the OOM killer, not ENOMEM.
        room.ensure(step.target, len).map_err(fail)?;
        memory
            .set_policy_unchecked(spare, len, &Policy::Bind(NodeMask::single(step.target)))
            .map_err(fail)?;
        // One pass allocates under the policy and maps, so the copy takes no faults inside
        // the stop. A memory cgroup that cannot supply the pages fails here with ENOMEM.
        preparers
            .in_pieces(spare, len, |at, piece| memory.populate(at, piece))
            .map_err(fail)?;
        let pfns = verify::pfns(cx.pagemap, cx.map, spare, len / page_size());
        let placed = cx
            .pages_per_node(spare, len, pfns.as_deref())
            .map_err(|e| e.to_string())?;
        if placed.get(&step.target).copied().unwrap_or(0) != len / page_size() {
            return Err(format!(
                "the kernel placed the destination at {placed:?}, not on node {}",
                step.target
            ));
        }
        Ok(())
    }
}

/// Nice value of the workers that prepare destinations while the guest runs.
const WORKER_NICE: i32 = 10;

/// Workers preparing destinations, each every PREPARERS-th step: allocating and mapping a
/// 2 MiB chunk (~1.4 ms here, one page fault per page) is the slowest stage of a step.
const PREPARERS: usize = 2;

/// How long a worker that found no spare chunk waits before looking again.
const SPARE_POLL: std::time::Duration = std::time::Duration::from_micros(200);

/// Bytes a worker allocates, maps or frees in one go, between which a stop may begin:
/// 128 pages, about 0.25 ms here.
const WORKER_PIECE: u64 = 512 << 10;

/// The preparing workers: their thread ids, so that a stop can step them aside, and the
/// gate their gmem work passes piece by piece.
#[derive(Default)]
struct Preparers {
    tids: std::sync::Mutex<Vec<ThreadId>>,
    /// Read-held by a worker for each piece of gmem work, write-held by a stop. Allocating,
    /// mapping and punching take the gmem's invalidate lock, which the memslot swap's
    /// unbind and bind take exclusively: a swap would wait out a worker's whole 2 MiB
    /// (perf caught `kvm_gmem_unbind` waiting in `down_write`). A stop closes the gate
    /// before it pauses the guest, so it waits for one piece at most, and not while stopped.
    /// In `gmemctl demo --vcpus 1` this took the stop p99 from 2.6-2.9 ms to 1.2-2.0 ms.
    gate: std::sync::RwLock<()>,
}

impl Preparers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ThreadId>> {
        self.tids.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `work` on `offset..offset+len` piece by piece, each through the gate.
    fn in_pieces<E>(
        &self,
        offset: GmemOffset,
        len: u64,
        mut work: impl FnMut(GmemOffset, u64) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut at = 0;
        while at < len {
            let piece = WORKER_PIECE.min(len - at);
            let _open = self.gate.read().unwrap_or_else(|e| e.into_inner());
            work(offset + at, piece)?;
            at += piece;
        }
        Ok(())
    }

    /// Closes the gate until the guard drops: no worker piece runs meanwhile.
    fn close_gate(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers the calling worker until the seat drops (before its thread ends, so its
    /// id is never reused while listed here).
    fn seat(&self) -> PreparerSeat<'_> {
        let tid = sched::current_thread_id();
        self.lock().push(tid);
        PreparerSeat {
            preparers: self,
            tid,
        }
    }

    /// Makes every worker `SCHED_IDLE` until the guard drops: while the guest is stopped,
    /// the thread running the stop, the kernel workers its memslot swap waits on, and the
    /// vCPUs it wakes must never queue behind a worker's time slice (perf sched caught a
    /// vCPU waiting out 1.57 ms of one in `gmemctl demo --vcpus 1`).
    fn step_aside(&self) -> SteppedAside<'_> {
        let tids = self.lock();
        for &tid in tids.iter() {
            // A worker that stays normal only costs latency; nothing to report.
            let _ = sched::set_thread_idle(tid, true);
        }
        SteppedAside { tids }
    }
}

struct PreparerSeat<'p> {
    preparers: &'p Preparers,
    tid: ThreadId,
}

impl Drop for PreparerSeat<'_> {
    fn drop(&mut self) {
        self.preparers.lock().retain(|&t| t != self.tid);
    }
}

/// Workers stepped aside; they are normal (nice [`WORKER_NICE`]) again on drop.
struct SteppedAside<'p> {
    tids: std::sync::MutexGuard<'p, Vec<ThreadId>>,
}

impl Drop for SteppedAside<'_> {
    fn drop(&mut self) {
        for &tid in self.tids.iter() {
            let _ = sched::set_thread_idle(tid, false);
        }
    }
}

/// Chunks the main thread hands back to the worker, which frees their pages and returns
/// them to the spare pool: discarding a chunk (~0.35 ms per 2 MiB here) is then off the
/// guest's path, and one thread alone adds and removes the gmem's page-cache folios.
type SpareReturned = std::sync::mpsc::Sender<GmemOffset>;

impl Remap<'_> {
    /// Runs `steps` (whole chunks) as a two-stage pipeline on two threads: a worker
    /// allocates, maps and checks the destination of the next steps while this thread runs
    /// the current step's stop (copy, swap) and retires the old chunk. `each` gets every
    /// report with its step's pages to move, and says whether to go on.
    pub fn run_pipelined(
        &mut self,
        cx: &StepContext<'_>,
        steps: &[Step],
        each: &mut dyn FnMut(StepReport, u64) -> bool,
    ) -> Result<(), MigrateError> {
        let memory = self.memory;
        let chunk_size = memory.layout().chunk_size;
        if let Some(bad) = steps
            .iter()
            .find(|s| s.len != chunk_size || !s.guest_offset.is_multiple_of(chunk_size))
        {
            return Err(MigrateError::InvalidRequest(format!(
                "remap moves whole chunks, not {:#x}+{:#x}",
                bad.guest_offset, bad.len
            )));
        }
        // The step whose turn it is to take a spare chunk: steps take them in order, so the
        // one the main thread needs next is never starved by a later one (with one spare,
        // a worker could otherwise hold it for its next step while the other waits).
        let turn = AtomicUsize::new(0);
        let preparers = Preparers::default();
        std::thread::scope(|scope| {
            let mut ready = Vec::new();
            let mut returned = Vec::new();
            for first in 0..PREPARERS {
                // One destination per worker waits ready: each holds a chunk of memory.
                let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
                let (returned_tx, returned_rx) = std::sync::mpsc::channel::<GmemOffset>();
                ready.push(ready_rx);
                returned.push(returned_tx);
                let worker_cx = cx.clone();
                let worker = *self;
                let mine = steps.iter().enumerate().skip(first).step_by(PREPARERS);
                let (turn, preparers) = (&turn, &preparers);
                scope.spawn(move || {
                    let _seat = preparers.seat();
                    worker.prepare_all(&worker_cx, mine, turn, preparers, &ready_tx, &returned_rx)
                });
            }
            for (index, step) in steps.iter().enumerate() {
                let (ready_index, prepared) = ready[index % PREPARERS]
                    .recv()
                    .expect("each worker prepares its steps in order");
                debug_assert_eq!(ready_index, index);
                let step_cx = StepContext {
                    index: cx.index + index,
                    ..cx.clone()
                };
                let report = match prepared {
                    Ok(spare) => self.switch(
                        &step_cx,
                        step,
                        spare,
                        &returned[index % PREPARERS],
                        &preparers,
                    )?,
                    Err(reason) => report(step, StepOutcome::NotAttempted { reason }),
                };
                if !each(report, step.pages_to_move) {
                    break;
                }
            }
            // A worker blocked on a full queue gives its spare back, retires what it was
            // handed, and ends.
            drop(ready);
            Ok(())
        })
    }

    /// One worker's loop: for each of its steps, take a spare chunk and prepare it on the
    /// step's target; retire every chunk the main thread hands back. Ends once its steps are
    /// done (or the main thread stopped taking them) and every handed-back chunk is retired,
    /// so the spare pool holds only empty chunks when the migration returns.
    fn prepare_all<'s>(
        &self,
        cx: &StepContext<'_>,
        steps: impl Iterator<Item = (usize, &'s Step)>,
        turn: &AtomicUsize,
        preparers: &Preparers,
        ready: &std::sync::mpsc::SyncSender<(usize, Result<GmemOffset, String>)>,
        returned: &std::sync::mpsc::Receiver<GmemOffset>,
    ) {
        use std::sync::mpsc::RecvTimeoutError;
        let memory = self.memory;
        let chunk_size = memory.layout().chunk_size;
        // Background work: let vCPU threads have the CPU when they want it.
        let _ = sched::set_current_thread_nice(WORKER_NICE);
        let retire = |offset| retire(memory, offset, Some(preparers));
        let retire_handed_back = || {
            while let Ok(offset) = returned.try_recv() {
                retire(offset);
            }
        };
        let mut room = RoomCredit::default();
        for (index, step) in steps {
            let spare = loop {
                retire_handed_back();
                if turn.load(Ordering::Acquire) == index
                    && let Some(spare) = memory.take_spare()
                {
                    turn.store(index + 1, Ordering::Release);
                    break spare;
                }
                // Not this step's turn yet, or no spare free: what frees one may come from
                // this worker's own queue or another's, so look again soon.
                match returned.recv_timeout(SPARE_POLL) {
                    Ok(offset) => retire(offset),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return, // the main thread is done
                }
            };
            let prepared = self
                .prepare(cx, &mut room, preparers, spare, chunk_size, step)
                .map(|()| spare);
            if prepared.is_err() {
                retire(spare);
            }
            if let Err(unsent) = ready.send((index, prepared)) {
                if let (_, Ok(spare)) = unsent.0 {
                    retire(spare);
                }
                break;
            }
        }
        while let Ok(offset) = returned.recv() {
            retire(offset);
        }
    }

    /// The guest-visible part of one step: copy into the prepared spare and swap the
    /// memslot while stopped, then retire whichever chunk the guest no longer uses.
    fn switch(
        &mut self,
        cx: &StepContext<'_>,
        step: &Step,
        spare: GmemOffset,
        returned: &SpareReturned,
        preparers: &Preparers,
    ) -> Result<StepReport, MigrateError> {
        let memory = self.memory;
        let layout = *memory.layout();
        let chunk_size = layout.chunk_size;
        let (chunk, _) = layout.chunk_of(step.guest_offset);
        let old = memory.chunk_offset(chunk);
        let give_back = |offset: GmemOffset| {
            if let Err(unsent) = returned.send(offset) {
                retire(memory, unsent.0, None); // the worker has ended
            }
        };
        memory.populate(old, chunk_size)?;
        let pfns_before = cx.pfns(old, chunk_size);

        // The gate closes while the guest still runs: the piece it waits for is not a stop.
        // Unbound chunks (no VM) swap without KVM, so there is nothing to wait for.
        let gate = memory.bound_to_vm().then(|| preparers.close_gate());
        let aside = preparers.step_aside();
        let paused = Paused::new(cx.quiesce)?;
        let entry = paused.entry();
        let mut phases = PhaseClock::start();
        let copied_by_copier = match cx.copier {
            Some(copier) => {
                copier
                    .copy(memory.gmem(), old, spare, chunk_size)
                    .map_err(|e| MigrateError::InvalidRequest(e.to_string()))?
                    == CopyOutcome::Copied
            }
            None => false,
        };
        let checking = cx.verify.checks_content();
        if !copied_by_copier {
            cx.map
                .copy_to(old.index(), cx.map, spare.index(), chunk_size as usize);
        }
        let copy = phases.lap();
        if cx.injected(InjectedFailure::CorruptCopy) {
            let mut byte = [0u8];
            cx.map.read(spare.index(), &mut byte);
            cx.map.fill(spare.index(), 1, !byte[0]);
        }
        let swapped = if cx.injected(InjectedFailure::SwapFails) {
            Err("injected memslot swap failure".to_string())
        } else {
            memory
                .rebind_chunk(chunk, spare)
                .map(|_| ())
                .map_err(|e| format!("{e}: {}", root_cause(&e)))
        };
        let swap = phases.lap();
        let mut content = ContentCheck::NotTaken;
        let failure = match swapped {
            Err(reason) => Some(reason),
            Ok(()) if checking => {
                // The old chunk is still intact: compare what the guest now sees, through
                // the updated GPA table, with it byte for byte.
                let now = memory
                    .host_offset(layout.gpa(step.guest_offset))
                    .expect("in RAM");
                if cx
                    .map
                    .equal(now.index(), cx.map, old.index(), chunk_size as usize)
                {
                    content = ContentCheck::Matched;
                    None
                } else {
                    content = ContentCheck::Mismatched;
                    // Point the guest back at the untouched old chunk.
                    memory.rebind_chunk(chunk, old).map_err(|source| {
                        MigrateError::RestoreFailed {
                            offset: step.guest_offset,
                            len: chunk_size,
                            source,
                        }
                    })?;
                    Some("content differs after the swap".to_string())
                }
            }
            Ok(()) => None,
        };
        let check = phases.lap();
        if failure.is_none() {
            // Map the new chunk for the guest before it runs again, so it resumes without a
            // stage-2 fault per page there.
            cx.quiesce
                .prefault(layout.gpa(step.guest_offset), chunk_size);
        }
        let prefault = phases.lap();
        let stop = paused.resume()?;
        drop(aside);
        drop(gate);

        let outcome = match failure {
            None => {
                give_back(old);
                StepOutcome::Moved
            }
            Some(reason) => {
                give_back(spare);
                StepOutcome::Restored {
                    reason,
                    to: RestoredTo::Original,
                }
            }
        };
        let mut report = report(step, outcome);
        report.content = content;
        report.stop_phases = Some(StopPhases {
            entry,
            copy,
            swap,
            check,
            prefault,
        });
        let now = memory.chunk_offset(chunk);
        check_result(cx, &mut report, now, pfns_before, Some(stop), Mapped::Fully)?;
        Ok(report)
    }
}

/// Times consecutive phases: each lap is the time since the previous one.
struct PhaseClock(std::time::Instant);

impl PhaseClock {
    fn start() -> Self {
        PhaseClock(std::time::Instant::now())
    }

    fn lap(&mut self) -> std::time::Duration {
        let now = std::time::Instant::now();
        let lap = now - self.0;
        self.0 = now;
        lap
    }
}

/// Frees a chunk's pages and returns its room to the spare pool; a worker does it piece by
/// piece through its gate.
fn retire(memory: &GuestMemory, offset: GmemOffset, preparers: Option<&Preparers>) {
    let len = memory.layout().chunk_size;
    let _ = match preparers {
        Some(preparers) => preparers.in_pieces(offset, len, |at, piece| memory.discard(at, piece)),
        None => memory.discard(offset, len),
    };
    memory.return_spare(offset);
}

/// Remap for confidential gmem: the host never maps it, so placement comes from the
/// thread's own policy, the copy from the firmware-assisted copier, and verification is the
/// copier's. Refused unless the copier reports the content copied.
pub(crate) fn remap_confidential(
    memory: &crate::memory::GuestMemory,
    quiesce: &dyn super::Quiesce,
    copier: &dyn super::ContentCopier,
    step: &Step,
) -> Result<StepReport, MigrateError> {
    use crate::sys::mempolicy::{self, MPOL_BIND, MPOL_DEFAULT};
    let chunk_size = memory.layout().chunk_size;
    let (chunk, _) = memory.layout().chunk_of(step.guest_offset);
    let Some(spare) = memory.take_spare() else {
        return Ok(report(
            step,
            StepOutcome::NotAttempted {
                reason: "no spare chunk is free".into(),
            },
        ));
    };
    let give_back = |offset: GmemOffset| {
        let _ = memory.gmem().punch(offset, chunk_size);
        memory.return_spare(offset);
    };
    // Without a mapping there is no mbind: allocate under this thread's policy instead.
    let target = NodeMask::single(step.target);
    let allocated = crate::memory::ensure_room(step.target, chunk_size)
        .and_then(|()| {
            mempolicy::set_mempolicy(MPOL_BIND, target.as_raw()).map_err(|source| {
                MemoryError::Mbind {
                    offset: spare.raw(),
                    len: chunk_size,
                    source,
                }
            })
        })
        .and_then(|()| memory.gmem().allocate(spare, chunk_size));
    let _ = mempolicy::set_mempolicy(MPOL_DEFAULT, NodeMask::new().as_raw());
    if let Err(e) = allocated {
        give_back(spare);
        return Ok(report(
            step,
            StepOutcome::NotAttempted {
                reason: root_cause(&e),
            },
        ));
    }
    let old = memory.chunk_offset(chunk);
    let paused = Paused::new(quiesce)?;
    let copied = copier.copy(memory.gmem(), old, spare, chunk_size);
    let failure = match copied {
        Ok(CopyOutcome::Copied) => memory
            .rebind_chunk(chunk, spare)
            .err()
            .map(|e| root_cause(&e)),
        Ok(CopyOutcome::NotCopied) => {
            Some("the copier declined, and the host may not copy confidential memory".to_string())
        }
        Err(e) => Some(e.to_string()),
    };
    let stop = paused.resume()?;
    let mut report = report(
        step,
        match &failure {
            None => StepOutcome::Moved,
            Some(reason) => StepOutcome::Restored {
                reason: reason.clone(),
                to: RestoredTo::Original,
            },
        },
    );
    give_back(if failure.is_none() { old } else { spare });
    report.stop = Some(stop);
    if failure.is_none() {
        report.pages_moved = chunk_size / crate::memory::page_size();
    }
    Ok(report)
}
