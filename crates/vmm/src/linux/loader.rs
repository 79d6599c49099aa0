//! Puts a Linux kernel, its initramfs and command line into guest memory (linux-loader).
//!
//! linux-loader writes through vm-memory's `GuestMemoryBackend`, which our chunked gmem does
//! not implement. So the kernel is first loaded into a scratch vm-memory mapping of the same
//! size, and only the pages it wrote are copied into the guest_memfd (which starts zeroed).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use gmem::memory::GuestMemory;
use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{KernelLoader, KernelLoaderResult};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::LinuxError;
use super::acpi::{ACPI_GPA, ACPI_MAX_BYTES};
use super::mptable::MPTABLE_GPA;

/// The PVH start_info structure, its module list and memory map (PVH boot).
pub(crate) const PVH_START_INFO_GPA: u64 = 0x6000;
const PVH_MODLIST_GPA: u64 = 0x6040;
const PVH_MEMMAP_GPA: u64 = 0x6080;
/// The zero page, `struct boot_params` (64-bit boot protocol).
pub(crate) const ZERO_PAGE_GPA: u64 = 0x7000;
/// The kernel command line, NUL-terminated.
const CMDLINE_GPA: u64 = 0x2_0000;
/// Room for the command line, up to the next structure.
const CMDLINE_MAX_BYTES: usize = 0x1_0000;
/// Where "high" memory begins: kernels load at or above 1 MiB.
const HIGH_MEMORY_GPA: u64 = 0x10_0000;
/// The end of conventional memory: the MP table sits in its last KiB, marked reserved.
const LOW_MEMORY_END: u64 = 0xA_0000;

/// `boot_params.hdr.type_of_loader` for a loader without an assigned ID.
const LOADER_TYPE_UNDEFINED: u8 = 0xFF;
/// e820 and PVH memory-map entry types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// "xEn3" with the high bit of E set: the PVH start_info magic.
const PVH_START_MAGIC: u32 = 0x336E_C578;
/// Boot protocol 2.03 added `initrd_addr_max`; older kernels take an initrd below this.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37FF_FFFF;
const PAGE_BYTES: u64 = 4096;

/// How the vCPU enters the loaded kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entry {
    /// 64-bit boot protocol: long mode, RIP at the bzImage's `startup_64`, RSI = zero page.
    Linux64 { rip: u64, zero_page: u64 },
    /// PVH: 32-bit protected mode without paging, EIP at the PVH note's entry, EBX =
    /// start_info.
    Pvh { eip: u64, start_info: u64 },
}

/// What was loaded where, for the report and for the tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Loaded {
    pub(crate) entry: Entry,
    /// Guest physical range the kernel image occupies.
    pub(crate) kernel: (u64, u64),
    /// Guest physical range of the initramfs, if any.
    pub(crate) initramfs: Option<(u64, u64)>,
}

/// The kind of kernel image, told apart by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImageKind {
    Elf,
    BzImage,
}

/// Loads `kernel` (and `initramfs`) into guest RAM `0..mem_size` and writes the boot
/// structures its protocol needs. The MP and ACPI tables are written by the caller.
pub(crate) fn load(
    memory: &GuestMemory,
    mem_size: u64,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
) -> Result<Loaded, LinuxError> {
    let mut image = File::open(kernel).map_err(|source| LinuxError::OpenKernel {
        path: kernel.to_owned(),
        source,
    })?;
    let kind = image_kind(&mut image).map_err(|source| {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            LinuxError::KernelTooShort {
                path: kernel.to_owned(),
            }
        } else {
            LinuxError::ReadKernel {
                path: kernel.to_owned(),
                source,
            }
        }
    })?;
    let scratch = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size as usize)])
        .map_err(|e| LinuxError::ScratchMemory(e.to_string()))?;
    let high = Some(GuestAddress(HIGH_MEMORY_GPA));
    let result = match kind {
        ImageKind::Elf => Elf::load(&scratch, None, &mut image, high),
        ImageKind::BzImage => BzImage::load(&scratch, None, &mut image, high),
    }
    .map_err(|source| LinuxError::LoadKernel {
        path: kernel.to_owned(),
        source,
    })?;
    let kernel_range = kernel_range(kind, &result);
    if kernel_range.1 > mem_size {
        return Err(LinuxError::KernelTooBig {
            end: kernel_range.1,
            mem_size,
        });
    }
    copy_written_pages(&scratch, memory, kernel_range)?;
    drop(scratch);

    let cmdline = command_line(cmdline)?;
    let initrd_max = match (kind, result.setup_header) {
        (ImageKind::BzImage, Some(hdr)) if hdr.version >= 0x0203 => u64::from(hdr.initrd_addr_max),
        (ImageKind::BzImage, _) => DEFAULT_INITRD_ADDR_MAX,
        // PVH kernels map all RAM before they look at modules.
        (ImageKind::Elf, _) => u64::MAX,
    };
    let initramfs = match initramfs {
        Some(path) => Some(load_initramfs(
            memory,
            path,
            kernel_range.1,
            mem_size,
            initrd_max,
        )?),
        None => None,
    };
    memory
        .write_guest(CMDLINE_GPA, cmdline.as_bytes_with_nul())
        .map_err(LinuxError::WriteBootData)?;
    let cmdline_len = cmdline.as_bytes().len() as u32;

    let entry = match kind {
        ImageKind::BzImage => {
            let hdr = result.setup_header.ok_or(LinuxError::NoSetupHeader)?;
            let params = zero_page(hdr, mem_size, cmdline_len, initramfs);
            memory
                .write_guest(ZERO_PAGE_GPA, params.as_slice())
                .map_err(LinuxError::WriteBootData)?;
            // startup_64 sits 0x200 bytes into the protected-mode kernel.
            Entry::Linux64 {
                rip: result.kernel_load.0 + 0x200,
                zero_page: ZERO_PAGE_GPA,
            }
        }
        ImageKind::Elf => {
            let PvhBootCapability::PvhEntryPresent(eip) = result.pvh_boot_cap else {
                return Err(LinuxError::NoPvhEntry {
                    path: kernel.to_owned(),
                });
            };
            write_pvh_start_info(memory, mem_size, initramfs)?;
            Entry::Pvh {
                eip: eip.0,
                start_info: PVH_START_INFO_GPA,
            }
        }
    };
    Ok(Loaded {
        entry,
        kernel: kernel_range,
        initramfs,
    })
}

