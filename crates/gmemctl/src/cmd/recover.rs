//! `gmemctl recover`: finish what a `gmemctl migrate --pid` that died left behind — put the
//! journalled batch back into the VMM's guest memory and resume the VMM it had stopped.

use std::path::{Path, PathBuf};

use gmem::foreign::{Recovered, journalled_pids, recover};

use crate::error::CliError;

/// Options of `gmemctl recover`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this VMM's journal; by default every journal in the directory.
    #[arg(long, value_name = "PID")]
    pid: Option<u32>,
    /// Where `gmemctl migrate --pid` keeps its journals.
    #[arg(long, value_name = "DIR", default_value = gmem::foreign::DEFAULT_JOURNAL_DIR)]
    journal_dir: PathBuf,
    /// Print what was done as JSON.
    #[arg(long)]
    json: bool,
}

/// Recovers every journal asked for; the first one that cannot be recovered ends it.
pub fn run(args: Args) -> Result<(), CliError> {
    let pids = match args.pid {
        Some(pid) => vec![pid],
        None => journalled_pids(&args.journal_dir)?,
    };
    let mut done = Vec::new();
    for pid in pids {
        if let Some(recovered) = recover(&args.journal_dir, pid)? {
            if !args.json {
                println!("{}", describe(&recovered, &args.journal_dir));
            }
            done.push(recovered);
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&done)?);
    } else if done.is_empty() {
        println!(
            "nothing to recover: no journal{} in {}",
            args.pid
                .map_or_else(String::new, |p| format!(" of process {p}")),
            args.journal_dir.display()
        );
    }
    Ok(())
}

/// What recovery did for one process, as one line (and one line per warning).
pub fn describe(recovered: &Recovered, dir: &Path) -> String {
    let pid = recovered.pid;
    if recovered.process_gone {
        return format!(
            "process {pid} is gone (or its PID names another process now): its journal in {} \
             is of no use and was removed",
            dir.display()
        );
    }
    let mut line = format!("process {pid}: ");
    line += &match &recovered.restored {
        Some(batch) => format!(
            "put back the journalled batch ({} KiB at gmem offset {:#x} of the guest_memfd at \
             fd {}, inode {}), every byte compared",
            batch.len >> 10,
            batch.offset,
            batch.fd,
            batch.inode
        ),
        None => "no batch was in flight".into(),
    };
    line += if recovered.resumed {
        "; resumed it"
    } else {
        "; left it stopped, as gmemctl had found it"
    };
    for warning in &recovered.warnings {
        line += &format!("\nwarning: {warning}");
    }
    line
}
