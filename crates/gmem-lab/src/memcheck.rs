//! The memcheck role: gmem-lab as /init of a Linux guest ("L2") that gmemctl's microVM boots
//! inside the lab, checking its own memory while the VMM moves it between nodes.
//!
//! It writes a pattern that depends on (word index, generation) over a buffer of anonymous
//! memory, reads it back and compares, sweep after sweep, and reports each sweep on the
//! console (`GMEMLAB-MEMCHECK ...` lines, which the `linux-guest` lab test reads).
//!
//! Settings come from the environment, where the kernel puts the unknown `key=value`
//! parameters of its command line: `gmemlab_role=memcheck`, `gmemlab_memcheck_mib` (default
//! 64) and `gmemlab_memcheck_sweeps` (0 or absent: forever).
//!
//! As PID 1 it never returns (PID 1 exiting panics the kernel): after the last sweep, or on
//! any error, it restarts the machine, which ends the VMM.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Write};
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use gmem::sys::boot;
use thiserror::Error;

/// Marker of every line the checker prints.
pub const MARKER: &str = "GMEMLAB-MEMCHECK";
/// Environment variable that selects this role.
pub const ROLE_VAR: &str = "gmemlab_role";
/// Value of [`ROLE_VAR`] that selects this role.
pub const ROLE: &str = "memcheck";
/// MiB of memory to check.
pub const MIB_VAR: &str = "gmemlab_memcheck_mib";
/// Sweeps to run before stopping (0 or absent: forever).
pub const SWEEPS_VAR: &str = "gmemlab_memcheck_sweeps";

const DEFAULT_MIB: u64 = 64;
/// More than the guests the lab boots can hold, so a typo fails clearly instead of OOM.
const MAX_MIB: u64 = 64 * 1024;
/// Mismatches printed per sweep; the rest are only counted.
const REPORTED_PER_SWEEP: u64 = 16;
const WORD: usize = std::mem::size_of::<u64>();

/// Why the checker cannot run.
#[derive(Debug, Error)]
pub enum MemcheckError {
    #[error("{name}={value:?} is not {what}")]
    Setting {
        name: &'static str,
        value: String,
        what: &'static str,
    },
    #[error("cannot allocate {mib} MiB")]
    Alloc { mib: u64 },
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Whether this process is the memory checker: started as `/init`, or with
/// `gmemlab_role=memcheck` in its environment.
pub fn wanted() -> bool {
    let argv0 = std::env::args_os().next();
    argv0.as_deref() == Some(OsStr::new("/init"))
        || std::env::var(ROLE_VAR).is_ok_and(|r| r == ROLE)
}

/// What to check, from the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub mib: u64,
    /// Stop after this many sweeps; `None`: never.
    pub sweeps: Option<u64>,
}

impl Settings {
    /// Reads the settings through `var` (the environment, or a map in tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Settings, MemcheckError> {
        let number = |name: &'static str, what| -> Result<Option<u64>, MemcheckError> {
            match var(name) {
                None => Ok(None),
                Some(value) => value
                    .trim()
                    .parse::<u64>()
                    .map(Some)
                    .map_err(|_| MemcheckError::Setting { name, value, what }),
            }
        };
        let mib = number(MIB_VAR, "a number of MiB")?.unwrap_or(DEFAULT_MIB);
        if mib == 0 || mib > MAX_MIB {
            return Err(MemcheckError::Setting {
                name: MIB_VAR,
                value: mib.to_string(),
                what: "between 1 and 65536 MiB",
            });
        }
        let sweeps = number(SWEEPS_VAR, "a number of sweeps")?.filter(|&n| n > 0);
        Ok(Settings { mib, sweeps })
    }
}

