//! Lab tests for our patched kernel (kernel/: GUEST_MEMFD_FLAG_MIGRATABLE). They are not in
//! the default suite: on a stock kernel most of them must fail. `kernel/test-in-lab` runs them.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use gmem::memory::{ChunkLayout, GmemFlags, GmemOffset, GuestMemfd, GuestMemory, Policy};
use gmem::numa::{FrameNodes, NodeId, NodeMask, Pagemap};
use gmem::sys::kvm::DEFAULT_KVM_DEVICE;
use gmem::sys::kvm::KVM_CAP_GUEST_MEMFD_FLAGS;
use gmem::testing::{fill_seed_pattern, first_seed_mismatch};
use serde_json::{Value, json};

use super::kselftest::{self, tap_counts};
use super::{GuestError, TestInfo, Verdict};
use crate::report::{ECHO_PREFIX, Status};

const GMEMCTL: &str = "/bin/gmemctl";
const SELFTEST: &str = "/bin/guest_memfd_test";
const MEMORY_SYSFS: &str = "/sys/devices/system/memory";

/// The patched-kernel tests, in `kernel/test-in-lab`'s order.
pub const TESTS: &[TestInfo] = &[
    TestInfo {
        name: "kernel-selftest",
        about: "[patched kernel] /bin/guest_memfd_test (--bin) exits 0 with the new migration \
                tests run, not skipped: MIGRATABLE offered, pgmigrate_success +64 and \
                pgmigrate_fail +16, no kernel warning",
    },
    TestInfo {
        name: "native-selftest",
        about: "[patched kernel] `gmemctl selftest --mechanism native --size 16M` passes 0 -> 1 \
                -> 0: every page on target (move_pages and numa_maps), PFNs changed, bytes intact",
    },
    TestInfo {
        name: "native-demo",
        about: "[patched kernel] `gmemctl demo --mem 64M --mechanism native --verify placement`: \
                a running guest's memory moves to the other node and back natively, all of it, \
                with 0 mismatches and the guest running (stops only for stragglers, < 1% of the \
                time)",
    },
    TestInfo {
        name: "native-bench",
        about: "[patched kernel] `gmemctl bench --size 128M` node 0 -> 1, with full checks and \
                with placement checks: throughput and stops of native, remap and refault",
    },
    TestInfo {
        name: "linux-guest-native",
        about: "[patched kernel] like linux-guest, with native, our vmlinux booted through \
                PVH and its 2 vCPUs found in the MP table (acpi=off): a Linux guest on nested KVM checks its memory while the \
                kernel's own migration moves all of it 0 -> 1 -> 0; every move complete and \
                content-checked, every page on target, 0 mismatches",
    },
    TestInfo {
        name: "offline-movable",
        about: "[patched kernel, --hotplug-dimm] online the DIMM's blocks online_movable, put a \
                MIGRATABLE gmem in them, offline them: pages move out, bytes intact; a gmem \
                without the flag gets no page from ZONE_MOVABLE",
    },
];

/// Runs a patched-kernel test; `UnknownTest` for any other name.
pub fn dispatch(name: &str) -> Result<Verdict, GuestError> {
    match name {
        "kernel-selftest" => kernel_selftest(),
        "native-selftest" => native_selftest(),
        "native-demo" => native_demo(),
        "native-bench" => native_bench(),
        // With acpi=off our kernel (CONFIG_X86_MPPARSE) finds both vCPUs in the MP table, so
        // the lab proves both of the VMM's CPU tables: ACPI in linux-guest, this one here.
        "linux-guest-native" => {
            super::linux::linux_guest("native", 2, super::linux::CpuTables::MpTable)
        }
        "offline-movable" => offline_movable(),
        _ => Err(GuestError::UnknownTest(name.to_owned())),
    }
}

/// Whether `name` is one of these tests.
pub fn is_known(name: &str) -> bool {
    TESTS.iter().any(|t| t.name == name)
}

fn verdict(problems: &[String], mut detail: Value) -> Verdict {
    detail["problems"] = json!(problems);
    Verdict {
        status: Status::pass_if(problems.is_empty()),
        detail,
    }
}

/// Prints a one-line summary on the console (as `  | ...`) and returns it for the detail.
pub(super) fn summary(text: String) -> String {
    let _ = writeln!(io::stdout(), "{ECHO_PREFIX}{text}");
    text
}

