//! `linux-guest`: gmemctl's microVM boots a Linux guest (L2) on nested KVM inside the lab,
//! and all its memory moves to node 1 and back while the guest checks that memory itself.
//!
//! The guest boots the lab's own kernel (/lab/vmlinuz) with /lab/memcheck.cpio.gz, whose /init
//! is gmem-lab in its memcheck role (`crate::memcheck`): it writes and verifies a pattern over
//! 64 MiB, sweep after sweep, and prints a `GMEMLAB-MEMCHECK` line per sweep on its serial
//! console, which `gmemctl run --console` appends to a file that this test reads.

use std::fs::{self, File};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::Verdict;
use super::checks::GuestError;
use super::gmemctl::{AWAY, GMEMCTL, HOME, content_counts, preferring, run_gmemctl, tail, verdict};
use crate::initramfs::{L2_INITRAMFS, L2_KERNEL};
use crate::memcheck::{MARKER, MIB_VAR, ROLE, ROLE_VAR, SWEEPS_VAR};
use crate::report::{ECHO_PREFIX, Status};

/// Where the guest kernel is to find its CPUs: the VMM offers both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuTables {
    /// The ACPI MADT (the default command line).
    Acpi,
    /// The MP table (`acpi=off`).
    MpTable,
}

impl CpuTables {
    /// What the command line adds to choose them.
    pub fn cmdline(self) -> &'static str {
        match self {
            CpuTables::Acpi => "",
            CpuTables::MpTable => " acpi=off",
        }
    }

    /// The guest kernel's console line that says it used them.
    fn evidence(self) -> &'static str {
        match self {
            CpuTables::Acpi => "Using ACPI (MADT) for SMP configuration information",
            CpuTables::MpTable => "MPTABLE: OEM ID: GMEMCTL",
        }
    }

    fn name(self) -> &'static str {
        match self {
            CpuTables::Acpi => "acpi",
            CpuTables::MpTable => "mptable",
        }
    }
}

/// Its RAM.
pub(super) const MEM: &str = "256M";
/// MiB its /init checks, sweep after sweep.
pub(super) const MEMCHECK_MIB: u64 = 64;
/// The kernel command line, without the memcheck settings. `reboot=k`: a reboot resets
/// through the keyboard controller, which the VMM catches and exits.
///
/// `noxsave` is for the lab only: QEMU's TCG does not apply SVM's XSETBV intercept (its
/// `helper_xsetbv` checks none), so the L1 KVM never learns the XCR0 the guest sets and
/// answers CPUID leaf 0xD with the size for x87+SSE alone; Linux then finds its XSAVE sizes
/// inconsistent and dies in FPU setup. On hardware KVM sees every XSETBV.
pub(super) const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off nomodules \
                       i8042.noaux i8042.nomux i8042.dumbkbd tsc=reliable noxsave";
pub(super) const CONSOLE: &str = "/tmp/l2-console.log";
pub(super) const API_SOCK: &str = "/tmp/l2.sock";
/// gmemctl run's own stdout and stderr.
pub(super) const VMM_LOG: &str = "/tmp/l2-vmm.log";
/// The flags of `gmemctl run` this test needs.
const RUN_FLAGS: [&str; 4] = ["--kernel", "--initramfs", "--cmdline", "--console"];

/// From `gmemctl run` to the checker's first verified sweep: a full Debian kernel boots on
/// KVM nested in TCG in 6-17 s; ten times that and more before calling it hung.
pub(super) const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// Sweeps `linux-guest-reboot`'s guest runs before it reboots.
const REBOOT_AFTER_SWEEPS: u64 = 2;
/// How long the guest's undisturbed sweep rate is measured before the first move.
const RATE_WINDOW: Duration = Duration::from_secs(4);
/// Sweeps the guest must complete after each move, with the memory in its new place.
const SWEEPS_AFTER_MOVE: u64 = 2;
/// How long those sweeps may take.
const SWEEPS_TIMEOUT: Duration = Duration::from_secs(300);
/// How long gmemctl run may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(500);
/// Console and log lines kept in the detail of a failure.
pub(super) const TAIL_LINES: usize = 20;

/// What the guest's memory checker has said on the console so far.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Memcheck {
    /// `ready mib=.. uptime=..`: (MiB, the guest's uptime in seconds) after the first sweep.
    pub ready: Option<(u64, Option<f64>)>,
    /// `used_kib=` of the `ready` line: what the guest kernel had handed out by then.
    pub used_kib: Option<u64>,
    /// The highest sweep number reported.
    pub sweeps: u64,
    /// Sweeps reported `FAILED`.
    pub failed_sweeps: u64,
    /// `MISMATCH` lines (at most 16 per sweep are printed).
    pub mismatch_lines: u64,
    /// `error: ..` lines.
    pub errors: Vec<String>,
    /// Whether the kernel panicked.
    pub kernel_panic: bool,
}

/// The value of `key=` among the words of `text`.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// Reads the memory checker's lines from the guest's console. Only complete lines count: the
/// last one may still be arriving.
pub fn parse_console(text: &str) -> Memcheck {
    let mut m = Memcheck::default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    for line in complete.lines() {
        if line.contains("Kernel panic") {
            m.kernel_panic = true;
        }
        let Some(at) = line.find(MARKER) else {
            continue;
        };
        let rest = line[at + MARKER.len()..].trim();
        if rest.starts_with("ready") {
            let mib = field(rest, "mib").and_then(|v| v.parse().ok()).unwrap_or(0);
            let uptime = field(rest, "uptime").and_then(|v| v.parse().ok());
            m.ready = Some((mib, uptime));
            m.used_kib = field(rest, "used_kib").and_then(|v| v.parse().ok());
        } else if rest.starts_with("MISMATCH") {
            m.mismatch_lines += 1;
        } else if rest.starts_with("error") {
            m.errors.push(rest.to_owned());
        } else if let Some(n) = field(rest, "sweep").and_then(|v| v.parse::<u64>().ok()) {
            m.sweeps = m.sweeps.max(n);
            if !rest.ends_with(" ok") {
                m.failed_sweeps += 1;
            }
        }
    }
    m
}

