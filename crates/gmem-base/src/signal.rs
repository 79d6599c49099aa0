//! vCPU kicks: a signal whose handler sets the interrupted thread's `kvm_run.immediate_exit`.
//!
//! The Firecracker way of stopping a vCPU thread within a bounded time. A pauser raises a
//! flag, then sends the kick signal to the vCPU thread. If the thread is inside `KVM_RUN`,
//! the signal makes it return `EINTR`. If the thread is in userspace, about to enter
//! `KVM_RUN` without having seen the flag, the handler sets `immediate_exit`, so that entry
//! returns `EINTR` at once instead of running the guest until its next exit.

use std::cell::Cell;
use std::io;
use std::marker::PhantomData;
use std::os::unix::thread::JoinHandleExt;
use std::ptr;
use std::sync::atomic::{Ordering, compiler_fence};
use std::thread::JoinHandle;

use kvm_ioctls::{VcpuExit, VcpuFd};

thread_local! {
    /// This thread's `kvm_run.immediate_exit` byte, while a [`KickableVcpu`] lives on it.
    /// `const`-initialised and destructor-free, so the signal handler may read it.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(ptr::null_mut()) };
}

/// The signal used to kick vCPU threads: the first real-time signal glibc leaves free.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

/// Runs on the kicked thread. Only async-signal-safe work: one thread-local read and one
/// volatile byte store.
extern "C" fn on_kick(_signum: i32, _info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    let immediate_exit = IMMEDIATE_EXIT.with(Cell::get);
    if !immediate_exit.is_null() {
        // SAFETY: a non-null pointer is only stored by `KickableVcpu::new` on this very
        // thread, and cleared by its `Drop` before the vCPU's kvm_run mapping goes away.
        unsafe { immediate_exit.write_volatile(1) };
        compiler_fence(Ordering::SeqCst);
    }
}

/// Installs the kick handler for `signum` process-wide (`sigaction(2)`). Idempotent.
///
/// Must run before the first kick: the default action of a real-time signal kills the
/// process. Threads that are not vCPUs ignore the kick.
pub fn install_kick_handler(signum: i32) -> io::Result<()> {
    // SAFETY: an all-zero sigaction is a valid value (empty mask, no flags, no handler).
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_kick as *const () as libc::sighandler_t;
    // No SA_RESTART: the point is to interrupt KVM_RUN (which never restarts anyway).
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action` is a fully initialised sigaction whose handler is async-signal-safe;
    // the old action is not asked for.
    syscall!(sigaction(signum, &action, ptr::null_mut()))?;
    Ok(())
}

/// Sends `signum` to the thread behind `thread` (`pthread_kill(3)`).
///
/// Taking the `JoinHandle` by reference is what makes this safe: a thread that has not been
/// joined keeps its pthread_t valid, even after it has returned.
pub fn kick_thread<T>(thread: &JoinHandle<T>, signum: i32) -> io::Result<()> {
    // SAFETY: the pthread_t is valid while the JoinHandle is alive (see above).
    let ret = unsafe { libc::pthread_kill(thread.as_pthread_t(), signum) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(ret))
    }
}

/// A vCPU bound to the current thread so that kicks reach its `immediate_exit`.
///
/// Owns the `VcpuFd` (and so its kvm_run mapping) for as long as the handler may write to
/// it, and is `!Send`, so it never leaves the thread whose thread-local points into it.
#[derive(Debug)]
pub struct KickableVcpu {
    vcpu: VcpuFd,
    immediate_exit: *mut u8,
    _stays_on_this_thread: PhantomData<*const ()>,
}

impl KickableVcpu {
    /// Binds `vcpu` to the calling thread. Fails if this thread already has one.
    pub fn new(mut vcpu: VcpuFd) -> io::Result<Self> {
        let immediate_exit: *mut u8 = &raw mut vcpu.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|slot| {
            if !slot.get().is_null() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "this thread already runs a kickable vCPU",
                ));
            }
            slot.set(immediate_exit);
            Ok(())
        })?;
        Ok(KickableVcpu {
            vcpu,
            immediate_exit,
            _stays_on_this_thread: PhantomData,
        })
    }

    /// `KVM_RUN`. Returns `EINTR` when a kick arrived.
    pub fn run(&mut self) -> Result<VcpuExit<'_>, kvm_ioctls::Error> {
        self.vcpu.run()
    }

    /// Clears `immediate_exit` after a kick, so the next `KVM_RUN` runs the guest again.
    pub fn clear_immediate_exit(&mut self) {
        self.vcpu.set_kvm_immediate_exit(0);
    }

    /// The vCPU, for the register and state ioctls (all of which take `&self`).
    pub fn fd(&self) -> &VcpuFd {
        &self.vcpu
    }
}

impl Drop for KickableVcpu {
    fn drop(&mut self) {
        // Unpublish before `vcpu` (and its kvm_run mapping) is dropped right after this.
        IMMEDIATE_EXIT.with(|slot| {
            if slot.get() == self.immediate_exit {
                slot.set(ptr::null_mut());
            }
        });
        compiler_fence(Ordering::SeqCst);
    }
}
