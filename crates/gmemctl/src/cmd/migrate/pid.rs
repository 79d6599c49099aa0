//! `gmemctl migrate --pid PID`: move the guest memory of any VMM from outside, reached only
//! through its PID: its guest_memfd files are taken with pidfd_getfd and moved through
//! gmemctl's own mapping of them by the same engine, verification and report as
//! `migrate --api-sock`, with the VMM's threads stopped for each batch that needs it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use gmem::foreign::{FoundState, Journal, StopMethod, VmmStop};
use gmem::memory::{AttachedGmem, GuestMemfd};
use gmem::migrate::{
    BatchPoint, ForeignMemory, MechanismChoice, MechanismKind, MigrateError, MigrationReport,
    MigrationRequest, Migrator, PlacementPolicy, Progress,
};
use gmem::numa::NumaMaps;
use serde::Serialize;
use signal_hook::consts::{SIGINT, SIGTERM};
use vmm::api::MigrateBody;

use super::{Args, ProgressBar, render_outcome, render_report, request_text, row};
use crate::error::CliError;
use crate::table::mib;

/// Test hook: the batch point at which gmemctl kills itself (SIGKILL), to prove that the
/// journal and `gmemctl recover` lose nothing.
const KILL_AT_VARIABLE: &str = "GMEMCTL_TEST_KILL_AT";

/// One guest_memfd moved.
#[derive(Debug, Serialize)]
struct GmemMigration {
    /// The VMM's descriptor numbers for it.
    fds: Vec<i32>,
    inode: u64,
    size_bytes: u64,
    report: MigrationReport,
}

/// Whether the VMM's future allocations land where the migration put its memory.
#[derive(Debug, Serialize)]
struct FutureAllocations {
    /// `true` where the VMM's own mapping shows the new policy, `false` where it shows
    /// that they will not, `null` where it cannot be told.
    on_target: Option<bool>,
    /// The running kernel's release.
    kernel: String,
    /// The policies of the VMM's own mappings of the moved guest_memfds after the move, as
    /// its numa_maps prints them.
    vmm_mapping_policies: Vec<String>,
    /// Why, in one sentence.
    explanation: String,
}

/// The whole result.
#[derive(Debug, Serialize)]
struct PidMigration {
    pid: u32,
    request: MigrateBody,
    /// How the VMM was stopped for the batches that needed it.
    stop_method: StopMethod,
    /// Its state when gmemctl came; it is left in it.
    found: FoundState,
    guest_memfds: Vec<GmemMigration>,
    future_allocations: FutureAllocations,
    /// A SIGINT or SIGTERM ended the migration early, after the step in flight.
    interrupted: bool,
    /// Every planned page of every guest_memfd moved and verified.
    complete: bool,
}

