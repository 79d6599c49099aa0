//! A `kill -9` of `gmemctl migrate --pid` at each point of a refault batch loses nothing: the
//! VMM is left stopped with the batch in the journal, and `gmemctl recover` (or the next
//! `gmemctl migrate --pid`) puts every byte back and resumes it. Proven on the real
//! /dev/kvm with gmemctl's test hook GMEMCTL_TEST_KILL_AT, against the test VMM (whose
//! memory holds still, so every byte is compared) and against a running `gmemctl run` VM.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use gmem::testing::kvm_or_skip;
use serde_json::Value;
use vmm::api::ApiClient;

mod common;

use common::{
    Holder, OwnCgroup, RunningVm, TempDir, View, gmemctl, is_stopped, json, outside_view, stderr,
};

/// `gmemctl migrate --pid PID` relocating in place, journalled in `dir`, with the kill hook
/// at `kill_at` (if any).
fn migrate(pid: u32, dir: &Path, kill_at: Option<&str>, extra: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gmemctl"));
    cmd.args(["migrate", "--pid", &pid.to_string()])
        .args(["--policy", "bind", "--nodes", "0", "--relocate-in-place"])
        .arg("--journal-dir")
        .arg(dir)
        .args(extra);
    if let Some(point) = kill_at {
        cmd.env("GMEMCTL_TEST_KILL_AT", point);
    }
    cmd.output().expect("gmemctl runs")
}

fn journal_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The pages resident in `before` that are absent from `now`, and those whose bytes differ.
fn differences(before: &View, now: &View) -> (usize, usize) {
    let (mut gone, mut changed) = (0, 0);
    for (inode, pages) in before {
        for (was, is) in pages.iter().zip(&now[inode]) {
            match (was, is) {
                (Some(_), None) => gone += 1,
                (Some(was), Some(is)) if was.bytes != is.bytes => changed += 1,
                _ => {}
            }
        }
    }
    (gone, changed)
}

