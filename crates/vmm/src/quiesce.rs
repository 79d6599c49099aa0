//! Stopping and restarting the vCPU threads: for memory moves (`Quiesce`) and for the user.
//!
//! A pause raises `stop_requested` and kicks every running vCPU thread with a signal (see
//! `gmem::sys::signal`), so a vCPU inside KVM_RUN leaves it at once and one about to enter it
//! returns immediately. Each vCPU thread then parks on a condvar until every hold is
//! released. A pause returns only when no vCPU is running guest code.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gmem::memory::GuestAddress;
use gmem::migrate::{Quiesce, QuiesceError};
use gmem::sys::signal;

use crate::metrics::VmCounters;

/// Re-kick vCPUs that have not parked after this long (a safety net; one kick suffices).
const KICK_RETRY: Duration = Duration::from_millis(10);
/// Give up a pause after this long: something is badly wrong with a vCPU thread.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a pause polls for the vCPUs to park before it sleeps on the condvar. A vCPU
/// parks within about 0.1 ms of its kick here; a sleeping pauser's CPU halts, and waking
/// it costs the stop another wakeup on top (as KVM's own halt polling avoids).
const PARK_POLL: Duration = Duration::from_micros(300);

/// Who asked for a stop. Holds of both kinds stack: the guest runs only when none is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hold {
    /// A memory move (nestable: each `pause` needs its `resume`).
    Quiesce,
    /// The user (`PUT /vm/state`): on or off, not counted.
    User,
}

/// Where a vCPU thread is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// In or around KVM_RUN.
    Running,
    /// Waiting on the condvar; runs no guest code.
    Parked,
    /// The thread is done (shutdown or a guest failure).
    Exited,
}

/// What a vCPU thread should do after a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Checkpoint {
    /// Run the guest.
    Continue,
    /// Leave the run loop: the VM is shutting down.
    Exit,
}

#[derive(Debug)]
struct ControlState {
    quiesce_depth: u32,
    /// When the outermost quiesce pause was requested.
    quiesce_since: Option<Instant>,
    user_paused: bool,
    shutting_down: bool,
    phases: Vec<Phase>,
}

impl ControlState {
    fn held(&self) -> bool {
        self.quiesce_depth > 0 || self.user_paused
    }

    fn none_running(&self) -> bool {
        !self.phases.contains(&Phase::Running)
    }

    fn running(&self) -> impl Iterator<Item = usize> + '_ {
        self.phases
            .iter()
            .enumerate()
            .filter(|(_, phase)| **phase == Phase::Running)
            .map(|(index, _)| index)
    }
}

