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
use crate::qmp::{Qmp, QmpError, Stop, cpu_summary};

/// How long QEMU may take to exit after the guest printed GMEMLAB-DONE.
const POWEROFF_GRACE: Duration = Duration::from_secs(15);

/// The line QEMU logs (`-d cpu_reset`) when a CPU triple-faults.
const TRIPLE_FAULT: &str = "Triple fault";

/// How often the runner asks QEMU's monitor whether the guest stopped the VM.
const STATUS_INTERVAL: Duration = Duration::from_millis(250);

/// How long QEMU may take to create its monitor socket.
const MONITOR_TIMEOUT: Duration = Duration::from_secs(10);

/// How long QEMU may take to exit after it was asked to quit.
const QUIT_GRACE: Duration = Duration::from_secs(5);

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
    #[error("cannot reach QEMU's monitor")]
    Monitor(#[from] QmpError),
    #[error("cannot write the CPU state to {path}")]
    WriteCpuState {
        path: PathBuf,
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
    /// QEMU's `-d cpu_reset` log, for its "Triple fault" line: a guest reset stops the VM
    /// (see [`crate::qmp`]), so the log tells a triple fault from a reset request.
    pub reset_log: PathBuf,
    /// QEMU's monitor socket (QMP).
    pub qmp_socket: PathBuf,
    /// Every CPU's registers when the guest stopped the VM before GMEMLAB-DONE.
    pub cpu_state_log: PathBuf,
}

/// How the guest stopped the VM before it said GMEMLAB-DONE.
#[derive(Debug, Clone)]
pub struct GuestStop {
    pub why: Stop,
    /// QEMU logged a triple fault (the reset came from the CPU, not from a reset request).
    pub triple_fault: bool,
    /// Each CPU's instruction pointer, CR2 and CR3 at the stop ([`crate::qmp::cpu_summary`]).
    pub cpus: Vec<String>,
}

impl GuestStop {
    /// Whether the lab's kernel died (a reset, a panic) rather than powered off.
    pub fn is_crash(&self) -> bool {
        self.why != Stop::Poweroff
    }
}

impl fmt::Display for GuestStop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.why, self.triple_fault) {
            (_, true) => write!(f, "a CPU triple-faulted")?,
            (Stop::Reset, false) => write!(
                f,
                "the lab's kernel reset the machine (no triple fault, no oops on the console)"
            )?,
            (Stop::Poweroff, false) => write!(f, "the guest powered off")?,
            (Stop::Other(why), false) => write!(f, "the guest stopped ({why})")?,
        }
        if !self.cpus.is_empty() {
            write!(f, "; registers there: {}", self.cpus.join("; "))?;
        }
        Ok(())
    }
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
    /// The guest stopped the VM before GMEMLAB-DONE (a triple fault, a panic with
    /// `panic=-1`, a reset, a poweroff): QEMU paused it, the registers were read, and it quit.
    pub stop: Option<GuestStop>,
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
                "-action",
                "reboot=shutdown,shutdown=pause",
            ]
            .map(String::from),
        );
        a.push("-D".into());
        a.push(self.reset_log.display().to_string());
        a.push("-qmp".into());
        a.push(format!(
            "unix:{},server=on,wait=off",
            self.qmp_socket.display()
        ));
        a.push("-kernel".into());
        a.push(self.kernel.display().to_string());
        a.push("-initrd".into());
        a.push(self.initrd.display().to_string());
        a.push("-append".into());
        a.push(self.append.clone());
        a
    }

    /// Boots, hands each console line to `on_line` (which returns true once the guest said
    /// GMEMLAB-DONE), and ends QEMU when the guest stops the VM (QEMU pauses it: a poweroff,
    /// a reset, a triple fault; before GMEMLAB-DONE the registers are read first) or when
    /// the timeout passes (it is killed by its PID).
    pub fn boot(&self, mut on_line: impl FnMut(&str) -> bool) -> Result<Boot, QemuError> {
        let create = |path: &Path| {
            File::create(path).map_err(|source| QemuError::CreateLog {
                path: path.to_owned(),
                source,
            })
        };
        let mut serial = create(&self.serial_log)?;
        let qemu_err = create(&self.qemu_log)?;
        let _ = std::fs::remove_file(&self.qmp_socket);
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
        let mut qmp = match Qmp::connect(&self.qmp_socket, MONITOR_TIMEOUT) {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e.into());
            }
        };
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
        let mut stop = None;
        let mut quit_at: Option<Instant> = None;
        let mut status_checked = start;
        let exit = loop {
            if let Some(status) = try_wait(&mut child, pid)? {
                break Some(status);
            }
            let now = Instant::now();
            let limit = match (done_at, quit_at) {
                (_, Some(q)) => q + QUIT_GRACE,
                (Some(t), None) => deadline.min(t + POWEROFF_GRACE),
                (None, None) => deadline,
            };
            if now >= limit {
                timed_out = done_at.is_none() && quit_at.is_none();
                // Child::kill sends SIGKILL to this child's PID only.
                let _ = child.kill();
                break child.wait().ok();
            }
            if quit_at.is_none() && now >= status_checked + STATUS_INTERVAL {
                status_checked = now;
                // The console lines read so far come first: a GMEMLAB-DONE just before the
                // poweroff must count.
                for line in rx.try_iter() {
                    feed(&line, &mut on_line, &mut saw_done, &mut init_at, start);
                }
                // A monitor that stopped answering belongs to a QEMU that is exiting; the
                // wait above sees it go.
                if let Ok(Some(why)) = qmp.stopped() {
                    if !saw_done {
                        stop = Some(self.read_cpus(&mut qmp, why)?);
                    }
                    qmp.quit();
                    quit_at = Some(Instant::now());
                }
            }
            if saw_done && done_at.is_none() {
                done_at = Some(Instant::now());
            }
            match rx.recv_timeout(Duration::from_millis(50).min(limit - now)) {
                Ok(line) => feed(&line, &mut on_line, &mut saw_done, &mut init_at, start),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // Console closed: QEMU is exiting; wait for it within the limits above.
                    thread::sleep(Duration::from_millis(20));
                }
            }
        };
        // QEMU has exited, so its stdout is closed and the reader ends; drain what it read.
        let _ = reader.join();
        for line in rx.try_iter() {
            feed(&line, &mut on_line, &mut saw_done, &mut init_at, start);
        }
        let _ = std::fs::remove_file(&self.qmp_socket);
        Ok(Boot {
            exit,
            timed_out,
            saw_done,
            elapsed: start.elapsed(),
            init_at,
            stop,
            pid,
        })
    }

    /// Reads every CPU's registers from the stopped VM into [`Machine::cpu_state_log`].
    fn read_cpus(&self, qmp: &mut Qmp, why: Stop) -> Result<GuestStop, QemuError> {
        let registers = qmp
            .registers()
            .unwrap_or_else(|e| format!("(not read: {e})"));
        std::fs::write(&self.cpu_state_log, &registers).map_err(|source| {
            QemuError::WriteCpuState {
                path: self.cpu_state_log.clone(),
                source,
            }
        })?;
        let triple_fault =
            std::fs::read_to_string(&self.reset_log).is_ok_and(|log| log.contains(TRIPLE_FAULT));
        Ok(GuestStop {
            why,
            triple_fault,
            cpus: cpu_summary(&registers),
        })
    }
}

