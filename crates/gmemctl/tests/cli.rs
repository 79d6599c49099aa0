//! The gmemctl binary end to end: probe, status, and the user-error paths with exit code 2.

use std::process::Command;

use gmem::memory::{ChunkLayout, GmemFlags, GuestMemory, page_size};
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
fn status_counts_the_pages_of_a_live_gmem() {
    let Some((_kvm, vm)) = kvm_or_skip("status_counts_the_pages_of_a_live_gmem") else {
        return;
    };
    let len = 6 << 20;
    let touched = 300 * page_size();
    let mem =
        GuestMemory::create(vm, ChunkLayout::single_slot(len), GmemFlags::HOST_MAPPABLE).unwrap();
    mem.populate(0, touched).unwrap();
    let addr = format!("{:#x}", mem.mapping().unwrap().addr());

    let pid = std::process::id().to_string();
    let out = gmemctl(&["status", &pid, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mapping = status["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["start"] == addr.as_str())
        .expect("our gmem mapping is listed");
    assert_eq!(mapping["size_bytes"], len);
    assert_eq!(mapping["resident_pages"], 300);
    let per_node: u64 = mapping["pages_per_node"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(per_node, 300);

    let human = String::from_utf8_lossy(&gmemctl(&["status", &pid]).stdout).into_owned();
    assert!(human.contains("300 pages (1.2 MiB)"), "{human}");
}

#[test]
fn status_of_a_process_without_gmem_says_so() {
    let mut child = Command::new("sleep").arg("30").spawn().expect("sleep runs");
    let out = gmemctl(&["status", &child.id().to_string()]);
    child.kill().ok();
    child.wait().ok();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no guest_memfd mappings"));
}

#[test]
fn missing_kvm_device_is_a_user_error() {
    let out = gmemctl(&["--kvm-device", "/nonexistent/kvm", "probe"]);
    assert_user_error(&out, "/nonexistent/kvm does not exist");
}

#[test]
fn nonexistent_pid_is_a_user_error() {
    // PIDs above pid_max (at most 2^22) never exist.
    let out = gmemctl(&["status", "99999999"]);
    assert_user_error(&out, "no process with PID 99999999");
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