/// Moves the guest memory of process `pid`.
pub(super) fn run(kvm_device: &Path, pid: u32, args: &Args) -> Result<(), CliError> {
    let body = args.body();
    let request = body
        .validate()
        .map_err(|e| CliError::InvalidArgument(e.sentence()))?;
    let kill_at = match std::env::var(KILL_AT_VARIABLE) {
        Ok(point) => Some(
            point
                .parse::<BatchPoint>()
                .map_err(|e| CliError::InvalidArgument(format!("{KILL_AT_VARIABLE}: {e}")))?,
        ),
        Err(_) => None,
    };
    // What an earlier gmemctl left behind comes first: its batch back, the VMM resumed.
    if let Some(recovered) = gmem::foreign::recover(&args.journal_dir, pid)? {
        eprintln!(
            "{}",
            crate::cmd::recover::describe(&recovered, &args.journal_dir)
        );
    }
    let kvm = gmem::sys::kvm::open(kvm_device)?;
    let attached = AttachedGmem::attach_all(pid, GuestMemfd::kernel_flags(&kvm))?;
    if attached.is_empty() {
        return Err(CliError::NoGuestMemfd { pid });
    }
    let chosen = choose(pid, &attached, &args.fd)?;
    for gmem in &chosen {
        if gmem.mapped().is_err() {
            return Err(CliError::Refused(not_host_mappable(pid, gmem, &attached)));
        }
    }
    // The kernel's own migration needs no stop; everything else stops the VMM's threads,
    // which keeps its guest memory still only if nothing else reaches it.
    if request.mechanism != MechanismChoice::Exactly(MechanismKind::Native) {
        let hazards =
            gmem::foreign::hazards(pid, &chosen).map_err(|source| CliError::ReadProc {
                what: format!("the open files of process {pid} and of every other process"),
                source,
            })?;
        if !hazards.is_empty() {
            return Err(CliError::Refused(
                hazards
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n"),
            ));
        }
    }
    let stopper = VmmStop::new(pid)?;
    if stopper.found() != FoundState::Running {
        eprintln!(
            "process {pid} was {} when gmemctl came: it is moved as it is and left so",
            if stopper.found() == FoundState::Frozen {
                "frozen"
            } else {
                "stopped"
            }
        );
    }
    // Scratch gmem (refault's reservations, the native probe) lives in a VM of our own.
    let scratch_vm = Arc::new(gmem::sys::kvm::create_vm(&kvm)?);
    let mut journal = Journal::begin(&args.journal_dir, &stopper, args.journal_sync.into())?;
    journal.kill_at(kill_at);
    // The first SIGINT or SIGTERM ends the migration after the step in flight, the VMM
    // resumed and every byte in place; a second one exits at once, and a batch in flight
    // then stays in the journal for `gmemctl recover`.
    let interrupt = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&interrupt))
            .and_then(|_| signal_hook::flag::register(signal, Arc::clone(&interrupt)))
            .map_err(CliError::InstallSignalHandler)?;
    }
    let moved = migrate_each(
        pid,
        &chosen,
        &stopper,
        &journal,
        &scratch_vm,
        &request,
        &interrupt,
    );
    let journal_removed = journal.finish()?;
    let moved = match moved {
        Ok(moved) => moved,
        Err(e) if !journal_removed => {
            eprintln!(
                "gmemctl: a batch of process {pid}'s memory is left in the journal in {}: run \
                 gmemctl recover --pid {pid} --journal-dir {} once the cause below is fixed",
                args.journal_dir.display(),
                args.journal_dir.display()
            );
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    let future_allocations = future_allocations(pid, &request, &attached, &moved);
    let all_moved = moved.len() == chosen.len()
        && moved
            .iter()
            .all(|m| m.report.complete && m.report.content_mismatches == 0);
    // A signal during the last step ends nothing early: that move is complete.
    let interrupted = interrupt.load(Ordering::Relaxed) && !all_moved;
    let complete = all_moved;
    let result = PidMigration {
        pid,
        request: body,
        stop_method: stopper.method().clone(),
        found: stopper.found(),
        guest_memfds: moved,
        future_allocations,
        interrupted,
        complete,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        print!("{}", render(&result));
    }
    if complete {
        Ok(())
    } else {
        Err(CliError::CheckFailed(format!(
            "the migration of process {pid} is incomplete{}: {}",
            if interrupted {
                " (stopped on request: SIGINT or SIGTERM)"
            } else {
                ""
            },
            result
                .guest_memfds
                .iter()
                .map(|m| format!(
                    "fd {}: {} of {} planned pages moved, {} content mismatches",
                    m.fds[0],
                    m.report.pages_moved,
                    m.report.pages_planned,
                    m.report.content_mismatches
                ))
                .collect::<Vec<_>>()
                .join("; ")
        )))
    }
}

/// Moves each chosen gmem in turn, every refault batch journalled.
fn migrate_each(
    pid: u32,
    chosen: &[&AttachedGmem],
    stopper: &VmmStop,
    journal: &Journal,
    scratch_vm: &Arc<kvm_ioctls::VmFd>,
    request: &MigrationRequest,
    interrupt: &AtomicBool,
) -> Result<Vec<GmemMigration>, MigrateError> {
    let mut moved = Vec::new();
    for &gmem in chosen {
        if interrupt.load(Ordering::Relaxed) {
            break;
        }
        let memory = ForeignMemory::new(gmem, Arc::clone(scratch_vm));
        let gmem_journal = journal.for_gmem(gmem);
        let bar = Mutex::new(ProgressBar::new(format!(
            "process {pid} fd {}",
            gmem.fds()[0]
        )));
        let progress = |p: &Progress| {
            lock(&bar).update(p.pages_moved, p.pages_planned, p.mechanism);
        };
        let result = Migrator::over(&memory, stopper)
            .with_journal(&gmem_journal)
            .with_progress(&progress)
            .with_stop_request(interrupt)
            .migrate(request);
        lock(&bar).finish();
        let report = result?;
        lock(&bar).update(report.pages_moved, report.pages_planned, report.mechanism);
        lock(&bar).finish();
        moved.push(GmemMigration {
            fds: gmem.fds().to_vec(),
            inode: gmem.inode(),
            size_bytes: gmem.size(),
            report,
        });
    }
    Ok(moved)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The guest_memfds `--fd` names (every one without it), in descriptor order.
fn choose<'a>(
    pid: u32,
    attached: &'a [AttachedGmem],
    fds: &[i32],
) -> Result<Vec<&'a AttachedGmem>, CliError> {
    if fds.is_empty() {
        return Ok(attached.iter().collect());
    }
    let mut chosen: Vec<&AttachedGmem> = Vec::new();
    for &fd in fds {
        let gmem = attached
            .iter()
            .find(|g| g.fds().contains(&fd))
            .ok_or_else(|| {
                CliError::InvalidArgument(format!(
                    "process {pid} has no guest_memfd at fd {fd}; its guest_memfds are at fd {}",
                    all_fds(attached)
                ))
            })?;
        if !chosen.iter().any(|c| c.inode() == gmem.inode()) {
            chosen.push(gmem);
        }
    }
    Ok(chosen)
}

