//! `full-node`: a hog fills node 1, then migrations to node 1 must stop partway, losing no byte.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use gmem::memory::{
    ChunkLayout, GmemOffset, GuestMemfd, GuestMemory, MemoryError, Policy, page_size,
};
use gmem::migrate::{
    MechanismChoice, MechanismKind, MigrationReport, MigrationRequest, Migrator, NothingToQuiesce,
    PlacementPolicy, StepOutcome,
};
use gmem::numa::{NodeId, NodeMask, NodeRoom, Topology};
use gmem::sys::kvm::DEFAULT_KVM_DEVICE;
use gmem::sys::mman::Mmap;
use gmem::testing::{fill_seed_pattern, first_seed_mismatch};
use serde_json::{Value, json};

use super::Verdict;
use super::checks::{GuestError, bind};
use crate::report::Status;

const MIB: u64 = 1 << 20;
/// Guest memory each migration moves to the full node. More than the hog's headroom plus
/// all the free pages the node's per-CPU lists may hold (MemFree leaves those out; the
/// lab's kernel lets them grow to twice the low watermark, ~86 MiB on a 1 GiB node, and
/// allocations take them first), so the node cannot take it all.
const GUEST: u64 = 128 * MIB;
/// Chunk size of the remap layout.
const CHUNK: u64 = 2 * MIB;
/// What the hog leaves free on the full node above its `high` watermark (the level kswapd
/// reclaims back up to): an eighth of what one migration needs there.
const HEADROOM: u64 = GUEST / 8;
/// The hog populates at most this much per step, re-reading the node's MemFree in between.
const HOG_STEP: u64 = 8 * MIB;
/// The hog stops once MemFree is within this much of its goal.
const HOG_SLACK: u64 = 256 << 10;

const HOME: NodeId = NodeId(0);
const FULL: NodeId = NodeId(1);

/// `MemFree` of `node`, bytes.
fn node_free(node: NodeId) -> Result<u64, GuestError> {
    let topology = Topology::read().map_err(MemoryError::from)?;
    topology
        .node(node)
        .map(|n| n.free_bytes)
        .ok_or_else(|| GuestError::Hog(format!("node {node} is not online")))
}

/// The kernel's count of OOM kills so far (`oom_kill` in /proc/vmstat).
pub fn oom_kills(vmstat: &str) -> Option<u64> {
    vmstat.lines().find_map(|l| {
        let (key, value) = l.split_once(' ')?;
        (key == "oom_kill").then(|| value.trim().parse().ok())?
    })
}

fn read_oom_kills() -> Option<u64> {
    oom_kills(&fs::read_to_string("/proc/vmstat").ok()?)
}

/// The figures of `node` that decide whether it can take more, for the detail.
fn room(node: NodeId) -> Result<NodeRoom, GuestError> {
    Ok(NodeRoom::read(node).map_err(MemoryError::from)?)
}

fn room_json(room: &NodeRoom) -> Value {
    json!({
        "free_kib": room.free >> 10,
        "free_pcp_kib": room.free_pcp >> 10,
        "available_kib": room.available() >> 10,
        "watermark_high_kib": room.watermark_high >> 10,
        "file_cache_kib": room.file_cache >> 10,
    })
}

