//! `gmemctl status PID`: a process's guest_memfd mappings, policy and pages per node.

use std::collections::BTreeMap;
use std::io;

use gmem::numa::{NodeId, NumaMaps};
use serde::Serialize;

use crate::error::CliError;
use crate::table::{Table, mib};

/// Options of `gmemctl status`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Process whose guest_memfd mappings to show (a VMM).
    pid: u32,
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
    let pid = args.pid;
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
