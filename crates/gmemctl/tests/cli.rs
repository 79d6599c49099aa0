//! The gmemctl binary end to end: probe, and the user-error paths with exit code 2 (those of
//! `status PID` are in status_pid.rs).

use std::process::Command;

use gmem::numa::Topology;
use gmem::testing::kvm_or_skip;
use serde_json::Value;

mod common;

use common::{assert_user_error, gmemctl, stderr};

#[test]
fn probe_reports_this_host() {
    if kvm_or_skip("probe_reports_this_host").is_none() {
        return;
    }
    let out = gmemctl(&["probe", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = report["guest_memfd_flags"]["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"MMAP") && names.contains(&"INIT_SHARED"),
        "{names:?}"
    );
    let nodes = Topology::read().unwrap().nodes.len();
    assert_eq!(report["numa"]["nodes"].as_array().unwrap().len(), nodes);
    assert_eq!(
        report["mbind_on_gmem"]["verdict"], "yes",
        "{}",
        report["mbind_on_gmem"]
    );
    let native = &report["native_migration"]["verdict"];
    if nodes == 1 {
        assert_eq!(native, "unknown");
    } else {
        assert_ne!(native, "unknown");
    }

    let human = gmemctl(&["probe"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("KVM_CAP_GUEST_MEMFD_FLAGS (244)") && text.contains("MMAP|INIT_SHARED"),
        "{text}"
    );
}

#[test]
fn missing_kvm_device_is_a_user_error() {
    let out = gmemctl(&["--kvm-device", "/nonexistent/kvm", "probe"]);
    assert_user_error(&out, "/nonexistent/kvm does not exist");
}

#[test]
fn malformed_arguments_are_user_errors() {
    let out = gmemctl(&["status", "not-a-pid"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn permission_denied_is_a_user_error() {
    if kvm_or_skip("permission_denied_is_a_user_error").is_none() {
        return;
    }
    // Run as nobody: /dev/kvm is root-only here, and the binary stays readable.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_gmemctl"),
            "probe",
        ])
        .output();
    match out {
        Ok(out) if out.status.code() == Some(2) || out.status.success() => {
            if out.status.success() {
                eprintln!(
                    "SKIP permission_denied_is_a_user_error: nobody may open /dev/kvm on this host"
                );
                return;
            }
            assert_user_error(&out, "permission denied opening /dev/kvm");
        }
        Ok(out) => panic!("unexpected outcome: {:?} {}", out.status, stderr(&out)),
        Err(e) => panic!("setpriv (util-linux) is needed for this test: {e}"),
    }
}
