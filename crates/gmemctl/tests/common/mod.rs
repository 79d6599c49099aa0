//! Helpers the gmemctl end-to-end tests share: run the binary, read its output, judge a user
//! error, run a VM (`gmemctl run`) or the test VMM (gmem-test-holder) as a child process,
//! and look at a VMM's guest memory from outside. Each test binary uses a subset, hence the
//! allowance below.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Runs the gmemctl under test with `args` and waits for it.
pub fn gmemctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gmemctl"))
        .args(args)
        .output()
        .expect("gmemctl runs")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Its stdout as JSON; panics with both streams if it is not.
pub fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            stderr(out)
        )
    })
}

/// A user error: exit code 2, a sentence naming the cause, no panic or backtrace.
pub fn assert_user_error(out: &Output, needle: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(
        err.contains(needle),
        "stderr {err:?} should contain {needle:?}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
}

/// A private temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("gmemctl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `gmemctl run` child process; killed if the test ends without stopping it.
pub struct RunningVm {
    child: Child,
    sock: PathBuf,
    pub pid: u32,
}

impl RunningVm {
    /// Starts `gmemctl run ARGS --api-sock SOCK` and waits for its pid and socket lines.
    pub fn start(sock: &Path, args: &[&str]) -> RunningVm {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gmemctl"))
            .arg("run")
            .args(args)
            .arg("--api-sock")
            .arg(sock)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("gmemctl run starts");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let line = |child: &mut Child, stdout: &mut BufReader<ChildStdout>| {
            let mut line = String::new();
            if stdout.read_line(&mut line).unwrap() == 0 {
                let _ = child.wait();
                let mut err = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("gmemctl run ended before it was ready: {err}");
            }
            line.trim().to_owned()
        };
        let pid_line = line(&mut child, &mut stdout);
        let sock_line = line(&mut child, &mut stdout);
        let pid: u32 = pid_line
            .strip_prefix("pid: ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {pid_line:?}"));
        assert_eq!(pid, child.id());
        assert_eq!(sock_line, format!("api-sock: {}", sock.display()));
        RunningVm {
            child,
            sock: sock.to_owned(),
            pid,
        }
    }

    pub fn sock(&self) -> &str {
        self.sock.to_str().unwrap()
    }

    /// Sends SIGTERM and waits (at most a minute) for the exit; returns code and stderr.
    pub fn terminate(mut self) -> (Option<i32>, String) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "gmemctl run did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
        (status.code(), err)
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The test VMM of tests/bin/gmem_test_holder.rs, running until dropped.
pub struct Holder {
    pub child: Child,
    /// Held open: the holder exits when it closes.
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// What it reported once its guest had written its pages.
    pub ready: Value,
}

impl Holder {
    pub fn start() -> Holder {
        Self::start_with(&[])
    }

    /// Starts it with extra environment variables.
    pub fn start_with(env: &[(&str, &str)]) -> Holder {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gmem-test-holder"))
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("gmem-test-holder starts");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let report: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
            let status = child.wait();
            panic!("gmem-test-holder did not get ready ({e}, {status:?}): {line:?}")
        });
        Holder {
            stdin: child.stdin.take(),
            stdout,
            ready: report["ready"].clone(),
            child,
        }
    }

    pub fn pid(&self) -> String {
        self.ready["pid"].to_string()
    }

    /// Asks the holder's guest to verify every word it wrote (a verify-only pass on each
    /// vCPU); returns the mismatches the guest counted.
    pub fn guest_mismatches(&mut self) -> u64 {
        use std::io::Write;
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "verify").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let answer: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("gmem-test-holder answered {line:?} ({e})"));
        answer["verified"]["mismatches"]
            .as_u64()
            .unwrap_or_else(|| panic!("no mismatch count in {answer}"))
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if self.child.wait().is_err() {
            let _ = self.child.kill();
        }
    }
}

/// One page of a guest_memfd, as seen from outside the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageSeen {
    /// Its page frame number.
    pub pfn: u64,
    /// Its bytes, if they were asked for.
    pub bytes: Option<Vec<u8>>,
}

