//! What `gmemctl migrate --pid` refuses, each with one sentence and exit code 2, before it
//! stops the VMM or touches its memory: a guest_memfd that another process also holds, a
//! VMM with a vhost or VFIO device open, memory that is not host-mappable; and the user
//! errors of a wrong PID or mechanism.

use std::path::Path;
use std::process::Command;

use gmem::memory::AttachedGmem;
use gmem::testing::kvm_or_skip;

mod common;

use common::{Holder, TempDir, assert_user_error, gmemctl, is_stopped, outside_view};

/// `gmemctl migrate --pid PID ... ARGS` relocating in place, journalled in `dir`.
fn migrate(pid: &str, dir: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec![
        "migrate",
        "--pid",
        pid,
        "--policy",
        "bind",
        "--nodes",
        "0",
        "--relocate-in-place",
        "--journal-dir",
        dir.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    gmemctl(&all)
}

/// The frames of the VMM's memory did not change (nothing was moved) and it runs.
fn assert_untouched(holder: &Holder, before: &common::View) {
    let pid: u32 = holder.pid().parse().unwrap();
    assert_eq!(&outside_view(pid, false), before, "memory was moved");
    assert!(!is_stopped(pid), "the VMM was left stopped");
}

#[test]
fn a_guest_memfd_another_process_holds_is_refused() {
    if kvm_or_skip("a_guest_memfd_another_process_holds_is_refused").is_none() {
        return;
    }
    let holder = Holder::start();
    let pid = holder.pid();
    let dir = TempDir::new("refuse-shared");
    let before = outside_view(pid.parse().unwrap(), false);
    // This test process takes the VMM's gmems and keeps them open and mapped, as a
    // vhost-user backend would.
    let held = AttachedGmem::attach_all(pid.parse().unwrap(), None).unwrap();
    let data = holder.ready["data"]["fd"].to_string();
    let out = migrate(&pid, &dir.0, &["--fd", &data]);
    let me = std::process::id();
    assert_user_error(
        &out,
        &format!(
            "refusing to stop process {pid}: the guest_memfd at its fd {data} is also open (fd"
        ),
    );
    let err = common::stderr(&out);
    assert!(
        err.contains("mapped (at 0x") && err.contains(&format!("process {me} (")),
        "{err}"
    );
    // One sentence per hazard, each on its own line.
    assert!(
        err.lines().filter(|l| l.contains("refusing")).count() >= 2,
        "{err}"
    );
    drop(held);
    assert_untouched(&holder, &before);
    // Let go, the same command works.
    let out = migrate(&pid, &dir.0, &["--fd", &data]);
    assert!(out.status.success(), "{}", common::stderr(&out));
}

/// A device node for `name` (misc major 10, `minor`): the real one if /dev has it, else
/// one made in `dir` (a VMM can hold it with O_PATH even where no driver is loaded).
fn device_node(name: &str, minor: u32, dir: &Path) -> Option<String> {
    let real = format!("/dev/{name}");
    if Path::new(&real).exists() {
        return Some(real);
    }
    let made = dir.join(name);
    let ok = Command::new("mknod")
        .arg(&made)
        .args(["c", "10", &minor.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return None;
    }
    eprintln!(
        "NOTE {name}: /dev/{name} does not exist on this host; the VMM holds a stand-in device \
         node with the same number ({}, 10:{minor})",
        made.display()
    );
    Some(made.to_str().unwrap().to_owned())
}

fn refuses_a_vmm_holding(name: &str, minor: u32, sentence: &str) {
    let dir = TempDir::new(&format!("refuse-{name}"));
    let Some(node) = device_node(name, minor, &dir.0) else {
        eprintln!(
            "SKIP refuses_a_vmm_holding {name}: no /dev/{name} and no way to make a device node \
             (mknod failed: no CAP_MKNOD, or a nodev file system)"
        );
        return;
    };
    let holder = Holder::start_with(&[("GMEM_TEST_HOLDER_OPEN", &node)]);
    let pid = holder.pid();
    let before = outside_view(pid.parse().unwrap(), false);
    let data = holder.ready["data"]["fd"].to_string();
    let out = migrate(&pid, &dir.0, &["--fd", &data]);
    assert_user_error(&out, &format!("refusing to stop process {pid}: {sentence}"));
    assert_untouched(&holder, &before);
}

#[test]
fn a_vmm_with_a_vhost_device_open_is_refused() {
    if kvm_or_skip("a_vmm_with_a_vhost_device_open_is_refused").is_some() {
        refuses_a_vmm_holding("vhost-net", 238, "it has the vhost device vhost-net (");
    }
}

#[test]
fn a_vmm_with_a_vfio_container_open_is_refused() {
    if kvm_or_skip("a_vmm_with_a_vfio_container_open_is_refused").is_some() {
        refuses_a_vmm_holding("vfio", 196, "it has the VFIO device vfio (");
    }
}

#[test]
fn memory_that_is_not_host_mappable_is_refused() {
    if kvm_or_skip("memory_that_is_not_host_mappable_is_refused").is_none() {
        return;
    }
    let holder = Holder::start();
    let pid = holder.pid();
    let dir = TempDir::new("refuse-hidden");
    let before = outside_view(pid.parse().unwrap(), false);
    // Without --fd every guest_memfd is asked for, the hidden one (no MMAP) too.
    let out = migrate(&pid, &dir.0, &[]);
    let hidden = holder.ready["hidden"]["fd"].to_string();
    assert_user_error(
        &out,
        &format!(
            "refusing to move the guest_memfd at fd {hidden} of process {pid}: it is not \
             host-mappable"
        ),
    );
    let err = common::stderr(&out);
    let system = holder.ready["system"]["fd"].to_string();
    let data = holder.ready["data"]["fd"].to_string();
    assert!(
        err.contains(&format!("name them with --fd ({system}, {data})")),
        "{err}"
    );
    let out = migrate(&pid, &dir.0, &["--fd", &hidden]);
    assert_user_error(&out, "not host-mappable");
    assert_untouched(&holder, &before);
}

#[test]
fn user_errors_of_migrate_pid_are_one_sentence() {
    let dir = TempDir::new("refuse-user");
    let out = migrate("99999999", &dir.0, &[]);
    assert_user_error(&out, "no process with PID 99999999");
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = sleeper.id().to_string();
    let out = migrate(&pid, &dir.0, &[]);
    sleeper.kill().ok();
    sleeper.wait().ok();
    assert_user_error(&out, &format!("process {pid} has no guest_memfd open"));
    let out = gmemctl(&["migrate", "--fd", "3", "--policy", "bind", "--nodes", "0"]);
    assert_eq!(out.status.code(), Some(2), "--fd without --pid");

    if kvm_or_skip("user_errors_of_migrate_pid_are_one_sentence").is_none() {
        return;
    }
    let holder = Holder::start();
    let pid = holder.pid();
    let out = migrate(&pid, &dir.0, &["--fd", "999"]);
    assert_user_error(
        &out,
        &format!("process {pid} has no guest_memfd at fd 999; its guest_memfds are at fd"),
    );
    let data = holder.ready["data"]["fd"].to_string();
    let out = migrate(&pid, &dir.0, &["--fd", &data, "--mechanism", "remap"]);
    assert_user_error(&out, "only the VMM that owns this memory can do");
    let out = migrate(&pid, &dir.0, &["--fd", &data, "--mechanism", "native"]);
    assert_user_error(&out, "cannot relocate within a node");
}
