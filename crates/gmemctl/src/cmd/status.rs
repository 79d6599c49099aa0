//! `gmemctl status PID`: every guest_memfd of a process, taken into gmemctl (pidfd_getfd)
//! and counted through gmemctl's own mapping, so pages only the guest touched count; or,
//! with `--api-sock`, a running VMM's placement in guest order from its control API.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use gmem::memory::{
    AttachedGmem, GmemOffset, GuestMemfd, LearnedFlags, Placement, Residency, VmmMapping, page_size,
};
use gmem::numa::{NodeId, NumaMap, NumaMaps, Topology};
use serde::Serialize;

use crate::error::CliError;
use crate::table::{Table, mib};

/// Options of `gmemctl status`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Process whose guest_memfd files to show (a VMM). Needs ptrace rights over it (root).
    #[arg(required_unless_present = "api_sock", conflicts_with = "api_sock")]
    pid: Option<u32>,
    /// Ask a VMM's control API (`gmemctl run`) instead: its memory layout, and where every
    /// page of guest RAM is, in guest-physical order.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long, conflicts_with = "numastat")]
    json: bool,
    /// Print the process's memory per node in `numastat -p`'s layout (MB), with its
    /// guest_memfd memory as a row of its own, counted as `resident` is, and left out of
    /// Private, where numastat would count only the pages the VMM maps.
    #[arg(long, conflicts_with = "api_sock")]
    numastat: bool,
}

/// One of the VMM's own mappings of a gmem.
#[derive(Debug, Serialize)]
struct MappingStatus {
    /// Address range in the VMM.
    start: String,
    end: String,
    size_bytes: u64,
    /// The gmem offset the mapping starts at; it covers `gmem_offset..gmem_offset+size_bytes`.
    gmem_offset: GmemOffset,
    perms: String,
    /// The VMA's policy as the VMM's numa_maps prints it (`null` if unreadable).
    policy: Option<String>,
    /// Pages the VMM has mapped in its own page tables: all that numa_maps can count.
    mapped_pages: u64,
    mapped_pages_per_node: BTreeMap<NodeId, u64>,
}

/// One guest_memfd of the process.
#[derive(Debug, Serialize)]
struct GmemStatus {
    /// The VMM's descriptor numbers for it.
    fds: Vec<i32>,
    inode: u64,
    size_bytes: u64,
    /// Creation flags: those known set, and those that cannot be told from outside.
    flags: LearnedFlags,
    /// Whether gmemctl could map it (MMAP); if not, its pages are invisible to the host.
    host_mappable: bool,
    /// Pages the gmem holds, guest-touched ones included (`null` if not host-mappable).
    resident_pages: Option<u64>,
    /// Resident pages per node (`null` unless the host could place them).
    pages_per_node: Option<BTreeMap<NodeId, u64>>,
    /// The policy of the VMM's mappings of it, as numa_maps prints it; several are joined
    /// with a space; `null` if the VMM does not map it or numa_maps is unreadable.
    policy: Option<String>,
    /// Pages of it the VMM maps itself: what the VMM's numa_maps and numastat count.
    vmm_mapped_pages: u64,
    vmm_mappings: Vec<MappingStatus>,
    /// Where every page is, as runs in gmem file order (`null` unless placed).
    placement: Option<Placement>,
}

/// The whole report.
#[derive(Debug, Serialize)]
struct Status {
    pid: u32,
    /// Bytes per page of every count.
    page_size: u64,
    guest_memfds: Vec<GmemStatus>,
}

