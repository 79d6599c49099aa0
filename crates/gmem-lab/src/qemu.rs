//! Boots the two-node QEMU guest, streams its serial console, and enforces the timeout.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::emulator::Emulator;

/// How long QEMU may take to exit after the guest printed GMEMLAB-DONE.
const POWEROFF_GRACE: Duration = Duration::from_secs(15);

/// The line QEMU logs (`-d cpu_reset`) when a CPU triple-faults.
const TRIPLE_FAULT: &str = "Triple fault";

/// How long after the "Triple fault" line QEMU is given to reset, and so to dump every CPU's
/// state into the reset log, before it is killed.
const RESET_DUMP_GRACE: Duration = Duration::from_millis(500);

/// If the guest's kernel triple-faulted, QEMU's account of it from the `-d cpu_reset` log:
/// the "Triple fault" line and, from the CPU states dumped at the reset that follows, each
/// CPU's instruction pointer, CR2 and CR3.
pub fn triple_fault(reset_log: &str) -> Option<String> {
    let at = reset_log.find(TRIPLE_FAULT)?;
    let mut cpus = Vec::new();
    for dump in reset_log[at..].split("CPU Reset (").skip(1) {
        let cpu = dump.split(')').next().unwrap_or("?");
        let word = |prefix: &str| dump.split_whitespace().find(|w| w.starts_with(prefix));
        if let Some(ip) = word("RIP=").or_else(|| word("EIP=")) {
            let regs = [Some(ip), word("CR2="), word("CR3=")];
            let regs: Vec<&str> = regs.into_iter().flatten().collect();
            cpus.push(format!("{cpu}: {}", regs.join(" ")));
        }
    }
    Some(if cpus.is_empty() {
        "a CPU triple-faulted (QEMU's reset log)".to_owned()
    } else {
        format!(
            "a CPU triple-faulted (QEMU's reset log; state at the reset: {})",
            cpus.join("; ")
        )
    })
}

/// Errors while running QEMU.
#[derive(Debug, Error)]
pub enum QemuError {
    #[error("cannot start {qemu} (install it with: apt-get install -y qemu-system-x86)")]
    Spawn {
        qemu: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create {path}")]
    CreateLog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot wait for QEMU (pid {pid})")]
    Wait {
        pid: u32,
        #[source]
        source: io::Error,
    },
}

/// The most vCPUs the lab boots: TCG runs each on a host thread, and the hosts have few cores.
pub const MAX_CPUS: u32 = 64;

/// A `--cpus` value that cannot be split evenly over the two NUMA nodes.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CpuCountError {
    #[error("`{0}` is not a number of CPUs")]
    NotANumber(String),
    #[error("{0} CPUs cannot be split evenly over the two NUMA nodes: give an even number")]
    Odd(u32),
    #[error("{0} CPUs: the lab boots 2 to {MAX_CPUS} (one socket per node, at least one CPU each)")]
    OutOfRange(u32),
}

/// The lab's vCPU count: even, one socket per NUMA node, the first half on node 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuCount(u32);

impl CpuCount {
    /// The lab's default: one CPU per node.
    pub const DEFAULT: CpuCount = CpuCount(2);

    pub fn new(n: u32) -> Result<CpuCount, CpuCountError> {
        if !(2..=MAX_CPUS).contains(&n) {
            Err(CpuCountError::OutOfRange(n))
        } else if !n.is_multiple_of(2) {
            Err(CpuCountError::Odd(n))
        } else {
            Ok(CpuCount(n))
        }
    }

    pub fn total(self) -> u32 {
        self.0
    }

    pub fn per_node(self) -> u32 {
        self.0 / 2
    }

    /// The CPUs of `node` (0 or 1) as QEMU's `-numa node,cpus=` takes them: `0`, or `2-3`.
    pub fn node_cpus(self, node: u32) -> String {
        let first = node * self.per_node();
        let last = first + self.per_node() - 1;
        if first == last {
            first.to_string()
        } else {
            format!("{first}-{last}")
        }
    }
}

impl Default for CpuCount {
    fn default() -> CpuCount {
        CpuCount::DEFAULT
    }
}

