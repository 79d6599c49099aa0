//! Puts a Linux kernel, its initramfs and command line into guest memory (linux-loader).
//!
//! linux-loader writes the kernel straight into the chunked gmem, through its vm-memory view
//! ([`GuestMemory::vm_memory`]).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use gmem::memory::{ChunkRegions, GuestMemory};
use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{KernelLoader, KernelLoaderResult};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestAddressSpace};

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
    let guest = memory.vm_memory().map_err(LinuxError::GuestMemoryView)?;
    let guest = guest.memory();
    let high = Some(GuestAddress(HIGH_MEMORY_GPA));
    let result = match kind {
        ImageKind::Elf => Elf::load(&*guest, None, &mut image, high),
        ImageKind::BzImage => BzImage::load(&*guest, None, &mut image, high),
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

    let cmdline = command_line(cmdline)?;
    let initrd_max = match (kind, result.setup_header) {
        (ImageKind::BzImage, Some(hdr)) if hdr.version >= 0x0203 => u64::from(hdr.initrd_addr_max),
        (ImageKind::BzImage, _) => DEFAULT_INITRD_ADDR_MAX,
        // PVH kernels map all RAM before they look at modules.
        (ImageKind::Elf, _) => u64::MAX,
    };
    let initramfs = match initramfs {
        Some(path) => Some(load_initramfs(
            &guest,
            path,
            kernel_range.1,
            mem_size,
            initrd_max,
        )?),
        None => None,
    };
    memory
        .write_guest(GuestAddress(CMDLINE_GPA), cmdline.as_bytes_with_nul())
        .map_err(LinuxError::WriteBootData)?;
    let cmdline_len = cmdline.as_bytes().len() as u32;

    let entry = match kind {
        ImageKind::BzImage => {
            let hdr = result.setup_header.ok_or(LinuxError::NoSetupHeader)?;
            let params = zero_page(hdr, mem_size, cmdline_len, initramfs);
            memory
                .write_guest(GuestAddress(ZERO_PAGE_GPA), params.as_slice())
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
/// lowest segment), so the range starts there.
fn kernel_range(kind: ImageKind, result: &KernelLoaderResult) -> (u64, u64) {
    match kind {
        ImageKind::BzImage => (result.kernel_load.0, result.kernel_end),
        ImageKind::Elf => (HIGH_MEMORY_GPA, result.kernel_end),
    }
}

/// Checks the command line the way the kernel will read it.
fn command_line(text: &str) -> Result<std::ffi::CString, LinuxError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_BYTES).map_err(LinuxError::CommandLine)?;
    cmdline.insert_str(text).map_err(LinuxError::CommandLine)?;
    cmdline.as_cstring().map_err(LinuxError::CommandLine)
}

/// Reads the initramfs from its file straight into the top of RAM (page-aligned, at most
/// `addr_max`), where it is out of the way of the kernel's decompression, and returns its
/// range.
fn load_initramfs(
    guest: &ChunkRegions,
    path: &Path,
    kernel_end: u64,
    mem_size: u64,
    addr_max: u64,
) -> Result<(u64, u64), LinuxError> {
    let read_error = |source| LinuxError::ReadInitramfs {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_error)?;
    let len = file.metadata().map_err(read_error)?.len();
    let top = mem_size.min(addr_max.saturating_add(1));
    let start = top
        .checked_sub(len)
        .map(|s| s & !(PAGE_BYTES - 1))
        .filter(|&s| s >= kernel_end.next_multiple_of(PAGE_BYTES))
        .ok_or(LinuxError::InitramfsTooBig {
            bytes: len,
            room: top.saturating_sub(kernel_end),
        })?;
    guest
        .read_exact_volatile_from(GuestAddress(start), &mut file, len as usize)
        .map_err(|source| LinuxError::LoadInitramfs {
            path: path.to_owned(),
            source,
        })?;
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
            .write_guest(GuestAddress(PVH_MODLIST_GPA), module.as_slice())
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
            .write_guest(GuestAddress(at), entry.as_slice())
            .map_err(LinuxError::WriteBootData)?;
    }
    memory
        .write_guest(GuestAddress(PVH_START_INFO_GPA), start_info.as_slice())
        .map_err(LinuxError::WriteBootData)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gmem::memory::ChunkIndex;

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

    const MIB: u64 = 1 << 20;

    /// 64 MiB in 2 MiB chunks with the chunks that hold the kernel (GPA 1 MiB) and the
    /// initramfs (the top of RAM) moved to spare gmem offsets, so guest order and gmem order
    /// differ exactly where the loader writes.
    fn shuffled_memory(test: &str) -> Option<GuestMemory> {
        let (_kvm, vm) = gmem::testing::kvm_or_skip(test)?;
        let layout = gmem::memory::ChunkLayout::chunked(64 * MIB, 2 * MIB, 2);
        let memory =
            GuestMemory::create(vm, layout, gmem::memory::GmemFlags::HOST_MAPPABLE).unwrap();
        memory.bind_to_vm().unwrap();
        let spares = [memory.take_spare().unwrap(), memory.take_spare().unwrap()];
        let ends = [ChunkIndex(0), ChunkIndex(layout.chunks() - 1)];
        for (chunk, spare) in ends.into_iter().zip(spares) {
            let old = memory.rebind_chunk(chunk, spare).unwrap();
            memory.return_spare(old);
        }
        Some(memory)
    }

    fn read(memory: &GuestMemory, (start, end): (u64, u64)) -> Vec<u8> {
        let mut bytes = vec![0u8; (end - start) as usize];
        memory.read_guest(GuestAddress(start), &mut bytes).unwrap();
        bytes
    }

    /// The gmem offsets the first and last chunk left hold no byte: the loader wrote
    /// through the chunk table, not at identity offsets.
    fn assert_identity_offsets_untouched(memory: &GuestMemory) {
        let map = memory.mapping().unwrap();
        let chunk = memory.layout().chunk_size as usize;
        let last = (memory.layout().chunks() as usize - 1) * chunk;
        let mut bytes = vec![0u8; chunk];
        for offset in [0, last] {
            map.read(offset, &mut bytes);
            assert!(
                bytes.iter().all(|&b| b == 0),
                "gmem offset {offset:#x} was written"
            );
        }
    }

    fn load_stand_in(test: &str, image: &[u8]) -> Option<(GuestMemory, Loaded, Vec<u8>)> {
        let memory = shuffled_memory(test)?;
        let dir = std::env::temp_dir().join(format!("gmem-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (kernel, initramfs) = (dir.join("kernel"), dir.join("initramfs"));
        let initramfs_bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&kernel, image).unwrap();
        std::fs::write(&initramfs, &initramfs_bytes).unwrap();
        let loaded = load(
            &memory,
            64 * MIB,
            &kernel,
            Some(&initramfs),
            "console=ttyS0",
        )
        .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(read(&memory, loaded.initramfs.unwrap()), initramfs_bytes);
        assert_identity_offsets_untouched(&memory);
        Some((memory, loaded, image.to_vec()))
    }

    #[test]
    fn linux_loader_writes_a_bzimage_straight_into_chunked_gmem() {
        let image = super::super::stand_in::bzimage().unwrap();
        let Some((memory, loaded, image)) =
            load_stand_in("loader_writes_a_bzimage_into_chunked_gmem", &image)
        else {
            return;
        };
        // The protected-mode kernel follows the boot sector and `setup_sects` sectors (0
        // means 4, for old kernels).
        let setup_sects = match image[0x1F1] {
            0 => 4,
            n => usize::from(n),
        };
        let payload = &image[(setup_sects + 1) * 512..];
        assert_eq!(loaded.kernel.0, HIGH_MEMORY_GPA);
        assert_eq!(read(&memory, loaded.kernel), payload);
    }

    #[test]
    fn linux_loader_writes_a_pvh_elf_straight_into_chunked_gmem() {
        let image = super::super::stand_in::pvh_elf().unwrap();
        let Some((memory, loaded, image)) =
            load_stand_in("loader_writes_a_pvh_elf_into_chunked_gmem", &image)
        else {
            return;
        };
        assert!(matches!(loaded.entry, Entry::Pvh { .. }));
        // Every PT_LOAD segment's file bytes sit at its physical address.
        let u64_at = |at: usize| u64::from_le_bytes(image[at..at + 8].try_into().unwrap());
        let u16_at = |at: usize| usize::from(u16::from_le_bytes([image[at], image[at + 1]]));
        let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36), u16_at(0x38));
        let mut segments = 0;
        for header in (0..phnum).map(|i| phoff + i * phentsize) {
            if u32::from_le_bytes(image[header..header + 4].try_into().unwrap()) != 1 {
                continue;
            }
            let (offset, paddr, filesz) = (
                u64_at(header + 8),
                u64_at(header + 0x18),
                u64_at(header + 0x20),
            );
            let file = &image[offset as usize..(offset + filesz) as usize];
            assert_eq!(read(&memory, (paddr, paddr + filesz)), file);
            segments += 1;
        }
        assert!(segments > 0, "the stand-in has a PT_LOAD segment");
    }

    #[test]
    fn command_lines_with_nul_are_refused() {
        assert!(command_line("console=ttyS0 quiet").is_ok());
        assert!(command_line("console=ttyS0\0quiet").is_err());
    }
}