/// The state shared by the VM, its vCPU threads and anyone holding a [`VmQuiesce`].
#[derive(Debug)]
pub(crate) struct RunControl {
    /// Read by vCPU threads before every KVM_RUN; the lock-free side of `state.held()` and
    /// `state.shutting_down`.
    stop_requested: AtomicBool,
    /// vCPU threads in the Running phase: the lock-free side of `state.phases`, which a
    /// pause polls.
    running: AtomicUsize,
    state: Mutex<ControlState>,
    changed: Condvar,
    /// vCPU threads, by index; empty once joined.
    threads: Mutex<Vec<JoinHandle<()>>>,
    kick_signal: i32,
    counters: Arc<VmCounters>,
    /// A second fd of vCPU 0, for KVM_PRE_FAULT_MEMORY while every vCPU is parked; `None`
    /// once KVM has refused it (no TDP) or when it could not be made.
    prefault_vcpu: Mutex<Option<OwnedFd>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl RunControl {
    pub(crate) fn new(
        vcpus: usize,
        kick_signal: i32,
        counters: Arc<VmCounters>,
        prefault_vcpu: Option<OwnedFd>,
    ) -> Self {
        RunControl {
            stop_requested: AtomicBool::new(false),
            running: AtomicUsize::new(vcpus),
            state: Mutex::new(ControlState {
                quiesce_depth: 0,
                quiesce_since: None,
                user_paused: false,
                shutting_down: false,
                phases: vec![Phase::Running; vcpus],
            }),
            changed: Condvar::new(),
            threads: Mutex::new(Vec::new()),
            kick_signal,
            counters,
            prefault_vcpu: Mutex::new(prefault_vcpu),
        }
    }

    /// Hands over the vCPU threads (index order), so pauses can kick them.
    pub(crate) fn adopt_threads(&self, threads: Vec<JoinHandle<()>>) {
        *lock(&self.threads) = threads;
    }

    fn kick(&self, vcpus: impl Iterator<Item = usize>) {
        let threads = lock(&self.threads);
        for index in vcpus {
            if let Some(thread) = threads.get(index) {
                // ESRCH means the thread already returned; it is not running guest code.
                let _ = signal::kick_thread(thread, self.kick_signal);
            }
        }
    }

    /// Adds a hold and returns once no vCPU runs guest code.
    pub(crate) fn stop(&self, hold: Hold) -> Result<(), QuiesceError> {
        let started = Instant::now();
        let mut state = lock(&self.state);
        match hold {
            Hold::Quiesce => {
                state.quiesce_depth += 1;
                state.quiesce_since.get_or_insert(started);
            }
            Hold::User if state.user_paused => return Ok(()),
            Hold::User => state.user_paused = true,
        }
        if state.none_running() {
            return Ok(());
        }
        self.stop_requested.store(true, Ordering::SeqCst);
        self.kick(state.running());
        drop(state);
        let polling = Instant::now();
        while self.running.load(Ordering::SeqCst) > 0 && polling.elapsed() < PARK_POLL {
            std::hint::spin_loop();
        }
        let mut state = lock(&self.state);
        while !state.none_running() {
            let waited = started.elapsed();
            if waited >= STOP_TIMEOUT {
                let stuck: Vec<usize> = state.running().collect();
                if state.quiesce_depth == 1 {
                    state.quiesce_since = None; // a failed pause held nothing
                }
                self.release(hold, &mut state);
                return Err(QuiesceError(format!(
                    "vCPU(s) {stuck:?} did not stop within {STOP_TIMEOUT:?}"
                )));
            }
            let (next, timeout) = self
                .changed
                .wait_timeout(state, KICK_RETRY.min(STOP_TIMEOUT - waited))
                .unwrap_or_else(|e| e.into_inner());
            state = next;
            if timeout.timed_out() {
                self.counters.kick_retried();
                self.kick(state.running());
            }
        }
        self.counters.stopped_in(started.elapsed());
        Ok(())
    }

    /// Removes a hold; the vCPUs run again when none is left.
    pub(crate) fn start(&self, hold: Hold) -> Result<(), QuiesceError> {
        let mut state = lock(&self.state);
        if hold == Hold::Quiesce && state.quiesce_depth == 0 {
            return Err(QuiesceError("resume without a matching pause".into()));
        }
        self.release(hold, &mut state);
        Ok(())
    }

    fn release(&self, hold: Hold, state: &mut ControlState) {
        match hold {
            Hold::Quiesce => {
                state.quiesce_depth -= 1;
                if state.quiesce_depth == 0
                    && let Some(since) = state.quiesce_since.take()
                {
                    self.counters.quiesce_held_for(since.elapsed());
                }
            }
            Hold::User => state.user_paused = false,
        }
        if !state.held() && !state.shutting_down {
            self.stop_requested.store(false, Ordering::SeqCst);
            self.changed.notify_all();
        }
    }

    /// Called by vCPU thread `index` before each KVM_RUN. Parks while a hold is in force.
    pub(crate) fn checkpoint(&self, index: usize) -> Checkpoint {
        if !self.stop_requested.load(Ordering::SeqCst) {
            return Checkpoint::Continue;
        }
        let mut state = lock(&self.state);
        loop {
            if state.shutting_down {
                self.set_phase(&mut state, index, Phase::Exited);
                self.changed.notify_all();
                return Checkpoint::Exit;
            }
            if !state.held() {
                self.set_phase(&mut state, index, Phase::Running);
                return Checkpoint::Continue;
            }
            if state.phases[index] != Phase::Parked {
                self.set_phase(&mut state, index, Phase::Parked);
                self.changed.notify_all();
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Called by vCPU thread `index` when it leaves its run loop for good.
    pub(crate) fn exited(&self, index: usize) {
        self.set_phase(&mut lock(&self.state), index, Phase::Exited);
        self.changed.notify_all();
    }

    /// Moves vCPU `index` to `phase`, keeping the running count in step.
    fn set_phase(&self, state: &mut ControlState, index: usize, phase: Phase) {
        let was_running = state.phases[index] == Phase::Running;
        state.phases[index] = phase;
        match (was_running, phase == Phase::Running) {
            (true, false) => self.running.fetch_sub(1, Ordering::SeqCst),
            (false, true) => self.running.fetch_add(1, Ordering::SeqCst),
            _ => 0,
        };
    }

    /// Whether the user paused the VM.
    pub(crate) fn user_paused(&self) -> bool {
        lock(&self.state).user_paused
    }

    /// Whether shutdown has begun.
    pub(crate) fn shutting_down(&self) -> bool {
        lock(&self.state).shutting_down
    }

    /// Tells every vCPU thread to leave its run loop, without waiting: what a vCPU does when
    /// the guest asks for a reset. Pauses fail from then on.
    pub(crate) fn begin_shutdown(&self) {
        let mut state = lock(&self.state);
        state.shutting_down = true;
        self.stop_requested.store(true, Ordering::SeqCst);
        self.changed.notify_all();
        self.kick(state.running());
    }

    /// Stops every vCPU thread for good and joins them. Returns the indexes of threads that
    /// panicked. Idempotent.
    pub(crate) fn shut_down(&self) -> Vec<usize> {
        self.begin_shutdown();
        let threads = std::mem::take(&mut *lock(&self.threads));
        threads
            .into_iter()
            .enumerate()
            .filter_map(|(index, thread)| thread.join().is_err().then_some(index))
            .collect()
    }
}

/// Stops and restarts a VM's vCPUs for memory moves. Cheap to clone; hand it to a migration
/// job running on another thread.
#[derive(Debug, Clone)]
pub struct VmQuiesce {
    pub(crate) control: Arc<RunControl>,
}

impl Quiesce for VmQuiesce {
    /// Returns once every vCPU is out of KVM_RUN and parked (or has exited). Nests.
    fn pause(&self) -> Result<(), QuiesceError> {
        self.control.stop(Hold::Quiesce)
    }

    /// Releases one pause; the vCPUs run when no pause (and no user pause) is left.
    fn resume(&self) -> Result<(), QuiesceError> {
        self.control.start(Hold::Quiesce)
    }

    /// Maps the range into KVM's stage-2 tables through vCPU 0 (`KVM_PRE_FAULT_MEMORY`),
    /// which is possible only while no vCPU runs. Where KVM refuses (no TDP: shadow paging,
    /// as under PVM), the VM stops trying and the guest faults the pages in itself.
    fn prefault(&self, gpa: GuestAddress, len: u64) -> bool {
        let mut vcpu = lock(&self.control.prefault_vcpu);
        let Some(fd) = vcpu.as_ref() else {
            return false;
        };
        if !lock(&self.control.state).none_running() {
            return false;
        }
        match gmem::sys::kvm::pre_fault_memory(fd.as_fd(), gpa.0, len) {
            Ok(()) => true,
            Err(e) => {
                eprintln!(
                    "vmm: KVM_PRE_FAULT_MEMORY failed ({e}); moved memory is faulted in by the \
                     guest from now on"
                );
                *vcpu = None;
                false
            }
        }
    }
}
