//! Lab tests that run the real `/bin/gmemctl` in the guest and check its JSON against two nodes.

use std::path::Path;
use std::process::Command;

use gmem::numa::{NodeId, NodeMask};
use gmem::sys::mempolicy::{self, MPOL_DEFAULT, MPOL_PREFERRED};
use serde_json::{Value, json};

use super::Verdict;
use super::checks::GuestError;
use crate::report::Status;

pub(super) const GMEMCTL: &str = "/bin/gmemctl";

/// The home and away nodes of the lab: moves go 0 -> 1 -> 0.
pub(super) const HOME: u64 = 0;
pub(super) const AWAY: u64 = 1;

/// What one gmemctl run printed, once its stdout parsed as JSON.
#[derive(Debug)]
pub(super) struct Output {
    pub command: String,
    pub exit: Option<i32>,
    pub json: Value,
    pub stderr: String,
}

/// Runs `gmemctl <args>` and parses its stdout as JSON. `Err` carries the verdict to return
/// instead: a loud skip without gmemctl or without the subcommand, a failure for output that
/// is not JSON.
pub(super) fn run_gmemctl(args: &[&str]) -> Result<Result<Output, Verdict>, GuestError> {
    run_gmemctl_preferring(args, None)
}

/// [`run_gmemctl`], with the child's memory preferring `node` where no other policy applies
/// (like `numactl --preferred`): the task policy is inherited across fork and exec.
fn run_gmemctl_preferring(
    args: &[&str],
    node: Option<u32>,
) -> Result<Result<Output, Verdict>, GuestError> {
    let skip = |reason: String, extra: Value| Verdict {
        status: Status::Skip,
        detail: json!({ "reason": reason, "output": extra }),
    };
    if !Path::new(GMEMCTL).exists() {
        return Ok(Err(skip(
            format!("{GMEMCTL} is not in the initramfs (gmem-lab run --gmemctl PATH)"),
            Value::Null,
        )));
    }
    let command = format!("{GMEMCTL} {}", args.join(" "));
    let mut cmd = Command::new(GMEMCTL);
    cmd.args(args);
    let out = match node {
        Some(node) => preferring(node, &command, || cmd.output())?,
        None => cmd.output(),
    };
    let out = out.map_err(|source| GuestError::Spawn {
        command: command.clone(),
        source,
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let missing = ["unrecognized subcommand", "unexpected argument"]
        .iter()
        .any(|p| stderr.contains(p));
    if !out.status.success() && missing {
        return Ok(Err(skip(
            format!("this gmemctl does not understand `{command}`"),
            json!({ "stderr": tail(&stderr, 2000) }),
        )));
    }
    match serde_json::from_str(&stdout) {
        Ok(json) => Ok(Ok(Output {
            command,
            exit: out.status.code(),
            json,
            stderr,
        })),
        Err(e) => Ok(Err(Verdict {
            status: Status::Fail,
            detail: json!({
                "command": command,
                "exit": out.status.code(),
                "error": format!("output is not JSON: {e}"),
                "stdout": tail(&stdout, 4000),
                "stderr": tail(&stderr, 4000),
            }),
        })),
    }
}

/// Runs `start` (which starts a child process) with this process's memory preferring
/// `node`, as `numactl --preferred` would start it: the task policy is inherited across fork
/// and exec. `command` names the child in errors.
pub(super) fn preferring<T>(
    node: u32,
    command: &str,
    start: impl FnOnce() -> T,
) -> Result<T, GuestError> {
    let policy_err = |source| GuestError::Spawn {
        command: command.to_owned(),
        source,
    };
    let mask = NodeMask::single(NodeId(node));
    mempolicy::set_mempolicy(MPOL_PREFERRED, mask.as_raw()).map_err(policy_err)?;
    let started = start();
    mempolicy::set_mempolicy(MPOL_DEFAULT, NodeMask::new().as_raw()).map_err(policy_err)?;
    Ok(started)
}

/// The last `max` bytes of `text` (at a char boundary).
pub(super) fn tail(text: &str, max: usize) -> &str {
    let mut at = text.len().saturating_sub(max);
    while !text.is_char_boundary(at) {
        at += 1;
    }
    &text[at..]
}

pub(super) fn verdict(problems: &[String], detail: Value) -> Verdict {
    Verdict {
        status: Status::pass_if(problems.is_empty()),
        detail,
    }
}

/// The node count in a probe report: the first of `numa_nodes`, `nodes`, `node_count`,
/// `online_nodes` found at the top level or one object down (an array counts its entries).
pub fn probe_node_count(v: &Value) -> Option<u64> {
    const KEYS: &[&str] = &["numa_nodes", "nodes", "node_count", "online_nodes"];
    let count = |x: &Value| match x {
        Value::Array(a) => Some(a.len() as u64),
        Value::Number(n) => n.as_u64(),
        _ => None,
    };
    let obj = v.as_object()?;
    KEYS.iter()
        .find_map(|k| obj.get(*k).and_then(count))
        .or_else(|| {
            obj.values()
                .filter_map(Value::as_object)
                .find_map(|o| KEYS.iter().find_map(|k| o.get(*k).and_then(count)))
        })
}

/// Whether a gmemctl report's `flags`-style object (`{"value":..,"names":[..]}`) names
/// MIGRATABLE: the kernel carries our migratable guest_memfd series.
fn names_migratable(flags: &Value) -> bool {
    flags["names"]
        .as_array()
        .is_some_and(|n| n.iter().any(|f| f == "MIGRATABLE"))
}

/// What is wrong with `gmemctl probe --json` on the lab's two nodes.
pub fn probe_problems(report: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let count = probe_node_count(report);
    if count != Some(2) {
        problems.push(format!("probe sees {count:?} NUMA nodes, not 2"));
    }
    let migratable = names_migratable(&report["guest_memfd_flags"]);
    let native = &report["native_migration"];
    let verdict = native["verdict"].as_str().unwrap_or("missing");
    let evidence = native["evidence"].as_str().unwrap_or("");
    if migratable {
        if verdict != "yes" {
            problems.push(format!(
                "the kernel advertises MIGRATABLE, but native_migration is `{verdict}`: {evidence}"
            ));
        }
    } else if verdict != "no" {
        problems.push(format!(
            "stock kernel (no MIGRATABLE), but native_migration is `{verdict}`, not `no`: {evidence}"
        ));
    } else if !evidence.contains("unmoved") {
        problems.push(format!(
            "native_migration is `no`, but its evidence does not say pages stayed unmoved: {evidence}"
        ));
    }
    problems
}

/// `gmemctl-probe`: two nodes, and the native-migration verdict that fits the kernel.
pub fn gmemctl_probe() -> Result<Verdict, GuestError> {
    let out = match run_gmemctl(&["probe", "--json"])? {
        Ok(out) => out,
        Err(verdict) => return Ok(verdict),
    };
    let mut problems = probe_problems(&out.json);
    if out.exit != Some(0) {
        problems.push(format!("gmemctl exited with {:?}", out.exit));
    }
    let detail = json!({
        "command": out.command,
        "node_count": probe_node_count(&out.json),
        "guest_memfd_flags": out.json["guest_memfd_flags"]["names"],
        "native_migration": out.json["native_migration"],
        "mbind_on_gmem": out.json["mbind_on_gmem"],
        "kernel_release": out.json["kernel_release"],
        "problems": problems,
    });
    Ok(verdict(&problems, detail))
}

/// What is wrong with one mechanism's moves in a selftest report: exactly 0 -> 1 then
/// 1 -> 0, each with every page on the target (move_pages and numa_maps) and bytes intact.
fn moves_problems(mechanism: &str, moves: &Value, pages: u64) -> Vec<String> {
    let mut problems = Vec::new();
    let moves = moves.as_array().map(Vec::as_slice).unwrap_or_default();
    let route: Vec<(Option<u64>, Option<u64>)> = moves
        .iter()
        .map(|m| (m["from"].as_u64(), m["to"].as_u64()))
        .collect();
    if route != [(Some(HOME), Some(AWAY)), (Some(AWAY), Some(HOME))] {
        problems.push(format!(
            "{mechanism}: expected moves {HOME}->{AWAY} and {AWAY}->{HOME}, got {route:?}"
        ));
    }
    for m in moves {
        let hop = format!("{mechanism} {}->{}", m["from"], m["to"]);
        if m["pages"].as_u64() != Some(pages) {
            problems.push(format!("{hop}: {} pages, not {pages}", m["pages"]));
        }
        for key in ["pages_on_target", "numa_maps_on_target"] {
            if m[key].as_u64() != Some(pages) {
                problems.push(format!("{hop}: {key} is {}, not {pages}", m[key]));
            }
        }
        if m["bytes_intact"] != Value::Bool(true) {
            problems.push(format!("{hop}: bytes not intact"));
        }
    }
    problems
}

/// What is wrong with `gmemctl selftest --json` on the lab's two nodes: remap and refault
/// must pass cross-node; native must skip because the kernel refused, unless the kernel
/// advertises MIGRATABLE, where it must pass too. A skip never counts as a pass.
pub fn selftest_problems(report: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let (home, away) = (report["home"].as_u64(), report["away"].as_u64());
    if (home, away) != (Some(HOME), Some(AWAY)) {
        problems.push(format!(
            "selftest ran home {home:?}, away {away:?}: not across nodes {HOME} and {AWAY}"
        ));
    }
    let pages = report["pages"].as_u64().unwrap_or(0);
    if pages == 0 {
        problems.push("the report has no page count".into());
    }
    let migratable = names_migratable(&report["flags"]);
    let results = report["results"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for mechanism in ["native", "remap", "refault"] {
        let Some(r) = results.iter().find(|r| r["mechanism"] == mechanism) else {
            problems.push(format!("{mechanism}: no result"));
            continue;
        };
        let result = r["result"].as_str().unwrap_or("missing");
        let reason = r["reason"].as_str().unwrap_or("");
        if mechanism == "native" && !migratable {
            if result != "skip" {
                problems.push(format!(
                    "native: stock kernel, expected SKIP (kernel refuses), got {result}: {reason}"
                ));
            } else if !reason.contains("kernel does not migrate gmem folios") {
                problems.push(format!(
                    "native: skipped, but not because the kernel refused: {reason}"
                ));
            }
            continue;
        }
        if result != "pass" {
            problems.push(format!("{mechanism}: {} ({reason})", result.to_uppercase()));
        }
        problems.extend(moves_problems(mechanism, &r["moves"], pages));
    }
    let expect_passed = if migratable { 3 } else { 2 };
    if report["passed"].as_u64() != Some(expect_passed) || report["failed"].as_u64() != Some(0) {
        problems.push(format!(
            "selftest counted {} passed, {} failed, {} skipped; expected {expect_passed} passed, 0 failed",
            report["passed"], report["failed"], report["skipped"]
        ));
    }
    problems
}

/// One line per move, for the detail: `remap 0->1: 4096/4096 on target (numa_maps 4096),
/// intact, PFNs changed 4096/4096`.
fn summarize_moves(report: &Value) -> Vec<String> {
    let results = report["results"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut lines = Vec::new();
    for r in results {
        let moves = r["moves"].as_array().map(Vec::as_slice).unwrap_or_default();
        if moves.is_empty() {
            lines.push(format!(
                "{}: {} {}",
                r["mechanism"].as_str().unwrap_or("?"),
                r["result"].as_str().unwrap_or("?").to_uppercase(),
                r["reason"].as_str().unwrap_or("")
            ));
        }
        for m in moves {
            lines.push(format!(
                "{} {}->{}: {} {}/{} on target (numa_maps {}), bytes {}, PFNs changed {}/{}, stop p99 {} us",
                r["mechanism"].as_str().unwrap_or("?"),
                m["from"],
                m["to"],
                r["result"].as_str().unwrap_or("?").to_uppercase(),
                m["pages_on_target"],
                m["pages"],
                m["numa_maps_on_target"],
                if m["bytes_intact"] == Value::Bool(true) {
                    "intact"
                } else {
                    "DIFFER"
                },
                m["pfns_changed"],
                m["pfns_checked"],
                m["stop_p99_us"],
            ));
        }
    }
    lines
}

/// `gmemctl-selftest`: the seed's selftest through gmemctl, across the lab's two nodes.
pub fn gmemctl_selftest() -> Result<Verdict, GuestError> {
    let out = match run_gmemctl(&["selftest", "--json", "--size", "16M"])? {
        Ok(out) => out,
        Err(verdict) => return Ok(verdict),
    };
    let mut problems = selftest_problems(&out.json);
    if out.exit != Some(0) {
        problems.push(format!(
            "gmemctl exited with {:?}: {}",
            out.exit,
            tail(out.stderr.trim(), 500)
        ));
    }
    let detail = json!({
        "command": out.command,
        "flags": out.json["flags"]["names"],
        "home": out.json["home"],
        "away": out.json["away"],
        "pages": out.json["pages"],
        "moves": summarize_moves(&out.json),
        "counts": { "passed": out.json["passed"], "failed": out.json["failed"],
                    "skipped": out.json["skipped"] },
        "problems": problems,
    });
    Ok(verdict(&problems, detail))
}

/// The content-check counts of a migration report or the demo's totals: `content_checks` and
/// `content_mismatches`, or `hash_checks` and `hash_mismatches` as reports named them before.
pub(super) fn content_counts(v: &Value) -> (Option<u64>, Option<u64>) {
    let first = |names: [&str; 2]| names.iter().find_map(|n| v[*n].as_u64());
    (
        first(["content_checks", "hash_checks"]),
        first(["content_mismatches", "hash_mismatches"]),
    )
}

/// The moves a demo report must show, as (to, in_place).
const DEMO_ROUTE: [(u64, bool); 2] = [(AWAY, false), (HOME, false)];

/// What is wrong with `gmemctl demo --json` on the lab's two nodes: all guest memory must
/// move 0 -> 1 -> 0, each move complete and verified (every page on the target afterwards,
/// no host-side hash mismatch), and the running guest must read back every word it wrote.
pub fn demo_problems(report: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    if report["scope"] != "cross_node" || report["home_node"].as_u64() != Some(HOME) {
        problems.push(format!(
            "the demo ran {} from node {}, not across nodes from node {HOME}",
            report["scope"], report["home_node"]
        ));
    }
    let pages = report["guest"]["pages"].as_u64().unwrap_or(0);
    if pages == 0 {
        problems.push("the report has no guest page count".into());
    }
    let moves = report["moves"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let route: Vec<(Option<u64>, Option<bool>)> = moves
        .iter()
        .map(|m| (m["to"].as_u64(), m["in_place"].as_bool()))
        .collect();
    let want: Vec<(Option<u64>, Option<bool>)> = DEMO_ROUTE
        .iter()
        .map(|&(to, p)| (Some(to), Some(p)))
        .collect();
    if route != want {
        problems.push(format!(
            "expected moves to node {AWAY} and back to node {HOME}, got {route:?}"
        ));
    }
    for m in moves {
        let r = &m["migration"];
        let what = format!("move {} (to node {})", m["number"], m["to"]);
        if r["complete"] != Value::Bool(true) {
            problems.push(format!("{what} is not complete"));
        }
        if r["pages_planned"].as_u64() != Some(pages) || r["pages_moved"].as_u64() != Some(pages) {
            problems.push(format!(
                "{what} moved {} of {} planned pages; the guest has {pages}",
                r["pages_moved"], r["pages_planned"]
            ));
        }
        let (checks, mismatches) = content_counts(r);
        if mismatches != Some(0) || checks.unwrap_or(0) == 0 {
            problems.push(format!(
                "{what}: content checked {checks:?} times, {mismatches:?} mismatches"
            ));
        }
        let to = m["to"].to_string();
        let after = r["after"].as_object();
        let on_target = after.and_then(|a| a.get(&to)).and_then(Value::as_u64);
        if on_target != Some(pages) || after.is_none_or(|a| a.len() != 1) {
            problems.push(format!(
                "{what}: pages per node afterwards are {}, not all {pages} on node {to}",
                r["after"]
            ));
        }
    }
    let check = &report["guest_check"];
    if check["mismatches"].as_u64() != Some(0) {
        problems.push(format!(
            "the guest read back {} wrong words",
            check["mismatches"]
        ));
    }
    if check["vcpu_failures"]
        .as_array()
        .is_none_or(|f| !f.is_empty())
    {
        problems.push(format!("vCPUs failed: {}", check["vcpu_failures"]));
    }
    let (_, total_mismatches) = content_counts(&report["totals"]);
    if total_mismatches != Some(0) || report["totals"]["complete"] != Value::Bool(true) {
        problems.push(format!(
            "totals: complete {}, content mismatches {total_mismatches:?}",
            report["totals"]["complete"]
        ));
    }
    if report["verdict"]["ok"] != Value::Bool(true) {
        problems.push(format!(
            "the demo's own verdict: {}",
            report["verdict"]["problems"]
        ));
    }
    problems
}

/// One line per move of a demo report, for the detail.
fn summarize_demo_moves(report: &Value) -> Vec<String> {
    let moves = report["moves"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    moves
        .iter()
        .map(|m| {
            let r = &m["migration"];
            let (checks, mismatches) = content_counts(r);
            format!(
                "move {} to node {} ({}): {}/{} pages, complete {}, pages after {}, content \
                 checked {} times / {} mismatches, PFNs changed {}/{}, stops {} (p99 {} us, max \
                 {} us, total {} us), {:.3} GB/s over {} us",
                m["number"],
                m["to"],
                r["mechanism"].as_str().unwrap_or("?"),
                r["pages_moved"],
                r["pages_planned"],
                r["complete"],
                r["after"],
                checks.map_or("?".into(), |c| c.to_string()),
                mismatches.map_or("?".into(), |c| c.to_string()),
                r["pfns_changed"],
                r["pfns_checked"],
                r["stops"]["count"],
                r["stops"]["p99_us"],
                r["stops"]["max_us"],
                r["stops"]["total_us"],
                r["throughput_gbps"].as_f64().unwrap_or(0.0),
                r["elapsed_us"],
            )
        })
        .collect()
}

/// `gmemctl-demo`: gmemctl's demo VM runs its memory-checking guest on nested KVM while all
/// its memory moves to node 1 and back. Its memory starts on node 0: gmemctl runs with a
/// preferred-node-0 task policy, as `numactl --preferred=0` would run it.
pub fn gmemctl_demo() -> Result<Verdict, GuestError> {
    let args = ["demo", "--json", "--mem", "64M", "--svg", "/tmp/demo.svg"];
    let out = match run_gmemctl_preferring(&args, Some(HOME as u32))? {
        Ok(out) => out,
        Err(verdict) => return Ok(verdict),
    };
    let mut problems = demo_problems(&out.json);
    if out.exit != Some(0) {
        problems.push(format!(
            "gmemctl exited with {:?}: {}",
            out.exit,
            tail(out.stderr.trim(), 500)
        ));
    }
    let j = &out.json;
    let detail = json!({
        "command": out.command,
        "scope": j["scope"],
        "home_node": j["home_node"],
        "guest": { "mem_bytes": j["guest"]["mem_bytes"], "pages": j["guest"]["pages"],
                   "vcpus": j["guest"]["vcpus"], "chunks": j["guest"]["chunks"] },
        "moves": summarize_demo_moves(j),
        "guest_check": {
            "mismatches": j["guest_check"]["mismatches"],
            "sweeps": j["guest_check"]["sweeps"],
            "bytes_verified": j["guest_check"]["bytes_verified"],
            "sweeps_after_last_move": j["guest_check"]["sweeps_after_last_move"],
            "vcpu_failures": j["guest_check"]["vcpu_failures"],
        },
        "guest_progress_share_during_moves": j["guest_progress"]["share_during"],
        "totals": j["totals"],
        "verdict": j["verdict"],
        "problems": problems,
    });
    Ok(verdict(&problems, detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_probe_node_counts() {
        assert_eq!(
            probe_node_count(&json!({"nodes": [{"id":0},{"id":1}]})),
            Some(2)
        );
        assert_eq!(
            probe_node_count(&json!({"numa": {"node_count": 2}})),
            Some(2)
        );
        assert_eq!(
            probe_node_count(&json!({"numa_nodes": 1, "nodes": [0, 1]})),
            Some(1)
        );
        assert_eq!(probe_node_count(&json!({"kvm": true})), None);
        assert_eq!(probe_node_count(&json!([1, 2])), None);
    }

    fn probe(names: &[&str], verdict: &str, evidence: &str) -> Value {
        json!({
            "guest_memfd_flags": { "value": 3, "names": names },
            "numa": { "nodes": [{"id": 0}, {"id": 1}] },
            "native_migration": { "verdict": verdict, "evidence": evidence },
        })
    }

    #[test]
    fn probe_verdict_must_fit_the_kernel() {
        let stock = ["MMAP", "INIT_SHARED"];
        let patched = ["MMAP", "INIT_SHARED", "MIGRATABLE"];
        let unmoved = "move_pages left 64 of 64 gmem pages unmoved and did not write status[]";
        assert!(probe_problems(&probe(&stock, "no", unmoved)).is_empty());
        assert_eq!(probe_problems(&probe(&stock, "yes", "moved")).len(), 1);
        assert_eq!(probe_problems(&probe(&stock, "no", "failed: EIO")).len(), 1);
        assert_eq!(
            probe_problems(&probe(&stock, "unknown", "one node")).len(),
            1
        );
        assert!(probe_problems(&probe(&patched, "yes", "moved 64/64")).is_empty());
        assert_eq!(probe_problems(&probe(&patched, "no", unmoved)).len(), 1);
        let mut one_node = probe(&stock, "no", unmoved);
        one_node["numa"]["nodes"] = json!([{"id": 0}]);
        assert_eq!(probe_problems(&one_node).len(), 1);
    }

    fn good_moves(pages: u64) -> Value {
        let hop = |from, to| {
            json!({"from": from, "to": to, "pages": pages, "pages_on_target": pages,
                   "numa_maps_on_target": pages, "bytes_intact": true})
        };
        json!([hop(0, 1), hop(1, 0)])
    }

    fn selftest(native: Value, flags: &[&str]) -> Value {
        let pages = 4096;
        let passed = if native["result"] == "pass" { 3 } else { 2 };
        let skipped = if native["result"] == "skip" { 1 } else { 0 };
        json!({
            "pages": pages, "home": 0, "away": 1,
            "flags": { "value": 3, "names": flags },
            "results": [
                native,
                {"mechanism": "remap", "result": "pass", "moves": good_moves(pages)},
                {"mechanism": "refault", "result": "pass", "moves": good_moves(pages)},
            ],
            "passed": passed, "failed": 0, "skipped": skipped,
        })
    }

    #[test]
    fn selftest_wants_cross_node_passes_and_an_honest_native_skip() {
        let refused = json!({"mechanism": "native", "result": "skip", "moves": [],
            "reason": "kernel does not migrate gmem folios: move_pages left 64 of 64 gmem pages unmoved"});
        let stock = ["MMAP", "INIT_SHARED"];
        assert!(selftest_problems(&selftest(refused.clone(), &stock)).is_empty());

        // A native skip for another reason is not what the stock kernel does.
        let mut other = refused.clone();
        other["reason"] = json!("the native mechanism cannot do this: one node");
        assert_eq!(selftest_problems(&selftest(other, &stock)).len(), 1);

        // On a kernel with MIGRATABLE, native must pass like the others.
        let patched = ["MMAP", "INIT_SHARED", "MIGRATABLE"];
        assert!(!selftest_problems(&selftest(refused, &patched)).is_empty());
        let native_pass =
            json!({"mechanism": "native", "result": "pass", "moves": good_moves(4096)});
        assert!(selftest_problems(&selftest(native_pass, &patched)).is_empty());
    }

    #[test]
    fn selftest_rejects_skips_partial_moves_and_one_node() {
        let refused = json!({"mechanism": "native", "result": "skip", "moves": [],
            "reason": "kernel does not migrate gmem folios: move_pages left 64 of 64 unmoved"});
        let stock = ["MMAP", "INIT_SHARED"];

        let mut skipped = selftest(refused.clone(), &stock);
        skipped["results"][1] = json!({"mechanism": "remap", "result": "skip", "moves": []});
        assert!(!selftest_problems(&skipped).is_empty());

        let mut partial = selftest(refused.clone(), &stock);
        partial["results"][2]["moves"][0]["numa_maps_on_target"] = json!(4000);
        assert_eq!(selftest_problems(&partial).len(), 1);

        let mut corrupt = selftest(refused.clone(), &stock);
        corrupt["results"][2]["moves"][1]["bytes_intact"] = json!(false);
        assert_eq!(selftest_problems(&corrupt).len(), 1);

        let mut one_node = selftest(refused, &stock);
        one_node["away"] = json!(0);
        assert!(!selftest_problems(&one_node).is_empty());
    }

    fn demo(pages: u64) -> Value {
        let hop = |number, to| {
            let mut after = serde_json::Map::new();
            after.insert(format!("{to}"), json!(pages));
            json!({"number": number, "to": to, "in_place": false, "migration": {
                "mechanism": "remap", "complete": true, "pages_planned": pages,
                "pages_moved": pages, "content_checks": 32, "content_mismatches": 0,
                "after": after, "stops": {"count": 32, "p99_us": 900, "max_us": 1200},
            }})
        };
        json!({
            "scope": "cross_node", "home_node": 0,
            "guest": {"pages": pages},
            "moves": [hop(1, 1), hop(2, 0)],
            "guest_check": {"mismatches": 0, "vcpu_failures": []},
            "totals": {"complete": true, "hash_mismatches": 0},
            "verdict": {"ok": true, "problems": []},
        })
    }

    #[test]
    fn demo_must_move_everything_there_and_back_without_a_mismatch() {
        assert!(demo_problems(&demo(16384)).is_empty());

        let mut same_node = demo(16384);
        same_node["scope"] = json!("same_node_relocation");
        assert_eq!(demo_problems(&same_node).len(), 1);

        let mut mismatch = demo(16384);
        mismatch["guest_check"]["mismatches"] = json!(3);
        assert_eq!(demo_problems(&mismatch).len(), 1);

        let mut partial = demo(16384);
        partial["moves"][0]["migration"]["pages_moved"] = json!(100);
        partial["moves"][0]["migration"]["complete"] = json!(false);
        assert_eq!(demo_problems(&partial).len(), 2);

        // Reports from before the rename say hash_*; a count under neither name is a problem.
        let mut old_names = demo(16384);
        old_names["moves"][0]["migration"] = json!({"complete": true, "pages_planned": 16384, "pages_moved": 16384,
                   "hash_checks": 32, "hash_mismatches": 0, "after": {"1": 16384}});
        assert!(demo_problems(&old_names).is_empty());
        let mut unchecked = demo(16384);
        unchecked["moves"][1]["migration"]["content_checks"] = json!(0);
        assert_eq!(demo_problems(&unchecked).len(), 1);
        let mut no_totals = demo(16384);
        no_totals["totals"] = json!({"complete": true});
        assert_eq!(demo_problems(&no_totals).len(), 1);

        let mut left_behind = demo(16384);
        left_behind["moves"][1]["migration"]["after"] = json!({"0": 16000, "1": 384});
        assert_eq!(demo_problems(&left_behind).len(), 1);

        let mut one_way = demo(16384);
        one_way["moves"].as_array_mut().unwrap().pop();
        assert_eq!(demo_problems(&one_way).len(), 1);
    }
}
