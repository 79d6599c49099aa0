//! gmem-lab: a two-node NUMA lab for guest_memfd migration, in QEMU with nested KVM.

// Unsafe code lives only in gmem::sys; the lab uses its safe wrappers.
#![forbid(unsafe_code)]

mod apt;
mod compare;
mod cpio;
mod crash_check;
mod deb;
mod elf;
mod emulator;
mod guest;
mod initramfs;
mod memcheck;
mod paths;
mod qemu;
mod qmp;
mod report;
mod runner;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::qemu::CpuCount;
use crate::report::error_chain;
use crate::runner::{RunOptions, Verdict};

const LONG_ABOUT: &str = "\
Real cross-node moves need two NUMA nodes; the development machines have one. gmem-lab boots a
QEMU guest (TCG, -cpu max, so KVM loads inside it) with two NUMA nodes, runs lab tests in it
and reports structured results.

It fetches Debian's 7.3 kernel from trixie-backports and busybox with apt-get download through
a private apt state under ~/.cache/gmemctl/lab (the system's apt sources are never touched),
verifies every .deb against the apt index's SHA256, builds an initramfs, and boots.

The in-guest agent is gmem-lab itself, so it must be built static:
  RUSTFLAGS='-C target-feature=+crt-static' cargo build --release \\
      --target x86_64-unknown-linux-gnu -p gmem-lab
  target/x86_64-unknown-linux-gnu/release/gmem-lab run

Run as /init (or with gmemlab_role=memcheck in its environment) it is instead the memory
checker of the linux-guest test's nested Linux guest: it writes and verifies a pattern over
gmemlab_memcheck_mib MiB (default 64), printing a GMEMLAB-MEMCHECK line per sweep, and after
gmemlab_memcheck_sweeps sweeps (if set) exits, or restarts the machine as PID 1.

Host needs: qemu-system-x86, dpkg-deb and apt-get (lab/install-host-deps installs them).";

const RUN_AFTER_HELP: &str = "\
Exit status: 0 all tests passed (or passed and skipped, with --allow-skip); 1 a test failed or
the run broke (timeout, no result, failed insmod); 2 usage or setup error; 3 a test was skipped.
The guest's serial log is kept on any non-pass, and its path printed.

Examples:
  gmem-lab run
  gmem-lab run --tests nodes,gmem-stock --json
  gmem-lab run --gmemctl target/x86_64-unknown-linux-gnu/release/gmemctl
  gmem-lab run --kernel ~/.cache/gmemctl/kernel/bzImage --bin guest_memfd_test \\
      --tests nodes,exec:/bin/guest_memfd_test";

#[derive(Debug, Parser)]
#[command(name = "gmem-lab", version, about = "Two-node QEMU lab for guest_memfd migration", long_about = LONG_ABOUT)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Download Debian packages through the private apt state, verify them, print their paths
    ///
    /// Each argument is an apt spec: NAME, NAME=VERSION or NAME/SUITE. The private sources list
    /// trixie-backports, sid and bookworm on the host's Debian mirror. Downloads are cached in
    /// ~/.cache/gmemctl/lab/debs keyed by version and checked against the index's SHA256 and
    /// size; the verified path of each .deb is printed on stdout, one per line, in order.
    Fetch {
        /// Packages, e.g. linux-source-7.3 or busybox-static/bookworm
        #[arg(required = true, value_name = "PACKAGE")]
        packages: Vec<String>,
        /// Run apt-get update on the private state even if its index is fresh (< 24 h)
        #[arg(long)]
        refresh: bool,
    },
    /// Fetch, build the initramfs, boot the two-node guest, run the tests, report
    #[command(after_help = RUN_AFTER_HELP)]
    Run(RunArgs),
    /// Build the initramfs that `run` would boot, print its path and the kernel's, and stop
    Initramfs {
        #[command(flatten)]
        run: RunArgs,
        /// Where to write the gzip'd cpio
        #[arg(short, long, value_name = "PATH")]
        output: PathBuf,
    },
    /// List the built-in tests
    Tests,
    /// Compare one test's kselftest cases in two `run --json` reports: exit 0 if no case that
    /// passed in the control fails, skips or is missing in the candidate, and each side ran
    /// at least one case; 1 otherwise; 2 if a report cannot be read
    Compare {
        /// The test whose `detail.cases` are compared
        #[arg(long, default_value = "mm-migration")]
        test: String,
        /// The control's label in the table
        #[arg(long, default_value = "control")]
        control_name: String,
        /// The candidate's label in the table
        #[arg(long, default_value = "candidate")]
        candidate_name: String,
        /// The control's report (e.g. Debian's kernel)
        control: PathBuf,
        /// The candidate's report (e.g. the patched kernel)
        candidate: PathBuf,
    },
    /// Run one test inside the lab guest and print its GMEMLAB-RESULT line (used by /init)
    Guest {
        /// A built-in test name, or exec:<command>
        test: String,
    },
    /// Fill a NUMA node with anonymous memory and hold it until stdin closes (used by the
    /// full-node test)
    #[command(hide = true)]
    Hog {
        /// The node to fill
        #[arg(long)]
        node: u32,
        /// Stop once the node's MemFree is down to its min watermark plus this many KiB
        #[arg(long, value_name = "KIB")]
        headroom_kib: u64,
    },
    /// Hold one idle KVM VM until killed, so KVM's static keys are never flipped (and the
    /// kernel's text never patched) as tests create and destroy VMs (started by /init)
    #[command(hide = true)]
    HoldKvm,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Comma-separated tests; built-ins (see `gmem-lab tests`) or exec:<command>
    #[arg(long, value_delimiter = ',', value_name = "A,B,..")]
    tests: Option<Vec<String>>,
    /// Boot this bzImage instead of Debian's (its KVM must be built in unless --debian-modules)
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Load Debian's KVM modules even with --kernel
    #[arg(long)]
    debian_modules: bool,
    /// Debian kernel release (linux-binary-<R> and linux-modules-<R>)
    #[arg(long, value_name = "R", default_value = runner::DEBIAN_RELEASE)]
    debian_release: String,
    /// A static gmemctl to install as /bin/gmemctl
    #[arg(long, value_name = "PATH")]
    gmemctl: Option<PathBuf>,
    /// A static Firecracker (its guest_memfd branch) to install as /bin/firecracker, for the
    /// `firecracker` test (lab/run passes ../shared/vmms/firecracker or $GMEM_FIRECRACKER)
    #[arg(long, value_name = "PATH")]
    firecracker: Option<PathBuf>,
    /// Another static executable for /bin (repeatable)
    #[arg(long = "bin", value_name = "PATH")]
    bins: Vec<PathBuf>,
    /// The static gmem-lab to use as the in-guest agent [default: this executable]
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// QEMU to boot: a binary's path or name, or `debian` for Debian's QEMU 10 from
    /// bookworm-backports, fetched and unpacked into the cache
    #[arg(long, value_name = "PATH|debian", default_value = "qemu-system-x86_64")]
    qemu: emulator::QemuChoice,
    /// Kill QEMU if the guest has not finished after this many seconds (linux-guest alone
    /// may wait 600 s for its nested guest to boot)
    #[arg(long, value_name = "SECS", default_value_t = 900)]
    timeout: u64,
    /// Let the lab kernel's KVM use nested paging (NPT) for its own guests. Off by default
    /// (kvm_amd.npt=0, shadow paging): QEMU's TCG emulation of NPT crashes nested Linux
    /// guests and now and then the lab's own kernel (lab/README.md has the evidence)
    #[arg(long)]
    nested_paging: bool,
    /// Memory of each of the two NUMA nodes, in MiB
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    node_mib: u64,
    /// vCPUs of the lab guest, an even number: the first half on node 0, the rest on node 1
    /// (one socket each). The mm-migration test needs at least 4
    #[arg(long, value_name = "N", default_value_t = CpuCount::DEFAULT)]
    cpus: CpuCount,
    /// Cold-plug a DIMM of this many MiB (default 512) on node 1, its memory blocks left
    /// offline for the offline-movable test (needs CONFIG_MHP_DEFAULT_ONLINE_TYPE_OFFLINE)
    #[arg(long, value_name = "MIB", num_args = 0..=1, default_missing_value = "512",
          require_equals = true)]
    hotplug_dimm: Option<u64>,
    /// The kernel the linux-guest tests boot under gmemctl as a nested guest: a bzImage or
    /// a vmlinux with a PVH note [default: the kernel the lab boots]
    #[arg(long, value_name = "PATH")]
    guest_kernel: Option<PathBuf>,
    /// Extra kernel command-line arguments
    #[arg(long, value_name = "ARGS")]
    append: Option<String>,
    /// Keep the run directory (initramfs, serial log, report) even when everything passed
    #[arg(long)]
    keep: bool,
    /// Accept skipped tests (exit 0); they are still reported, loudly
    #[arg(long)]
    allow_skip: bool,
    /// Refresh the private apt index even if it is fresh
    #[arg(long)]
    refresh: bool,
    /// Echo the guest's serial console to stderr
    #[arg(long)]
    console: bool,
    /// Print the report as JSON on stdout (the summary goes to stderr)
    #[arg(long)]
    json: bool,
}

