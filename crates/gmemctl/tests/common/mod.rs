//! Helpers the gmemctl end-to-end tests share: run the binary, read its output, judge a user
//! error. Each test binary uses a subset, hence the allowance below.
#![allow(dead_code)]

use std::process::{Command, Output};

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
