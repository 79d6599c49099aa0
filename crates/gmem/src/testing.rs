//! Support for tests that need the real /dev/kvm: skip loudly, or fail when
//! `GMEM_REQUIRE_KVM=1` says this machine must have it.

use std::path::Path;
use std::sync::Arc;

use kvm_ioctls::{Kvm, VmFd};

/// A usable KVM and a fresh default-type VM, or `None` (after a loud SKIP line) where the
/// host has no usable /dev/kvm. Panics instead of skipping when `GMEM_REQUIRE_KVM=1`.
pub fn kvm_or_skip(test: &str) -> Option<(Kvm, Arc<VmFd>)> {
    let required = std::env::var("GMEM_REQUIRE_KVM").is_ok_and(|v| v == "1");
    let kvm = match crate::sys::kvm::open(Path::new(crate::sys::kvm::DEFAULT_KVM_DEVICE)) {
        Ok(kvm) => kvm,
        Err(e) if required => panic!("{test}: GMEM_REQUIRE_KVM=1 but KVM is unusable: {e}"),
        Err(e) => {
            eprintln!("SKIP {test}: {e}");
            return None;
        }
    };
    let vm = crate::sys::kvm::create_vm(&kvm).unwrap_or_else(|e| panic!("{test}: {e}"));
    Some((kvm, Arc::new(vm)))
}

