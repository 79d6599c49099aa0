//! `Quiesce`: how the engine stops every accessor of guest memory, supplied by its owner.
//!
//! The engine knows nothing of vCPUs. A VMM implements this for its vCPU and device threads;
//! tests implement it for writer threads. The engine only ever holds a [`Paused`] guard, so
//! every exit path — success, error or panic — resumes the guest.

use std::time::{Duration, Instant};

use crate::memory::GuestAddress;

/// Why accessors could not be paused or resumed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct QuiesceError(pub String);

/// Stops and restarts everything that touches guest memory.
pub trait Quiesce: Send + Sync {
    /// Returns once no accessor runs or will run until [`resume`](Quiesce::resume).
    fn pause(&self) -> Result<(), QuiesceError>;
    /// Lets the accessors run again.
    fn resume(&self) -> Result<(), QuiesceError>;
    /// Called while paused, once guest-physical `gpa..gpa+len` has new backing (a remapped
    /// chunk): an accessor that can map it ahead of its own faults does so now, so that the
    /// guest resumes without a stage-2 fault storm there. Returns whether it did.
    fn prefault(&self, _gpa: GuestAddress, _len: u64) -> bool {
        false
    }
}

/// For memory nobody else touches (offline guests, benchmarks of the bare mechanism).
#[derive(Debug, Default, Clone, Copy)]
pub struct NothingToQuiesce;

impl Quiesce for NothingToQuiesce {
    fn pause(&self) -> Result<(), QuiesceError> {
        Ok(())
    }
    fn resume(&self) -> Result<(), QuiesceError> {
        Ok(())
    }
}

/// A paused guest; resumes on drop. Measures how long the guest was stopped.
#[derive(Debug)]
pub struct Paused<'a, Q: Quiesce + ?Sized> {
    quiesce: &'a Q,
    started: Instant,
    /// How long the pause request took to be granted: the fixed cost of every stop.
    entry: Duration,
    resumed: bool,
}

impl<'a, Q: Quiesce + ?Sized> Paused<'a, Q> {
    /// Pauses the guest. The stop is timed from before the pause request.
    pub fn new(quiesce: &'a Q) -> Result<Self, QuiesceError> {
        let started = Instant::now();
        quiesce.pause()?;
        Ok(Paused {
            quiesce,
            started,
            entry: started.elapsed(),
            resumed: false,
        })
    }

    /// How long the pause took to be granted (a vCPU kick, every thread of a foreign VMM
    /// seen stopped): the part of the stop no smaller batch makes shorter.
    pub fn entry(&self) -> Duration {
        self.entry
    }

    /// Resumes the guest and returns how long it was stopped: from the pause request to
    /// the resume request. (Whatever the resume call costs the caller afterwards, such as
    /// waiting to be scheduled again once the vCPUs run, is not guest stop time.)
    pub fn resume(mut self) -> Result<Duration, QuiesceError> {
        self.resumed = true;
        let stopped = self.started.elapsed();
        self.quiesce.resume()?;
        Ok(stopped)
    }
}

impl<Q: Quiesce + ?Sized> Drop for Paused<'_, Q> {
    fn drop(&mut self) {
        if !self.resumed {
            // An error path: resume anyway; there is nobody left to report a failure to.
            let _ = self.quiesce.resume();
        }
    }
}
