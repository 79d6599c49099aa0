//! `gmemctl`: probe, place, inspect and migrate KVM guest_memfd memory across NUMA nodes.

#![forbid(unsafe_code)]

mod cmd;
mod error;
mod table;
mod units;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use error::CliError;

/// Make KVM guest_memfd memory movable between NUMA nodes, and prove nothing is lost.
#[derive(Debug, Parser)]
#[command(name = "gmemctl", version, about, long_about = None)]
struct Cli {
    /// KVM device to use.
    #[arg(long, global = true, value_name = "PATH", default_value = gmem::sys::kvm::DEFAULT_KVM_DEVICE)]
    kvm_device: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Report what this host can do: KVM and guest_memfd capabilities, NUMA nodes, whether
    /// mbind places gmem pages, and whether the kernel migrates gmem folios (tried live).
    Probe(cmd::probe::Args),
    /// Show every guest_memfd of a process (a VMM): size, flags, pages per node counting
    /// the pages only the guest touched, policy and the VMM's own mappings of it.
    Status(cmd::status::Args),
    /// Start the built-in guest in a VM on gmem memory and serve its control API (HTTP/JSON
    /// on a Unix socket) until SIGINT or SIGTERM.
    Run(cmd::run::Args),
    /// Move a VM's memory: ask a running `gmemctl run` through its API, or move any VMM's
    /// guest_memfd memory from outside with --pid; print the verified result. Exit 1 if
    /// the migration was incomplete or did not verify.
    Migrate(cmd::migrate::Args),
    /// Finish what a `gmemctl migrate --pid` that died left: put its journalled batch back
    /// into the VMM's guest memory (every byte compared) and resume the VMM it had stopped.
    Recover(cmd::recover::Args),
    /// Boot the built-in guest and move all its memory to another node and back while it
    /// writes and verifies it (on one node: relocate it within the node, proven by PFNs);
    /// report stops, throughput and mismatches, and draw a placement map.
    Demo(cmd::demo::Args),
    /// The seed's kernel selftest, for every mechanism: bind a gmem to node 0, fill page i
    /// with (i & 0xff), move it to node 1 and back, checking node and every byte each time.
    /// On one node, each move is a relocation proven by changed PFNs.
    Selftest(cmd::selftest::Args),
    /// Measure each mechanism's throughput and guest stop times, as ratios to single-thread
    /// memcpy and to a naive refault measured in the same run.
    Bench(cmd::bench::Args),
}

fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Probe(args) => cmd::probe::run(&cli.kvm_device, args),
        Command::Status(args) => cmd::status::run(&cli.kvm_device, args),
        Command::Run(args) => cmd::run::run(&cli.kvm_device, args),
        Command::Migrate(args) => cmd::migrate::run(&cli.kvm_device, args),
        Command::Recover(args) => cmd::recover::run(args),
        Command::Demo(args) => cmd::demo::run(&cli.kvm_device, args),
        Command::Selftest(args) => cmd::selftest::run(&cli.kvm_device, args),
        Command::Bench(args) => cmd::bench::run(&cli.kvm_device, args),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("gmemctl: {err}");
            let mut cause = std::error::Error::source(&err);
            while let Some(c) = cause {
                eprintln!("  caused by: {c}");
                cause = c.source();
            }
            ExitCode::from(err.exit_code())
        }
    }
}
