//! ACPI tables for kernels that find CPUs only through ACPI (many cloud kernels are built
//! without MP-table parsing): an RSDP, an XSDT, a hardware-reduced FADT, a DSDT that
//! describes the serial port, and a MADT that lists the vCPUs' local APICs and KVM's IOAPIC.
//!
//! Hardware-reduced means no PM1 event/control blocks, no PM timer and no SCI: the VMM
//! emulates none of them. Linux then leaves the 8259 and the PIT alone and runs on the local
//! APICs and the IOAPIC, which KVM's irqchip provides. With no 8259 there are no legacy ISA
//! interrupts either, so the serial port's IRQ 4 must come from the DSDT (a PNP0501 device),
//! or the console's transmit interrupt never arrives and user space falls silent.
//! `acpi=off` on the command line ignores all of this, and the MP table is used instead.

use super::mptable::{APIC_DEFAULT_GPA, IOAPIC_DEFAULT_GPA};

/// Where the tables go: the BIOS area, which the e820 map marks reserved. The RSDP is also
/// found by kernels that scan 0xE0000-0xFFFFF for it instead of taking the boot pointer.
pub(crate) const ACPI_GPA: u64 = 0xE_0000;
/// Room for the tables (up to the start of the next 64 KiB).
pub(crate) const ACPI_MAX_BYTES: u64 = 0x1_0000;

const RSDP_BYTES: usize = 36;
const HEADER_BYTES: usize = 36;
/// FADT revision 6: 276 bytes.
const FADT_BYTES: usize = 276;
const OEM_ID: &[u8; 6] = b"GMEMCT";
const OEM_TABLE_ID: &[u8; 8] = b"MICROVM ";
const CREATOR_ID: &[u8; 4] = b"GMEM";

/// FADT flags: hardware-reduced ACPI.
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
/// FADT IA-PC boot architecture flags: no VGA, no MSI (there is no PCI), no CMOS RTC...
/// The i8042 bit (1) is left clear so that Linux skips probing a keyboard controller that is
/// not there; its reset line still works.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// MADT flags: the PC's dual 8259 is present (KVM's irqchip has one).
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const LOCAL_APIC_ENABLED: u32 = 1;

/// Offsets of the tables within the area, each 16-byte aligned.
const RSDP_OFFSET: u64 = 0;
const XSDT_OFFSET: u64 = 0x40;
const FADT_OFFSET: u64 = 0x80;
const DSDT_OFFSET: u64 = 0x200;
const MADT_OFFSET: u64 = 0x280;

/// What to write at [`ACPI_GPA`]: the tables for `vcpus` vCPUs with APIC ids 0..vcpus and an
/// IOAPIC with id `vcpus`. The RSDP is at [`ACPI_GPA`] itself.
pub(crate) fn tables(vcpus: u32) -> Vec<u8> {
    let mut area = vec![0u8; MADT_OFFSET as usize];
    let at = |offset: u64| ACPI_GPA + offset;
    put(&mut area, RSDP_OFFSET, &rsdp(at(XSDT_OFFSET)));
    put(
        &mut area,
        XSDT_OFFSET,
        &xsdt(&[at(FADT_OFFSET), at(MADT_OFFSET)]),
    );
    put(&mut area, FADT_OFFSET, &fadt(at(DSDT_OFFSET)));
    put(&mut area, DSDT_OFFSET, &table(*b"DSDT", 2, &dsdt_aml()));
    area.extend(madt(vcpus));
    area
}

