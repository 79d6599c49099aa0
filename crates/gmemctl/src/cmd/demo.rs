//! `gmemctl demo`: boot the built-in guest, move all its memory away and back while it runs, and prove that no byte was lost.

mod error;
mod guest_rate;
mod machine;
mod memcpy;
mod moves;
mod render;
mod report;
mod snapshot;
mod svg;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gmem::migrate::{MechanismChoice, MechanismKind, MigrationRequest, Migrator, Progress, Verify};
use vmm::{Vm, VmConfig};

pub use error::DemoError;

use crate::error::CliError;
use crate::units::{parse_duration, parse_size};
use guest_rate::{GuestRate, RateMeter};
use machine::Machine;
use memcpy::MemcpyBandwidth;
use moves::{Move, MovePlan};
use report::{DemoReport, MoveResult};
use snapshot::Snapshot;

/// How long the guest runs undisturbed while its progress rate is measured.
const WARM_UP: Duration = Duration::from_secs(1);
/// Longest wait for the guest's first sweep, or for its final check sweeps.
const GUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Full sweeps every vCPU must finish after the last move, so that every moved word has been
/// written and read back by the guest since.
const CHECK_SWEEPS: u64 = 2;

/// Options of `gmemctl demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Guest RAM, a multiple of 2 MiB and at least 4 MiB (e.g. 64M, 256M, 1G).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    mem: u64,
    /// vCPUs; each writes and verifies its own slice of guest RAM.
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// How to move the memory.
    #[arg(long, value_enum, default_value = "auto")]
    mechanism: MechanismChoice,
    /// Longest the guest may be stopped per step (e.g. 500us, 1ms).
    #[arg(long, value_name = "DURATION", default_value = "1ms", value_parser = parse_duration)]
    max_stop: Duration,
    /// Round trips (there and back) to run.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    rounds: u32,
    /// Checks per step: full (placement, PFNs and content hashes; hashing stops the guest,
    /// even for native), placement (placement and PFNs: native never stops the guest), or
    /// off. The guest checks every byte it wrote either way.
    #[arg(long, value_enum, default_value = "full")]
    verify: Verify,
    /// Where to write the placement map (SVG).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "gmemctl-demo-placement.svg"
    )]
    svg: PathBuf,
    /// Largest share of time the guest may spend stopped while memory moves (0 < share
    /// <= 1): the engine waits between steps to keep to it. "none" moves flat out.
    #[arg(long, value_name = "SHARE", default_value = "0.1", value_parser = parse_stop_share)]
    max_stop_share: StopShare,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs the demo, prints its report, and fails if any byte was lost.
pub fn run(kvm_device: &Path, args: Args) -> Result<(), CliError> {
    check_kvm(kvm_device)?;
    let report = demo(kvm_device, &args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render::human(&report));
    }
    match report.verdict.lost_bytes() {
        Some(reasons) => Err(DemoError::BytesLost(reasons).into()),
        None => Ok(()),
    }
}

fn demo(kvm_device: &Path, args: &Args) -> Result<DemoReport, DemoError> {
    let config = vm_config(args)?;
    let svg_path = std::path::absolute(&args.svg).map_err(|source| DemoError::WriteSvg {
        path: args.svg.clone(),
        source,
    })?;
    let machine = Machine::read()?;
    // Measured first, while nothing else runs: the yardstick for every copy-based move.
    let memcpy = memcpy::measure();
    let vm = Vm::start_on(kvm_device, config).map_err(DemoError::vm)?;
    prefault(&vm)?;
    let plan = MovePlan::for_host(&machine.topology, &vm, args.rounds)?;
    let mechanisms = choose_mechanisms(&vm, args, &plan, &machine)?;

    let status = StatusLine::new();
    status.say("guest running; measuring its progress rate");
    guest_rate::wait_for_first_sweeps(&vm, GUEST_TIMEOUT)?;
    let before_rate = RateMeter::start(&vm).watch_for(&vm, WARM_UP);

    let mut snapshots = vec![Snapshot::take(&vm, "before")?];
    let mut results = Vec::new();
    let mut during_rate = GuestRate::default();
    for (index, step) in plan.moves.iter().enumerate() {
        let request = request(args, step, MechanismChoice::Exactly(mechanisms[index]));
        let result = run_move(
            &vm,
            &request,
            step,
            index,
            plan.moves.len(),
            &memcpy,
            &status,
        )?;
        during_rate = during_rate.plus(result.guest_rate);
        results.push(result);
        snapshots.push(Snapshot::take(&vm, &step.after_label(index))?);
    }
    status.say("checking that the guest reads back every word it wrote");
    let final_metrics = guest_rate::wait_for_more_sweeps(&vm, CHECK_SWEEPS, GUEST_TIMEOUT)?;
    drop(status);
    vm.shutdown().map_err(DemoError::vm)?;
    let report = DemoReport::new(report::Inputs {
        machine,
        memcpy,
        vm: &vm,
        plan: &plan,
        moves: results,
        before_rate,
        during_rate,
        final_metrics,
        sweeps_after_last_move: CHECK_SWEEPS,
        snapshots,
        svg_path,
    });
    svg::write(&report.placement_map, &report)?;
    Ok(report)
}

