//! `Vm`: a running VM (the built-in guest or Linux), its gmem memory, vCPU threads and
//! metrics.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use gmem::memory::{ChunkLayout, GmemFlags, GuestMemfd, GuestMemory};
use gmem::sys::signal;
use kvm_bindings::{
    KVM_CAP_DISABLE_QUIRKS2, KVM_MAX_CPUID_ENTRIES, KVM_X86_QUIRK_SLOT_ZAP_ALL, kvm_enable_cap,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::config::VmConfig;
use crate::error::VmError;
use crate::guest::abi::EntryArgs;
use crate::guest::layout::{self, Slice};
use crate::guest::{self, cpu};
use crate::linux::{self, LinuxGuest, loader::Entry};
use crate::metrics::{Metrics, VmCounters, VmState};
use crate::quiesce::{Hold, RunControl, VmQuiesce};
use crate::vcpu::{self, Platform};

/// A running VM. Dropping it shuts it down.
#[derive(Debug)]
pub struct Vm {
    config: VmConfig,
    memory: Arc<GuestMemory>,
    quiesce: VmQuiesce,
    counters: Arc<VmCounters>,
    slot_zap_all_disabled: bool,
    linux: Option<LinuxGuest>,
}

impl Vm {
    /// Creates the VM, its gmem-backed memory (one memslot per chunk), loads the guest (the
    /// built-in one, or the Linux kernel of `config.linux`) and starts one thread per vCPU.
    /// Returns as soon as the threads run.
    pub fn start(config: VmConfig) -> Result<Vm, VmError> {
        Self::start_on(Path::new(gmem::sys::kvm::DEFAULT_KVM_DEVICE), config)
    }

    /// [`Vm::start`] on the KVM device at `kvm_device` (a /dev/kvm bind-mounted into a jail,
    /// say) instead of /dev/kvm.
    pub fn start_on(kvm_device: &Path, config: VmConfig) -> Result<Vm, VmError> {
        let started = Instant::now();
        config.validate().map_err(VmError::InvalidConfig)?;
        let kvm = gmem::sys::kvm::open(kvm_device).map_err(VmError::OpenKvm)?;
        check_host_limits(&kvm, &config)?;
        let vm_fd = Arc::new(gmem::sys::kvm::create_vm(&kvm).map_err(VmError::CreateVm)?);
        let slot_zap_all_disabled = disable_slot_zap_all(&vm_fd)?;
        if config.linux.is_some() {
            linux::create_platform(&vm_fd).map_err(VmError::BootLinux)?;
        }

        let layout = ChunkLayout::chunked(config.mem_size, config.chunk_size, config.spare_chunks);
        // MIGRATABLE too where the kernel offers it, so the kernel's own migration (native)
        // can move the guest's memory; GuestMemory::create explains a non-mappable kernel.
        let flags = GuestMemfd::host_mappable_flags(&vm_fd).unwrap_or(GmemFlags::HOST_MAPPABLE);
        let memory = GuestMemory::create(Arc::clone(&vm_fd), layout, flags)
            .map_err(VmError::CreateMemory)?;
        memory.bind_to_vm().map_err(VmError::BindMemory)?;
        let memory = Arc::new(memory);
        let linux = match &config.linux {
            Some(boot) => Some(
                linux::load(&vm_fd, &memory, config.mem_size, config.vcpus, boot)
                    .map_err(VmError::BootLinux)?,
            ),
            None => {
                guest::load(&memory, config.mem_size)?;
                None
            }
        };

        let kick_signal = signal::kick_signal();
        signal::install_kick_handler(kick_signal).map_err(VmError::InstallKickHandler)?;
        let (platform, slices, vcpus) = match &linux {
            None => {
                let slices = layout::vcpu_slices(config.mem_size, config.vcpus);
                let vcpus = create_vcpus(&kvm, &vm_fd, &slices)?;
                (Platform::BuiltIn, slices, vcpus)
            }
            Some(guest) => {
                // Linux checks no slice of its own; the counters keep one empty slice each.
                let slices = vec![Slice { start: 0, len: 0 }; config.vcpus as usize];
                let vcpus = create_linux_vcpus(&kvm, &vm_fd, config.vcpus, guest.loaded.entry)?;
                (Platform::Linux(Arc::clone(&guest.devices)), slices, vcpus)
            }
        };

        let counters = Arc::new(VmCounters::new(started, &slices));
        let prefault_vcpu = (kvm.check_extension_raw(gmem::sys::kvm::KVM_CAP_PRE_FAULT_MEMORY) > 0)
            .then(|| {
                vcpus
                    .first()
                    .and_then(|v| gmem::sys::kvm::dup_vcpu_fd(v).ok())
            })
            .flatten();
        let control = Arc::new(RunControl::new(
            vcpus.len(),
            kick_signal,
            Arc::clone(&counters),
            prefault_vcpu,
        ));
        let mut threads = Vec::with_capacity(vcpus.len());
        for (index, vcpu) in vcpus.into_iter().enumerate() {
            let platform = platform.clone();
            match vcpu::spawn(
                index,
                vcpu,
                platform,
                Arc::clone(&control),
                Arc::clone(&counters),
            ) {
                Ok(thread) => threads.push(thread),
                Err(source) => {
                    control.adopt_threads(threads);
                    control.shut_down();
                    return Err(VmError::SpawnVcpuThread {
                        index: index as u32,
                        source,
                    });
                }
            }
        }
        control.adopt_threads(threads);
        counters.vcpus_launched();
        Ok(Vm {
            config,
            memory,
            quiesce: VmQuiesce { control },
            counters,
            slot_zap_all_disabled,
            linux,
        })
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Guest RAM. Its chunk table follows every remap, so `read_guest`/`write_guest` always
    /// reach the bytes the guest sees.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// Stops and restarts all vCPUs for memory moves. Clone it to hand it to another thread.
    pub fn quiesce(&self) -> &VmQuiesce {
        &self.quiesce
    }

    /// Whether deleting a memslot zaps only that slot's mappings (KVM_X86_QUIRK_SLOT_ZAP_ALL
    /// disabled). When false, every chunk rebind makes the guest re-fault all its memory.
    pub fn slot_zap_all_disabled(&self) -> bool {
        self.slot_zap_all_disabled
    }

    /// The slice of guest RAM each vCPU writes and verifies, by vCPU index.
    pub fn slices(&self) -> Vec<Slice> {
        self.counters.vcpus.iter().map(|v| v.slice).collect()
    }

    /// Pauses the guest for the user (`PUT /vm/state` Paused). Returns once every vCPU is
    /// parked. Independent of quiesce: a migration's resume does not undo it.
    pub fn pause(&self) -> Result<(), VmError> {
        if self.quiesce.control.shutting_down() {
            return Err(VmError::ShutDown);
        }
        self.quiesce
            .control
            .stop(Hold::User)
            .map_err(VmError::Pause)
    }

    /// Undoes [`pause`](Vm::pause). The guest runs unless a migration holds it.
    pub fn resume(&self) -> Result<(), VmError> {
        if self.quiesce.control.shutting_down() {
            return Err(VmError::ShutDown);
        }
        // A user hold cannot be missing in a way that matters: resuming a running VM is a no-op.
        let _ = self.quiesce.control.start(Hold::User);
        Ok(())
    }

    /// Running, paused, failed or stopped.
    pub fn state(&self) -> VmState {
        let control = &self.quiesce.control;
        if control.shutting_down() {
            VmState::Stopped
        } else if self.counters.any_failed() {
            VmState::Failed
        } else if control.user_paused() {
            VmState::Paused
        } else {
            VmState::Running
        }
    }

    /// Marks whether a migration holds the VM's migration slot, for the guest-reset report.
    pub(crate) fn set_migrating(&self, migrating: bool) {
        self.counters.set_migrating(migrating);
    }

    /// A snapshot of everything measured so far.
    pub fn metrics(&self) -> Metrics {
        self.counters.snapshot(self.state())
    }

    /// Where a Linux guest's kernel and initramfs were loaded (guest physical ranges), and
    /// the port accesses no device claimed; `None` for the built-in guest.
    pub fn linux_summary(&self) -> Option<LinuxSummary> {
        self.linux.as_ref().map(|guest| LinuxSummary {
            kernel: guest.loaded.kernel,
            initramfs: guest.loaded.initramfs,
            protocol: match guest.loaded.entry {
                Entry::Linux64 { .. } => "linux64",
                Entry::Pvh { .. } => "pvh",
            },
            unclaimed_port_accesses: guest.devices.unclaimed_accesses(),
        })
    }

    /// Stops the vCPU threads and waits for them. Idempotent; also done on drop.
    pub fn shutdown(&self) -> Result<(), VmError> {
        let panicked = self.quiesce.control.shut_down();
        if let Some(guest) = &self.linux {
            guest.devices.flush_console();
        }
        if panicked.is_empty() {
            Ok(())
        } else {
            Err(VmError::VcpuThreadPanicked { indexes: panicked })
        }
    }
}

/// How a Linux guest was booted (see [`Vm::linux_summary`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LinuxSummary {
    /// Guest physical range of the kernel image.
    pub kernel: (u64, u64),
    /// Guest physical range of the initramfs.
    pub initramfs: Option<(u64, u64)>,
    /// `linux64` (a bzImage through the 64-bit boot protocol) or `pvh`.
    pub protocol: &'static str,
    /// Port accesses that reached no emulated device.
    pub unclaimed_port_accesses: u64,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Refuses configurations this host cannot hold, with a reason, before allocating anything.
fn check_host_limits(kvm: &Kvm, config: &VmConfig) -> Result<(), VmError> {
    let max_vcpus = kvm.get_max_vcpus();
    if config.vcpus as usize > max_vcpus {
        return Err(VmError::TooManyVcpus {
            vcpus: config.vcpus,
            max: max_vcpus,
        });
    }
    let max_slots = kvm.get_nr_memslots();
    if config.chunks() > max_slots as u64 {
        return Err(VmError::TooManyChunks {
            chunks: config.chunks(),
            max: max_slots,
        });
    }
    if let Some(available) = host_ram_bytes()
        && config.gmem_size() > available
    {
        return Err(VmError::NotEnoughHostMemory {
            needed: config.gmem_size(),
            available,
        });
    }
    Ok(())
}

/// Makes memslot deletion zap only the deleted slot's mappings, where KVM lets us choose.
///
/// With the quirk on (the default), x86 KVM throws away *all* guest mappings whenever any
/// memslot is deleted — and a chunk rebind deletes one. Under PVM's shadow paging that cost
/// ~2.7 ms per rebind plus a re-fault of the guest's whole working set; with it off, ~0.3 ms
/// and nothing else. Returns whether it is off. Kernels without the quirk (before 6.12)
/// always zap everything, so there the answer is false.
fn disable_slot_zap_all(vm: &VmFd) -> Result<bool, VmError> {
    let quirk = u64::from(KVM_X86_QUIRK_SLOT_ZAP_ALL);
    let disableable = vm.check_extension_raw(u64::from(KVM_CAP_DISABLE_QUIRKS2));
    if disableable <= 0 || (disableable as u64) & quirk == 0 {
        return Ok(false);
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_DISABLE_QUIRKS2,
        ..Default::default()
    };
    cap.args[0] = quirk;
    vm.enable_cap(&cap).map_err(VmError::DisableSlotZapAll)?;
    Ok(true)
}

/// MemTotal from /proc/meminfo, if readable.
fn host_ram_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Creates the vCPUs of a Linux guest: the first at the kernel's entry, the others waiting
/// for its startup IPIs.
fn create_linux_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    count: u32,
    entry: Entry,
) -> Result<Vec<VcpuFd>, VmError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VmError::GetSupportedCpuid)?;
    (0..count)
        .map(|index| {
            let vcpu = vm
                .create_vcpu(u64::from(index))
                .map_err(|source| VmError::CreateVcpu { index, source })?;
            linux::setup_vcpu(&vcpu, index, &supported, entry)?;
            Ok(vcpu)
        })
        .collect()
}

