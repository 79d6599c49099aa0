//! `AttachedGmem`: guest memory another process (a VMM) owns, taken into this process.
//!
//! A VMM's guest_memfd files are found in /proc/PID/fd and duplicated here with
//! pidfd_getfd. Mapped MAP_SHARED in this process, their pages can be counted and placed
//! exactly, pages the guest touched only through KVM included — which /proc/PID/numa_maps
//! of the VMM cannot do: it counts only pages mapped in the VMM's own page tables.

mod error;
pub(crate) mod procfs;

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use serde::Serialize;

pub use error::AttachError;

use super::{
    ChunkLayout, GmemFlags, GmemOffset, GuestMemfd, MappedGmem, MemoryError, Placement, page_size,
};
use crate::numa::{NodeId, NumaMaps};
use crate::sys::mman::Mmap;
use crate::sys::pidfd;

/// What is known of an attached gmem's creation flags. The kernel does not say which
/// flags a gmem was created with; some show in how it behaves (mmap works only with MMAP,
/// host faults only with INIT_SHARED), and a flag the kernel does not know cannot be set.
/// Every flag in neither field is known to be clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LearnedFlags {
    /// Flags known to be set.
    pub set: GmemFlags,
    /// Flags that may or may not be set.
    pub unknown: GmemFlags,
}

/// "MMAP|INIT_SHARED", "MMAP (INIT_SHARED unknown)", "none (INIT_SHARED|MIGRATABLE unknown)".
impl std::fmt::Display for LearnedFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.set)?;
        if self.unknown != GmemFlags::NONE {
            write!(f, " ({} unknown)", self.unknown)?;
        }
        Ok(())
    }
}

/// One VMA of the owning process that maps the gmem (from its /proc/PID/maps and
/// numa_maps).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmmMapping {
    /// First address, in the owner's address space.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Permissions as maps prints them ("rw-s").
    pub perms: String,
    /// The gmem offset that `start` maps.
    pub gmem_offset: GmemOffset,
    /// The VMA's NUMA policy as numa_maps prints it ("default", "bind:0"); `None` where
    /// numa_maps could not be read.
    pub policy: Option<String>,
    /// Pages the owner has mapped in its own page tables, per node (numa_maps' `N<node>=`):
    /// what numastat and migratepages(8) see. Pages only the guest touched are not here.
    pub mapped_pages_per_node: BTreeMap<NodeId, u64>,
}

impl VmmMapping {
    /// Bytes mapped.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Always false: a VMA is never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Pages the owner has mapped, over all nodes.
    pub fn mapped_pages(&self) -> u64 {
        self.mapped_pages_per_node.values().sum()
    }
}

/// What this process can see of an attached gmem's pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Residency {
    /// The gmem cannot be mapped here (created without MMAP: confidential memory, or a
    /// kernel without gmem mmap), so its pages are invisible to the host.
    NotHostMappable,
    /// Mapped, but its pages are private to the guest (MMAP without INIT_SHARED): mincore
    /// counts them, but they cannot be mapped here to learn their nodes.
    Private {
        /// Pages resident in the gmem.
        resident_pages: u64,
    },
    /// Where every page of the gmem is, in file order.
    Placed(Placement),
}

/// One guest_memfd of another process, duplicated into this one (pidfd_getfd) and, where
/// the kernel allows, mapped here MAP_SHARED over its whole size.
///
/// The duplicate shares the VMM's open file, so everything done through it — a policy, a
/// punch, a refault — happens to the VMM's guest memory. Offsets are gmem file offsets:
/// the VMM's memslots (which guest address each offset backs) are not visible from
/// outside, so [`layout`](Self::layout) is one slot over the whole file.
#[derive(Debug)]
pub struct AttachedGmem {
    pid: u32,
    fds: Vec<i32>,
    dev: u64,
    inode: u64,
    flags: LearnedFlags,
    /// The mapping is present exactly when mmap worked; reading through it is safe only
    /// when INIT_SHARED is known set, which [`mapped`](Self::mapped) checks.
    host: MappedGmem,
    vmm_mappings: Vec<VmmMapping>,
}