/// Fails early, with the device's own reason, where the VM could not start.
fn check_kvm(kvm_device: &Path) -> Result<(), CliError> {
    gmem::sys::kvm::open(kvm_device)?;
    Ok(())
}

/// The VM configuration from the flags, checked before anything is created.
fn vm_config(args: &Args) -> Result<VmConfig, DemoError> {
    let config = VmConfig {
        mem_size: args.mem,
        vcpus: args.vcpus,
        ..VmConfig::default()
    };
    let page = vmm::GUEST_PAGE_BYTES;
    if args.mem < 2 * page || !args.mem.is_multiple_of(page) {
        return Err(DemoError::BadFlags(format!(
            "--mem {}: guest RAM must be a whole number of 2 MiB pieces and at least 4 MiB (the \
             first 2 MiB hold the guest's code and page tables), e.g. --mem 64M",
            args.mem
        )));
    }
    config.validate().map_err(DemoError::BadFlags)?;
    Ok(config)
}

/// Makes every page of guest RAM resident, so each move moves all of it and the counts are
/// whole (the guest never touches most of its reserved first 2 MiB). The contents do not
/// change: populating only allocates holes and maps pages for the host.
fn prefault(vm: &Vm) -> Result<(), DemoError> {
    let memory = vm.memory();
    let chunk = memory.layout().chunk_size;
    for offset in memory.chunk_offsets() {
        memory.populate(offset, chunk).map_err(DemoError::Memory)?;
    }
    Ok(())
}

/// The mechanism of each planned move, chosen once before any time is spent (`auto` probes
/// the kernel here, and not again per move); a mechanism that cannot do a move is refused.
fn choose_mechanisms(
    vm: &Vm,
    args: &Args,
    plan: &MovePlan,
    machine: &Machine,
) -> Result<Vec<MechanismKind>, DemoError> {
    let migrator = Migrator::new(vm.memory(), vm.quiesce());
    let mut chosen = Vec::with_capacity(plan.moves.len());
    for step in &plan.moves {
        chosen.push(migrator.choose(&request(args, step, args.mechanism), &machine.topology)?);
    }
    Ok(chosen)
}

/// `--max-stop-share`: a share in (0, 1], or none.
#[derive(Debug, Clone, Copy)]
struct StopShare(Option<f64>);

fn parse_stop_share(text: &str) -> Result<StopShare, String> {
    if text == "none" {
        return Ok(StopShare(None));
    }
    crate::units::parse_share(text)
        .map(|share| StopShare(Some(share)))
        .map_err(|e| format!("{e}, or 'none'"))
}

fn request(args: &Args, step: &Move, mechanism: MechanismChoice) -> MigrationRequest {
    MigrationRequest {
        policy: step.policy(),
        mechanism,
        max_stop: args.max_stop,
        verify: args.verify,
        relocate_in_place: step.in_place,
        max_stop_share: args.max_stop_share.0,
        inject: None,
    }
}

/// Runs one move while the guest keeps running, and measures the guest's progress over
/// exactly the time the move took.
fn run_move(
    vm: &Vm,
    request: &MigrationRequest,
    step: &Move,
    index: usize,
    moves: usize,
    memcpy: &MemcpyBandwidth,
    status: &StatusLine,
) -> Result<MoveResult, DemoError> {
    let meter = RateMeter::start(vm);
    let progress = |p: &Progress| {
        meter.sample(vm);
        status.say(&format!(
            "move {}/{moves} ({}, {}): {}/{} pages",
            index + 1,
            step.describe(),
            p.mechanism,
            p.pages_moved,
            p.pages_planned
        ));
    };
    let migrator = Migrator::new(vm.memory(), vm.quiesce()).with_progress(&progress);
    let report = migrator.migrate(request)?;
    let rate = meter.finish(vm);
    Ok(MoveResult::new(index, step, report, rate, memcpy))
}

/// A one-line status on stderr, rewritten in place; silent unless stderr is a terminal.
#[derive(Debug)]
struct StatusLine {
    enabled: bool,
}

impl StatusLine {
    fn new() -> Self {
        StatusLine {
            enabled: std::io::stderr().is_terminal(),
        }
    }

    fn say(&self, text: &str) {
        if self.enabled {
            eprint!("\r\x1b[2K{text}");
        }
    }
}

impl Drop for StatusLine {
    /// Leaves a clean line for the report or an error message.
    fn drop(&mut self) {
        if self.enabled {
            eprint!("\r\x1b[2K");
        }
    }
}
