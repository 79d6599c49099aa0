//! The MP spec 1.4 table from which a Linux guest without ACPI (or booted with acpi=off) learns its vCPUs and IOAPIC.

/// Guest physical address where the table goes: the start of the EBDA-sized area 0x9fc00 that
/// the e820 map marks reserved.
///
/// Linux scans the last KiB of base memory (639 KiB = 0x9fc00) for the floating pointer, so the
/// table is found there without an EBDA pointer in the BIOS data area.
pub const MPTABLE_GPA: u64 = 0x9_fc00;
/// Bytes available for the table at `MPTABLE_GPA` (up to 0xa0000): 0x400.
pub const MPTABLE_MAX_BYTES: usize = 0x400;
/// The most vCPUs the table can describe within `MPTABLE_MAX_BYTES`.
pub const MPTABLE_MAX_VCPUS: u32 =
    ((MPTABLE_MAX_BYTES - FIXED_BYTES) / PROCESSOR_ENTRY_BYTES) as u32;
/// Guest physical address of every vCPU's local APIC (the architectural default).
pub const APIC_DEFAULT_GPA: u64 = 0xfee0_0000;
/// Guest physical address of KVM's in-kernel IOAPIC (the architectural default).
pub const IOAPIC_DEFAULT_GPA: u64 = 0xfec0_0000;

/// Why no MP table could be built.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// More vCPUs than processor entries fit in `MPTABLE_MAX_BYTES`.
    #[error("{vcpus} vCPUs do not fit in the MP table, which describes at most {max}: use fewer")]
    TooManyVcpus {
        /// Requested.
        vcpus: u32,
        /// `MPTABLE_MAX_VCPUS`.
        max: u32,
    },
    /// A table without processors would not boot anything.
    #[error("the MP table needs at least one vCPU")]
    NoVcpus,
}

const FLOATING_POINTER_BYTES: usize = 16;
const CONFIG_HEADER_BYTES: usize = 44;
const PROCESSOR_ENTRY_BYTES: usize = 20;
/// Bus, IOAPIC, I/O interrupt and local interrupt entries all take 8 bytes.
const SHORT_ENTRY_BYTES: usize = 8;
const ISA_IRQ_COUNT: u8 = 16;
const LOCAL_INTERRUPT_ENTRY_COUNT: usize = 2;
/// Everything except the processor entries.
const FIXED_BYTES: usize = FLOATING_POINTER_BYTES
    + CONFIG_HEADER_BYTES
    + SHORT_ENTRY_BYTES * (2 + ISA_IRQ_COUNT as usize + LOCAL_INTERRUPT_ENTRY_COUNT);

// APIC ids are one byte and 0xff means "all local APICs", so the IOAPIC id (= vCPU count) must
// stay below it; the VMM promises at least 8 vCPUs.
const _: () = assert!(MPTABLE_MAX_VCPUS >= 8 && MPTABLE_MAX_VCPUS < 0xff);
/// The table holds 32-bit physical addresses; this refuses, at compile time, one that is not.
const fn gpa_32(gpa: u64) -> u32 {
    assert!(gpa <= u32::MAX as u64, "MP table addresses are 32-bit");
    gpa as u32
}
/// The configuration table sits right after the floating pointer.
const CONFIG_TABLE_GPA: u32 = gpa_32(MPTABLE_GPA + FLOATING_POINTER_BYTES as u64);
const APIC_GPA_32: u32 = gpa_32(APIC_DEFAULT_GPA);
const IOAPIC_GPA_32: u32 = gpa_32(IOAPIC_DEFAULT_GPA);

const FLOATING_POINTER_SIGNATURE: &[u8; 4] = b"_MP_";
const CONFIG_TABLE_SIGNATURE: &[u8; 4] = b"PCMP";
/// 4 = MP specification 1.4.
const SPEC_REVISION: u8 = 4;
const OEM_ID: &[u8; 8] = b"GMEMCTL ";
const PRODUCT_ID: &[u8; 12] = b"MICROVM     ";

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

/// Integrated (xAPIC) local APIC, what KVM reports in its version register.
const LOCAL_APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
const IOAPIC_ENABLED: u8 = 1 << 0;
/// Family 6; Linux takes the real values from CPUID, so this only has to be plausible.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURE_FPU: u32 = 1 << 0;
const CPU_FEATURE_APIC: u32 = 1 << 9;

const ISA_BUS_ID: u8 = 0;
/// Bus type strings are six bytes, padded with blanks.
const ISA_BUS_TYPE: &[u8; 6] = b"ISA   ";