fn put(area: &mut [u8], offset: u64, bytes: &[u8]) {
    let offset = offset as usize;
    area[offset..offset + bytes.len()].copy_from_slice(bytes);
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// RSDP revision 2: signature, checksum of the first 20 bytes, OEM, revision, no RSDT,
/// length, the XSDT's address, and a checksum of all 36 bytes.
fn rsdp(xsdt: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(RSDP_BYTES);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0);
    r.extend_from_slice(OEM_ID);
    r.push(2);
    r.extend_from_slice(&0u32.to_le_bytes());
    r.extend_from_slice(&(RSDP_BYTES as u32).to_le_bytes());
    r.extend_from_slice(&xsdt.to_le_bytes());
    r.push(0);
    r.extend_from_slice(&[0; 3]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// A system description table: the standard 36-byte header, then `body`, checksummed.
fn table(signature: [u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let length = (HEADER_BYTES + body.len()) as u32;
    let mut t = Vec::with_capacity(length as usize);
    t.extend_from_slice(&signature);
    t.extend_from_slice(&length.to_le_bytes());
    t.push(revision);
    t.push(0);
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let body: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    table(*b"XSDT", 1, &body)
}

/// A revision 6 FADT for a hardware-reduced platform: only the DSDT pointers, the flags and
/// the boot-architecture flags are set.
fn fadt(dsdt: u64) -> Vec<u8> {
    let mut body = vec![0u8; FADT_BYTES - HEADER_BYTES];
    // Offsets below are from the start of the table, as the specification gives them.
    let mut set = |offset: usize, bytes: &[u8]| {
        let at = offset - HEADER_BYTES;
        body[at..at + bytes.len()].copy_from_slice(bytes);
    };
    set(40, &(dsdt as u32).to_le_bytes());
    set(
        109,
        &(IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_CMOS_RTC_NOT_PRESENT).to_le_bytes(),
    );
    set(112, &FADT_HW_REDUCED_ACPI.to_le_bytes());
    // FADT minor version 5 (ACPI 6.5).
    set(131, &[5]);
    set(140, &dsdt.to_le_bytes());
    table(*b"FACP", 6, &body)
}

/// AML opcodes and the serial port's resources, for the DSDT.
const AML_SCOPE: u8 = 0x10;
const AML_DEVICE: [u8; 2] = [0x5B, 0x82];
const AML_NAME: u8 = 0x08;
const AML_BUFFER: u8 = 0x11;
const AML_BYTE_CONST: u8 = 0x0A;
const AML_DWORD_CONST: u8 = 0x0C;
const AML_ZERO: u8 = 0x00;
/// EISAID("PNP0501"), a 16550-compatible UART, in its compressed 32-bit form.
const EISA_PNP0501: u32 = 0x0105_D041;

/// An AML PkgLength: the length of what follows it, counting its own bytes.
fn pkg_length(content: usize) -> Vec<u8> {
    if content + 1 < 0x40 {
        vec![(content + 1) as u8]
    } else {
        let total = content + 2;
        assert!(total < 0x1000, "AML package too long for this encoder");
        vec![0x40 | (total & 0xF) as u8, (total >> 4) as u8]
    }
}

/// `op`, then a PkgLength, then `body`.
fn package(op: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = op.to_vec();
    out.extend(pkg_length(body.len()));
    out.extend_from_slice(body);
    out
}

fn name(seg: &[u8; 4], value: &[u8]) -> Vec<u8> {
    let mut out = vec![AML_NAME];
    out.extend_from_slice(seg);
    out.extend_from_slice(value);
    out
}

/// `Scope(\_SB) { Device(COM1) { _HID PNP0501, _UID 0, _CRS: I/O 0x3F8-0x3FF, IRQ 4 } }`.
fn dsdt_aml() -> Vec<u8> {
    let resources = [
        // I/O port descriptor: 16-bit decode, 0x3F8..0x3F8, alignment 1, 8 ports.
        0x47, 0x01, 0xF8, 0x03, 0xF8, 0x03, 0x01, 0x08,
        // IRQ descriptor without flags (edge, active high): IRQ 4.
        0x22, 0x10, 0x00, // End tag, checksum 0 (not checked).
        0x79, 0x00,
    ];
    let mut buffer_body = vec![AML_BYTE_CONST, resources.len() as u8];
    buffer_body.extend_from_slice(&resources);
    let mut hid = vec![AML_DWORD_CONST];
    hid.extend_from_slice(&EISA_PNP0501.to_le_bytes());
    let mut device_body = b"COM1".to_vec();
    device_body.extend(name(b"_HID", &hid));
    device_body.extend(name(b"_UID", &[AML_ZERO]));
    device_body.extend(name(b"_CRS", &package(&[AML_BUFFER], &buffer_body)));
    let mut scope_body = b"\\_SB_".to_vec();
    scope_body.extend(package(&AML_DEVICE, &device_body));
    package(&[AML_SCOPE], &scope_body)
}

/// The MADT: the local APIC address and flags, one local APIC per vCPU, the IOAPIC (GSIs
/// from 0, which KVM routes to its pins one to one), and LINT1 as NMI on every CPU.
fn madt(vcpus: u32) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(APIC_DEFAULT_GPA as u32).to_le_bytes());
    body.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for id in 0..vcpus {
        body.extend_from_slice(&[MADT_LOCAL_APIC, 8, id as u8, id as u8]);
        body.extend_from_slice(&LOCAL_APIC_ENABLED.to_le_bytes());
    }
    body.extend_from_slice(&[MADT_IO_APIC, 12, vcpus as u8, 0]);
    body.extend_from_slice(&(IOAPIC_DEFAULT_GPA as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    // Processor UID 0xFF: all processors; flags 0: conforms to the bus; LINT1.
    body.extend_from_slice(&[MADT_LOCAL_APIC_NMI, 6, 0xFF, 0, 0, 1]);
    table(*b"APIC", 5, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)) == 0
    }

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
    }

    /// The table at guest physical `gpa`, by its header's length.
    fn table_at(area: &[u8], gpa: u64) -> &[u8] {
        let at = (gpa - ACPI_GPA) as usize;
        &area[at..at + u32_at(area, at + 4) as usize]
    }

    #[test]
    fn the_rsdp_leads_through_the_xsdt_to_checksummed_tables() {
        let area = tables(2);
        assert!(area.len() as u64 <= ACPI_MAX_BYTES);
        let rsdp = &area[..RSDP_BYTES];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(sums_to_zero(&rsdp[..20]) && sums_to_zero(rsdp));
        let xsdt = table_at(&area, u64_at(rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(sums_to_zero(xsdt));
        let signatures: Vec<&[u8]> = xsdt[HEADER_BYTES..]
            .chunks(8)
            .map(|e| &table_at(&area, u64::from_le_bytes(e.try_into().unwrap()))[..4])
            .collect();
        assert_eq!(signatures, [b"FACP", b"APIC"]);
        let fadt = table_at(&area, ACPI_GPA + FADT_OFFSET);
        assert_eq!(fadt.len(), FADT_BYTES);
        assert!(sums_to_zero(fadt));
        assert_eq!(
            u32_at(fadt, 112) & FADT_HW_REDUCED_ACPI,
            FADT_HW_REDUCED_ACPI
        );
        let dsdt = table_at(&area, u64_at(fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(sums_to_zero(dsdt));
    }

    #[test]
    fn the_dsdt_describes_com1_in_aml() {
        let aml = dsdt_aml();
        #[rustfmt::skip]
        let expected: &[u8] = &[
            0x10, 0x33, b'\\', b'_', b'S', b'B', b'_',
            0x5B, 0x82, 0x2B, b'C', b'O', b'M', b'1',
            0x08, b'_', b'H', b'I', b'D', 0x0C, 0x41, 0xD0, 0x05, 0x01,
            0x08, b'_', b'U', b'I', b'D', 0x00,
            0x08, b'_', b'C', b'R', b'S', 0x11, 0x10, 0x0A, 0x0D,
            0x47, 0x01, 0xF8, 0x03, 0xF8, 0x03, 0x01, 0x08, 0x22, 0x10, 0x00, 0x79, 0x00,
        ];
        assert_eq!(aml, expected);
        assert_eq!(pkg_length(100), [0x40 | (102 & 0xF), 102 >> 4]);
        let area = tables(1);
        let dsdt = table_at(&area, ACPI_GPA + DSDT_OFFSET);
        assert_eq!(&dsdt[HEADER_BYTES..], expected);
        assert!(DSDT_OFFSET as usize + dsdt.len() <= MADT_OFFSET as usize);
    }

    #[test]
    fn the_madt_lists_every_vcpu_and_the_ioapic() {
        let area = tables(3);
        let madt = table_at(&area, ACPI_GPA + MADT_OFFSET);
        assert!(sums_to_zero(madt));
        assert_eq!(u32_at(madt, 36) as u64, APIC_DEFAULT_GPA);
        let mut at = 44;
        let (mut apic_ids, mut ioapics) = (Vec::new(), Vec::new());
        while at < madt.len() {
            let (kind, len) = (madt[at], madt[at + 1] as usize);
            match kind {
                MADT_LOCAL_APIC => apic_ids.push(madt[at + 3]),
                MADT_IO_APIC => ioapics.push((madt[at + 2], u32_at(madt, at + 4))),
                _ => {}
            }
            at += len;
        }
        assert_eq!(at, madt.len(), "entries fill the table exactly");
        assert_eq!(apic_ids, [0, 1, 2]);
        assert_eq!(ioapics, [(3, IOAPIC_DEFAULT_GPA as u32)]);
    }
}