pub(super) fn read_console() -> (String, Memcheck) {
    let text = fs::read(CONSOLE)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let m = parse_console(&text);
    (text, m)
}

/// The guest kernel's warnings, oopses and panics on the console (the first 10 lines).
pub(super) fn kernel_alerts(console: &str) -> Vec<String> {
    console
        .lines()
        .filter(|l| {
            ["WARNING:", "BUG:", "Oops", "Kernel panic"]
                .iter()
                .any(|p| l.contains(p))
        })
        .take(10)
        .map(|l| l.trim_end_matches('\r').to_owned())
        .collect()
}

/// The CPUs the guest kernel brought up, from its `smp: Brought up 1 node, 2 CPUs` line: proof
/// that the MP table listed every vCPU and the startup IPIs reached them.
fn cpus_brought_up(console: &str) -> Option<u32> {
    let line = console.lines().find(|l| l.contains("smp: Brought up"))?;
    let line = line.trim_end_matches('\r');
    let before = line
        .strip_suffix(" CPUs")
        .or_else(|| line.strip_suffix(" CPU"))?;
    before.rsplit(' ').next()?.parse().ok()
}

/// The boot protocol `gmemctl run` reported (`gmemctl run: Linux (pvh) kernel at ...`).
fn boot_protocol(vmm_log: &str) -> Option<&str> {
    let rest = vmm_log.split("Linux (").nth(1)?;
    rest.split(')').next()
}

/// The protocol a kernel image calls for: PVH for an ELF vmlinux, else the bzImage's.
fn expected_protocol(image: &Path) -> &'static str {
    let mut magic = [0u8; 4];
    let elf = File::open(image)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == *b"\x7fELF";
    if elf { "pvh" } else { "linux64" }
}

/// The last `n` lines of `text`, each without a trailing `\r`.
pub(super) fn last_lines(text: &str, n: usize) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.trim_end_matches('\r').to_owned())
        .collect()
}

/// A VMM running the nested guest (`gmemctl run`, Firecracker), killed (SIGKILL) if the
/// test ends before it has stopped it properly.
pub(super) struct Vmm {
    pub child: Child,
    /// What the test's sentences call it.
    pub name: &'static str,
}

impl Vmm {
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then the exit status within [`STOP_TIMEOUT`]; `Err` says what went wrong.
    pub fn terminate(&mut self) -> Result<ExitStatus, String> {
        let name = self.name;
        if let Some(status) = self.exited() {
            return Err(format!("{name} had already exited ({status})"));
        }
        let pid = self.child.id().to_string();
        let kill = Command::new("kill").args(["-TERM", &pid]).status();
        if !kill.as_ref().is_ok_and(ExitStatus::success) {
            return Err(format!("`kill -TERM {pid}` failed: {kill:?}"));
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "{name} did not exit within {} s of SIGTERM",
            STOP_TIMEOUT.as_secs()
        ))
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls the console until `until` holds. `Err` says why it never did: the timeout, the VMM
/// exiting, a kernel panic, or the checker reporting an error.
pub(super) fn wait_console(
    vmm: &mut Vmm,
    timeout: Duration,
    what: &str,
    until: impl Fn(&Memcheck) -> bool,
) -> Result<Memcheck, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let (_, m) = read_console();
        if until(&m) {
            return Ok(m);
        }
        if m.kernel_panic {
            return Err(format!(
                "the guest kernel panicked while waiting for {what}"
            ));
        }
        if let Some(e) = m.errors.first() {
            return Err(format!("the guest's checker failed: {e}"));
        }
        if let Some(status) = vmm.exited() {
            return Err(format!("{} exited ({status}) before {what}", vmm.name));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no {what} within {} s (sweeps so far: {})",
                timeout.as_secs(),
                m.sweeps
            ));
        }
        thread::sleep(POLL);
    }
}

/// Resident pages per node in a `NodeCounts` object, zero counts left out.
pub(super) fn nonzero_nodes(counts: &Value) -> Vec<(String, u64)> {
    counts
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(node, pages)| (node.clone(), pages.as_u64().unwrap_or(0)))
                .filter(|&(_, pages)| pages > 0)
                .collect()
        })
        .unwrap_or_default()
}

/// What is wrong with `gmemctl migrate --json`'s finished job for a move of all guest memory
/// to node `to` with `mechanism`: it must have succeeded and be complete, every planned page moved
/// and content-checked without a mismatch, and every resident page on `to` afterwards.
pub fn migration_problems(job: &Value, to: u64, mechanism: &str, verify: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let what = format!("move to node {to}");
    if job["state"] != "succeeded" {
        problems.push(format!(
            "{what}: job {} ({})",
            job["state"],
            job["error"].as_str().unwrap_or("no error given")
        ));
    }
    let r = &job["report"];
    if r["mechanism"] != mechanism {
        problems.push(format!(
            "{what}: mechanism {}, not {mechanism}",
            r["mechanism"]
        ));
    }
    if r["complete"] != Value::Bool(true) {
        problems.push(format!("{what}: not complete"));
    }
    let (planned, moved) = (r["pages_planned"].as_u64(), r["pages_moved"].as_u64());
    if moved.unwrap_or(0) == 0 || moved != planned {
        problems.push(format!(
            "{what}: {} of {} planned pages moved",
            r["pages_moved"], r["pages_planned"]
        ));
    }
    if r["failures"].as_array().is_none_or(|f| !f.is_empty()) {
        problems.push(format!("{what}: failed steps {}", r["failures"]));
    }
    let (checks, mismatches) = content_counts(r);
    // Placement-only verification hashes nothing (the guest's own checker still reads).
    let bad_content = if verify == "full" {
        mismatches != Some(0) || checks.unwrap_or(0) == 0
    } else {
        mismatches.is_some_and(|m| m != 0)
    };
    if bad_content {
        problems.push(format!(
            "{what}: content checked {checks:?} times, {mismatches:?} mismatches"
        ));
    }
    let after = nonzero_nodes(&r["after"]);
    if after.len() != 1 || after[0].0 != to.to_string() {
        problems.push(format!(
            "{what}: pages per node afterwards are {}, not all on node {to}",
            r["after"]
        ));
    }
    let guest = job["guest"]["mismatches"].as_u64();
    if guest.is_some_and(|g| g > 0) {
        problems.push(format!(
            "{what}: the VMM counted {guest:?} guest mismatches"
        ));
    }
    problems
}

