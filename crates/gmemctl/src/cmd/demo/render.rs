//! The demo report as text for people.

use std::fmt::Write as _;

use gmem::numa::NumaMap;
use gmem::numa::Topology;

use super::guest_rate::GuestRate;
use super::report::{DemoReport, MoveResult};
use crate::table::{Table, mib};

/// The whole report.
pub fn human(r: &DemoReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "gmemctl demo: a {} guest with {} vCPUs writes and verifies its memory while all of it moves\n",
        mib(r.guest.mem_bytes),
        r.guest.vcpus
    );
    out.push_str(&about(r));
    out.push('\n');
    out.push_str(&moves_table(r));
    out.push('\n');
    out.push_str(&guest_section(r));
    out.push('\n');
    out.push_str(&numa_maps_section(r));
    out.push('\n');
    for note in &r.notes {
        let _ = writeln!(out, "note: {note}");
    }
    let _ = writeln!(out, "\nplacement map: {}", r.placement_map.display());
    out.push_str(&verdict(r));
    out
}

fn about(r: &DemoReport) -> String {
    let mut t = Table::default();
    t.row([
        "machine".to_string(),
        format!(
            "Linux {}, {} CPUs ({}), {}",
            r.machine.kernel_release,
            r.machine.cpus,
            r.machine.cpu_model.as_deref().unwrap_or("unknown model"),
            nodes(&r.machine.topology)
        ),
    ]);
    if let Some(load) = r.machine.load_average_1min {
        t.row([
            "load".to_string(),
            format!(
                "{load:.2} runnable tasks (1-minute average) at start{}",
                if load > r.machine.cpus as f64 {
                    ": more than the CPUs, so other work competed with the guest and the moves"
                } else {
                    ""
                }
            ),
        ]);
    }
    t.row([
        "guest".to_string(),
        format!(
            "{} in {} chunks of {} (one memslot each, {} spare), {} pages of {} KiB; first \
             port write {}",
            mib(r.guest.mem_bytes),
            r.guest.chunks,
            mib(r.guest.chunk_bytes),
            r.guest.spare_chunks,
            r.guest.pages,
            r.guest.page_size >> 10,
            r.guest
                .first_port_write_us
                .map_or("not seen".to_owned(), |us| format!(
                    "{:.1} ms after start",
                    us as f64 / 1000.0
                ))
        ),
    ]);
    t.row(["moves".to_string(), r.explanation.clone()]);
    t.row([
        "memcpy".to_string(),
        format!(
            "{:.1} GB/s, one thread, best of {} copies of {} (measured in this run)",
            r.memcpy.gbps,
            r.memcpy.runs_gbps.len(),
            mib(r.memcpy.buffer_bytes)
        ),
    ]);
    t.render()
}

fn nodes(topology: &Topology) -> String {
    let list: Vec<String> = topology
        .nodes
        .iter()
        .map(|n| {
            format!(
                "node {}: {:.1} GiB, cpus {}",
                n.id,
                n.total_bytes as f64 / (1u64 << 30) as f64,
                if n.cpus.is_empty() { "none" } else { &n.cpus }
            )
        })
        .collect();
    let count = topology.nodes.len();
    format!(
        "{count} NUMA node{} ({})",
        if count == 1 { "" } else { "s" },
        list.join("; ")
    )
}

fn moves_table(r: &DemoReport) -> String {
    let mut t = Table::new([
        "move",
        "mechanism",
        "pages moved",
        "PFNs changed",
        "steps",
        "stop p50/p99/max",
        "GB/s",
        "of memcpy",
        "content checks",
        "guest rate",
    ]);
    for m in &r.moves {
        t.row(move_row(m, &r.guest_progress.before));
    }
    let totals = &r.totals;
    t.row([
        "all".to_string(),
        String::new(),
        totals.pages_moved.to_string(),
        pfns(totals.pfns_changed, totals.pfns_checked),
        String::new(),
        "(see above)".into(),
        gbps(totals.throughput_gbps),
        percent(totals.throughput_vs_memcpy),
        content_checks(totals.content_checks, totals.content_mismatches),
        percent(r.guest_progress.share_during),
    ]);
    let mut out = t.render();
    for m in &r.moves {
        if let Some(phases) = &m.migration.stop_phases {
            out.push_str(&format!(
                "  move {} stops by phase, p50/p99: {phases}\n",
                m.number
            ));
        }
    }
    out.push_str(
        "  PFNs changed: pages whose page frame differs after their step, of the pages the \
         engine compared (remap compares whole chunks)\n  stop: per step, as the engine timed \
         it, from its pause request until its resume call returned\n  GB/s: bytes moved per \
         second of the move's wall time; guest rate: bytes the guest verified per second during \
         the move, as a share of its rate before\n",
    );
    out
}

fn move_row(m: &MoveResult, before: &GuestRate) -> Vec<String> {
    let report = &m.migration;
    let stops = &report.stops;
    vec![
        format!("{} {}", m.number, m.step.describe()),
        report.mechanism.to_string(),
        format!("{} of {}", report.pages_moved, report.pages_planned),
        pfns(report.pfns_changed, report.pfns_checked),
        report.steps.to_string(),
        [stops.p50_us, stops.p99_us, stops.max_us]
            .map(short_duration)
            .join(" / "),
        gbps(report.throughput_gbps),
        percent(m.throughput_vs_memcpy),
        content_checks(report.content_checks, report.content_mismatches),
        percent(m.guest_rate.share_of(before)),
    ]
}

