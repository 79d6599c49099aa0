//! `gmemctl migrate`: ask a running VMM (`gmemctl run`) to move its guest memory, follow the
//! job, and print the verified result; or, with `--pid`, move any VMM's guest memory from
//! outside (see [`pid`]).

mod pid;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::collections::BTreeMap;

use gmem::migrate::{MechanismChoice, MechanismKind, MigrationReport, PolicyKind, Verify};
use gmem::numa::NodeId;
use vmm::api::model::{JobAccepted, JobState, JobView};
use vmm::api::{ApiClient, MigrateBody};

use crate::error::CliError;
use crate::table::mib;
use crate::units::{parse_duration, parse_share};

/// How often the job is polled.
const POLL: Duration = Duration::from_millis(100);
/// A range in a list ("0-7") may cover at most this many numbers.
const MAX_LIST_RANGE: u32 = 8192;
/// Width of the progress bar, characters.
const BAR: usize = 30;

/// How far the journal goes to make a record last.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum JournalSyncArg {
    /// fsync the bytes and the record before each punch.
    Fsync,
    /// Leave them in the page cache.
    PageCache,
}

impl From<JournalSyncArg> for gmem::foreign::JournalSync {
    fn from(arg: JournalSyncArg) -> Self {
        match arg {
            JournalSyncArg::Fsync => gmem::foreign::JournalSync::Fsync,
            JournalSyncArg::PageCache => gmem::foreign::JournalSync::PageCache,
        }
    }
}

/// Options of `gmemctl migrate`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("vmm").required(true).args(["api_sock", "pid"])))]
pub struct Args {
    /// The VMM's API socket (printed by `gmemctl run`).
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Any VMM, by its PID: gmemctl takes its guest_memfd files (pidfd_getfd; needs root)
    /// and moves their pages itself, stopping the VMM's threads for each batch where the
    /// kernel cannot migrate gmem folios.
    #[arg(long, value_name = "PID")]
    pid: Option<u32>,
    /// With --pid: move only the guest_memfd at this descriptor of the VMM (repeatable);
    /// by default every guest_memfd it has open.
    #[arg(long, value_name = "FD", requires = "pid")]
    fd: Vec<i32>,
    /// With --pid: where each batch is journalled while the VMM's memory holds none of it,
    /// for `gmemctl recover` if gmemctl dies.
    #[arg(long, value_name = "DIR", default_value = gmem::foreign::DEFAULT_JOURNAL_DIR, requires = "pid")]
    journal_dir: PathBuf,
    /// With --pid: leave each journal record and its bytes in the page cache (they outlive
    /// gmemctl's death, the case the journal is for), or fsync them before every punch too
    /// (they outlive a host crash as well, which the VMM does not; a disk flush inside every
    /// stop: 4x slower where --journal-dir is on a disk, not the usual tmpfs /run)
    #[arg(long, value_enum, default_value = "page-cache", requires = "pid")]
    journal_sync: JournalSyncArg,
    /// Where memory should go.
    #[arg(long, value_enum)]
    policy: PolicyKind,
    /// Nodes in list syntax ("1", "0-1,3"): bind's target, drain's node to empty, or
    /// interleave's set.
    #[arg(long, value_name = "LIST", value_parser = parse_list)]
    nodes: Option<NumberList>,
    /// CPUs in list syntax, whose nodes the memory should follow (follow only).
    #[arg(long, value_name = "LIST", value_parser = parse_list)]
    cpus: Option<NumberList>,
    /// How to move pages.
    #[arg(long, value_enum, default_value = "auto")]
    mechanism: MechanismChoice,
    /// Longest the guest may be stopped per step, e.g. 500us or 1ms.
    #[arg(long, value_name = "DURATION", default_value = "1ms", value_parser = parse_duration)]
    max_stop: Duration,
    /// Also move pages already on their target node (new frames on the same node): how to
    /// relocate memory on a one-node host.
    #[arg(long)]
    relocate_in_place: bool,
    /// Largest share of time the guest may spend stopped while memory moves, e.g. 0.1
    /// (the engine waits between steps); without it, steps run back to back.
    #[arg(long, value_name = "SHARE", value_parser = parse_share)]
    max_stop_share: Option<f64>,
    /// What to verify after every step.
    #[arg(long, value_enum, default_value = "full")]
    verify: Verify,
    /// Print the finished job (request, report, guest mismatches) as JSON.
    #[arg(long)]
    json: bool,
}