/// ELF by its magic; anything else must be a bzImage (linux-loader checks its header).
fn image_kind(image: &mut File) -> std::io::Result<ImageKind> {
    let mut magic = [0u8; 4];
    image.read_exact(&mut magic)?;
    image.seek(SeekFrom::Start(0))?;
    Ok(if magic == *b"\x7fELF" {
        ImageKind::Elf
    } else {
        ImageKind::BzImage
    })
}

/// The guest physical range the image was written to. A bzImage goes at its load address;
/// an ELF's segments can start anywhere above 1 MiB (linux-loader reports its entry, not its
/// lowest segment), so the range starts there and zero pages are skipped when copying.
fn kernel_range(kind: ImageKind, result: &KernelLoaderResult) -> (u64, u64) {
    match kind {
        ImageKind::BzImage => (result.kernel_load.0, result.kernel_end),
        ImageKind::Elf => (HIGH_MEMORY_GPA, result.kernel_end),
    }
}

/// Copies every page of `range` that holds a non-zero byte from the scratch mapping into
/// guest memory, so that unused pages of gmem stay unallocated.
fn copy_written_pages(
    scratch: &GuestMemoryMmap<()>,
    memory: &GuestMemory,
    (start, end): (u64, u64),
) -> Result<(), LinuxError> {
    const BATCH: u64 = 2 << 20;
    let mut buffer = vec![0u8; BATCH as usize];
    let mut at = start & !(PAGE_BYTES - 1);
    while at < end {
        let len = BATCH.min(end.next_multiple_of(PAGE_BYTES) - at) as usize;
        scratch
            .read_slice(&mut buffer[..len], GuestAddress(at))
            .map_err(|e| LinuxError::ScratchMemory(e.to_string()))?;
        for (index, page) in buffer[..len].chunks(PAGE_BYTES as usize).enumerate() {
            if page.iter().any(|&b| b != 0) {
                memory
                    .write_guest(at + index as u64 * PAGE_BYTES, page)
                    .map_err(LinuxError::WriteBootData)?;
            }
        }
        at += len as u64;
    }
    Ok(())
}

/// Checks the command line the way the kernel will read it.
fn command_line(text: &str) -> Result<std::ffi::CString, LinuxError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_BYTES).map_err(LinuxError::CommandLine)?;
    cmdline.insert_str(text).map_err(LinuxError::CommandLine)?;
    cmdline.as_cstring().map_err(LinuxError::CommandLine)
}

/// Reads the initramfs into the top of RAM (page-aligned, at most `addr_max`), where it is
/// out of the way of the kernel's decompression, and returns its range.
fn load_initramfs(
    memory: &GuestMemory,
    path: &Path,
    kernel_end: u64,
    mem_size: u64,
    addr_max: u64,
) -> Result<(u64, u64), LinuxError> {
    let bytes = std::fs::read(path).map_err(|source| LinuxError::ReadInitramfs {
        path: path.to_owned(),
        source,
    })?;
    let len = bytes.len() as u64;
    let top = mem_size.min(addr_max.saturating_add(1));
    let start = top
        .checked_sub(len)
        .map(|s| s & !(PAGE_BYTES - 1))
        .filter(|&s| s >= kernel_end.next_multiple_of(PAGE_BYTES))
        .ok_or(LinuxError::InitramfsTooBig {
            bytes: len,
            room: top.saturating_sub(kernel_end),
        })?;
    memory
        .write_guest(start, &bytes)
        .map_err(LinuxError::WriteBootData)?;
    Ok((start, start + len))
}

