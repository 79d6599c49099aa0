//! Tells whether an ELF executable is statically linked, so it can run in the bare initramfs.

use goblin::container::{Container, Endian};
use goblin::elf::Elf;
use thiserror::Error;

/// Why a file could not be read as a 64-bit little-endian ELF executable.
#[derive(Debug, Error)]
pub enum ElfError {
    #[error("not an ELF file")]
    NotElf,
    #[error("not a 64-bit little-endian ELF file")]
    NotElf64Le,
    #[error("malformed ELF file")]
    Malformed(#[source] goblin::error::Error),
}

/// True if the executable has no program interpreter (static or static-pie).
pub fn is_static(bytes: &[u8]) -> Result<bool, ElfError> {
    if bytes.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(ElfError::NotElf);
    }
    let header = Elf::parse_header(bytes).map_err(ElfError::Malformed)?;
    let is_64 = matches!(header.container(), Ok(Container::Big));
    let is_le = matches!(header.endianness(), Ok(Endian::Little));
    if !(is_64 && is_le) {
        return Err(ElfError::NotElf64Le);
    }
    let elf = Elf::parse(bytes).map_err(ElfError::Malformed)?;
    Ok(elf.interpreter.is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PT_INTERP: u32 = 3;
    const INTERP: &[u8] = b"/lib64/ld-linux-x86-64.so.2\0";

    /// An ELF64 executable header, program headers of the given types, then the interpreter
    /// path that a PT_INTERP header points at.
    fn elf(types: &[u32]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2; // ELFCLASS64
        b[5] = 1; // little-endian
        b[6] = 1; // EV_CURRENT
        b[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        b[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        b[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        let interp_at = 64 + 56 * types.len() as u64;
        for t in types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            if *t == PT_INTERP {
                ph[8..16].copy_from_slice(&interp_at.to_le_bytes());
                ph[32..40].copy_from_slice(&(INTERP.len() as u64).to_le_bytes());
                ph[40..48].copy_from_slice(&(INTERP.len() as u64).to_le_bytes());
            }
            b.extend(ph);
        }
        b.extend_from_slice(INTERP);
        b
    }

    #[test]
    fn detects_interpreter() {
        assert!(!is_static(&elf(&[6, PT_INTERP, 1, 2])).unwrap());
        assert!(is_static(&elf(&[1, 1, 2, 7])).unwrap());
    }

    #[test]
    fn a_dynamic_system_binary_is_not_static() {
        // Debian's /bin/sh (dash) is dynamically linked.
        let sh = std::fs::read("/bin/sh").unwrap();
        assert!(!is_static(&sh).unwrap());
    }

    #[test]
    fn rejects_non_elf_and_truncated() {
        assert!(matches!(is_static(b"#!/bin/sh\n"), Err(ElfError::NotElf)));
        let mut e = elf(&[1]);
        e[4] = 1;
        assert!(matches!(is_static(&e), Err(ElfError::NotElf64Le)));
        let mut e = elf(&[1, PT_INTERP]);
        e.truncate(64 + 56 + 2);
        assert!(matches!(is_static(&e), Err(ElfError::Malformed(_))));
    }
}