/// Kills gmemctl at `point` of its first batch over the test VMM, checks what was left,
/// recovers, and checks every byte.
fn kill_then_recover(point: &str) {
    let mut holder = Holder::start();
    let pid: u32 = holder.pid().parse().unwrap();
    let dir = TempDir::new(&format!("kill-{point}"));
    let before = outside_view(pid, true);
    let data = holder.ready["data"]["fd"].to_string();

    let out = migrate(pid, &dir.0, Some(point), &["--fd", &data]);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "gmemctl was not killed at {point}: {:?}\n{}",
        out.status,
        stderr(&out)
    );
    // Left as a dead gmemctl leaves it: the VMM stopped, the batch in the journal.
    assert!(is_stopped(pid), "{point}: the VMM runs with a batch out");
    let files = journal_files(&dir.0);
    for suffix in ["batch", "bounce", "session"] {
        assert!(
            files.contains(&format!("pid-{pid}.{suffix}")),
            "{point}: no .{suffix} in {files:?}"
        );
    }
    // The kill landed where it says: nothing touched yet, the pages gone, fresh zeroed
    // pages, or the bytes back.
    let during = outside_view(pid, true);
    let (gone, changed) = differences(&before, &during);
    match point {
        "after-journal" | "after-copy-back" => assert_eq!((gone, changed), (0, 0), "{point}"),
        "after-punch" => assert!(gone > 0, "{point}: no page was punched"),
        "after-refault" => assert!(changed > 0 && gone == 0, "{point}: {gone} {changed}"),
        other => panic!("unknown point {other}"),
    }

    let out = gmemctl(&[
        "recover",
        "--pid",
        &pid.to_string(),
        "--journal-dir",
        dir.0.to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{point}: {}", stderr(&out));
    let recovered = json(&out);
    assert_eq!(recovered.as_array().unwrap().len(), 1, "{recovered:#}");
    let recovered = &recovered[0];
    assert_eq!(recovered["pid"], pid);
    assert_eq!(recovered["resumed"], true);
    assert_eq!(recovered["process_gone"], false);
    assert_eq!(recovered["warnings"], serde_json::json!([]));
    let restored = &recovered["restored"];
    assert_eq!(restored["fd"].to_string(), data, "{recovered:#}");
    assert!(restored["len"].as_u64().unwrap() > 0);

    assert!(!is_stopped(pid), "{point}: recover left the VMM stopped");
    assert_eq!(journal_files(&dir.0), Vec::<String>::new());
    let after = outside_view(pid, true);
    assert_eq!(differences(&before, &after), (0, 0), "{point}: bytes lost");
    assert_eq!(holder.guest_mismatches(), 0, "{point}: the guest disagrees");
}

#[test]
fn a_kill_after_the_journal_is_written_loses_nothing() {
    if kvm_or_skip("a_kill_after_the_journal_is_written_loses_nothing").is_some() {
        kill_then_recover("after-journal");
    }
}

#[test]
fn a_kill_after_the_punch_loses_nothing() {
    if kvm_or_skip("a_kill_after_the_punch_loses_nothing").is_some() {
        kill_then_recover("after-punch");
    }
}

#[test]
fn a_kill_after_the_refault_loses_nothing() {
    if kvm_or_skip("a_kill_after_the_refault_loses_nothing").is_some() {
        kill_then_recover("after-refault");
    }
}

#[test]
fn a_kill_after_the_copy_back_loses_nothing() {
    if kvm_or_skip("a_kill_after_the_copy_back_loses_nothing").is_some() {
        kill_then_recover("after-copy-back");
    }
}

fn api_metrics(sock: &Path) -> Value {
    let reply = ApiClient::new(sock).get("/metrics").unwrap();
    assert_eq!(reply.status, 200);
    reply.json().unwrap()
}

#[test]
fn the_next_migrate_recovers_a_running_vm_first_and_its_guest_sees_no_mismatch() {
    if kvm_or_skip("the_next_migrate_recovers_a_running_vm_first").is_none() {
        return;
    }
    let dir = TempDir::new("kill-running");
    let sock = dir.0.join("api.sock");
    let journal = dir.0.join("journal");
    let vm = RunningVm::start(&sock, &["--mem", "64M"]);
    std::thread::sleep(Duration::from_millis(500));
    let out = migrate(vm.pid, &journal, Some("after-punch"), &[]);
    assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{}", stderr(&out));
    assert!(is_stopped(vm.pid));
    // A while stopped with a batch out: the guest cannot run on the hole meanwhile.
    std::thread::sleep(Duration::from_millis(200));
    assert!(is_stopped(vm.pid));

    let out = migrate(vm.pid, &journal, None, &["--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("put back the journalled batch"),
        "{}",
        stderr(&out)
    );
    let result = json(&out);
    assert_eq!(result["complete"], true, "{result:#}");
    assert_eq!(result["found"], "running");
    assert!(!is_stopped(vm.pid));
    assert_eq!(journal_files(&journal), Vec::<String>::new());

    let first = api_metrics(&sock);
    assert_eq!(first["guest"]["mismatches"], 0, "{:#}", first["guest"]);
    let sweeps = first["guest"]["sweeps"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while api_metrics(&sock)["guest"]["sweeps"].as_u64().unwrap() <= sweeps {
        assert!(Instant::now() < deadline, "no sweep after the recovery");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(api_metrics(&sock)["guest"]["mismatches"], 0);
    let (code, err) = vm.terminate();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("with 0 mismatches"), "{err}");
}

#[test]
fn recovery_of_a_vmm_that_died_meanwhile_only_removes_its_journal() {
    if kvm_or_skip("recovery_of_a_vmm_that_died_meanwhile").is_none() {
        return;
    }
    let mut holder = Holder::start();
    let pid: u32 = holder.pid().parse().unwrap();
    let dir = TempDir::new("kill-gone");
    let data = holder.ready["data"]["fd"].to_string();
    let out = migrate(pid, &dir.0, Some("after-punch"), &["--fd", &data]);
    assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{}", stderr(&out));
    holder.child.kill().unwrap();
    holder.child.wait().unwrap();

    let out = gmemctl(&["recover", "--journal-dir", dir.0.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("process {pid} is gone")), "{text}");
    assert_eq!(journal_files(&dir.0), Vec::<String>::new());
    // Nothing left: a second run says so.
    let out = gmemctl(&["recover", "--journal-dir", dir.0.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to recover"));
}

#[test]
fn a_frozen_vmm_stays_frozen_after_a_kill_and_recovery_thaws_it() {
    if kvm_or_skip("a_frozen_vmm_stays_frozen_after_a_kill").is_none() {
        return;
    }
    let mut holder = Holder::start();
    let pid: u32 = holder.pid().parse().unwrap();
    let cgroup = match OwnCgroup::for_process(pid, "gmemctl-kill-freezer") {
        Ok(cgroup) => cgroup,
        Err(reason) => {
            eprintln!("SKIP a_frozen_vmm_stays_frozen_after_a_kill: {reason}");
            return;
        }
    };
    let frozen = || {
        std::fs::read_to_string(cgroup.path.join("cgroup.events"))
            .unwrap()
            .contains("frozen 1")
    };
    let dir = TempDir::new("kill-freezer");
    let before = outside_view(pid, true);
    let data = holder.ready["data"]["fd"].to_string();
    let out = migrate(pid, &dir.0, Some("after-punch"), &["--fd", &data]);
    assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{}", stderr(&out));
    assert!(frozen(), "the VMM's cgroup was thawed with a batch out");
    // A SIGCONT from anyone cannot end a freeze.
    assert!(
        Command::new("kill")
            .args(["-CONT", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(frozen());

    let out = gmemctl(&["recover", "--journal-dir", dir.0.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!frozen(), "recover left the cgroup frozen");
    assert_eq!(differences(&before, &outside_view(pid, true)), (0, 0));
    assert_eq!(holder.guest_mismatches(), 0);
    drop(cgroup);
}
