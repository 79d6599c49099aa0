//! Lab tests that run the real `/bin/gmemctl` in the guest and check its JSON against two nodes.

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

use super::Verdict;
use super::checks::GuestError;
use crate::report::Status;

const GMEMCTL: &str = "/bin/gmemctl";

/// The home and away nodes of the lab: moves go 0 -> 1 -> 0.
const HOME: u64 = 0;
const AWAY: u64 = 1;

/// What one gmemctl run printed, once its stdout parsed as JSON.
#[derive(Debug)]
struct Output {
    command: String,
    exit: Option<i32>,
    json: Value,
    stderr: String,
}

/// Runs `gmemctl <args>` and parses its stdout as JSON. `Err` carries the verdict to return
/// instead: a loud skip without gmemctl or without the subcommand, a failure for output that
/// is not JSON.
fn run_gmemctl(args: &[&str]) -> Result<Result<Output, Verdict>, GuestError> {
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
    let out = Command::new(GMEMCTL)
        .args(args)
        .output()
        .map_err(|source| GuestError::Spawn {
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

/// The last `max` bytes of `text` (at a char boundary).
fn tail(text: &str, max: usize) -> &str {
    let mut at = text.len().saturating_sub(max);
    while !text.is_char_boundary(at) {
        at += 1;
    }
    &text[at..]
}

fn verdict(problems: &[String], detail: Value) -> Verdict {
    Verdict {
        status: if problems.is_empty() {
            Status::Pass
        } else {
            Status::Fail
        },
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
}
