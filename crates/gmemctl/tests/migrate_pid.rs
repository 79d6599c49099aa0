//! `gmemctl migrate --pid` end to end on the real /dev/kvm: foreign VMMs reached only through
//! their PID. Every resident page gets a new frame with its bytes intact as seen from
//! outside the process, the guest counts no mismatch and keeps running, a VMM found stopped
//! is left stopped, and one in a cgroup of its own is frozen rather than signalled.

use std::process::Command;
use std::time::{Duration, Instant};

use gmem::testing::kvm_or_skip;
use serde_json::Value;
use vmm::api::ApiClient;

mod common;

use common::{
    Holder, OwnCgroup, RunningVm, TempDir, View, gmemctl, is_stopped, json, outside_view, stderr,
};

fn resident(view: &View) -> usize {
    view.values().flatten().filter(|p| p.is_some()).count()
}

/// Waits until the VMM's guest has touched all the memory it will (the resident count,
/// seen from outside, holds still), and returns that view.
fn settled_view(pid: u32, with_bytes: bool) -> View {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = outside_view(pid, with_bytes);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = outside_view(pid, with_bytes);
        if resident(&now) > 0 && resident(&now) == resident(&last) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the guest's memory never settled"
        );
        last = now;
    }
}

/// Checks that every page resident before is resident after on another frame, with the
/// same bytes where they were read; returns the number of pages checked.
fn assert_relocated(before: &View, after: &View) -> usize {
    let mut checked = 0;
    for (inode, pages) in before {
        let pages_after = &after[inode];
        assert_eq!(pages.len(), pages_after.len());
        for (index, (was, now)) in pages.iter().zip(pages_after).enumerate() {
            let Some(was) = was else { continue };
            let now = now
                .as_ref()
                .unwrap_or_else(|| panic!("inode {inode} page {index} is gone after the move"));
            assert_ne!(
                was.pfn, now.pfn,
                "inode {inode} page {index} kept its frame {:#x}",
                was.pfn
            );
            assert!(
                was.bytes == now.bytes,
                "inode {inode} page {index} changed its bytes"
            );
            checked += 1;
        }
    }
    checked
}

/// Runs `gmemctl migrate --pid PID ARGS --json` and returns its JSON, asserting success.
fn migrate_pid(pid: u32, args: &[&str]) -> Value {
    let pid = pid.to_string();
    let mut all = vec![
        "migrate",
        "--pid",
        &pid,
        "--policy",
        "bind",
        "--nodes",
        "0",
        "--relocate-in-place",
        "--json",
    ];
    all.extend_from_slice(args);
    let out = gmemctl(&all);
    assert!(out.status.success(), "{}", stderr(&out));
    json(&out)
}

/// The report of one migrated guest_memfd says every planned page moved to a new frame
/// with its content verified byte for byte.
fn assert_complete(gmem: &Value) {
    let report = &gmem["report"];
    assert_eq!(report["mechanism"], "refault", "{report:#}");
    assert_eq!(report["complete"], true, "{report:#}");
    let planned = report["pages_planned"].as_u64().unwrap();
    assert!(planned > 0, "{report:#}");
    assert_eq!(report["pages_moved"], planned);
    assert_eq!(report["pfns_changed"], planned, "{report:#}");
    assert_eq!(report["pfns_checked"], planned);
    assert_eq!(report["content_mismatches"], 0);
    assert!(report["content_checks"].as_u64().unwrap() > 0);
    assert_eq!(report["stops"]["count"], report["steps"]);
}

fn api_metrics(sock: &std::path::Path) -> Value {
    let reply = ApiClient::new(sock).get("/metrics").unwrap();
    assert_eq!(reply.status, 200);
    reply.json().unwrap()
}

