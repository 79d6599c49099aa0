//! The migration engine on the real /dev/kvm: every mechanism under writer load, failures
//! that restore, a memory cgroup that runs out, confidential refusal, and a proptest.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use gmem::memory::{
    ChunkIndex, ChunkLayout, GmemFlags, GmemOffset, GuestAddress, GuestMemfd, GuestMemory, Policy,
    page_size,
};
use gmem::migrate::{
    ContentCheck, ContentCopier, CopierError, CopyOutcome, InjectedFailure, MechanismChoice,
    MechanismKind, MigrateError, MigrationReport, MigrationRequest, Migrator, NothingToQuiesce,
    PlacementPolicy, RestoredTo, StepOutcome,
};
use gmem::numa::{NodeId, NodeMask, Topology};
use gmem::testing::{self, Writers, can_read_pfns, kvm_or_skip};
use proptest::prelude::*;

const MIB: u64 = 1 << 20;

fn home_node() -> NodeId {
    Topology::read().unwrap().nodes[0].id
}

fn fill_seed_pattern(mem: &GuestMemory) {
    testing::fill_seed_pattern(mem).unwrap();
}

fn first_bad_page(mem: &GuestMemory) -> Option<u64> {
    testing::first_seed_mismatch(mem).unwrap()
}

fn relocate(mechanism: MechanismKind) -> MigrationRequest {
    MigrationRequest {
        mechanism: MechanismChoice::Exactly(mechanism),
        relocate_in_place: true,
        ..MigrationRequest::new(PlacementPolicy::Bind(home_node()))
    }
}

fn assert_verified(report: &MigrationReport) {
    assert!(report.complete, "incomplete: {report:#?}");
    assert_eq!(report.pages_moved, report.pages_planned);
    assert_eq!(report.content_mismatches, 0);
    assert_eq!(report.content_checks, report.steps);
    if can_read_pfns() {
        assert_eq!(
            report.pfns_changed, report.pfns_checked,
            "every relocated page needs a new frame"
        );
        assert!(report.pfns_checked.unwrap() > 0);
    }
}

fn under_writers(mechanism: MechanismKind, layout: ChunkLayout) {
    let name = format!("{mechanism}_under_writers");
    let Some((_kvm, vm)) = kvm_or_skip(&name) else {
        return;
    };
    let mem = Arc::new(GuestMemory::create(vm, layout, GmemFlags::HOST_MAPPABLE).unwrap());
    mem.bind_to_vm().unwrap();
    mem.populate(GmemOffset(0), layout.guest_size).unwrap();
    let writers = Writers::start(mem.clone(), 2);
    while writers.pages_verified() < layout.guest_size / page_size() {
        std::thread::yield_now(); // one full write+verify sweep before moving
    }
    let done_before = writers.pages_done();
    let report = Migrator::new(&mem, &writers)
        .migrate(&relocate(mechanism))
        .unwrap();
    let progressed = writers.pages_done() - done_before;
    let (mismatches, _) = writers.stop();
    assert_eq!(report.mechanism, mechanism);
    assert_eq!(report.pages_planned, layout.guest_size / page_size());
    assert_verified(&report);
    assert_eq!(mismatches, 0, "writers saw lost or torn data");
    assert!(
        progressed > 0,
        "writers made no progress during the migration"
    );
    if mechanism == MechanismKind::Remap {
        // The phases account for the whole stop (each lap is truncated to whole us).
        let phases = report
            .stop_phases
            .expect("remap times its stops phase by phase");
        assert_eq!(phases.copy.count, report.stops.count);
        let parts = [
            phases.entry,
            phases.copy,
            phases.swap,
            phases.check,
            phases.prefault,
        ];
        let sum: u64 = parts.iter().map(|p| p.total_us).sum();
        let slack = report.stops.total_us / 20 + 6 * report.stops.count;
        assert!(
            sum.abs_diff(report.stops.total_us) <= slack,
            "phases sum to {sum} us, the stops to {} us",
            report.stops.total_us
        );
        eprintln!("remap stops by phase, p50/p99: {phases}");
    } else {
        assert_eq!(report.stop_phases, None);
    }
    eprintln!(
        "{mechanism}: {} pages in {} steps, stop p50 {} us p99 {} us max {} us, {:.2} GB/s",
        report.pages_moved,
        report.steps,
        report.stops.p50_us,
        report.stops.p99_us,
        report.stops.max_us,
        report.throughput_gbps
    );
}