/// Node or CPU numbers from a list such as "0-2,5".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumberList(pub Vec<u32>);

/// Parses "0-2,5" into [0, 1, 2, 5]. Numbers are checked by the API, not here.
pub fn parse_list(text: &str) -> Result<NumberList, String> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim) {
        let number = |s: &str| {
            s.trim()
                .parse::<u32>()
                .map_err(|_| format!("'{s}' in '{text}' is not a number: use a list like 0-2,5"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (number(a)?, number(b)?);
                if a > b {
                    return Err(format!("the range {a}-{b} runs backwards"));
                }
                if b - a >= MAX_LIST_RANGE {
                    return Err(format!("the range {a}-{b} is too long"));
                }
                out.extend(a..=b);
            }
            None => out.push(number(part)?),
        }
    }
    Ok(NumberList(out))
}

impl Args {
    fn body(&self) -> MigrateBody {
        let mut body = MigrateBody::new(self.policy);
        body.nodes = self.nodes.as_ref().map(|l| l.0.clone());
        body.cpus = self.cpus.as_ref().map(|l| l.0.clone());
        body.mechanism = self.mechanism;
        body.max_stop_us = u64::try_from(self.max_stop.as_micros()).unwrap_or(u64::MAX);
        body.relocate_in_place = self.relocate_in_place;
        body.max_stop_share = self.max_stop_share;
        body.verify = self.verify;
        body
    }
}

/// An API answer that is not the one hoped for, as an error.
pub fn refusal(reply: &vmm::api::ApiReply) -> CliError {
    CliError::ApiRefused {
        status: reply.status,
        sentence: reply.error_sentence().unwrap_or_else(|| {
            format!(
                "the VMM answered {} {}",
                reply.status,
                String::from_utf8_lossy(&reply.body).trim()
            )
        }),
    }
}

/// Moves the memory: through the VMM's API, or from outside with `--pid`.
pub fn run(kvm_device: &Path, args: Args) -> Result<(), CliError> {
    match (&args.api_sock, args.pid) {
        (Some(socket), _) => run_api(socket, &args),
        (None, Some(pid)) => pid::run(kvm_device, pid, &args),
        (None, None) => Err(CliError::InvalidArgument(
            "give --api-sock PATH or --pid PID".into(),
        )),
    }
}

/// Submits the migration to the VMM's API, follows it, prints the result.
fn run_api(socket: &Path, args: &Args) -> Result<(), CliError> {
    let client = ApiClient::new(socket);
    let reply = client.put_json("/memory/migrate", &args.body())?;
    if reply.status != 202 {
        return Err(refusal(&reply));
    }
    let id = reply.json::<JobAccepted>()?.id;
    let mut bar = ProgressBar::new(format!("migration {id}"));
    let job = loop {
        let reply = client.get(&format!("/memory/migrations/{id}"))?;
        if reply.status != 200 {
            bar.finish();
            return Err(refusal(&reply));
        }
        let job: JobView = reply.json()?;
        if job.state != JobState::Running {
            break job;
        }
        if let Some(progress) = &job.progress {
            bar.update(
                progress.pages_moved,
                progress.pages_planned,
                progress.mechanism,
            );
        }
        std::thread::sleep(POLL);
    };
    if let Some(report) = &job.report {
        bar.update(report.pages_moved, report.pages_planned, report.mechanism);
    }
    bar.finish();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&job)?);
    } else {
        print!("{}", render(&job));
    }
    verdict(&job)
}

