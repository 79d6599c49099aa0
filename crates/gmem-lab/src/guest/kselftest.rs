//! kselftest output: TAP result lines, the `# Totals:` line, and the verdict they give a test.

use std::ops::Add;

use serde::{Deserialize, Serialize};

use crate::report::Status;

/// kselftest's exit code for "skipped" (`KSFT_SKIP`).
const KSFT_SKIP: i32 = 4;

/// The counts of one `# Totals: pass:N fail:N xfail:N xpass:N skip:N error:N` line (kselftest.h
/// prints it at exit), or the sum of several.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub pass: u64,
    pub fail: u64,
    pub xfail: u64,
    pub xpass: u64,
    pub skip: u64,
    pub error: u64,
}

impl Totals {
    /// Parses a `# Totals:` line (leading blanks allowed). `None` for any other line, and
    /// for a Totals line that lacks one of the six counts, repeats one or has another key.
    pub fn parse(line: &str) -> Option<Totals> {
        let counts = line.trim().strip_prefix("# Totals:")?;
        let mut fields: [Option<u64>; 6] = [None; 6];
        for pair in counts.split_whitespace() {
            let (key, value) = pair.split_once(':')?;
            let i = ["pass", "fail", "xfail", "xpass", "skip", "error"]
                .iter()
                .position(|k| *k == key)?;
            if fields[i].replace(value.parse().ok()?).is_some() {
                return None;
            }
        }
        let [pass, fail, xfail, xpass, skip, error] = fields;
        Some(Totals {
            pass: pass?,
            fail: fail?,
            xfail: xfail?,
            xpass: xpass?,
            skip: skip?,
            error: error?,
        })
    }

    /// The sum of every Totals line among `lines` (a command may run several kselftest
    /// binaries); `None` if there is none.
    pub fn sum<'a>(lines: impl IntoIterator<Item = &'a str>) -> Option<Totals> {
        lines
            .into_iter()
            .filter_map(Totals::parse)
            .reduce(|a, b| a + b)
    }
}

impl Add for Totals {
    type Output = Totals;
    fn add(self, o: Totals) -> Totals {
        Totals {
            pass: self.pass + o.pass,
            fail: self.fail + o.fail,
            xfail: self.xfail + o.xfail,
            xpass: self.xpass + o.xpass,
            skip: self.skip + o.skip,
            error: self.error + o.error,
        }
    }
}

/// The verdict of a command from its exit code and, if it printed any, kselftest's Totals.
///
/// Without Totals the exit code decides: 0 passes, 4 (`KSFT_SKIP`) skips, anything else or a
/// signal (`exit` is `None`) fails. With Totals they decide, and the exit code can only make it
/// worse: any fail or error is a fail; no pass at all (only skips or expected failures) is a
/// skip, even with exit 0 (kselftest exits 0 when every test skipped); a pass needs at least one
/// pass and exit 0. An exit other than 0 or 4 is a fail whatever the counts say.
pub fn verdict(exit: Option<i32>, totals: Option<&Totals>) -> Status {
    let by_exit = match exit {
        Some(0) => Status::Pass,
        Some(KSFT_SKIP) => Status::Skip,
        _ => Status::Fail,
    };
    let Some(t) = totals else {
        return by_exit;
    };
    if t.fail > 0 || t.error > 0 || by_exit == Status::Fail {
        Status::Fail
    } else if t.pass == 0 {
        Status::Skip
    } else {
        by_exit
    }
}

/// Counts of kselftest/TAP result lines in a command's output, and its summed Totals.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TapCounts {
    pub ok: usize,
    pub not_ok: usize,
    pub skip: usize,
    pub totals: Option<Totals>,
}

/// Reads `ok N ...`, `not ok N ...` (a `# SKIP` directive counts as a skip) and `# Totals:`.
pub fn tap_counts(out: &str) -> TapCounts {
    let mut c = TapCounts {
        totals: Totals::sum(out.lines()),
        ..TapCounts::default()
    };
    for line in out.lines().map(str::trim_start) {
        let result = if line.starts_with("not ok ") {
            &mut c.not_ok
        } else if line.starts_with("ok ") {
            &mut c.ok
        } else {
            continue;
        };
        if line.contains("# SKIP") {
            c.skip += 1;
        } else {
            *result += 1;
        }
    }
    c
}