impl AttachedGmem {
    /// Takes every guest_memfd process `pid` has open: one value per gmem file, however
    /// many descriptors it has there, ordered by its lowest descriptor number. Empty if
    /// the process has none.
    ///
    /// `kernel_flags` is what [`GuestMemfd::kernel_flags`] reports here, if known: flags
    /// outside it are known clear. Needs ptrace rights over the process (root, or
    /// CAP_SYS_PTRACE); their absence is [`AttachError::NoPtraceRights`].
    pub fn attach_all(
        pid: u32,
        kernel_flags: Option<GmemFlags>,
    ) -> Result<Vec<AttachedGmem>, AttachError> {
        // First, so that the descriptors taken below belong to this process even if it
        // exits and its PID is reused while we look.
        let pidfd = pidfd::pidfd_open(pid).map_err(|source| match source.raw_os_error() {
            Some(libc::ESRCH) => AttachError::NoSuchProcess { pid },
            _ => AttachError::PidfdOpen { pid, source },
        })?;
        let fds = procfs::gmem_fds(pid).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => AttachError::NoSuchProcess { pid },
            io::ErrorKind::PermissionDenied => AttachError::NoPtraceRights {
                pid,
                operation: format!("listing /proc/{pid}/fd"),
                source,
            },
            _ => AttachError::ListFds { pid, source },
        })?;
        // One entry per gmem file: its descriptor numbers there, our duplicate, its stat.
        let mut taken: Vec<(Vec<i32>, File, std::fs::Metadata)> = Vec::new();
        for fd in fds {
            let Some(dup) = take_fd(pid, pidfd.as_fd(), fd)? else {
                continue;
            };
            let file = File::from(dup);
            let meta = file
                .metadata()
                .map_err(|source| AttachError::Stat { pid, fd, source })?;
            let file_id = |m: &std::fs::Metadata| (m.dev(), m.ino());
            match taken
                .iter_mut()
                .find(|(_, _, m)| file_id(m) == file_id(&meta))
            {
                // Another descriptor of a gmem already taken: our extra duplicate closes.
                Some((numbers, _, _)) => numbers.push(fd),
                None => taken.push((vec![fd], file, meta)),
            }
        }
        if taken.is_empty() {
            return Ok(Vec::new());
        }
        let maps =
            std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|source| match source
                .kind()
            {
                io::ErrorKind::NotFound => AttachError::NoSuchProcess { pid },
                _ => AttachError::ReadMaps { pid, source },
            })?;
        let maps = procfs::parse_maps(&maps);
        // numa_maps only adds policies and the owner's own page counts: best effort.
        let numa_maps = NumaMaps::read(pid).ok();
        taken
            .into_iter()
            .map(|(fds, file, meta)| {
                let found = Found {
                    pid,
                    fds,
                    size: meta.size(),
                    dev: meta.dev(),
                    inode: meta.ino(),
                    vmm_mappings: vmm_mappings(&maps, numa_maps.as_ref(), meta.dev(), meta.ino()),
                };
                found.learn(OwnedFd::from(file), kernel_flags)
            })
            .collect()
    }

    /// The owning process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The owner's descriptor numbers for this gmem, lowest first.
    pub fn fds(&self) -> &[i32] {
        &self.fds
    }

    /// The gmem's inode number (as /proc/PID/maps shows it).
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// The device of the gmem's file system (`st_dev`): with the inode, it names the file.
    pub fn dev(&self) -> u64 {
        self.dev
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.host.gmem().size()
    }

    /// What is known of its creation flags.
    pub fn flags(&self) -> LearnedFlags {
        self.flags
    }

    /// Whether this process could map it (the gmem has MMAP).
    pub fn is_host_mappable(&self) -> bool {
        self.flags.set.contains(GmemFlags::MMAP)
    }

    /// The owner's own mappings of it, in address order (none for a VMM that never maps
    /// its guest memory).
    pub fn vmm_mappings(&self) -> &[VmmMapping] {
        &self.vmm_mappings
    }

    /// The gmem as one slot over its whole file: the layout a migration of it works in.
    pub fn layout(&self) -> ChunkLayout {
        ChunkLayout::single_slot(self.size())
    }

    /// The gmem with this process's mapping of it, for reading, placing and moving its
    /// pages. Refused unless the host may read it (MMAP and INIT_SHARED known set): a
    /// read through the mapping of a private page would kill this process with SIGBUS.
    pub fn mapped(&self) -> Result<&MappedGmem, MemoryError> {
        if self.flags.set.contains(GmemFlags::HOST_MAPPABLE) {
            Ok(&self.host)
        } else {
            Err(MemoryError::NotHostMappable {
                flags: self.flags.set,
            })
        }
    }

    /// Finds every page the gmem holds now, and its node: mincore on this process's
    /// mapping sees every uptodate folio, pages the guest touched only through KVM
    /// included; each resident run is then mapped here (MADV_POPULATE_READ, which
    /// allocates nothing) so that move_pages can tell its node.
    ///
    /// Not counted: folios fallocate allocated that nothing has zeroed yet (mincore skips
    /// folios that are not uptodate). Best effort against a running VMM: a page it
    /// punches between the mincore and the populate is faulted back in, as a zero page.
    pub fn residency(&self) -> Result<Residency, AttachError> {
        let Ok(map) = self.host.mapping() else {
            return Ok(Residency::NotHostMappable);
        };
        let survey_failed = |source| AttachError::Survey {
            pid: self.pid,
            fd: self.fds[0],
            source,
        };
        match Placement::query(map, GmemOffset(0), self.size()) {
            Ok(placement) => Ok(Residency::Placed(placement)),
            Err(MemoryError::Populate { source, .. })
                if source.raw_os_error() == Some(libc::EFAULT) =>
            {
                let resident = map
                    .resident_pages(0, map.len())
                    .map_err(|source| MemoryError::QueryPlacement {
                        pages: map.len() / page_size() as usize,
                        source,
                    })
                    .map_err(survey_failed)?;
                Ok(Residency::Private {
                    resident_pages: resident.iter().filter(|&&r| r).count() as u64,
                })
            }
            Err(e) => Err(survey_failed(e)),
        }
    }
}