impl FromStr for CpuCount {
    type Err = CpuCountError;
    fn from_str(s: &str) -> Result<CpuCount, CpuCountError> {
        let n = s
            .trim()
            .parse()
            .map_err(|_| CpuCountError::NotANumber(s.to_owned()))?;
        CpuCount::new(n)
    }
}

impl fmt::Display for CpuCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The machine to boot.
#[derive(Debug, Clone)]
pub struct Machine {
    pub qemu: Emulator,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    /// Memory of each of the two NUMA nodes.
    pub node_mib: u64,
    /// vCPUs, half of them on each node.
    pub cpus: CpuCount,
    /// A cold-plugged pc-dimm of this many MiB on node 1 (memory hotplug and offlining).
    pub hotplug_dimm_mib: Option<u64>,
    pub timeout: Duration,
    /// The guest's serial console is copied here as it arrives.
    pub serial_log: PathBuf,
    /// QEMU's own stderr.
    pub qemu_log: PathBuf,
    /// QEMU's `-d cpu_reset` log: the CPU state at every reset. QEMU runs without
    /// `-no-reboot`, so a lab kernel that triple-faults is reset, which dumps its registers
    /// here; [`Machine::boot`] then kills QEMU before the kernel boots again.
    pub reset_log: PathBuf,
}

/// How the boot ended.
#[derive(Debug)]
pub struct Boot {
    pub exit: Option<ExitStatus>,
    pub timed_out: bool,
    pub saw_done: bool,
    pub elapsed: Duration,
    /// When the first GMEMLAB-BOOT line arrived (init reached).
    pub init_at: Option<Duration>,
    /// The lab's kernel reset the machine (a triple fault, or a panic with `panic=-1`), and
    /// QEMU was killed rather than let it boot again.
    pub reset: bool,
    pub pid: u32,
}

impl Machine {
    /// The QEMU command line: TCG with `-cpu max` (svm, npt) so KVM loads in the guest,
    /// two sockets, each with half the CPUs, its own memory backend and NUMA node.
    pub fn args(&self) -> Vec<String> {
        let n = self.node_mib;
        let mut a = self.qemu.data_args();
        a.extend([
            "-accel".into(),
            "tcg,thread=multi".into(),
            "-cpu".into(),
            "max".into(),
            "-m".into(),
            match self.hotplug_dimm_mib {
                // Room for the DIMM above the boot memory: two slots, twice its size.
                Some(d) => format!("{}M,slots=2,maxmem={}M", 2 * n, 2 * n + 2 * d),
                None => format!("{}M", 2 * n),
            },
            "-smp".into(),
            format!(
                "{},sockets=2,cores={},threads=1",
                self.cpus.total(),
                self.cpus.per_node()
            ),
        ]);
        for i in 0..2 {
            a.push("-object".into());
            a.push(format!("memory-backend-ram,id=m{i},size={n}M"));
        }
        for i in 0..2 {
            a.push("-numa".into());
            a.push(format!(
                "node,nodeid={i},cpus={},memdev=m{i}",
                self.cpus.node_cpus(i)
            ));
        }
        if let Some(d) = self.hotplug_dimm_mib {
            a.push("-object".into());
            a.push(format!("memory-backend-ram,id=hp,size={d}M"));
            a.push("-device".into());
            a.push("pc-dimm,id=dimm1,memdev=hp,node=1".into());
        }
        a.extend(
            [
                "-nodefaults",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-d",
                "cpu_reset",
            ]
            .map(String::from),
        );
        a.push("-D".into());
        a.push(self.reset_log.display().to_string());
        a.push("-kernel".into());
        a.push(self.kernel.display().to_string());
        a.push("-initrd".into());
        a.push(self.initrd.display().to_string());
        a.push("-append".into());
        a.push(self.append.clone());
        a
    }

