//! `GmemFlags`: the KVM_CREATE_GUEST_MEMFD flags, with their names.

use std::fmt;

use serde::{Serialize, Serializer};

use crate::sys::kvm::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MIGRATABLE, GUEST_MEMFD_FLAG_MMAP,
};

/// Flags of a guest_memfd, as KVM_CREATE_GUEST_MEMFD and KVM_CAP_GUEST_MEMFD_FLAGS use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct GmemFlags(pub u64);

const NAMES: [(u64, &str); 3] = [
    (GUEST_MEMFD_FLAG_MMAP, "MMAP"),
    (GUEST_MEMFD_FLAG_INIT_SHARED, "INIT_SHARED"),
    (GUEST_MEMFD_FLAG_MIGRATABLE, "MIGRATABLE"),
];

impl GmemFlags {
    /// No flags: a gmem the host cannot map (what confidential VMs use).
    pub const NONE: GmemFlags = GmemFlags(0);
    /// Host may mmap the gmem.
    pub const MMAP: GmemFlags = GmemFlags(GUEST_MEMFD_FLAG_MMAP);
    /// Pages start shared, so host faults succeed.
    pub const INIT_SHARED: GmemFlags = GmemFlags(GUEST_MEMFD_FLAG_INIT_SHARED);
    /// The kernel may migrate the folios (our kernel series only).
    pub const MIGRATABLE: GmemFlags = GmemFlags(GUEST_MEMFD_FLAG_MIGRATABLE);
    /// What a non-confidential VM's host-mappable guest memory needs.
    pub const HOST_MAPPABLE: GmemFlags =
        GmemFlags(GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);

    /// Whether every flag of `other` is set here.
    pub fn contains(self, other: GmemFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Flags set here but not in `other`.
    pub fn without(self, other: GmemFlags) -> GmemFlags {
        GmemFlags(self.0 & !other.0)
    }

    /// The names of the set flags; unknown bits as hex.
    pub fn names(self) -> Vec<String> {
        let mut names: Vec<String> = NAMES
            .iter()
            .filter(|(bit, _)| self.0 & bit != 0)
            .map(|(_, name)| (*name).to_owned())
            .collect();
        let known = NAMES.iter().fold(0, |acc, (bit, _)| acc | bit);
        if self.0 & !known != 0 {
            names.push(format!("{:#x}", self.0 & !known));
        }
        names
    }
}

impl std::ops::BitOr for GmemFlags {
    type Output = GmemFlags;
    fn bitor(self, rhs: GmemFlags) -> GmemFlags {
        GmemFlags(self.0 | rhs.0)
    }
}

/// "MMAP|INIT_SHARED", or "none".
impl fmt::Display for GmemFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.names() {
            names if names.is_empty() => f.write_str("none"),
            names => f.write_str(&names.join("|")),
        }
    }
}

impl Serialize for GmemFlags {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("GmemFlags", 2)?;
        s.serialize_field("value", &self.0)?;
        s.serialize_field("names", &self.names())?;
        s.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_flags() {
        assert_eq!(GmemFlags(3).to_string(), "MMAP|INIT_SHARED");
        assert_eq!(GmemFlags(0).to_string(), "none");
        assert_eq!(GmemFlags(1 | 1 << 9).to_string(), "MMAP|0x200");
        // Our kernel: MMAP|INIT_SHARED|MIGRATABLE.
        let patched = GmemFlags(0x23);
        assert_eq!(patched.to_string(), "MMAP|INIT_SHARED|MIGRATABLE");
        assert!(patched.contains(GmemFlags::HOST_MAPPABLE));
        assert_eq!(patched.without(GmemFlags(3)), GmemFlags::MIGRATABLE);
    }

    #[test]
    fn other_series_bits_are_not_migratable() {
        // Bit 2 is NO_DIRECT_MAP (direct map removal) or WRITE, bit 3 Firecracker's WRITE: a
        // kernel with them offers no migration.
        let secret_hiding = GmemFlags(0xf);
        assert!(!secret_hiding.contains(GmemFlags::MIGRATABLE));
        assert_eq!(secret_hiding.to_string(), "MMAP|INIT_SHARED|0xc");
    }
}