/// The guest reports no mismatch, and keeps sweeping.
fn assert_guest_clean_and_running(sock: &std::path::Path) {
    let first = api_metrics(sock);
    assert_eq!(first["guest"]["mismatches"], 0, "{:#}", first["guest"]);
    let sweeps = first["guest"]["sweeps"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = api_metrics(sock);
        assert_eq!(now["guest"]["mismatches"], 0, "{:#}", now["guest"]);
        if now["guest"]["sweeps"].as_u64().unwrap() > sweeps {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the guest made no sweep after the move"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(pid: u32, name: &str) {
    let sent = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

#[test]
fn migrate_pid_relocates_every_resident_page_of_a_running_vm() {
    if kvm_or_skip("migrate_pid_relocates_every_resident_page_of_a_running_vm").is_none() {
        return;
    }
    let dir = TempDir::new("migrate-pid-running");
    let sock = dir.0.join("api.sock");
    let vm = RunningVm::start(&sock, &["--mem", "64M"]);
    // Only the PID and /proc until the move is done: the API is asked only afterwards.
    let before = settled_view(vm.pid, false);
    let result = migrate_pid(vm.pid, &[]);
    let after = outside_view(vm.pid, false);
    assert!(!is_stopped(vm.pid), "the VMM was left stopped");

    assert_eq!(result["pid"], vm.pid);
    assert_eq!(result["found"], "running");
    assert_eq!(result["stop_method"]["kind"], "signal", "{result:#}");
    assert_eq!(result["complete"], true);
    let gmems = result["guest_memfds"].as_array().unwrap();
    assert_eq!(gmems.len(), 1, "{result:#}");
    assert_complete(&gmems[0]);
    // Every page the guest had touched is on a new frame (seen through our own mapping,
    // not gmemctl's), and the plan covered at least all of them.
    let checked = assert_relocated(&before, &after);
    assert_eq!(checked, resident(&before));
    assert!(gmems[0]["report"]["pages_planned"].as_u64().unwrap() >= checked as u64);
    // On this kernel the policy set through gmemctl's mapping does not reach the VMM's.
    let future = &result["future_allocations"];
    assert!(
        future["explanation"]
            .as_str()
            .unwrap()
            .contains("gmemctl's mapping")
    );

    assert_guest_clean_and_running(&sock);
    let (code, err) = vm.terminate();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("with 0 mismatches"), "{err}");
}

#[test]
fn migrate_pid_moves_the_test_vmm_byte_for_byte_and_its_guest_agrees() {
    if kvm_or_skip("migrate_pid_moves_the_test_vmm_byte_for_byte").is_none() {
        return;
    }
    let mut holder = Holder::start();
    let pid: u32 = holder.pid().parse().unwrap();
    assert_eq!(holder.guest_mismatches(), 0, "before any move");
    let before = outside_view(pid, true);
    let system = holder.ready["system"]["fd"].to_string();
    let data = holder.ready["data"]["fd"].to_string();
    let result = migrate_pid(pid, &["--fd", &system, "--fd", &data]);
    let after = outside_view(pid, true);

    let gmems = result["guest_memfds"].as_array().unwrap();
    assert_eq!(gmems.len(), 2, "{result:#}");
    for gmem in gmems {
        assert_complete(gmem);
    }
    let written: u64 = holder.ready["data"]["guest_written"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["pages"].as_u64().unwrap())
        .sum();
    let data_report = gmems
        .iter()
        .find(|g| g["fds"][0] == holder.ready["data"]["fd"])
        .unwrap();
    assert_eq!(data_report["report"]["pages_planned"], written);
    // The hidden (not host-mappable) gmem was not named and is untouched.
    let checked = assert_relocated(&before, &after);
    assert_eq!(checked, resident(&before));
    assert!(!is_stopped(pid));
    // The VMM maps the data gmem but never touched it: its numa_maps shows its own policy.
    assert_eq!(
        result["future_allocations"]["vmm_mapping_policies"][0], "default",
        "{result:#}"
    );
    assert_eq!(result["future_allocations"]["on_target"], false);
    assert_eq!(holder.guest_mismatches(), 0, "after the move");
}

#[test]
fn migrate_pid_leaves_a_vmm_that_was_stopped_stopped() {
    if kvm_or_skip("migrate_pid_leaves_a_vmm_that_was_stopped_stopped").is_none() {
        return;
    }
    let dir = TempDir::new("migrate-pid-stopped");
    let sock = dir.0.join("api.sock");
    let vm = RunningVm::start(&sock, &["--mem", "64M"]);
    settled_view(vm.pid, false);
    signal(vm.pid, "STOP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !is_stopped(vm.pid) {
        assert!(Instant::now() < deadline, "SIGSTOP did not stop the VMM");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Stopped, its memory holds still: every byte can be compared.
    let before = outside_view(vm.pid, true);
    let result = migrate_pid(vm.pid, &[]);
    assert!(is_stopped(vm.pid), "gmemctl resumed a VMM it found stopped");
    assert_eq!(result["found"], "stopped");
    assert_complete(&result["guest_memfds"][0]);
    let after = outside_view(vm.pid, true);
    assert_eq!(assert_relocated(&before, &after), resident(&before));
    // Still stopped a while later: nothing resumes it behind our back either.
    std::thread::sleep(Duration::from_millis(200));
    assert!(is_stopped(vm.pid));

    signal(vm.pid, "CONT");
    assert_guest_clean_and_running(&sock);
    let (code, err) = vm.terminate();
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn migrate_pid_freezes_a_vmm_that_has_a_cgroup_of_its_own() {
    if kvm_or_skip("migrate_pid_freezes_a_vmm_that_has_a_cgroup_of_its_own").is_none() {
        return;
    }
    let mut holder = Holder::start();
    let pid: u32 = holder.pid().parse().unwrap();
    let cgroup = match OwnCgroup::for_process(pid, "gmemctl-freezer-test") {
        Ok(cgroup) => cgroup,
        Err(reason) => {
            eprintln!("SKIP migrate_pid_freezes_a_vmm_that_has_a_cgroup_of_its_own: {reason}");
            return;
        }
    };
    let before = outside_view(pid, true);
    let data = holder.ready["data"]["fd"].to_string();
    let result = migrate_pid(pid, &["--fd", &data]);
    let after = outside_view(pid, true);
    assert_eq!(result["stop_method"]["kind"], "freezer", "{result:#}");
    assert_eq!(
        result["stop_method"]["cgroup"],
        cgroup.path.to_str().unwrap()
    );
    assert_complete(&result["guest_memfds"][0]);
    // Only the data gmem was named: it moved; the system gmem kept every frame.
    let data_inode = result["guest_memfds"][0]["inode"].as_u64().unwrap();
    let (data_before, system_before): (View, View) = before
        .into_iter()
        .partition(|(inode, _)| *inode == data_inode);
    assert!(assert_relocated(&data_before, &after) > 0);
    for (inode, pages) in &system_before {
        assert_eq!(&after[inode], pages, "a gmem not named was touched");
    }
    let freeze = std::fs::read_to_string(cgroup.path.join("cgroup.freeze")).unwrap();
    assert_eq!(freeze.trim(), "0", "the cgroup was left frozen");
    assert_eq!(holder.guest_mismatches(), 0);
    drop(cgroup);
}

#[test]
fn migrate_pid_native_needs_no_stop_and_says_when_the_kernel_refuses() {
    if kvm_or_skip("migrate_pid_native_needs_no_stop_and_says_when_the_kernel_refuses").is_none() {
        return;
    }
    let mut holder = Holder::start();
    let pid = holder.pid();
    let data = holder.ready["data"]["fd"].to_string();
    let before = outside_view(pid.parse().unwrap(), true);
    let nodes: Vec<u32> = gmem::numa::Topology::read()
        .unwrap()
        .memory_nodes()
        .iter()
        .map(|n| n.0)
        .collect();
    let native = |node: u32| {
        gmemctl(&[
            "migrate",
            "--pid",
            &pid,
            "--fd",
            &data,
            "--policy",
            "bind",
            "--nodes",
            &node.to_string(),
            "--mechanism",
            "native",
            "--verify",
            "placement",
            "--json",
        ])
    };
    // Everything is on the first node already: native has nothing to move, and without
    // content hashes it never stops the VMM.
    let out = native(nodes[0]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = &json(&out)["guest_memfds"][0]["report"];
    assert_eq!(report["mechanism"], "native");
    assert_eq!(report["stops"]["count"], 0, "{report:#}");
    match nodes[..] {
        [_, other, ..] => {
            // Two nodes: the kernel moves the folios, with no stop at all, or is caught
            // refusing them (stock kernels; gmem without our MIGRATABLE flag).
            let out = native(other);
            if out.status.success() {
                let report = &json(&out)["guest_memfds"][0]["report"];
                assert_eq!(report["complete"], true, "{report:#}");
                assert_eq!(report["stops"]["count"], 0, "{report:#}");
            } else {
                common::assert_user_error(&out, "kernel does not migrate gmem folios");
                assert!(stderr(&out).contains("unmoved"), "{}", stderr(&out));
            }
            // Whatever native did, auto gets it there: natively, or by refault.
            let out = gmemctl(&[
                "migrate",
                "--pid",
                &pid,
                "--fd",
                &data,
                "--policy",
                "bind",
                "--nodes",
                &nodes[0].to_string(),
                "--json",
            ]);
            assert!(out.status.success(), "{}", stderr(&out));
            assert_eq!(json(&out)["complete"], true);
        }
        _ => eprintln!(
            "NOTE migrate_pid_native: one NUMA node here, so the kernel's refusal (or its move) \
             across nodes is not tried; the lab covers it"
        ),
    }
    let after = outside_view(pid.parse().unwrap(), true);
    for (inode, pages) in &before {
        for (index, (was, now)) in pages.iter().zip(&after[inode]).enumerate() {
            assert_eq!(
                was.as_ref().map(|p| &p.bytes),
                now.as_ref().map(|p| &p.bytes),
                "inode {inode} page {index}"
            );
        }
    }
    assert_eq!(holder.guest_mismatches(), 0);
}

#[test]
fn migrate_pid_stops_cleanly_on_sigint_with_the_vmm_running_and_every_byte_in_place() {
    if kvm_or_skip("migrate_pid_stops_cleanly_on_sigint").is_none() {
        return;
    }
    let dir = TempDir::new("migrate-pid-sigint");
    let sock = dir.0.join("api.sock");
    let journal_dir = dir.0.join("journal");
    let vm = RunningVm::start(&sock, &["--mem", "64M"]);
    let before = settled_view(vm.pid, false);
    // Paced to a 5% stop share, the move takes minutes: the SIGINT comes mid-way.
    let pid = vm.pid.to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gmemctl"))
        .args([
            "migrate",
            "--pid",
            &pid,
            "--policy",
            "bind",
            "--nodes",
            "0",
            "--relocate-in-place",
            "--max-stop-share",
            "0.05",
            "--json",
            "--journal-dir",
        ])
        .arg(&journal_dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Its progress lines say when pages have begun to move.
    let stderr_pipe = child.stderr.take().unwrap();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stderr_pipe).lines() {
            let line = line.unwrap_or_default();
            if line.contains("% (") && !line.contains(" 0/") {
                let _ = seen_tx.send(());
            }
            lines.push(line);
        }
        lines.join("\n")
    });
    seen_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("no page moved within 60 s");
    signal(child.id(), "INT");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "gmemctl did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    let err = reader.join().unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("stopped on request"), "{err}");
    assert!(!is_stopped(vm.pid), "the VMM was left stopped");
    let journal_left: Vec<_> = std::fs::read_dir(&journal_dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(journal_left.is_empty(), "journal left: {journal_left:?}");

    let result: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(result["interrupted"], true, "{result:#}");
    assert_eq!(result["complete"], false);
    let report = &result["guest_memfds"][0]["report"];
    let (moved, planned) = (
        report["pages_moved"].as_u64().unwrap(),
        report["pages_planned"].as_u64().unwrap(),
    );
    assert!(moved > 0 && moved < planned, "{moved} of {planned}");
    assert_eq!(report["content_mismatches"], 0);
    assert_eq!(report["pfns_changed"], moved, "{report:#}");
    assert!(
        report["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().contains("stopped on request")),
        "{report:#}"
    );
    // Every page is still there with its bytes, moved or not, and the guest agrees.
    let after = outside_view(vm.pid, false);
    assert_eq!(resident(&after), resident(&before));
    assert_guest_clean_and_running(&sock);
    let (code, err) = vm.terminate();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("with 0 mismatches"), "{err}");
}