/// What is wrong with `gmemctl status --api-sock S --json` after a move to `to`: every
/// resident guest page must be on `to`.
pub fn placement_problems(status: &Value, to: u64) -> Vec<String> {
    let p = &status["placement"];
    let on = nonzero_nodes(&p["per_node"]);
    let resident: u64 = on.iter().map(|(_, pages)| pages).sum();
    let pages = p["pages"].as_u64().unwrap_or(0);
    let not_present = p["not_present"].as_u64().unwrap_or(0);
    let mut problems = Vec::new();
    if on.len() != 1 || on[0].0 != to.to_string() {
        problems.push(format!(
            "status after the move to node {to}: pages per node {}",
            p["per_node"]
        ));
    }
    if pages == 0 || resident + not_present != pages {
        problems.push(format!(
            "status after the move to node {to}: {resident} resident + {not_present} not \
             present != {pages} guest pages"
        ));
    }
    problems
}

/// The numbers of a finished migration job, for the detail.
fn job_summary(job: &Value) -> Value {
    let r = &job["report"];
    json!({
        "state": job["state"],
        "error": job["error"],
        "mechanism": r["mechanism"],
        "complete": r["complete"],
        "pages_planned": r["pages_planned"],
        "pages_moved": r["pages_moved"],
        "pages_in_place": r["pages_in_place"],
        "content_checks": r["content_checks"],
        "content_mismatches": r["content_mismatches"],
        "pfns_changed": r["pfns_changed"],
        "stops": r["stops"],
        "elapsed_us": r["elapsed_us"],
        "throughput_gbps": r["throughput_gbps"],
        "before": r["before"],
        "after": r["after"],
        "guest": job["guest"],
    })
}

/// Which of [`RUN_FLAGS`] `gmemctl run --help` does not mention, and what it said on stderr;
/// `Err` if it cannot run.
fn missing_run_flags() -> Result<(Vec<&'static str>, String), GuestError> {
    let out = Command::new(GMEMCTL)
        .args(["run", "--help"])
        .output()
        .map_err(|source| GuestError::Spawn {
            command: format!("{GMEMCTL} run --help"),
            source,
        })?;
    let help = String::from_utf8_lossy(&out.stdout);
    let missing = RUN_FLAGS
        .into_iter()
        .filter(|flag| !help.contains(flag))
        .collect();
    Ok((missing, String::from_utf8_lossy(&out.stderr).into_owned()))
}

fn fail(reason: String) -> Verdict {
    Verdict {
        status: Status::Fail,
        detail: json!({ "error": reason }),
    }
}