    /// Boots, hands each console line to `on_line` (which returns true once the guest said
    /// GMEMLAB-DONE), and kills QEMU by its PID if the timeout passes first, or once the lab's
    /// kernel has reset the machine: a triple fault in the reset log (after QEMU has dumped
    /// the CPUs' state there) or a second GMEMLAB-BOOT line.
    pub fn boot(&self, mut on_line: impl FnMut(&str) -> bool) -> Result<Boot, QemuError> {
        let create = |path: &Path| {
            File::create(path).map_err(|source| QemuError::CreateLog {
                path: path.to_owned(),
                source,
            })
        };
        let mut serial = create(&self.serial_log)?;
        let qemu_err = create(&self.qemu_log)?;
        let mut cmd = Command::new(&self.qemu.binary);
        cmd.args(self.args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(qemu_err);
        // QEMU dies with gmem-lab (PR_SET_PDEATHSIG), so an interrupted run never leaves a
        // QEMU behind.
        gmem::sys::process::kill_with_parent(&mut cmd);
        let start = Instant::now();
        let mut child = cmd.spawn().map_err(|source| QemuError::Spawn {
            qemu: self.qemu.binary.clone(),
            source,
        })?;
        let pid = child.id();
        let stdout = child.stdout.take();
        let (tx, rx) = mpsc::channel::<String>();
        let reader = thread::spawn(move || {
            let Some(stdout) = stdout else { return };
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let _ = serial.write_all(&buf);
                        let line = String::from_utf8_lossy(&buf);
                        if tx.send(line.trim_end().to_owned()).is_err() {
                            return;
                        }
                    }
                }
            }
        });

        let deadline = start + self.timeout;
        let mut saw_done = false;
        let mut init_at = None;
        let mut done_at = None;
        let mut timed_out = false;
        let mut boots = 0;
        let mut reset = false;
        let mut triple_fault_at = None;
        let mut reset_log_checked = start;
        let exit = loop {
            if let Some(status) = try_wait(&mut child, pid)? {
                break Some(status);
            }
            let now = Instant::now();
            let limit = match done_at {
                Some(t) => deadline.min(t + POWEROFF_GRACE),
                None => deadline,
            };
            if now >= reset_log_checked + Duration::from_millis(250) && triple_fault_at.is_none() {
                reset_log_checked = now;
                let log = std::fs::read_to_string(&self.reset_log).unwrap_or_default();
                if log.contains(TRIPLE_FAULT) {
                    triple_fault_at = Some(now);
                }
            }
            if triple_fault_at.is_some_and(|t| now >= t + RESET_DUMP_GRACE) || boots > 1 {
                reset = true;
                let _ = child.kill();
                break child.wait().ok();
            }
            if now >= limit {
                timed_out = done_at.is_none();
                // Child::kill sends SIGKILL to this child's PID only.
                let _ = child.kill();
                break child.wait().ok();
            }
            match rx.recv_timeout(Duration::from_millis(50).min(limit - now)) {
                Ok(line) => {
                    if line.contains(crate::report::BOOT) {
                        boots += 1;
                        init_at.get_or_insert(start.elapsed());
                        if boots > 1 {
                            // The machine reset and the kernel booted again: not this run.
                            continue;
                        }
                    }
                    if on_line(&line) && !saw_done {
                        saw_done = true;
                        done_at = Some(Instant::now());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // Console closed: QEMU is exiting; wait for it within the limits above.
                    thread::sleep(Duration::from_millis(20));
                }
            }
        };
        // QEMU has exited, so its stdout is closed and the reader ends; drain what it read,
        // up to a second boot's first line (what follows it is not this run's).
        let _ = reader.join();
        for line in rx.try_iter() {
            if line.contains(crate::report::BOOT) && init_at.is_some() {
                break;
            }
            if on_line(&line) {
                saw_done = true;
            }
        }
        Ok(Boot {
            exit,
            timed_out,
            saw_done,
            elapsed: start.elapsed(),
            init_at,
            reset,
            pid,
        })
    }
}