#[test]
fn remap_relocates_under_writer_load() {
    under_writers(
        MechanismKind::Remap,
        ChunkLayout::chunked(32 * MIB, 2 * MIB, 2),
    );
}

#[test]
fn refault_relocates_under_writer_load() {
    under_writers(MechanismKind::Refault, ChunkLayout::single_slot(16 * MIB));
}

#[test]
fn native_reports_its_absence_honestly() {
    let Some((_kvm, vm)) = kvm_or_skip("native_reports_its_absence_honestly") else {
        return;
    };
    let topology = Topology::read().unwrap();
    let mem = GuestMemory::create(
        vm,
        ChunkLayout::single_slot(4 * MIB),
        GmemFlags::HOST_MAPPABLE,
    )
    .unwrap();
    fill_seed_pattern(&mem);
    let err = Migrator::new(&mem, &NothingToQuiesce)
        .migrate(&relocate(MechanismKind::Native))
        .unwrap_err();
    assert!(
        err.to_string().contains("cannot relocate within a node"),
        "{err}"
    );
    let memory_nodes: Vec<NodeId> = topology
        .nodes
        .iter()
        .filter(|n| n.total_bytes > 0)
        .map(|n| n.id)
        .collect();
    if let [_, other, ..] = memory_nodes[..] {
        // Two nodes: the kernel either moves the folios (our series) or is caught refusing.
        let request = MigrationRequest {
            mechanism: MechanismChoice::Exactly(MechanismKind::Native),
            ..MigrationRequest::new(PlacementPolicy::Bind(other))
        };
        match Migrator::new(&mem, &NothingToQuiesce).migrate(&request) {
            Ok(report) => assert_verified(&report),
            Err(MigrateError::NativeUnsupported { evidence }) => {
                assert!(evidence.contains("unmoved"), "{evidence}")
            }
            Err(e) => panic!("unexpected: {e}"),
        }
    } else {
        eprintln!("native cross-node move not tried: one node (the lab covers it)");
    }
    assert_eq!(first_bad_page(&mem), None);
}

#[test]
fn auto_picks_remap_with_spares_and_refault_without() {
    let Some((_kvm, vm)) = kvm_or_skip("auto_picks_remap_with_spares_and_refault_without") else {
        return;
    };
    let topology = Topology::read().unwrap();
    let request = MigrationRequest {
        relocate_in_place: true,
        ..MigrationRequest::new(PlacementPolicy::Bind(home_node()))
    };
    let chunked = GuestMemory::create(
        vm.clone(),
        ChunkLayout::chunked(4 * MIB, 2 * MIB, 1),
        GmemFlags::HOST_MAPPABLE,
    )
    .unwrap();
    let single = GuestMemory::create(
        vm,
        ChunkLayout::single_slot(4 * MIB),
        GmemFlags::HOST_MAPPABLE,
    )
    .unwrap();
    assert_eq!(
        Migrator::new(&chunked, &NothingToQuiesce)
            .choose(&request, &topology)
            .unwrap(),
        MechanismKind::Remap
    );
    assert_eq!(
        Migrator::new(&single, &NothingToQuiesce)
            .choose(&request, &topology)
            .unwrap(),
        MechanismKind::Refault
    );
    let remap = MigrationRequest {
        mechanism: MechanismChoice::Exactly(MechanismKind::Remap),
        ..request
    };
    let err = Migrator::new(&single, &NothingToQuiesce)
        .migrate(&remap)
        .unwrap_err();
    assert!(
        err.is_user_error() && err.to_string().contains("no free spare chunk"),
        "{err}"
    );
}

