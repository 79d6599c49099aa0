//! `gmemctl run`, `migrate` and `status --api-sock` end to end: a VM process serving its
//! API, migrations through it with their exit codes, and a clean SIGTERM shutdown.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use gmem::testing::kvm_or_skip;

mod common;

use common::{RunningVm, TempDir, assert_user_error, gmemctl, json, stderr};

#[test]
fn run_migrate_and_status_end_to_end() {
    if kvm_or_skip("run_migrate_and_status_end_to_end").is_none() {
        return;
    }
    let dir = TempDir::new("api-e2e");
    let config = dir.0.join("vm.json");
    // The file sets three fields; the --vcpus flag overrides one of them.
    std::fs::write(
        &config,
        r#"{"mem_size": 33554432, "vcpus": 2, "spare_chunks": 2}"#,
    )
    .unwrap();
    let sock = dir.0.join("api.sock");
    let vm = RunningVm::start(
        &sock,
        &["--config", config.to_str().unwrap(), "--vcpus", "1"],
    );
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // status --api-sock: the layout the file and flags asked for, and the placement.
    let out = gmemctl(&["status", "--api-sock", vm.sock(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status = json(&out);
    assert_eq!(status["vm"]["pid"], vm.pid);
    assert_eq!(status["vm"]["config"]["mem_size"], 32 << 20);
    assert_eq!(status["vm"]["config"]["vcpus"], 1);
    assert_eq!(status["vm"]["memory"]["spare_chunks"], 2);
    let placement = &status["placement"];
    assert_eq!(
        placement["pages"].as_u64().unwrap() * placement["page_size"].as_u64().unwrap(),
        32 << 20
    );
    let text = gmemctl(&["status", "--api-sock", vm.sock()]);
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("ranges in guest order"), "{text}");
    assert!(text.contains(&format!("VM (pid {})", vm.pid)), "{text}");
    // The PID form finds the same VMM's one gmem, of the size its API reports.
    let out = gmemctl(&["status", &vm.pid.to_string(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let by_pid = json(&out);
    assert_eq!(by_pid["guest_memfds"].as_array().unwrap().len(), 1);
    assert_eq!(
        by_pid["guest_memfds"][0]["size_bytes"],
        status["vm"]["memory"]["gmem_size"]
    );

    // A relocation through the API: exit 0, a complete verified report.
    let out = gmemctl(&[
        "migrate",
        "--api-sock",
        vm.sock(),
        "--policy",
        "bind",
        "--nodes",
        "0",
        "--relocate-in-place",
        "--max-stop",
        "2ms",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let job = json(&out);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["report"]["complete"], true);
    assert_eq!(job["report"]["content_mismatches"], 0);
    assert_eq!(job["guest"]["mismatches"], 0);
    assert_eq!(job["request"]["max_stop_us"], 2000);
    assert!(job["report"]["pages_moved"].as_u64().unwrap() > 0);
    // Not a terminal: progress comes as plain lines.
    let err = stderr(&out);
    assert!(
        err.contains("migration 1: started") && err.contains("100%"),
        "{err}"
    );
    assert!(!err.contains('\r'), "{err:?}");

    // The table form, with the other copying mechanism.
    let out = gmemctl(&[
        "migrate",
        "--api-sock",
        vm.sock(),
        "--policy",
        "bind",
        "--nodes",
        "0",
        "--mechanism",
        "refault",
        "--relocate-in-place",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("migration 2 succeeded: bind node 0"),
        "{text}"
    );
    assert!(
        text.contains("refault, relocating pages in place"),
        "{text}"
    );
    assert!(text.contains("complete           yes"), "{text}");

    // The API's refusals are user errors, with the API's sentence.
    let refuse = |args: &[&str], needle: &str| {
        let mut all = vec!["migrate", "--api-sock", vm.sock()];
        all.extend_from_slice(args);
        assert_user_error(&gmemctl(&all), needle);
    };
    refuse(
        &["--policy", "bind", "--nodes", "7"],
        "gmemctl: NUMA node 7 cannot be a target: it does not exist",
    );
    refuse(&["--policy", "bind"], "bind takes exactly one node");
    refuse(
        &["--policy", "follow", "--cpus", "5000"],
        "CPU 5000 is not online",
    );
    refuse(
        &["--policy", "bind", "--nodes", "0", "--max-stop", "10ns"],
        "max_stop_us 0",
    );
    // A second VMM on the same socket is refused; the first keeps serving.
    let second = gmemctl(&["run", "--mem", "16M", "--api-sock", vm.sock()]);
    assert_user_error(&second, "is in use");
    let out = gmemctl(&["status", "--api-sock", vm.sock(), "--json"]);
    assert_eq!(json(&out)["vm"]["state"], "Running");

    // SIGTERM: a clean stop, exit 0, the socket removed.
    let (code, err) = vm.terminate();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("with 0 mismatches"), "{err}");
    assert!(!sock.exists(), "the socket was left behind");
    assert_user_error(
        &gmemctl(&["status", "--api-sock", sock.to_str().unwrap()]),
        "cannot connect to the VMM API",
    );
}

#[test]
fn run_refuses_bad_configurations_with_exit_code_2() {
    let dir = TempDir::new("api-config");
    let sock = dir.0.join("api.sock");
    let sock = sock.to_str().unwrap();
    let unknown = dir.0.join("unknown.json");
    std::fs::write(&unknown, r#"{"mem_size": 33554432, "vcpu": 1}"#).unwrap();
    let out = gmemctl(&[
        "run",
        "--config",
        unknown.to_str().unwrap(),
        "--api-sock",
        sock,
    ]);
    assert_user_error(&out, "unknown field `vcpu`");
    let out = gmemctl(&[
        "run",
        "--config",
        "/nonexistent/vm.json",
        "--api-sock",
        sock,
    ]);
    assert_user_error(&out, "cannot read the VM configuration");
    let out = gmemctl(&["run", "--mem", "3M", "--api-sock", sock]);
    assert_user_error(&out, "invalid VM configuration: mem_size");
    let out = gmemctl(&["run", "--mem", "lots", "--api-sock", sock]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let file = dir.0.join("file");
    std::fs::write(&file, b"x").unwrap();
    if kvm_or_skip("run_refuses_a_non_socket").is_some() {
        let out = gmemctl(&["run", "--mem", "16M", "--api-sock", file.to_str().unwrap()]);
        assert_user_error(&out, "exists and is not a socket");
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }
    assert!(!Path::new(sock).exists());
}

#[test]
fn run_boots_a_linux_kernel_and_exits_when_it_resets() {
    if kvm_or_skip("run_boots_a_linux_kernel_and_exits_when_it_resets").is_none() {
        return;
    }
    let dir = TempDir::new("linux-run");
    let kernel = dir.0.join("bzImage");
    let initramfs = dir.0.join("initramfs");
    let console = dir.0.join("console");
    let config = dir.0.join("vm.json");
    std::fs::write(&kernel, vmm::linux::stand_in::bzimage().unwrap()).unwrap();
    std::fs::write(&initramfs, b"cpio").unwrap();
    // The kernel comes from the config file, the command line from a flag that overrides it.
    std::fs::write(
        &config,
        serde_json::json!({
            "mem_size": 64 << 20,
            "vcpus": 1,
            "linux": {"kernel": kernel, "initramfs": initramfs, "cmdline": "from-file"},
        })
        .to_string(),
    )
    .unwrap();
    let out = gmemctl(&[
        "run",
        "--config",
        config.to_str().unwrap(),
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 from-flag",
        "--console",
        console.to_str().unwrap(),
        "--api-sock",
        dir.0.join("api.sock").to_str().unwrap(),
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("Linux (linux64) kernel at 0x100000"), "{err}");
    assert!(err.contains("the guest requested a reset"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&console).unwrap(),
        format!(
            "console=ttyS0 from-flag|cpio{}",
            vmm::linux::stand_in::EXPECTED_CONSOLE_TAIL
        )
    );
}

#[test]
fn run_reports_a_triple_fault_as_a_crash_and_exits_non_zero() {
    if kvm_or_skip("run_reports_a_triple_fault_as_a_crash_and_exits_non_zero").is_none() {
        return;
    }
    let dir = TempDir::new("linux-crash");
    let kernel = dir.0.join("bzImage");
    let (image, rip) = vmm::linux::stand_in::triple_fault_bzimage().unwrap();
    std::fs::write(&kernel, image).unwrap();
    let out = gmemctl(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--mem",
        "64M",
        "--console",
        dir.0.join("console").to_str().unwrap(),
        "--api-sock",
        dir.0.join("api.sock").to_str().unwrap(),
    ]);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a crash is not a clean exit: {err}"
    );
    assert!(err.contains("the guest crashed after"), "{err}");
    assert!(err.contains("triple-faulted"), "{err}");
    assert!(
        err.contains(&format!("RIP {rip:#x}")),
        "the registers are logged: {err}"
    );
    assert!(!err.contains("requested a reset"), "{err}");
}

#[test]
fn run_refuses_kernels_it_cannot_boot_with_exit_code_2() {
    let dir = TempDir::new("linux-refusals");
    let sock = dir.0.join("api.sock");
    let sock = sock.to_str().unwrap();
    let out = gmemctl(&["run", "--initramfs", "/x", "--api-sock", sock]);
    assert_user_error(&out, "--kernel");
    let out = gmemctl(&["run", "--kernel", "k", "--mem", "4G", "--api-sock", sock]);
    assert_user_error(&out, "below the 3 GiB mark");
    if kvm_or_skip("run_refuses_kernels_it_cannot_boot").is_none() {
        return;
    }
    let short = dir.0.join("short");
    std::fs::write(&short, b"MZ").unwrap();
    let zeros = dir.0.join("zeros");
    std::fs::write(&zeros, vec![0u8; 8192]).unwrap();
    let cases = [
        (
            "/nonexistent/bzImage",
            "cannot open the kernel /nonexistent/bzImage",
        ),
        (short.to_str().unwrap(), "is too short to be a kernel"),
        (zeros.to_str().unwrap(), "is not a kernel this VMM can boot"),
    ];
    for (kernel, needle) in cases {
        let out = gmemctl(&[
            "run",
            "--kernel",
            kernel,
            "--mem",
            "64M",
            "--api-sock",
            sock,
        ]);
        assert_user_error(&out, needle);
    }
    assert!(!Path::new(sock).exists());
}

/// `--kvm-device` reaches the VM: `gmemctl run` runs its guest on the KVM device node it is
/// given (here a second node for KVM's 10:232, as a jail's bind mount or mknod would make);
/// a path that is not KVM, or is missing, is a user error naming it.
#[test]
fn run_uses_the_kvm_device_it_is_given() {
    if kvm_or_skip("run_uses_the_kvm_device_it_is_given").is_none() {
        return;
    }
    let dir = TempDir::new("kvm-device");
    let node = dir.0.join("kvm");
    let made = std::process::Command::new("mknod")
        .arg(&node)
        .args(["c", "10", "232"])
        .status()
        .unwrap();
    assert!(made.success(), "mknod {} c 10 232 failed", node.display());
    let sock = dir.0.join("api.sock");
    let vm = RunningVm::start(
        &sock,
        &["--mem", "32M", "--kvm-device", node.to_str().unwrap()],
    );
    let out = gmemctl(&["status", "--api-sock", vm.sock(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (code, err) = vm.terminate();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("with 0 mismatches"), "{err}");

    // The path is what run opens: a device that is not KVM is refused, by name.
    let out = gmemctl(&["--kvm-device", "/dev/null", "run", "--mem", "32M"]);
    assert_user_error(&out, "/dev/null is not a KVM device");
    let out = gmemctl(&["--kvm-device", "/nonexistent/kvm", "run", "--mem", "32M"]);
    assert_user_error(&out, "/nonexistent/kvm does not exist");
}
