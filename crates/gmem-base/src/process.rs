//! Child-process setup that must run between fork and exec.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Runs in the forked child: asks the kernel to SIGKILL it when its parent dies.
fn set_parent_death_signal() -> io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag on the calling process.
    syscall!(prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
    Ok(())
}

/// Makes the children `cmd` spawns die (SIGKILL) when the thread that spawned them exits
/// (`prctl(PR_SET_PDEATHSIG)` in the child), so an interrupted supervisor never leaves
/// one behind. Spawn from a thread that lives as long as the child should.
pub fn kill_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: the hook runs in the child between fork and exec and only calls prctl,
    // which is async-signal-safe and touches no memory shared with the parent.
    unsafe { cmd.pre_exec(set_parent_death_signal) }
}

/// Kills this process at once with SIGKILL (`raise(3)`): no destructor, no flush, no exit
/// handler runs, as when an operator's `kill -9` lands. For crash-safety tests.
pub fn kill_this_process() -> ! {
    // SAFETY: raise has no memory-safety preconditions; SIGKILL cannot be caught, so the
    // process ends before the call returns.
    unsafe { libc::raise(libc::SIGKILL) };
    // Not reached; if it were, aborting is the nearest thing.
    std::process::abort()
}