/// The moves of a run, as (target node, what gmemctl verifies). Remap checks content both
/// ways. Native goes out with placement checks only, the guest never stopped, and comes back
/// with content hashes, which stop the guest for each step: the cost of each, measured.
fn moves_of(mechanism: &str) -> [(u64, &'static str); 2] {
    match mechanism {
        "native" => [(AWAY, "placement"), (HOME, "full")],
        _ => [(AWAY, "full"), (HOME, "full")],
    }
}

/// How fast the guest sweeps with nothing moving: sweeps over `window`, per second.
fn sweep_rate(vmm: &mut Vmm, window: Duration) -> Result<f64, String> {
    let start = (Instant::now(), read_console().1.sweeps);
    let deadline = start.0 + window;
    wait_console(
        vmm,
        window + SWEEPS_TIMEOUT,
        "the undisturbed sweep rate",
        |_| Instant::now() >= deadline,
    )?;
    let sweeps = read_console().1.sweeps.saturating_sub(start.1);
    Ok(sweeps as f64 / start.0.elapsed().as_secs_f64())
}

/// One move of all guest memory, then [`SWEEPS_AFTER_MOVE`] sweeps of the guest in its new
/// place. Returns the move's detail; its problems go to `problems`. `Err` ends the test:
/// the guest stopped making progress, so later steps cannot tell anything.
fn move_guest(
    vmm: &mut Vmm,
    to: u64,
    mechanism: &str,
    verify: &str,
    rate_before: Option<f64>,
    problems: &mut Vec<String>,
) -> Result<Result<Value, String>, GuestError> {
    let sweeps_before = read_console().1.sweeps;
    let node = to.to_string();
    let args = [
        "migrate",
        "--api-sock",
        API_SOCK,
        "--policy",
        "bind",
        "--nodes",
        &node,
        "--mechanism",
        mechanism,
        "--verify",
        verify,
        "--json",
    ];
    let moving = Instant::now();
    let out = match run_gmemctl(&args)? {
        Ok(out) => out,
        Err(v) => return Ok(Err(format!("gmemctl migrate to node {to}: {}", v.detail))),
    };
    let move_s = moving.elapsed().as_secs_f64();
    let sweeps_at_end = read_console().1.sweeps;
    // Sweeps are 0.2-0.35 s each, so over a few seconds this is good to about one sweep.
    let rate_during = sweeps_at_end.saturating_sub(sweeps_before) as f64 / move_s;
    let mut mine = migration_problems(&out.json, to, mechanism, verify);
    if out.exit != Some(0) {
        mine.push(format!(
            "gmemctl migrate to node {to} exited with {:?}: {}",
            out.exit,
            tail(out.stderr.trim(), 500)
        ));
    }
    let status = match run_gmemctl(&["status", "--api-sock", API_SOCK, "--json"])? {
        Ok(s) => {
            mine.extend(placement_problems(&s.json, to));
            s.json["placement"]["per_node"].clone()
        }
        Err(v) => {
            mine.push(format!("gmemctl status: {}", v.detail));
            Value::Null
        }
    };
    let waited = Instant::now();
    let after = sweeps_after_move(vmm, to, sweeps_at_end);
    let detail = json!({
        "to": to,
        "verify": verify,
        "command": out.command,
        "sweeps_before": sweeps_before,
        "sweeps_at_end": sweeps_at_end,
        "move_s": move_s,
        "guest_sweeps_per_s": rate_during,
        "guest_rate_share": rate_before.map(|before| rate_during / before),
        "sweeps_after": after.as_ref().map_or(Value::Null, |m| json!(m.sweeps)),
        "after_wait_s": waited.elapsed().as_secs_f64(),
        "migration": job_summary(&out.json),
        "placement_after": status,
    });
    problems.extend(mine);
    Ok(after.map(|_| detail))
}

/// Waits for [`SWEEPS_AFTER_MOVE`] more sweeps of the guest than `sweeps_at_end`, the count
/// when the move to node `to` ended: the guest runs on in its memory's new place.
pub(super) fn sweeps_after_move(
    vmm: &mut Vmm,
    to: u64,
    sweeps_at_end: u64,
) -> Result<Memcheck, String> {
    wait_console(
        vmm,
        SWEEPS_TIMEOUT,
        &format!("{SWEEPS_AFTER_MOVE} more sweeps after the move to node {to}"),
        |m| m.sweeps >= sweeps_at_end + SWEEPS_AFTER_MOVE,
    )
}

/// Why a Linux-guest test cannot run here (a skip or a failure), if it cannot: no gmemctl,
/// a gmemctl without `run --kernel`, or an initramfs without the nested guest's files.
pub(super) fn preflight() -> Result<Option<Verdict>, GuestError> {
    if !Path::new(GMEMCTL).exists() {
        return Ok(Some(Verdict {
            status: Status::Skip,
            detail: json!({
                "reason": format!("{GMEMCTL} is not in the initramfs (gmem-lab run --gmemctl PATH)")
            }),
        }));
    }
    let (missing, stderr) = missing_run_flags()?;
    if !missing.is_empty() {
        let mut reason = format!(
            "this gmemctl cannot boot a Linux guest: `gmemctl run --help` does not mention {}",
            missing.join(", ")
        );
        if let Some(said) = stderr.lines().find(|l| !l.trim().is_empty()) {
            reason.push_str(&format!(" (it said: {})", said.trim()));
        }
        return Ok(Some(fail(reason)));
    }
    for file in [L2_KERNEL, L2_INITRAMFS] {
        if !Path::new(file).exists() {
            return Ok(Some(fail(format!(
                "{file} is not in the initramfs: this gmem-lab's initramfs builder predates \
                 the linux-guest test"
            ))));
        }
    }
    Ok(None)
}

/// Starts `gmemctl run` on the nested guest with `vcpus` vCPUs and `extra` appended to its
/// command line; its memory prefers node 0. Returns it, its command line and when it started.
fn start_vmm(vcpus: u32, extra: &str) -> Result<(Vmm, String, Instant), GuestError> {
    for stale in [CONSOLE, API_SOCK, VMM_LOG] {
        let _ = fs::remove_file(stale);
    }
    let cmdline = format!("{CMDLINE}{extra} {ROLE_VAR}={ROLE} {MIB_VAR}={MEMCHECK_MIB}");
    let vcpus_flag = vcpus.to_string();
    let args = [
        "run",
        "--kernel",
        L2_KERNEL,
        "--initramfs",
        L2_INITRAMFS,
        "--cmdline",
        &cmdline,
        "--console",
        CONSOLE,
        "--mem",
        MEM,
        "--vcpus",
        &vcpus_flag,
        "--api-sock",
        API_SOCK,
    ];
    let command = format!("{GMEMCTL} {}", args.join(" "));
    let log = File::create(VMM_LOG).map_err(|source| GuestError::Spawn {
        command: format!("creating {VMM_LOG} for {command}"),
        source,
    })?;
    let log_too = log.try_clone().map_err(|source| GuestError::Spawn {
        command: format!("duplicating the descriptor of {VMM_LOG}"),
        source,
    })?;
    let mut cmd = Command::new(GMEMCTL);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log_too)
        .stderr(log);
    gmem::sys::process::kill_with_parent(&mut cmd);
    // The guest's memory starts on node 0, so a first move takes all of it to node 1.
    let started = Instant::now();
    let child =
        preferring(HOME as u32, &command, || cmd.spawn())?.map_err(|source| GuestError::Spawn {
            command: command.clone(),
            source,
        })?;
    Ok((
        Vmm {
            child,
            name: "gmemctl run",
        },
        command,
        started,
    ))
}

/// Boots a Linux-guest test makes before it gives up on the nested guest coming up.
const BOOT_ATTEMPTS: usize = 2;

/// What [`boot_until_ready`] hands back: the VMM, its command line, when it started, the
/// outcome of waiting for `ready`, and the attempts that failed before it.
pub(super) type Booted = (Vmm, String, Instant, Result<Memcheck, String>, Vec<Value>);

/// Starts `gmemctl run` and waits for the checker's `ready`. A boot that never gets there (the
/// nested guest hung or reset in its own boot, before anything was moved) is tried once more:
/// under TCG the nested Linux sometimes does not come up with no move involved (seen in CI:
/// its console stopped 2.2 s into boot, right after the lab's own kernel had crashed on a
/// stray int3 and been booted again). Every failed attempt is returned with its console and
/// VMM log, and announced on the console: the retry is reported, never hidden. Two failed
/// boots fail the test.
pub(super) fn boot_until_ready(vcpus: u32, extra: &str) -> Result<Booted, GuestError> {
    let mut failed = Vec::new();
    loop {
        let (mut vmm, command, started) = start_vmm(vcpus, extra)?;
        let ready = wait_console(&mut vmm, BOOT_TIMEOUT, "`ready` from the guest", |m| {
            m.ready.is_some()
        });
        let error = match ready {
            Err(e) if failed.len() + 1 < BOOT_ATTEMPTS => e,
            ready => return Ok((vmm, command, started, ready, failed)),
        };
        let _ = vmm.terminate();
        drop(vmm);
        let (console, _) = read_console();
        let vmm_log = fs::read_to_string(VMM_LOG).unwrap_or_default();
        println!("{ECHO_PREFIX}the nested Linux guest did not come up ({error}); booting it again");
        failed.push(json!({
            "error": error,
            "console_tail": last_lines(&console, TAIL_LINES),
            "vmm_log_tail": last_lines(&vmm_log, TAIL_LINES),
        }));
    }
}