/// Populates anonymous memory bound to `node` until the node's MemFree is down to its
/// `high` watermark plus `headroom` bytes. Returns the mapping (which holds the memory) and
/// what it did.
fn fill_node(node: NodeId, headroom: u64) -> Result<(Mmap, Value), GuestError> {
    let topology = Topology::read().map_err(MemoryError::from)?;
    let total = topology
        .node(node)
        .ok_or_else(|| GuestError::Hog(format!("node {node} is not online")))?
        .total_bytes;
    let free_before = node_free(node)?;
    let len = usize::try_from(total).map_err(|_| GuestError::Hog("node too large".into()))?;
    let map = Mmap::anonymous(len).map_err(|source| GuestError::Mmap {
        what: "hog",
        len,
        source,
    })?;
    bind(&map, node.0, 0).map_err(|source| GuestError::Mbind {
        node: node.0,
        source,
    })?;
    let high = room(node)?.watermark_high;
    let leave = high + headroom;
    let page = page_size() as u64;
    let mut filled = 0u64;
    loop {
        let excess = node_free(node)?.saturating_sub(leave);
        if excess < HOG_SLACK {
            break;
        }
        let step = (excess.min(HOG_STEP) / page * page).min(total - filled);
        if step == 0 {
            break;
        }
        map.populate_write(filled as usize, step as usize)
            .map_err(|source| GuestError::Mmap {
                what: "hog populate",
                len: step as usize,
                source,
            })?;
        filled += step;
    }
    let report = json!({
        "node": node,
        "free_before_kib": free_before >> 10,
        "filled_kib": filled >> 10,
        "free_after_kib": node_free(node)? >> 10,
        "high_watermark_kib": high >> 10,
        "goal_free_kib": leave >> 10,
    });
    Ok((map, report))
}

/// `gmem-lab hog`: fills `node` until `headroom_kib` are free above its `high` watermark,
/// prints one JSON line on stdout, holds the memory until stdin closes, then exits. Run by
/// `full-node` as a child process.
pub fn hog(node: u32, headroom_kib: u64) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match fill_node(NodeId(node), headroom_kib << 10) {
        Ok((map, report)) => {
            if writeln!(out, "{report}")
                .and_then(|()| out.flush())
                .is_err()
            {
                return ExitCode::from(3);
            }
            // Hold the memory until the test is done with the full node.
            let _ = std::io::stdin().lines().count();
            drop(map);
            ExitCode::SUCCESS
        }
        Err(e) => {
            let line = json!({ "error": crate::report::error_chain(&e) });
            let _ = writeln!(out, "{line}");
            ExitCode::from(1)
        }
    }
}

/// The hog child: killed if the agent dies, freed when dropped.
struct Hog {
    child: Child,
}

