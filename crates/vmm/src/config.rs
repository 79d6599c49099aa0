//! `VmConfig`: what a VM is made of (memory, vCPUs, chunking), as JSON or in code.

use serde::{Deserialize, Serialize};

use crate::guest::layout::{MAX_GUEST_BYTES, MAX_VCPUS, RESERVED_BYTES};

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
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            mem_size: 256 * MIB,
            vcpus: 2,
            chunk_size: 2 * MIB,
            spare_chunks: 8,
        }
    }
}

impl VmConfig {
    /// Checks the values against each other and against what the guest can address.
    /// Returns a sentence that says what to change.
    pub fn validate(&self) -> Result<(), String> {
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
        if workload / page < u64::from(self.vcpus) {
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
