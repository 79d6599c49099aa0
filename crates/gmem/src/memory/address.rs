//! Typed offsets into guest RAM and guest_memfd, so that one kind cannot be passed as another.
//!
//! Guest-physical addresses are vm-memory's [`GuestAddress`](vm_memory::GuestAddress). The
//! other kinds are here: [`GuestOffset`] (bytes from the start of guest RAM), [`GmemOffset`]
//! (bytes into a guest_memfd) and [`ChunkIndex`] (which chunk of a chunked layout). Host
//! mappings of a gmem ([`MappedGmem`](super::MappedGmem)) always cover the whole file from
//! offset 0, so an offset into such a mapping is a gmem offset, and [`GmemOffset`] is used
//! for both. Conversions between kinds go through the layout or chunk table that knows the
//! mapping ([`ChunkLayout`](super::ChunkLayout), [`GuestMemory`](super::GuestMemory)).

use std::fmt;
use std::ops::{Add, AddAssign};

use serde::{Deserialize, Serialize};

macro_rules! byte_offset {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        #[repr(transparent)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The offset in bytes, for the OS boundary and arithmetic on lengths.
            pub const fn raw(self) -> u64 {
                self.0
            }

            /// The offset as a `usize`, for indexing a host mapping (which fits the address
            /// space by construction).
            pub fn index(self) -> usize {
                usize::try_from(self.0).expect("a mapped offset fits in usize")
            }

            /// `self + len`, or `None` on overflow.
            pub fn checked_add(self, len: u64) -> Option<Self> {
                self.0.checked_add(len).map(Self)
            }

            /// Bytes from `earlier` to `self`; `earlier` must not be past `self`.
            pub fn bytes_since(self, earlier: Self) -> u64 {
                self.0 - earlier.0
            }

            /// Whether the offset is a multiple of `align` bytes.
            pub fn is_multiple_of(self, align: u64) -> bool {
                self.0.is_multiple_of(align)
            }
        }

        /// Moves the offset `len` bytes on.
        impl Add<u64> for $name {
            type Output = Self;

            fn add(self, len: u64) -> Self {
                Self(self.0 + len)
            }
        }

        /// Moves the offset `len` bytes on, in place.
        impl AddAssign<u64> for $name {
            fn add_assign(&mut self, len: u64) {
                self.0 += len;
            }
        }

        /// Hex, as error messages print offsets (`{:#x}`).
        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

byte_offset!(
    /// Bytes from the start of guest RAM: a guest-physical address minus the layout's base
    /// (see [`ChunkLayout::guest_offset`](super::ChunkLayout::guest_offset)).
    GuestOffset
);

byte_offset!(
    /// Bytes into a guest_memfd, which are also bytes into this process's mapping of it.
    GmemOffset
);

/// Which chunk (and memslot) of a chunked layout, counted from the chunk at the base address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[repr(transparent)]
#[serde(transparent)]
pub struct ChunkIndex(pub u64);

impl ChunkIndex {
    /// The index as a number.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The index into a per-chunk table.
    pub fn index(self) -> usize {
        usize::try_from(self.0).expect("a chunk index fits in usize")
    }
}

/// The index of the `i`-th entry of a per-chunk table.
impl From<usize> for ChunkIndex {
    fn from(i: usize) -> Self {
        ChunkIndex(u64::try_from(i).expect("usize fits in u64"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialize_as_plain_numbers() {
        let json = serde_json::to_string(&(GuestOffset(1), GmemOffset(2), ChunkIndex(3))).unwrap();
        assert_eq!(json, "[1,2,3]");
        let back: (GuestOffset, GmemOffset, ChunkIndex) = serde_json::from_str(&json).unwrap();
        assert_eq!(back, (GuestOffset(1), GmemOffset(2), ChunkIndex(3)));
    }

    #[test]
    fn offsets_move_by_lengths() {
        let at = GmemOffset(4096);
        assert_eq!(at + 4096, GmemOffset(8192));
        assert_eq!((at + 10).bytes_since(at), 10);
        assert_eq!(GmemOffset(u64::MAX).checked_add(1), None);
        assert_eq!(format!("{:#x}", GuestOffset(255)), "0xff");
    }
}
