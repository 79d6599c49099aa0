//! `VmError`: what can go wrong starting, pausing and stopping a VM. Variants name the step.

use std::io;

use gmem::memory::MemoryError;
use gmem::migrate::QuiesceError;
use gmem::sys::kvm::KvmError;

use crate::linux::LinuxError;

/// A failed VM operation.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration does not hold together.
    #[error("invalid VM configuration: {0}")]
    InvalidConfig(String),
    /// /dev/kvm could not be opened.
    #[error("cannot use KVM")]
    OpenKvm(#[source] KvmError),
    /// KVM_CREATE_VM failed.
    #[error("cannot create the VM")]
    CreateVm(#[source] KvmError),
    /// The host KVM allows fewer vCPUs than configured.
    #[error("{vcpus} vCPUs configured, but this KVM allows at most {max}: use fewer")]
    TooManyVcpus {
        /// Configured.
        vcpus: u32,
        /// KVM_CAP_MAX_VCPUS.
        max: usize,
    },
    /// The host KVM allows fewer memslots than the layout has chunks.
    #[error(
        "{chunks} memory chunks need as many memslots, but this KVM allows {max}: use a larger \
         chunk_size"
    )]
    TooManyChunks {
        /// Chunks in the layout.
        chunks: u64,
        /// KVM_CAP_NR_MEMSLOTS.
        max: usize,
    },
    /// The guest would not fit in the host's RAM (guest_memfd memory cannot be swapped).
    #[error(
        "{needed} bytes of guest memory (RAM plus spare chunks) do not fit in this host's \
         {available} bytes of RAM: use a smaller mem_size or fewer spare_chunks"
    )]
    NotEnoughHostMemory {
        /// Bytes of guest_memfd asked for.
        needed: u64,
        /// MemTotal.
        available: u64,
    },
    /// KVM offered to stop zapping all mappings on memslot deletion, then refused.
    #[error("cannot disable KVM_X86_QUIRK_SLOT_ZAP_ALL")]
    DisableSlotZapAll(#[source] kvm_ioctls::Error),
    /// The guest_memfd and its mapping could not be created.
    #[error("cannot create the guest memory")]
    CreateMemory(#[source] MemoryError),
    /// The chunk memslots could not be registered.
    #[error("cannot register the guest memory with KVM")]
    BindMemory(#[source] MemoryError),
    /// The built-in guest did not assemble (a bug in this crate).
    #[error("cannot assemble the built-in guest")]
    AssembleGuest(#[source] iced_x86::IcedError),
    /// The guest's tables and code could not be written into its memory.
    #[error("cannot load the built-in guest into guest memory")]
    LoadGuest(#[source] MemoryError),
    /// The Linux guest could not be set up.
    #[error("cannot boot the Linux guest")]
    BootLinux(#[source] LinuxError),
    /// The vCPU kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    InstallKickHandler(#[source] io::Error),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("cannot read the CPUID features KVM supports")]
    GetSupportedCpuid(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_VCPU failed.
    #[error("cannot create vCPU {index}")]
    CreateVcpu {
        /// vCPU index.
        index: u32,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_SET_CPUID2 failed.
    #[error("cannot set the CPUID of vCPU {index}")]
    SetCpuid {
        /// vCPU index.
        index: u32,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_GET_SREGS failed.
    #[error("cannot read the special registers of vCPU {index}")]
    GetSpecialRegisters {
        /// vCPU index.
        index: u32,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_SET_SREGS failed: the host refused the long-mode entry state.
    #[error("cannot put vCPU {index} into 64-bit user mode (KVM_SET_SREGS)")]
    SetSpecialRegisters {
        /// vCPU index.
        index: u32,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_SET_REGS failed.
    #[error("cannot set the entry registers of vCPU {index}")]
    SetRegisters {
        /// vCPU index.
        index: u32,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The vCPU thread could not be started.
    #[error("cannot start the thread of vCPU {index}")]
    SpawnVcpuThread {
        /// vCPU index.
        index: u32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The vCPUs did not stop.
    #[error("cannot pause the VM")]
    Pause(#[source] QuiesceError),
    /// The VM was already shut down.
    #[error("the VM has been shut down")]
    ShutDown,
    /// vCPU threads panicked (a bug in this crate).
    #[error("vCPU thread(s) {indexes:?} panicked")]
    VcpuThreadPanicked {
        /// The vCPUs whose threads panicked.
        indexes: Vec<usize>,
    },
}
