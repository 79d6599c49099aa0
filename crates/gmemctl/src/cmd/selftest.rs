//! `gmemctl selftest`: the seed's kernel selftest, in Rust, once per mechanism.
//!
//! Map a gmem (MMAP|INIT_SHARED), bind it to node 0, fill page i with byte (i & 0xff),
//! check every page is on node 0, move it to node 1, check node and every byte, move it
//! back, check again. On a one-node host each move is a relocation within node 0, proven by
//! changed PFNs. A mechanism this host lacks is a SKIP with its reason, never a pass.

use std::path::Path;
use std::sync::Arc;

use gmem::memory::{ChunkLayout, GmemFlags, GmemOffset, GuestMemory, Policy, page_size};
use gmem::migrate::{
    MechanismChoice, MechanismKind, MigrateError, MigrationReport, MigrationRequest, Migrator,
    NothingToQuiesce, PlacementPolicy,
};
use gmem::numa::{NodeId, NodeMask, NumaMaps};
use gmem::testing::{can_read_pfns, fill_seed_pattern, first_seed_mismatch};
use serde::Serialize;

use crate::cmd::host::{CHUNK, TestHost, check_chunked_size};
use crate::error::CliError;
use crate::table::{Table, mib};
use crate::units::parse_size;

/// Options of `gmemctl selftest`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Size of the test gmem (a multiple of 2 MiB).
    #[arg(long, default_value = "16M", value_parser = parse_size)]
    size: u64,
    /// Mechanisms to test, comma-separated (default: native,remap,refault).
    #[arg(long, value_delimiter = ',', value_parser = parse_mechanism)]
    mechanism: Vec<MechanismKind>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_mechanism(text: &str) -> Result<MechanismKind, String> {
    match text.parse::<MechanismChoice>()? {
        MechanismChoice::Exactly(kind) => Ok(kind),
        MechanismChoice::Auto => Err("name a mechanism: native, remap or refault".into()),
    }
}