fn try_wait(child: &mut Child, pid: u32) -> Result<Option<ExitStatus>, QemuError> {
    child
        .try_wait()
        .map_err(|source| QemuError::Wait { pid, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_triple_fault_is_found_in_the_reset_log() {
        let log = "CPU Reset (CPU 0)\nRAX=0 RBX=0\nTriple fault\nCPU Reset (CPU 0)\n\
                   RAX=0000000000000000 RIP=ffffffff81001234 RFL=00000002\n\
                   CR0=80050033 CR2=ffffc90000001ff8 CR3=0000000001234000 CR4=00350ef0\n\
                   CPU Reset (CPU 1)\nRIP=ffffffff81000abc RFL=00000246\n";
        let found = triple_fault(log).unwrap();
        assert!(
            found.contains("CPU 0: RIP=ffffffff81001234 CR2=ffffc90000001ff8 CR3=0000000001234000"),
            "{found}"
        );
        assert!(found.contains("; CPU 1: RIP=ffffffff81000abc"), "{found}");
        assert_eq!(triple_fault("CPU Reset (CPU 0)\nRIP=0000fff0\n"), None);
    }

    #[test]
    fn command_line_has_two_numa_nodes() {
        let m = Machine {
            qemu: Emulator {
                binary: "qemu-system-x86_64".into(),
                data_dirs: vec!["/fw".into()],
                version: String::new(),
            },
            kernel: "/k".into(),
            initrd: "/i".into(),
            append: "console=ttyS0 panic=-1".into(),
            node_mib: 1024,
            cpus: CpuCount::DEFAULT,
            hotplug_dimm_mib: None,
            timeout: Duration::from_secs(1),
            serial_log: "/s".into(),
            qemu_log: "/q".into(),
            reset_log: "/r".into(),
        };
        let a = m.args().join(" ");
        assert!(a.starts_with("-L /fw -accel"));
        assert!(a.contains("-accel tcg,thread=multi -cpu max -m 2048M"));
        assert!(a.contains("-smp 2,sockets=2,cores=1,threads=1"));
        assert!(a.contains("-object memory-backend-ram,id=m0,size=1024M"));
        assert!(a.contains("-object memory-backend-ram,id=m1,size=1024M"));
        assert!(a.contains("-numa node,nodeid=0,cpus=0,memdev=m0"));
        assert!(a.contains("-numa node,nodeid=1,cpus=1,memdev=m1"));
        assert!(a.contains("-serial stdio -d cpu_reset -D /r"));
        assert!(!a.contains("-no-reboot"), "a reset must dump the CPU state");
        assert!(a.ends_with("-kernel /k -initrd /i -append console=ttyS0 panic=-1"));
        assert!(!a.contains("pc-dimm"));
        let four = Machine {
            cpus: CpuCount::new(4).unwrap(),
            ..m.clone()
        }
        .args()
        .join(" ");
        assert!(four.contains("-smp 4,sockets=2,cores=2,threads=1"));
        assert!(four.contains("-numa node,nodeid=0,cpus=0-1,memdev=m0"));
        assert!(four.contains("-numa node,nodeid=1,cpus=2-3,memdev=m1"));
        let dimm = Machine {
            hotplug_dimm_mib: Some(512),
            ..m
        }
        .args()
        .join(" ");
        assert!(dimm.contains("-m 2048M,slots=2,maxmem=3072M"));
        assert!(dimm.contains("-object memory-backend-ram,id=hp,size=512M"));
        assert!(dimm.contains("-device pc-dimm,id=dimm1,memdev=hp,node=1"));
    }

    #[test]
    fn cpu_counts_split_over_the_two_nodes() {
        let eight: CpuCount = "8".parse().unwrap();
        assert_eq!((eight.total(), eight.per_node()), (8, 4));
        assert_eq!(
            (eight.node_cpus(0), eight.node_cpus(1)),
            ("0-3".into(), "4-7".into())
        );
        assert_eq!(CpuCount::default().node_cpus(1), "1");
        assert_eq!("3".parse::<CpuCount>(), Err(CpuCountError::Odd(3)));
        assert_eq!("0".parse::<CpuCount>(), Err(CpuCountError::OutOfRange(0)));
        assert_eq!(CpuCount::new(66), Err(CpuCountError::OutOfRange(66)));
        assert_eq!(
            "four".parse::<CpuCount>(),
            Err(CpuCountError::NotANumber("four".into()))
        );
    }
}
