//! The VM on the real /dev/kvm: the guest runs and checks its memory, pauses really stop it,
//! chunks can be remapped under it without a lost word, and a corrupted word is caught.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gmem::memory::{ChunkIndex, GuestAddress};
use gmem::migrate::{Paused, Quiesce};
use vmm::{LatencyHistogram, Metrics, Vm, VmConfig, VmError, VmState};

/// One VM at a time: the machine has two cores, and the measurements printed here mean
/// something only when VMs do not compete with each other.
fn one_vm_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn start(test: &str, config: VmConfig) -> Option<(MutexGuard<'static, ()>, Vm)> {
    gmem::testing::kvm_or_skip(test)?;
    let guard = one_vm_at_a_time();
    let vm = Vm::start(config).unwrap_or_else(|e| panic!("{test}: {}", chain(&e)));
    Some((guard, vm))
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text += &format!(": {s}");
        source = s.source();
    }
    text
}

fn sweeps(metrics: &Metrics) -> Vec<u64> {
    metrics.vcpus.iter().map(|v| v.sweeps).collect()
}

/// Waits until every vCPU has finished `more` sweeps beyond `from`; panics on a guest failure
/// or after `timeout`.
fn wait_for_sweeps(vm: &Vm, from: &[u64], more: u64, timeout: Duration) -> Metrics {
    let deadline = Instant::now() + timeout;
    loop {
        let metrics = vm.metrics();
        for v in &metrics.vcpus {
            assert_eq!(v.failure, None, "vCPU {} failed", v.index);
        }
        if sweeps(&metrics)
            .iter()
            .zip(from)
            .all(|(now, before)| *now >= before + more)
        {
            return metrics;
        }
        assert!(
            Instant::now() < deadline,
            "guest made no progress in {timeout:?}: {metrics:#?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn assert_clean(metrics: &Metrics) {
    assert_eq!(metrics.mismatches, 0, "{metrics:#?}");
    assert!(metrics.mismatch_reports.is_empty(), "{metrics:#?}");
    assert!(
        metrics.vcpus.iter().all(|v| v.failure.is_none()),
        "{metrics:#?}"
    );
}

#[test]
fn the_guest_runs_and_every_vcpu_makes_progress_without_mismatches() {
    let Some((_guard, vm)) = start("guest_runs", VmConfig::default()) else {
        return;
    };
    let first = wait_for_sweeps(&vm, &[0, 0], 1, Duration::from_secs(20));
    let run_for = Duration::from_secs(2);
    std::thread::sleep(run_for);
    let metrics = vm.metrics();
    assert_clean(&metrics);
    assert_eq!(metrics.state, VmState::Running);
    println!(
        "startup: vCPU threads launched after {} us, first port write after {} us",
        metrics.vcpus_launched_us.unwrap(),
        metrics.first_port_write_us.unwrap()
    );
    for (v, before) in metrics.vcpus.iter().zip(&first.vcpus) {
        let sweeps = v.sweeps - before.sweeps;
        let secs = run_for.as_secs_f64();
        println!(
            "vCPU {}: {:.1} sweeps/s over {} MiB = {:.2} GB/s verified ({:.2} GB/s of memory \
             traffic, write + read), {} exits",
            v.index,
            sweeps as f64 / secs,
            v.slice_len >> 20,
            (v.bytes_verified - before.bytes_verified) as f64 / secs / 1e9,
            2.0 * (v.bytes_verified - before.bytes_verified) as f64 / secs / 1e9,
            v.exits
        );
        assert!(sweeps > 0, "vCPU {} stalled", v.index);
    }
    vm.shutdown().unwrap();
    assert_eq!(vm.state(), VmState::Stopped);
}

#[test]
fn quiesce_freezes_the_guest_and_resume_restarts_it() {
    let Some((_guard, vm)) = start("quiesce_freezes", VmConfig::default()) else {
        return;
    };
    let q = vm.quiesce().clone();
    let running = wait_for_sweeps(&vm, &[0, 0], 1, Duration::from_secs(20));

    q.pause().unwrap();
    let frozen = vm.metrics();
    std::thread::sleep(Duration::from_millis(300));
    let still = vm.metrics();
    assert_eq!(sweeps(&frozen), sweeps(&still), "progress while quiesced");
    assert_eq!(
        frozen.vcpus.iter().map(|v| v.exits).collect::<Vec<_>>(),
        still.vcpus.iter().map(|v| v.exits).collect::<Vec<_>>(),
        "VM exits while quiesced"
    );
    // Quiesce nests: an inner pause/resume pair must not release the outer pause.
    q.pause().unwrap();
    q.resume().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        sweeps(&vm.metrics()),
        sweeps(&frozen),
        "inner resume released the guest"
    );
    q.resume().unwrap();
    assert!(
        q.resume().is_err(),
        "a resume without a pause must be refused"
    );
    wait_for_sweeps(&vm, &sweeps(&frozen), 2, Duration::from_secs(20));

    // Stop latency under load: many short pauses while the guest sweeps.
    let mut held = LatencyHistogram::default();
    for _ in 0..200 {
        let paused = Paused::new(&q).unwrap();
        held.record(paused.resume().unwrap());
        std::thread::sleep(Duration::from_millis(3));
    }
    let metrics = vm.metrics();
    assert_clean(&metrics);
    assert!(
        sweeps(&metrics)
            .iter()
            .zip(sweeps(&running))
            .all(|(a, b)| *a > b)
    );
    let stop = metrics.stop_latency;
    let held = held.summary();
    println!(
        "quiesce stop latency (request -> all {} vCPUs parked), {} stops: p50 {:.1} us, \
         p99 {:.1} us, max {:.1} us, mean {:.1} us",
        metrics.vcpus.len(),
        stop.count,
        stop.p50_us,
        stop.p99_us,
        stop.max_us,
        stop.mean_us
    );
    println!(
        "pause -> resume round trip: p50 {:.1} us, p99 {:.1} us, max {:.1} us",
        held.p50_us, held.p99_us, held.max_us
    );
}

/// A migration job runs on its own thread with a clone of the quiesce handle, and the API
/// server shares the VM between threads.
#[test]
fn quiesce_works_from_another_thread() {
    fn shareable<T: Send + Sync + 'static>(_: &T) {}
    let config = VmConfig {
        mem_size: 32 << 20,
        vcpus: 1,
        ..VmConfig::default()
    };
    let Some((_guard, vm)) = start("quiesce_thread", config) else {
        return;
    };
    shareable(&vm);
    shareable(vm.quiesce());
    let before = wait_for_sweeps(&vm, &[0], 1, Duration::from_secs(20));
    let q = vm.quiesce().clone();
    let (paused_tx, paused_rx) = std::sync::mpsc::channel();
    let (resume_tx, resume_rx) = std::sync::mpsc::channel::<()>();
    let job = std::thread::spawn(move || {
        let paused = Paused::new(&q).unwrap();
        paused_tx.send(()).unwrap();
        resume_rx.recv().unwrap();
        paused.resume().unwrap()
    });
    paused_rx.recv().unwrap();
    let frozen = sweeps(&vm.metrics());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(sweeps(&vm.metrics()), frozen);
    resume_tx.send(()).unwrap();
    let held = job.join().unwrap();
    assert!(held >= Duration::from_millis(100));
    wait_for_sweeps(&vm, &sweeps(&before), 2, Duration::from_secs(20));
    assert_eq!(vm.metrics().quiesce_hold.count, 1);
}

#[test]
fn user_pause_is_independent_of_quiesce() {
    let config = VmConfig {
        mem_size: 64 << 20,
        ..VmConfig::default()
    };
    let Some((_guard, vm)) = start("user_pause", config) else {
        return;
    };
    wait_for_sweeps(&vm, &[0, 0], 1, Duration::from_secs(20));
    vm.pause().unwrap();
    vm.pause().unwrap(); // idempotent
    assert_eq!(vm.state(), VmState::Paused);
    let paused = sweeps(&vm.metrics());
    // A migration's pause/resume while the user has paused must leave the VM paused.
    let q = vm.quiesce();
    q.pause().unwrap();
    q.resume().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(sweeps(&vm.metrics()), paused);
    assert_eq!(vm.state(), VmState::Paused);
    vm.resume().unwrap();
    assert_eq!(vm.state(), VmState::Running);
    wait_for_sweeps(&vm, &paused, 2, Duration::from_secs(20));
    assert_clean(&vm.metrics());

    vm.shutdown().unwrap();
    vm.shutdown().unwrap(); // idempotent
    assert_eq!(vm.state(), VmState::Stopped);
    assert!(matches!(vm.pause(), Err(VmError::ShutDown)));
    // Quiescing a stopped VM has nothing to wait for.
    vm.quiesce().pause().unwrap();
    vm.quiesce().resume().unwrap();
}

/// The remap mechanism by hand, while the guest writes and verifies: a spare gmem chunk is
/// allocated and faulted in while the guest runs; then, guest stopped, the chunk is copied
/// there and its memslot rebound; then the old offset is punched and returned to the pool.
#[test]
fn chunks_remapped_under_the_running_guest_lose_no_word() {
    let Some((_guard, vm)) = start("manual_remap", VmConfig::default()) else {
        return;
    };
    let memory = vm.memory();
    let mapping = memory.mapping().unwrap();
    let chunk_size = memory.layout().chunk_size;
    let len = chunk_size as usize;
    let chunks = memory.layout().chunks();
    let spares_before = memory.spare_chunks();
    let warm = wait_for_sweeps(&vm, &[0, 0], 1, Duration::from_secs(20));
    let offsets_before = memory.chunk_offsets();
    let gap = Duration::from_millis(20);
    // The guest's rate with nothing happening, over about as long as the remaps will take.
    std::thread::sleep(gap * 50);
    let before = vm.metrics();

    let rounds = 50;
    let mut pause = LatencyHistogram::default();
    let mut copy = LatencyHistogram::default();
    let mut rebind = LatencyHistogram::default();
    let mut stop = LatencyHistogram::default();
    for round in 0..rounds {
        // Round 0 moves chunk 0: the guest's own code and page tables.
        let chunk = ChunkIndex((round * 37) % chunks);
        // While the guest runs: allocate and map the destination, and map the source (the
        // guest's writes went through KVM, so the host mapping has no page tables for them).
        let spare = memory.take_spare().expect("a spare chunk");
        memory.gmem().allocate(spare, chunk_size).unwrap();
        mapping.populate_write(spare.index(), len).unwrap();
        let old = memory.chunk_offset(chunk);
        mapping
            .madvise(old.index(), len, libc::MADV_POPULATE_READ)
            .unwrap();

        let t0 = Instant::now();
        let paused = Paused::new(vm.quiesce()).unwrap();
        let t1 = Instant::now();
        mapping.copy_to(old.index(), mapping, spare.index(), len);
        let t2 = Instant::now();
        assert_eq!(memory.rebind_chunk(chunk, spare).unwrap(), old);
        let t3 = Instant::now();
        paused.resume().unwrap();
        pause.record(t1 - t0);
        copy.record(t2 - t1);
        rebind.record(t3 - t2);
        stop.record(t3 - t0);

        memory.gmem().punch(old, chunk_size).unwrap();
        memory.return_spare(old);
        std::thread::sleep(gap);
    }
    let during = vm.metrics();
    // Two more full sweeps: every remapped word has been written and verified since.
    let after = wait_for_sweeps(&vm, &sweeps(&during), 2, Duration::from_secs(30));
    assert_clean(&after);
    assert_eq!(memory.spare_chunks(), spares_before);
    assert_ne!(memory.chunk_offsets(), offsets_before, "no chunk moved");

    let us = |h: &LatencyHistogram| {
        let s = h.summary();
        format!(
            "p50 {:.0} / p99 {:.0} / max {:.0} us",
            s.p50_us, s.p99_us, s.max_us
        )
    };
    println!(
        "manual remap, {rounds} chunks of {} MiB, KVM_X86_QUIRK_SLOT_ZAP_ALL disabled: {}",
        chunk_size >> 20,
        vm.slot_zap_all_disabled()
    );
    println!("  guest stopped (pause + copy + rebind): {}", us(&stop));
    println!("  of which pause {}", us(&pause));
    println!("  of which copy {}", us(&copy));
    println!("  of which rebind {}", us(&rebind));
    let hold = after.quiesce_hold;
    println!(
        "  quiesce hold as the VM measured it: p50 {:.0} / p99 {:.0} / max {:.0} us",
        hold.p50_us, hold.p99_us, hold.max_us
    );
    let rate = |a: &Metrics, b: &Metrics| -> f64 {
        (a.bytes_verified - b.bytes_verified) as f64 / (a.uptime_ms - b.uptime_ms) as f64
    };
    println!(
        "  guest progress during the remaps: {:.0}% of its rate before ({:.2} vs {:.2} GB/s \
         verified)",
        100.0 * rate(&during, &before) / rate(&before, &warm),
        rate(&during, &before) / 1e6,
        rate(&before, &warm) / 1e6
    );
}

/// The check can fail: words flipped behind the guest's back are reported, with the right
/// address, expected value and found value.
#[test]
fn a_corrupted_word_is_reported_by_the_guest() {
    let config = VmConfig {
        mem_size: 64 << 20,
        ..VmConfig::default()
    };
    let Some((_guard, vm)) = start("corruption", config) else {
        return;
    };
    const FLIP: u64 = 0x0100_0000_0000_0001;
    let memory = vm.memory();
    let mut flipped = Vec::new();
    let mut metrics = wait_for_sweeps(&vm, &[0, 0], 1, Duration::from_secs(20));
    assert_clean(&metrics);
    // Flip one word per MiB of every slice: whatever the guest's position, words it has
    // written but not yet verified are among them (unless it is within 1 MiB of a pass's
    // end, hence the retries).
    for attempt in 0..10u64 {
        let paused = Paused::new(vm.quiesce()).unwrap();
        for slice in vm.slices() {
            for gpa in (slice.start + 8 * (attempt + 1)..slice.end()).step_by(1 << 20) {
                let mut word = [0u8; 8];
                memory.read_guest(GuestAddress(gpa), &mut word).unwrap();
                let word = u64::from_le_bytes(word) ^ FLIP;
                memory
                    .write_guest(GuestAddress(gpa), &word.to_le_bytes())
                    .unwrap();
                flipped.push(gpa);
            }
        }
        paused.resume().unwrap();
        metrics = wait_for_sweeps(&vm, &sweeps(&metrics), 2, Duration::from_secs(20));
        if metrics.mismatches > 0 {
            break;
        }
    }
    assert!(metrics.mismatches > 0, "no flipped word was detected");
    assert!(!metrics.mismatch_reports.is_empty());
    for report in &metrics.mismatch_reports {
        assert!(
            flipped.contains(&report.gpa),
            "{report:?} is not a flipped word"
        );
        assert_eq!(report.expected ^ report.found, FLIP, "{report:?}");
        let slice = vm.slices()[report.vcpu as usize];
        assert!((slice.start..slice.end()).contains(&report.gpa));
    }
    println!(
        "{} flipped words, {} mismatches reported, first: {:x?}",
        flipped.len(),
        metrics.mismatches,
        metrics.mismatch_reports[0]
    );
}

#[test]
fn bad_configurations_are_refused_before_anything_is_created() {
    let err = Vm::start(VmConfig {
        vcpus: 0,
        ..VmConfig::default()
    })
    .unwrap_err();
    assert!(matches!(err, VmError::InvalidConfig(_)), "{err}");
    let err = Vm::start(VmConfig {
        mem_size: 100 << 20,
        chunk_size: 64 << 20,
        ..VmConfig::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("chunk_size"), "{err}");
}

#[test]
fn metrics_serialize_to_json() {
    let config = VmConfig {
        mem_size: 16 << 20,
        vcpus: 1,
        ..VmConfig::default()
    };
    let Some((_guard, vm)) = start("metrics_json", config) else {
        return;
    };
    wait_for_sweeps(&vm, &[0], 1, Duration::from_secs(20));
    let json = serde_json::to_value(vm.metrics()).unwrap();
    assert_eq!(json["state"], "Running");
    assert_eq!(json["mismatches"], 0);
    assert!(json["vcpus"][0]["sweeps"].as_u64().unwrap() >= 1);
    assert!(json["stop_latency"]["p99_us"].is_number());
}
