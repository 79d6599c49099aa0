//! `gmemctl probe`: what this host can do with guest_memfd.

use std::path::Path;

use gmem::probe::{self, ProbeReport, Verdict};

use crate::error::CliError;
use crate::table::{Table, mib};

/// Options of `gmemctl probe`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs the probe and prints its report.
pub fn run(kvm_device: &Path, args: Args) -> Result<(), CliError> {
    let report = probe::probe(kvm_device)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

fn verdict(v: Verdict) -> &'static str {
    match v {
        Verdict::Yes => "yes",
        Verdict::No => "no",
        Verdict::Unknown => "unknown",
    }
}

fn render(r: &ProbeReport) -> String {
    let mut t = Table::new(["item", "value"]);
    t.row(["kernel".to_string(), r.kernel_release.clone()]);
    t.row([
        "kvm".to_string(),
        format!("{} (API {})", r.kvm_device, r.kvm_api_version),
    ]);
    for cap in &r.capabilities {
        let value = match (cap.name, r.guest_memfd_flags) {
            ("KVM_CAP_GUEST_MEMFD_FLAGS", Some(flags)) => format!("{} = {flags}", cap.value),
            _ => cap.value.to_string(),
        };
        t.row([format!("{} ({})", cap.name, cap.number), value]);
    }
    for node in &r.numa.nodes {
        t.row([
            format!("node {}", node.id),
            format!(
                "{} total, {} free, cpus {}",
                mib(node.total_bytes),
                mib(node.free_bytes),
                if node.cpus.is_empty() {
                    "none"
                } else {
                    &node.cpus
                }
            ),
        ]);
    }
    t.row(["mbind on gmem", verdict(r.mbind_on_gmem.verdict)]);
    t.row(["native gmem migration", verdict(r.native_migration.verdict)]);
    let mut out = t.render();
    out.push_str(&format!("\nmbind on gmem: {}\n", r.mbind_on_gmem.evidence));
    out.push_str(&format!(
        "native gmem migration: {}\n",
        r.native_migration.evidence
    ));
    out
}