/// Creates every vCPU and puts it at the workload's entry in 64-bit user mode.
fn create_vcpus(kvm: &Kvm, vm: &VmFd, slices: &[Slice]) -> Result<Vec<VcpuFd>, VmError> {
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VmError::GetSupportedCpuid)?;
    slices
        .iter()
        .enumerate()
        .map(|(index, slice)| {
            let index = index as u32;
            let vcpu = vm
                .create_vcpu(u64::from(index))
                .map_err(|source| VmError::CreateVcpu { index, source })?;
            // KVM checks EFER.LME against the guest's CPUID (long mode must be advertised).
            vcpu.set_cpuid2(&cpuid)
                .map_err(|source| VmError::SetCpuid { index, source })?;
            let sregs = vcpu
                .get_sregs()
                .map_err(|source| VmError::GetSpecialRegisters { index, source })?;
            vcpu.set_sregs(&cpu::long_mode_sregs(sregs))
                .map_err(|source| VmError::SetSpecialRegisters { index, source })?;
            let args = EntryArgs {
                vcpu_index: index,
                slice_start: slice.start,
                slice_len: slice.len,
            };
            vcpu.set_regs(&cpu::entry_regs(args))
                .map_err(|source| VmError::SetRegisters { index, source })?;
            Ok(vcpu)
        })
        .collect()
}