/// Hands one console line to the run's collector, noting init and GMEMLAB-DONE.
fn feed(
    line: &str,
    on_line: &mut impl FnMut(&str) -> bool,
    saw_done: &mut bool,
    init_at: &mut Option<Duration>,
    start: Instant,
) {
    if line.contains(crate::report::BOOT) {
        init_at.get_or_insert(start.elapsed());
    }
    if on_line(line) {
        *saw_done = true;
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
            qmp_socket: "/m".into(),
            cpu_state_log: "/c".into(),
        };
        let a = m.args().join(" ");
        assert!(a.starts_with("-L /fw -accel"));
        assert!(a.contains("-accel tcg,thread=multi -cpu max -m 2048M"));
        assert!(a.contains("-smp 2,sockets=2,cores=1,threads=1"));
        assert!(a.contains("-object memory-backend-ram,id=m0,size=1024M"));
        assert!(a.contains("-object memory-backend-ram,id=m1,size=1024M"));
        assert!(a.contains("-numa node,nodeid=0,cpus=0,memdev=m0"));
        assert!(a.contains("-numa node,nodeid=1,cpus=1,memdev=m1"));
        assert!(a.contains(
            "-serial stdio -d cpu_reset -action reboot=shutdown,shutdown=pause -D /r \
             -qmp unix:/m,server=on,wait=off"
        ));
        assert!(
            !a.contains("-no-reboot"),
            "a reset must stop the VM with its CPU state"
        );
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