/// A gmem of the owner as /proc and fstat describe it, before it is mapped here.
struct Found {
    pid: u32,
    fds: Vec<i32>,
    size: u64,
    dev: u64,
    inode: u64,
    vmm_mappings: Vec<VmmMapping>,
}

impl Found {
    /// Maps the gmem and learns its flags from how it behaves.
    fn learn(
        self,
        fd: OwnedFd,
        kernel_flags: Option<GmemFlags>,
    ) -> Result<AttachedGmem, AttachError> {
        let observable = GmemFlags::HOST_MAPPABLE | GmemFlags::MIGRATABLE;
        let mut flags = LearnedFlags {
            set: GmemFlags::NONE,
            unknown: GmemFlags(observable.0 & kernel_flags.map_or(u64::MAX, |k| k.0)),
        };
        let map = map_whole(fd.as_fd(), self.size).map_err(|source| AttachError::Map {
            pid: self.pid,
            fd: self.fds[0],
            size: self.size,
            source,
        })?;
        match &map {
            Some(map) => {
                flags.learned(GmemFlags::MMAP, Some(true));
                flags.learned(GmemFlags::INIT_SHARED, host_faults_work(map));
            }
            None => flags.learned(GmemFlags::MMAP, Some(false)),
        }
        Ok(AttachedGmem {
            pid: self.pid,
            fds: self.fds,
            dev: self.dev,
            inode: self.inode,
            flags,
            host: MappedGmem::new(GuestMemfd::from_attached(fd, self.size, flags.set), map),
            vmm_mappings: self.vmm_mappings,
        })
    }
}

impl LearnedFlags {
    /// Records what was observed of `flag`: set, clear, or (None) still unknown.
    fn learned(&mut self, flag: GmemFlags, set: Option<bool>) {
        let Some(set) = set else { return };
        self.unknown = self.unknown.without(flag);
        if set {
            self.set = self.set | flag;
        }
    }
}

/// Takes descriptor `fd` of process `pid` if it is a guest_memfd there, as a file of this
/// process (for recovery, which knows the descriptor from its journal).
pub(crate) fn take_gmem_file(pid: u32, fd: i32) -> Result<Option<File>, AttachError> {
    let pidfd = pidfd::pidfd_open(pid).map_err(|source| match source.raw_os_error() {
        Some(libc::ESRCH) => AttachError::NoSuchProcess { pid },
        _ => AttachError::PidfdOpen { pid, source },
    })?;
    Ok(take_fd(pid, pidfd.as_fd(), fd)?.map(File::from))
}

