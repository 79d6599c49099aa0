//! `gmem-lab run`: fetch, build the initramfs, boot the two-node guest and judge its results.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;
use thiserror::Error;

use crate::apt::{AptError, Fetcher};
use crate::crash_check::{self, CrashCheckError};
use crate::deb::{self, DebError};
use crate::elf;
use crate::emulator::{DEBIAN_QEMU_SPECS, Emulator, EmulatorError, QemuChoice};
use crate::guest;
use crate::initramfs::{self, Contents, InitramfsError};
use crate::paths::{self, DirLock, PathsError};
use crate::qemu::{CpuCount, GuestStop, Machine, QemuError};
use crate::report::{Collector, Status, TestResult};

/// The Debian kernel the lab boots by default (trixie-backports).
pub const DEBIAN_RELEASE: &str = "7.3.4+deb13-cloud-amd64";
/// busybox from bookworm: a stable version that does not leave the archive.
pub const BUSYBOX_SPEC: &str = "busybox-static/bookworm";

/// The command that builds a gmem-lab able to serve as the in-guest agent.
pub const STATIC_BUILD: &str = "RUSTFLAGS='-C target-feature=+crt-static' cargo build --release \
                                --target x86_64-unknown-linux-gnu -p gmem-lab";

/// Errors of a lab run (outside the tests' own verdicts).
#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Paths(#[from] PathsError),
    #[error("cannot fetch the lab's Debian packages")]
    Fetch(#[from] AptError),
    #[error("cannot unpack or start the lab's QEMU")]
    Emulator(#[from] EmulatorError),
    #[error("cannot extract the lab's files")]
    Extract(#[from] DebError),
    #[error("cannot build the initramfs")]
    Initramfs(#[from] InitramfsError),
    #[error("cannot run QEMU")]
    Qemu(#[from] QemuError),
    #[error("the lab's crash capture failed its check")]
    CrashCheck(#[from] CrashCheckError),
    #[error("cannot find the running executable to copy it into the guest")]
    CurrentExe(#[source] io::Error),
    #[error("cannot read the agent {path}")]
    ReadAgent {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is dynamically linked, so it cannot run in the guest as the agent; build a static \
         gmem-lab with\n  {STATIC_BUILD}\nand run that (or pass --agent PATH)"
    )]
    AgentNotStatic { path: PathBuf },
    #[error("{path} is not a usable agent executable")]
    AgentNotElf {
        path: PathBuf,
        #[source]
        source: elf::ElfError,
    },
    #[error("unknown test `{0}`: see `gmem-lab tests`, or use exec:<command>")]
    UnknownTest(String),
    #[error("{what} {path} does not exist")]
    Missing { what: &'static str, path: PathBuf },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What to boot and run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub tests: Vec<String>,
    /// A bzImage to boot instead of Debian's; its KVM is expected to be built in.
    pub kernel: Option<PathBuf>,
    /// Debian kernel release whose linux-binary/linux-modules packages are used.
    pub debian_release: String,
    /// Put Debian's KVM modules into the initramfs even with `kernel`.
    pub debian_modules: bool,
    pub gmemctl: Option<PathBuf>,
    /// A static Firecracker, installed as /bin/firecracker for the `firecracker` test.
    pub firecracker: Option<PathBuf>,
    pub bins: Vec<PathBuf>,
    pub agent: Option<PathBuf>,
    pub qemu: QemuChoice,
    pub timeout: Duration,
    /// Leave the lab kernel's KVM on nested paging (`--nested-paging`); else kvm_amd.npt=0.
    pub nested_paging: bool,
    pub node_mib: u64,
    /// vCPUs, split over the two nodes (`--cpus`).
    pub cpus: CpuCount,
    /// A cold-plugged DIMM of this many MiB on node 1 (`--hotplug-dimm`).
    pub hotplug_dimm_mib: Option<u64>,
    /// The kernel the linux-guest tests boot as a nested guest (default: `kernel`'s).
    pub guest_kernel: Option<PathBuf>,
    pub append: Option<String>,
    pub keep: bool,
    pub allow_skip: bool,
    pub refresh: bool,
    /// Echo the guest's console to stderr as it arrives.
    pub console: bool,
}

/// What `prepare` produced: a kernel and an initramfs ready to boot.
#[derive(Debug)]
pub struct Prepared {
    pub qemu: Emulator,
    pub kernel: PathBuf,
    pub kernel_label: String,
    pub initrd: PathBuf,
    pub initrd_bytes: u64,
    pub modules: Vec<String>,
}

/// The overall verdict. A skip is not a pass: it is its own verdict unless allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
    Skip,
}

/// Everything a run found out, as printed with `--json`.
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub verdict: Verdict,
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    pub kernel: String,
    /// The QEMU that ran the lab (its `--version` line).
    pub qemu: String,
    /// Whether the lab kernel's KVM ran its guests on nested paging (NPT).
    pub nested_paging: bool,
    pub tests: Vec<TestResult>,
    pub boot: Option<Value>,
    pub modules: Vec<Value>,
    pub problems: Vec<String>,
    pub timed_out: bool,
    pub qemu_exit: Option<i32>,
    pub qemu_pid: u32,
    /// Seconds from QEMU start to the guest's /init.
    pub init_reached_s: Option<f64>,
    /// Seconds QEMU ran.
    pub qemu_s: f64,
    /// Seconds for fetch + extract + initramfs.
    pub prepare_s: f64,
    pub total_s: f64,
    /// Kept on failure (or with --keep): the guest's serial console.
    pub guest_log: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
    /// The lab kernel's own crash lines of an earlier attempt that was booted again; their
    /// console is kept as `serial-attempt-N.log` in the run directory. Empty normally.
    pub retried_after_lab_kernel_crash: Vec<String>,
}

/// Boots of the lab per run: another one only when the lab's own kernel crashed before the
/// suite finished. Under TCG the lab kernel has been seen to die on a stray int3 of its own
/// live text patching (`Oops: int3`, up to twice in one stock run, as a nested VM was being
/// created or torn down), and to stop the machine without a word on its console while a
/// nested guest ran: the emulator, not a test, failed. Retries are reported, never hidden,
/// with the crash line or the registers.
const BOOT_ATTEMPTS: usize = 5;

/// Why the lab's kernel died, if it did: its first oops or panic line on the console, else
/// how it stopped the machine (a triple fault or a reset, with every CPU's registers there
/// and the console's last line).
fn lab_kernel_crash(serial_log: &Path, stop: Option<&GuestStop>) -> Option<String> {
    let text = fs::read_to_string(serial_log).unwrap_or_default();
    let oops = text
        .lines()
        .find(|l| l.contains("Oops:") || l.contains("Kernel panic - not syncing"))
        .map(|l| l.trim().to_owned());
    let last_line = text.lines().rev().map(str::trim).find(|l| !l.is_empty());
    oops.or_else(|| {
        let stop = stop.filter(|s| s.is_crash())?;
        Some(match last_line {
            Some(l) => format!("{stop}; the console's last line: {l}"),
            None => stop.to_string(),
        })
    })
}

/// Checks the test names before anything is fetched.
pub fn check_tests(tests: &[String]) -> Result<(), RunError> {
    for t in tests {
        initramfs::check_test_name(t)?;
        if !guest::is_known(t) {
            return Err(RunError::UnknownTest(t.clone()));
        }
    }
    Ok(())
}

fn must_exist(what: &'static str, path: &Path) -> Result<(), RunError> {
    if path.exists() {
        Ok(())
    } else {
        Err(RunError::Missing {
            what,
            path: path.to_owned(),
        })
    }
}

/// The static gmem-lab to copy into the guest: `--agent`, else this very executable.
fn agent_path(opt: Option<&Path>) -> Result<PathBuf, RunError> {
    let path = match opt {
        Some(p) => p.to_owned(),
        None => std::env::current_exe().map_err(RunError::CurrentExe)?,
    };
    let bytes = fs::read(&path).map_err(|source| RunError::ReadAgent {
        path: path.clone(),
        source,
    })?;
    match elf::is_static(&bytes) {
        Ok(true) => Ok(path),
        Ok(false) => Err(RunError::AgentNotStatic { path }),
        Err(source) => Err(RunError::AgentNotElf { path, source }),
    }
}

/// Fetches and extracts what the run needs and writes the initramfs to `initrd`.
pub fn prepare(opts: &RunOptions, initrd: &Path) -> Result<Prepared, RunError> {
    check_tests(&opts.tests)?;
    let agent = agent_path(opts.agent.as_deref())?;
    if let Some(k) = &opts.kernel {
        must_exist("--kernel", k)?;
    }
    if let Some(k) = &opts.guest_kernel {
        must_exist("--guest-kernel", k)?;
    }
    let mut bins = Vec::new();
    if let Some(g) = &opts.gmemctl {
        must_exist("--gmemctl", g)?;
        bins.push(("gmemctl".to_owned(), g.clone()));
    }
    if let Some(f) = &opts.firecracker {
        must_exist("--firecracker", f)?;
        bins.push(("firecracker".to_owned(), f.clone()));
    }
    for b in &opts.bins {
        must_exist("--bin", b)?;
        let name = b.file_name().unwrap_or_default().to_string_lossy();
        bins.push((name.into_owned(), b.clone()));
    }

    let cache = paths::cache_root()?;
    paths::ensure_dir(&cache)?;
    // Debian's modules are only usable with the kernel binary package of the same release;
    // both are fetched and extracted together.
    let want_debian = opts.kernel.is_none() || opts.debian_modules;
    let mut specs = vec![BUSYBOX_SPEC.to_owned()];
    if want_debian {
        specs.push(format!("linux-binary-{}", opts.debian_release));
        specs.push(format!("linux-modules-{}", opts.debian_release));
    }
    let qemu_debs = specs.len()..;
    if opts.qemu == QemuChoice::Debian {
        specs.extend(DEBIAN_QEMU_SPECS.iter().map(|s| s.to_string()));
    }
    let debs = Fetcher::new(&cache).fetch(&specs, opts.refresh)?;
    let _lock = DirLock::acquire(&cache.join("extract.lock"))?;
    let qemu = match &opts.qemu {
        QemuChoice::Debian => Emulator::unpack(&cache, &debs[qemu_debs])?,
        QemuChoice::Binary(path) => Emulator::binary(path.clone())?,
    };
    let busybox = deb::busybox(&cache, &debs[0])?;
    let debian = if want_debian {
        Some(deb::debian_kernel(&cache, &debs[1], Some(&debs[2]))?)
    } else {
        None
    };
    let (kernel, label) = match (&opts.kernel, &debian) {
        (Some(k), _) => (k.clone(), k.display().to_string()),
        (None, Some(d)) => (d.vmlinuz.clone(), format!("debian {}", opts.debian_release)),
        (None, None) => unreachable!("want_debian is true without --kernel"),
    };
    let module_files = debian.map(|d| d.modules).unwrap_or_default();
    let contents = Contents {
        busybox,
        agent,
        l2_kernel: opts.guest_kernel.clone().unwrap_or_else(|| kernel.clone()),
        bins,
        modules: module_files.clone(),
        tests: opts.tests.clone(),
    };
    let initrd_bytes = initramfs::build(&contents, initrd)?;
    Ok(Prepared {
        qemu,
        kernel,
        kernel_label: label,
        initrd: initrd.to_owned(),
        initrd_bytes,
        modules: module_files.into_iter().map(|(n, _)| n).collect(),
    })
}

/// Kept run directories (failed runs, or --keep) beyond this many are removed, oldest first.
const KEEP_RUNS: usize = 20;

fn new_run_dir(cache: &Path) -> Result<PathBuf, RunError> {
    let runs = cache.join("runs");
    if let Ok(entries) = fs::read_dir(&runs) {
        let mut old: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        // Names start with the Unix time in seconds, so lexical order is age order for
        // centuries to come.
        old.sort();
        let excess = (old.len() + 1).saturating_sub(KEEP_RUNS);
        for dir in old.into_iter().take(excess) {
            let _ = fs::remove_dir_all(dir);
        }
    }
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let dir = cache
        .join("runs")
        .join(format!("{stamp}-{}", std::process::id()));
    paths::ensure_dir(&dir)?;
    Ok(dir)
}

/// Runs the whole lab once and returns its report; the caller prints it.
pub fn run(opts: &RunOptions) -> Result<RunReport, RunError> {
    let start = Instant::now();
    check_tests(&opts.tests)?;
    let cache = paths::cache_root()?;
    let dir = new_run_dir(&cache)?;
    let prepared = prepare(opts, &dir.join("initrd.gz"))?;
    let prepare_s = start.elapsed().as_secs_f64();
    let (caught, took) = crash_check::run(&prepared.qemu, &dir)?;
    eprintln!(
        "gmem-lab: crash capture checked in {:.1} s: a stand-in kernel that triple-faults was \
         caught ({caught})",
        took.as_secs_f64()
    );
    eprintln!(
        "gmem-lab: {}: booting {} with two NUMA nodes ({} MiB and {} CPUs each), initramfs {} KiB{}, \
         nested paging {}, tests: {}",
        prepared.qemu.version,
        prepared.kernel_label,
        opts.node_mib,
        opts.cpus.per_node(),
        prepared.initrd_bytes / 1024,
        if prepared.modules.is_empty() {
            " (no modules: KVM must be built in)".to_owned()
        } else {
            format!(", modules {}", prepared.modules.join(" "))
        },
        if opts.nested_paging {
            "on"
        } else {
            "off (kvm_amd.npt=0)"
        },
        opts.tests.join(",")
    );
    // gmemlab.cpus tells the agent how many CPUs QEMU was given (the nodes test checks the
    // kernel brought them all up); a dotted unknown parameter is ignored by the kernel.
    // nokaslr: the instruction pointers of a lab kernel's triple fault (QEMU's reset log)
    // then read straight against the kernel's System.map.
    let mut append = format!(
        "console=ttyS0 panic=-1 quiet nokaslr {}={}",
        guest::CPUS_PARAM,
        opts.cpus
    );
    if !opts.nested_paging {
        // Shadow paging for the nested guests: under QEMU's TCG (7.2 and 10.0), NPT makes a
        // nested Linux guest take a #PF on an instruction fetch it just executed from, and
        // triple-fault, at boot and while its memory moves; 10.0 also killed the lab kernel.
        append.push_str(" kvm_amd.npt=0");
    }
    if let Some(extra) = &opts.append {
        append.push(' ');
        append.push_str(extra);
    }
    let mut machine = Machine {
        qemu: prepared.qemu.clone(),
        kernel: prepared.kernel.clone(),
        initrd: prepared.initrd.clone(),
        append,
        node_mib: opts.node_mib,
        cpus: opts.cpus,
        hotplug_dimm_mib: opts.hotplug_dimm_mib,
        timeout: opts.timeout,
        serial_log: dir.join("serial.log"),
        qemu_log: dir.join("qemu.log"),
        reset_log: dir.join("qemu-reset.log"),
        qmp_socket: dir.join("qmp.sock"),
        cpu_state_log: dir.join("cpu-state.log"),
    };
    let mut crashes = Vec::new();
    // Results of the tests that finished before the lab's kernel crashed: kept, and not run
    // again when it boots once more.
    let mut carried: Vec<TestResult> = Vec::new();
    let base_append = machine.append.clone();
    let (boot, mut outcome) = loop {
        let mut collector = Collector {
            results: carried.clone(),
            ..Collector::default()
        };
        let boot = machine.boot(|line| {
            if opts.console {
                eprintln!("guest| {line}");
            }
            let before = collector.results.len();
            let done = collector.feed(line);
            if let Some(r) = collector.results.get(before) {
                eprintln!("gmem-lab: {}: {}", r.test, status_word(r.status));
            }
            done
        })?;
        // The tests that reported, in order, before the first that did not.
        let reported = opts
            .tests
            .iter()
            .take_while(|t| collector.results.iter().any(|r| &r.test == *t))
            .count();
        let finished: Vec<TestResult> = opts.tests[..reported]
            .iter()
            .filter_map(|t| collector.results.iter().find(|r| &r.test == t).cloned())
            .collect();
        let outcome = collector.finish(&opts.tests);
        let crash = (!boot.saw_done && !boot.timed_out)
            .then(|| lab_kernel_crash(&machine.serial_log, boot.stop.as_ref()))
            .flatten();
        match crash {
            Some(line) if crashes.len() + 1 < BOOT_ATTEMPTS => {
                let resume = match opts.tests.get(reported) {
                    Some(next) => format!("resuming at {next}, {reported} tests done"),
                    None => "every test had reported".into(),
                };
                eprintln!(
                    "gmem-lab: the lab's kernel crashed ({line}); booting it again, {resume}"
                );
                carried = finished;
                machine.append = format!("{base_append} gmemlab.resume_at={reported}");
                crashes.push(line);
                let kept = dir.join(format!("serial-attempt-{}.log", crashes.len()));
                let _ = fs::rename(&machine.serial_log, kept);
                let kept = dir.join(format!("qemu-reset-attempt-{}.log", crashes.len()));
                let _ = fs::rename(&machine.reset_log, kept);
                let kept = dir.join(format!("cpu-state-attempt-{}.log", crashes.len()));
                let _ = fs::rename(&machine.cpu_state_log, kept);
            }
            _ => break (boot, outcome),
        }
    };
    if boot.timed_out {
        outcome.problems.push(format!(
            "timed out after {} s; QEMU (pid {}) was killed",
            opts.timeout.as_secs(),
            boot.pid
        ));
    }
    match &boot.stop {
        Some(stop) if stop.is_crash() => outcome.problems.push(format!(
            "the lab's kernel died: {stop}; see {}",
            machine.cpu_state_log.display()
        )),
        Some(stop) => outcome.problems.push(format!("{stop} before GMEMLAB-DONE")),
        None => {}
    }
    if let Ok(q) = fs::read_to_string(&machine.qemu_log) {
        let q = q.trim();
        if !q.is_empty() {
            outcome.problems.push(format!("QEMU said: {q}"));
        }
    }
    let (passed, failed, skipped) = outcome.counts();
    let clean = outcome.problems.is_empty() && !boot.timed_out && boot.saw_done;
    let verdict = if !clean || failed > 0 {
        Verdict::Fail
    } else if skipped > 0 && !opts.allow_skip {
        Verdict::Skip
    } else {
        Verdict::Pass
    };
    // A retried run keeps its directory, so the first attempt's console can be read.
    let keep = opts.keep || verdict != Verdict::Pass || !crashes.is_empty();
    let mut report = RunReport {
        verdict,
        passed,
        failed,
        skipped,
        kernel: prepared.kernel_label,
        qemu: prepared.qemu.version,
        nested_paging: opts.nested_paging,
        tests: outcome.tests,
        boot: outcome.boot,
        modules: outcome.modules,
        problems: outcome.problems,
        timed_out: boot.timed_out,
        qemu_exit: boot.exit.and_then(|s| s.code()),
        qemu_pid: boot.pid,
        init_reached_s: boot.init_at.map(|d| d.as_secs_f64()),
        qemu_s: boot.elapsed.as_secs_f64(),
        prepare_s,
        total_s: start.elapsed().as_secs_f64(),
        guest_log: keep.then(|| machine.serial_log.clone()),
        run_dir: keep.then(|| dir.clone()),
        retried_after_lab_kernel_crash: crashes,
    };
    if keep {
        let path = dir.join("report.json");
        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
        fs::write(&path, text).map_err(|source| RunError::Write { path, source })?;
    } else {
        let _ = fs::remove_dir_all(&dir);
    }
    report.total_s = start.elapsed().as_secs_f64();
    Ok(report)
}

/// A status as shown to people: skips are upper-case, so they are hard to miss.
pub fn status_word(s: Status) -> &'static str {
    match s {
        Status::Pass => "pass",
        Status::Fail => "FAIL",
        Status::Skip => "SKIPPED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::Stop;

    #[test]
    fn finds_the_lab_kernels_crash_line() {
        let dir = std::env::temp_dir().join(format!("gmem-lab-crash-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("serial.log");
        let missing = dir.join("missing");
        fs::write(
            &log,
            "GMEMLAB-BOOT {}\n[   30.303707] Oops: int3: 0000 [#1] SMP NOPTI\n\
             [   30.307041] Kernel panic - not syncing: Fatal exception in interrupt\n",
        )
        .unwrap();
        let reset = GuestStop {
            why: Stop::Reset,
            triple_fault: false,
            cpus: vec!["CPU 0: RIP=ffffffff81000abc CR2=0 CR3=1000".into()],
        };
        assert_eq!(
            lab_kernel_crash(&log, Some(&reset)).as_deref(),
            Some("[   30.303707] Oops: int3: 0000 [#1] SMP NOPTI")
        );
        fs::write(&log, "GMEMLAB-BOOT {}\nlinux-guest-churn: move 5\n\n").unwrap();
        assert_eq!(lab_kernel_crash(&log, None), None);
        assert_eq!(lab_kernel_crash(&missing, None), None);
        // A reset or a triple fault leaves nothing on the console: the registers say where.
        let crash = lab_kernel_crash(&log, Some(&reset)).unwrap();
        assert!(
            crash.starts_with("the lab's kernel reset the machine"),
            "{crash}"
        );
        assert!(
            crash.contains("registers there: CPU 0: RIP=ffffffff81000abc"),
            "{crash}"
        );
        assert!(
            crash.ends_with("last line: linux-guest-churn: move 5"),
            "{crash}"
        );
        let triple = GuestStop {
            triple_fault: true,
            ..reset
        };
        let crash = lab_kernel_crash(&log, Some(&triple)).unwrap();
        assert!(
            crash.starts_with("a CPU triple-faulted; registers there"),
            "{crash}"
        );
        // A poweroff is not a crash of the lab's kernel.
        let poweroff = GuestStop {
            why: Stop::Poweroff,
            ..triple
        };
        assert_eq!(lab_kernel_crash(&log, Some(&poweroff)), None);
        fs::remove_dir_all(&dir).unwrap();
    }
}