/// `linux-guest-reboot`: the nested guest's checker stops after [`REBOOT_AFTER_SWEEPS`]
/// sweeps and reboots; `gmemctl run` must see the reset and exit 0 by itself.
pub fn linux_guest_reboot() -> Result<Verdict, GuestError> {
    if let Some(verdict) = preflight()? {
        return Ok(verdict);
    }
    let extra = format!(" {SWEEPS_VAR}={REBOOT_AFTER_SWEEPS}");
    let trace = KvmTrace::start();
    let (mut vmm, command, started) = start_vmm(1, &extra)?;
    let mut problems = Vec::new();
    let deadline = started + BOOT_TIMEOUT;
    let status = loop {
        if let Some(status) = vmm.exited() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            problems.push(format!(
                "gmemctl run still ran {} s after it started: the guest's reboot did not end it",
                BOOT_TIMEOUT.as_secs()
            ));
            break None;
        }
        thread::sleep(POLL);
    };
    let (console, m) = read_console();
    let vmm_log = fs::read_to_string(VMM_LOG).unwrap_or_default();
    let done = format!("{MARKER} done sweeps={REBOOT_AFTER_SWEEPS} mismatches=0");
    if !console.contains(&done) {
        problems.push(format!("the console never said {done:?}"));
    }
    if status.is_some_and(|s| !s.success()) {
        problems.push(format!("gmemctl run exited with {status:?}"));
    }
    if status.is_some() && !vmm_log.contains("the guest requested a reset") {
        problems.push("gmemctl run did not report the guest's reset".into());
    }
    if m.mismatch_lines > 0 || m.kernel_panic {
        problems.push(format!(
            "the guest found {} wrong words or panicked ({})",
            m.mismatch_lines, m.kernel_panic
        ));
    }
    let mut detail = json!({
        "command": command,
        "sweeps": m.sweeps,
        "vmm_exit": status.and_then(|s| s.code()),
        "run_s": started.elapsed().as_secs_f64(),
        "problems": problems,
    });
    if !problems.is_empty() {
        keep_failure_tails(&mut detail, &console, &vmm_log, &trace);
    }
    Ok(verdict(&problems, detail))
}

/// `linux-guest` (remap, Debian's kernel) and `linux-guest-native` (native, our kernel):
/// boot a Linux guest with `vcpus` vCPUs under gmemctl on nested KVM, check that its kernel
/// brought all of them up, move all its memory to node 1 and back with `mechanism` while it
/// checks that memory, and stop it with SIGTERM.
pub fn linux_guest(
    mechanism: &'static str,
    vcpus: u32,
    cpu_tables: CpuTables,
) -> Result<Verdict, GuestError> {
    if let Some(verdict) = preflight()? {
        return Ok(verdict);
    }
    let trace = KvmTrace::start();
    let (mut vmm, command, started, booted, boot_retries) =
        boot_until_ready(vcpus, cpu_tables.cmdline())?;

    let mut problems = Vec::new();
    let mut moves = Vec::new();
    let mut boot_s = None;
    let mut ready = None;
    let mut vmm_exit = None;
    let mut rate_before = None;
    match booted {
        Err(e) => problems.push(e),
        Ok(m) => {
            boot_s = Some(started.elapsed().as_secs_f64());
            ready = m.ready;
            if m.ready.is_some_and(|(mib, _)| mib != MEMCHECK_MIB) {
                problems.push(format!(
                    "the guest checks {:?} MiB, not {MEMCHECK_MIB}",
                    m.ready
                ));
            }
            let baseline = sweep_rate(&mut vmm, RATE_WINDOW);
            if let Err(e) = &baseline {
                problems.push(e.clone());
            }
            rate_before = baseline.as_ref().ok().copied();
            for (to, verify) in moves_of(mechanism) {
                match move_guest(&mut vmm, to, mechanism, verify, rate_before, &mut problems)? {
                    Ok(detail) => moves.push(detail),
                    Err(e) => {
                        problems.push(e);
                        break;
                    }
                }
            }
            match vmm.terminate() {
                Ok(status) if status.success() => vmm_exit = status.code(),
                Ok(status) => {
                    vmm_exit = status.code();
                    problems.push(format!("gmemctl run exited with {status} after SIGTERM"));
                }
                Err(e) => problems.push(e),
            }
        }
    }
    drop(vmm);

    let (console, m) = read_console();
    if m.mismatch_lines > 0 || m.failed_sweeps > 0 {
        problems.push(format!(
            "the guest found wrong memory: {} MISMATCH lines, {} failed sweeps",
            m.mismatch_lines, m.failed_sweeps
        ));
    }
    if !m.errors.is_empty() {
        problems.push(format!("the guest's checker failed: {:?}", m.errors));
    }
    let vmm_log = fs::read_to_string(VMM_LOG).unwrap_or_default();
    let protocol = boot_protocol(&vmm_log).map(str::to_owned);
    let expected = expected_protocol(Path::new(L2_KERNEL));
    if ready.is_some() && protocol.as_deref() != Some(expected) {
        problems.push(format!(
            "gmemctl run booted {L2_KERNEL} with protocol {protocol:?}, not {expected}"
        ));
    }
    let used_tables = console.contains(cpu_tables.evidence());
    if ready.is_some() && !used_tables {
        problems.push(format!(
            "the guest kernel never said {:?}: it did not take its CPUs from the {}",
            cpu_tables.evidence(),
            cpu_tables.name()
        ));
    }
    let guest_cpus = cpus_brought_up(&console);
    if ready.is_some() && guest_cpus != Some(vcpus) {
        problems.push(format!(
            "the guest kernel brought up {guest_cpus:?} CPUs, not the {vcpus} vCPUs it was given"
        ));
    }
    let mut detail = json!({
        "command": command,
        "vcpus": vcpus,
        "mem": MEM,
        "memcheck_mib": MEMCHECK_MIB,
        "boot_s": boot_s,
        "boot_retries": boot_retries,
        "guest_uptime_at_ready_s": ready.and_then(|(_, up)| up),
        "guest_sweeps_per_s_before": rate_before,
        "boot_protocol": protocol,
        "cpu_tables": cpu_tables.name(),
        "cpu_tables_used": used_tables,
        "guest_cpus": guest_cpus,
        "guest_cpu_lines": console
            .lines()
            .filter(|l| ["smp:", "SMP", "APIC", "CPU"].iter().any(|k| l.contains(k)))
            .take(16)
            .map(|l| l.trim_end_matches('\r'))
            .collect::<Vec<_>>(),
        "guest_kernel": console.lines().find(|l| l.contains("Linux version")).map(|l| l.trim_end_matches('\r')),
        "moves": moves,
        "sweeps": m.sweeps,
        "mismatch_lines": m.mismatch_lines,
        "failed_sweeps": m.failed_sweeps,
        "vmm_exit": vmm_exit,
        "guest_kernel_alerts": kernel_alerts(&console),
        "problems": problems,
    });
    if !problems.is_empty() {
        keep_failure_tails(&mut detail, &console, &vmm_log, &trace);
    }
    Ok(verdict(&problems, detail))
}