/// The RAM map both protocols hand over: conventional memory below the MP table, the MP
/// table and the ACPI tables reserved, and everything from 1 MiB to the end of guest RAM.
fn ram_map(mem_size: u64) -> [(u64, u64, u32); 4] {
    [
        (0, MPTABLE_GPA, E820_RAM),
        (MPTABLE_GPA, LOW_MEMORY_END - MPTABLE_GPA, E820_RESERVED),
        (ACPI_GPA, ACPI_MAX_BYTES, E820_RESERVED),
        (HIGH_MEMORY_GPA, mem_size - HIGH_MEMORY_GPA, E820_RAM),
    ]
}

/// The zero page of the 64-bit boot protocol: the image's setup header plus what the loader
/// fills in (command line, initramfs, e820 map).
fn zero_page(
    hdr: setup_header,
    mem_size: u64,
    cmdline_len: u32,
    initramfs: Option<(u64, u64)>,
) -> boot_params {
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    // Read by kernels of boot protocol 2.14 and later; older ones scan for the RSDP.
    params.acpi_rsdp_addr = ACPI_GPA;
    params.hdr.cmd_line_ptr = CMDLINE_GPA as u32;
    params.hdr.cmdline_size = cmdline_len;
    if let Some((start, end)) = initramfs {
        params.hdr.ramdisk_image = start as u32;
        params.hdr.ramdisk_size = (end - start) as u32;
    }
    let map = ram_map(mem_size);
    for (slot, (addr, size, type_)) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    params.e820_entries = map.len() as u8;
    params
}

/// Writes PVH's start_info, its one-module list (the initramfs) and its memory map.
fn write_pvh_start_info(
    memory: &GuestMemory,
    mem_size: u64,
    initramfs: Option<(u64, u64)>,
) -> Result<(), LinuxError> {
    let map = ram_map(mem_size);
    let mut start_info = hvm_start_info {
        magic: PVH_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_GPA,
        rsdp_paddr: ACPI_GPA,
        memmap_paddr: PVH_MEMMAP_GPA,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((start, end)) = initramfs {
        let module = hvm_modlist_entry {
            paddr: start,
            size: end - start,
            ..Default::default()
        };
        memory
            .write_guest(PVH_MODLIST_GPA, module.as_slice())
            .map_err(LinuxError::WriteBootData)?;
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST_GPA;
    }
    for (index, (addr, size, type_)) in map.into_iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        };
        let at = PVH_MEMMAP_GPA + (index * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        memory
            .write_guest(at, entry.as_slice())
            .map_err(LinuxError::WriteBootData)?;
    }
    memory
        .write_guest(PVH_START_INFO_GPA, start_info.as_slice())
        .map_err(LinuxError::WriteBootData)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const _: () = assert!(PVH_MEMMAP_GPA + 4 * 24 <= ZERO_PAGE_GPA);
    const _: () =
        assert!(ACPI_GPA >= LOW_MEMORY_END && ACPI_GPA + ACPI_MAX_BYTES <= HIGH_MEMORY_GPA);
    const _: () = assert!(CMDLINE_GPA + CMDLINE_MAX_BYTES as u64 <= MPTABLE_GPA);

    #[test]
    fn ram_map_leaves_out_the_mp_table_and_the_legacy_hole() {
        let map = ram_map(256 << 20);
        assert_eq!(map[0], (0, 0x9_FC00, E820_RAM));
        assert_eq!(map[1], (0x9_FC00, 0x400, E820_RESERVED));
        assert_eq!(map[2], (0xE_0000, 0x1_0000, E820_RESERVED));
        assert_eq!(map[3], (0x10_0000, (256 << 20) - 0x10_0000, E820_RAM));
    }

    #[test]
    fn zero_page_points_at_cmdline_and_initramfs() {
        let hdr = setup_header {
            version: 0x020F,
            header: 0x5372_6448,
            ..Default::default()
        };
        let params = zero_page(hdr, 64 << 20, 12, Some((0x300_0000, 0x300_1234)));
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_GPA as u32);
        assert_eq!({ params.hdr.cmdline_size }, 12);
        assert_eq!({ params.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ params.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ params.hdr.type_of_loader }, LOADER_TYPE_UNDEFINED);
        assert_eq!(params.e820_entries, 4);
        assert_eq!({ params.e820_table[3].size }, (64 << 20) - 0x10_0000);
        assert_eq!({ params.acpi_rsdp_addr }, ACPI_GPA);
    }

    #[test]
    fn command_lines_with_nul_are_refused() {
        assert!(command_line("console=ttyS0 quiet").is_ok());
        assert!(command_line("console=ttyS0\0quiet").is_err());
    }
}
