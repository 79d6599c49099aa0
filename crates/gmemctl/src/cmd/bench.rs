//! `gmemctl bench`: throughput and guest stop time of each mechanism, as ratios against
//! baselines measured in the same run (single-thread memcpy, and a naive refault).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gmem::memory::{ChunkLayout, GmemFlags, GmemOffset, GuestMemory, MemoryError, page_size};
use gmem::migrate::{
    MechanismChoice, MechanismKind, MigrateError, MigrationReport, MigrationRequest, Migrator,
    NothingToQuiesce, PlacementPolicy, StopPhaseStats, StopStats, Verify,
};
use gmem::numa::{NodeId, Topology};
use gmem::sys::mman::Mmap;
use gmem::testing::{fill_seed_pattern, first_seed_mismatch};
use serde::Serialize;

use crate::cmd::host::{CHUNK, TestHost, check_chunked_size};
use crate::error::CliError;
use crate::table::{Table, mib};
use crate::units::{parse_duration, parse_size};

/// Spare chunks for remap: enough to keep allocation ahead of the copies.
const SPARE_CHUNKS: u64 = 8;
/// Largest buffer the memcpy baseline copies.
const MEMCPY_BYTES: u64 = 256 << 20;

/// Options of `gmemctl bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Guest memory to move per mechanism (a multiple of 2 MiB).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Stop budget per step.
    #[arg(long, default_value = "1ms", value_parser = parse_duration)]
    max_stop: Duration,
    /// Verification per step: full (placement, PFNs, content hashes), placement, off.
    #[arg(long, value_enum, default_value = "full")]
    verify: Verify,
    /// Measure only this mechanism (repeatable; default: all), e.g. to profile one.
    #[arg(long = "mechanism", value_enum, value_name = "MECHANISM")]
    mechanisms: Vec<MechanismKind>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

/// One measured way of moving the memory.
#[derive(Debug, Serialize)]
struct Row {
    name: String,
    /// Why it did not run, if it did not.
    skipped: Option<String>,
    throughput_gbps: f64,
    ratio_to_memcpy: f64,
    ratio_to_naive: f64,
    stops: StopStats,
    /// The stops phase by phase, where the mechanism times them (remap).
    stop_phases: Option<StopPhaseStats>,
    pages_moved: u64,
    pages_hash_verified: u64,
    pfns_changed: Option<u64>,
    bytes_intact: bool,
}

#[derive(Debug, Serialize)]
struct Bench {
    machine: String,
    size_bytes: u64,
    from: NodeId,
    to: NodeId,
    memcpy_gbps: f64,
    naive_gbps: f64,
    rows: Vec<Row>,
}

/// Runs the benchmark and prints its table.
pub fn run(kvm_device: &Path, args: Args) -> Result<(), CliError> {
    check_chunked_size(args.size)?;
    let TestHost {
        vm,
        flags,
        topology,
        home: from,
        away: to,
    } = TestHost::open(kvm_device)?;

    let memcpy_gbps = memcpy_bandwidth(args.size.min(MEMCPY_BYTES))?;
    let naive = naive_refault(&vm, flags, args.size)?;
    let naive_gbps = naive.throughput_gbps;
    let mut rows = vec![naive];
    for mechanism in MechanismKind::ALL {
        if !args.mechanisms.is_empty() && !args.mechanisms.contains(&mechanism) {
            continue;
        }
        rows.push(measure(&vm, flags, mechanism, &args, from, to)?);
    }
    for row in &mut rows {
        row.ratio_to_memcpy = row.throughput_gbps / memcpy_gbps;
        row.ratio_to_naive = row.throughput_gbps / naive_gbps;
    }
    let bench = Bench {
        machine: machine(&topology),
        size_bytes: args.size,
        from,
        to,
        memcpy_gbps,
        naive_gbps,
        rows,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&bench)?);
    } else {
        print!("{}", render(&bench));
    }
    if bench
        .rows
        .iter()
        .any(|r| r.skipped.is_none() && !r.bytes_intact)
    {
        return Err(CliError::CheckFailed(
            "a mechanism lost data during the benchmark".into(),
        ));
    }
    Ok(())
}

fn machine(topology: &Topology) -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "Linux {}, {} CPUs, {} NUMA node(s)",
        release.trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        topology.nodes.len()
    )
}

/// Best of five single-thread copies between two populated anonymous buffers, GB/s.
fn memcpy_bandwidth(bytes: u64) -> Result<f64, CliError> {
    let map = |len| -> Result<Mmap, CliError> {
        let m =
            Mmap::anonymous(len as usize).map_err(|source| MemoryError::Mmap { len, source })?;
        m.populate_write(0, len as usize)
            .map_err(|source| MemoryError::Populate {
                offset: 0,
                len,
                source,
            })?;
        Ok(m)
    };
    let (src, dst) = (map(bytes)?, map(bytes)?);
    src.fill(0, bytes as usize, 0x5a);
    let best = (0..5)
        .map(|_| {
            let started = Instant::now();
            src.copy_to(0, &dst, 0, bytes as usize);
            started.elapsed()
        })
        .min()
        .expect("five runs");
    Ok(bytes as f64 / best.as_secs_f64() / 1e9)
}

