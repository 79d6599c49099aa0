//! `foreign-linux-guest` and `firecracker`: a VMM gmemctl reaches only by its PID. A Linux
//! guest verifying its memory runs under `gmemctl run` (left alone: no API call) or under
//! Firecracker; `gmemctl status PID` must count every page the guest uses, and
//! `gmemctl migrate --pid` must move all of it 0 -> 1 -> 0 while the guest keeps verifying.
//!
//! Which mechanism moves it follows from the kernel and the guest_memfd: native where the
//! VMM made its guest_memfd MIGRATABLE and the kernel has the flag (our series, `gmemctl run`);
//! stop-the-VMM refault everywhere else (Debian's kernel; Firecracker, which never sets it).

use std::fs::{self, File};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::{Value, json};

use super::Verdict;
use super::checks::GuestError;
use super::gmemctl::{AWAY, GMEMCTL, HOME, preferring, run_gmemctl, tail, verdict};
use super::linux::{
    self, BOOT_TIMEOUT, CMDLINE, CONSOLE, CpuTables, MEMCHECK_MIB, TAIL_LINES, VMM_LOG, Vmm,
};
use crate::initramfs::{L2_INITRAMFS, L2_KERNEL};
use crate::memcheck::{MIB_VAR, ROLE, ROLE_VAR};
use crate::report::Status;

/// Where the initramfs holds Firecracker (`lab/run` adds it; `gmem-lab run --bin PATH`).
pub const FIRECRACKER: &str = "/bin/firecracker";
/// Firecracker's machine configuration, written by the test.
const FIRECRACKER_CONFIG: &str = "/tmp/firecracker.json";
/// Firecracker's guest RAM, in MiB: one guest_memfd of this size.
const FIRECRACKER_MIB: u64 = 256;
/// The stop budget of each batch. A stop of every thread of a VMM costs a few ms under TCG
/// before any byte is copied, so at the CLI's 1 ms every batch would be the smallest one.
const MAX_STOP: &str = "20ms";

/// Whether the status summary of a guest_memfd names the MIGRATABLE flag as set.
fn is_migratable(summary: &Value) -> bool {
    summary["flags"]
        .as_array()
        .is_some_and(|n| n.iter().any(|f| f == "MIGRATABLE"))
}

/// Whether this kernel advertises MIGRATABLE (our series), from `gmemctl probe --json`.
fn kernel_has_migratable() -> Result<Result<bool, Verdict>, GuestError> {
    Ok(run_gmemctl(&["probe", "--json"])?.map(|out| {
        out.json["guest_memfd_flags"]["names"]
            .as_array()
            .is_some_and(|n| n.iter().any(|f| f == "MIGRATABLE"))
    }))
}

/// Resident pages per node of a status entry, zero counts left out.
fn per_node(gmem: &Value) -> Vec<(String, u64)> {
    linux::nonzero_nodes(&gmem["pages_per_node"])
}

