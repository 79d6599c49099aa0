//! Upstream's own kernel selftests in the lab: tools/testing/selftests/mm's `migration`.

use std::path::Path;

use serde_json::json;

use super::checks::{cpu_count, parse_list, read_sys};
use super::kselftest::{self, CaseResult, Totals};
use super::patched::{MeasuredRun, last_lines, run_measured, summary};
use super::{GuestError, TestInfo, Verdict};
use crate::report::Status;

/// Where `--bin` puts kernel/build's MIGRATION_SELFTEST.
const MIGRATION: &str = "/bin/migration";
/// migration.c starts `CPUs - 2` accessor threads and skips every case without one.
const MIGRATION_MIN_CPUS: usize = 3;
const THP_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/enabled";

/// Upstream selftests the lab runs; not in the default suite (they need `--bin` and, for
/// mm-migration, `--cpus 4`). `kernel/test-in-lab` runs them on both kernels.
pub const TESTS: &[TestInfo] = &[TestInfo {
    name: "mm-migration",
    about: "[--bin migration --cpus 4] upstream's mm `migration` selftest (kernel/build's \
            MIGRATION_SELFTEST): its 6 cases move a private/shared anonymous page, THP and \
            hugetlb page between the two nodes for 20 s each while other threads or processes \
            read it; every case must run and pass (a skipped case makes the test a skip), no \
            kernel warning",
}];

/// Runs an upstream selftest; `UnknownTest` for any other name.
pub fn dispatch(name: &str) -> Result<Verdict, GuestError> {
    match name {
        "mm-migration" => mm_migration(),
        _ => Err(GuestError::UnknownTest(name.to_owned())),
    }
}

/// Whether `name` is one of these tests.
pub fn is_known(name: &str) -> bool {
    TESTS.iter().any(|t| t.name == name)
}

/// The verdict of a kselftest binary whose every case must run: kselftest's own verdict, but
/// a pass with any case skipped (or an expected failure) is a skip, and a pass without a
/// single TAP case line is a fail.
pub fn every_case_verdict(
    exit: Option<i32>,
    totals: Option<&Totals>,
    cases: &[kselftest::Case],
) -> Status {
    match kselftest::verdict(exit, totals) {
        Status::Pass if cases.is_empty() => Status::Fail,
        Status::Pass if cases.iter().any(|c| c.result != CaseResult::Pass) => Status::Skip,
        other => other,
    }
}

