//! Scheduler calls: CPU affinity, nice values and policies of this process's threads.

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
    let tid = current_thread_id();
    // SAFETY: plain integer arguments.
    syscall!(setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice))?;
    Ok(())
}

/// A thread of this process, as the kernel numbers it (`gettid(2)`).
pub type ThreadId = libc::pid_t;

/// The calling thread's id.
pub fn current_thread_id() -> ThreadId {
    // SAFETY: gettid has no arguments and no memory effects.
    unsafe { libc::gettid() }
}

/// Puts thread `tid` of this process under `SCHED_IDLE` (`idle`), or back under
/// `SCHED_OTHER` with the nice value it had (`sched_setscheduler(2)` on a thread id acts on
/// that one thread).
///
/// Why it is the tool for background work during a guest stop: a waking `SCHED_OTHER`
/// thread preempts a `SCHED_IDLE` one at once, whereas between two `SCHED_OTHER` threads,
/// nice values notwithstanding, EEVDF lets the running one finish its slice (1.5 ms with 2
/// CPUs), and a 4 ms tick may pass before that is noticed.
pub fn set_thread_idle(tid: ThreadId, idle: bool) -> io::Result<()> {
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a live sched_param; priority 0 is the only one these policies take.
    syscall!(sched_setscheduler(tid, policy, &param))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A field of this thread's /proc/thread-self/sched ("policy").
    fn sched_field(name: &str) -> u64 {
        let text = std::fs::read_to_string("/proc/thread-self/sched").unwrap();
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} in {text}"));
        line.rsplit(':').next().unwrap().trim().parse().unwrap()
    }

    #[test]
    fn a_thread_steps_aside_and_back_with_its_nice_value() {
        std::thread::spawn(|| {
            set_current_thread_nice(7).unwrap();
            let me = current_thread_id();
            set_thread_idle(me, true).unwrap();
            assert_eq!(sched_field("policy"), libc::SCHED_IDLE as u64);
            set_thread_idle(me, false).unwrap();
            assert_eq!(sched_field("policy"), libc::SCHED_OTHER as u64);
            // SAFETY: plain integer arguments; errno is not consulted.
            let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, me as libc::id_t) };
            assert_eq!(nice, 7);
        })
        .join()
        .unwrap();
    }
}
