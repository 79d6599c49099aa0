//! Tells whether an ELF executable is statically linked, so it can run in the bare initramfs.

use thiserror::Error;

const PT_INTERP: u32 = 3;

/// Why a file could not be read as a 64-bit little-endian ELF executable.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("not an ELF file")]
    NotElf,
    #[error("not a 64-bit little-endian ELF file")]
    NotElf64Le,
    #[error("ELF program headers lie outside the file")]
    Truncated,
}

fn u16_at(b: &[u8], off: usize) -> Result<u16, ElfError> {
    let s = b.get(off..off + 2).ok_or(ElfError::Truncated)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, ElfError> {
    let s = b.get(off..off + 4).ok_or(ElfError::Truncated)?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], off: usize) -> Result<u64, ElfError> {
    let s = b.get(off..off + 8).ok_or(ElfError::Truncated)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
}

/// True if the executable has no program interpreter (static or static-pie).
pub fn is_static(bytes: &[u8]) -> Result<bool, ElfError> {
    if bytes.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(ElfError::NotElf);
    }
    if bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        return Err(ElfError::NotElf64Le);
    }
    let phoff = usize::try_from(u64_at(bytes, 0x20)?).map_err(|_| ElfError::Truncated)?;
    let phentsize = usize::from(u16_at(bytes, 0x36)?);
    let phnum = usize::from(u16_at(bytes, 0x38)?);
    for i in 0..phnum {
        if u32_at(bytes, phoff + i * phentsize)? == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ELF64 header followed by program headers of the given types.
    fn elf(types: &[u32]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for t in types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            b.extend(ph);
        }
        b
    }

    #[test]
    fn detects_interpreter() {
        assert_eq!(is_static(&elf(&[6, 3, 1, 2])), Ok(false));
        assert_eq!(is_static(&elf(&[1, 1, 2, 7])), Ok(true));
    }

    #[test]
    fn rejects_non_elf_and_truncated() {
        assert_eq!(is_static(b"#!/bin/sh\n"), Err(ElfError::NotElf));
        let mut e = elf(&[1]);
        e[4] = 1;
        assert_eq!(is_static(&e), Err(ElfError::NotElf64Le));
        let mut e = elf(&[1, 3]);
        e.truncate(64 + 56 + 2);
        assert_eq!(is_static(&e), Err(ElfError::Truncated));
    }
}