/// Whether this process may read PFNs from pagemap (root); tests that prove relocation by
/// PFN need it, and say so when it is missing.
pub fn can_read_pfns() -> bool {
    // The effective uid from /proc: no syscall wrapper needed.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::thread::JoinHandle;

use vm_memory::Address;

use crate::memory::{GuestAddress, GuestMemory, GuestOffset, page_size};
use crate::migrate::{Quiesce, QuiesceError};

/// The word a writer stores at guest address `gpa` in generation `generation`.
pub fn pattern_word(gpa: GuestAddress, generation: u64) -> u64 {
    (gpa.raw_value() ^ generation.rotate_left(40)).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

#[derive(Debug, Default)]
struct Gate {
    /// Writers must park.
    paused: bool,
    /// Writers currently parked.
    parked: usize,
}

/// Host threads that behave like a guest: each owns a slice of guest RAM, writes a pattern
/// over it, reads it back, and counts every mismatch, generation after generation. They
/// access memory only through the GPA table, so remapped chunks are followed. They
/// implement [`Quiesce`]: `pause` returns once all are parked between pages.
#[derive(Debug)]
pub struct Writers {
    threads: Vec<JoinHandle<()>>,
    shared: Arc<WriterShared>,
}

#[derive(Debug)]
struct WriterShared {
    gate: Mutex<Gate>,
    changed: Condvar,
    stop: AtomicBool,
    count: usize,
    mismatches: AtomicU64,
    pages_verified: AtomicU64,
    pages_done: AtomicU64,
}

impl Writers {
    /// Starts `count` writers over all guest RAM of `memory`.
    pub fn start(memory: Arc<GuestMemory>, count: usize) -> Self {
        let shared = Arc::new(WriterShared {
            gate: Mutex::new(Gate::default()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            count,
            mismatches: AtomicU64::new(0),
            pages_verified: AtomicU64::new(0),
            pages_done: AtomicU64::new(0),
        });
        let pages = memory.layout().guest_size / page_size();
        let threads = (0..count as u64)
            .map(|i| {
                let (memory, shared) = (memory.clone(), shared.clone());
                let slice = (i * pages / count as u64)..((i + 1) * pages / count as u64);
                std::thread::spawn(move || shared.run(&memory, slice))
            })
            .collect();
        Writers { threads, shared }
    }

    /// Mismatches seen so far.
    pub fn mismatches(&self) -> u64 {
        self.shared.mismatches.load(Ordering::Relaxed)
    }

    /// Pages read back and checked so far.
    pub fn pages_verified(&self) -> u64 {
        self.shared.pages_verified.load(Ordering::Relaxed)
    }

    /// Pages written or read back so far: progress in either phase.
    pub fn pages_done(&self) -> u64 {
        self.shared.pages_done.load(Ordering::Relaxed)
    }

    /// Stops the writers and returns (mismatches, pages verified).
    pub fn stop(mut self) -> (u64, u64) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = self.resume();
        for t in self.threads.drain(..) {
            t.join().expect("writer thread");
        }
        (self.mismatches(), self.pages_verified())
    }
}

impl WriterShared {
    /// Parks while paused. Returns false when asked to stop.
    fn checkpoint(&self) -> bool {
        let mut gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        if gate.paused {
            gate.parked += 1;
            self.changed.notify_all();
            while gate.paused {
                gate = self.changed.wait(gate).unwrap_or_else(|e| e.into_inner());
            }
            gate.parked -= 1;
        }
        !self.stop.load(Ordering::Relaxed)
    }

    fn run(&self, memory: &GuestMemory, pages: std::ops::Range<u64>) {
        let map = memory.mapping().expect("writers need host-mappable memory");
        let layout = *memory.layout();
        let words = page_size() / 8;
        for generation in 1.. {
            for verify in [false, true] {
                for page in pages.clone() {
                    if !self.checkpoint() {
                        return;
                    }
                    let gpa = layout.gpa(GuestOffset(page * page_size()));
                    let host = memory.host_offset(gpa).expect("in RAM");
                    let mut bad = 0;
                    for w in 0..words {
                        let (at, want) = (
                            (host + w * 8).index(),
                            pattern_word(gpa.unchecked_add(w * 8), generation),
                        );
                        if verify {
                            bad += u64::from(map.read_u64(at) != want);
                        } else {
                            map.write_u64(at, want);
                        }
                    }
                    if verify {
                        self.mismatches.fetch_add(bad, Ordering::Relaxed);
                        self.pages_verified.fetch_add(1, Ordering::Relaxed);
                    }
                    self.pages_done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

impl Quiesce for Writers {
    fn pause(&self) -> Result<(), QuiesceError> {
        let mut gate = self.shared.gate.lock().unwrap_or_else(|e| e.into_inner());
        gate.paused = true;
        let live = self
            .threads
            .iter()
            .filter(|t| !t.is_finished())
            .count()
            .min(self.shared.count);
        while gate.parked < live {
            gate = self
                .shared
                .changed
                .wait(gate)
                .unwrap_or_else(|e| e.into_inner());
        }
        Ok(())
    }

    fn resume(&self) -> Result<(), QuiesceError> {
        let mut gate = self.shared.gate.lock().unwrap_or_else(|e| e.into_inner());
        gate.paused = false;
        self.shared.changed.notify_all();
        Ok(())
    }
}

/// Fills guest page i with byte (i & 0xff): the seed selftest's pattern.
pub fn fill_seed_pattern(memory: &GuestMemory) -> Result<(), crate::memory::MemoryError> {
    let map = memory.mapping()?;
    let layout = memory.layout();
    for i in 0..layout.guest_size / page_size() {
        let offset = memory
            .host_offset(layout.gpa(GuestOffset(i * page_size())))
            .expect("in RAM");
        map.fill(offset.index(), page_size() as usize, (i & 0xff) as u8);
    }
    Ok(())
}

/// The first guest page whose bytes are not all (i & 0xff), read through the GPA table.
pub fn first_seed_mismatch(
    memory: &GuestMemory,
) -> Result<Option<u64>, crate::memory::MemoryError> {
    let mut buf = vec![0u8; page_size() as usize];
    let layout = memory.layout();
    for i in 0..layout.guest_size / page_size() {
        memory.read_guest(layout.gpa(GuestOffset(i * page_size())), &mut buf)?;
        if buf.iter().any(|&b| b != (i & 0xff) as u8) {
            return Ok(Some(i));
        }
    }
    Ok(None)
}