#[test]
fn a_range_already_in_place_moves_nothing() {
    let Some((_kvm, vm)) = kvm_or_skip("a_range_already_in_place_moves_nothing") else {
        return;
    };
    let mem = GuestMemory::create(
        vm,
        ChunkLayout::chunked(8 * MIB, 2 * MIB, 1),
        GmemFlags::HOST_MAPPABLE,
    )
    .unwrap();
    fill_seed_pattern(&mem);
    let offsets = mem.chunk_offsets();
    let report = Migrator::new(&mem, &NothingToQuiesce)
        .migrate(&MigrationRequest::new(PlacementPolicy::Bind(home_node())))
        .unwrap();
    assert!(report.complete);
    assert_eq!(
        (report.pages_planned, report.steps, report.stops.count),
        (0, 0, 0)
    );
    assert_eq!(report.pages_in_place, 8 * MIB / page_size());
    assert_eq!(mem.chunk_offsets(), offsets, "nothing may be remapped");
}

#[test]
fn a_stop_share_holds_for_the_whole_move() {
    let Some((_kvm, vm)) = kvm_or_skip("a_stop_share_holds_for_the_whole_move") else {
        return;
    };
    for (mechanism, layout) in [
        (
            MechanismKind::Remap,
            ChunkLayout::chunked(16 * MIB, 2 * MIB, 2),
        ),
        (MechanismKind::Refault, ChunkLayout::single_slot(16 * MIB)),
    ] {
        let mem = GuestMemory::create(vm.clone(), layout, GmemFlags::HOST_MAPPABLE).unwrap();
        fill_seed_pattern(&mem);
        // Small enough that an unpaced move (steps back to back) would break it.
        let share = 0.02;
        let report = Migrator::new(&mem, &NothingToQuiesce)
            .migrate(&MigrationRequest {
                max_stop_share: Some(share),
                ..relocate(mechanism)
            })
            .unwrap();
        assert_verified(&report);
        assert!(
            report.stops.count > 1,
            "{mechanism}: one stop paces nothing"
        );
        // Each step lasts at least its stop / share, counted from the end of the one before,
        // so the whole move does too.
        let floor = (report.stops.total_us as f64 / share) as u64;
        assert!(
            report.elapsed_us >= floor,
            "{mechanism}: stopped {} us in {} us, more than a {share} share",
            report.stops.total_us,
            report.elapsed_us
        );
        assert_eq!(first_bad_page(&mem), None);
    }
}

/// Runs a migration with `failure` injected and checks that nothing was lost. Returns the
/// report and the future-allocation policy of each guest chunk afterwards.
fn injected(
    mechanism: MechanismKind,
    failure: InjectedFailure,
    layout: ChunkLayout,
) -> (MigrationReport, Vec<Policy>) {
    let (_kvm, vm) = kvm_or_skip("injected failure").expect("checked by caller");
    let mem = GuestMemory::create(vm, layout, GmemFlags::HOST_MAPPABLE).unwrap();
    mem.bind_to_vm().unwrap();
    fill_seed_pattern(&mem);
    let request = MigrationRequest {
        inject: Some(failure),
        ..relocate(mechanism)
    };
    let report = Migrator::new(&mem, &NothingToQuiesce)
        .migrate(&request)
        .unwrap();
    assert_eq!(
        first_bad_page(&mem),
        None,
        "a failed step lost data: {report:#?}"
    );
    assert!(!report.complete);
    assert_eq!(report.failures.len(), 1);
    assert!(report.pages_moved < report.pages_planned);
    assert_eq!(
        report.pages_moved + report.pages_not_moved,
        report.pages_planned
    );
    let policies = mem
        .layout()
        .chunk_indices()
        .map(|chunk| mem.policy_at(mem.chunk_offset(chunk)).unwrap())
        .collect();
    (report, policies)
}

