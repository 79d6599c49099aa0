//! Linux guests: load a bzImage (64-bit boot protocol) or a PVH vmlinux with its initramfs
//! and command line, and give it the few devices it needs: KVM's interrupt controllers and
//! PIT, an MP table and ACPI tables (its CPUs and IOAPIC, either way), a serial console and
//! a reset line.
//!
//! Under PVM (the hosts this project develops on) a Linux kernel's CPL0 code is emulated
//! instruction by instruction and does not get through boot; the two-node lab, where nested
//! KVM is real, is where Linux guests run (`gmem-lab`'s `linux-guest` test).

pub(crate) mod acpi;
pub(crate) mod cpu;
pub(crate) mod devices;
pub(crate) mod loader;
pub mod mptable;
pub mod stand_in;

use std::fs::OpenOptions;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use gmem::memory::{GuestAddress, GuestMemory, MemoryError};
use kvm_bindings::{CpuId, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::config::LinuxBoot;
use devices::{COM1_IRQ, ConsoleSink, IrqLine, LegacyDevices};
use loader::{Entry, Loaded};
use mptable::{MPTABLE_GPA, MpTableError};

/// Where KVM puts the three pages of its real-mode TSS (needed by Intel hosts): above guest
/// RAM, below the IOAPIC.
const KVM_TSS_GPA: usize = 0xFFFB_D000;

/// A failed step of setting up a Linux guest.
#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    /// KVM_SET_TSS_ADDR failed.
    #[error("cannot set KVM's TSS address")]
    SetTssAddress(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_IRQCHIP failed.
    #[error("cannot create KVM's interrupt controllers (KVM_CREATE_IRQCHIP)")]
    CreateIrqChip(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_PIT2 failed.
    #[error("cannot create KVM's timer (KVM_CREATE_PIT2)")]
    CreatePit(#[source] kvm_ioctls::Error),
    /// The serial port's eventfd could not be made.
    #[error("cannot create the serial port's interrupt eventfd")]
    CreateEventFd(#[source] io::Error),
    /// KVM_IRQFD failed.
    #[error("cannot connect the serial port to IRQ {COM1_IRQ} (KVM_IRQFD)")]
    RegisterIrqfd(#[source] kvm_ioctls::Error),
    /// The console file could not be opened.
    #[error("cannot open the console file {path}")]
    OpenConsole {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The kernel image could not be opened.
    #[error("cannot open the kernel {path}")]
    OpenKernel {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The kernel image could not be read.
    #[error("cannot read the kernel {path}")]
    ReadKernel {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is shorter than any kernel header.
    #[error("{path} is too short to be a kernel")]
    KernelTooShort {
        /// The image.
        path: PathBuf,
    },
    /// linux-loader refused the image.
    #[error(
        "{path} is not a kernel this VMM can boot (a bzImage, or an ELF vmlinux with a PVH note)"
    )]
    LoadKernel {
        /// The image.
        path: PathBuf,
        /// What linux-loader said.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// An ELF kernel without the PVH entry note.
    #[error(
        "{path} is an ELF kernel without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): build it \
         with CONFIG_PVH=y, or boot its bzImage"
    )]
    NoPvhEntry {
        /// The image.
        path: PathBuf,
    },
    /// A bzImage without a setup header (linux-loader always returns one; a bug otherwise).
    #[error("the bzImage loader returned no setup header")]
    NoSetupHeader,
    /// The kernel does not fit in guest RAM.
    #[error("the kernel ends at {end:#x}, beyond the guest's {mem_size} bytes of RAM")]
    KernelTooBig {
        /// One past its last byte.
        end: u64,
        /// Guest RAM.
        mem_size: u64,
    },
    /// Guest memory has no vm-memory view to load the kernel through (confidential gmem).
    #[error("cannot load a kernel into guest memory the host cannot map")]
    GuestMemoryView(#[source] MemoryError),
    /// The command line is not one the kernel can take.
    #[error("invalid kernel command line")]
    CommandLine(#[source] linux_loader::cmdline::Error),
    /// The initramfs could not be read.
    #[error("cannot read the initramfs {path}")]
    ReadInitramfs {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The initramfs could not be read into guest memory.
    #[error("cannot read the initramfs {path} into guest memory")]
    LoadInitramfs {
        /// The file.
        path: PathBuf,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The initramfs does not fit between the kernel and the top of RAM.
    #[error(
        "the initramfs ({bytes} bytes) does not fit in the {room} bytes between the kernel and \
         the top of guest RAM the kernel accepts: give the guest more memory"
    )]
    InitramfsTooBig {
        /// Its size.
        bytes: u64,
        /// The room there is.
        room: u64,
    },
    /// The MP table could not be built.
    #[error("cannot describe the vCPUs in an MP table")]
    MpTable(#[source] MpTableError),
    /// Writing boot structures into guest memory failed.
    #[error("cannot write the boot structures into guest memory")]
    WriteBootData(#[source] MemoryError),
    /// KVM_GET_LAPIC/KVM_SET_LAPIC failed.
    #[error("cannot wire the local APIC pins of vCPU {index}")]
    Lapic {
        /// vCPU index.
        index: u32,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

impl LinuxError {
    /// Whether the user can fix it: a missing or unbootable kernel or initramfs, a command
    /// line, a console path, sizes. The rest are KVM or VMM failures.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            LinuxError::OpenConsole { .. }
                | LinuxError::OpenKernel { .. }
                | LinuxError::ReadKernel { .. }
                | LinuxError::KernelTooShort { .. }
                | LinuxError::LoadKernel { .. }
                | LinuxError::NoPvhEntry { .. }
                | LinuxError::KernelTooBig { .. }
                | LinuxError::CommandLine(_)
                | LinuxError::ReadInitramfs { .. }
                | LinuxError::InitramfsTooBig { .. }
                | LinuxError::MpTable(_)
        )
    }
}

/// The parts of a Linux guest the VM keeps: its devices and what went where.
#[derive(Debug)]
pub(crate) struct LinuxGuest {
    pub(crate) devices: Arc<LegacyDevices>,
    pub(crate) loaded: Loaded,
}

/// Creates what Linux expects of the platform, before any vCPU exists (KVM requires the
/// interrupt controllers first): the TSS area, the PIC/IOAPIC/LAPIC and the PIT.
pub(crate) fn create_platform(vm: &VmFd) -> Result<(), LinuxError> {
    vm.set_tss_address(KVM_TSS_GPA)
        .map_err(LinuxError::SetTssAddress)?;
    vm.create_irq_chip().map_err(LinuxError::CreateIrqChip)?;
    // A dummy speaker port: Linux calibrates against port 0x61's PIT output bit.
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(LinuxError::CreatePit)
}

/// Loads the kernel, initramfs and command line, the boot GDT and page tables, and the MP
/// and ACPI tables for `vcpus`; then connects the serial console.
pub(crate) fn load(
    vm: &VmFd,
    memory: &GuestMemory,
    mem_size: u64,
    vcpus: u32,
    boot: &LinuxBoot,
) -> Result<LinuxGuest, LinuxError> {
    let loaded = loader::load(
        memory,
        mem_size,
        &boot.kernel,
        boot.initramfs.as_deref(),
        boot.cmdline(),
    )?;
    let mut writes = vec![
        (cpu::GDT_GPA, cpu::gdt(loaded.entry)),
        (
            MPTABLE_GPA,
            mptable::mptable(vcpus).map_err(LinuxError::MpTable)?,
        ),
        (acpi::ACPI_GPA, acpi::tables(vcpus)),
    ];
    if matches!(loaded.entry, Entry::Linux64 { .. }) {
        writes.extend(cpu::page_tables());
    }
    for (gpa, bytes) in writes {
        memory
            .write_guest(GuestAddress(gpa), &bytes)
            .map_err(LinuxError::WriteBootData)?;
    }
    let devices = Arc::new(connect_devices(vm, boot)?);
    Ok(LinuxGuest { devices, loaded })
}

/// The serial console, interrupting through an irqfd on COM1's line.
fn connect_devices(vm: &VmFd, boot: &LinuxBoot) -> Result<LegacyDevices, LinuxError> {
    let sink: ConsoleSink = match &boot.console {
        Some(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| LinuxError::OpenConsole {
                    path: path.clone(),
                    source,
                })?,
        ),
        None => Box::new(io::stdout()),
    };
    let irq = EventFd::new(EFD_NONBLOCK).map_err(LinuxError::CreateEventFd)?;
    vm.register_irqfd(&irq, COM1_IRQ)
        .map_err(LinuxError::RegisterIrqfd)?;
    Ok(LegacyDevices::new(IrqLine(irq), sink))
}

/// Readies vCPU `index`: its CPUID and LAPIC pins; the boot vCPU also gets the entry state.
/// The others wait in KVM for the boot vCPU's INIT/SIPI, as on real hardware.
pub(crate) fn setup_vcpu(
    vcpu: &VcpuFd,
    index: u32,
    supported: &CpuId,
    entry: Entry,
) -> Result<(), crate::VmError> {
    use crate::VmError;
    vcpu.set_cpuid2(&cpu::vcpu_cpuid(supported, index))
        .map_err(|source| VmError::SetCpuid { index, source })?;
    let lapic = vcpu
        .get_lapic()
        .map_err(|source| LinuxError::Lapic { index, source })
        .map_err(VmError::BootLinux)?;
    vcpu.set_lapic(&cpu::wire_lint_pins(lapic))
        .map_err(|source| LinuxError::Lapic { index, source })
        .map_err(VmError::BootLinux)?;
    if index != 0 {
        return Ok(());
    }
    let sregs = vcpu
        .get_sregs()
        .map_err(|source| VmError::GetSpecialRegisters { index, source })?;
    vcpu.set_sregs(&cpu::entry_sregs(sregs, entry))
        .map_err(|source| VmError::SetSpecialRegisters { index, source })?;
    vcpu.set_regs(&cpu::entry_regs(entry))
        .map_err(|source| VmError::SetRegisters { index, source })
}
