//! The lab tests that run inside the two-node guest.

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use gmem::memory::{GmemFlags, GuestMemfd, MemoryError};
use gmem::numa::{NodeId, NodeMask};
use gmem::sys::kvm::{DEFAULT_KVM_DEVICE, KVM_API_VERSION, KvmError};
use gmem::sys::kvm::{KVM_CAP_GUEST_MEMFD, KVM_CAP_GUEST_MEMFD_FLAGS};
use gmem::sys::mempolicy::{self, MPOL_BIND, MPOL_MF_MOVE, MPOL_MF_STRICT};
use gmem::sys::mman::{Mmap, page_size};
use serde_json::{Value, json};
use thiserror::Error;

use super::Verdict;
use super::kselftest::{self, Totals};
use crate::report::{ECHO_PREFIX, Status};

/// Pages each memory test moves.
const PAGES: usize = 256;
/// Pre-filled into move_pages' status[] so an entry the kernel never wrote is visible.
const SENTINEL: i32 = i32::MIN;
const NODE_SYSFS: &str = "/sys/devices/system/node";

/// Errors that stop an in-guest test before it can reach a verdict.
#[derive(Debug, Error)]
pub enum GuestError {
    #[error("unknown test `{0}` (see `gmem-lab tests`)")]
    UnknownTest(String),
    #[error("cannot read {path}")]
    ReadSys {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error("guest memory")]
    Memory(#[from] MemoryError),
    #[error("mmap of {len} bytes ({what}) failed")]
    Mmap {
        what: &'static str,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("mbind(MPOL_BIND, node {node}) failed")]
    Mbind {
        node: u32,
        #[source]
        source: io::Error,
    },
    #[error("move_pages ({what}) failed")]
    MovePages {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the output of `{command}`")]
    Output {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("the node-filling hog: {0}")]
    Hog(String),
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
}

pub(super) fn read_sys(path: impl AsRef<Path>) -> Result<String, GuestError> {
    let path = path.as_ref();
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| GuestError::ReadSys {
            path: path.to_owned(),
            source,
        })
}

/// Parses a kernel node/cpu list such as `0-1` or `0,2-3`.
pub fn parse_list(text: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if a > b {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

/// The number of CPUs in a kernel cpu list such as `0-3`; 0 if it does not parse.
pub fn cpu_count(list: &str) -> usize {
    parse_list(list).map_or(0, |l| l.len())
}

/// The CPU count the runner gave QEMU: `gmemlab.cpus=N` on the kernel command line.
pub fn expected_cpus(cmdline: &str) -> Option<usize> {
    let key = format!("{}=", super::CPUS_PARAM);
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&key)?.parse().ok())
}

/// Problems with how the kernel brought up the `expected` CPUs: all online, half per node.
pub fn cpu_problems(expected: usize, online: &str, node_cpus: &[(u32, String)]) -> Vec<String> {
    let mut problems = Vec::new();
    let up = cpu_count(online);
    if up != expected {
        problems.push(format!(
            "QEMU was given {expected} CPUs, the kernel brought up {up} (online `{online}`): \
             is its CONFIG_NR_CPUS below {expected}?"
        ));
    }
    for (node, list) in node_cpus {
        let n = cpu_count(list);
        if n * 2 != expected {
            problems.push(format!(
                "node {node} has {n} CPUs (`{list}`), not {} of the {expected}",
                expected / 2
            ));
        }
    }
    problems
}

/// `MemTotal` in kB from a node's meminfo (`Node 0 MemTotal:  1012345 kB`).
pub fn node_mem_total_kb(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let (_, rest) = l.split_once("MemTotal:")?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Counts of each value, with [`SENTINEL`] shown as `unwritten` and negatives as errno names.
pub fn histogram(values: &[i32]) -> BTreeMap<String, usize> {
    let mut h = BTreeMap::new();
    for &v in values {
        let key = match v {
            SENTINEL => "unwritten".to_owned(),
            v if v == -libc::ENOENT => "-ENOENT".to_owned(),
            v if v == -libc::EBUSY => "-EBUSY".to_owned(),
            v if v == -libc::EFAULT => "-EFAULT".to_owned(),
            v if v == -libc::EACCES => "-EACCES".to_owned(),
            v if v == -libc::ENOMEM => "-ENOMEM".to_owned(),
            v => v.to_string(),
        };
        *h.entry(key).or_insert(0) += 1;
    }
    h
}

fn all_on(values: &[i32], node: i32) -> bool {
    !values.is_empty() && values.iter().all(|&v| v == node)
}

/// Fills page i of `m` with byte `(i & 0xff)`.
pub(crate) fn fill(m: &Mmap) {
    let ps = page_size();
    for i in 0..m.len() / ps {
        m.fill(i * ps, ps, (i & 0xff) as u8);
    }
}

/// Number of pages of `m` whose bytes are not all `(i & 0xff)`.
pub(crate) fn bad_pages(m: &Mmap) -> usize {
    let ps = page_size();
    let mut page = vec![0u8; ps];
    (0..m.len() / ps)
        .filter(|&i| {
            m.read(i * ps, &mut page);
            page.iter().any(|&b| b != (i & 0xff) as u8)
        })
        .count()
}

/// The start address of every page of `m`, as move_pages wants them.
fn page_addrs(m: &Mmap) -> Vec<usize> {
    let ps = page_size();
    (0..m.len() / ps).map(|i| m.addr() + i * ps).collect()
}

/// Sets an `MPOL_BIND` policy to `node` on the whole mapping, with mbind `flags`.
pub(crate) fn bind(m: &Mmap, node: u32, flags: u32) -> io::Result<()> {
    let mask = NodeMask::single(NodeId(node));
    mempolicy::mbind(m, 0, m.len(), MPOL_BIND, mask.as_raw(), flags)
}

/// Each page's current node (or negative errno; [`SENTINEL`] where the kernel wrote nothing).
fn query_nodes(pages: &[usize], what: &'static str) -> Result<Vec<i32>, GuestError> {
    let mut status = vec![SENTINEL; pages.len()];
    mempolicy::move_pages(0, pages, None, &mut status, 0)
        .map_err(|source| GuestError::MovePages { what, source })?;
    Ok(status)
}

/// move_pages every page to `node`: (return value or errno, status[] as left by the kernel).
fn move_all(pages: &[usize], node: i32) -> (Result<usize, io::Error>, Vec<i32>) {
    let nodes = vec![node; pages.len()];
    let mut status = vec![SENTINEL; pages.len()];
    let rc = mempolicy::move_pages(0, pages, Some(&nodes), &mut status, MPOL_MF_MOVE);
    (rc, status)
}

fn rc_json(rc: &Result<usize, io::Error>) -> Value {
    match rc {
        Ok(n) => json!(n),
        Err(e) => json!(format!("error: {e}")),
    }
}

/// This process's numa_maps line for the mapping starting at `addr`.
fn numa_maps_line(addr: usize) -> Option<String> {
    let text = fs::read_to_string("/proc/self/numa_maps").ok()?;
    let prefix = format!("{addr:x} ");
    text.lines()
        .find(|l| l.starts_with(&prefix))
        .map(str::to_owned)
}

/// `nodes`: two online nodes with memory, and a working /dev/kvm.
pub fn nodes() -> Result<Verdict, GuestError> {
    let mut problems = Vec::new();
    let online = read_sys(format!("{NODE_SYSFS}/online"))?;
    let has_memory = read_sys(format!("{NODE_SYSFS}/has_memory")).ok();
    let ids = parse_list(&online).unwrap_or_default();
    let mut nodes = Vec::new();
    let mut node_cpus = Vec::new();
    for id in &ids {
        let mem = read_sys(format!("{NODE_SYSFS}/node{id}/meminfo"))
            .ok()
            .and_then(|m| node_mem_total_kb(&m));
        let cpus = read_sys(format!("{NODE_SYSFS}/node{id}/cpulist")).ok();
        if mem.unwrap_or(0) == 0 {
            problems.push(format!("node {id} has no memory"));
        }
        node_cpus.push((*id, cpus.clone().unwrap_or_default()));
        nodes.push(json!({ "node": id, "mem_total_kb": mem, "cpus": cpus }));
    }
    if ids.len() != 2 {
        problems.push(format!("expected 2 online nodes, found `{online}`"));
    }
    let cpus_online = read_sys("/sys/devices/system/cpu/online").ok();
    let cpus_expected = expected_cpus(&read_sys("/proc/cmdline").unwrap_or_default());
    if let Some(expected) = cpus_expected {
        problems.extend(cpu_problems(
            expected,
            cpus_online.as_deref().unwrap_or(""),
            &node_cpus,
        ));
    }
    let dev_kvm = Path::new(DEFAULT_KVM_DEVICE).exists();
    let kvm = match gmem::sys::kvm::open(Path::new(DEFAULT_KVM_DEVICE)) {
        Ok(k) => {
            let api = k.get_api_version();
            if api != KVM_API_VERSION {
                problems.push(format!(
                    "KVM_GET_API_VERSION is {api}, not {KVM_API_VERSION}"
                ));
            }
            let vm_flags = gmem::sys::kvm::create_vm(&k)
                .map(|vm| vm.check_extension_raw(KVM_CAP_GUEST_MEMFD_FLAGS))
                .ok();
            json!({
                "api_version": api,
                "cap_guest_memfd": k.check_extension_raw(KVM_CAP_GUEST_MEMFD),
                "cap_guest_memfd_flags": vm_flags,
            })
        }
        Err(e) => {
            problems.push(format!("cannot open /dev/kvm: {e}"));
            json!(null)
        }
    };
    let status = if problems.is_empty() {
        Status::Pass
    } else {
        Status::Fail
    };
    Ok(Verdict {
        status,
        detail: json!({
            "online": online,
            "has_memory": has_memory,
            "cpus_online": cpus_online,
            "cpus_expected": cpus_expected,
            "nodes": nodes,
            "dev_kvm": dev_kvm,
            "kvm": kvm,
            "kernel": read_sys("/proc/sys/kernel/osrelease").ok(),
            "problems": problems,
        }),
    })
}

/// `anon-control`: anonymous pages bound to node 0 move to node 1 and back.
pub fn anon_control() -> Result<Verdict, GuestError> {
    let len = PAGES * page_size();
    let m = Mmap::anonymous(len).map_err(|source| GuestError::Mmap {
        what: "anonymous",
        len,
        source,
    })?;
    bind(&m, 0, 0).map_err(|source| GuestError::Mbind { node: 0, source })?;
    fill(&m);
    let pages = page_addrs(&m);
    let before = query_nodes(&pages, "query before")?;
    let (rc1, status1) = move_all(&pages, 1);
    let on1 = query_nodes(&pages, "query after move to 1")?;
    let bad1 = bad_pages(&m);
    let (rc0, status0) = move_all(&pages, 0);
    let on0 = query_nodes(&pages, "query after move back to 0")?;
    let bad0 = bad_pages(&m);

    let mut problems = Vec::new();
    if !all_on(&before, 0) {
        problems.push("pages did not start on node 0");
    }
    if !matches!(rc1, Ok(0)) || !all_on(&status1, 1) || !all_on(&on1, 1) {
        problems.push("the move to node 1 did not move every page");
    }
    if !matches!(rc0, Ok(0)) || !all_on(&status0, 0) || !all_on(&on0, 0) {
        problems.push("the move back to node 0 did not move every page");
    }
    if bad1 + bad0 > 0 {
        problems.push("page contents changed");
    }
    Ok(Verdict {
        status: Status::pass_if(problems.is_empty()),
        detail: json!({
            "pages": PAGES,
            "nodes_before": histogram(&before),
            "to_node1": { "move_pages": rc_json(&rc1), "status": histogram(&status1),
                          "nodes_after": histogram(&on1), "bad_pages": bad1 },
            "to_node0": { "move_pages": rc_json(&rc0), "status": histogram(&status0),
                          "nodes_after": histogram(&on0), "bad_pages": bad0 },
            "problems": problems,
        }),
    })
}

/// `gmem-stock`: gmem made without MIGRATABLE must stay put, with its bytes intact; the
/// detail records exactly how the kernel refused.
pub fn gmem_stock() -> Result<Verdict, GuestError> {
    let kvm = gmem::sys::kvm::open(Path::new(DEFAULT_KVM_DEVICE))?;
    let vm = gmem::sys::kvm::create_vm(&kvm)?;
    let cap_flags = vm.check_extension_raw(KVM_CAP_GUEST_MEMFD_FLAGS);
    let size = (PAGES * page_size()) as u64;
    let flags = GmemFlags::HOST_MAPPABLE;
    let gmem = GuestMemfd::create(&vm, size, flags)?;
    let m = gmem.map()?;
    bind(&m, 0, 0).map_err(|source| GuestError::Mbind { node: 0, source })?;
    fill(&m);
    let pages = page_addrs(&m);
    let before = query_nodes(&pages, "query before")?;
    let maps_before = numa_maps_line(m.addr());

    let (rc, status) = move_all(&pages, 1);
    let after_move = query_nodes(&pages, "query after move_pages")?;
    let bad_after_move = bad_pages(&m);

    let strict = bind(&m, 1, MPOL_MF_MOVE | MPOL_MF_STRICT);
    let after_mbind = query_nodes(&pages, "query after mbind(MOVE|STRICT)")?;
    let bad_after_mbind = bad_pages(&m);
    let maps_after = numa_maps_line(m.addr());

    let mut problems = Vec::new();
    if !all_on(&before, 0) {
        problems.push("gmem pages did not start on node 0");
    }
    if after_move.contains(&1) || after_mbind.contains(&1) {
        problems.push("gmem pages created without MIGRATABLE moved to node 1");
    } else if matches!(rc, Ok(0)) {
        problems.push("move_pages returned 0 (success) but the pages did not move");
    }
    if bad_after_move + bad_after_mbind > 0 {
        problems.push("gmem page contents changed");
    }
    let refusal = match &rc {
        Ok(n) if *n > 0 => format!(
            "move_pages returned {n} (pages not moved); status[] {}",
            if status.iter().all(|&s| s == SENTINEL) {
                "left unwritten"
            } else {
                "partly written"
            }
        ),
        Ok(n) => format!("move_pages returned {n}"),
        Err(e) => format!("move_pages failed: {e}"),
    };
    Ok(Verdict {
        status: Status::pass_if(problems.is_empty()),
        detail: json!({
            "pages": PAGES,
            "gmem_flags": flags.to_string(),
            "cap_guest_memfd_flags": cap_flags,
            "nodes_before": histogram(&before),
            "move_pages": rc_json(&rc),
            "move_pages_status": histogram(&status),
            "nodes_after_move_pages": histogram(&after_move),
            "bad_pages_after_move_pages": bad_after_move,
            "mbind_move_strict": match &strict {
                Ok(()) => "ok".to_owned(),
                Err(e) => format!("error: {e}"),
            },
            "nodes_after_mbind": histogram(&after_mbind),
            "bad_pages_after_mbind": bad_after_mbind,
            "numa_maps_before": maps_before,
            "numa_maps_after": maps_after,
            "refusal": refusal,
            "problems": problems,
        }),
    })
}

/// Lines of output an `exec:` test keeps in its detail.
const EXEC_TAIL: usize = 40;

/// Starts `command` under /bin/sh with stderr folded into a piped stdout.
pub(super) fn spawn_shell(command: &str) -> Result<std::process::Child, GuestError> {
    Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("exec {command} 2>&1"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|source| GuestError::Spawn {
            command: command.to_owned(),
            source,
        })
}

/// `exec:<command>`: runs the command (via /bin/sh) and echoes its output to the console
/// indented. The verdict is [`kselftest::verdict`]'s: kselftest's `# Totals:` lines decide when
/// the command prints any, its exit code (0 pass, 4 skip) otherwise.
pub fn exec(command: &str) -> Result<Verdict, GuestError> {
    let mut child = spawn_shell(command)?;
    let mut tail = VecDeque::new();
    let mut totals: Option<Totals> = None;
    let mut totals_lines = 0;
    if let Some(out) = child.stdout.take() {
        let mut console = io::stdout();
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(console, "{ECHO_PREFIX}{line}");
            if let Some(t) = Totals::parse(&line) {
                totals = Some(totals.map_or(t, |sum| sum + t));
                totals_lines += 1;
            }
            if tail.len() == EXEC_TAIL {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
    let status = child.wait().map_err(|source| GuestError::Spawn {
        command: command.to_owned(),
        source,
    })?;
    Ok(Verdict {
        status: kselftest::verdict(status.code(), totals.as_ref()),
        detail: json!({
            "command": command,
            "exit": status.code(),
            "signal": std::os::unix::process::ExitStatusExt::signal(&status),
            "kselftest_totals": totals,
            "kselftest_totals_lines": totals_lines,
            "verdict_from": if totals.is_some() { "kselftest totals and exit code" } else { "exit code" },
            "output_tail": tail,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_node_lists() {
        assert_eq!(parse_list("0-1\n"), Some(vec![0, 1]));
        assert_eq!(parse_list("0,2-3"), Some(vec![0, 2, 3]));
        assert_eq!(parse_list("0"), Some(vec![0]));
        assert_eq!(parse_list(""), Some(vec![]));
        assert_eq!(parse_list("3-1"), None);
        assert_eq!(parse_list("x"), None);
    }

    #[test]
    fn checks_the_cpus_qemu_was_given() {
        let cmdline = "console=ttyS0 panic=-1 quiet gmemlab.cpus=4\n";
        assert_eq!(expected_cpus(cmdline), Some(4));
        assert_eq!(expected_cpus("console=ttyS0 xgmemlab.cpus=4"), None);
        assert_eq!(expected_cpus("console=ttyS0"), None);
        let split = |a: &str, b: &str| vec![(0, a.to_owned()), (1, b.to_owned())];
        assert!(cpu_problems(4, "0-3", &split("0-1", "2-3")).is_empty());
        assert!(cpu_problems(2, "0-1", &split("0", "1")).is_empty());
        // The issue-13 kernel: CONFIG_NR_CPUS=2 under a 4-CPU QEMU.
        let short = cpu_problems(4, "0-1", &split("0", "1"));
        assert_eq!(short.len(), 3, "{short:?}");
        assert!(short[0].contains("brought up 2"), "{short:?}");
        assert!(short[1].contains("node 0 has 1 CPUs"), "{short:?}");
        assert_eq!(cpu_count("0,2-3"), 3);
        assert_eq!(cpu_count(""), 0);
    }

    #[test]
    fn reads_node_meminfo() {
        let m = "Node 1 MemTotal:        1015752 kB\nNode 1 MemFree:          990000 kB\n";
        assert_eq!(node_mem_total_kb(m), Some(1_015_752));
        assert_eq!(node_mem_total_kb("nothing"), None);
    }

    #[test]
    fn histogram_names_sentinel_and_errnos() {
        let h = histogram(&[1, 1, SENTINEL, -libc::ENOENT, 0]);
        assert_eq!(h["1"], 2);
        assert_eq!(h["unwritten"], 1);
        assert_eq!(h["-ENOENT"], 1);
        assert_eq!(h["0"], 1);
    }

    #[test]
    fn exec_follows_kselftest_totals() {
        let run = |script: &str| exec(&format!("sh -c '{script}'")).unwrap();
        let totals = |p, f, s| {
            format!("echo \"# Totals: pass:{p} fail:{f} xfail:0 xpass:0 skip:{s} error:0\"")
        };
        // Every test skipped and exit 0: this was reported as a pass.
        let all_skip = run(&totals(0, 0, 6));
        assert_eq!(all_skip.status, Status::Skip, "{}", all_skip.detail);
        assert_eq!(all_skip.detail["kselftest_totals"]["skip"], 6);
        assert_eq!(
            run(&format!("{}; exit 0", totals(3, 1, 0))).status,
            Status::Fail
        );
        assert_eq!(run(&totals(1, 0, 5)).status, Status::Pass);
        assert_eq!(
            run(&format!("{}; exit 1", totals(1, 0, 0))).status,
            Status::Fail
        );
        // Without a Totals line the exit code decides, as before.
        assert_eq!(run("exit 0").status, Status::Pass);
        assert_eq!(run("exit 4").status, Status::Skip);
        assert_eq!(run("exit 1").status, Status::Fail);
    }

    #[test]
    fn moves_anonymous_memory_on_this_host() {
        // Single-node hosts: moving to node 0 must succeed and leave the bytes alone.
        let len = 8 * page_size();
        let m = Mmap::anonymous(len).unwrap();
        fill(&m);
        let pages = page_addrs(&m);
        let (rc, status) = move_all(&pages, 0);
        assert_eq!(rc.unwrap(), 0);
        assert!(all_on(&status, 0), "{status:?}");
        assert_eq!(bad_pages(&m), 0);
        assert!(numa_maps_line(m.addr()).is_some());
    }
}
