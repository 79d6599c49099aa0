//! gmem-base: the OS layer, and the only crate of the workspace with `unsafe`: one small,
//! checked wrapper per raw kernel call (KVM, mmap and madvise, mempolicy, pidfd, signals,
//! scheduling, process control), as crosvm's `base` is. gmem re-exports it as `gmem::sys`.
//!
//! Every wrapper has the same shape: one unsafe call, a `// SAFETY:` reason, a checked
//! return turned into `io::Error`, and a doc comment naming the kernel interface it wraps.
//! Nothing above this crate touches raw pointers or raw file descriptors.

/// Calls a `libc` function and turns a negative return into `io::Error::last_os_error()`.
///
/// The call site carries the `// SAFETY:` comment for the arguments it passes.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        #[allow(clippy::undocumented_unsafe_blocks)]
        // SAFETY: the macro only forwards arguments; each call site documents why they are valid.
        let ret = unsafe { libc::$fn($($arg),*) };
        if ret < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }};
}

pub mod boot;
pub mod kvm;
pub mod mempolicy;
pub mod mman;
pub mod pidfd;
pub mod process;
pub mod sched;
pub mod signal;