/// The baseline any mechanism must beat: one thread copies each 2 MiB batch out, punches
/// it, and copies it back, faulting fresh pages in one by one.
fn naive_refault(vm: &Arc<kvm_ioctls::VmFd>, flags: GmemFlags, size: u64) -> Result<Row, CliError> {
    let memory = GuestMemory::create(vm.clone(), ChunkLayout::single_slot(size), flags)?;
    fill_seed_pattern(&memory)?;
    let map = memory.mapping()?;
    let mut bounce = vec![0u8; CHUNK as usize];
    let mut stops = Vec::new();
    let started = Instant::now();
    for offset in (0..size).step_by(CHUNK as usize).map(GmemOffset) {
        let step = Instant::now();
        map.read(offset.index(), &mut bounce);
        memory.gmem().punch(offset, CHUNK)?;
        map.write(offset.index(), &bounce);
        stops.push(step.elapsed());
    }
    let elapsed = started.elapsed();
    Ok(Row {
        name: "naive refault (baseline)".into(),
        skipped: None,
        throughput_gbps: size as f64 / elapsed.as_secs_f64() / 1e9,
        ratio_to_memcpy: 0.0,
        ratio_to_naive: 0.0,
        stops: StopStats::from_durations(&stops),
        stop_phases: None,
        pages_moved: size / page_size(),
        pages_hash_verified: 0,
        pfns_changed: None,
        bytes_intact: first_seed_mismatch(&memory)?.is_none(),
    })
}

fn measure(
    vm: &Arc<kvm_ioctls::VmFd>,
    flags: GmemFlags,
    mechanism: MechanismKind,
    args: &Args,
    from: NodeId,
    to: NodeId,
) -> Result<Row, CliError> {
    let layout = match mechanism {
        MechanismKind::Remap => ChunkLayout::chunked(args.size, CHUNK, SPARE_CHUNKS),
        _ => ChunkLayout::single_slot(args.size),
    };
    let memory = GuestMemory::create(vm.clone(), layout, flags)?;
    memory.set_policy(
        GmemOffset(0),
        memory.gmem().size(),
        &gmem::memory::Policy::Bind(gmem::numa::NodeMask::single(from)),
    )?;
    fill_seed_pattern(&memory)?;
    let request = MigrationRequest {
        mechanism: MechanismChoice::Exactly(mechanism),
        max_stop: args.max_stop,
        verify: args.verify,
        relocate_in_place: from == to,
        ..MigrationRequest::new(PlacementPolicy::Bind(to))
    };
    let report: MigrationReport = match Migrator::new(&memory, &NothingToQuiesce).migrate(&request)
    {
        Ok(report) => report,
        Err(
            e
            @ (MigrateError::NativeUnsupported { .. } | MigrateError::MechanismUnavailable { .. }),
        ) => {
            return Ok(Row {
                name: mechanism.to_string(),
                skipped: Some(e.to_string()),
                throughput_gbps: 0.0,
                ratio_to_memcpy: 0.0,
                ratio_to_naive: 0.0,
                stops: StopStats::default(),
                stop_phases: None,
                pages_moved: 0,
                pages_hash_verified: 0,
                pfns_changed: None,
                bytes_intact: true,
            });
        }
        Err(e) => return Err(e.into()),
    };
    let hashed_steps = report.content_checks;
    Ok(Row {
        name: mechanism.to_string(),
        skipped: None,
        throughput_gbps: report.throughput_gbps,
        ratio_to_memcpy: 0.0,
        ratio_to_naive: 0.0,
        stops: report.stops,
        stop_phases: report.stop_phases,
        pages_moved: report.pages_moved,
        pages_hash_verified: if hashed_steps == report.steps {
            report.pages_moved
        } else {
            0
        },
        pfns_changed: report.pfns_changed,
        bytes_intact: report.complete && first_seed_mismatch(&memory)?.is_none(),
    })
}

fn render(b: &Bench) -> String {
    let mut out = format!(
        "gmemctl bench: {} per mechanism, node {} -> {}{}\nmachine: {}\nbaselines measured in this run: single-thread memcpy {:.2} GB/s, naive refault {:.2} GB/s\n\n",
        mib(b.size_bytes),
        b.from,
        b.to,
        if b.from == b.to {
            " (relocation within the node)"
        } else {
            ""
        },
        b.machine,
        b.memcpy_gbps,
        b.naive_gbps
    );
    let mut t = Table::new([
        "mechanism",
        "GB/s",
        "x memcpy",
        "x naive",
        "stops",
        "stop p50",
        "stop p99",
        "stop max",
        "pages hashed",
        "PFNs changed",
        "bytes",
    ]);
    for r in &b.rows {
        if let Some(reason) = &r.skipped {
            t.row([r.name.clone(), format!("SKIP: {reason}")]);
            continue;
        }
        t.row([
            r.name.clone(),
            format!("{:.2}", r.throughput_gbps),
            format!("{:.2}", r.ratio_to_memcpy),
            format!("{:.2}", r.ratio_to_naive),
            r.stops.count.to_string(),
            format!("{} us", r.stops.p50_us),
            format!("{} us", r.stops.p99_us),
            format!("{} us", r.stops.max_us),
            r.pages_hash_verified.to_string(),
            r.pfns_changed.map_or("-".into(), |n| n.to_string()),
            if r.bytes_intact { "intact" } else { "LOST" }.into(),
        ]);
    }
    out.push_str(&t.render());
    for r in &b.rows {
        if let Some(phases) = &r.stop_phases {
            out.push_str(&format!("{} stops by phase, p50/p99: {phases}\n", r.name));
        }
    }
    out.push_str("\nThe naive baseline stops the guest for each whole 2 MiB batch; its stop times are per batch.\n");
    out.push_str("No VM runs here: a stop's entry costs nothing, and remap's swap only updates its table (gmemctl demo times both).\n");
    out
}