/// Exit status from the job's state.
fn verdict(job: &JobView) -> Result<(), CliError> {
    let id = job.id;
    match (job.state, &job.report) {
        (JobState::Succeeded, _) => Ok(()),
        (JobState::Incomplete, Some(report)) => Err(CliError::CheckFailed(format!(
            "migration {id} is incomplete: {} of {} planned pages moved, {} content hash \
             mismatches, {} guest mismatches",
            report.pages_moved,
            report.pages_planned,
            report.content_mismatches,
            job.guest.as_ref().map_or(0, |g| g.mismatches)
        ))),
        _ => Err(CliError::CheckFailed(format!(
            "migration {id} {}: {}",
            if job.state == JobState::Incomplete {
                "is incomplete"
            } else {
                "failed"
            },
            job.error.as_deref().unwrap_or("no reason given")
        ))),
    }
}

/// Progress on stderr: a bar redrawn in place on a terminal, a line per 10% otherwise.
#[derive(Debug)]
struct ProgressBar {
    /// What moves, e.g. "migration 3" or "process 1234 fd 5".
    label: String,
    terminal: bool,
    drawn: bool,
    last_decile: Option<u64>,
}

impl ProgressBar {
    fn new(label: String) -> Self {
        let terminal = std::io::stderr().is_terminal();
        if !terminal {
            eprintln!("{label}: started");
        }
        ProgressBar {
            label,
            terminal,
            drawn: false,
            last_decile: None,
        }
    }

    /// Draws `moved` of `planned` pages, moved by `mechanism`.
    fn update(&mut self, moved: u64, planned: u64, mechanism: MechanismKind) {
        let fraction = if planned == 0 {
            1.0
        } else {
            (moved as f64 / planned as f64).min(1.0)
        };
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let filled = (fraction * BAR as f64).round() as usize;
            let _ = write!(
                err,
                "\r\x1b[K{} [{}{}] {:3.0}%  {moved}/{planned} pages  {mechanism}",
                self.label,
                "#".repeat(filled),
                "-".repeat(BAR - filled),
                fraction * 100.0
            );
            let _ = err.flush();
            self.drawn = true;
        } else {
            let decile = (fraction * 10.0).floor() as u64;
            if self.last_decile != Some(decile) {
                self.last_decile = Some(decile);
                let _ = writeln!(
                    err,
                    "{}: {:.0}% ({moved}/{planned} pages, {mechanism})",
                    self.label,
                    fraction * 100.0
                );
            }
        }
    }

    fn finish(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

fn us(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{:.2} s", us as f64 / 1e6)
    } else if us >= 1000 {
        format!("{:.1} ms", us as f64 / 1e3)
    } else {
        format!("{us} us")
    }
}

