//! The in-guest agent: `gmem-lab guest <test>` runs one lab test and prints its result line.

mod checks;
mod foreign;
mod full_node;
mod gmemctl;
mod hold_kvm;
mod kselftest;
mod linux;
mod patched;
mod policy;
mod upstream;

use std::io::Write;
use std::panic::{self, AssertUnwindSafe};
use std::process::ExitCode;
use std::time::Instant;

use serde_json::json;

use crate::report::{Status, TestResult, error_chain};

pub use checks::GuestError;
pub use full_node::hog;
pub use hold_kvm::hold_kvm;
pub use kselftest::{Case, CaseResult};
pub use patched::TESTS as PATCHED;
pub use upstream::TESTS as UPSTREAM;

/// The kernel parameter with the lab's CPU count (`gmemlab.cpus=N`); the runner sets it, and
/// the `nodes` test checks that the kernel brought up that many, half on each node.
pub const CPUS_PARAM: &str = "gmemlab.cpus";

/// A built-in lab test.
#[derive(Debug, Clone, Copy)]
pub struct TestInfo {
    pub name: &'static str,
    pub about: &'static str,
}

/// The built-in tests, in their default order.
pub const BUILTIN: &[TestInfo] = &[
    TestInfo {
        name: "nodes",
        about: "two online NUMA nodes with memory, each with half of the --cpus online; \
                /dev/kvm opens (after insmod or built in)",
    },
    TestInfo {
        name: "anon-control",
        about: "anonymous memory bound to node 0 moves to node 1 and back with move_pages: \
                proves the nodes are real",
    },
    TestInfo {
        name: "gmem-stock",
        about: "a guest_memfd made with MMAP|INIT_SHARED (no MIGRATABLE) stays on node 0 under \
                move_pages and mbind(MPOL_MF_MOVE|STRICT), every byte intact; reports how the \
                kernel refused",
    },
    TestInfo {
        name: "gmem-policy",
        about: "one guest_memfd, two mappings: a bind to node 1 through one reaches a write \
                fault through the other and fallocate (KVM's allocation path) where the \
                kernel keeps the policy per inode (from 6.19), and neither before; the other \
                mapping's get_mempolicy shows it likewise",
    },
    TestInfo {
        name: "gmemctl-probe",
        about: "`/bin/gmemctl probe --json` sees 2 NUMA nodes, and native migration `no` with \
                pages left unmoved (`yes` if the kernel advertises MIGRATABLE)",
    },
    TestInfo {
        name: "gmemctl-selftest",
        about: "`/bin/gmemctl selftest --json --size 16M`: remap and refault PASS 0 -> 1 -> 0 \
                (every page on target by move_pages and numa_maps, bytes intact); native SKIPs \
                because the kernel refused (PASS if it advertises MIGRATABLE)",
    },
    TestInfo {
        name: "gmemctl-demo",
        about: "`/bin/gmemctl demo --json --mem 64M`: the demo guest runs on nested KVM while \
                all its memory moves 0 -> 1 -> 0; every move complete (all pages on target, no \
                hash mismatch), 0 guest mismatches",
    },
    TestInfo {
        name: "full-node",
        about: "a hog fills node 1 below what a 128 MiB migration needs; remap and refault \
                to node 1 stop partway with a refusal for lack of memory, every byte intact, \
                no OOM kill",
    },
    TestInfo {
        name: LINUX_GUEST,
        about: "`gmemctl run --kernel` boots the lab's Debian kernel (a bzImage) as a 256 \
                MiB guest on nested KVM that brings up both its vCPUs from the VMM's ACPI \
                tables, whose /init (gmem-lab memcheck) writes and verifies 64 \
                MiB sweep after sweep; all its memory moves to node 1 and back with remap \
                (complete, content-checked, every resident page on the target, 2 sweeps after \
                each move), 0 mismatches, gmemctl run exits 0 on SIGTERM",
    },
    TestInfo {
        name: CHURN,
        about: "the same nested Linux guest, booted once, has all its memory moved back and \
                forth 20 times with remap and 20 times with refault, each move complete and \
                content-checked, 2 sweeps after each: 0 resets, 0 mismatches",
    },
    TestInfo {
        name: "foreign-linux-guest",
        about: "the same nested Linux guest under `gmemctl run`, reached only by its PID: \
                `gmemctl status PID` counts at least what the guest kernel handed out, more \
                than the VMM maps; `gmemctl migrate --pid` moves all of it 0 -> 1 -> 0 \
                (refault, stopping the VMM; native on a kernel with MIGRATABLE), complete, \
                content-checked, every page on the target, 2 sweeps after each, 0 mismatches",
    },
    TestInfo {
        name: "firecracker",
        about: "Firecracker (guest_memfd branch, /bin/firecracker) boots the nested Linux \
                guest on one guest_memfd; by its PID, status counts what the guest used and \
                migrate --pid moves all of it 0 -> 1 -> 0 by stop-the-VMM refault with 0 \
                mismatches; on a kernel with MIGRATABLE, native is refused for it, pages \
                unmoved",
    },
    TestInfo {
        name: "linux-guest-reboot",
        about: "the same nested guest's checker stops after 2 sweeps and reboots (reboot=k, \
                the i8042 reset line): `gmemctl run` sees the reset and exits 0 by itself, \
                the console ends with `done sweeps=2 mismatches=0`",
    },
];