/// "850 us", "29.4 ms".
pub fn short_duration(us: u64) -> String {
    if us < 1000 {
        format!("{us} us")
    } else {
        format!("{:.1} ms", us as f64 / 1000.0)
    }
}

fn pfns(changed: Option<u64>, checked: Option<u64>) -> String {
    match (changed, checked) {
        (Some(changed), Some(checked)) => format!("{changed} of {checked}"),
        _ => "not readable".into(),
    }
}

fn content_checks(checks: u64, mismatches: u64) -> String {
    if mismatches == 0 {
        format!("{checks} matched")
    } else {
        format!("{mismatches} of {checks} DIFFER")
    }
}

/// "92%", or "1.3%" below 10%.
fn percent(share: f64) -> String {
    let value = share * 100.0;
    if value < 10.0 {
        format!("{value:.1}%")
    } else {
        format!("{value:.0}%")
    }
}

/// A rate in GB/s with three significant digits below 1 ("0.0912"), two decimals above.
pub fn gbps(value: f64) -> String {
    let decimals = if value > 0.0 && value < 1.0 {
        (2 - value.log10().floor() as i32).clamp(2, 5) as usize
    } else {
        2
    };
    format!("{value:.decimals$}")
}

fn guest_section(r: &DemoReport) -> String {
    let g = &r.guest_check;
    let p = &r.guest_progress;
    let mut t = Table::default();
    t.row([
        "guest progress".to_string(),
        format!(
            "{:.2} GB/s verified before the moves, {:.2} GB/s during them: {} of its rate before",
            p.before.bytes_per_second / 1e9,
            p.during.bytes_per_second / 1e9,
            percent(p.share_during)
        ),
    ]);
    t.row([
        "guest mismatches".to_string(),
        format!(
            "{} in {} sweeps ({:.1} GB written and read back), {} full sweeps per vCPU after the last move{}",
            g.mismatches,
            g.sweeps,
            g.bytes_verified as f64 / 1e9,
            g.sweeps_after_last_move,
            if g.vcpu_failures.is_empty() {
                String::new()
            } else {
                format!("; vCPU failures: {}", g.vcpu_failures.join(", "))
            }
        ),
    ]);
    let summary = |s: &vmm::LatencySummary| {
        let [p50, p99, max] = [s.p50_us, s.p99_us, s.max_us].map(|us| short_duration(us as u64));
        format!("p50 {p50} / p99 {p99} / max {max} over {} stops", s.count)
    };
    t.row([
        "VM: pause latency".to_string(),
        format!(
            "{} (request until every vCPU parked)",
            summary(&g.stop_latency)
        ),
    ]);
    t.row([
        "VM: guest held".to_string(),
        format!(
            "{} (pause request until resume request: the engine's stop without its own wait \
             to run again after waking the vCPUs)",
            summary(&g.quiesce_hold)
        ),
    ]);
    t.render()
}

fn numa_maps_section(r: &DemoReport) -> String {
    let mut out = String::new();
    let (Some(first), Some(last)) = (r.placement.first(), r.placement.last()) else {
        return out;
    };
    for snapshot in [first, last] {
        let _ = writeln!(
            out,
            "numa_maps {} (guest_memfd lines of this process):",
            snapshot.label
        );
        for map in &snapshot.numa_maps {
            let _ = writeln!(out, "  {}", numa_maps_line(map));
        }
    }
    out
}

/// A numa_maps line as the kernel prints it (the fields we keep), plus its size.
fn numa_maps_line(map: &NumaMap) -> String {
    let nodes: Vec<String> = map
        .pages_per_node
        .iter()
        .map(|(node, pages)| format!("N{node}={pages}"))
        .collect();
    format!(
        "{:x} {} file={} {} kernelpagesize_kB={}   [{} mapped, {} resident]",
        map.start,
        map.policy,
        map.file.as_deref().unwrap_or("?"),
        nodes.join(" "),
        map.page_size >> 10,
        mib(map.size()),
        mib(map.resident_pages() * map.page_size)
    )
}

fn verdict(r: &DemoReport) -> String {
    if r.verdict.ok {
        format!(
            "result: no byte lost. The guest read back every word it wrote ({} mismatches), all \
             {} host-side content checks matched, and every move moved and verified all its \
             pages.\n",
            r.guest_check.mismatches, r.totals.content_checks
        )
    } else {
        format!("result: FAILED: {}\n", r.verdict.problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_short() {
        assert_eq!(short_duration(850), "850 us");
        assert_eq!(short_duration(29_445), "29.4 ms");
    }

    #[test]
    fn small_rates_keep_their_digits() {
        assert_eq!(gbps(0.0912), "0.0912");
        assert_eq!(gbps(0.5), "0.500");
        assert_eq!(gbps(1.2345), "1.23");
        assert_eq!(gbps(0.0), "0.00");
        assert_eq!(percent(0.013), "1.3%");
        assert_eq!(percent(0.92), "92%");
    }
}