/// Reads and prints the process's guest_memfd files, or asks a VMM's API.
pub fn run(kvm_device: &Path, args: Args) -> Result<(), CliError> {
    let pid = match (args.pid, &args.api_sock) {
        (_, Some(socket)) => return api_status(socket, args.json),
        (Some(pid), None) => pid,
        (None, None) => {
            return Err(CliError::InvalidArgument(
                "give a PID or --api-sock PATH".into(),
            ));
        }
    };
    // Only to rule out flags this kernel cannot set; status works without KVM access.
    let kernel_flags = gmem::sys::kvm::open(kvm_device)
        .ok()
        .and_then(|kvm| GuestMemfd::kernel_flags(&kvm));
    let attached = AttachedGmem::attach_all(pid, kernel_flags)?;
    if attached.is_empty() {
        return Err(CliError::NoGuestMemfd { pid });
    }
    let status = Status {
        pid,
        page_size: page_size(),
        guest_memfds: attached.iter().map(gmem_status).collect::<Result<_, _>>()?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else if args.numastat {
        let maps = NumaMaps::read(pid).map_err(|source| CliError::ReadProc {
            what: format!("/proc/{pid}/numa_maps"),
            source,
        })?;
        let command = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim().to_owned())
            .unwrap_or_else(|_| "?".into());
        print!("{}", render_numastat(&status, &command, &maps));
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}

/// numastat's rows, in its order, then guest_memfd's.
const NUMASTAT_ROWS: [&str; 5] = ["Huge", "Heap", "Stack", "Private", "guest_memfd"];

/// Which of [`NUMASTAT_ROWS`] a VMA's pages go to: numastat's own rule (a `huge` VMA, then
/// `heap`, then `stack`, the rest Private), except that a guest_memfd VMA is counted in the
/// guest_memfd row from gmemctl's own count instead.
fn numastat_row(map: &NumaMap) -> Option<usize> {
    if map.is_gmem() {
        return None;
    }
    Some(
        ["huge", "heap", "stack"]
            .iter()
            .position(|k| map.fields.contains_key(*k))
            .unwrap_or(3),
    )
}

/// `--numastat`: `numastat -p PID`'s table, in MB per node, with a guest_memfd row.
fn render_numastat(status: &Status, command: &str, maps: &NumaMaps) -> String {
    let mut bytes: Vec<BTreeMap<NodeId, u64>> = vec![BTreeMap::new(); NUMASTAT_ROWS.len()];
    for map in &maps.maps {
        if let Some(row) = numastat_row(map) {
            for (node, pages) in &map.pages_per_node {
                *bytes[row].entry(*node).or_default() += pages * map.page_size;
            }
        }
    }
    let mut unplaced = 0;
    for g in &status.guest_memfds {
        match &g.pages_per_node {
            Some(per_node) => {
                for (node, pages) in per_node {
                    *bytes[4].entry(*node).or_default() += pages * status.page_size;
                }
            }
            None => unplaced += 1,
        }
    }
    let nodes: Vec<NodeId> = bytes
        .iter()
        .flat_map(|row| row.keys().copied())
        .chain(
            Topology::read()
                .map(|t| t.memory_nodes())
                .unwrap_or_default(),
        )
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let rule = format!("{:17}{}", "", " ---------------".repeat(nodes.len() + 1));
    let mb = |b: u64| format!(" {:>15.2}", b as f64 / (1 << 20) as f64);
    let mut out = format!(
        "\nPer-node process memory usage (in MBs) for PID {} ({command})\n{:17}",
        status.pid, ""
    );
    for node in &nodes {
        out.push_str(&format!(" {:>15}", format!("Node {node}")));
    }
    out.push_str(&format!(" {:>15}\n{rule}\n", "Total"));
    let mut totals: BTreeMap<NodeId, u64> = BTreeMap::new();
    for (name, row) in NUMASTAT_ROWS.iter().zip(&bytes) {
        out.push_str(&format!("{name:<17}"));
        for node in &nodes {
            let b = row.get(node).copied().unwrap_or(0);
            *totals.entry(*node).or_default() += b;
            out.push_str(&mb(b));
        }
        out.push_str(&mb(row.values().sum()));
        out.push('\n');
    }
    out.push_str(&format!("{rule}\n{:<17}", "Total"));
    for node in &nodes {
        out.push_str(&mb(totals.get(node).copied().unwrap_or(0)));
    }
    out.push_str(&mb(totals.values().sum()));
    out.push_str(
        "\nguest_memfd: every page its guest_memfds hold, the guest's own included, counted \
         through gmemctl's mapping; numastat -p would count only the VMM-mapped ones, in Private\n",
    );
    if unplaced > 0 {
        out.push_str(&format!(
            "{unplaced} guest_memfd(s) could not be placed (not host-mappable or private) and \
             are not in the table\n"
        ));
    }
    out
}

fn gmem_status(gmem: &AttachedGmem) -> Result<GmemStatus, CliError> {
    let (resident_pages, placement) = match gmem.residency()? {
        Residency::NotHostMappable => (None, None),
        Residency::Private { resident_pages } => (Some(resident_pages), None),
        Residency::Placed(placement) => {
            (Some(placement.per_node().values().sum()), Some(placement))
        }
    };
    let policies: BTreeSet<&str> = gmem
        .vmm_mappings()
        .iter()
        .filter_map(|m| m.policy.as_deref())
        .collect();
    Ok(GmemStatus {
        fds: gmem.fds().to_vec(),
        inode: gmem.inode(),
        size_bytes: gmem.size(),
        flags: gmem.flags(),
        host_mappable: gmem.is_host_mappable(),
        resident_pages,
        pages_per_node: placement.as_ref().map(Placement::per_node),
        policy: (!policies.is_empty()).then(|| policies.into_iter().collect::<Vec<_>>().join(" ")),
        vmm_mapped_pages: gmem
            .vmm_mappings()
            .iter()
            .map(VmmMapping::mapped_pages)
            .sum(),
        vmm_mappings: gmem.vmm_mappings().iter().map(mapping_status).collect(),
        placement,
    })
}

fn mapping_status(mapping: &VmmMapping) -> MappingStatus {
    MappingStatus {
        start: format!("{:#x}", mapping.start),
        end: format!("{:#x}", mapping.end),
        size_bytes: mapping.len(),
        gmem_offset: mapping.gmem_offset,
        perms: mapping.perms.clone(),
        policy: mapping.policy.clone(),
        mapped_pages: mapping.mapped_pages(),
        mapped_pages_per_node: mapping.mapped_pages_per_node.clone(),
    }
}

fn render(status: &Status) -> String {
    let nodes: Vec<NodeId> = status
        .guest_memfds
        .iter()
        .filter_map(|g| g.pages_per_node.as_ref())
        .flat_map(|per_node| per_node.keys().copied())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let pages = |n: u64| format!("{n} pages ({})", mib(n * status.page_size));
    let mut header = vec![
        "fd".to_string(),
        "size".into(),
        "flags".into(),
        "host-mappable".into(),
        "resident".into(),
    ];
    header.extend(nodes.iter().map(|n| format!("node {n}")));
    header.extend([
        "VMM-mapped".into(),
        "policy".into(),
        "VMM mapping (gmem offsets)".into(),
    ]);
    let mut t = Table::new(header);
    for g in &status.guest_memfds {
        let mut row = vec![
            g.fds
                .iter()
                .map(i32::to_string)
                .collect::<Vec<_>>()
                .join(","),
            mib(g.size_bytes),
            g.flags.to_string(),
            if g.host_mappable { "yes" } else { "no" }.into(),
            g.resident_pages
                .map_or_else(|| "unknown (not host-mappable)".into(), pages),
        ];
        row.extend(nodes.iter().map(|n| match &g.pages_per_node {
            Some(per_node) => format!("{} pages", per_node.get(n).copied().unwrap_or(0)),
            None if g.host_mappable => "unknown (private)".into(),
            None => "unknown".into(),
        }));
        let mappings: Vec<String> = g
            .vmm_mappings
            .iter()
            .map(|m| {
                format!(
                    "{}-{} ({:#x}-{:#x})",
                    m.start,
                    m.end,
                    m.gmem_offset,
                    m.gmem_offset + m.size_bytes
                )
            })
            .collect();
        row.extend([
            format!("{} pages", g.vmm_mapped_pages),
            g.policy.clone().unwrap_or_else(|| "-".into()),
            if mappings.is_empty() {
                "none".into()
            } else {
                mappings.join(", ")
            },
        ]);
        t.row(row);
    }
    let count = status.guest_memfds.len();
    format!(
        "process {}: {count} guest_memfd{}\n{}\
         resident: pages each guest_memfd holds, counted through gmemctl's own mapping of it, \
         pages only the guest touched included\n\
         VMM-mapped: the pages the VMM maps itself, all that its numa_maps and numastat -p see\n",
        status.pid,
        if count == 1 { "" } else { "s" },
        t.render()
    )
}

/// `status --api-sock`: the VM and its placement, from the API.
fn api_status(socket: &Path, json: bool) -> Result<(), CliError> {
    let client = vmm::api::ApiClient::new(socket);
    let get = |path: &str| -> Result<serde_json::Value, CliError> {
        let reply = client.get(path)?;
        if reply.status != 200 {
            return Err(crate::cmd::migrate::refusal(&reply));
        }
        Ok(reply.json()?)
    };
    let vm = get("/vm")?;
    let placement = get("/memory/placement")?;
    if json {
        let status = serde_json::json!({
            "api_sock": socket,
            "vm": vm,
            "placement": placement,
        });
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render_api(socket, &vm, &placement));
    }
    Ok(())
}

