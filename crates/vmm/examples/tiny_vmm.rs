//! The smallest VMM that embeds gmem: one vCPU runs the built-in memory checker on chunked
//! guest_memfd memory, and the whole memory moves to a node while the guest runs.
//!
//! `cargo run --example tiny_vmm -- [NODE]` (default: the first node, where every page gets
//! a new frame). It exits 1 unless the move was complete and the guest saw no lost byte.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gmem::memory::{ChunkLayout, GmemFlags, GuestMemfd, GuestMemory};
use gmem::migrate::{MigrationRequest, Migrator, PlacementPolicy, Quiesce, QuiesceError};
use gmem::numa::{NodeId, Topology};
use gmem::sys::signal::{self, KickableVcpu};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm::guest::{abi, cpu, layout};

const GUEST_BYTES: u64 = 64 << 20;
const CHUNK_BYTES: u64 = 2 << 20;
const SPARE_CHUNKS: u64 = 2;
/// Full sweeps (write, then verify, the whole slice) the guest must finish before and after.
const SWEEPS_AROUND_THE_MOVE: u64 = 2;

type Error = Box<dyn std::error::Error>;

/// What the pauser and the vCPU thread share.
#[derive(Default)]
struct Gate {
    /// Read before every KVM_RUN: the lock-free side of `state.paused || state.shutdown`.
    stop: AtomicBool,
    state: Mutex<GateState>,
    changed: Condvar,
    sweeps: AtomicU64,
    mismatches: AtomicU64,
}

#[derive(Default)]
struct GateState {
    paused: bool,
    shutdown: bool,
    /// The vCPU thread is parked, or gone: no guest code runs.
    idle: bool,
    failure: Option<String>,
}

/// The Quiesce a VMM hands the migrator: pause means "no vCPU runs guest code".
struct Vcpus {
    gate: Arc<Gate>,
    thread: JoinHandle<()>,
    kick: i32,
}

impl Quiesce for Vcpus {
    fn pause(&self) -> Result<(), QuiesceError> {
        let mut state = self.gate.state.lock().unwrap();
        state.paused = true;
        self.gate.stop.store(true, Ordering::SeqCst);
        // Out of KVM_RUN now, or at once on its next entry (immediate_exit). ESRCH means the
        // thread has ended, and then it runs no guest code either.
        let _ = signal::kick_thread(&self.thread, self.kick);
        while !state.idle {
            state = self.gate.changed.wait(state).unwrap();
        }
        Ok(())
    }

    fn resume(&self) -> Result<(), QuiesceError> {
        let mut state = self.gate.state.lock().unwrap();
        state.paused = false;
        self.gate.stop.store(state.shutdown, Ordering::SeqCst);
        self.gate.changed.notify_all();
        Ok(())
    }
}

/// The vCPU thread: parks while paused, counts the guest's sweep reports.
fn run_vcpu(vcpu: VcpuFd, gate: &Gate) -> Result<(), String> {
    let mut vcpu = KickableVcpu::new(vcpu).map_err(|e| e.to_string())?;
    loop {
        if gate.stop.load(Ordering::SeqCst) {
            let mut state = gate.state.lock().unwrap();
            while state.paused && !state.shutdown {
                state.idle = true;
                gate.changed.notify_all();
                state = gate.changed.wait(state).unwrap();
            }
            if state.shutdown {
                return Ok(());
            }
            state.idle = false;
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(abi::PORT_SWEEP_DONE, data)) => {
                let bad = u32::from_le_bytes(data.try_into().unwrap_or_default());
                gate.mismatches.fetch_add(u64::from(bad), Ordering::SeqCst);
                gate.sweeps.fetch_add(1, Ordering::SeqCst);
            }
            Ok(VcpuExit::IoOut(abi::PORT_HELLO | abi::PORT_MISMATCH, _)) => {}
            Ok(exit) => return Err(format!("unexpected VM exit: {exit:?}")),
            Err(e) if e.errno() == libc::EINTR => vcpu.clear_immediate_exit(),
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        }
    }
}