const INTERRUPT_INT: u8 = 0;
const INTERRUPT_NMI: u8 = 1;
const INTERRUPT_EXTINT: u8 = 3;
/// Polarity and trigger mode "conform to the bus": edge, active high for ISA.
const INTERRUPT_FLAGS_CONFORM: u16 = 0;
const ALL_LOCAL_APICS: u8 = 0xff;
const LINT0: u8 = 0;
const LINT1: u8 = 1;

/// The bytes to write at `MPTABLE_GPA` for `vcpus` vCPUs with APIC ids `0..vcpus`.
///
/// # Errors
///
/// [`MpTableError::NoVcpus`] for 0 vCPUs, [`MpTableError::TooManyVcpus`] above
/// [`MPTABLE_MAX_VCPUS`].
pub fn mptable(vcpus: u32) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 {
        return Err(MpTableError::NoVcpus);
    }
    // The const assertion keeps MPTABLE_MAX_VCPUS below 0xff, so every accepted count is a u8.
    let cpu_count = u8::try_from(vcpus)
        .ok()
        .filter(|&count| u32::from(count) <= MPTABLE_MAX_VCPUS)
        .ok_or(MpTableError::TooManyVcpus {
            vcpus,
            max: MPTABLE_MAX_VCPUS,
        })?;
    // CPU APIC ids are 0..cpu_count, so the next id is free for the IOAPIC.
    let ioapic_id = cpu_count;

    let config_table = config_table(cpu_count, ioapic_id);
    let mut table = Vec::with_capacity(FLOATING_POINTER_BYTES + config_table.len());
    push_floating_pointer(&mut table);
    table.extend_from_slice(&config_table);
    debug_assert!(table.len() <= MPTABLE_MAX_BYTES);
    Ok(table)
}

fn push_floating_pointer(table: &mut Vec<u8>) {
    let start = table.len();
    table.extend_from_slice(FLOATING_POINTER_SIGNATURE);
    push_u32(table, CONFIG_TABLE_GPA);
    table.push((FLOATING_POINTER_BYTES / 16) as u8);
    table.push(SPEC_REVISION);
    let checksum_at = table.len();
    table.push(0);
    // Feature byte 1 = 0: a configuration table is present (no default configuration).
    // Feature byte 2 = 0: IMCR absent, so the guest assumes virtual wire mode, which is
    // what KVM's PIC-to-LINT0 wiring provides.
    table.extend_from_slice(&[0; 5]);
    table[checksum_at] = checksum(&table[start..]);
}

/// The configuration table: header, then entries in the order the spec asks for (by type).
fn config_table(cpu_count: u8, ioapic_id: u8) -> Vec<u8> {
    let mut table = Vec::with_capacity(MPTABLE_MAX_BYTES - FLOATING_POINTER_BYTES);
    table.extend_from_slice(CONFIG_TABLE_SIGNATURE);
    let base_length_at = table.len();
    push_u16(&mut table, 0);
    table.push(SPEC_REVISION);
    let checksum_at = table.len();
    table.push(0);
    table.extend_from_slice(OEM_ID);
    table.extend_from_slice(PRODUCT_ID);
    push_u32(&mut table, 0); // No OEM table:
    push_u16(&mut table, 0); // neither pointer nor size.
    let entry_count_at = table.len();
    push_u16(&mut table, 0);
    push_u32(&mut table, APIC_GPA_32);
    push_u16(&mut table, 0); // No extended table:
    table.push(0); // neither length nor checksum.
    table.push(0); // Reserved.
    debug_assert_eq!(table.len(), CONFIG_HEADER_BYTES);

    let mut entry_count: u16 = 0;
    for apic_id in 0..cpu_count {
        push_processor(&mut table, apic_id, apic_id == 0);
        entry_count += 1;
    }
    push_isa_bus(&mut table);
    push_ioapic(&mut table, ioapic_id);
    entry_count += 2;
    // ISA IRQ n goes to IOAPIC pin n, including IRQ 0: KVM's default GSI routing sends GSI n
    // (n < 16) to both the PIC and IOAPIC pin n, and its PIT raises GSI 0, so the timer
    // arrives on pin 0 (unlike firmware tables that override IRQ 0 to pin 2).
    for irq in 0..ISA_IRQ_COUNT {
        push_io_interrupt(&mut table, irq, ioapic_id, irq);
        entry_count += 1;
    }
    // KVM wires the PIC output to LINT0 of the local APICs and NMIs to LINT1.
    push_local_interrupt(&mut table, INTERRUPT_EXTINT, LINT0);
    push_local_interrupt(&mut table, INTERRUPT_NMI, LINT1);
    entry_count += LOCAL_INTERRUPT_ENTRY_COUNT as u16;

    // Both fit: the table is at most MPTABLE_MAX_BYTES long.
    let base_length = table.len() as u16;
    table[base_length_at..base_length_at + 2].copy_from_slice(&base_length.to_le_bytes());
    table[entry_count_at..entry_count_at + 2].copy_from_slice(&entry_count.to_le_bytes());
    table[checksum_at] = checksum(&table);
    table
}

