//! `AttachError`: what can go wrong taking another process's guest_memfd into this one.

use std::io;

use crate::memory::MemoryError;

/// A failed step of attaching to, or surveying, another process's guest memory.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The PID names no process (or it exited while we looked).
    #[error("no process with PID {pid}: check the PID (is the VMM still running?)")]
    NoSuchProcess {
        /// The PID given.
        pid: u32,
    },
    /// The kernel refused this user access to the process's descriptors.
    #[error(
        "no ptrace rights over process {pid} ({operation} was refused): run gmemctl as root, \
         keeping CAP_SYS_PTRACE, to reach another process's guest_memfd"
    )]
    NoPtraceRights {
        /// The PID given.
        pid: u32,
        /// What was refused, e.g. "pidfd_getfd of its fd 5".
        operation: String,
        /// The cause (EPERM or EACCES).
        #[source]
        source: io::Error,
    },
    /// pidfd_open failed otherwise.
    #[error("pidfd_open of process {pid} failed")]
    PidfdOpen {
        /// The PID given.
        pid: u32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// /proc/PID/fd could not be read otherwise.
    #[error("cannot list the open files of process {pid} (/proc/{pid}/fd)")]
    ListFds {
        /// The PID given.
        pid: u32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// pidfd_getfd failed otherwise.
    #[error("pidfd_getfd of fd {fd} of process {pid} failed")]
    GetFd {
        /// The PID given.
        pid: u32,
        /// The descriptor number in that process.
        fd: i32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// fstat of the duplicate failed.
    #[error("fstat of the guest_memfd taken from fd {fd} of process {pid} failed")]
    Stat {
        /// The PID given.
        pid: u32,
        /// The descriptor number in that process.
        fd: i32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// mmap of the duplicate failed for a reason other than "not host-mappable".
    #[error("mmap of the guest_memfd from fd {fd} of process {pid} ({size} bytes) failed")]
    Map {
        /// The PID given.
        pid: u32,
        /// The descriptor number in that process.
        fd: i32,
        /// The gmem's size.
        size: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// /proc/PID/maps could not be read.
    #[error("cannot read the memory maps of process {pid} (/proc/{pid}/maps)")]
    ReadMaps {
        /// The PID given.
        pid: u32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Finding the pages of the gmem failed.
    #[error("cannot find the pages of the guest_memfd from fd {fd} of process {pid}")]
    Survey {
        /// The PID given.
        pid: u32,
        /// The descriptor number in that process.
        fd: i32,
        /// The cause.
        #[source]
        source: MemoryError,
    },
}

impl AttachError {
    /// Whether the user can fix this (wrong PID, missing rights), as opposed to a fault.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            AttachError::NoSuchProcess { .. } | AttachError::NoPtraceRights { .. }
        )
    }
}