/// The prefix of an ad-hoc test: `exec:<command>` runs the command in the guest. If it prints
/// kselftest's `# Totals:` line, any fail or error fails, no pass skips, and a pass needs a
/// pass and exit 0; otherwise exit 0 passes, 4 skips (the kselftest convention), others fail.
pub const EXEC_PREFIX: &str = "exec:";

/// `linux-guest`: the Linux guest (2 vCPUs) moved to node 1 and back with remap.
const LINUX_GUEST: &str = "linux-guest";
/// `linux-guest-churn`: the Linux guest moved back and forth 20 times with remap, then 20
/// times with refault.
const CHURN: &str = "linux-guest-churn";
/// `linux-guest-churn` with KVM's trace events recorded, for a post-mortem: not in the
/// default list, as tracing changes the timing it is hunting.
const CHURN_TRACED: &str = "linux-guest-churn-traced";
/// Diagnostic: four fresh boots, each moved 0 -> 1 -> 0 at once, traced.
const REBOOTS: &str = "linux-guest-reboots";

/// Names of the tests `gmem-lab run` runs by default.
pub fn default_tests() -> Vec<String> {
    BUILTIN.iter().map(|t| t.name.to_owned()).collect()
}

/// Whether the agent knows how to run `name`.
pub fn is_known(name: &str) -> bool {
    BUILTIN.iter().any(|t| t.name == name)
        || name == CHURN_TRACED
        || name == REBOOTS
        || patched::is_known(name)
        || upstream::is_known(name)
        || name
            .strip_prefix(EXEC_PREFIX)
            .is_some_and(|c| !c.trim().is_empty())
}

/// What a test concluded, with its evidence.
#[derive(Debug)]
pub struct Verdict {
    pub status: Status,
    pub detail: serde_json::Value,
}

fn dispatch(name: &str) -> Result<Verdict, GuestError> {
    match name {
        "nodes" => checks::nodes(),
        "anon-control" => checks::anon_control(),
        "gmem-stock" => checks::gmem_stock(),
        "gmem-policy" => policy::gmem_policy(),
        "gmemctl-probe" => gmemctl::gmemctl_probe(),
        "gmemctl-selftest" => gmemctl::gmemctl_selftest(),
        "gmemctl-demo" => gmemctl::gmemctl_demo(),
        "full-node" => full_node::full_node(),
        LINUX_GUEST => linux::linux_guest("remap", 2, linux::CpuTables::Acpi),
        "linux-guest-reboot" => linux::linux_guest_reboot(),
        "foreign-linux-guest" => foreign::foreign_linux_guest(),
        "firecracker" => foreign::firecracker(),
        CHURN => linux::linux_guest_churn(&["remap", "refault"], false),
        CHURN_TRACED => linux::linux_guest_churn(&["remap", "refault"], true),
        REBOOTS => linux::linux_guest_reboots(),
        _ => match name.strip_prefix(EXEC_PREFIX) {
            Some(cmd) if !cmd.trim().is_empty() => checks::exec(cmd),
            _ if upstream::is_known(name) => upstream::dispatch(name),
            _ => patched::dispatch(name),
        },
    }
}

/// Runs one test and prints exactly one `GMEMLAB-RESULT` line. A test that errors or panics
/// is reported as a failure with the cause; the exit code is 0 once the line is out.
pub fn run(name: &str) -> ExitCode {
    let start = Instant::now();
    let verdict = match panic::catch_unwind(AssertUnwindSafe(|| dispatch(name))) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => Verdict {
            status: Status::Fail,
            detail: json!({ "error": error_chain(&e) }),
        },
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_owned());
            Verdict {
                status: Status::Fail,
                detail: json!({ "error": format!("the test panicked: {msg}") }),
            }
        }
    };
    let result = TestResult {
        test: name.to_owned(),
        status: verdict.status,
        detail: verdict.detail,
        duration_ms: Some(u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)),
    };
    // One write for the whole line, so nothing else on the console can split it.
    let line = format!("{}\n", result.to_line());
    let mut out = std::io::stdout().lock();
    if out
        .write_all(line.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        return ExitCode::from(3);
    }
    ExitCode::SUCCESS
}