/// The result of one kselftest case, from its TAP line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaseResult {
    Pass,
    Fail,
    Skip,
    Xfail,
    Xpass,
}

/// One kselftest case: `ok 3 migration.private_anon_thp # SKIP Transparent Hugepages not
/// available` is case `migration.private_anon_thp`, skipped, with that reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Case {
    pub name: String,
    pub result: CaseResult,
    /// The text after the TAP directive (`# SKIP <reason>`), or a pass's comment.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Parses one TAP result line (`ok N name`, `not ok N name`, with an optional `# DIRECTIVE
/// text`); `None` for any other line. A `# TODO` case counts as failed if `not ok`.
pub fn parse_case(line: &str) -> Option<Case> {
    let line = line.trim();
    let (ok, rest) = if let Some(r) = line.strip_prefix("not ok ") {
        (false, r)
    } else if let Some(r) = line.strip_prefix("ok ") {
        (true, r)
    } else {
        return None;
    };
    let (number, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    number.parse::<u64>().ok()?;
    let (name, comment) = match rest.split_once(" #") {
        Some((n, c)) => (n.trim(), Some(c.trim())),
        None => (rest.trim(), None),
    };
    if name.is_empty() {
        return None;
    }
    let directive = comment.and_then(|c| {
        let (word, text) = c.split_once(' ').unwrap_or((c, ""));
        let result = match word.to_ascii_uppercase().as_str() {
            "SKIP" => CaseResult::Skip,
            "XFAIL" => CaseResult::Xfail,
            "XPASS" => CaseResult::Xpass,
            _ => return None,
        };
        Some((result, text.trim()))
    });
    let (result, reason) = match (ok, directive) {
        (true, Some((r, text))) => (r, text),
        (true, None) => (CaseResult::Pass, comment.unwrap_or("")),
        (false, _) => (CaseResult::Fail, comment.unwrap_or("")),
    };
    Some(Case {
        name: name.to_owned(),
        result,
        reason: (!reason.is_empty()).then(|| reason.to_owned()),
    })
}

/// Every TAP result line of `out`, in order.
pub fn cases(out: &str) -> Vec<Case> {
    out.lines().filter_map(parse_case).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(line: &str) -> Totals {
        Totals::parse(line).unwrap_or_else(|| panic!("not a Totals line: {line}"))
    }

    #[test]
    fn parses_totals_lines() {
        let t = totals("# Totals: pass:3 fail:1 xfail:2 xpass:0 skip:6 error:5");
        assert_eq!(
            t,
            Totals {
                pass: 3,
                fail: 1,
                xfail: 2,
                xpass: 0,
                skip: 6,
                error: 5
            }
        );
        assert_eq!(
            totals("  # Totals: error:0 skip:1 xpass:0 xfail:0 fail:0 pass:2").pass,
            2
        );
        for bad in [
            "# Totals: pass:1 fail:0 xfail:0 xpass:0 skip:0",
            "# Totals: pass:1 fail:0 xfail:0 xpass:0 skip:0 error:0 pass:1",
            "# Totals: pass:1 fail:0 xfail:0 xpass:0 skip:0 error:x",
            "# Totals: pass:1 fail:0 xfail:0 xpass:0 skip:0 error:0 todo:1",
            "# Planned tests != run tests (6 != 5)",
            "ok 1 pass:1",
        ] {
            assert_eq!(Totals::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn sums_every_totals_line() {
        let out = "# Totals: pass:1 fail:0 xfail:0 xpass:0 skip:2 error:0\nok 1 x\n\
                   # Totals: pass:0 fail:1 xfail:0 xpass:0 skip:0 error:0\n";
        let t = Totals::sum(out.lines()).unwrap();
        assert_eq!((t.pass, t.fail, t.skip), (1, 1, 2));
        assert_eq!(Totals::sum("no totals here\n".lines()), None);
    }

    #[test]
    fn totals_decide_the_verdict() {
        let all_skip = totals("# Totals: pass:0 fail:0 xfail:0 xpass:0 skip:6 error:0");
        let one_fail = totals("# Totals: pass:5 fail:1 xfail:0 xpass:0 skip:0 error:0");
        let one_error = totals("# Totals: pass:5 fail:0 xfail:0 xpass:0 skip:0 error:1");
        let some_pass = totals("# Totals: pass:2 fail:0 xfail:1 xpass:0 skip:3 error:0");
        let only_xfail = totals("# Totals: pass:0 fail:0 xfail:2 xpass:0 skip:0 error:0");
        // The case the old exit-code verdict called a pass: every test skipped, exit 0.
        assert_eq!(verdict(Some(0), Some(&all_skip)), Status::Skip);
        assert_eq!(verdict(Some(4), Some(&all_skip)), Status::Skip);
        assert_eq!(verdict(Some(0), Some(&only_xfail)), Status::Skip);
        assert_eq!(verdict(Some(0), Some(&one_fail)), Status::Fail);
        assert_eq!(verdict(Some(4), Some(&one_error)), Status::Fail);
        assert_eq!(verdict(Some(0), Some(&some_pass)), Status::Pass);
        // A pass needs exit 0 as well.
        assert_eq!(verdict(Some(4), Some(&some_pass)), Status::Skip);
        assert_eq!(verdict(Some(1), Some(&some_pass)), Status::Fail);
        assert_eq!(verdict(None, Some(&some_pass)), Status::Fail);
        assert_eq!(verdict(Some(1), Some(&all_skip)), Status::Fail);
    }

    #[test]
    fn without_totals_the_exit_code_decides() {
        assert_eq!(verdict(Some(0), None), Status::Pass);
        assert_eq!(verdict(Some(4), None), Status::Skip);
        assert_eq!(verdict(Some(1), None), Status::Fail);
        assert_eq!(verdict(None, None), Status::Fail);
    }

    #[test]
    fn counts_tap_lines() {
        let out = "TAP version 13\nok 1 a\nnot ok 2 b\nok 3 c # SKIP no nodes\n\
                   # Totals: pass:1 fail:1 xfail:0 xpass:0 skip:1 error:0\n";
        let c = tap_counts(out);
        assert_eq!((c.ok, c.not_ok, c.skip), (1, 1, 1));
        assert_eq!(c.totals.map(|t| (t.pass, t.fail, t.skip)), Some((1, 1, 1)));
        assert_eq!(tap_counts("Random seed: 0x1\n"), TapCounts::default());
    }

    #[test]
    fn parses_cases_as_the_harness_prints_them() {
        // As tools/testing/selftests/mm/migration prints them (kselftest_harness.h).
        let out = "TAP version 13\n1..6\n# Starting 6 tests from 1 test cases.\n\
                   #  RUN           migration.private_anon ...\n\
                   #            OK  migration.private_anon\n\
                   ok 1 migration.private_anon\n\
                   not ok 2 migration.shared_anon\n\
                   ok 3 migration.private_anon_thp # SKIP Transparent Hugepages not available\n\
                   ok 4 migration.shared_anon_thp # XFAIL known\n\
                   ok 5 migration.private_anon_htlb #  took 20 s\n\
                   not ok 6 migration.shared_anon_htlb # TODO later\n\
                   # Totals: pass:2 fail:2 xfail:1 xpass:0 skip:1 error:0\n";
        let c = cases(out);
        let got: Vec<(&str, CaseResult, Option<&str>)> = c
            .iter()
            .map(|c| (c.name.as_str(), c.result, c.reason.as_deref()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("migration.private_anon", CaseResult::Pass, None),
                ("migration.shared_anon", CaseResult::Fail, None),
                (
                    "migration.private_anon_thp",
                    CaseResult::Skip,
                    Some("Transparent Hugepages not available")
                ),
                (
                    "migration.shared_anon_thp",
                    CaseResult::Xfail,
                    Some("known")
                ),
                (
                    "migration.private_anon_htlb",
                    CaseResult::Pass,
                    Some("took 20 s")
                ),
                (
                    "migration.shared_anon_htlb",
                    CaseResult::Fail,
                    Some("TODO later")
                ),
            ]
        );
        for not_a_case in [
            "ok",
            "ok x name",
            "not ok 3",
            "# ok 1 a",
            "okay 1 a",
            "1..6",
        ] {
            assert_eq!(parse_case(not_a_case), None, "{not_a_case}");
        }
    }
}