/// Waits until the guest has reported `count` sweeps in all.
fn wait_for_sweeps(gate: &Gate, count: u64) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while gate.sweeps.load(Ordering::SeqCst) < count {
        if let Some(failure) = &gate.state.lock().unwrap().failure {
            return Err(format!("the vCPU stopped: {failure}").into());
        }
        if Instant::now() > deadline {
            return Err(format!("the guest did not finish {count} sweeps in 2 minutes").into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn main() -> Result<(), Error> {
    let target: NodeId = match std::env::args().nth(1) {
        Some(node) => node.parse()?,
        None => Topology::read()?.nodes[0].id,
    };
    let kvm = gmem::sys::kvm::open(Path::new(gmem::sys::kvm::DEFAULT_KVM_DEVICE))?;
    let vm = Arc::new(gmem::sys::kvm::create_vm(&kvm)?);

    // Guest RAM: 2 MiB chunks, each its own memslot, plus spare room for remap.
    let chunks = ChunkLayout::chunked(GUEST_BYTES, CHUNK_BYTES, SPARE_CHUNKS);
    let flags = GuestMemfd::host_mappable_flags(&vm).unwrap_or(GmemFlags::HOST_MAPPABLE);
    let memory = GuestMemory::create(Arc::clone(&vm), chunks, flags)?;
    memory.bind_to_vm()?;
    vmm::guest::load(&memory, GUEST_BYTES)?;

    // One vCPU, entered in 64-bit user mode at the checker with its slice in registers.
    let vcpu = vm.create_vcpu(0)?;
    vcpu.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?)?;
    vcpu.set_sregs(&cpu::long_mode_sregs(vcpu.get_sregs()?))?;
    let slice = layout::vcpu_slices(GUEST_BYTES, 1)[0];
    vcpu.set_regs(&cpu::entry_regs(abi::EntryArgs {
        vcpu_index: 0,
        slice_start: slice.start,
        slice_len: slice.len,
    }))?;

    let kick = signal::kick_signal();
    signal::install_kick_handler(kick)?;
    let gate = Arc::new(Gate::default());
    let thread = std::thread::spawn({
        let gate = Arc::clone(&gate);
        move || {
            let ended = run_vcpu(vcpu, &gate);
            let mut state = gate.state.lock().unwrap();
            state.idle = true;
            state.failure = ended.err();
            gate.changed.notify_all();
        }
    });
    let vcpus = Vcpus { gate, thread, kick };

    wait_for_sweeps(&vcpus.gate, SWEEPS_AROUND_THE_MOVE)?;
    let request = MigrationRequest {
        relocate_in_place: true, // on its own node too: every page gets a new frame
        ..MigrationRequest::new(PlacementPolicy::Bind(target))
    };
    let moved = Migrator::new(&memory, &vcpus).migrate(&request);
    let after = vcpus.gate.sweeps.load(Ordering::SeqCst) + SWEEPS_AROUND_THE_MOVE;
    let checked = wait_for_sweeps(&vcpus.gate, after);

    // Stop the vCPU for good before the memory goes away.
    vcpus.gate.state.lock().unwrap().shutdown = true;
    vcpus.pause()?;
    let (gate, thread) = (vcpus.gate, vcpus.thread);
    thread.join().map_err(|_| "the vCPU thread panicked")?;

    let report = moved?;
    checked?;
    let mismatches = gate.mismatches.load(Ordering::SeqCst);
    println!(
        "moved {} of {} pages to node {target} with {} in {} steps ({:.2} GB/s); guest stopped \
         p50 {} us, p99 {} us; new frames {}/{}; guest sweeps {}, mismatches {mismatches}",
        report.pages_moved,
        report.pages_planned,
        report.mechanism,
        report.steps,
        report.throughput_gbps,
        report.stops.p50_us,
        report.stops.p99_us,
        report.pfns_changed.map_or("?".into(), |n| n.to_string()),
        report.pfns_checked.map_or("?".into(), |n| n.to_string()),
        gate.sweeps.load(Ordering::SeqCst),
    );
    if !report.complete || report.content_mismatches > 0 || mismatches > 0 {
        return Err("the move was incomplete, or the guest lost data".into());
    }
    Ok(())
}