/// Takes descriptor `fd` of the process behind `pidfd`; `None` if it is no longer a gmem
/// there (closed, or its number reused since it was listed).
fn take_fd(
    pid: u32,
    pidfd: std::os::fd::BorrowedFd<'_>,
    fd: i32,
) -> Result<Option<OwnedFd>, AttachError> {
    let dup = match pidfd::pidfd_getfd(pidfd, fd) {
        Ok(dup) => dup,
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
            return Err(AttachError::NoSuchProcess { pid });
        }
        Err(source) if source.raw_os_error() == Some(libc::EPERM) => {
            return Err(AttachError::NoPtraceRights {
                pid,
                operation: format!("pidfd_getfd of its fd {fd}"),
                source,
            });
        }
        Err(source) => return Err(AttachError::GetFd { pid, fd, source }),
    };
    match procfs::own_fd_is_gmem(dup.as_raw_fd()) {
        Ok(true) => Ok(Some(dup)),
        Ok(false) => Ok(None),
        Err(source) => Err(AttachError::Stat { pid, fd, source }),
    }
}

/// Maps all of a gmem MAP_SHARED; `None` if the kernel refuses because the gmem is not
/// host-mappable (ENODEV: no MMAP flag, or a kernel without gmem mmap; EINVAL: a kernel
/// that refuses the mapping itself).
fn map_whole(fd: std::os::fd::BorrowedFd<'_>, size: u64) -> io::Result<Option<Mmap>> {
    let Ok(len) = usize::try_from(size) else {
        return Err(io::ErrorKind::InvalidInput.into());
    };
    if len == 0 {
        return Ok(None);
    }
    match Mmap::shared(fd, 0, len) {
        Ok(map) => Ok(Some(map)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENODEV | libc::EINVAL)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether the host may fault the gmem's pages (INIT_SHARED), tried on one page that is
/// already resident so that nothing is allocated: MADV_POPULATE_READ maps it, or fails
/// with EFAULT where a fault would raise SIGBUS. `None` if no page is resident (or the
/// answer is unclear).
fn host_faults_work(map: &Mmap) -> Option<bool> {
    let page = page_size() as usize;
    let resident = map.resident_pages(0, map.len()).ok()?;
    let first = resident.iter().position(|&r| r)?;
    match map.populate_read(first * page, page) {
        Ok(()) => Some(true),
        Err(e) if e.raw_os_error() == Some(libc::EFAULT) => Some(false),
        Err(_) => None,
    }
}

/// The owner's VMAs that map the file `(dev, inode)`, with numa_maps' policy and counts.
fn vmm_mappings(
    maps: &[procfs::MapsLine],
    numa_maps: Option<&NumaMaps>,
    dev: u64,
    inode: u64,
) -> Vec<VmmMapping> {
    let (major, minor) = procfs::dev_major_minor(dev);
    maps.iter()
        .filter(|m| (m.dev_major, m.dev_minor, m.inode) == (major, minor, inode))
        .map(|m| {
            let numa = numa_maps.and_then(|n| n.at(m.start));
            VmmMapping {
                start: m.start,
                end: m.end,
                perms: m.perms.clone(),
                gmem_offset: GmemOffset(m.offset),
                policy: numa.map(|n| n.policy.clone()),
                mapped_pages_per_node: numa.map(|n| n.pages_per_node.clone()).unwrap_or_default(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learned_flags_name_what_is_set_and_what_is_unknown() {
        let mut flags = LearnedFlags {
            set: GmemFlags::NONE,
            unknown: GmemFlags::HOST_MAPPABLE | GmemFlags::MIGRATABLE,
        };
        assert_eq!(
            flags.to_string(),
            "none (MMAP|INIT_SHARED|MIGRATABLE unknown)"
        );
        flags.learned(GmemFlags::MMAP, Some(true));
        flags.learned(GmemFlags::INIT_SHARED, None);
        assert_eq!(flags.to_string(), "MMAP (INIT_SHARED|MIGRATABLE unknown)");
        flags.learned(GmemFlags::INIT_SHARED, Some(false));
        flags.learned(GmemFlags::MIGRATABLE, Some(false));
        assert_eq!(flags.to_string(), "MMAP");
        assert_eq!(flags.unknown, GmemFlags::NONE);
    }
}
