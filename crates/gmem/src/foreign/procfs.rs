//! What /proc and the cgroup v2 file system say about a process: its threads' scheduler
//! states, its start time, and its cgroup.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The scheduler state letter of every thread of process `pid` (/proc/PID/task/*/stat),
/// by thread id. A thread that exits while the directory is read is left out.
pub(crate) fn thread_states(pid: u32) -> io::Result<Vec<(u32, char)>> {
    let mut states = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let Some(tid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        match fs::read_to_string(entry.path().join("stat")) {
            Ok(stat) => {
                if let Some(state) = stat_field(&stat, 3).and_then(|s| s.chars().next()) {
                    states.push((tid, state));
                }
            }
            // A thread that exits between readdir and read: ENOENT, or ESRCH once it is
            // being reaped.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => {
            }
            Err(e) => return Err(e),
        }
    }
    Ok(states)
}

/// Whether a thread in `state` cannot run: stopped by a signal (T), stopped by a tracer
/// (t), or already gone (Z, X).
pub(crate) fn is_stopped_state(state: char) -> bool {
    matches!(state, 'T' | 't' | 'Z' | 'X')
}

/// When process `pid` started, in clock ticks since boot (/proc/PID/stat field 22): with
/// the PID it names one process for as long as the host runs, PID reuse or not.
pub(crate) fn start_time(pid: u32) -> io::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    stat_field(&stat, 22)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc/PID/stat"))
}

/// Field `n` (1-based, as proc(5) numbers them) of a stat line. The command name, field 2,
/// is in parentheses and may itself hold spaces and parentheses, so fields are counted
/// from the last ')'.
fn stat_field(stat: &str, n: usize) -> Option<&str> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(n.checked_sub(3)?)
}

/// The cgroup v2 path of process `pid` ("/machine/vm1"), from the "0::" line of
/// /proc/PID/cgroup; `None` on a host without the unified hierarchy.
pub(crate) fn cgroup_v2_path(pid: u32) -> io::Result<Option<String>> {
    cgroup_v2_path_of(&format!("/proc/{pid}/cgroup"))
}

/// The same for one thread.
pub(crate) fn thread_cgroup_v2_path(pid: u32, tid: u32) -> io::Result<Option<String>> {
    cgroup_v2_path_of(&format!("/proc/{pid}/task/{tid}/cgroup"))
}

fn cgroup_v2_path_of(file: &str) -> io::Result<Option<String>> {
    let text = fs::read_to_string(file)?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned))
}

/// Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on
/// a hybrid host), from /proc/self/mountinfo.
pub(crate) fn cgroup2_mount() -> io::Result<Option<PathBuf>> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text.lines().find_map(|line| {
        // "36 25 0:30 / /sys/fs/cgroup rw,... shared:9 - cgroup2 cgroup2 rw"
        let (mount, fs) = line.split_once(" - ")?;
        (fs.split_whitespace().next()? == "cgroup2")
            .then(|| mount.split_whitespace().nth(4).map(unescape_octal))?
            .map(PathBuf::from)
    }))
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape_octal(field: &str) -> String {
    let mut out = String::new();
    let mut rest = field;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 4);
        match code.and_then(|c| u8::from_str_radix(c, 8).ok()) {
            Some(byte) => {
                out.push(byte as char);
                rest = &rest[at + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The PIDs in a cgroup's cgroup.procs.
pub(crate) fn cgroup_procs(cgroup: &Path) -> io::Result<Vec<u32>> {
    Ok(fs::read_to_string(cgroup.join("cgroup.procs"))?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

/// Whether any cgroup below `cgroup` holds a process.
pub(crate) fn descendants_populated(cgroup: &Path) -> io::Result<bool> {
    for entry in fs::read_dir(cgroup)? {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let child = entry.path();
        if !cgroup_procs(&child)?.is_empty() || descendants_populated(&child)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The value of `key` in a cgroup's cgroup.events ("frozen", "populated").
pub(crate) fn cgroup_event(cgroup: &Path, key: &str) -> io::Result<Option<u64>> {
    let text = fs::read_to_string(cgroup.join("cgroup.events"))?;
    Ok(text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_count_from_the_end_of_the_command_name() {
        let stat = "4242 (vcpu 0) (x)) T 1 4242 4242 0 -1 4194560 0 0 0 0 1 2 0 0 20 0 5 0 98765 0";
        assert_eq!(stat_field(stat, 3), Some("T"));
        assert_eq!(stat_field(stat, 4), Some("1"));
        assert_eq!(stat_field(stat, 22), Some("98765"));
        assert_eq!(stat_field(stat, 2), None);
    }

    #[test]
    fn reads_this_process() {
        let states = thread_states(std::process::id()).unwrap();
        assert!(!states.is_empty());
        // The thread running this test is running.
        assert!(states.iter().any(|&(_, s)| s == 'R'), "{states:?}");
        assert!(start_time(std::process::id()).unwrap() > 0);
        assert!(is_stopped_state('T') && is_stopped_state('t') && !is_stopped_state('S'));
    }

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape_octal("/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape_octal("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_octal("/x\\"), "/x\\");
    }
}