fn push_processor(table: &mut Vec<u8>, apic_id: u8, is_bootstrap: bool) {
    let flags = if is_bootstrap {
        CPU_ENABLED | CPU_BOOTSTRAP
    } else {
        CPU_ENABLED
    };
    table.extend_from_slice(&[ENTRY_PROCESSOR, apic_id, LOCAL_APIC_VERSION, flags]);
    push_u32(table, CPU_SIGNATURE);
    push_u32(table, CPU_FEATURE_FPU | CPU_FEATURE_APIC);
    table.extend_from_slice(&[0; 8]); // Reserved.
}

fn push_isa_bus(table: &mut Vec<u8>) {
    table.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    table.extend_from_slice(ISA_BUS_TYPE);
}

fn push_ioapic(table: &mut Vec<u8>, ioapic_id: u8) {
    table.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED]);
    push_u32(table, IOAPIC_GPA_32);
}

fn push_io_interrupt(table: &mut Vec<u8>, isa_irq: u8, ioapic_id: u8, ioapic_pin: u8) {
    table.extend_from_slice(&[ENTRY_IO_INTERRUPT, INTERRUPT_INT]);
    push_u16(table, INTERRUPT_FLAGS_CONFORM);
    table.extend_from_slice(&[ISA_BUS_ID, isa_irq, ioapic_id, ioapic_pin]);
}

/// A local interrupt entry for all local APICs.
fn push_local_interrupt(table: &mut Vec<u8>, interrupt_type: u8, lint: u8) {
    table.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, interrupt_type]);
    push_u16(table, INTERRUPT_FLAGS_CONFORM);
    // Source bus and IRQ do not apply to LINT pins; 0 as firmware writes them.
    table.extend_from_slice(&[ISA_BUS_ID, 0, ALL_LOCAL_APICS, lint]);
}

fn push_u16(table: &mut Vec<u8>, value: u16) {
    table.extend_from_slice(&value.to_le_bytes());
}

fn push_u32(table: &mut Vec<u8>, value: u32) {
    table.extend_from_slice(&value.to_le_bytes());
}