/// The word at `index` in sweep `generation`. An odd multiplier is a bijection on u64, so
/// every (index < 2^40, generation < 2^24) has its own value, never 0 for generation >= 1:
/// a word from another place, an older sweep or a fresh zero page never passes.
pub fn pattern(index: usize, generation: u64) -> u64 {
    (index as u64 | (generation << 40)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Writes sweep `generation`'s pattern over `words`.
pub fn write_pattern(words: &mut [u64], generation: u64) {
    for (i, w) in words.iter_mut().enumerate() {
        *w = pattern(i, generation);
    }
}

/// Compares `words` with sweep `generation`'s pattern; calls `on_mismatch(index, expected,
/// found)` for each wrong word and returns how many there were.
pub fn verify_pattern(
    words: &[u64],
    generation: u64,
    mut on_mismatch: impl FnMut(usize, u64, u64),
) -> u64 {
    let mut bad = 0;
    for (i, &found) in words.iter().enumerate() {
        let expected = pattern(i, generation);
        if found != expected {
            bad += 1;
            on_mismatch(i, expected, found);
        }
    }
    bad
}

/// The console: every line is written whole and flushed at once.
struct Console {
    out: Box<dyn Write>,
}

impl Console {
    fn line(&mut self, text: &str) {
        let line = format!("{MARKER} {text}\n");
        let _ = self.out.write_all(line.as_bytes());
        let _ = self.out.flush();
    }
}

/// Seconds since boot, from /proc/uptime.
fn uptime() -> String {
    fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// KiB the guest kernel has handed out (MemTotal - MemFree in /proc/meminfo): every such
/// page has been touched, so a VMM's guest memory holds at least this much.
fn used_kib() -> String {
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |key: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(key))?;
        line[key.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    match (kib("MemTotal:"), kib("MemFree:")) {
        (Some(total), Some(free)) => total.saturating_sub(free).to_string(),
        _ => "unknown".to_owned(),
    }
}

/// PID 1's setup: /proc for the uptime, and devtmpfs if the initramfs has no /dev/console
/// (then the kernel gave init no console, so the checker opens it itself).
fn init_setup(console: &mut Console) -> Result<(), MemcheckError> {
    if !Path::new("/proc/self").exists() {
        boot::mount(c"proc", c"/proc", c"proc").map_err(|source| MemcheckError::Mount {
            fstype: "proc",
            target: "/proc",
            source,
        })?;
    }
    if !Path::new("/dev/console").exists() {
        boot::mount(c"devtmpfs", c"/dev", c"devtmpfs").map_err(|source| MemcheckError::Mount {
            fstype: "devtmpfs",
            target: "/dev",
            source,
        })?;
        if let Ok(f) = File::options().write(true).open("/dev/console") {
            console.out = Box::new(f);
        }
    }
    Ok(())
}

/// Sweeps until the limit (forever without one). Returns the total mismatch count.
fn check(pid1: bool, console: &mut Console) -> Result<u64, MemcheckError> {
    if pid1 {
        init_setup(console)?;
    }
    let settings = Settings::from_vars(|name| std::env::var(name).ok())?;
    let len = usize::try_from(settings.mib << 20)
        .map_err(|_| MemcheckError::Alloc { mib: settings.mib })?;
    let mut words: Vec<u64> = Vec::new();
    words
        .try_reserve_exact(len / WORD)
        .map_err(|_| MemcheckError::Alloc { mib: settings.mib })?;
    words.resize(len / WORD, 0);
    let mut mismatches = 0;
    let mut sweep = 0u64;
    loop {
        sweep += 1;
        write_pattern(&mut words, sweep);
        // The verify pass must read memory back, not values the compiler remembers.
        std::hint::black_box(words.as_mut_slice());
        let mut reported = 0;
        let bad = verify_pattern(&words, sweep, |i, expected, found| {
            if reported < REPORTED_PER_SWEEP {
                reported += 1;
                console.line(&format!(
                    "MISMATCH sweep={sweep} offset={} expected={expected:#018x} found={found:#018x}",
                    i * WORD
                ));
            }
        });
        mismatches += bad;
        if sweep == 1 {
            console.line(&format!(
                "ready mib={} uptime={} used_kib={}",
                settings.mib,
                uptime(),
                used_kib()
            ));
        }
        if bad == 0 {
            console.line(&format!("sweep={sweep} ok"));
        } else {
            console.line(&format!("sweep={sweep} FAILED mismatches={bad}"));
        }
        if settings.sweeps == Some(sweep) {
            console.line(&format!("done sweeps={sweep} mismatches={mismatches}"));
            return Ok(mismatches);
        }
    }
}

/// Restarts the machine; never returns, whatever happens.
fn restart(console: &mut Console) -> ! {
    loop {
        if let Err(e) = boot::reboot() {
            console.line(&format!("error: reboot(RB_AUTOBOOT) failed: {e}"));
        }
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// Runs the checker. Not as PID 1 it exits 0 after the last sweep if nothing mismatched (1
/// otherwise, or on an error); as PID 1 it restarts the machine instead of returning.
pub fn main() -> ExitCode {
    let pid1 = std::process::id() == 1;
    let mut console = Console {
        out: Box::new(io::stdout()),
    };
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| check(pid1, &mut console)));
    let code = match outcome {
        Ok(Ok(0)) => ExitCode::SUCCESS,
        Ok(Ok(_)) => ExitCode::from(1),
        Ok(Err(e)) => {
            console.line(&format!("error: {}", crate::report::error_chain(&e)));
            ExitCode::from(1)
        }
        Err(_) => {
            console.line("error: the checker panicked");
            ExitCode::from(1)
        }
    };
    if pid1 {
        restart(&mut console);
    }
    code
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn patterns_differ_by_place_and_sweep_and_are_never_zero() {
        let mut seen = std::collections::HashSet::new();
        for generation in 1..=4 {
            for index in [0, 1, 2, 511, 512, (64 << 20) / WORD - 1] {
                let p = pattern(index, generation);
                assert_ne!(p, 0);
                assert!(seen.insert(p), "({index}, {generation}) repeats");
            }
        }
        assert_eq!(pattern(7, 3), pattern(7, 3));
    }

    #[test]
    fn verify_finds_each_wrong_word_with_its_offset() {
        let mut words = vec![0u64; 4096];
        write_pattern(&mut words, 5);
        assert_eq!(verify_pattern(&words, 5, |_, _, _| panic!("mismatch")), 0);

        // A flipped bit, a word from the previous sweep and a fresh zero page.
        words[10] ^= 1 << 17;
        words[600] = pattern(600, 4);
        words[4095] = 0;
        let mut found = Vec::new();
        let bad = verify_pattern(&words, 5, |i, expected, got| found.push((i, expected, got)));
        assert_eq!(bad, 3);
        assert_eq!(
            found,
            [
                (10, pattern(10, 5), pattern(10, 5) ^ (1 << 17)),
                (600, pattern(600, 5), pattern(600, 4)),
                (4095, pattern(4095, 5), 0),
            ]
        );
        // The whole buffer from the previous sweep: every word is wrong.
        write_pattern(&mut words, 4);
        assert_eq!(verify_pattern(&words, 5, |_, _, _| {}), 4096);
    }

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, MemcheckError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::from_vars(|name| map.get(name).cloned())
    }

    #[test]
    fn settings_come_from_the_kernel_command_line() {
        assert_eq!(
            settings(&[]).unwrap(),
            Settings {
                mib: 64,
                sweeps: None
            }
        );
        assert_eq!(
            settings(&[(MIB_VAR, "8"), (SWEEPS_VAR, "3")]).unwrap(),
            Settings {
                mib: 8,
                sweeps: Some(3)
            }
        );
        assert_eq!(settings(&[(SWEEPS_VAR, "0")]).unwrap().sweeps, None);
        for bad in [(MIB_VAR, "0"), (MIB_VAR, "64M"), (SWEEPS_VAR, "-1")] {
            assert!(settings(&[bad]).is_err(), "{bad:?} accepted");
        }
    }
}