/// Every page of each host-mappable guest_memfd of a VMM, by inode: `None` where no page
/// is resident.
pub type View = std::collections::BTreeMap<u64, Vec<Option<PageSeen>>>;

/// The [`View`] of process `pid` now, with the pages' bytes if `with_bytes`. Taken with
/// pidfd_getfd and this process's own mapping, and let go (the descriptors closed, the
/// mappings gone) before it returns, so that no other process holds the VMM's memory
/// afterwards.
pub fn outside_view(
    pid: u32,
    with_bytes: bool,
) -> std::collections::BTreeMap<u64, Vec<Option<PageSeen>>> {
    use gmem::memory::{AttachedGmem, page_size};
    let page = page_size() as usize;
    let pagemap = gmem::numa::Pagemap::open_self().unwrap();
    let mut view = std::collections::BTreeMap::new();
    for gmem in AttachedGmem::attach_all(pid, None).unwrap() {
        let Ok(mapped) = gmem.mapped() else { continue };
        let map = mapped.mapping().unwrap();
        let resident = map.resident_pages(0, map.len()).unwrap();
        // Map the resident pages here (this allocates nothing), so pagemap shows frames.
        for (index, _) in resident.iter().enumerate().filter(|(_, r)| **r) {
            map.populate_read(index * page, page).unwrap();
        }
        let pfns = pagemap.pfns(map.addr() as u64, resident.len()).unwrap();
        let pages = resident
            .iter()
            .zip(pfns)
            .enumerate()
            .map(|(index, (&resident, pfn))| {
                resident.then(|| PageSeen {
                    pfn: pfn.expect("a resident page just mapped has a frame"),
                    bytes: with_bytes.then(|| {
                        let mut bytes = vec![0u8; page];
                        map.read(index * page, &mut bytes);
                        bytes
                    }),
                })
            })
            .collect();
        view.insert(gmem.inode(), pages);
    }
    view
}

/// The scheduler state letters of every thread of process `pid`.
pub fn thread_states(pid: u32) -> Vec<char> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|entry| std::fs::read_to_string(entry.unwrap().path().join("stat")).ok())
        .filter_map(|stat| {
            let after = &stat[stat.rfind(')')? + 1..];
            after.split_whitespace().next()?.chars().next()
        })
        .collect()
}

/// Whether every thread of process `pid` is stopped by a signal.
pub fn is_stopped(pid: u32) -> bool {
    let states = thread_states(pid);
    !states.is_empty() && states.iter().all(|&s| s == 'T')
}

/// A cgroup v2 directory for one test, removed (after its processes move back to the
/// parent) on drop.
pub struct OwnCgroup {
    pub path: PathBuf,
    parent: PathBuf,
}

impl OwnCgroup {
    /// A new cgroup holding process `pid`, or the reason this host cannot give one.
    pub fn for_process(pid: u32, name: &str) -> Result<OwnCgroup, String> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mount = mountinfo
            .lines()
            .find_map(|line| {
                let (mount, fs) = line.split_once(" - ")?;
                (fs.split_whitespace().next()? == "cgroup2")
                    .then(|| mount.split_whitespace().nth(4))?
            })
            .ok_or("no cgroup v2 hierarchy is mounted")?;
        let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let own = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or("the process is in no cgroup v2")?;
        let parent = PathBuf::from(mount).join(own.trim_start_matches('/'));
        let path = parent.join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir(&path).map_err(|e| format!("mkdir {}: {e}", path.display()))?;
        let cgroup = OwnCgroup { path, parent };
        std::fs::write(cgroup.path.join("cgroup.procs"), pid.to_string())
            .map_err(|e| format!("moving {pid} into {}: {e}", cgroup.path.display()))?;
        Ok(cgroup)
    }
}

impl Drop for OwnCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path.join("cgroup.freeze"), "0");
        if let Ok(procs) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(self.parent.join("cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}