/// What is wrong with `gmemctl status PID --json` for a VMM whose guest has had `used_kib`
/// handed out by its kernel: one host-mappable guest_memfd, holding at least that much,
/// counted with the pages only the guest touched (more than the VMM maps itself).
pub fn status_problems(status: &Value, used_kib: Option<u64>, page_size: u64) -> Vec<String> {
    let mut problems = Vec::new();
    let gmems = status["guest_memfds"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if gmems.len() != 1 {
        problems.push(format!("status found {} guest_memfds, not 1", gmems.len()));
        return problems;
    }
    let g = &gmems[0];
    if g["host_mappable"] != true {
        problems.push("status: the guest_memfd is not host-mappable".into());
    }
    let resident = g["resident_pages"].as_u64().unwrap_or(0);
    let counted: u64 = per_node(g).iter().map(|(_, p)| p).sum();
    if counted != resident {
        problems.push(format!(
            "status: {counted} pages per node, but {resident} resident"
        ));
    }
    match used_kib {
        Some(kib) if resident * page_size < kib << 10 => problems.push(format!(
            "status counts {resident} resident pages ({} KiB), fewer than the {kib} KiB the \
             guest kernel had handed out",
            (resident * page_size) >> 10
        )),
        Some(_) => {}
        None => problems.push("the guest never said how much memory it used".into()),
    }
    let vmm_mapped = g["vmm_mapped_pages"].as_u64().unwrap_or(0);
    if resident <= vmm_mapped {
        problems.push(format!(
            "status counts {resident} resident pages, no more than the {vmm_mapped} the VMM \
             maps: the guest's own pages are not counted"
        ));
    }
    problems
}

/// What is wrong with `gmemctl migrate --pid --json` for a move of all of a VMM's guest
/// memory to `to` with `mechanism`.
pub fn migration_problems(result: &Value, to: u64, mechanism: &str, verify: &str) -> Vec<String> {
    let what = format!("move to node {to}");
    let mut problems = Vec::new();
    if result["complete"] != true {
        problems.push(format!("{what}: not complete"));
    }
    let gmems = result["guest_memfds"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if gmems.is_empty() {
        problems.push(format!("{what}: no guest_memfd moved"));
    }
    for g in gmems {
        let r = &g["report"];
        let fd = &g["fds"];
        if r["mechanism"] != mechanism {
            problems.push(format!(
                "{what}: fd {fd} moved by {}, not {mechanism}",
                r["mechanism"]
            ));
        }
        let (planned, moved) = (r["pages_planned"].as_u64(), r["pages_moved"].as_u64());
        if r["complete"] != true || moved.unwrap_or(0) == 0 || moved != planned {
            problems.push(format!(
                "{what}: fd {fd}: {moved:?} of {planned:?} planned pages moved, complete {}",
                r["complete"]
            ));
        }
        if r["failures"].as_array().is_none_or(|f| !f.is_empty()) {
            problems.push(format!("{what}: fd {fd}: failed steps {}", r["failures"]));
        }
        // Placement-only verification hashes nothing (the guest's own checker still reads).
        let unchecked = verify == "full" && r["content_checks"].as_u64().unwrap_or(0) == 0;
        if r["content_mismatches"] != 0 || unchecked {
            problems.push(format!(
                "{what}: fd {fd}: {} content checks, {} mismatches",
                r["content_checks"], r["content_mismatches"]
            ));
        }
        let after = linux::nonzero_nodes(&r["after"]);
        if after.len() != 1 || after[0].0 != to.to_string() {
            problems.push(format!(
                "{what}: fd {fd}: pages per node afterwards {}",
                r["after"]
            ));
        }
    }
    problems
}

/// The figures of one move, for the detail and the closing comparison.
fn move_summary(result: &Value) -> Value {
    let gmems: Vec<Value> = result["guest_memfds"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|g| {
            let r = &g["report"];
            json!({
                "fds": g["fds"],
                "mechanism": r["mechanism"],
                "pages_planned": r["pages_planned"],
                "pages_moved": r["pages_moved"],
                "pfns_changed": r["pfns_changed"],
                "content_checks": r["content_checks"],
                "content_mismatches": r["content_mismatches"],
                "stops": r["stops"],
                "steps": r["steps"],
                "elapsed_us": r["elapsed_us"],
                "throughput_gbps": r["throughput_gbps"],
                "before": r["before"],
                "after": r["after"],
                "notes": r["notes"],
                "failures": r["failures"],
            })
        })
        .collect();
    json!({
        "complete": result["complete"],
        "stop_method": result["stop_method"],
        "found": result["found"],
        "future_allocations": result["future_allocations"],
        "guest_memfds": gmems,
    })
}

/// `gmemctl status PID --json`.
fn status_of(pid: u32) -> Result<Result<Value, String>, GuestError> {
    let pid = pid.to_string();
    Ok(match run_gmemctl(&["status", &pid, "--json"])? {
        Ok(out) if out.exit == Some(0) => Ok(out.json),
        Ok(out) => Err(format!(
            "gmemctl status {pid} exited with {:?}: {}",
            out.exit,
            tail(out.stderr.trim(), 500)
        )),
        Err(v) => Err(format!("gmemctl status {pid}: {}", v.detail)),
    })
}

/// One move of all the VMM's guest memory to `to`, by PID, then two more sweeps
/// of the guest in its new place. Problems go to `problems`; `Err` in the inner result ends
/// the moves (the guest stopped making progress).
fn move_by_pid(
    vmm: &mut Vmm,
    to: u64,
    mechanism: &str,
    verify: &str,
    problems: &mut Vec<String>,
) -> Result<Result<Value, String>, GuestError> {
    let pid = vmm.child.id().to_string();
    let node = to.to_string();
    let sweeps_before = linux::read_console().1.sweeps;
    let moving = Instant::now();
    let args = [
        "migrate",
        "--pid",
        &pid,
        "--policy",
        "bind",
        "--nodes",
        &node,
        "--max-stop",
        MAX_STOP,
        "--verify",
        verify,
        "--json",
    ];
    let out = match run_gmemctl(&args)? {
        Ok(out) => out,
        Err(v) => {
            return Ok(Err(format!(
                "gmemctl migrate --pid to node {to}: {}",
                v.detail
            )));
        }
    };
    let move_s = moving.elapsed().as_secs_f64();
    let sweeps_at_end = linux::read_console().1.sweeps;
    let mut mine = migration_problems(&out.json, to, mechanism, verify);
    if out.exit != Some(0) {
        mine.push(format!(
            "gmemctl migrate --pid to node {to} exited with {:?}: {}",
            out.exit,
            tail(out.stderr.trim(), 500)
        ));
    }
    let placement = match status_of(vmm.child.id())? {
        Ok(status) => {
            let gmems = status["guest_memfds"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for g in &gmems {
                let on = per_node(g);
                if on.len() != 1 || on[0].0 != node {
                    mine.push(format!(
                        "status after the move to node {to}: fd {} has pages per node {}",
                        g["fds"], g["pages_per_node"]
                    ));
                }
            }
            gmems
                .iter()
                .map(|g| json!({"fds": g["fds"], "pages_per_node": g["pages_per_node"]}))
                .collect()
        }
        Err(e) => {
            mine.push(e);
            Vec::new()
        }
    };
    let after = linux::sweeps_after_move(vmm, to, sweeps_at_end);
    let detail = json!({
        "to": to,
        "verify": verify,
        "command": out.command,
        "move_s": move_s,
        "sweeps_before": sweeps_before,
        "sweeps_during": sweeps_at_end.saturating_sub(sweeps_before),
        "sweeps_after": after.as_ref().map_or(Value::Null, |m| json!(m.sweeps)),
        "migration": move_summary(&out.json),
        "placement_after": placement,
    });
    problems.extend(mine);
    Ok(after.map(|_| detail))
}

/// What the two foreign tests share once the VMM's guest is `ready`: status, then moves to
/// node 1 and back by PID with `mechanism` expected. Returns the detail.
fn status_and_moves(
    vmm: &mut Vmm,
    used_kib: Option<u64>,
    mechanism: &'static str,
    problems: &mut Vec<String>,
) -> Result<Value, GuestError> {
    let mut detail = json!({});
    let status = match status_of(vmm.child.id())? {
        Ok(s) => s,
        Err(e) => {
            problems.push(e);
            return Ok(detail);
        }
    };
    let page_size = status["page_size"].as_u64().unwrap_or(4096);
    problems.extend(status_problems(&status, used_kib, page_size));
    let gmem = &status["guest_memfds"][0];
    detail["status"] = json!({
        "guest_used_kib": used_kib,
        "size_bytes": gmem["size_bytes"],
        "flags": gmem["flags"]["set"]["names"],
        "resident_pages": gmem["resident_pages"],
        "pages_per_node": gmem["pages_per_node"],
        "vmm_mapped_pages": gmem["vmm_mapped_pages"],
        "policy": gmem["policy"],
    });
    detail["mechanism"] = json!(mechanism);
    let mut moves = Vec::new();
    // Native goes out with placement checks only, never stopping the VMM, and comes back
    // with content hashes, which stop it for each batch: the cost of each, measured.
    let verifies = match mechanism {
        "native" => ["placement", "full"],
        _ => ["full", "full"],
    };
    for (to, verify) in [AWAY, HOME].into_iter().zip(verifies) {
        match move_by_pid(vmm, to, mechanism, verify, problems)? {
            Ok(m) => moves.push(m),
            Err(e) => {
                problems.push(e);
                break;
            }
        }
    }
    detail["moves"] = json!(moves);
    Ok(detail)
}

/// Adds the guest's own verdict (mismatches, errors, panics) and, on failure, the tails.
fn finish(vmm: Vmm, mut detail: Value, mut problems: Vec<String>, vmm_log: &str) -> Verdict {
    drop(vmm);
    let (console, m) = linux::read_console();
    if m.mismatch_lines > 0 || m.failed_sweeps > 0 || m.kernel_panic {
        problems.push(format!(
            "the guest found wrong memory or panicked: {} MISMATCH lines, {} failed sweeps, \
             panic {}",
            m.mismatch_lines, m.failed_sweeps, m.kernel_panic
        ));
    }
    if !m.errors.is_empty() {
        problems.push(format!("the guest's checker failed: {:?}", m.errors));
    }
    detail["sweeps"] = json!(m.sweeps);
    detail["mismatch_lines"] = json!(m.mismatch_lines);
    detail["guest_kernel_alerts"] = json!(linux::kernel_alerts(&console));
    if !problems.is_empty() {
        detail["console_tail"] = json!(linux::last_lines(&console, TAIL_LINES));
        detail["vmm_log_tail"] = json!(linux::last_lines(vmm_log, TAIL_LINES));
    }
    detail["problems"] = json!(problems);
    verdict(&problems, detail)
}

/// Stops the VMM with SIGTERM; a VMM that had already gone is a problem (a crash or reset).
fn stop(vmm: &mut Vmm, problems: &mut Vec<String>) -> Option<i32> {
    match vmm.terminate() {
        Ok(status) => status.code(),
        Err(e) => {
            problems.push(e);
            None
        }
    }
}

/// `foreign-linux-guest`: `gmemctl run --kernel` boots the Linux guest and is then treated
/// as a VMM gmemctl did not write: status and migrate by PID only.
pub fn foreign_linux_guest() -> Result<Verdict, GuestError> {
    if let Some(verdict) = linux::preflight()? {
        return Ok(verdict);
    }
    let kernel_migratable = match kernel_has_migratable()? {
        Ok(yes) => yes,
        Err(v) => return Ok(v),
    };
    let (mut vmm, command, started, booted, boot_retries) =
        linux::boot_until_ready(2, CpuTables::Acpi.cmdline())?;
    let mut problems = Vec::new();
    let mut detail = json!({});
    match booted {
        Err(e) => problems.push(e),
        Ok(m) => {
            detail = status_and_moves(
                &mut vmm,
                m.used_kib,
                // gmemctl run makes its guest_memfd MIGRATABLE where the kernel has the flag;
                // from outside the flag cannot be seen, so native is tried and must hold.
                if kernel_migratable {
                    "native"
                } else {
                    "refault"
                },
                &mut problems,
            )?;
            let code = stop(&mut vmm, &mut problems);
            if code != Some(0) {
                problems.push(format!("gmemctl run exited with {code:?} after SIGTERM"));
            }
        }
    }
    detail["command"] = json!(command);
    detail["boot_s"] = json!(started.elapsed().as_secs_f64());
    detail["boot_retries"] = json!(boot_retries);
    detail["kernel_migratable"] = json!(kernel_migratable);
    let vmm_log = fs::read_to_string(VMM_LOG).unwrap_or_default();
    Ok(finish(vmm, detail, problems, &vmm_log))
}

/// Starts Firecracker on the lab's kernel and memcheck initramfs, with no API and no seccomp
/// (the lab's TCG CPU is not one its filters were written for), its memory preferring node 0.
fn start_firecracker() -> Result<(Vmm, String), GuestError> {
    for stale in [CONSOLE, VMM_LOG] {
        let _ = fs::remove_file(stale);
    }
    let config = json!({
        "boot-source": {
            "kernel_image_path": L2_KERNEL,
            "initrd_path": L2_INITRAMFS,
            "boot_args": format!("{CMDLINE} {ROLE_VAR}={ROLE} {MIB_VAR}={MEMCHECK_MIB}"),
        },
        "machine-config": {
            "vcpu_count": 1,
            "mem_size_mib": FIRECRACKER_MIB,
            "secret_free": true,
        },
        "drives": [],
    });
    let spawn_err = |command: String| move |source| GuestError::Spawn { command, source };
    fs::write(FIRECRACKER_CONFIG, config.to_string())
        .map_err(spawn_err(format!("writing {FIRECRACKER_CONFIG}")))?;
    let args = [
        "--no-api",
        "--no-seccomp",
        "--config-file",
        FIRECRACKER_CONFIG,
    ];
    let command = format!("{FIRECRACKER} {}", args.join(" "));
    // Its stdout is the guest's serial console.
    let console = File::create(CONSOLE).map_err(spawn_err(format!("creating {CONSOLE}")))?;
    let log = File::create(VMM_LOG).map_err(spawn_err(format!("creating {VMM_LOG}")))?;
    let mut cmd = Command::new(FIRECRACKER);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(console)
        .stderr(log);
    gmem::sys::process::kill_with_parent(&mut cmd);
    let child =
        preferring(HOME as u32, &command, || cmd.spawn())?.map_err(spawn_err(command.clone()))?;
    Ok((
        Vmm {
            child,
            name: "firecracker",
        },
        command,
    ))
}

/// On our kernel, `--mechanism native` for Firecracker's guest_memfd (no MIGRATABLE) must be
/// refused, with the reason, and leave every page where it was.
fn native_refused(pid: u32, problems: &mut Vec<String>) -> Result<Value, GuestError> {
    let before = status_of(pid)?;
    let pid_arg = pid.to_string();
    let node = AWAY.to_string();
    let args = [
        "migrate",
        "--pid",
        &pid_arg,
        "--policy",
        "bind",
        "--nodes",
        &node,
        "--mechanism",
        "native",
        "--json",
    ];
    let command = format!("{GMEMCTL} {}", args.join(" "));
    let out = Command::new(GMEMCTL)
        .args(args)
        .output()
        .map_err(|source| GuestError::Spawn {
            command: command.clone(),
            source,
        })?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let after = status_of(pid)?;
    let nodes = |s: &Result<Value, String>| {
        s.as_ref()
            .map(|s| s["guest_memfds"][0]["pages_per_node"].clone())
            .unwrap_or(Value::Null)
    };
    let moved_any = per_node(
        &after
            .as_ref()
            .map(|s| s["guest_memfds"][0].clone())
            .unwrap_or_default(),
    )
    .iter()
    .any(|(n, _)| *n == node);
    if out.status.success() {
        problems.push(format!(
            "`{command}` succeeded for a guest_memfd without MIGRATABLE: {}",
            tail(&stdout, 500)
        ));
    }
    let said = format!("{stderr}{stdout}");
    if !["does not migrate gmem", "refused", "MIGRATABLE"]
        .iter()
        .any(|w| said.contains(w))
    {
        problems.push(format!(
            "`{command}` failed without saying that the kernel refused: {}",
            tail(said.trim(), 500)
        ));
    }
    // The move bound the gmem to the target before it was refused; that must be undone, or
    // the VMM's next allocations go where none of its memory is.
    let policy_after = after
        .as_ref()
        .map(|s| s["guest_memfds"][0]["policy"].clone())
        .unwrap_or(Value::Null);
    if policy_after
        .as_str()
        .is_some_and(|p| p.contains(&format!("bind:{node}")))
    {
        problems.push(format!(
            "the refused native move left the VMM's mapping with policy {policy_after}"
        ));
    }
    if moved_any {
        problems.push(format!(
            "the refused native move left pages on node {node}: {}",
            nodes(&after)
        ));
    }
    Ok(json!({
        "command": command,
        "exit": out.status.code(),
        "said": tail(said.trim(), 800),
        "before": nodes(&before),
        "after": nodes(&after),
        "policy_after": policy_after,
    }))
}

/// `firecracker`: a real Firecracker (its guest_memfd branch) boots the Linux guest; gmemctl
/// counts and moves its memory by PID. Firecracker never makes its guest_memfd MIGRATABLE,
/// so on both kernels stop-the-VMM refault moves it, and on ours native is refused.
pub fn firecracker() -> Result<Verdict, GuestError> {
    if !Path::new(FIRECRACKER).exists() {
        return Ok(Verdict {
            status: Status::Skip,
            detail: json!({
                "reason": format!(
                    "{FIRECRACKER} is not in the initramfs: lab/run adds ../shared/vmms/firecracker \
                     (or $GMEM_FIRECRACKER); gmem-lab run --bin PATH"
                )
            }),
        });
    }
    if let Some(verdict) = linux::preflight()? {
        return Ok(verdict);
    }
    let kernel_migratable = match kernel_has_migratable()? {
        Ok(yes) => yes,
        Err(v) => return Ok(v),
    };
    let (mut vmm, command) = start_firecracker()?;
    let started = Instant::now();
    let mut problems = Vec::new();
    let ready = linux::wait_console(&mut vmm, BOOT_TIMEOUT, "`ready` from the guest", |m| {
        m.ready.is_some()
    });
    let boot_s = started.elapsed().as_secs_f64();
    let mut detail = json!({});
    match ready {
        Err(e) => problems.push(e),
        Ok(m) => {
            let refusal = if kernel_migratable {
                Some(native_refused(vmm.child.id(), &mut problems)?)
            } else {
                None
            };
            detail = status_and_moves(&mut vmm, m.used_kib, "refault", &mut problems)?;
            if is_migratable(&detail["status"]) {
                problems
                    .push("Firecracker's guest_memfd shows MIGRATABLE, which it never sets".into());
            }
            detail["native_refused"] = json!(refusal);
            stop(&mut vmm, &mut problems);
        }
    }
    detail["command"] = json!(command);
    detail["boot_s"] = json!(boot_s);
    detail["kernel_migratable"] = json!(kernel_migratable);
    let vmm_log = fs::read_to_string(VMM_LOG).unwrap_or_default();
    Ok(finish(vmm, detail, problems, &vmm_log))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(resident: u64, vmm_mapped: u64) -> Value {
        json!({"page_size": 4096, "guest_memfds": [{
            "fds": [40], "host_mappable": true, "resident_pages": resident,
            "pages_per_node": {"0": resident, "1": 0}, "vmm_mapped_pages": vmm_mapped,
        }]})
    }

    #[test]
    fn status_must_count_what_the_guest_used() {
        assert!(status_problems(&status(30000, 3867), Some(100_000), 4096).is_empty());
        // 20000 pages are 80000 KiB: fewer than the guest had.
        assert_eq!(
            status_problems(&status(20000, 3867), Some(100_000), 4096).len(),
            1
        );
        // Only what the VMM maps: numa_maps' view.
        assert_eq!(
            status_problems(&status(3867, 3867), Some(10_000), 4096).len(),
            1
        );
        assert_eq!(status_problems(&status(30000, 0), None, 4096).len(), 1);
        assert_eq!(status_problems(&json!({}), Some(1), 4096).len(), 1);
    }

    fn moved(to: u64, mechanism: &str) -> Value {
        let mut after = serde_json::Map::new();
        after.insert(to.to_string(), json!(20000));
        json!({"complete": true, "guest_memfds": [{"fds": [40], "report": {
            "mechanism": mechanism, "complete": true, "pages_planned": 20000,
            "pages_moved": 20000, "failures": [], "content_checks": 300,
            "content_mismatches": 0, "after": after,
        }}]})
    }

    #[test]
    fn a_move_by_pid_must_take_every_page_with_the_expected_mechanism() {
        assert!(migration_problems(&moved(1, "refault"), 1, "refault", "full").is_empty());
        assert_eq!(
            migration_problems(&moved(1, "refault"), 1, "native", "full").len(),
            1
        );
        assert_eq!(
            migration_problems(&moved(0, "refault"), 1, "refault", "full").len(),
            1
        );
        let mut half = moved(1, "refault");
        half["complete"] = json!(false);
        half["guest_memfds"][0]["report"]["pages_moved"] = json!(10000);
        assert_eq!(migration_problems(&half, 1, "refault", "full").len(), 2);
        let mut bad = moved(1, "refault");
        bad["guest_memfds"][0]["report"]["content_mismatches"] = json!(1);
        assert_eq!(migration_problems(&bad, 1, "refault", "full").len(), 1);
        assert_eq!(
            migration_problems(&json!({}), 1, "refault", "full").len(),
            2
        );
        let mut unhashed = moved(1, "native");
        unhashed["guest_memfds"][0]["report"]["content_checks"] = json!(0);
        assert!(migration_problems(&unhashed, 1, "native", "placement").is_empty());
        assert_eq!(migration_problems(&unhashed, 1, "native", "full").len(), 1);
    }
}
