//! Verification building blocks: content hashes taken while stopped, PFN snapshots, and
//! copying through a cache-sized block buffer. Public for benchmarks and tools.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::memory::GmemOffset;
use crate::numa::Pagemap;
use crate::sys::mman::Mmap;

/// Bytes copied or hashed per block: small enough to stay in L2 between read and write.
pub const BLOCK: usize = 64 * 1024;

/// How much to check after each step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum Verify {
    /// Placement, PFNs, and content, checked while the guest is stopped: byte for byte
    /// against the copy the mechanism still holds (remap, refault), or by a hash taken
    /// before and after (native, where the kernel owns the copy; it then stops the guest).
    #[default]
    Full,
    /// Placement and PFNs only; never stops the guest for checking.
    Placement,
    /// Nothing (for speed).
    Off,
}

impl Verify {
    /// Whether content is checked.
    pub fn checks_content(self) -> bool {
        self == Verify::Full
    }

    /// Whether placement and PFNs are checked.
    pub fn placement(self) -> bool {
        self != Verify::Off
    }
}

/// Hashes `len` bytes of `map` at `offset`, block by block through `buf`.
pub fn hash_range(map: &Mmap, offset: u64, len: u64, buf: &mut [u8]) -> u64 {
    let mut hasher = Xxh3::new();
    let mut done = 0u64;
    while done < len {
        let take = (len - done).min(buf.len() as u64) as usize;
        map.read((offset + done) as usize, &mut buf[..take]);
        hasher.update(&buf[..take]);
        done += take as u64;
    }
    hasher.digest()
}

/// Copies `len` bytes from `src` to `dst` in `map` through `buf`, returning the hash of
/// what was copied. One pass over memory: each block is read once into cache, hashed, and
/// written from there.
pub fn copy_and_hash(map: &Mmap, src: u64, dst: u64, len: u64, buf: &mut [u8]) -> u64 {
    let mut hasher = Xxh3::new();
    let mut done = 0u64;
    while done < len {
        let take = (len - done).min(buf.len() as u64) as usize;
        map.read((src + done) as usize, &mut buf[..take]);
        hasher.update(&buf[..take]);
        map.write((dst + done) as usize, &buf[..take]);
        done += take as u64;
    }
    hasher.digest()
}

/// PFNs of `pages` pages of gmem mapping `map` from `offset`, if pagemap is readable.
pub(crate) fn pfns(
    pagemap: Option<&Pagemap>,
    map: &Mmap,
    offset: GmemOffset,
    pages: u64,
) -> Option<Vec<Option<u64>>> {
    pagemap?
        .pfns(map.addr() as u64 + offset.raw(), pages as usize)
        .ok()
}

/// How many present pages have a different frame after than before.
pub(crate) fn pfns_changed(before: &[Option<u64>], after: &[Option<u64>]) -> u64 {
    before
        .iter()
        .zip(after)
        .filter(|(b, a)| matches!((b, a), (Some(b), Some(a)) if b != a))
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_and_hash_matches_hash_range() {
        let map = Mmap::anonymous(1 << 20).unwrap();
        for i in 0..(1 << 20) / 8 {
            map.write_u64(i * 8, (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        }
        let mut buf = vec![0u8; BLOCK];
        let copied = copy_and_hash(&map, 0, 512 << 10, 300 << 10, &mut buf);
        assert_eq!(copied, hash_range(&map, 0, 300 << 10, &mut buf));
        assert_eq!(copied, hash_range(&map, 512 << 10, 300 << 10, &mut buf));
        assert_ne!(copied, hash_range(&map, 4096, 300 << 10, &mut buf));
    }

    #[test]
    fn counts_changed_frames() {
        let before = [Some(1), Some(2), None, Some(4)];
        let after = [Some(1), Some(9), Some(3), Some(5)];
        assert_eq!(pfns_changed(&before, &after), 2);
    }
}