/// The last `n` lines of `text`.
pub(super) fn last_lines(text: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// `/proc/vmstat` counters by name.
pub(super) fn vmstat() -> BTreeMap<String, u64> {
    fs::read_to_string("/proc/vmstat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect()
}

pub(super) fn counter(stat: &BTreeMap<String, u64>, name: &str) -> u64 {
    stat.get(name).copied().unwrap_or(0)
}

/// Kernel log lines that mean something went wrong in the kernel.
pub(super) fn kernel_warnings() -> Vec<String> {
    let out = Command::new("/bin/dmesg").output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    text.lines()
        .filter(|l| {
            ["WARNING:", "BUG:", "Oops", "Call Trace"]
                .iter()
                .any(|p| l.contains(p))
        })
        .map(str::to_owned)
        .collect()
}

/// What a selftest run did: its exit, its output, and what the kernel said and counted
/// meanwhile.
pub(super) struct MeasuredRun {
    pub(super) exit: Option<i32>,
    pub(super) signal: Option<i32>,
    pub(super) out: String,
    /// Kernel warnings that appeared during the run.
    pub(super) new_warnings: Vec<String>,
    /// Growth of /proc/vmstat's pgmigrate_success and pgmigrate_fail.
    pub(super) migrated: (u64, u64),
}

/// Runs a selftest binary with [`run_echoed`], noting the kernel warnings and the
/// pgmigrate counters before and after.
pub(super) fn run_measured(program: &str) -> Result<MeasuredRun, GuestError> {
    let warnings_before = kernel_warnings().len();
    let before = vmstat();
    let (exit, signal, out) = run_echoed(program, &[])?;
    let after = vmstat();
    let new_warnings = kernel_warnings()
        .into_iter()
        .skip(warnings_before)
        .collect();
    let delta = |name| counter(&after, name).saturating_sub(counter(&before, name));
    Ok(MeasuredRun {
        exit,
        signal,
        out,
        new_warnings,
        migrated: (delta("pgmigrate_success"), delta("pgmigrate_fail")),
    })
}

/// Runs `program args` and echoes its output on the console as it comes (`  | ...`).
/// Returns (exit code, signal, stdout+stderr).
pub(super) fn run_echoed(
    program: &str,
    args: &[&str],
) -> Result<(Option<i32>, Option<i32>, String), GuestError> {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = super::checks::spawn_shell(&command)?;
    let mut all = String::new();
    if let Some(out) = child.stdout.take() {
        let mut console = io::stdout();
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(console, "{ECHO_PREFIX}{line}");
            all.push_str(&line);
            all.push('\n');
        }
    }
    let status = child.wait().map_err(|source| GuestError::Spawn {
        command: command.clone(),
        source,
    })?;
    Ok((
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
        all,
    ))
}

/// `kernel-selftest`: the series' guest_memfd_test, with proof that its migration tests ran.
pub fn kernel_selftest() -> Result<Verdict, GuestError> {
    let mut problems = Vec::new();
    if !Path::new(SELFTEST).exists() {
        problems.push(format!(
            "{SELFTEST} is not in the initramfs: pass kernel/build's SELFTEST with --bin"
        ));
        return Ok(verdict(&problems, json!({})));
    }
    let kvm = gmem::sys::kvm::open(Path::new(DEFAULT_KVM_DEVICE))?;
    let vm = gmem::sys::kvm::create_vm(&kvm)?;
    let cap = vm.check_extension_raw(KVM_CAP_GUEST_MEMFD_FLAGS);
    if !GmemFlags(cap.max(0) as u64).contains(GmemFlags::MIGRATABLE) {
        problems.push(format!(
            "KVM_CAP_GUEST_MEMFD_FLAGS is {cap}: no MIGRATABLE, so the new tests would not run \
             (is this the patched kernel?)"
        ));
    }
    let MeasuredRun {
        exit,
        signal,
        out,
        new_warnings,
        migrated: (success, fail),
    } = run_measured(SELFTEST)?;
    let tap = tap_counts(&out);

    let kselftest_verdict = kselftest::verdict(exit, tap.totals.as_ref());
    if kselftest_verdict != Status::Pass {
        problems.push(format!(
            "{kselftest_verdict:?}: exit {exit:?} (signal {signal:?}), kselftest totals {:?}",
            tap.totals
        ));
    }
    if tap.not_ok > 0 || tap.skip > 0 {
        problems.push(format!(
            "{} test(s) failed and {} skipped",
            tap.not_ok, tap.skip
        ));
    }
    // 16 pages 0 -> 1 -> 0 in the plain test, and 16 pages 1 -> 0 -> 1 ... under a vCPU: 64
    // successes; the unflagged gmem's 16 pages must fail to move.
    if success < 64 {
        problems.push(format!(
            "pgmigrate_success rose by {success}, not >= 64: the migration tests did not run"
        ));
    }
    if fail < 16 {
        problems.push(format!(
            "pgmigrate_fail rose by {fail}, not >= 16: the stay-put test did not run"
        ));
    }
    if !new_warnings.is_empty() {
        problems.push(format!(
            "the kernel logged {} warning line(s)",
            new_warnings.len()
        ));
    }
    let text = summary(format!(
        "guest_memfd_test exit {exit:?}; KVM_CAP_GUEST_MEMFD_FLAGS {cap}; pgmigrate_success +{success}, \
         pgmigrate_fail +{fail}; TAP ok {} not-ok {} skip {}; kernel warnings {}",
        tap.ok,
        tap.not_ok,
        tap.skip,
        new_warnings.len()
    ));
    Ok(verdict(
        &problems,
        json!({
            "summary": text,
            "exit": exit,
            "signal": signal,
            "cap_guest_memfd_flags": cap,
            "pgmigrate_success_delta": success,
            "pgmigrate_fail_delta": fail,
            "tap": { "ok": tap.ok, "not_ok": tap.not_ok, "skip": tap.skip, "totals": tap.totals },
            "kernel_warnings": new_warnings,
            "output_tail": last_lines(&out, 20),
        }),
    ))
}

/// Runs `/bin/gmemctl args` and parses its stdout as JSON. `Err` holds a failed verdict.
fn gmemctl_json(args: &[&str]) -> Result<Result<Value, Verdict>, GuestError> {
    let command = format!("{GMEMCTL} {}", args.join(" "));
    if !Path::new(GMEMCTL).exists() {
        return Ok(Err(verdict(
            &[format!(
                "{GMEMCTL} is not in the initramfs (gmem-lab run --gmemctl PATH)"
            )],
            json!({ "command": command }),
        )));
    }
    let out = Command::new(GMEMCTL)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| GuestError::Spawn {
            command: command.clone(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    match serde_json::from_str::<Value>(&stdout) {
        Ok(v) if out.status.success() => Ok(Ok(v)),
        parsed => Ok(Err(verdict(
            &[format!("`{command}` exited {:?}", out.status.code())],
            json!({
                "command": command,
                "exit": out.status.code(),
                "report": parsed.ok(),
                "stdout_tail": last_lines(&stdout, 15),
                "stderr_tail": last_lines(&stderr, 15),
            }),
        ))),
    }
}

/// `native-selftest`: gmemctl's version of the seed's selftest, native only, 0 -> 1 -> 0.
pub fn native_selftest() -> Result<Verdict, GuestError> {
    let report = match gmemctl_json(&[
        "selftest",
        "--json",
        "--mechanism",
        "native",
        "--size",
        "16M",
    ])? {
        Ok(v) => v,
        Err(v) => return Ok(v),
    };
    let mut problems = Vec::new();
    let result = &report["results"][0];
    if result["mechanism"] != "native" || result["result"] != "pass" {
        problems.push(format!(
            "native result {} ({})",
            result["result"], result["reason"]
        ));
    }
    let moves = result["moves"].as_array().cloned().unwrap_or_default();
    let route: Vec<(u64, u64)> = moves
        .iter()
        .map(|m| {
            (
                m["from"].as_u64().unwrap_or(99),
                m["to"].as_u64().unwrap_or(99),
            )
        })
        .collect();
    if route != [(0, 1), (1, 0)] {
        problems.push(format!("moves {route:?}, not 0 -> 1 -> 0"));
    }
    let mut lines = Vec::new();
    for m in &moves {
        let pages = m["pages"].as_u64().unwrap_or(0);
        let ok = pages > 0
            && m["pages_on_target"].as_u64() == Some(pages)
            && m["numa_maps_on_target"].as_u64() == Some(pages)
            && m["pfns_changed"].as_u64() == Some(pages)
            && m["bytes_intact"] == true;
        if !ok {
            problems.push(format!(
                "move {} -> {} is incomplete: {m}",
                m["from"], m["to"]
            ));
        }
        lines.push(format!(
            "{}->{}: {}/{pages} pages on target by move_pages, {} by numa_maps, {} PFNs changed, bytes intact {}, {:.3} GB/s",
            m["from"],
            m["to"],
            m["pages_on_target"],
            m["numa_maps_on_target"],
            m["pfns_changed"],
            m["bytes_intact"],
            m["throughput_gbps"].as_f64().unwrap_or(0.0)
        ));
    }
    let text = summary(format!(
        "selftest native, {} ({}): {}",
        report["size_bytes"],
        report["flags"]["names"],
        lines.join("; ")
    ));
    Ok(verdict(
        &problems,
        json!({ "summary": text, "flags": report["flags"], "moves": moves }),
    ))
}

/// Straggler stops a native move may need (seen: 0 or 1 a move).
const MAX_STRAGGLER_STOPS: u64 = 3;

/// `native-demo`: a running guest's memory moves natively while it runs, with no mismatch.
pub fn native_demo() -> Result<Verdict, GuestError> {
    let report = match gmemctl_json(&[
        "demo",
        "--json",
        "--mem",
        "64M",
        "--mechanism",
        "native",
        "--verify",
        "placement",
        "--svg",
        "/tmp/demo-placement.svg",
    ])? {
        Ok(v) => v,
        Err(v) => return Ok(v),
    };
    let mut problems = Vec::new();
    if report["scope"] != "cross_node" {
        problems.push(format!("scope {}, not cross_node", report["scope"]));
    }
    if report["verdict"]["ok"] != true {
        problems.push(format!("demo verdict: {}", report["verdict"]));
    }
    let moves = report["moves"].as_array().cloned().unwrap_or_default();
    let mut per_move = Vec::new();
    for m in &moves {
        let g = &m["migration"];
        let planned = g["pages_planned"].as_u64().unwrap_or(0);
        if g["mechanism"] != "native" {
            problems.push(format!("move {} used {}", m["number"], g["mechanism"]));
        }
        if g["complete"] != true
            || g["pages_not_moved"] != 0
            || g["pages_moved"].as_u64() != Some(planned)
        {
            problems.push(format!(
                "move {} incomplete: {} of {planned} pages",
                m["number"], g["pages_moved"]
            ));
        }
        let guest_pages = report["guest"]["pages"].as_u64().unwrap_or(0);
        let on_target = m["to"].as_u64().map(|t| g["after"][t.to_string()].as_u64());
        if guest_pages == 0 || on_target != Some(Some(guest_pages)) {
            problems.push(format!(
                "after move {}, {on_target:?} of {guest_pages} guest pages are on node {}",
                m["number"], m["to"]
            ));
        }
        // Native copies with the guest running. The only stops allowed are the few short
        // ones in which gmem moves the pages a vCPU kept faulting on (see gmem's native.rs).
        let stops = g["stops"]["count"].as_u64().unwrap_or(0);
        if stops > MAX_STRAGGLER_STOPS {
            problems.push(format!(
                "move {} stopped the guest {stops} times (at most {MAX_STRAGGLER_STOPS}): {}",
                m["number"], g["stops"]
            ));
        }
        per_move.push(json!({
            "to": m["to"],
            "mechanism": g["mechanism"],
            "pages_moved": g["pages_moved"],
            "pfns_changed": g["pfns_changed"],
            "after": g["after"],
            "stops": g["stops"],
            "elapsed_us": g["elapsed_us"],
            "throughput_gbps": g["throughput_gbps"],
            "guest_sweeps_during": m["guest_rate"]["sweeps"],
        }));
    }
    // The guest's memory starts where the kernel put it (mostly the node of the thread that
    // faulted it in), so the moves go to the other node and back, in either order.
    let route: Vec<u64> = moves.iter().filter_map(|m| m["to"].as_u64()).collect();
    if route.len() != 2 || route[0] == route[1] || route.iter().any(|&n| n > 1) {
        problems.push(format!("moves went to {route:?}, not to node 0 and node 1"));
    }
    let check = &report["guest_check"];
    if check["mismatches"] != 0 {
        problems.push(format!("the guest saw {} mismatches", check["mismatches"]));
    }
    // What those stops cost beyond getting the vCPUs out (the kick, which under TCG alone
    // took 37 ms once, when the whole straggler stop took 40): at most 1% of the moves.
    let stopped_us: u64 = moves
        .iter()
        .map(|m| m["migration"]["stops"]["total_us"].as_u64().unwrap_or(0))
        .sum();
    let elapsed_us: u64 = moves
        .iter()
        .map(|m| m["migration"]["elapsed_us"].as_u64().unwrap_or(0))
        .sum();
    let latency = &check["stop_latency"];
    let kick_us = (latency["mean_us"].as_f64().unwrap_or(0.0)
        * latency["count"].as_f64().unwrap_or(0.0)) as u64;
    let held_us = stopped_us.saturating_sub(kick_us);
    if held_us * 100 > elapsed_us {
        problems.push(format!(
            "native held the guest stopped for {held_us} us beyond the kicks ({stopped_us} us \
             in all, {kick_us} us of them the vCPUs taking the kick) of {elapsed_us} us of \
             moves (over 1%)"
        ));
    }
    let during = report["guest_progress"]["during"]["sweeps"]
        .as_u64()
        .unwrap_or(0);
    if during == 0 {
        problems.push("the guest made no progress while its memory moved".to_owned());
    }
    let sum = |key: &str| {
        moves
            .iter()
            .map(|m| m["migration"][key].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let stop_total: u64 = moves
        .iter()
        .map(|m| m["migration"]["stops"]["total_us"].as_u64().unwrap_or(0))
        .sum();
    let stop_max = moves
        .iter()
        .map(|m| m["migration"]["stops"]["max_us"].as_u64().unwrap_or(0))
        .max()
        .unwrap_or(0);
    let text = summary(format!(
        "demo native, 64 MiB guest, 2 vCPUs: moves to {route:?}, {} pages moved in {} steps over {} ms; \
         straggler stops {} (max {stop_max} us, total {stop_total} us), guest holds {}, \
         mismatches {}, guest sweeps during the moves {during} ({:.0}% of its undisturbed rate), \
         {} bytes verified by the guest",
        report["totals"]["pages_moved"],
        sum("steps"),
        sum("elapsed_us") / 1000,
        moves
            .iter()
            .map(|m| m["migration"]["stops"]["count"].as_u64().unwrap_or(0))
            .sum::<u64>(),
        check["quiesce_hold"]["count"],
        check["mismatches"],
        report["guest_progress"]["share_during"]
            .as_f64()
            .unwrap_or(0.0)
            * 100.0,
        check["bytes_verified"],
    ));
    Ok(verdict(
        &problems,
        json!({
            "summary": text,
            "moves": per_move,
            "totals": report["totals"],
            "guest_progress": report["guest_progress"],
            "guest_check": check,
            "verdict": report["verdict"],
        }),
    ))
}

/// The figures of one bench row, as `native-bench` reports them.
fn bench_row(row: &Value) -> Value {
    json!({
        "throughput_gbps": row["throughput_gbps"],
        "ratio_to_memcpy": row["ratio_to_memcpy"],
        "stops": row["stops"],
        "pages_moved": row["pages_moved"],
        "pfns_changed": row["pfns_changed"],
        "bytes_intact": row["bytes_intact"],
    })
}

/// `native-bench`: native vs remap vs refault, 128 MiB node 0 -> 1, both verification levels.
pub fn native_bench() -> Result<Verdict, GuestError> {
    let mut problems = Vec::new();
    let mut runs = serde_json::Map::new();
    let mut lines = Vec::new();
    for verify in ["full", "placement"] {
        let report = match gmemctl_json(&["bench", "--json", "--size", "128M", "--verify", verify])?
        {
            Ok(v) => v,
            Err(v) => return Ok(v),
        };
        if report["from"] != 0 || report["to"] != 1 {
            problems.push(format!(
                "bench moved {} -> {}, not 0 -> 1",
                report["from"], report["to"]
            ));
        }
        let pages = report["size_bytes"].as_u64().unwrap_or(0) / 4096;
        let rows = report["rows"].as_array().cloned().unwrap_or_default();
        let find = |name: &str| {
            rows.iter()
                .find(|r| r["name"] == name)
                .cloned()
                .unwrap_or(Value::Null)
        };
        let mut mechs = serde_json::Map::new();
        for name in ["native", "remap", "refault"] {
            let row = find(name);
            if !row["skipped"].is_null()
                || row["pages_moved"].as_u64() != Some(pages)
                || row["bytes_intact"] != true
            {
                problems.push(format!(
                    "verify {verify}: {name} did not move all {pages} pages intact: {row}"
                ));
            }
            mechs.insert(name.to_owned(), bench_row(&row));
        }
        let gbps = |name: &str| mechs[name]["throughput_gbps"].as_f64().unwrap_or(0.0);
        let stop = |name: &str, k: &str| mechs[name]["stops"][k].as_u64().unwrap_or(0);
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let ratios = json!({
            "native_vs_remap_throughput": ratio(gbps("native"), gbps("remap")),
            "native_vs_refault_throughput": ratio(gbps("native"), gbps("refault")),
            "remap_vs_refault_throughput": ratio(gbps("remap"), gbps("refault")),
        });
        for name in ["native", "remap", "refault"] {
            lines.push(format!(
                "verify {verify}: {name:<7} {:.3} GB/s, stops n={} p50 {} us p99 {} us max {} us total {} us",
                gbps(name),
                stop(name, "count"),
                stop(name, "p50_us"),
                stop(name, "p99_us"),
                stop(name, "max_us"),
                stop(name, "total_us"),
            ));
        }
        lines.push(format!(
            "verify {verify}: native/remap throughput {:.2}x, native/refault {:.2}x; memcpy {:.2} GB/s, naive refault {:.3} GB/s",
            ratios["native_vs_remap_throughput"].as_f64().unwrap_or(0.0),
            ratios["native_vs_refault_throughput"].as_f64().unwrap_or(0.0),
            report["memcpy_gbps"].as_f64().unwrap_or(0.0),
            report["naive_gbps"].as_f64().unwrap_or(0.0),
        ));
        runs.insert(
            verify.to_owned(),
            json!({
                "machine": report["machine"],
                "size_bytes": report["size_bytes"],
                "memcpy_gbps": report["memcpy_gbps"],
                "naive_refault_gbps": report["naive_gbps"],
                "mechanisms": mechs,
                "ratios": ratios,
            }),
        );
    }
    // Without content hashes nothing stops the guest for native: the kernel copies each folio
    // while KVM's invalidation keeps the guest off it.
    if runs["placement"]["mechanisms"]["native"]["stops"]["count"] != 0 {
        problems.push("native stopped the guest without content hashes".to_owned());
    }
    let lines: Vec<String> = lines.into_iter().map(summary).collect();
    Ok(verdict(
        &problems,
        json!({ "summary": lines, "runs": runs }),
    ))
}

/// One memory block in /sys/devices/system/memory.
#[derive(Debug, Clone)]
struct Block {
    index: u64,
    /// First and one-past-last page frame.
    pfns: (u64, u64),
    node: Option<u32>,
}

impl Block {
    fn dir(&self) -> String {
        format!("{MEMORY_SYSFS}/memory{}", self.index)
    }

    fn read(&self, file: &str) -> String {
        fs::read_to_string(format!("{}/{file}", self.dir()))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|e| format!("<{e}>"))
    }

    fn set_state(&self, state: &str) -> Result<(), String> {
        fs::write(format!("{}/state", self.dir()), state)
            .map_err(|e| format!("memory{}: echo {state} > state: {e}", self.index))
    }

    fn contains(&self, pfn: u64) -> bool {
        (self.pfns.0..self.pfns.1).contains(&pfn)
    }
}

/// The memory blocks that are offline now (those of a cold-plugged DIMM, with
/// CONFIG_MHP_DEFAULT_ONLINE_TYPE_OFFLINE).
fn offline_blocks() -> Result<Vec<Block>, GuestError> {
    let read = |p: &str| {
        fs::read_to_string(p)
            .map(|s| s.trim().to_owned())
            .map_err(|source| GuestError::ReadSys {
                path: p.into(),
                source,
            })
    };
    let block_bytes =
        u64::from_str_radix(&read(&format!("{MEMORY_SYSFS}/block_size_bytes"))?, 16).unwrap_or(0);
    let frames = block_bytes / gmem::memory::page_size();
    let mut blocks = Vec::new();
    let entries = fs::read_dir(MEMORY_SYSFS).map_err(|source| GuestError::ReadSys {
        path: MEMORY_SYSFS.into(),
        source,
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(index) = name
            .strip_prefix("memory")
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        if read(&format!("{}/state", dir.display()))? != "offline" {
            continue;
        }
        let phys = u64::from_str_radix(&read(&format!("{}/phys_index", dir.display()))?, 16)
            .unwrap_or(index);
        let node = fs::read_dir(&dir).ok().and_then(|d| {
            d.flatten().find_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("node"))
                    .and_then(|n| n.parse().ok())
            })
        });
        blocks.push(Block {
            index,
            pfns: (phys * frames, (phys + 1) * frames),
            node,
        });
    }
    blocks.sort_by_key(|b| b.index);
    Ok(blocks)
}

/// A gmem-backed guest memory of `size` bytes bound to node 1 and filled with the seed
/// pattern, on its own VM (bound to a memslot), with its PFNs.
struct Filled {
    memory: GuestMemory,
    pages: usize,
}

impl Filled {
    fn new(size: u64, flags: GmemFlags, bind_slot: bool) -> Result<Self, GuestError> {
        let kvm = gmem::sys::kvm::open(Path::new(DEFAULT_KVM_DEVICE))?;
        let vm = Arc::new(gmem::sys::kvm::create_vm(&kvm)?);
        let memory = GuestMemory::create(vm, ChunkLayout::single_slot(size), flags)?;
        if bind_slot {
            memory.bind_to_vm()?;
        }
        memory.set_policy(
            GmemOffset(0),
            size,
            &Policy::Bind(NodeMask::single(NodeId(1))),
        )?;
        fill_seed_pattern(&memory)?;
        Ok(Filled {
            memory,
            pages: (size / gmem::memory::page_size()) as usize,
        })
    }

    fn pfns(&self) -> Result<Vec<Option<u64>>, GuestError> {
        let map = self.memory.mapping()?;
        Pagemap::open_self()
            .and_then(|p| p.pfns(map.addr() as u64, self.pages))
            .map_err(|e| GuestError::ReadSys {
                path: "/proc/self/pagemap".into(),
                source: io::Error::other(e),
            })
    }

    fn intact(&self) -> Result<bool, GuestError> {
        Ok(first_seed_mismatch(&self.memory)?.is_none())
    }
}

fn in_blocks(pfns: &[Option<u64>], blocks: &[Block]) -> usize {
    pfns.iter()
        .filter(|p| p.is_some_and(|p| blocks.iter().any(|b| b.contains(p))))
        .count()
}

fn per_node(pfns: &[Option<u64>]) -> BTreeMap<String, usize> {
    let frames = FrameNodes::read();
    let mut h = BTreeMap::new();
    for p in pfns {
        let key = match (p, &frames) {
            (None, _) => "not present".to_owned(),
            (Some(pfn), Some(f)) => f
                .node_of(*pfn)
                .map_or("unknown".to_owned(), |n| format!("N{}", n.0)),
            (Some(_), None) => "unknown".to_owned(),
        };
        *h.entry(key).or_insert(0) += 1;
    }
    h
}

/// `offline-movable`: memory offlining moves a MIGRATABLE gmem out of ZONE_MOVABLE; a gmem
/// without the flag never gets ZONE_MOVABLE pages.
pub fn offline_movable() -> Result<Verdict, GuestError> {
    const SIZE: u64 = 32 << 20;
    let mut problems: Vec<String> = Vec::new();
    let blocks: Vec<Block> = offline_blocks()?
        .into_iter()
        .filter(|b| b.node == Some(1))
        .collect();
    if blocks.is_empty() {
        problems
            .push("no offline memory block on node 1: boot the lab with --hotplug-dimm".to_owned());
        return Ok(verdict(&problems, json!({})));
    }
    let names: Vec<String> = blocks
        .iter()
        .map(|b| format!("memory{}", b.index))
        .collect();
    for b in &blocks {
        if let Err(e) = b.set_state("online_movable") {
            problems.push(e);
        }
    }
    let onlined: Vec<Value> = blocks
        .iter()
        .map(|b| {
            json!({ "block": b.index, "pfns": [b.pfns.0, b.pfns.1], "state": b.read("state"),
                         "valid_zones": b.read("valid_zones") })
        })
        .collect();
    if blocks
        .iter()
        .any(|b| b.read("state") != "online" || b.read("valid_zones") != "Movable")
    {
        problems.push("the DIMM's blocks are not online in ZONE_MOVABLE".to_owned());
        return Ok(verdict(&problems, json!({ "blocks": onlined })));
    }

    let vmstat_before = vmstat();
    let kvm = gmem::sys::kvm::open(Path::new(DEFAULT_KVM_DEVICE))?;
    let flags = GuestMemfd::host_mappable_flags(&gmem::sys::kvm::create_vm(&kvm)?)
        .unwrap_or(GmemFlags::HOST_MAPPABLE);
    if !flags.contains(GmemFlags::MIGRATABLE) {
        problems.push(format!(
            "the kernel does not offer MIGRATABLE (host-mappable flags {flags})"
        ));
        return Ok(verdict(&problems, json!({ "blocks": onlined })));
    }
    // The MIGRATABLE gmem is bound to a memslot of its VM, as a guest's memory would be.
    let movable = Filled::new(SIZE, flags, true)?;
    let plain = Filled::new(SIZE, GmemFlags::HOST_MAPPABLE, false)?;
    let movable_before = movable.pfns()?;
    let plain_before = plain.pfns()?;
    let pages = movable.pages;
    let movable_in = in_blocks(&movable_before, &blocks);
    let plain_in = in_blocks(&plain_before, &blocks);
    if movable_in != pages {
        problems.push(format!(
            "only {movable_in} of {pages} MIGRATABLE gmem pages are in the ZONE_MOVABLE blocks"
        ));
    }
    if plain_in != 0 {
        problems.push(format!(
            "{plain_in} pages of the gmem without MIGRATABLE are in ZONE_MOVABLE"
        ));
    }

    let mut offline = Vec::new();
    for b in &blocks {
        let result = b.set_state("offline");
        let state = b.read("state");
        if let Err(e) = &result {
            problems.push(e.clone());
        } else if state != "offline" {
            problems.push(format!("memory{} reads `{state}` after offlining", b.index));
        }
        offline.push(json!({ "block": b.index, "result": result.err(), "state": state }));
    }
    let movable_intact = movable.intact()?;
    let plain_intact = plain.intact()?;
    let movable_after = movable.pfns()?;
    let plain_after = plain.pfns()?;
    let vmstat_after = vmstat();
    let left_in = in_blocks(&movable_after, &blocks);
    let present = movable_after.iter().filter(|p| p.is_some()).count();
    let changed = movable_before
        .iter()
        .zip(&movable_after)
        .filter(|(b, a)| b.is_some() && a.is_some() && b != a)
        .count();
    let plain_changed = plain_before
        .iter()
        .zip(&plain_after)
        .filter(|(b, a)| b != a)
        .count();
    if left_in != 0 || present != pages {
        problems.push(format!(
            "after offlining, {left_in} MIGRATABLE pages are still in the blocks and {present} of {pages} are present"
        ));
    }
    if changed != pages {
        problems.push(format!(
            "{changed} of {pages} MIGRATABLE pages have new PFNs, not all"
        ));
    }
    if !movable_intact || !plain_intact {
        problems.push(format!(
            "bytes changed: MIGRATABLE intact {movable_intact}, without the flag intact {plain_intact}"
        ));
    }
    let delta = |name| counter(&vmstat_after, name).saturating_sub(counter(&vmstat_before, name));
    let warnings = kernel_warnings();
    if !warnings.is_empty() {
        problems.push(format!(
            "the kernel logged {} warning line(s)",
            warnings.len()
        ));
    }
    let text = summary(format!(
        "offline: {} ({} MiB) onlined Movable; MIGRATABLE gmem {pages} pages, {movable_in} in ZONE_MOVABLE; \
         gmem without the flag {plain_in} in ZONE_MOVABLE; offline {}; afterwards {left_in} left in the \
         blocks, {changed} new PFNs, nodes {:?}, bytes intact {movable_intact} (unflagged: {plain_intact}, \
         {plain_changed} PFNs changed); pgmigrate_success +{}, pgmigrate_fail +{}",
        names.join(","),
        (blocks.len() as u64 * (blocks[0].pfns.1 - blocks[0].pfns.0) * gmem::memory::page_size())
            >> 20,
        if offline.iter().all(|o| o["state"] == "offline") {
            "ok"
        } else {
            "FAILED"
        },
        per_node(&movable_after),
        delta("pgmigrate_success"),
        delta("pgmigrate_fail"),
    ));
    Ok(verdict(
        &problems,
        json!({
            "summary": text,
            "blocks": onlined,
            "offline": offline,
            "gmem_bytes": SIZE,
            "migratable": {
                "flags": flags.to_string(),
                "memslot": true,
                "pages_in_movable_blocks_before": movable_in,
                "nodes_before": per_node(&movable_before),
                "pages_in_blocks_after": left_in,
                "pfns_changed": changed,
                "nodes_after": per_node(&movable_after),
                "bytes_intact": movable_intact,
            },
            "without_flag": {
                "flags": GmemFlags::HOST_MAPPABLE.to_string(),
                "pages_in_movable_blocks": plain_in,
                "nodes": per_node(&plain_before),
                "pfns_changed_by_offlining": plain_changed,
                "bytes_intact": plain_intact,
            },
            "pgmigrate_success_delta": delta("pgmigrate_success"),
            "pgmigrate_fail_delta": delta("pgmigrate_fail"),
            "kernel_warnings": warnings,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tests_are_named_once_and_dispatch() {
        for t in TESTS {
            assert!(is_known(t.name));
            assert_eq!(TESTS.iter().filter(|u| u.name == t.name).count(), 1);
        }
        assert!(matches!(dispatch("nope"), Err(GuestError::UnknownTest(_))));
    }

    #[test]
    fn blocks_contain_their_frames() {
        let b = Block {
            index: 40,
            pfns: (40 * 32768, 41 * 32768),
            node: Some(1),
        };
        assert!(b.contains(40 * 32768));
        assert!(!b.contains(41 * 32768));
        assert_eq!(in_blocks(&[Some(40 * 32768), None, Some(5)], &[b]), 1);
    }
}
