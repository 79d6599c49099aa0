//! `gmem-lab compare`: one test's kselftest cases in two lab reports, control against candidate.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::guest::{Case, CaseResult};
use crate::report::TestResult;

/// Errors reading the two reports.
#[derive(Debug, Error)]
pub enum CompareError {
    #[error("cannot read the lab report {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a `gmem-lab run --json` report")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} has no result for test `{test}`: did that lab run it?")]
    NoTest { path: PathBuf, test: String },
    #[error("the `{test}` result in {path} lists no cases (detail.cases)")]
    NoCases {
        path: PathBuf,
        test: String,
        #[source]
        source: Option<serde_json::Error>,
    },
}

/// The part of a `gmem-lab run --json` report that is compared.
#[derive(Debug, Deserialize)]
struct ReportFile {
    tests: Vec<TestResult>,
}

/// The cases `test` recorded in the report at `path` (its `detail.cases`).
pub fn read_cases(path: &Path, test: &str) -> Result<Vec<Case>, CompareError> {
    let text = fs::read_to_string(path).map_err(|source| CompareError::Read {
        path: path.to_owned(),
        source,
    })?;
    let report: ReportFile = serde_json::from_str(&text).map_err(|source| CompareError::Parse {
        path: path.to_owned(),
        source,
    })?;
    let result = report
        .tests
        .into_iter()
        .find(|t| t.test == test)
        .ok_or_else(|| CompareError::NoTest {
            path: path.to_owned(),
            test: test.to_owned(),
        })?;
    let no_cases = |source| CompareError::NoCases {
        path: path.to_owned(),
        test: test.to_owned(),
        source,
    };
    let cases = result.detail.get("cases").ok_or_else(|| no_cases(None))?;
    let cases: Vec<Case> = serde_json::from_value(cases.clone()).map_err(|e| no_cases(Some(e)))?;
    if cases.is_empty() {
        return Err(no_cases(None));
    }
    Ok(cases)
}

/// One case on both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub name: String,
    pub control: Option<CaseResult>,
    pub candidate: Option<CaseResult>,
}

impl Row {
    /// Passed in the control but not in the candidate (failed, skipped, or missing there).
    pub fn regressed(&self) -> bool {
        self.control == Some(CaseResult::Pass) && self.candidate != Some(CaseResult::Pass)
    }
}

/// Both sides, case by case, in the control's order and then the candidate's extra cases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparison {
    pub rows: Vec<Row>,
}

/// Whether a case ran: passed or failed, as opposed to skipped.
fn ran(r: CaseResult) -> bool {
    matches!(r, CaseResult::Pass | CaseResult::Fail | CaseResult::Xpass)
}

impl Comparison {
    pub fn new(control: &[Case], candidate: &[Case]) -> Comparison {
        let mut rows: Vec<Row> = control
            .iter()
            .map(|c| Row {
                name: c.name.clone(),
                control: Some(c.result),
                candidate: candidate
                    .iter()
                    .find(|d| d.name == c.name)
                    .map(|d| d.result),
            })
            .collect();
        for d in candidate {
            if !control.iter().any(|c| c.name == d.name) {
                rows.push(Row {
                    name: d.name.clone(),
                    control: None,
                    candidate: Some(d.result),
                });
            }
        }
        Comparison { rows }
    }

    pub fn regressions(&self) -> usize {
        self.rows.iter().filter(|r| r.regressed()).count()
    }

    /// (cases that ran, cases that passed) on the control side and on the candidate side.
    pub fn ran_passed(&self) -> ((usize, usize), (usize, usize)) {
        let side = |f: fn(&Row) -> Option<CaseResult>| {
            let results: Vec<CaseResult> = self.rows.iter().filter_map(f).collect();
            (
                results.iter().filter(|r| ran(**r)).count(),
                results.iter().filter(|r| **r == CaseResult::Pass).count(),
            )
        };
        (side(|r| r.control), side(|r| r.candidate))
    }

    /// The comparison holds: no regression, and at least one case ran on each side (a
    /// comparison of skips proves nothing).
    pub fn ok(&self) -> bool {
        let ((control_ran, _), (candidate_ran, _)) = self.ran_passed();
        self.regressions() == 0 && control_ran > 0 && candidate_ran > 0
    }

