//! `gmemctl status PID`: a process's guest_memfd mappings, policy and pages per node; or,
//! with `--api-sock`, a running VMM's placement in guest order from its control API.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use gmem::numa::{NodeId, NumaMaps};
use serde::Serialize;

use crate::error::CliError;
use crate::table::{Table, mib};

/// Options of `gmemctl status`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Process whose guest_memfd mappings to show (a VMM).
    #[arg(required_unless_present = "api_sock", conflicts_with = "api_sock")]
    pid: Option<u32>,
    /// Ask a VMM's control API (`gmemctl run`) instead: its memory layout, and where every
    /// page of guest RAM is, in guest-physical order.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Print the mappings as JSON.
    #[arg(long)]
    json: bool,
}

/// One gmem mapping as `status` reports it.
#[derive(Debug, Serialize)]
struct GmemMapping {
    start: String,
    end: String,
    size_bytes: u64,
    policy: String,
    page_size: u64,
    resident_pages: u64,
    pages_per_node: BTreeMap<NodeId, u64>,
}

/// The whole report.
#[derive(Debug, Serialize)]
struct Status {
    pid: u32,
    mappings: Vec<GmemMapping>,
}

/// Reads and prints the process's gmem mappings.
pub fn run(args: Args) -> Result<(), CliError> {
    let pid = match (args.pid, &args.api_sock) {
        (_, Some(socket)) => return api_status(socket, args.json),
        (Some(pid), None) => pid,
        (None, None) => {
            return Err(CliError::InvalidArgument(
                "give a PID or --api-sock PATH".into(),
            ));
        }
    };
    let maps = NumaMaps::read(pid).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => CliError::NoSuchProcess { pid },
        io::ErrorKind::PermissionDenied => CliError::ProcessPermission { pid },
        _ => CliError::ReadMaps { pid, source },
    })?;
    let status = Status {
        pid,
        mappings: maps
            .gmem()
            .map(|m| GmemMapping {
                start: format!("{:#x}", m.start),
                end: format!("{:#x}", m.end),
                size_bytes: m.size(),
                policy: m.policy.clone(),
                page_size: m.page_size,
                resident_pages: m.resident_pages(),
                pages_per_node: m.pages_per_node.clone(),
            })
            .collect(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}

fn render(status: &Status) -> String {
    if status.mappings.is_empty() {
        return format!("process {} has no guest_memfd mappings\n", status.pid);
    }
    let nodes: Vec<NodeId> = status
        .mappings
        .iter()
        .flat_map(|m| m.pages_per_node.keys().copied())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut header = vec![
        "mapping".to_string(),
        "size".into(),
        "policy".into(),
        "resident".into(),
    ];
    header.extend(nodes.iter().map(|n| format!("node {n}")));
    let mut t = Table::new(header);
    for m in &status.mappings {
        let pages = |n: u64| format!("{n} pages ({})", mib(n * m.page_size));
        let mut row = vec![
            format!("{}-{}", m.start, m.end),
            mib(m.size_bytes),
            m.policy.clone(),
            pages(m.resident_pages),
        ];
        row.extend(
            nodes
                .iter()
                .map(|n| pages(m.pages_per_node.get(n).copied().unwrap_or(0))),
        );
        t.row(row);
    }
    format!(
        "process {}: guest_memfd mappings\n{}",
        status.pid,
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