fn per_node(counts: &BTreeMap<NodeId, u64>) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    counts
        .iter()
        .map(|(node, pages)| format!("node {node} {pages}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The finished job as text.
fn render(job: &JobView) -> String {
    let mut out = format!(
        "migration {} {}: {}\n",
        job.id,
        job.state,
        request_text(&job.request),
    );
    let Some(report) = &job.report else {
        out += &row(
            "error",
            job.error.clone().unwrap_or_else(|| "none given".into()),
        );
        return out;
    };
    out += &render_report(report);
    if let Some(guest) = &job.guest {
        out += &row(
            "guest",
            format!(
                "{} mismatches, {} sweeps during the migration",
                guest.mismatches, guest.sweeps
            ),
        );
    }
    out += &render_outcome(report);
    out
}

/// A request's policy and its nodes or CPUs: "bind node 0", "follow cpu 0,1".
fn request_text(request: &MigrateBody) -> String {
    let list = |values: &[u32]| {
        values
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    format!(
        "{}{}",
        request.policy,
        match (&request.nodes, &request.cpus) {
            (Some(nodes), _) => format!(" node {}", list(nodes)),
            (None, Some(cpus)) => format!(" cpu {}", list(cpus)),
            _ => String::new(),
        }
    )
}

/// One row of the text report.
fn row(name: &str, value: String) -> String {
    format!("  {name:<18} {value}\n")
}

/// A MigrationReport's mechanism, pages, throughput, checks, stops and placement, as rows.
fn render_report(report: &MigrationReport) -> String {
    let mut out = String::new();
    out += &row(
        "mechanism",
        format!(
            "{}{}",
            report.mechanism,
            if report.relocate_in_place {
                ", relocating pages in place"
            } else {
                ""
            }
        ),
    );
    out += &row(
        "pages",
        format!(
            "{} planned, {} moved, {} not moved, {} already in place",
            report.pages_planned, report.pages_moved, report.pages_not_moved, report.pages_in_place
        ),
    );
    out += &row(
        "moved",
        format!(
            "{} in {} ({:.2} GB/s)",
            mib(report.bytes_moved),
            us(report.elapsed_us),
            report.throughput_gbps
        ),
    );
    out += &row(
        "new frames",
        match (report.pfns_changed, report.pfns_checked) {
            (Some(changed), Some(checked)) => format!("{changed} of {checked} pages checked"),
            _ if report.steps == 0 => "none to check (no step ran)".into(),
            _ => "not checked (PFNs need root)".into(),
        },
    );
    out += &row(
        "content hashes",
        format!(
            "{} compared, {} differed",
            report.content_checks, report.content_mismatches
        ),
    );
    let stops = &report.stops;
    out += &row(
        "guest stops",
        format!(
            "{}: p50 {}, p99 {}, max {}, total {}",
            stops.count,
            us(stops.p50_us),
            us(stops.p99_us),
            us(stops.max_us),
            us(stops.total_us)
        ),
    );
    out += &row(
        "pages per node",
        format!(
            "before: {}; after: {}",
            per_node(&report.before),
            per_node(&report.after)
        ),
    );
    out
}

/// Whether the report is complete, its failed steps and its notes, as rows.
fn render_outcome(report: &MigrationReport) -> String {
    let mut out = String::new();
    out += &row(
        "complete",
        if report.complete { "yes" } else { "no" }.into(),
    );
    for failure in &report.failures {
        out += &row(
            "failed step",
            format!(
                "guest offset {:#x}, {}: {}",
                failure.guest_offset,
                mib(failure.len),
                serde_json::to_string(&failure.outcome).unwrap_or_default()
            ),
        );
    }
    for note in &report.notes {
        out += &row("note", note.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists() {
        assert_eq!(parse_list("1"), Ok(NumberList(vec![1])));
        assert_eq!(parse_list("0-2,5"), Ok(NumberList(vec![0, 1, 2, 5])));
        assert_eq!(parse_list(" 7 "), Ok(NumberList(vec![7])));
        assert!(parse_list("2-1").unwrap_err().contains("backwards"));
        assert!(parse_list("x").unwrap_err().contains("not a number"));
        assert!(parse_list("0-4000000000").unwrap_err().contains("too long"));
    }

    #[test]
    fn renders_a_finished_job() {
        let job = serde_json::json!({
            "id": 3, "state": "succeeded", "elapsed_ms": 2,
            "request": {"policy": "bind", "nodes": [0], "mechanism": "remap",
                        "max_stop_us": 1000, "relocate_in_place": true},
            "report": {
                "mechanism": "remap", "policy": "bind 0", "relocate_in_place": true,
                "pages_planned": 10, "steps": 1,
                "pages_moved": 10, "pages_not_moved": 0, "pages_in_place": 0,
                "bytes_moved": 40960, "elapsed_us": 1500, "throughput_gbps": 0.03,
                "pfns_changed": 10, "pfns_checked": 10, "content_checks": 1,
                "content_mismatches": 0,
                "stops": {"count": 1, "p50_us": 200, "p99_us": 200, "max_us": 200,
                          "total_us": 200},
                "before": {"0": 10}, "after": {"0": 10}, "complete": true,
                "failures": [], "notes": ["a note"]
            },
            "guest": {"mismatches": 0, "sweeps": 5, "reset": null}
        });
        let job: JobView = serde_json::from_value(job).unwrap();
        let text = render(&job);
        assert!(
            text.starts_with("migration 3 succeeded: bind node 0\n"),
            "{text}"
        );
        assert!(text.contains("10 of 10 pages checked"), "{text}");
        assert!(text.contains("p50 200 us"), "{text}");
        assert!(text.contains("0 mismatches, 5 sweeps"), "{text}");
        assert!(text.contains("note               a note"), "{text}");
        assert!(verdict(&job).is_ok());
        let mut incomplete = job.clone();
        incomplete.state = JobState::Incomplete;
        assert!(verdict(&incomplete).is_err());
    }
}