#[test]
fn failures_halfway_restore_every_byte() {
    if kvm_or_skip("failures_halfway_restore_every_byte").is_none() {
        return;
    }
    let bound = Policy::Bind(NodeMask::single(home_node()));
    let (refault, policies) = injected(
        MechanismKind::Refault,
        InjectedFailure::AllocateAfterPunch(1),
        ChunkLayout::single_slot(4 * MIB),
    );
    // Its one step did not finish: no binding to a target that may not take new pages.
    assert_eq!(policies, [Policy::Default]);
    match &refault.failures[0].outcome {
        StepOutcome::Restored { reason, to } => {
            assert_eq!(*to, RestoredTo::Original);
            assert!(reason.contains("injected failure after punch"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(refault.pages_moved > 0, "step 0 moved before step 1 failed");

    let (swap, policies) = injected(
        MechanismKind::Remap,
        InjectedFailure::SwapFails(2),
        ChunkLayout::chunked(8 * MIB, 2 * MIB, 1),
    );
    assert_eq!(swap.pages_moved, 2 * 2 * MIB / page_size());
    // Chunks 0 and 1 moved and stay bound to the target; 2 failed and 3 never started.
    assert_eq!(
        policies,
        [bound.clone(), bound, Policy::Default, Policy::Default]
    );
    assert!(matches!(
        swap.failures[0].outcome,
        StepOutcome::Restored {
            to: RestoredTo::Original,
            ..
        }
    ));

    let (corrupt, _) = injected(
        MechanismKind::Remap,
        InjectedFailure::CorruptCopy(0),
        ChunkLayout::chunked(8 * MIB, 2 * MIB, 1),
    );
    assert_eq!(corrupt.content_mismatches, 1);
    assert_eq!(corrupt.failures[0].content, ContentCheck::Mismatched);
}

/// A memory cgroup whose limit the migration runs into. The memcg charges gmem folios to
/// the *process* (its mm's owner), not the thread, so this runs in a child process: the
/// test re-executes itself with `GMEM_CGROUP_CHILD` set.
struct LimitedCgroup {
    dir: std::path::PathBuf,
}

const CGROUP_V1: &str = "/sys/fs/cgroup/memory";

impl LimitedCgroup {
    /// Moves this process into a new memory cgroup (v1, as on these hosts), unlimited yet.
    fn enter() -> Self {
        let root = std::path::Path::new(CGROUP_V1);
        assert!(
            root.join("memory.limit_in_bytes").exists(),
            "no cgroup v1 memory controller at {CGROUP_V1}: cannot limit the migration"
        );
        let dir = root.join(format!("gmem-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string()).unwrap();
        LimitedCgroup { dir }
    }

    /// Limits the cgroup to what it uses now plus `headroom`, with the OOM killer off, so
    /// that a gmem allocation that does not fit fails with ENOMEM instead of killing us.
    /// (An ordinary page fault over the limit would wait forever instead, so `headroom`
    /// keeps slack for the process's own heap and stack.)
    fn limit_to_usage_plus(&self, headroom: u64) {
        let read = |file: &str| std::fs::read_to_string(self.dir.join(file)).unwrap();
        let usage: u64 = read("memory.usage_in_bytes").trim().parse().unwrap();
        // Clean file pages (this binary's) are reclaimable: under the limit the kernel would
        // free them and hand their room to the migration. Count only what cannot go away.
        let reclaimable: u64 = read("memory.stat")
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(key, _)| matches!(*key, "active_file" | "inactive_file"))
            .map(|(_, value)| value.trim().parse::<u64>().unwrap())
            .sum();
        std::fs::write(self.dir.join("memory.oom_control"), "1").unwrap();
        let limit = usage.saturating_sub(reclaimable) + headroom;
        std::fs::write(self.dir.join("memory.limit_in_bytes"), limit.to_string()).unwrap();
        eprintln!("memcg: usage {usage}, reclaimable {reclaimable}, limit {limit}");
    }

    /// Removes the limit.
    fn unlimit(&self) {
        std::fs::write(self.dir.join("memory.limit_in_bytes"), "-1").unwrap();
    }

    fn usage_report(&self) -> String {
        let read = |file: &str| std::fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        format!(
            "memcg after: usage {}, max usage {}, failcnt {}",
            read("memory.usage_in_bytes").trim(),
            read("memory.max_usage_in_bytes").trim(),
            read("memory.failcnt").trim()
        )
    }
}

impl Drop for LimitedCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(
            std::path::Path::new(CGROUP_V1).join("cgroup.procs"),
            std::process::id().to_string(),
        );
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Child side: fill guest memory, then leave less headroom than one step needs.
fn run_out_of_memory(mechanism: MechanismKind) {
    let cgroup = LimitedCgroup::enter();
    let (_kvm, vm) = kvm_or_skip("cgroup child").expect("the parent checked KVM");
    // Slack for the process's own faults, less than one step needs.
    let (layout, headroom) = match mechanism {
        // The refault bounce buffer (4 MiB) fits, and so does the first 256 KiB batch;
        // batches then grow to the 2 MiB unit (the stop budget allows it), which does not.
        MechanismKind::Refault => (ChunkLayout::single_slot(32 * MIB), 4 * MIB + MIB),
        // A spare 8 MiB chunk does not fit.
        _ => (ChunkLayout::chunked(32 * MIB, 8 * MIB, 1), 2 * MIB),
    };
    let mem = GuestMemory::create(vm, layout, GmemFlags::HOST_MAPPABLE).unwrap();
    fill_seed_pattern(&mem);
    cgroup.limit_to_usage_plus(headroom);
    let request = MigrationRequest {
        // A budget no step can reach: batches grow to the 4 MiB cap whatever the load.
        max_stop: Duration::from_secs(60),
        ..relocate(mechanism)
    };
    let report = Migrator::new(&mem, &NothingToQuiesce)
        .migrate(&request)
        .unwrap();
    eprintln!("{}", cgroup.usage_report());
    // Lift the limit before anything else runs: over it, an ordinary fault would wait forever.
    cgroup.unlimit();
    assert_eq!(first_bad_page(&mem), None, "bytes lost: {report:#?}");
    assert!(
        !report.complete,
        "the limit should stop the migration: {report:#?}"
    );
    assert!(report.pages_moved < report.pages_planned, "{report:#?}");
    let failure = &report.failures[0];
    match &failure.outcome {
        StepOutcome::NotAttempted { reason } => {
            assert!(
                reason.contains("cannot supply") && reason.contains("Cannot allocate memory"),
                "{reason}"
            );
        }
        other => panic!("expected a clean refusal before touching the step, got {other:?}"),
    }
    eprintln!(
        "{mechanism} under a memcg limit: moved {} of {} pages, then: {:?}",
        report.pages_moved, report.pages_planned, failure.outcome
    );
}

#[test]
fn a_memory_cgroup_that_runs_out_loses_nothing() {
    const TEST: &str = "a_memory_cgroup_that_runs_out_loses_nothing";
    if let Ok(mechanism) = std::env::var("GMEM_CGROUP_CHILD") {
        let mechanism = if mechanism == "remap" {
            MechanismKind::Remap
        } else {
            MechanismKind::Refault
        };
        return run_out_of_memory(mechanism);
    }
    if kvm_or_skip(TEST).is_none() {
        return;
    }
    for mechanism in ["refault", "remap"] {
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
            .env("GMEM_CGROUP_CHILD", mechanism)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A fault over the limit would wait forever: never let that hang the suite. Its
        // output is read while it runs: a child blocked on a full pipe (a long panic
        // message) would look like that hang and hide why it failed.
        let pid = child.id().to_string();
        let (done, output) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(child.wait_with_output());
        });
        let out = match output.recv_timeout(Duration::from_secs(120)) {
            Ok(out) => out.unwrap(),
            Err(_) => {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid])
                    .status();
                output.recv().unwrap().unwrap()
            }
        };
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && log.contains("1 passed"),
            "{mechanism} child failed ({:?}):\n{log}",
            out.status
        );
        eprintln!(
            "{}",
            log.lines()
                .filter(|l| l.contains("memcg"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// A stand-in for firmware: records what it was asked and copies with its own mapping,
/// the way a firmware copy would fill the destination without the engine's help.
struct RecordingCopier {
    calls: Mutex<Vec<(GmemOffset, GmemOffset, u64)>>,
    outcome: CopyOutcome,
}

impl ContentCopier for RecordingCopier {
    fn copy(
        &self,
        gmem: &GuestMemfd,
        src: GmemOffset,
        dst: GmemOffset,
        len: u64,
    ) -> Result<CopyOutcome, CopierError> {
        self.calls.lock().unwrap().push((src, dst, len));
        if gmem.is_host_mappable() && self.outcome == CopyOutcome::Copied {
            let map = gmem.map().map_err(|e| CopierError(e.to_string()))?;
            map.copy_to(src.index(), &map, dst.index(), len as usize);
        }
        Ok(self.outcome)
    }
}

#[test]
fn confidential_memory_is_refused_without_a_copier() {
    let Some((_kvm, vm)) = kvm_or_skip("confidential_memory_is_refused_without_a_copier") else {
        return;
    };
    let mem = GuestMemory::create(
        vm,
        ChunkLayout::chunked(4 * MIB, 2 * MIB, 1),
        GmemFlags::NONE,
    )
    .unwrap();
    let err = Migrator::new(&mem, &NothingToQuiesce)
        .migrate(&relocate(MechanismKind::Remap))
        .unwrap_err();
    assert!(matches!(err, MigrateError::Confidential { .. }));
    assert!(
        err.to_string().contains("must never map or copy it"),
        "{err}"
    );

    // With a firmware-assisted copier the engine moves it and never copies by itself.
    let copier = RecordingCopier {
        calls: Mutex::new(Vec::new()),
        outcome: CopyOutcome::Copied,
    };
    let offsets = mem.chunk_offsets();
    let report = Migrator::new(&mem, &NothingToQuiesce)
        .with_copier(&copier)
        .migrate(&relocate(MechanismKind::Remap))
        .unwrap();
    assert!(report.complete, "{report:#?}");
    let calls = copier.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2);
    assert_eq!((calls[0].0, calls[0].2), (offsets[0], 2 * MIB));
    assert_ne!(
        mem.chunk_offsets(),
        offsets,
        "chunks must now live at the copier's destinations"
    );

    let declining = RecordingCopier {
        calls: Mutex::new(Vec::new()),
        outcome: CopyOutcome::NotCopied,
    };
    let report = Migrator::new(&mem, &NothingToQuiesce)
        .with_copier(&declining)
        .migrate(&relocate(MechanismKind::Remap))
        .unwrap();
    assert!(!report.complete);
    assert!(
        matches!(&report.failures[0].outcome, StepOutcome::Restored { reason, .. } if reason.contains("declined"))
    );
}

#[test]
fn a_copier_on_mappable_memory_replaces_the_engine_copy() {
    let Some((_kvm, vm)) = kvm_or_skip("a_copier_on_mappable_memory_replaces_the_engine_copy")
    else {
        return;
    };
    let mem = GuestMemory::create(
        vm,
        ChunkLayout::chunked(4 * MIB, 2 * MIB, 1),
        GmemFlags::HOST_MAPPABLE,
    )
    .unwrap();
    fill_seed_pattern(&mem);
    let copier = RecordingCopier {
        calls: Mutex::new(Vec::new()),
        outcome: CopyOutcome::Copied,
    };
    let report = Migrator::new(&mem, &NothingToQuiesce)
        .with_copier(&copier)
        .migrate(&relocate(MechanismKind::Remap))
        .unwrap();
    assert_verified(&report);
    assert_eq!(copier.calls.lock().unwrap().len(), 2);
    assert_eq!(first_bad_page(&mem), None);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    /// Random touched pages, random stop budgets (so random batch sizes), both mechanisms:
    /// every byte survives.
    #[test]
    fn content_is_always_preserved(
        touched in proptest::collection::btree_set(0u64..1024, 1..200),
        budget_us in 50u64..3000,
        use_remap in any::<bool>(),
    ) {
        let Some((_kvm, vm)) = kvm_or_skip("content_is_always_preserved") else { return Ok(()) };
        let layout = if use_remap { ChunkLayout::chunked(4 * MIB, MIB, 1) } else { ChunkLayout::single_slot(4 * MIB) };
        let mem = GuestMemory::create(vm, layout, GmemFlags::HOST_MAPPABLE).unwrap();
        mem.bind_to_vm().unwrap();
        for &page in &touched {
            mem.write_guest(GuestAddress(page * page_size()), &vec![(page % 251) as u8 + 1; page_size() as usize]).unwrap();
        }
        let mechanism = if use_remap { MechanismKind::Remap } else { MechanismKind::Refault };
        let request = MigrationRequest { max_stop: Duration::from_micros(budget_us), ..relocate(mechanism) };
        let report = Migrator::new(&mem, &NothingToQuiesce).migrate(&request).unwrap();
        prop_assert!(report.complete, "{:#?}", report);
        let mut buf = vec![0u8; page_size() as usize];
        for page in 0..1024u64 {
            mem.read_guest(GuestAddress(page * page_size()), &mut buf).unwrap();
            let want = if touched.contains(&page) { (page % 251) as u8 + 1 } else { 0 };
            prop_assert!(buf.iter().all(|&b| b == want), "page {} lost its content", page);
        }
    }
}

/// A page the guest touches for the first time after a bind must be allocated on the
/// target: the policy covers the memory it never touched, not only the moved ranges. (In
/// the lab, 4 and then 6 pages a running Linux guest first touched during a native move
/// were left on the old node.)
#[test]
fn a_bind_covers_the_memory_the_guest_never_touched() {
    let Some((_kvm, vm)) = kvm_or_skip("a_bind_covers_the_memory_the_guest_never_touched") else {
        return;
    };
    for mechanism in [MechanismKind::Remap, MechanismKind::Refault] {
        let mem = GuestMemory::create(
            vm.clone(),
            ChunkLayout::chunked(8 * MIB, 2 * MIB, 2),
            GmemFlags::HOST_MAPPABLE,
        )
        .unwrap();
        mem.bind_to_vm().unwrap();
        // The guest has touched its first chunk only, and only half of it.
        let first = mem.chunk_offset(ChunkIndex(0));
        mem.mapping()
            .unwrap()
            .fill(first.index(), MIB as usize, 0x5a);
        let report = Migrator::new(&mem, &NothingToQuiesce)
            .migrate(&relocate(mechanism))
            .unwrap();
        assert!(report.complete, "{mechanism}: {report:#?}");
        let bound = Policy::Bind(NodeMask::single(home_node()));
        for chunk in mem.layout().chunk_indices() {
            for at in [0, MIB + page_size()] {
                let offset = mem.chunk_offset(chunk) + at;
                assert_eq!(
                    mem.policy_at(offset).unwrap(),
                    bound,
                    "{mechanism}: chunk {} + {at:#x} is not bound after the move",
                    chunk.raw()
                );
            }
        }
    }
}

/// A planned migration runs as it was planned: `run` neither plans nor probes again, so
/// pages the guest touches after planning are not in it (the bind set before the move
/// places them), and the mechanism `auto` chose is the one that runs.
#[test]
fn a_planned_migration_runs_as_planned() {
    let Some((_kvm, vm)) = kvm_or_skip("a_planned_migration_runs_as_planned") else {
        return;
    };
    let mem = GuestMemory::create(
        vm,
        ChunkLayout::chunked(8 * MIB, 2 * MIB, 1),
        GmemFlags::HOST_MAPPABLE,
    )
    .unwrap();
    mem.bind_to_vm().unwrap();
    mem.write_guest(GuestAddress(0), &vec![0xA5; 4 * MIB as usize])
        .unwrap();
    let request = MigrationRequest {
        relocate_in_place: true,
        ..MigrationRequest::new(PlacementPolicy::Bind(home_node()))
    };
    let migrator = Migrator::new(&mem, &NothingToQuiesce);
    let planned = migrator.plan(&request).unwrap();
    assert_eq!(
        planned.mechanism(),
        MechanismKind::Remap,
        "auto on one node, with a spare"
    );
    let pages = 4 * MIB / page_size();
    assert_eq!(planned.plan().pages_to_move, pages);
    // Touched after planning: not part of this migration.
    mem.write_guest(GuestAddress(6 * MIB), &vec![0x5A; MIB as usize])
        .unwrap();
    let report = migrator.run(planned).unwrap();
    assert_eq!(report.mechanism, MechanismKind::Remap);
    assert_eq!(report.pages_planned, pages);
    assert_verified(&report);
    let zero_stop = MigrationRequest {
        max_stop: Duration::ZERO,
        ..request
    };
    assert!(matches!(
        migrator.plan(&zero_stop),
        Err(MigrateError::InvalidRequest(_))
    ));
}