impl Hog {
    fn start(node: NodeId, headroom: u64) -> Result<(Self, Value), GuestError> {
        let exe = std::env::current_exe().map_err(|source| GuestError::Spawn {
            command: "gmem-lab hog".into(),
            source,
        })?;
        let command = format!(
            "{} hog --node {node} --headroom-kib {}",
            exe.display(),
            headroom >> 10
        );
        let mut cmd = Command::new(&exe);
        cmd.args([
            "hog",
            "--node",
            &node.to_string(),
            "--headroom-kib",
            &(headroom >> 10).to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
        gmem::sys::process::kill_with_parent(&mut cmd);
        let mut child = cmd.spawn().map_err(|source| GuestError::Spawn {
            command: command.clone(),
            source,
        })?;
        let stdout: Option<ChildStdout> = child.stdout.take();
        let mut line = String::new();
        if let Some(stdout) = stdout {
            BufReader::new(stdout)
                .read_line(&mut line)
                .map_err(|source| GuestError::Output {
                    command: command.clone(),
                    source,
                })?;
        }
        let hog = Hog { child };
        let report: Value = serde_json::from_str(line.trim())
            .map_err(|e| GuestError::Hog(format!("`{command}` printed `{line}`: {e}")))?;
        if let Some(error) = report.get("error") {
            return Err(GuestError::Hog(format!("`{command}` failed: {error}")));
        }
        Ok((hog, report))
    }

    /// Whether the hog still runs (an OOM kill would have ended it).
    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Frees the hog's memory: closes its stdin and reaps it. Returns how it ended, and
    /// whether that was a clean exit.
    fn free(mut self) -> (String, bool) {
        drop(self.child.stdin.take());
        match self.child.wait() {
            Ok(status) => (status.to_string(), status.success()),
            Err(e) => (format!("wait failed: {e}"), false),
        }
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether a failed step's reason says the target could not supply the memory.
pub fn names_out_of_memory(reason: &str) -> bool {
    [
        "cannot supply",
        "Cannot allocate memory",
        "ENOMEM",
        "No space left",
    ]
    .iter()
    .any(|k| reason.contains(k))
}

/// What is wrong with a migration to a full node: it must be partial (some pages moved,
/// not all), and its first failure a clean refusal for lack of memory.
pub fn partial_move_problems(report: &MigrationReport) -> Vec<String> {
    let mut problems = Vec::new();
    let m = report.mechanism;
    if report.complete {
        problems.push(format!(
            "{m}: the migration to the full node completed ({} of {} pages)",
            report.pages_moved, report.pages_planned
        ));
    }
    if report.pages_moved >= report.pages_planned {
        problems.push(format!(
            "{m}: moved {} of {} planned pages: not a partial move",
            report.pages_moved, report.pages_planned
        ));
    }
    if report.pages_moved == 0 {
        problems.push(format!(
            "{m}: nothing moved; the hog should leave room for part of the migration"
        ));
    }
    match report.failures.first().map(|f| &f.outcome) {
        Some(StepOutcome::NotAttempted { reason } | StepOutcome::Restored { reason, .. })
            if names_out_of_memory(reason) => {}
        Some(other) => problems.push(format!(
            "{m}: the first failed step is {other:?}, not a refusal for lack of memory"
        )),
        None => problems.push(format!("{m}: no failed step reported")),
    }
    problems
}

/// The evidence of one migration, for the detail.
fn summary(report: &MigrationReport) -> Value {
    json!({
        "complete": report.complete,
        "pages_planned": report.pages_planned,
        "pages_moved": report.pages_moved,
        "pages_not_moved": report.pages_not_moved,
        "steps": report.steps,
        "content_checks": report.content_checks,
        "content_mismatches": report.content_mismatches,
        "pages_before": report.before,
        "pages_after": report.after,
        "first_failure": report.failures.first().map(|f| json!({
            "guest_offset": f.guest_offset,
            "len": f.len,
            "outcome": f.outcome,
        })),
        "failed_steps": report.failures.len(),
        "notes": report.notes,
    })
}

/// `full-node`: node 1 is filled by a hog until less is free than the migration needs;
/// remap and refault to node 1 must each stop partway, report the refusal, lose no byte,
/// and kill nothing.
pub fn full_node() -> Result<Verdict, GuestError> {
    let topology = Topology::read().map_err(MemoryError::from)?;
    for node in [HOME, FULL] {
        if topology.node(node).is_none_or(|n| n.total_bytes == 0) {
            return Ok(Verdict {
                status: Status::Fail,
                detail: json!({ "error": format!("node {node} is missing or has no memory") }),
            });
        }
    }
    let kvm = gmem::sys::kvm::open(std::path::Path::new(DEFAULT_KVM_DEVICE))?;
    // Guest memory in a VM of its own, filled with the seed pattern on node 0, laid out for
    // the mechanism.
    let seeded = |mechanism| -> Result<GuestMemory, GuestError> {
        let vm = Arc::new(gmem::sys::kvm::create_vm(&kvm)?);
        let flags = GuestMemfd::host_mappable_flags(&vm).ok_or(MemoryError::NotHostMappable {
            flags: GuestMemfd::supported_flags(&vm).unwrap_or_default(),
        })?;
        let layout = match mechanism {
            MechanismKind::Remap => ChunkLayout::chunked(GUEST, CHUNK, 1),
            _ => ChunkLayout::single_slot(GUEST),
        };
        let memory = GuestMemory::create(vm, layout, flags)?;
        memory.bind_to_vm()?;
        let home = Policy::Bind(NodeMask::single(HOME));
        memory.set_policy(GmemOffset(0), memory.gmem().size(), &home)?;
        fill_seed_pattern(&memory)?;
        Ok(memory)
    };
    let mechanisms = [MechanismKind::Remap, MechanismKind::Refault];
    // Both are made and filled before node 1 fills up.
    let memories = mechanisms
        .iter()
        .map(|&m| seeded(m))
        .collect::<Result<Vec<_>, _>>()?;
    let mut problems = Vec::new();
    for (memory, m) in memories.iter().zip(mechanisms) {
        let placed = memory.guest_placement()?;
        if !placed.all_on(HOME) {
            problems.push(format!(
                "{m}: the seeded memory is not all on node {HOME}: {:?}",
                placed.per_node()
            ));
        }
    }
    let oom_before = read_oom_kills();
    let room_before = room(FULL)?;
    let mut runs = Vec::new();
    for (memory, m) in memories.into_iter().zip(mechanisms) {
        // A hog per mechanism: what a migration frees on node 1 lingers on per-CPU lists
        // that MemFree does not show, so each one starts from a freshly filled node.
        let (mut hog, hog_report) = Hog::start(FULL, HEADROOM)?;
        let room_full = room(FULL)?;
        if room_full.available() >= GUEST {
            problems.push(format!(
                "{m}: the hog left {} KiB available on node {FULL}: not less than the {} KiB \
                 the migration needs",
                room_full.available() >> 10,
                GUEST >> 10
            ));
        }
        let request = MigrationRequest {
            mechanism: MechanismChoice::Exactly(m),
            // Whole 4 MiB refault batches: the point here is the full node, not the budget.
            max_stop: Duration::from_secs(1),
            ..MigrationRequest::new(PlacementPolicy::Bind(FULL))
        };
        let result = Migrator::new(&memory, &NothingToQuiesce).migrate(&request);
        let hog_alive = hog.alive();
        let mismatch = first_seed_mismatch(&memory)?;
        let room_at_end = room(FULL)?;
        let mut run = json!({
            "mechanism": m,
            "hog": hog_report,
            "node1_full": room_json(&room_full),
            "node1_after_migration": room_json(&room_at_end),
            "hog_alive_after_migration": hog_alive,
            "first_bad_page": mismatch,
        });
        match result {
            Ok(report) => {
                problems.extend(partial_move_problems(&report));
                run["report"] = summary(&report);
            }
            Err(e) => {
                let chain = crate::report::error_chain(&e);
                problems.push(format!(
                    "{m}: the migration failed instead of stopping: {chain}"
                ));
                run["error"] = json!(chain);
            }
        }
        if let Some(page) = mismatch {
            problems.push(format!("{m}: guest page {page} lost its bytes"));
        }
        if !hog_alive {
            problems.push(format!(
                "{m}: the hog died during the migration (OOM killer?)"
            ));
        }
        let (hog_exit, hog_ok) = hog.free();
        if !hog_ok {
            problems.push(format!("{m}: the hog ended badly: {hog_exit}"));
        }
        run["hog_exit"] = json!(hog_exit);
        // Dropping the memory frees what it took on node 1.
        drop(memory);
        run["node1_after_hog"] = room_json(&room(FULL)?);
        runs.push(run);
    }
    let oom_after = read_oom_kills();
    if oom_before != oom_after {
        problems.push(format!(
            "the OOM killer ran: oom_kill went from {oom_before:?} to {oom_after:?}"
        ));
    }
    Ok(Verdict {
        status: Status::pass_if(problems.is_empty()),
        detail: json!({
            "guest_bytes": GUEST,
            "headroom_left_by_hog": HEADROOM,
            "node1_before": room_json(&room_before),
            "migrations": runs,
            "oom_kills": { "before": oom_before, "after": oom_after },
            "problems": problems,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_oom_kill_counter() {
        assert_eq!(oom_kills("pgfault 12\noom_kill 3\nnuma_hit 4\n"), Some(3));
        assert_eq!(oom_kills("pgfault 12\n"), None);
    }

    #[test]
    fn recognises_out_of_memory_reasons() {
        assert!(names_out_of_memory(
            "node 1 cannot supply 2048 KiB: Cannot allocate memory (os error 12)"
        ));
        assert!(!names_out_of_memory("content hash differs after the swap"));
    }
}