/// `mm-migration`: upstream's tools/testing/selftests/mm/migration, every case run.
fn mm_migration() -> Result<Verdict, GuestError> {
    let mut problems = Vec::new();
    if !Path::new(MIGRATION).exists() {
        problems.push(format!(
            "{MIGRATION} is not in the initramfs: pass kernel/build's MIGRATION_SELFTEST with --bin"
        ));
        return Ok(Verdict {
            status: Status::Fail,
            detail: json!({ "problems": problems }),
        });
    }
    let cpus_online = read_sys("/sys/devices/system/cpu/online")?;
    let cpus = cpu_count(&cpus_online);
    let has_memory = read_sys("/sys/devices/system/node/has_memory")?;
    let nodes: Vec<u32> = parse_list(&has_memory).unwrap_or_default();
    let node_cpus: Vec<String> = nodes
        .iter()
        .map(|n| read_sys(format!("/sys/devices/system/node/node{n}/cpulist")).unwrap_or_default())
        .collect();
    let thp = read_sys(THP_ENABLED).ok();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let hugepagesize = meminfo
        .lines()
        .find(|l| l.starts_with("Hugepagesize:"))
        .map(|l| l.trim().to_owned());

    let MeasuredRun {
        exit,
        signal,
        out,
        new_warnings,
        migrated: (success, fail),
    } = run_measured(MIGRATION)?;

    let cases = kselftest::cases(&out);
    let totals = Totals::sum(out.lines());
    let mut status = every_case_verdict(exit, totals.as_ref(), &cases);
    let not_passed: Vec<String> = cases
        .iter()
        .filter(|c| c.result != CaseResult::Pass)
        .map(|c| {
            format!(
                "{} {:?}{}",
                c.name,
                c.result,
                c.reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            )
        })
        .collect();
    if !not_passed.is_empty() {
        problems.push(format!("not passed: {}", not_passed.join("; ")));
    }
    if cases.is_empty() {
        problems.push(format!(
            "{MIGRATION} printed no TAP case line (exit {exit:?}, signal {signal:?})"
        ));
    }
    if cpus < MIGRATION_MIN_CPUS || nodes.len() < 2 {
        problems.push(format!(
            "the test needs >= {MIGRATION_MIN_CPUS} CPUs and 2 nodes with memory; this guest \
             has {cpus} (`{cpus_online}`) and nodes `{has_memory}` (run the lab with --cpus 4)"
        ));
    }
    if !new_warnings.is_empty() {
        problems.push(format!(
            "the kernel logged {} warning line(s)",
            new_warnings.len()
        ));
        status = Status::Fail;
    }
    let per_case: Vec<String> = cases
        .iter()
        .map(|c| {
            let name = c.name.strip_prefix("migration.").unwrap_or(&c.name);
            format!("{name} {:?}", c.result).to_lowercase()
        })
        .collect();
    let text = summary(format!(
        "mm migration selftest on {cpus} CPUs ({}): {}; totals {}; exit {exit:?}; \
         pgmigrate_success +{success}, pgmigrate_fail +{fail}; kernel warnings {}",
        nodes
            .iter()
            .zip(&node_cpus)
            .map(|(n, c)| format!("node{n} {c}"))
            .collect::<Vec<_>>()
            .join(", "),
        if per_case.is_empty() {
            "no cases".to_owned()
        } else {
            per_case.join(", ")
        },
        totals.map_or("none".to_owned(), |t| format!(
            "pass:{} fail:{} xfail:{} xpass:{} skip:{} error:{}",
            t.pass, t.fail, t.xfail, t.xpass, t.skip, t.error
        )),
        new_warnings.len()
    ));
    Ok(Verdict {
        status,
        detail: json!({
            "summary": text,
            "cases": cases,
            "kselftest_totals": totals,
            "exit": exit,
            "signal": signal,
            "cpus_online": cpus_online,
            "nodes_with_memory": has_memory,
            "node_cpus": node_cpus,
            "thp_enabled": thp,
            "hugepagesize": hugepagesize,
            "pgmigrate_success_delta": success,
            "pgmigrate_fail_delta": fail,
            "kernel_warnings": new_warnings,
            "problems": problems,
            "output_tail": last_lines(&out, 30),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_case_must_run_and_pass() {
        let out = |lines: &str| {
            let c = kselftest::cases(lines);
            let t = Totals::sum(lines.lines());
            (c, t)
        };
        let (all_pass, t) = out("ok 1 migration.private_anon\nok 2 migration.shared_anon\n\
             # Totals: pass:2 fail:0 xfail:0 xpass:0 skip:0 error:0\n");
        assert_eq!(
            every_case_verdict(Some(0), t.as_ref(), &all_pass),
            Status::Pass
        );
        // kselftest calls this a pass; here one skipped case is not good enough.
        let (one_skip, t) = out("ok 1 migration.private_anon\n\
             ok 2 migration.private_anon_htlb # SKIP Not enough huge pages\n\
             # Totals: pass:1 fail:0 xfail:0 xpass:0 skip:1 error:0\n");
        assert_eq!(kselftest::verdict(Some(0), t.as_ref()), Status::Pass);
        assert_eq!(
            every_case_verdict(Some(0), t.as_ref(), &one_skip),
            Status::Skip
        );
        // With 2 CPUs the harness skips all six and exits 0.
        let (all_skip, t) = out(
            "ok 1 migration.private_anon # SKIP Not enough threads or NUMA nodes available\n\
             # Totals: pass:0 fail:0 xfail:0 xpass:0 skip:1 error:0\n",
        );
        assert_eq!(
            every_case_verdict(Some(0), t.as_ref(), &all_skip),
            Status::Skip
        );
        let (one_fail, t) = out(
            "ok 1 migration.private_anon\nnot ok 2 migration.shared_anon\n\
             # Totals: pass:1 fail:1 xfail:0 xpass:0 skip:0 error:0\n",
        );
        assert_eq!(
            every_case_verdict(Some(1), t.as_ref(), &one_fail),
            Status::Fail
        );
        // Exit 0 without any TAP line or Totals: nothing ran.
        assert_eq!(every_case_verdict(Some(0), None, &[]), Status::Fail);
        // A crash after some passes.
        assert_eq!(every_case_verdict(None, None, &all_pass), Status::Fail);
    }
}
