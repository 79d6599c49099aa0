//! Migration jobs: one at a time, each on its own thread, kept for a while after they end.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gmem::migrate::{MigrationReport, MigrationRequest, Migrator, PlannedMigration, Progress};

use super::error::{ApiError, sentence};
use super::model::{GuestDuring, JobList, JobState, JobSummary, JobView, MigrationTotals};
use super::request::MigrateBody;
use crate::vm::Vm;

/// Finished jobs kept for `GET /memory/migrations/{id}`; older ones are forgotten.
pub const KEPT_JOBS: usize = 64;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug)]
enum Status {
    Running {
        progress: Option<Progress>,
    },
    Finished {
        report: Box<MigrationReport>,
        guest: GuestDuring,
        elapsed: Duration,
    },
    Failed {
        error: String,
        elapsed: Duration,
    },
}

/// One migration job.
#[derive(Debug)]
struct Job {
    id: u64,
    request: MigrateBody,
    accepted: Instant,
    status: Mutex<Status>,
}

impl Job {
    fn state(&self) -> JobState {
        match &*lock(&self.status) {
            Status::Running { .. } => JobState::Running,
            Status::Finished { report, guest, .. } => {
                if report.complete
                    && report.content_mismatches == 0
                    && guest.mismatches == 0
                    && guest.reset.is_none()
                {
                    JobState::Succeeded
                } else {
                    JobState::Incomplete
                }
            }
            Status::Failed { .. } => JobState::Failed,
        }
    }

    fn view(&self) -> JobView {
        let state = self.state();
        let mut view = JobView {
            id: self.id,
            state,
            request: self.request.clone(),
            elapsed_ms: 0,
            progress: None,
            report: None,
            guest: None,
            error: None,
        };
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        match &*lock(&self.status) {
            Status::Running { progress } => {
                view.elapsed_ms = ms(self.accepted.elapsed());
                view.progress = *progress;
            }
            Status::Finished {
                report,
                guest,
                elapsed,
            } => {
                view.elapsed_ms = ms(*elapsed);
                view.report = Some((**report).clone());
                view.guest = Some(guest.clone());
            }
            Status::Failed { error, elapsed } => {
                view.elapsed_ms = ms(*elapsed);
                view.error = Some(error.clone());
            }
        }
        view
    }

    fn running(&self) -> bool {
        matches!(*lock(&self.status), Status::Running { .. })
    }

    fn set(&self, status: Status) {
        *lock(&self.status) = status;
    }
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    /// The job that holds the one migration slot (also while it is being planned).
    running: Option<u64>,
    jobs: VecDeque<Arc<Job>>,
    totals: MigrationTotals,
    threads: Vec<JoinHandle<()>>,
}

/// All migration jobs of one VM.
#[derive(Debug, Default)]
pub(crate) struct Jobs {
    table: Mutex<Table>,
    /// Taken for writing by a running migration and for reading by placement queries, so
    /// that a query never maps pages of a chunk that a migration is punching.
    gate: RwLock<()>,
}

/// Frees the migration slot when dropped: after a refused plan, a failed spawn, or the end
/// (or panic) of the job thread.
/// While it lives, the VM counts as migrating (so a guest reset meanwhile is reported as one
/// that happened during a migration).
struct Slot {
    jobs: Arc<Jobs>,
    vm: Arc<Vm>,
    id: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut table = lock(&self.jobs.table);
        if table.running == Some(self.id) {
            table.running = None;
            self.vm.set_migrating(false);
        }
    }
}

impl Jobs {
    /// Runs `read` while no migration moves pages.
    pub(crate) fn without_migration<T>(&self, read: impl FnOnce() -> T) -> T {
        let _gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
        read()
    }

