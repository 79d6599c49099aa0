//! The `GMEMLAB-*` line protocol between the in-guest agent and the host, and the run's verdict.
//!
//! Every structured line is `GMEMLAB-<KIND> <json>` on the serial console; anything before the
//! marker on the same line (kernel messages, a stray `\r`) is ignored.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

/// Marker of a test's result: `GMEMLAB-RESULT {"test":..,"status":..,"detail":..}`.
pub const RESULT: &str = "GMEMLAB-RESULT";
/// Marker printed by /init when it starts: `GMEMLAB-BOOT {"uptime_s":..}`.
pub const BOOT: &str = "GMEMLAB-BOOT";
/// Marker of a module load: `GMEMLAB-MODULE {"module":..,"status":"loaded|failed"}`.
pub const MODULE: &str = "GMEMLAB-MODULE";
/// Marker of an agent that exited non-zero: `GMEMLAB-EXIT {"test":..,"code":..}`.
pub const EXIT: &str = "GMEMLAB-EXIT";
/// Marker printed by /init after the last test, before it powers off.
pub const DONE: &str = "GMEMLAB-DONE";

/// The outcome of one test. A skip is never a pass: the runner reports it loudly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    Skip,
}

impl Status {
    /// Pass when a check found no problems, fail otherwise.
    pub fn pass_if(no_problems: bool) -> Status {
        if no_problems {
            Status::Pass
        } else {
            Status::Fail
        }
    }
}

/// One test's result, as the agent prints it and the runner reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestResult {
    pub test: String,
    pub status: Status,
    #[serde(default)]
    pub detail: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

impl TestResult {
    /// The serial-console line for this result (without the newline).
    pub fn to_line(&self) -> String {
        let json = serde_json::to_string(self).unwrap_or_else(|e| {
            format!(
                r#"{{"test":"{}","status":"fail","detail":"unserialisable: {e}"}}"#,
                self.test
            )
        });
        format!("{RESULT} {json}")
    }
}

/// One structured line from the guest.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Boot(Value),
    Module(Value),
    Result(TestResult),
    Exit { test: String, code: i64 },
    Done,
}

/// A `GMEMLAB-*` line that could not be understood.
#[derive(Debug, Error)]
pub enum LineError {
    #[error("malformed {marker} line `{line}`")]
    Json {
        marker: String,
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("unknown marker {marker} in `{line}`")]
    UnknownMarker { marker: String, line: String },
}

/// Prefix of the lines an `exec:` test echoes from its command: never parsed as markers.
pub const ECHO_PREFIX: &str = "  | ";

/// Parses one console line: `None` if it carries no `GMEMLAB-` marker (or is echoed output).
pub fn parse_line(line: &str) -> Option<Result<Event, LineError>> {
    if line.starts_with(ECHO_PREFIX) {
        return None;
    }
    let start = line.find("GMEMLAB-")?;
    let rest = line[start..].trim_end_matches(['\r', '\n']);
    let (marker, payload) = match rest.split_once(char::is_whitespace) {
        Some((m, p)) => (m, p.trim()),
        None => (rest, ""),
    };
    let json = |marker: &str| {
        serde_json::from_str::<Value>(payload).map_err(|source| LineError::Json {
            marker: marker.to_owned(),
            line: rest.to_owned(),
            source,
        })
    };
    Some(match marker {
        DONE => Ok(Event::Done),
        BOOT => json(marker).map(Event::Boot),
        MODULE => json(marker).map(Event::Module),
        RESULT => serde_json::from_str::<TestResult>(payload)
            .map(Event::Result)
            .map_err(|source| LineError::Json {
                marker: marker.to_owned(),
                line: rest.to_owned(),
                source,
            }),
        EXIT => json(marker).map(|v| Event::Exit {
            test: v["test"].as_str().unwrap_or("?").to_owned(),
            code: v["code"].as_i64().unwrap_or(-1),
        }),
        _ => Err(LineError::UnknownMarker {
            marker: marker.to_owned(),
            line: rest.to_owned(),
        }),
    })
}

/// Accumulates the guest's events while it runs.
#[derive(Debug, Default)]
pub struct Collector {
    pub boot: Option<Value>,
    pub modules: Vec<Value>,
    pub results: Vec<TestResult>,
    pub exits: Vec<(String, i64)>,
    pub done: bool,
    pub problems: Vec<String>,
}

impl Collector {
    /// Feeds one console line; returns true if it was `GMEMLAB-DONE`.
    pub fn feed(&mut self, line: &str) -> bool {
        match parse_line(line) {
            None => false,
            Some(Err(e)) => {
                self.problems.push(error_chain(&e));
                false
            }
            Some(Ok(ev)) => {
                let is_done = ev == Event::Done;
                match ev {
                    Event::Boot(v) => self.boot = Some(v),
                    Event::Module(v) => {
                        if v["status"] != "loaded" {
                            self.problems.push(format!("module load failed: {v}"));
                        }
                        self.modules.push(v);
                    }
                    Event::Result(r) => self.results.push(r),
                    Event::Exit { test, code } => self.exits.push((test, code)),
                    Event::Done => self.done = true,
                }
                is_done
            }
        }
    }