/// What a failed Linux-guest test keeps of the guest's console, of gmemctl run's output and,
/// when it was recorded, of KVM's trace.
fn keep_failure_tails(
    detail: &mut Value,
    console: &str,
    vmm_log: &str,
    trace: &Result<KvmTrace, String>,
) {
    detail["console_tail"] = json!(last_lines(console, TAIL_LINES));
    detail["vmm_log_tail"] = json!(last_lines(vmm_log, TAIL_LINES));
    if let Ok(trace) = trace {
        detail["kvm_trace_tail"] = json!(trace.stop_and_tail(TRACE_LINES));
    }
}

/// gmemctl run's lines that report the guest's reset or crash.
fn reset_lines(vmm_log: &str) -> Vec<&str> {
    vmm_log
        .lines()
        .filter(|l| l.contains("reset") || l.contains("crashed"))
        .collect()
}

/// The lab kernel's tracefs.
const TRACEFS: &str = "/sys/kernel/tracing";
/// KVM's trace events kept for the post-mortem of a guest crash: every exit with its
/// reason and exit interrupt info, stage-2 faults, and what KVM injected.
const KVM_EVENTS: [&str; 4] = [
    "kvm_exit",
    "kvm_inj_exception",
    "kvm_inj_virq",
    "kvm_hypercall",
];
/// Trace lines kept in a failure's detail.
const TRACE_LINES: usize = 400;

/// KVM's trace events in the lab's kernel, recorded into a ring buffer while a test runs, so
/// that a crashed guest's last exits can be read afterwards. Best effort: a kernel without
/// tracefs gives no trace, and says so.
struct KvmTrace;

impl KvmTrace {
    fn start() -> Result<KvmTrace, String> {
        let root = Path::new(TRACEFS);
        if !root.join("trace").exists() {
            let mounted = Command::new("mount")
                .args(["-t", "tracefs", "nodev", TRACEFS])
                .status()
                .map_err(|e| format!("mount tracefs: {e}"))?;
            if !mounted.success() {
                return Err(format!("mount -t tracefs {TRACEFS} exited with {mounted}"));
            }
        }
        let write = |file: &str, value: &str| {
            fs::write(root.join(file), value).map_err(|e| format!("{TRACEFS}/{file}: {e}"))
        };
        write("tracing_on", "0")?;
        write("buffer_size_kb", "16384")?;
        write("trace", "")?;
        for event in KVM_EVENTS {
            write(&format!("events/kvm/{event}/enable"), "1")?;
        }
        write("tracing_on", "1")?;
        Ok(KvmTrace)
    }

    /// Stops recording and returns the last `n` lines.
    fn stop_and_tail(&self, n: usize) -> Vec<String> {
        let _ = fs::write(Path::new(TRACEFS).join("tracing_on"), "0");
        let text = fs::read_to_string(Path::new(TRACEFS).join("trace")).unwrap_or_default();
        last_lines(&text, n)
    }
}

impl KvmTrace {
    /// What the trace so far holds, in counts: exits by vCPU and reason, the exits that
    /// interrupted the delivery of an event (SVM's EXITINTINFO / VMX's IDT-vectoring info
    /// valid: `intr_info` with bit 31 set) by reason and event, and every exception KVM
    /// injected, by its text.
    fn summary(&self) -> Value {
        let text = fs::read_to_string(Path::new(TRACEFS).join("trace")).unwrap_or_default();
        let mut exits: std::collections::BTreeMap<String, u64> = Default::default();
        let mut mid_delivery: std::collections::BTreeMap<String, u64> = Default::default();
        let mut injected: std::collections::BTreeMap<String, u64> = Default::default();
        let word_after = |line: &str, key: &str| {
            line.split(key)
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or("?")
                .to_owned()
        };
        for line in text.lines() {
            if line.contains("kvm_exit:") {
                let vcpu = word_after(line, "vcpu ");
                let reason = word_after(line, "reason ");
                *exits.entry(format!("vcpu {vcpu} {reason}")).or_default() += 1;
                let info = word_after(line, "intr_info ");
                if u64::from_str_radix(info.trim_start_matches("0x"), 16)
                    .is_ok_and(|v| v & (1 << 31) != 0)
                {
                    *mid_delivery
                        .entry(format!("vcpu {vcpu} {reason} intr_info {info}"))
                        .or_default() += 1;
                }
            } else if let Some(rest) = line.split("kvm_inj_exception: ").nth(1) {
                *injected.entry(rest.trim().to_owned()).or_default() += 1;
            }
        }
        json!({"exits": exits, "exits_mid_delivery": mid_delivery, "injected_exceptions": injected})
    }
}

impl Drop for KvmTrace {
    fn drop(&mut self) {
        let _ = fs::write(Path::new(TRACEFS).join("tracing_on"), "0");
    }
}

/// Moves per mechanism in `linux-guest-churn`: back and forth, ending at home.
pub const CHURN_MOVES: usize = 20;

