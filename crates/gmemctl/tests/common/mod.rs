//! Helpers the gmemctl end-to-end tests share: run the binary, read its output, judge a user
//! error, run a VM (`gmemctl run`) as a child process. Each test binary uses a subset, hence
//! the allowance below.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
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