fn all_fds(attached: &[AttachedGmem]) -> String {
    attached
        .iter()
        .map(|g| g.fds()[0].to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The refusal sentence for a guest_memfd the host must not read.
fn not_host_mappable(pid: u32, gmem: &AttachedGmem, attached: &[AttachedGmem]) -> String {
    let others: Vec<String> = attached
        .iter()
        .filter(|g| g.mapped().is_ok())
        .map(|g| g.fds()[0].to_string())
        .collect();
    format!(
        "refusing to move the guest_memfd at fd {} of process {pid}: it is not host-mappable \
         (flags {}), so it is confidential or private guest memory that the host must never \
         read or copy{}",
        gmem.fds()[0],
        gmem.flags(),
        if others.is_empty() {
            String::new()
        } else {
            format!(
                "; to move the others, name them with --fd ({})",
                others.join(", ")
            )
        }
    )
}

/// Whether the VMM's next allocations follow the move, as far as this host can tell: the
/// policy is set through gmemctl's mapping; it reaches the VMM (and KVM's faults for its
/// guest) only where the kernel keeps it per inode, which the VMM's own numa_maps shows.
fn future_allocations(
    pid: u32,
    request: &MigrationRequest,
    attached: &[AttachedGmem],
    moved: &[GmemMigration],
) -> FutureAllocations {
    let kernel = gmem::memory::kernel_release();
    let per_inode = gmem::memory::policy_is_per_inode(&kernel).unwrap_or(false);
    let numa_maps = NumaMaps::read(pid).ok();
    let vmm_mapping_policies: Vec<String> = attached
        .iter()
        .filter(|g| moved.iter().any(|m| m.inode == g.inode()))
        .flat_map(|g| g.vmm_mappings())
        .filter_map(|m| numa_maps.as_ref()?.at(m.start).map(|n| n.policy.clone()))
        .collect();
    let wanted = match &request.policy {
        PlacementPolicy::Bind(node) => Some(format!("bind:{node}")),
        PlacementPolicy::Drain(node) => {
            return FutureAllocations {
                on_target: None,
                kernel,
                vmm_mapping_policies,
                explanation: format!(
                    "drain sets no policy for the pages it leaves: future allocations follow \
                     the VMM's own policy, which may put them on node {node} again"
                ),
            };
        }
        PlacementPolicy::Interleave(_) | PlacementPolicy::Follow(_) => None,
    };
    let shown = |p: &String| match &wanted {
        Some(wanted) => p == wanted,
        None => p != "default",
    };
    let policy_home = if per_inode {
        "this kernel keeps a guest_memfd's policy per inode"
    } else {
        "this kernel keeps a guest_memfd's policy per mapping (per inode only from 6.19)"
    };
    let (on_target, explanation) = if vmm_mapping_policies.is_empty() {
        if per_inode {
            (
                None,
                format!(
                    "policy set through gmemctl's mapping; {policy_home}, so the VMM's future \
                     faults should follow it, but the VMM maps none of this memory, so that \
                     cannot be confirmed here"
                ),
            )
        } else {
            (
                Some(false),
                format!(
                    "policy set through gmemctl's mapping only; {policy_home}, so the VMM's \
                     future faults (its guest's, through KVM) follow the VMM's own policy"
                ),
            )
        }
    } else if vmm_mapping_policies.iter().all(shown) {
        (
            Some(true),
            format!(
                "policy set through gmemctl's mapping; {policy_home}, and the VMM's own \
                 mapping now shows {}, so its future faults land on the target",
                vmm_mapping_policies.join(", ")
            ),
        )
    } else {
        (
            Some(false),
            format!(
                "policy set through gmemctl's mapping; {policy_home}, and the VMM's own \
                 mapping still shows {}, so the VMM's future faults (its guest's, through KVM) \
                 follow the VMM's own policy",
                vmm_mapping_policies.join(", ")
            ),
        )
    };
    FutureAllocations {
        on_target,
        kernel,
        vmm_mapping_policies,
        explanation,
    }
}

fn render(result: &PidMigration) -> String {
    let mut out = format!(
        "process {} {}: {}\n",
        result.pid,
        if result.complete {
            "moved"
        } else {
            "incomplete"
        },
        request_text(&result.request)
    );
    out += &row(
        "stopped with",
        format!(
            "{}{}",
            result.stop_method,
            match result.found {
                FoundState::Running => String::new(),
                found => format!(
                    " (found {}; left so)",
                    if found == FoundState::Frozen {
                        "frozen"
                    } else {
                        "stopped"
                    }
                ),
            }
        ),
    );
    for gmem in &result.guest_memfds {
        out += &format!(
            "guest_memfd at fd {} (inode {}, {}):\n",
            gmem.fds
                .iter()
                .map(i32::to_string)
                .collect::<Vec<_>>()
                .join(","),
            gmem.inode,
            mib(gmem.size_bytes)
        );
        out += &render_report(&gmem.report);
        out += &render_outcome(&gmem.report);
    }
    let future = &result.future_allocations;
    out += &row(
        "future allocations",
        format!(
            "{}: {}",
            match future.on_target {
                Some(true) => "on the target",
                Some(false) => "not on the target",
                None => "unknown",
            },
            future.explanation
        ),
    );
    out
}