/// The byte that makes `bytes` plus itself sum to 0 mod 256 (`bytes` holds 0 in its place).
fn checksum(bytes: &[u8]) -> u8 {
    let sum = bytes.iter().fold(0u8, |sum, &byte| sum.wrapping_add(byte));
    sum.wrapping_neg()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn byte_sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |sum, &byte| sum.wrapping_add(byte))
    }

    fn read_u16(bytes: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([bytes[at], bytes[at + 1]])
    }

    fn read_u32(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    /// What a guest would learn from the entries.
    #[derive(Debug, Default)]
    struct Parsed {
        /// (APIC id, is bootstrap processor).
        processors: Vec<(u8, bool)>,
        buses: Vec<(u8, [u8; 6])>,
        /// (id, address).
        ioapics: Vec<(u8, u32)>,
        /// (interrupt type, source IRQ, destination IOAPIC id, pin).
        io_interrupts: Vec<(u8, u8, u8, u8)>,
        /// (interrupt type, destination APIC id, LINT pin).
        local_interrupts: Vec<(u8, u8, u8)>,
        entry_count: usize,
    }

    /// Checks both structures' framing and checksums, then walks the entries.
    fn parse(table: &[u8]) -> Parsed {
        let floating = &table[..FLOATING_POINTER_BYTES];
        assert_eq!(&floating[0..4], b"_MP_");
        assert_eq!(u64::from(read_u32(floating, 4)), MPTABLE_GPA + 16);
        assert_eq!(floating[8], 1, "length in 16-byte units");
        assert_eq!(floating[9], 4, "spec revision");
        assert_eq!(byte_sum(floating), 0, "floating pointer checksum");
        assert_eq!(floating[11], 0, "configuration table present");

        let config = &table[FLOATING_POINTER_BYTES..];
        assert_eq!(&config[0..4], b"PCMP");
        let base_length = usize::from(read_u16(config, 4));
        assert_eq!(
            base_length,
            config.len(),
            "the table ends with the base table"
        );
        assert_eq!(config[6], 4, "spec revision");
        assert_eq!(byte_sum(&config[..base_length]), 0, "base table checksum");
        assert_eq!(&config[8..16], b"GMEMCTL ");
        assert_eq!(u64::from(read_u32(config, 36)), APIC_DEFAULT_GPA);
        assert_eq!(read_u16(config, 40), 0, "no extended table");

        let mut parsed = Parsed::default();
        let mut at = CONFIG_HEADER_BYTES;
        while at < base_length {
            let entry = &config[at..];
            let size = match entry[0] {
                0 => {
                    assert_eq!(entry[2], 0x14, "local APIC version");
                    assert_ne!(entry[3] & 1, 0, "processor enabled");
                    parsed.processors.push((entry[1], entry[3] & 2 != 0));
                    20
                }
                1 => {
                    parsed
                        .buses
                        .push((entry[1], entry[2..8].try_into().unwrap()));
                    8
                }
                2 => {
                    assert_eq!(entry[3], 1, "IOAPIC enabled");
                    parsed.ioapics.push((entry[1], read_u32(entry, 4)));
                    8
                }
                3 => {
                    assert_eq!(read_u16(entry, 2), 0, "flags conform to bus");
                    assert_eq!(entry[4], 0, "source bus");
                    parsed
                        .io_interrupts
                        .push((entry[1], entry[5], entry[6], entry[7]));
                    8
                }
                4 => {
                    parsed.local_interrupts.push((entry[1], entry[6], entry[7]));
                    8
                }
                other => panic!("unknown entry type {other} at offset {at}"),
            };
            at += size;
            parsed.entry_count += 1;
        }
        assert_eq!(at, base_length, "the last entry ends where the table does");
        assert_eq!(usize::from(read_u16(config, 34)), parsed.entry_count);
        parsed
    }

    fn check(vcpus: u32) {
        let table = mptable(vcpus).unwrap();
        assert!(table.len() <= MPTABLE_MAX_BYTES);
        let parsed = parse(&table);

        let expected_processors: Vec<(u8, bool)> =
            (0..vcpus).map(|id| (id as u8, id == 0)).collect();
        assert_eq!(parsed.processors, expected_processors);

        assert_eq!(parsed.buses, vec![(0, *b"ISA   ")]);
        assert_eq!(
            parsed.ioapics,
            vec![(vcpus as u8, IOAPIC_DEFAULT_GPA as u32)]
        );

        let ioapic_id = vcpus as u8;
        let expected_io: Vec<(u8, u8, u8, u8)> =
            (0..16).map(|irq| (0, irq, ioapic_id, irq)).collect();
        assert_eq!(parsed.io_interrupts, expected_io);

        assert_eq!(parsed.local_interrupts, vec![(3, 0xff, 0), (1, 0xff, 1)]);
    }

    #[test]
    fn one_vcpu() {
        check(1);
    }

    #[test]
    fn eight_vcpus() {
        check(8);
    }

    #[test]
    fn max_vcpus_fit() {
        check(MPTABLE_MAX_VCPUS);
        assert!(mptable(MPTABLE_MAX_VCPUS).unwrap().len() <= MPTABLE_MAX_BYTES);
    }

    #[test]
    fn every_count_parses() {
        for vcpus in 1..=MPTABLE_MAX_VCPUS {
            check(vcpus);
        }
    }

    #[test]
    fn one_more_than_max_is_refused() {
        let error = mptable(MPTABLE_MAX_VCPUS + 1).unwrap_err();
        assert!(matches!(
            error,
            MpTableError::TooManyVcpus { vcpus, max }
                if vcpus == MPTABLE_MAX_VCPUS + 1 && max == MPTABLE_MAX_VCPUS
        ));
        assert!(matches!(
            mptable(u32::MAX),
            Err(MpTableError::TooManyVcpus { .. })
        ));
    }

    #[test]
    fn zero_vcpus_is_refused() {
        assert!(matches!(mptable(0), Err(MpTableError::NoVcpus)));
    }

    #[test]
    fn max_vcpus_is_what_fits() {
        let bytes_for = |vcpus: usize| FIXED_BYTES + vcpus * PROCESSOR_ENTRY_BYTES;
        let max = MPTABLE_MAX_VCPUS as usize;
        assert!(bytes_for(max) <= MPTABLE_MAX_BYTES);
        assert!(bytes_for(max + 1) > MPTABLE_MAX_BYTES);
        assert_eq!(mptable(MPTABLE_MAX_VCPUS).unwrap().len(), bytes_for(max));
    }
}