    /// Orders the results as requested, turning a missing or repeated result into a failure.
    pub fn finish(mut self, requested: &[String]) -> Outcome {
        let mut tests = Vec::new();
        for name in requested {
            let mut mine: Vec<TestResult> = Vec::new();
            self.results.retain(|r| {
                if &r.test == name {
                    mine.push(r.clone());
                    false
                } else {
                    true
                }
            });
            let exit = self.exits.iter().find(|(t, _)| t == name).map(|(_, c)| *c);
            let result = match mine.len() {
                0 => TestResult {
                    test: name.clone(),
                    status: Status::Fail,
                    detail: serde_json::json!({
                        "error": "no GMEMLAB-RESULT line from the guest (agent crashed, or the guest stopped early)",
                        "agent_exit_code": exit,
                    }),
                    duration_ms: None,
                },
                1 => mine.remove(0),
                n => TestResult {
                    test: name.clone(),
                    status: Status::Fail,
                    detail: serde_json::json!({
                        "error": format!("{n} GMEMLAB-RESULT lines for one test"),
                        "results": mine,
                    }),
                    duration_ms: None,
                },
            };
            tests.push(result);
        }
        for r in &self.results {
            self.problems.push(format!(
                "result for a test that was not requested: {}",
                r.test
            ));
        }
        if !self.done {
            self.problems
                .push("the guest never printed GMEMLAB-DONE".to_owned());
        }
        Outcome {
            boot: self.boot,
            modules: self.modules,
            tests,
            problems: self.problems,
        }
    }
}

/// What the guest reported, in the requested order.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub boot: Option<Value>,
    pub modules: Vec<Value>,
    pub tests: Vec<TestResult>,
    /// Anything wrong outside the tests themselves (malformed lines, no DONE, failed insmod).
    pub problems: Vec<String>,
}

impl Outcome {
    /// (passed, failed, skipped).
    pub fn counts(&self) -> (usize, usize, usize) {
        let n = |s| self.tests.iter().filter(|t| t.status == s).count();
        (n(Status::Pass), n(Status::Fail), n(Status::Skip))
    }
}

/// `error: cause: cause` on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_result_lines_with_noise() {
        let line = "[    6.1] random: crng init\r GMEMLAB-RESULT {\"test\":\"nodes\",\"status\":\"pass\",\"detail\":{\"nodes\":2}}\r";
        match parse_line(line) {
            Some(Ok(Event::Result(r))) => {
                assert_eq!(r.test, "nodes");
                assert_eq!(r.status, Status::Pass);
                assert_eq!(r.detail["nodes"], 2);
                assert_eq!(r.duration_ms, None);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(parse_line("Linux version 7.3.4").is_none());
        assert!(parse_line("  | GMEMLAB-DONE").is_none());
        assert!(matches!(parse_line("GMEMLAB-DONE"), Some(Ok(Event::Done))));
        assert!(matches!(
            parse_line("GMEMLAB-DONE\r"),
            Some(Ok(Event::Done))
        ));
    }

    #[test]
    fn result_round_trips() {
        let r = TestResult {
            test: "exec:/bin/x --y".into(),
            status: Status::Skip,
            detail: serde_json::json!({"reason": "quote \" and newline \n"}),
            duration_ms: Some(12),
        };
        let line = r.to_line();
        assert!(!line.contains('\n'));
        match parse_line(&line) {
            Some(Ok(Event::Result(back))) => assert_eq!(back, r),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn malformed_and_unknown_lines_are_errors() {
        assert!(matches!(
            parse_line("GMEMLAB-RESULT {\"test\":\"x\""),
            Some(Err(LineError::Json { .. }))
        ));
        assert!(matches!(
            parse_line("GMEMLAB-RESULT {\"test\":\"x\",\"status\":\"maybe\"}"),
            Some(Err(LineError::Json { .. }))
        ));
        assert!(matches!(
            parse_line("GMEMLAB-WHAT {}"),
            Some(Err(LineError::UnknownMarker { .. }))
        ));
    }

    #[test]
    fn collector_orders_and_flags_missing_duplicate_and_extra() {
        let mut c = Collector::default();
        let lines = [
            r#"GMEMLAB-BOOT {"uptime_s":4.2}"#,
            r#"GMEMLAB-MODULE {"module":"kvm","status":"loaded"}"#,
            r#"GMEMLAB-MODULE {"module":"kvm-amd","status":"failed"}"#,
            r#"GMEMLAB-RESULT {"test":"b","status":"pass"}"#,
            r#"GMEMLAB-RESULT {"test":"a","status":"skip","detail":"no gmemctl"}"#,
            r#"GMEMLAB-RESULT {"test":"d","status":"pass"}"#,
            r#"GMEMLAB-RESULT {"test":"d","status":"pass"}"#,
            r#"GMEMLAB-RESULT {"test":"zzz","status":"pass"}"#,
            r#"GMEMLAB-EXIT {"test":"c","code":139}"#,
        ];
        for l in lines {
            assert!(!c.feed(l));
        }
        assert!(c.feed("GMEMLAB-DONE"));
        let req: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let o = c.finish(&req);
        let got: Vec<(&str, Status)> = o
            .tests
            .iter()
            .map(|t| (t.test.as_str(), t.status))
            .collect();
        assert_eq!(
            got,
            [
                ("a", Status::Skip),
                ("b", Status::Pass),
                ("c", Status::Fail),
                ("d", Status::Fail)
            ]
        );
        assert_eq!(o.tests[2].detail["agent_exit_code"], 139);
        assert_eq!(o.counts(), (1, 2, 1));
        assert_eq!(o.boot.as_ref().unwrap()["uptime_s"], 4.2);
        assert_eq!(o.problems.len(), 2, "{:?}", o.problems);
    }

    #[test]
    fn collector_without_done_is_a_problem() {
        let c = Collector::default();
        let o = c.finish(&[]);
        assert_eq!(o.problems, ["the guest never printed GMEMLAB-DONE"]);
    }
}
