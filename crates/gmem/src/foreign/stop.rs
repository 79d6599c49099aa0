//! `VmmStop`: stops and resumes every thread of another process — with the cgroup v2
//! freezer where the process has a cgroup of its own, else with SIGSTOP and SIGCONT — and
//! confirms each stop from /proc before anything touches its memory.

use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::procfs;
use crate::migrate::{Quiesce, QuiesceError};
use crate::sys::pidfd;

/// Longest a stop may take to show in /proc before it counts as failed (and is undone).
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// First pause between two looks at the threads; doubled up to [`MAX_POLL`]. Spinning
/// would take the CPU from the very threads that must run to reach their stop.
const FIRST_POLL: Duration = Duration::from_micros(10);
const MAX_POLL: Duration = Duration::from_micros(100);

/// How the process is stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum StopMethod {
    /// The cgroup v2 freezer of the process's own cgroup (`cgroup.freeze`): a SIGCONT
    /// from anyone else cannot end the stop.
    Freezer {
        /// The cgroup's directory.
        cgroup: PathBuf,
    },
    /// SIGSTOP to the process, SIGCONT to resume it.
    Signal,
}

impl std::fmt::Display for StopMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopMethod::Freezer { cgroup } => {
                write!(f, "cgroup v2 freezer of {}", cgroup.display())
            }
            StopMethod::Signal => f.write_str("SIGSTOP/SIGCONT"),
        }
    }
}

/// The state the process was in when gmemctl came: it is left in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FoundState {
    /// Running: gmemctl stops it for each batch and resumes it after.
    Running,
    /// Every thread stopped (SIGSTOP, or a tracer): gmemctl never resumes it.
    Stopped,
    /// Its cgroup frozen: gmemctl never thaws it.
    Frozen,
}

/// A failed stop or resume of another process.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    /// The process is gone.
    #[error("process {pid} is gone")]
    Gone {
        /// The process.
        pid: u32,
    },
    /// pidfd_open failed.
    #[error("pidfd_open of process {pid} failed")]
    PidfdOpen {
        /// The process.
        pid: u32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// /proc or the cgroup file system could not be read.
    #[error("cannot read {what} of process {pid}")]
    ReadProc {
        /// The process.
        pid: u32,
        /// What, e.g. "/proc/PID/task".
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Some of the threads are stopped and some are not: someone else is stopping or
    /// tracing it.
    #[error(
        "process {pid} is partly stopped ({stopped} of {threads} threads): something else is \
         stopping or tracing it; let it finish, then try again"
    )]
    PartlyStopped {
        /// The process.
        pid: u32,
        /// Stopped threads.
        stopped: usize,
        /// All threads.
        threads: usize,
    },
    /// pidfd_send_signal failed.
    #[error("sending {signal} to process {pid} failed")]
    Signal {
        /// The process.
        pid: u32,
        /// "SIGSTOP" or "SIGCONT".
        signal: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing cgroup.freeze failed.
    #[error("writing {value} to {}/cgroup.freeze failed", cgroup.display())]
    Freeze {
        /// The cgroup.
        cgroup: PathBuf,
        /// "1" or "0".
        value: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The stop did not show in time; it was undone.
    #[error(
        "process {pid} did not stop within {timeout_ms} ms ({method}; {running} threads still \
         running); it was resumed"
    )]
    NotStopped {
        /// The process.
        pid: u32,
        /// How it was stopped.
        method: StopMethod,
        /// Threads not stopped at the deadline.
        running: usize,
        /// The deadline, ms.
        timeout_ms: u64,
    },
    /// A process that was stopped before gmemctl came runs again: someone resumed it.
    #[error(
        "process {pid} was {was} when gmemctl came and now runs: something resumed it while \
         gmemctl worked on its memory"
    )]
    ResumedBehindOurBack {
        /// The process.
        pid: u32,
        /// "stopped" or "frozen".
        was: &'static str,
    },
}

/// Stops and resumes all threads of one process (a VMM), leaving it as it was found: a
/// process found stopped or frozen is checked, never resumed. A [`Quiesce`].
#[derive(Debug)]
pub struct VmmStop {
    pid: u32,
    /// Signals go through it, so they cannot reach another process that reuses the PID.
    pidfd: OwnedFd,
    method: StopMethod,
    found: FoundState,
}

