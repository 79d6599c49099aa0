//! Reaching into another process: pidfd_open(2) and pidfd_getfd(2).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// A descriptor that refers to process `pid` (`pidfd_open(2)`, Linux 5.3+). It stays valid
/// if the process exits and its PID is reused, so calls made through it reach the process
/// it was opened for, or fail with ESRCH.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: plain integer arguments; the kernel returns a new descriptor or -1.
    let raw = syscall!(syscall(libc::SYS_pidfd_open, pid, 0))?;
    // SAFETY: `raw` is a descriptor the call above just created; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
}

/// A duplicate, in this process, of descriptor `target_fd` of the process behind `pidfd`
/// (`pidfd_getfd(2)`, Linux 5.6+). It shares the open file description with the
/// original. The kernel requires ptrace-attach rights over the process (EPERM otherwise).
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, target_fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain integer arguments on a pidfd we borrow for the call; flags must be 0.
    let raw = syscall!(syscall(
        libc::SYS_pidfd_getfd,
        pidfd.as_raw_fd(),
        target_fd,
        0
    ))?;
    // SAFETY: `raw` is a descriptor the call above just installed here; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
}

/// Sends signal `signum` to the process behind `pidfd` (`pidfd_send_signal(2)`, Linux
/// 5.1+): unlike kill(2), it cannot reach another process that has reused the PID.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signum: i32) -> io::Result<()> {
    // SAFETY: plain integer arguments on a pidfd we borrow for the call; a null siginfo
    // makes the kernel fill in the same information kill(2) would; flags must be 0.
    syscall!(syscall(
        libc::SYS_pidfd_send_signal,
        pidfd.as_raw_fd(),
        signum,
        std::ptr::null::<libc::siginfo_t>(),
        0
    ))?;
    Ok(())
}
