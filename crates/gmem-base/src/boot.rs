//! Calls an init process makes: mounting a filesystem, restarting the machine.
//!
//! gmem-lab's agent runs as /init of a Linux guest under the microVM, where nothing else
//! mounts /proc or ends the run.

use std::ffi::CStr;
use std::io;

/// Mounts `source` of type `fstype` on `target`, no flags and no options (`mount(2)`),
/// e.g. `mount(c"proc", c"/proc", c"proc")`.
pub fn mount(source: &CStr, target: &CStr, fstype: &CStr) -> io::Result<()> {
    // SAFETY: the three strings are NUL-terminated and outlive the call; data may be null.
    syscall!(mount(
        source.as_ptr(),
        target.as_ptr(),
        fstype.as_ptr(),
        0,
        std::ptr::null()
    ))?;
    Ok(())
}

/// Restarts the machine at once (`reboot(RB_AUTOBOOT)`): no sync, no shutdown. Returns
/// only on failure (without CAP_SYS_BOOT: EPERM).
pub fn reboot() -> io::Result<()> {
    // SAFETY: reboot takes a plain integer command and touches no memory of ours.
    syscall!(reboot(libc::RB_AUTOBOOT))?;
    Ok(())
}