/// Ranges listed in the text output; `--json` has them all.
const SHOWN_RANGES: usize = 32;

fn render_api(socket: &Path, vm: &serde_json::Value, placement: &serde_json::Value) -> String {
    let number = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let memory = &vm["memory"];
    let flags: Vec<&str> = memory["gmem_flags"]["names"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .collect();
    let mut out = format!(
        "VM (pid {}) via {}: {}, {} of guest RAM in {} chunks of {}, {} of {} spare chunks \
         free, gmem {}\n",
        vm["pid"],
        socket.display(),
        vm["state"].as_str().unwrap_or("?"),
        mib(number(&memory["guest_size"])),
        memory["chunks"],
        mib(number(&memory["chunk_size"])),
        memory["spare_chunks_free"],
        memory["spare_chunks"],
        flags.join("|")
    );
    let page = number(&placement["page_size"]);
    let mut t = Table::new(["node", "pages", "size"]);
    for (node, pages) in placement["per_node"].as_object().into_iter().flatten() {
        t.row([node.clone(), pages.to_string(), mib(number(pages) * page)]);
    }
    let absent = number(&placement["not_present"]);
    t.row(["not present".into(), absent.to_string(), mib(absent * page)]);
    out += &t.render();
    let ranges = placement["ranges"].as_array().cloned().unwrap_or_default();
    out += &format!("{} ranges in guest order:\n", ranges.len());
    for range in ranges.iter().take(SHOWN_RANGES) {
        let first = number(&range["first_page"]);
        let last = first + number(&range["pages"]).saturating_sub(1);
        let location = &range["location"];
        let place = if let Some(node) = location["node"].as_u64() {
            format!("node {node}")
        } else if let Some(errno) = location["error"].as_i64() {
            format!("error {errno}")
        } else {
            "not present".into()
        };
        let bytes = number(&range["pages"]) * page;
        let size = if bytes < 1 << 20 {
            format!("{} KiB", bytes >> 10)
        } else {
            mib(bytes)
        };
        out += &format!("  pages {first}-{last} ({size}): {place}\n");
    }
    if ranges.len() > SHOWN_RANGES {
        out += &format!(
            "  ... and {} more (--json shows them all)\n",
            ranges.len() - SHOWN_RANGES
        );
    }
    out
}