impl VmmStop {
    /// Looks at process `pid`: how it can be stopped, and the state it is in now.
    pub fn new(pid: u32) -> Result<Self, StopError> {
        let pidfd = pidfd::pidfd_open(pid).map_err(|source| match source.raw_os_error() {
            Some(libc::ESRCH) => StopError::Gone { pid },
            _ => StopError::PidfdOpen { pid, source },
        })?;
        let method = choose_method(pid)?;
        let mut stop = VmmStop {
            pid,
            pidfd,
            method,
            found: FoundState::Running,
        };
        stop.found = if stop.frozen()? {
            FoundState::Frozen
        } else {
            let (stopped, threads) = stop.stopped_threads()?;
            match stopped {
                0 => FoundState::Running,
                n if n == threads => FoundState::Stopped,
                _ => {
                    return Err(StopError::PartlyStopped {
                        pid,
                        stopped,
                        threads,
                    });
                }
            }
        };
        Ok(stop)
    }

    /// A stopper that resumes process `pid` the way `method` stopped it, whatever state it
    /// is in now: for recovery, whose journal says that a gmemctl stopped a process it had
    /// found running.
    pub(crate) fn resuming(pid: u32, method: StopMethod) -> Result<Self, StopError> {
        let pidfd = pidfd::pidfd_open(pid).map_err(|source| match source.raw_os_error() {
            Some(libc::ESRCH) => StopError::Gone { pid },
            _ => StopError::PidfdOpen { pid, source },
        })?;
        Ok(VmmStop {
            pid,
            pidfd,
            method,
            found: FoundState::Running,
        })
    }

    /// The process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// How it is stopped.
    pub fn method(&self) -> &StopMethod {
        &self.method
    }

    /// The state it was found in, and is left in.
    pub fn found(&self) -> FoundState {
        self.found
    }

    /// Stops every thread and returns once /proc (or cgroup.events) shows them stopped.
    /// For a process found stopped or frozen, only checks that it still is.
    pub fn stop(&self) -> Result<(), StopError> {
        match (self.found, &self.method) {
            (FoundState::Stopped, _) => self.check_still(FoundState::Stopped),
            (FoundState::Frozen, _) => self.check_still(FoundState::Frozen),
            (FoundState::Running, StopMethod::Signal) => {
                self.signal(libc::SIGSTOP, "SIGSTOP")?;
                self.wait_stopped().inspect_err(|_| {
                    let _ = self.signal(libc::SIGCONT, "SIGCONT");
                })
            }
            (FoundState::Running, StopMethod::Freezer { cgroup }) => {
                write_freeze(cgroup, "1")?;
                self.wait_stopped().inspect_err(|_| {
                    let _ = write_freeze(cgroup, "0");
                })
            }
        }
    }

    /// Lets the threads run again — unless the process was found stopped or frozen.
    pub fn resume(&self) -> Result<(), StopError> {
        match (self.found, &self.method) {
            (FoundState::Stopped | FoundState::Frozen, _) => Ok(()),
            (FoundState::Running, StopMethod::Signal) => self.signal(libc::SIGCONT, "SIGCONT"),
            (FoundState::Running, StopMethod::Freezer { cgroup }) => write_freeze(cgroup, "0"),
        }
    }

    /// Whether every thread is stopped now (or, with the freezer, the cgroup frozen).
    pub fn is_stopped(&self) -> Result<bool, StopError> {
        if self.frozen()? {
            return Ok(true);
        }
        let (stopped, threads) = self.stopped_threads()?;
        Ok(stopped == threads)
    }

    fn check_still(&self, found: FoundState) -> Result<(), StopError> {
        let still = match found {
            FoundState::Frozen => self.frozen()?,
            _ => self.is_stopped()?,
        };
        if still {
            Ok(())
        } else {
            Err(StopError::ResumedBehindOurBack {
                pid: self.pid,
                was: if found == FoundState::Frozen {
                    "frozen"
                } else {
                    "stopped"
                },
            })
        }
    }

    fn signal(&self, signum: i32, signal: &'static str) -> Result<(), StopError> {
        pidfd::pidfd_send_signal(self.pidfd.as_fd(), signum).map_err(|source| {
            match source.raw_os_error() {
                Some(libc::ESRCH) => StopError::Gone { pid: self.pid },
                _ => StopError::Signal {
                    pid: self.pid,
                    signal,
                    source,
                },
            }
        })
    }

    /// Whether the process's own cgroup is frozen (cgroup.events "frozen 1"); false when
    /// it is stopped with signals.
    fn frozen(&self) -> Result<bool, StopError> {
        let StopMethod::Freezer { cgroup } = &self.method else {
            return Ok(false);
        };
        procfs::cgroup_event(cgroup, "frozen")
            .map(|v| v == Some(1))
            .map_err(|source| {
                self.read_failed(format!("{}/cgroup.events", cgroup.display()), source)
            })
    }

