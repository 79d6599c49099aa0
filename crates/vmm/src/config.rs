//! `VmConfig`: what a VM is made of (memory, vCPUs, chunking, guest), as JSON or in code.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::guest::layout::{MAX_GUEST_BYTES, MAX_VCPUS, RESERVED_BYTES};
use crate::linux::mptable::MPTABLE_MAX_VCPUS;

const MIB: u64 = 1 << 20;
/// The guest maps its RAM with 2 MiB pages, so RAM comes in whole 2 MiB pieces.
pub const GUEST_PAGE_BYTES: u64 = 2 * MIB;

/// How to build a VM. Every field has a default; unknown fields are rejected, so a typo in a
/// config file is an error rather than a silently ignored setting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmConfig {
    /// Guest RAM in bytes (a multiple of 2 MiB). The first 2 MiB hold the guest's page
    /// tables and code; the rest is the workload's.
    pub mem_size: u64,
    /// Number of vCPUs; each checks its own slice of the workload RAM.
    pub vcpus: u32,
    /// Bytes per memslot chunk, the unit the remap mechanism moves.
    pub chunk_size: u64,
    /// Extra chunk-sized room in the guest_memfd for remapping into.
    pub spare_chunks: u64,
    /// A Linux kernel to boot instead of the built-in guest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub linux: Option<LinuxBoot>,
}

/// The Linux command line used when none is given: the serial console, a reset through the
/// keyboard controller on reboot (the VMM's cue that the guest is done), and no PCI, which
/// the VMM does not emulate. The CPUs come from the ACPI tables (or, with `acpi=off` or a
/// kernel without ACPI, from the MP table).
pub const DEFAULT_LINUX_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off nomodules i8042.noaux i8042.nomux i8042.dumbkbd";

/// Guest RAM a Linux guest may have: it must end below the 32-bit hole where the local APIC
/// and IOAPIC live, because the VMM describes RAM as one range from 1 MiB up.
pub const MAX_LINUX_GUEST_BYTES: u64 = 3 << 30;
/// Less than this cannot hold a decompressing distribution kernel and its initramfs.
pub const MIN_LINUX_GUEST_BYTES: u64 = 32 * MIB;

/// A Linux guest: kernel, initramfs, command line, and where its serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinuxBoot {
    /// A bzImage (booted through the 64-bit boot protocol) or an ELF vmlinux with a PVH
    /// entry note (booted through PVH).
    pub kernel: PathBuf,
    /// An initramfs (a cpio archive, compressed as the kernel can read), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    /// The kernel command line [default: [`DEFAULT_LINUX_CMDLINE`]].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// A file the serial console (ttyS0) is appended to [default: the VMM's stdout].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<PathBuf>,
}

impl LinuxBoot {
    /// The command line the kernel gets.
    pub fn cmdline(&self) -> &str {
        self.cmdline.as_deref().unwrap_or(DEFAULT_LINUX_CMDLINE)
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            mem_size: 256 * MIB,
            vcpus: 2,
            chunk_size: 2 * MIB,
            spare_chunks: 8,
            linux: None,
        }
    }
}