    /// Plans `request` and, if the plan holds, starts it on a new thread. Returns its id.
    pub(crate) fn start(
        self: &Arc<Self>,
        vm: &Arc<Vm>,
        request: MigrationRequest,
    ) -> Result<u64, ApiError> {
        let slot = {
            let mut table = lock(&self.table);
            if let Some(running) = table.running {
                return Err(ApiError::MigrationRunning { running });
            }
            if vm.state() == crate::metrics::VmState::Stopped {
                return Err(ApiError::VmStopped);
            }
            table.next_id += 1;
            let id = table.next_id;
            table.running = Some(id);
            vm.set_migrating(true);
            Slot {
                jobs: Arc::clone(self),
                vm: Arc::clone(vm),
                id,
            }
        };
        // Planning reads placement and topology, and checks nodes and mechanism, without
        // moving anything: every request the engine would refuse is refused here, as a 400.
        let planned = self
            .without_migration(|| Migrator::new(vm.memory(), vm.quiesce()).plan(&request))
            .map_err(|e| {
                if e.is_user_error() {
                    ApiError::RefusedMigration(e)
                } else {
                    ApiError::PlanMigration(e)
                }
            })?;

        let id = slot.id;
        let job = Arc::new(Job {
            id,
            request: MigrateBody::from_request(&request),
            accepted: Instant::now(),
            status: Mutex::new(Status::Running { progress: None }),
        });
        let thread = {
            let (vm, jobs, job) = (Arc::clone(vm), Arc::clone(self), Arc::clone(&job));
            std::thread::Builder::new()
                .name(format!("migration{id}"))
                .spawn(move || {
                    let _slot = slot;
                    let _ended = EndGuard {
                        jobs: &jobs,
                        job: &job,
                    };
                    jobs.run(&vm, &job, planned);
                })
                .map_err(ApiError::SpawnMigration)?
        };
        let mut table = lock(&self.table);
        table.totals.started += 1;
        table.jobs.push_back(job);
        while table.jobs.len() > KEPT_JOBS {
            match table.jobs.iter().position(|j| !j.running()) {
                Some(oldest) => drop(table.jobs.remove(oldest)),
                None => break,
            }
        }
        table.threads.retain(|t| !t.is_finished());
        table.threads.push(thread);
        Ok(id)
    }

    /// The job thread's body.
    fn run(&self, vm: &Vm, job: &Job, planned: PlannedMigration) {
        let before = vm.metrics();
        let result = {
            let _gate = self.gate.write().unwrap_or_else(|e| e.into_inner());
            let progress = |p: &Progress| job.set(Status::Running { progress: Some(*p) });
            Migrator::new(vm.memory(), vm.quiesce())
                .with_progress(&progress)
                .run(planned)
        };
        let after = vm.metrics();
        let elapsed = job.accepted.elapsed();
        // One job at a time, and a reset stops the VM: a reset during a migration is this one's.
        let reset = after.guest_reset.filter(|r| r.during_migration);
        match result {
            Ok(report) => {
                let guest = GuestDuring {
                    mismatches: after.mismatches.saturating_sub(before.mismatches),
                    sweeps: after.sweeps.saturating_sub(before.sweeps),
                    reset,
                };
                {
                    let mut table = lock(&self.table);
                    let totals = &mut table.totals;
                    totals.pages_moved.add(report.mechanism, report.pages_moved);
                    totals.bytes_moved += report.bytes_moved;
                    totals.pfns_changed += report.pfns_changed.unwrap_or(0);
                    totals.content_mismatches += report.content_mismatches;
                    totals.guest_mismatches += guest.mismatches;
                }
                job.set(Status::Finished {
                    report: Box::new(report),
                    guest,
                    elapsed,
                });
            }
            Err(e) => job.set(Status::Failed {
                error: match reset {
                    Some(reset) => format!(
                        "the guest reset {} ms after the VM started, during this migration \
                         ({}); the migration stopped: {}",
                        reset.at_ms,
                        reset.cause,
                        sentence(&e)
                    ),
                    None => sentence(&e),
                },
                elapsed,
            }),
        }
    }

    /// A job's view, if it is kept.
    pub(crate) fn view(&self, id: u64) -> Option<JobView> {
        let job = lock(&self.table)
            .jobs
            .iter()
            .find(|j| j.id == id)
            .map(Arc::clone)?;
        Some(job.view())
    }

    /// Every kept job.
    pub(crate) fn list(&self) -> JobList {
        let table = lock(&self.table);
        JobList {
            running: table.running,
            migrations: table
                .jobs
                .iter()
                .map(|j| JobSummary {
                    id: j.id,
                    state: j.state(),
                })
                .collect(),
        }
    }

    /// Totals over all jobs.
    pub(crate) fn totals(&self) -> MigrationTotals {
        lock(&self.table).totals
    }

    /// Waits for every job thread to end.
    pub(crate) fn join(&self) {
        let threads = std::mem::take(&mut lock(&self.table).threads);
        for thread in threads {
            let _ = thread.join();
        }
    }
}

/// Counts a job's outcome when its thread ends, and marks it failed if it ended without a
/// result (a panic in the engine).
struct EndGuard<'a> {
    jobs: &'a Jobs,
    job: &'a Job,
}

impl Drop for EndGuard<'_> {
    fn drop(&mut self) {
        if self.job.running() {
            self.job.set(Status::Failed {
                error: "the migration thread panicked; see the VMM's standard error".into(),
                elapsed: self.job.accepted.elapsed(),
            });
        }
        let mut table = lock(&self.jobs.table);
        match self.job.state() {
            JobState::Succeeded => table.totals.succeeded += 1,
            JobState::Incomplete => table.totals.incomplete += 1,
            JobState::Failed => table.totals.failed += 1,
            JobState::Running => {}
        }
    }
}