/// `linux-guest-churn`: one boot of the Linux guest, then [`CHURN_MOVES`] moves of all its
/// memory back and forth (1, 0, 1, ...) with each of `mechanisms` in turn, content-checked,
/// with the guest verifying its memory throughout. Any reset of the guest, any mismatch, any
/// incomplete move fails it; the first failure ends the moves.
pub fn linux_guest_churn(mechanisms: &[&'static str], traced: bool) -> Result<Verdict, GuestError> {
    if let Some(verdict) = preflight()? {
        return Ok(verdict);
    }
    let vcpus = 2;
    let trace = if traced {
        KvmTrace::start()
    } else {
        Err("not recorded (linux-guest-churn-traced records it)".to_string())
    };
    let (mut vmm, command, started, booted, boot_retries) =
        boot_until_ready(vcpus, CpuTables::Acpi.cmdline())?;
    let mut problems = Vec::new();
    let mut moves = Vec::new();
    let mut completed: Vec<Value> = Vec::new();
    let mut boot_s = None;
    match booted {
        Err(e) => problems.push(e),
        Ok(_) => {
            boot_s = Some(started.elapsed().as_secs_f64());
            'moves: for &mechanism in mechanisms {
                let mut done = 0;
                for i in 0..CHURN_MOVES {
                    let to = if i % 2 == 0 { AWAY } else { HOME };
                    let before = problems.len();
                    let moved = move_guest(&mut vmm, to, mechanism, "full", None, &mut problems)?;
                    println!(
                        "{ECHO_PREFIX}linux-guest-churn: {mechanism} move {} of {CHURN_MOVES} to \
                         node {to}: {}",
                        i + 1,
                        match &moved {
                            Ok(detail) =>
                                format!("{:.1} s", detail["move_s"].as_f64().unwrap_or(0.0)),
                            Err(e) => e.clone(),
                        }
                    );
                    match moved {
                        Ok(detail) => moves.push(json!({
                            "mechanism": mechanism,
                            "to": to,
                            "move_s": detail["move_s"],
                            "migration": detail["migration"],
                        })),
                        Err(e) => problems.push(e),
                    }
                    if problems.len() > before {
                        problems.push(format!(
                            "{mechanism} move {} of {CHURN_MOVES} failed",
                            i + 1
                        ));
                        completed.push(json!({"mechanism": mechanism, "moves": done}));
                        break 'moves;
                    }
                    done += 1;
                }
                completed.push(json!({"mechanism": mechanism, "moves": done}));
            }
            match vmm.terminate() {
                Ok(status) if status.success() => {}
                Ok(status) => problems.push(format!("gmemctl run exited with {status}")),
                Err(e) => problems.push(e),
            }
        }
    }
    drop(vmm);
    let (console, m) = read_console();
    if m.mismatch_lines > 0 || m.failed_sweeps > 0 || m.kernel_panic {
        problems.push(format!(
            "the guest found wrong memory or panicked: {} MISMATCH lines, {} failed sweeps, \
             panic {}",
            m.mismatch_lines, m.failed_sweeps, m.kernel_panic
        ));
    }
    let vmm_log = fs::read_to_string(VMM_LOG).unwrap_or_default();
    let resets = reset_lines(&vmm_log);
    if !resets.is_empty() {
        problems.push(format!("the guest reset: {resets:?}"));
    }
    let mut detail = json!({
        "command": command,
        "vcpus": vcpus,
        "boot_s": boot_s,
        "boot_retries": boot_retries,
        "moves_per_mechanism": CHURN_MOVES,
        "kvm_trace": trace.as_ref().err(),
        "completed": completed,
        "moves": moves,
        "sweeps": m.sweeps,
        "mismatch_lines": m.mismatch_lines,
        "guest_kernel_alerts": kernel_alerts(&console),
        "problems": problems,
    });
    if !problems.is_empty() {
        keep_failure_tails(&mut detail, &console, &vmm_log, &trace);
    }
    Ok(verdict(&problems, detail))
}

/// Boots in `linux-guest-reboots`.
const REBOOT_ROUNDS: usize = 4;