impl VmConfig {
    /// Checks the values against each other and against what the guest can address.
    /// Returns a sentence that says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.linux.is_some() {
            self.validate_linux()?;
        }
        let min_mem = RESERVED_BYTES + GUEST_PAGE_BYTES;
        if self.mem_size < min_mem || self.mem_size > MAX_GUEST_BYTES {
            return Err(format!(
                "mem_size {} is outside {min_mem}..={MAX_GUEST_BYTES} bytes: the first {} MiB \
                 are reserved for the guest's code and page tables, and the page tables cover \
                 {} GiB",
                self.mem_size,
                RESERVED_BYTES / MIB,
                MAX_GUEST_BYTES >> 30
            ));
        }
        if !self.mem_size.is_multiple_of(GUEST_PAGE_BYTES) {
            return Err(format!(
                "mem_size {} is not a multiple of 2 MiB ({GUEST_PAGE_BYTES}): the guest maps \
                 its RAM in 2 MiB pages",
                self.mem_size
            ));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(format!("vcpus {} is outside 1..={MAX_VCPUS}", self.vcpus));
        }
        let page = gmem::memory::page_size();
        if self.chunk_size == 0
            || !self.chunk_size.is_multiple_of(page)
            || !self.mem_size.is_multiple_of(self.chunk_size)
        {
            return Err(format!(
                "chunk_size {} must be a positive multiple of the {page} byte page size that \
                 divides mem_size {}",
                self.chunk_size, self.mem_size
            ));
        }
        let workload = self.mem_size - RESERVED_BYTES;
        if self.linux.is_none() && workload / page < u64::from(self.vcpus) {
            return Err(format!(
                "{} vCPUs cannot each get a page of the {workload} byte workload area: use \
                 fewer vCPUs or more memory",
                self.vcpus
            ));
        }
        if self.spare_chunks > self.mem_size / self.chunk_size {
            return Err(format!(
                "spare_chunks {} is more than the {} guest chunks it would serve",
                self.spare_chunks,
                self.mem_size / self.chunk_size
            ));
        }
        Ok(())
    }

    /// The limits a Linux guest adds: RAM below the APIC hole, vCPUs the MP table can list.
    fn validate_linux(&self) -> Result<(), String> {
        if !(MIN_LINUX_GUEST_BYTES..=MAX_LINUX_GUEST_BYTES).contains(&self.mem_size) {
            return Err(format!(
                "mem_size {} is outside {MIN_LINUX_GUEST_BYTES}..={MAX_LINUX_GUEST_BYTES} bytes \
                 for a Linux guest: its RAM must end below the 3 GiB mark, where the APICs are",
                self.mem_size
            ));
        }
        if self.vcpus > MPTABLE_MAX_VCPUS {
            return Err(format!(
                "vcpus {} is more than the {MPTABLE_MAX_VCPUS} a Linux guest's MP table can list",
                self.vcpus
            ));
        }
        Ok(())
    }

    /// Guest chunks (memslots).
    pub fn chunks(&self) -> u64 {
        self.mem_size / self.chunk_size
    }

    /// Bytes of guest_memfd: guest RAM plus spare room.
    pub fn gmem_size(&self) -> u64 {
        (self.chunks() + self.spare_chunks) * self.chunk_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        let config = VmConfig::default();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.chunks(), 128);
    }

    #[test]
    fn json_fills_defaults_and_rejects_unknown_fields() {
        let config: VmConfig = serde_json::from_str(r#"{"vcpus": 1}"#).unwrap();
        assert_eq!(config.vcpus, 1);
        assert_eq!(config.mem_size, VmConfig::default().mem_size);
        let err = serde_json::from_str::<VmConfig>(r#"{"vcpu": 1}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn linux_section_parses_and_rejects_unknown_fields() {
        let config: VmConfig =
            serde_json::from_str(r#"{"linux": {"kernel": "/boot/vmlinuz", "cmdline": "quiet"}}"#)
                .unwrap();
        let linux = config.linux.as_ref().unwrap();
        assert_eq!(linux.kernel, PathBuf::from("/boot/vmlinuz"));
        assert_eq!(linux.cmdline(), "quiet");
        assert_eq!(config.validate(), Ok(()));
        let err = serde_json::from_str::<VmConfig>(r#"{"linux": {"kernel": "k", "initrd": "i"}}"#)
            .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        let err = serde_json::from_str::<VmConfig>(r#"{"linux": {}}"#).unwrap_err();
        assert!(err.to_string().contains("kernel"), "{err}");
    }

    #[test]
    fn linux_guests_stay_below_the_apic_hole() {
        let linux = Some(LinuxBoot {
            kernel: "k".into(),
            initramfs: None,
            cmdline: None,
            console: None,
        });
        let too_big = VmConfig {
            mem_size: 4 << 30,
            linux: linux.clone(),
            ..VmConfig::default()
        };
        assert!(too_big.validate().unwrap_err().contains("3 GiB"));
        let too_many = VmConfig {
            vcpus: MPTABLE_MAX_VCPUS + 1,
            linux,
            ..VmConfig::default()
        };
        assert!(too_many.validate().unwrap_err().contains("MP table"));
    }

    #[test]
    fn rejects_bad_values() {
        let bad = [
            VmConfig {
                mem_size: 3 * MIB,
                ..VmConfig::default()
            },
            VmConfig {
                mem_size: 1 << 50,
                ..VmConfig::default()
            },
            VmConfig {
                vcpus: 0,
                ..VmConfig::default()
            },
            VmConfig {
                vcpus: 1000,
                ..VmConfig::default()
            },
            VmConfig {
                chunk_size: 3 * MIB,
                ..VmConfig::default()
            },
            VmConfig {
                chunk_size: 0,
                ..VmConfig::default()
            },
            VmConfig {
                spare_chunks: 1 << 40,
                ..VmConfig::default()
            },
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?} accepted");
        }
    }
}
