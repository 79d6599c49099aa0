//! Scheduler calls: pinning the calling thread to CPUs.

use std::io;

/// CPUs a mask can name (the kernel accepts any mask length that covers its nr_cpu_ids).
const MASK_WORDS: usize = 16;

/// Restricts the calling thread to `cpus` (`sched_setaffinity(2)`, pid 0 = this thread).
///
/// Used where page-frame reuse matters: freed pages go to per-CPU lists, so a thread that
/// stays on one CPU sees the same lists for the whole step.
pub fn set_affinity(cpus: &[usize]) -> io::Result<()> {
    let mut mask = [0u64; MASK_WORDS];
    for &cpu in cpus {
        let word = mask.get_mut(cpu / 64).ok_or(io::ErrorKind::InvalidInput)?;
        *word |= 1 << (cpu % 64);
    }
    // SAFETY: `mask` is a live buffer of exactly the size passed.
    syscall!(syscall(
        libc::SYS_sched_setaffinity,
        0,
        std::mem::size_of_val(&mask),
        mask.as_ptr()
    ))?;
    Ok(())
}

/// The CPUs the calling thread may run on (`sched_getaffinity(2)`).
pub fn affinity() -> io::Result<Vec<usize>> {
    let mut mask = [0u64; MASK_WORDS];
    // SAFETY: `mask` is a writable buffer of exactly the size passed.
    syscall!(syscall(
        libc::SYS_sched_getaffinity,
        0,
        std::mem::size_of_val(&mask),
        mask.as_mut_ptr()
    ))?;
    Ok((0..MASK_WORDS * 64)
        .filter(|&cpu| mask[cpu / 64] & (1 << (cpu % 64)) != 0)
        .collect())
}

/// Sets the calling thread's nice value (`setpriority(PRIO_PROCESS, gettid(), nice)`):
/// on Linux niceness is per thread, so background work can yield to vCPU threads.
pub fn set_current_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: gettid has no arguments and no memory effects.
    let tid = unsafe { libc::gettid() };
    // SAFETY: plain integer arguments.
    syscall!(setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice))?;
    Ok(())
}