/// One move and what was checked after it.
#[derive(Debug, Serialize)]
struct MoveCheck {
    from: NodeId,
    to: NodeId,
    /// Pages move_pages reports on `to`.
    pages_on_target: u64,
    /// Pages numa_maps counts on `to` for the gmem mapping.
    numa_maps_on_target: u64,
    pages: u64,
    bytes_intact: bool,
    pfns_changed: Option<u64>,
    pfns_checked: Option<u64>,
    stop_p99_us: u64,
    throughput_gbps: f64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case", tag = "result", content = "reason")]
enum Outcome {
    Pass,
    Fail(String),
    Skip(String),
}

#[derive(Debug, Serialize)]
struct MechanismResult {
    mechanism: MechanismKind,
    #[serde(flatten)]
    outcome: Outcome,
    moves: Vec<MoveCheck>,
}

#[derive(Debug, Serialize)]
struct Selftest {
    size_bytes: u64,
    pages: u64,
    flags: GmemFlags,
    home: NodeId,
    away: NodeId,
    results: Vec<MechanismResult>,
    passed: usize,
    failed: usize,
    skipped: usize,
}

/// Runs the selftest for each mechanism and prints the results.
pub fn run(kvm_device: &Path, args: Args) -> Result<(), CliError> {
    check_chunked_size(args.size)?;
    let TestHost {
        vm,
        flags,
        home,
        away,
        ..
    } = TestHost::open(kvm_device)?;
    let mechanisms = if args.mechanism.is_empty() {
        MechanismKind::ALL.to_vec()
    } else {
        args.mechanism.clone()
    };

    let results: Vec<MechanismResult> = mechanisms
        .into_iter()
        .map(|mechanism| {
            let mut moves = Vec::new();
            let outcome =
                match test_mechanism(&vm, flags, mechanism, args.size, home, away, &mut moves) {
                    Ok(()) => Outcome::Pass,
                    Err(outcome) => outcome,
                };
            MechanismResult {
                mechanism,
                outcome,
                moves,
            }
        })
        .collect();
    let count = |f: fn(&Outcome) -> bool| results.iter().filter(|r| f(&r.outcome)).count();
    let report = Selftest {
        size_bytes: args.size,
        pages: args.size / page_size(),
        flags,
        home,
        away,
        passed: count(|o| matches!(o, Outcome::Pass)),
        failed: count(|o| matches!(o, Outcome::Fail(_))),
        skipped: count(|o| matches!(o, Outcome::Skip(_))),
        results,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    if report.failed > 0 {
        return Err(CliError::CheckFailed(format!(
            "{} of {} mechanisms failed the selftest",
            report.failed,
            report.results.len()
        )));
    }
    Ok(())
}

/// Bind, fill, check; move there, check; move back, check.
fn test_mechanism(
    vm: &Arc<kvm_ioctls::VmFd>,
    flags: GmemFlags,
    mechanism: MechanismKind,
    size: u64,
    home: NodeId,
    away: NodeId,
    moves: &mut Vec<MoveCheck>,
) -> Result<(), Outcome> {
    let fail = |what: &str, e: &dyn std::fmt::Display| Outcome::Fail(format!("{what}: {e}"));
    let layout = match mechanism {
        MechanismKind::Remap => ChunkLayout::chunked(size, CHUNK, 1),
        _ => ChunkLayout::single_slot(size),
    };
    let memory = GuestMemory::create(vm.clone(), layout, flags).map_err(|e| fail("create", &e))?;
    memory.bind_to_vm().map_err(|e| fail("bind memslots", &e))?;
    let gmem_size = memory.gmem().size();
    memory
        .set_policy(
            GmemOffset(0),
            gmem_size,
            &Policy::Bind(NodeMask::single(home)),
        )
        .map_err(|e| fail("mbind", &e))?;
    fill_seed_pattern(&memory).map_err(|e| fail("fill", &e))?;
    let pages = size / page_size();
    let placed = memory
        .guest_placement()
        .map_err(|e| fail("placement", &e))?;
    if !placed.all_on(home) {
        return Err(Outcome::Fail(format!(
            "after mbind to node {home} the pages are at {:?}",
            placed.per_node()
        )));
    }
    for (from, to) in [(home, away), (away, home)] {
        let request = MigrationRequest {
            mechanism: MechanismChoice::Exactly(mechanism),
            relocate_in_place: from == to,
            ..MigrationRequest::new(PlacementPolicy::Bind(to))
        };
        let report = match Migrator::new(&memory, &NothingToQuiesce).migrate(&request) {
            Ok(report) => report,
            Err(
                e @ (MigrateError::NativeUnsupported { .. }
                | MigrateError::MechanismUnavailable { .. }),
            ) if mechanism == MechanismKind::Native => {
                return Err(Outcome::Skip(e.to_string()));
            }
            Err(e) => return Err(fail(&format!("move {from} -> {to}"), &e)),
        };
        let check = check_move(&memory, &report, from, to, pages).map_err(|e| fail("check", &e))?;
        let problem = problems(&check, &report);
        moves.push(check);
        if let Some(problem) = problem {
            return Err(Outcome::Fail(format!("move {from} -> {to}: {problem}")));
        }
    }
    Ok(())
}

fn check_move(
    memory: &GuestMemory,
    report: &MigrationReport,
    from: NodeId,
    to: NodeId,
    pages: u64,
) -> Result<MoveCheck, CliError> {
    let placement = memory.guest_placement()?;
    let pages_on_target = placement.per_node().get(&to).copied().unwrap_or(0);
    // numa_maps counts mapped pages; guest_placement just mapped every resident one.
    let map = memory.mapping()?;
    let (start, end) = (map.addr() as u64, map.addr() as u64 + map.len() as u64);
    let numa_maps = NumaMaps::read_self().map_err(|source| CliError::ReadMaps {
        pid: std::process::id(),
        source,
    })?;
    let numa_maps_on_target = numa_maps
        .gmem()
        .filter(|m| m.start >= start && m.start < end)
        .map(|m| m.pages_per_node.get(&to).copied().unwrap_or(0))
        .sum();
    Ok(MoveCheck {
        from,
        to,
        pages_on_target,
        numa_maps_on_target,
        pages,
        bytes_intact: first_seed_mismatch(memory)?.is_none(),
        pfns_changed: report.pfns_changed,
        pfns_checked: report.pfns_checked,
        stop_p99_us: report.stops.p99_us,
        throughput_gbps: report.throughput_gbps,
    })
}

/// What is wrong with a move, if anything.
fn problems(check: &MoveCheck, report: &MigrationReport) -> Option<String> {
    if !report.complete {
        return Some(format!(
            "incomplete: {} of {} pages moved",
            report.pages_moved, report.pages_planned
        ));
    }
    if !check.bytes_intact {
        return Some("bytes differ from the pattern".into());
    }
    if check.pages_on_target != check.pages {
        return Some(format!(
            "move_pages sees {} of {} pages on node {}",
            check.pages_on_target, check.pages, check.to
        ));
    }
    if check.numa_maps_on_target != check.pages {
        return Some(format!(
            "numa_maps counts {} of {} pages on node {}",
            check.numa_maps_on_target, check.pages, check.to
        ));
    }
    match (check.pfns_changed, check.pfns_checked) {
        (Some(changed), Some(checked)) if changed != checked || checked != check.pages => {
            Some(format!(
                "only {changed} of {checked} checked pages got new frames ({} pages)",
                check.pages
            ))
        }
        (None, _) if can_read_pfns() => Some("PFNs were not checked".into()),
        _ => None,
    }
}

fn render(s: &Selftest) -> String {
    let mut out = format!(
        "gmemctl selftest: {} guest_memfd ({}), {} pages, page i = byte (i & 0xff)\n",
        mib(s.size_bytes),
        s.flags,
        s.pages
    );
    if s.home == s.away {
        out.push_str(&format!(
            "one NUMA node: each move is a relocation within node {}, proven by changed PFNs\n\n",
            s.home
        ));
    } else {
        out.push('\n');
    }
    let mut t = Table::new([
        "mechanism",
        "result",
        "move",
        "on target (move_pages)",
        "on target (numa_maps)",
        "bytes",
        "PFNs changed",
        "stop p99",
    ]);
    for r in &s.results {
        let result = match &r.outcome {
            Outcome::Pass => "PASS",
            Outcome::Fail(_) => "FAIL",
            Outcome::Skip(_) => "SKIP",
        };
        for m in &r.moves {
            t.row([
                r.mechanism.to_string(),
                result.to_string(),
                format!("{} -> {}", m.from, m.to),
                format!("{}/{}", m.pages_on_target, m.pages),
                format!("{}/{}", m.numa_maps_on_target, m.pages),
                if m.bytes_intact { "intact" } else { "DIFFER" }.to_string(),
                match (m.pfns_changed, m.pfns_checked) {
                    (Some(c), Some(n)) => format!("{c}/{n}"),
                    _ => "not readable".into(),
                },
                format!("{} us", m.stop_p99_us),
            ]);
        }
        if r.moves.is_empty() {
            t.row([r.mechanism.to_string(), result.to_string()]);
        }
    }
    out.push_str(&t.render());
    for r in &s.results {
        if let Outcome::Fail(reason) | Outcome::Skip(reason) = &r.outcome {
            out.push_str(&format!("{}: {reason}\n", r.mechanism));
        }
    }
    out.push_str(&format!(
        "\nselftest: {} passed, {} failed, {} skipped\n",
        s.passed, s.failed, s.skipped
    ));
    out
}