/// `linux-guest-reboots` (diagnostic, not in the default list): [`REBOOT_ROUNDS`] fresh boots
/// of the Linux guest, each moved 0 -> 1 -> 0 with remap right after its checker is ready,
/// with KVM's trace recorded: the moves of a young guest, where resets were seen, sampled
/// once per boot. Reports each round's outcome and, for the first reset, the trace's tail.
pub fn linux_guest_reboots() -> Result<Verdict, GuestError> {
    if let Some(verdict) = preflight()? {
        return Ok(verdict);
    }
    let trace = KvmTrace::start();
    let mut rounds = Vec::new();
    let mut problems = Vec::new();
    let mut trace_tail = Value::Null;
    for round in 0..REBOOT_ROUNDS {
        let (mut vmm, _, started) = start_vmm(2, CpuTables::Acpi.cmdline())?;
        let mut mine = Vec::new();
        let ready = wait_console(&mut vmm, BOOT_TIMEOUT, "`ready` from the guest", |m| {
            m.ready.is_some()
        });
        let mut moved = 0;
        match ready {
            Err(e) => mine.push(e),
            Ok(_) => {
                for to in [AWAY, HOME] {
                    match move_guest(&mut vmm, to, "remap", "full", None, &mut mine)? {
                        Ok(_) => moved += 1,
                        Err(e) => {
                            mine.push(e);
                            break;
                        }
                    }
                    if !mine.is_empty() {
                        break;
                    }
                }
            }
        }
        let exited_early = vmm.exited();
        let _ = vmm.terminate();
        drop(vmm);
        let vmm_log = fs::read_to_string(VMM_LOG).unwrap_or_default();
        let reset = reset_lines(&vmm_log);
        let failed = !mine.is_empty() || !reset.is_empty();
        println!(
            "{ECHO_PREFIX}linux-guest-reboots: round {} of {REBOOT_ROUNDS}: {} moves, {}",
            round + 1,
            moved,
            if failed { "FAILED" } else { "ok" }
        );
        if failed && trace_tail.is_null() {
            if let Ok(trace) = &trace {
                trace_tail = json!(trace.stop_and_tail(TRACE_LINES * 4));
            }
            let (console, _) = read_console();
            rounds.push(json!({
                "round": round + 1,
                "moves": moved,
                "uptime_s": started.elapsed().as_secs_f64(),
                "exited_early": exited_early.map(|s| s.to_string()),
                "problems": mine,
                "reset": reset,
                "console_tail": last_lines(&console, TAIL_LINES),
            }));
            problems.push(format!("round {} failed", round + 1));
            break;
        }
        rounds.push(json!({"round": round + 1, "moves": moved, "problems": mine}));
    }
    let detail = json!({
        "rounds": rounds,
        "kvm_trace": trace.as_ref().err(),
        "kvm_trace_summary": trace.as_ref().ok().map(KvmTrace::summary),
        "kvm_trace_tail": trace_tail,
        "problems": problems,
    });
    Ok(verdict(&problems, detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_checkers_console_lines() {
        let console = "[    0.000000] Linux version 7.3.4\r\n\
            GMEMLAB-MEMCHECK ready mib=64 uptime=41.27 used_kib=81234\r\n\
            GMEMLAB-MEMCHECK sweep=1 ok\r\n\
            [   50.1] random: crng init done\r\n\
            GMEMLAB-MEMCHECK sweep=2 ok\r\n\
            GMEMLAB-MEMCHECK sweep=3 o";
        let m = parse_console(console);
        assert_eq!(m.ready, Some((64, Some(41.27))));
        assert_eq!(m.used_kib, Some(81234));
        assert_eq!((m.sweeps, m.failed_sweeps, m.mismatch_lines), (2, 0, 0));
        assert!(m.errors.is_empty() && !m.kernel_panic);

        let bad = format!(
            "{console}k\n\
             GMEMLAB-MEMCHECK MISMATCH sweep=4 offset=4096 expected=0x1 found=0x0\n\
             GMEMLAB-MEMCHECK sweep=4 FAILED mismatches=1\n\
             GMEMLAB-MEMCHECK error: cannot allocate 64 MiB\n\
             [ 60.0] Kernel panic - not syncing: Attempted to kill init!\n"
        );
        let m = parse_console(&bad);
        assert_eq!((m.sweeps, m.failed_sweeps, m.mismatch_lines), (4, 1, 1));
        assert_eq!(m.errors, ["error: cannot allocate 64 MiB"]);
        assert!(m.kernel_panic);
        assert_eq!(
            kernel_alerts(&bad),
            ["[ 60.0] Kernel panic - not syncing: Attempted to kill init!"]
        );
        assert_eq!(parse_console(""), Memcheck::default());
        assert_eq!(
            cpus_brought_up("[ 0.2] smp: Brought up 1 node, 2 CPUs\r\n"),
            Some(2)
        );
        assert_eq!(
            cpus_brought_up("[ 0.2] smp: Bringing up secondary CPUs"),
            None
        );
        assert_eq!(cpus_brought_up("smp: Brought up 1 node, 1 CPU"), Some(1));
        let log = "gmemctl run: Linux (pvh) kernel at 0x1000000..0x2000000\n";
        assert_eq!(boot_protocol(log), Some("pvh"));
        assert_eq!(boot_protocol("pid: 1\n"), None);
    }

    fn job(to: u64, pages: u64) -> Value {
        let mut after = serde_json::Map::new();
        after.insert(to.to_string(), json!(pages));
        after.insert((1 - to).to_string(), json!(0));
        json!({
            "state": "succeeded",
            "report": {
                "mechanism": "remap", "complete": true, "pages_planned": pages,
                "pages_moved": pages, "content_checks": 128, "content_mismatches": 0,
                "failures": [], "after": after,
            },
            "guest": null,
        })
    }

    #[test]
    fn a_move_must_succeed_completely_with_every_page_on_the_target() {
        assert!(migration_problems(&job(1, 20000), 1, "remap", "full").is_empty());
        assert!(migration_problems(&job(0, 20000), 0, "remap", "full").is_empty());
        assert_eq!(
            migration_problems(&job(0, 20000), 1, "remap", "full").len(),
            1
        );

        let mut incomplete = job(1, 20000);
        incomplete["state"] = json!("incomplete");
        incomplete["report"]["complete"] = json!(false);
        incomplete["report"]["pages_moved"] = json!(19000);
        incomplete["report"]["after"] = json!({"0": 1000, "1": 19000});
        assert_eq!(migration_problems(&incomplete, 1, "remap", "full").len(), 4);

        let mut nothing = job(1, 0);
        nothing["report"]["after"] = json!({"1": 20000});
        assert_eq!(migration_problems(&nothing, 1, "remap", "full").len(), 1);

        let mut unchecked = job(1, 20000);
        unchecked["report"]["content_checks"] = json!(0);
        unchecked["report"]["mechanism"] = json!("refault");
        assert_eq!(migration_problems(&unchecked, 1, "remap", "full").len(), 2);

        let mut guest = job(1, 20000);
        guest["guest"] = json!({"mismatches": 2, "sweeps": 9});
        assert_eq!(migration_problems(&guest, 1, "remap", "full").len(), 1);
        assert_eq!(migration_problems(&json!({}), 1, "remap", "full").len(), 7);

        let mut native = job(1, 20000);
        native["report"]["mechanism"] = json!("native");
        native["report"]["content_checks"] = json!(0);
        assert!(migration_problems(&native, 1, "native", "placement").is_empty());
        assert_eq!(migration_problems(&native, 1, "native", "full").len(), 1);
    }

    #[test]
    fn placement_must_be_all_on_the_target() {
        let status = |per_node: Value, not_present: u64| json!({"placement": {"pages": 65536, "per_node": per_node, "not_present": not_present}});
        assert!(placement_problems(&status(json!({"1": 30000}), 35536), 1).is_empty());
        assert!(placement_problems(&status(json!({"0": 0, "1": 30000}), 35536), 1).is_empty());
        assert_eq!(
            placement_problems(&status(json!({"0": 10, "1": 29990}), 35536), 1).len(),
            1
        );
        assert_eq!(
            placement_problems(&status(json!({"1": 30000}), 0), 1).len(),
            1
        );
        assert_eq!(placement_problems(&json!({}), 0).len(), 2);
    }
}