    /// (stopped threads, all threads), from /proc/PID/task/*/stat.
    fn stopped_threads(&self) -> Result<(usize, usize), StopError> {
        let states = procfs::thread_states(self.pid).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                StopError::Gone { pid: self.pid }
            } else {
                self.read_failed(format!("/proc/{}/task", self.pid), source)
            }
        })?;
        if states.is_empty() {
            return Err(StopError::Gone { pid: self.pid });
        }
        let stopped = states
            .iter()
            .filter(|&&(_, s)| procfs::is_stopped_state(s))
            .count();
        Ok((stopped, states.len()))
    }

    fn wait_stopped(&self) -> Result<(), StopError> {
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut poll = FIRST_POLL;
        loop {
            let done = match &self.method {
                StopMethod::Freezer { .. } => self.frozen()?,
                StopMethod::Signal => {
                    let (stopped, threads) = self.stopped_threads()?;
                    stopped == threads
                }
            };
            if done {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let (stopped, threads) = self.stopped_threads()?;
                return Err(StopError::NotStopped {
                    pid: self.pid,
                    method: self.method.clone(),
                    running: threads - stopped,
                    timeout_ms: STOP_TIMEOUT.as_millis() as u64,
                });
            }
            std::thread::sleep(poll);
            poll = (poll * 2).min(MAX_POLL);
        }
    }

    fn read_failed(&self, what: String, source: io::Error) -> StopError {
        StopError::ReadProc {
            pid: self.pid,
            what,
            source,
        }
    }
}

impl Quiesce for VmmStop {
    fn pause(&self) -> Result<(), QuiesceError> {
        self.stop().map_err(|e| QuiesceError(sentence(&e)))
    }

    fn resume(&self) -> Result<(), QuiesceError> {
        VmmStop::resume(self).map_err(|e| QuiesceError(sentence(&e)))
    }
}

/// An error with its causes, as one line.
fn sentence(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        text += &format!(": {c}");
        cause = c.source();
    }
    text
}

/// The freezer of the process's cgroup if the cgroup is its own — not the root, holding
/// this process alone (every thread of it, no other process, nothing populated below) —
/// else signals. Freezing a shared cgroup would stop processes that have nothing to do
/// with the VMM.
fn choose_method(pid: u32) -> Result<StopMethod, StopError> {
    let read_failed = |what: &str, source: io::Error| StopError::ReadProc {
        pid,
        what: what.into(),
        source,
    };
    let Some(mount) =
        procfs::cgroup2_mount().map_err(|e| read_failed("/proc/self/mountinfo", e))?
    else {
        return Ok(StopMethod::Signal);
    };
    let path = match procfs::cgroup_v2_path(pid) {
        Ok(Some(path)) if path != "/" => path,
        Ok(_) => return Ok(StopMethod::Signal),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StopError::Gone { pid }),
        Err(e) => return Err(read_failed(&format!("/proc/{pid}/cgroup"), e)),
    };
    let cgroup = mount.join(path.trim_start_matches('/'));
    Ok(if cgroup_is_own(pid, &path, &cgroup) {
        StopMethod::Freezer { cgroup }
    } else {
        StopMethod::Signal
    })
}

/// Whether `cgroup` (at `path` in the hierarchy) holds process `pid` and nothing else.
/// Anything unreadable counts as "no": signals work everywhere.
fn cgroup_is_own(pid: u32, path: &str, cgroup: &Path) -> bool {
    let Ok(procs) = procfs::cgroup_procs(cgroup) else {
        return false;
    };
    if procs != [pid] || !cgroup.join("cgroup.freeze").exists() {
        return false;
    }
    if procfs::descendants_populated(cgroup).unwrap_or(true) {
        return false;
    }
    let Ok(threads) = procfs::thread_states(pid) else {
        return false;
    };
    threads.iter().all(|&(tid, _)| {
        procfs::thread_cgroup_v2_path(pid, tid).is_ok_and(|p| p.as_deref() == Some(path))
    })
}

fn write_freeze(cgroup: &Path, value: &'static str) -> Result<(), StopError> {
    fs::write(cgroup.join("cgroup.freeze"), value).map_err(|source| StopError::Freeze {
        cgroup: cgroup.to_owned(),
        value,
        source,
    })
}