impl RunArgs {
    fn options(&self) -> RunOptions {
        RunOptions {
            tests: self
                .tests
                .clone()
                .map(|t| t.into_iter().map(|s| s.trim().to_owned()).collect())
                .unwrap_or_else(guest::default_tests),
            kernel: self.kernel.clone(),
            debian_release: self.debian_release.clone(),
            debian_modules: self.debian_modules,
            gmemctl: self.gmemctl.clone(),
            firecracker: self.firecracker.clone(),
            bins: self.bins.clone(),
            agent: self.agent.clone(),
            qemu: self.qemu.clone(),
            timeout: Duration::from_secs(self.timeout),
            nested_paging: self.nested_paging,
            node_mib: self.node_mib,
            cpus: self.cpus,
            hotplug_dimm_mib: self.hotplug_dimm,
            guest_kernel: self.guest_kernel.clone(),
            append: self.append.clone(),
            keep: self.keep,
            allow_skip: self.allow_skip,
            refresh: self.refresh,
            console: self.console,
        }
    }
}

fn fail(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("gmem-lab: error: {}", error_chain(e));
    ExitCode::from(2)
}

fn run(args: &RunArgs) -> ExitCode {
    let report = match runner::run(&args.options()) {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let mut summary = String::new();
    for t in &report.tests {
        let mut line = format!("  {:<8} {}", runner::status_word(t.status), t.test);
        if t.status != report::Status::Pass {
            line.push_str(&format!("  {}", t.detail));
        }
        summary.push_str(&line);
        summary.push('\n');
    }
    for p in &report.problems {
        summary.push_str(&format!("  problem: {p}\n"));
    }
    if report.skipped > 0 {
        summary.push_str(&format!(
            "  WARNING: {} test(s) SKIPPED: a skip is not a pass{}\n",
            report.skipped,
            if args.allow_skip {
                " (accepted with --allow-skip)"
            } else {
                ""
            }
        ));
    }
    summary.push_str(&format!(
        "  kernel {}; init reached after {}; QEMU ran {:.1} s; prepare {:.1} s; total {:.1} s\n",
        report.kernel,
        report
            .init_reached_s
            .map_or("never".to_owned(), |s| format!("{s:.1} s")),
        report.qemu_s,
        report.prepare_s,
        report.total_s
    ));
    for crash in &report.retried_after_lab_kernel_crash {
        summary.push_str(&format!(
            "  RETRIED: the lab's kernel crashed in an earlier boot ({crash})\n"
        ));
    }
    if let Some(log) = &report.guest_log {
        summary.push_str(&format!("  guest log: {}\n", log.display()));
    }
    summary.push_str(&format!(
        "lab: {} passed, {} failed, {} skipped\n",
        report.passed, report.failed, report.skipped
    ));
    if args.json {
        eprint!("{summary}");
        match serde_json::to_string_pretty(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => return fail(&e),
        }
    } else {
        print!("{summary}");
    }
    match report.verdict {
        Verdict::Pass => ExitCode::SUCCESS,
        Verdict::Fail => ExitCode::from(1),
        Verdict::Skip => ExitCode::from(3),
    }
}

fn main() -> ExitCode {
    // As /init of a Linux guest under gmemctl's microVM (the linux-guest test), the agent is
    // a memory checker, not this command line.
    if memcheck::wanted() {
        return memcheck::main();
    }
    let cli = Cli::parse();
    match cli.command {
        Cmd::Fetch { packages, refresh } => {
            let cache = match paths::cache_root() {
                Ok(c) => c,
                Err(e) => return fail(&e),
            };
            match apt::Fetcher::new(&cache).fetch(&apt::dedup(&packages), refresh) {
                Ok(paths) => {
                    for p in paths {
                        println!("{}", p.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Cmd::Run(args) => run(&args),
        Cmd::Initramfs { run, output } => match runner::prepare(&run.options(), &output) {
            Ok(p) => {
                println!(
                    "initramfs {} ({} bytes)",
                    p.initrd.display(),
                    p.initrd_bytes
                );
                println!("kernel {}", p.kernel.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Cmd::Tests => {
            for t in guest::BUILTIN
                .iter()
                .chain(guest::PATCHED)
                .chain(guest::UPSTREAM)
            {
                println!("{:<17} {}", t.name, t.about);
            }
            println!(
                "{:<17} run a command in the guest: exit 0 pass, 4 skip (kselftest), else fail",
                format!("{}CMD", guest::EXEC_PREFIX)
            );
            ExitCode::SUCCESS
        }
        Cmd::Compare {
            test,
            control_name,
            candidate_name,
            control,
            candidate,
        } => {
            let cases = compare::read_cases(&control, &test)
                .and_then(|a| Ok((a, compare::read_cases(&candidate, &test)?)));
            match cases {
                Ok((a, b)) => {
                    let cmp = compare::Comparison::new(&a, &b);
                    println!("{}", cmp.render(&test, &control_name, &candidate_name));
                    if cmp.ok() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => fail(&e),
            }
        }
        Cmd::Guest { test } => guest::run(&test),
        Cmd::Hog { node, headroom_kib } => guest::hog(node, headroom_kib),
        Cmd::HoldKvm => guest::hold_kvm(),
    }
}