    /// A table of the cases and a closing line, for people.
    pub fn render(&self, test: &str, control: &str, candidate: &str) -> String {
        let word = |r: Option<CaseResult>| match r {
            Some(CaseResult::Pass) => "pass",
            Some(CaseResult::Fail) => "FAIL",
            Some(CaseResult::Skip) => "SKIPPED",
            Some(CaseResult::Xfail) => "xfail",
            Some(CaseResult::Xpass) => "XPASS",
            None => "missing",
        };
        let width = self.rows.iter().map(|r| r.name.len()).max().unwrap_or(4);
        // Wide enough for "SKIPPED" and "missing", and for the labels.
        let cw = control.len().max(8);
        let dw = candidate.len().max(8);
        let mut out = String::new();
        let _ = writeln!(out, "  {:<width$}  {control:<cw$} {candidate}", "case");
        for r in &self.rows {
            let _ = writeln!(
                out,
                "  {:<width$}  {:<cw$} {:<dw$}{}",
                r.name,
                word(r.control),
                word(r.candidate),
                if r.regressed() {
                    "  REGRESSION: passes on the control only"
                } else {
                    ""
                }
            );
        }
        let ((cr, cp), (dr, dp)) = self.ran_passed();
        let _ = write!(
            out,
            "compare {test}: {} cases, {} regression(s); {control} ran {cr} and passed {cp}, \
             {candidate} ran {dr} and passed {dp}: {}",
            self.rows.len(),
            self.regressions(),
            if self.ok() {
                "ok"
            } else if self.regressions() > 0 {
                "FAIL"
            } else {
                "FAIL (a side ran no case)"
            }
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(name: &str, result: CaseResult) -> Case {
        Case {
            name: name.to_owned(),
            result,
            reason: None,
        }
    }

    #[test]
    fn a_case_that_passes_only_on_the_control_is_a_regression() {
        use CaseResult::*;
        let stock = [
            case("a", Pass),
            case("b", Pass),
            case("c", Fail),
            case("d", Skip),
        ];
        let same = Comparison::new(&stock, &stock);
        assert_eq!(same.regressions(), 0);
        assert!(same.ok());
        assert_eq!(same.ran_passed(), ((3, 2), (3, 2)));

        // Failing, skipping or dropping a case that passed on stock are all regressions; a
        // case that failed on stock may do anything.
        let ours = [
            case("a", Fail),
            case("c", Pass),
            case("d", Pass),
            case("e", Pass),
        ];
        let cmp = Comparison::new(&stock, &ours);
        assert_eq!(cmp.regressions(), 2, "{cmp:?}");
        assert!(!cmp.ok());
        let regressed: Vec<&str> = cmp
            .rows
            .iter()
            .filter(|r| r.regressed())
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(regressed, ["a", "b"]);
        assert_eq!(cmp.rows.last().map(|r| r.name.as_str()), Some("e"));
        let table = cmp.render("mm-migration", "stock", "patched");
        assert!(table.contains("REGRESSION"), "{table}");
        assert!(table.ends_with("FAIL"), "{table}");

        let skipped = [case("a", Skip), case("b", Skip)];
        assert!(Comparison::new(&stock, &[case("a", Pass), case("b", Skip)]).regressions() == 1);
        let a_skip = Comparison::new(&[case("a", Skip)], &[case("a", Skip)]);
        assert_eq!(a_skip.regressions(), 0);
        // Nothing ran: no regression, and still no proof.
        assert!(!a_skip.ok());
        assert!(!Comparison::new(&stock, &skipped).ok());
    }

    #[test]
    fn reads_cases_from_a_report() {
        let dir = std::env::temp_dir().join(format!("gmem-lab-compare-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("report.json");
        fs::write(
            &path,
            r#"{"verdict":"pass","tests":[
                {"test":"nodes","status":"pass","detail":{}},
                {"test":"mm-migration","status":"skip","detail":{"cases":[
                    {"name":"migration.private_anon","result":"pass","reason":null},
                    {"name":"migration.private_anon_htlb","result":"skip",
                     "reason":"Not enough huge pages"}]}}]}"#,
        )
        .unwrap();
        let cases = read_cases(&path, "mm-migration").unwrap();
        assert_eq!(cases.len(), 2);
        assert_eq!(cases[1].result, CaseResult::Skip);
        assert_eq!(cases[1].reason.as_deref(), Some("Not enough huge pages"));
        assert!(matches!(
            read_cases(&path, "nodes"),
            Err(CompareError::NoCases { .. })
        ));
        assert!(matches!(
            read_cases(&path, "kernel-selftest"),
            Err(CompareError::NoTest { .. })
        ));
        assert!(matches!(
            read_cases(&dir.join("missing.json"), "mm-migration"),
            Err(CompareError::Read { .. })
        ));
        fs::write(&path, "not json").unwrap();
        assert!(matches!(
            read_cases(&path, "mm-migration"),
            Err(CompareError::Parse { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
