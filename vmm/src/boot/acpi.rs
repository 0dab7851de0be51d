//! Minimal ACPI tables for Linux guests: RSDP → XSDT → FADT (→ DSDT) and
//! MADT, built with rust-vmm's `acpi_tables`. The MADT lists one local APIC
//! per vCPU and the IOAPIC, which is how a kernel without MP-table support
//! (Debian's cloud kernel) finds the vCPUs beyond the first.
//!
//! The DSDT describes COM1 (`PNP0501`, ports 0x3f8-0x3ff, IRQ 4). With a
//! hardware-reduced FADT Linux allocates no legacy IRQs by itself, so
//! without this no driver could claim IRQ 4 for the UART: the 8250 driver
//! then fails every user-space write to /dev/console with EIO, while the
//! kernel's own messages still get out (found by the nested-KVM harness).

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{Error, Result};

/// Where the RSDP goes: the BIOS area a kernel scans (and the zero page names).
pub const RSDP_ADDR: u64 = 0xe_0000;
/// End of the BIOS area the tables may use.
const TABLES_END: u64 = 0x10_0000;
const LAPIC_ADDR: u32 = 0xfee0_0000;
const IOAPIC_ADDR: u32 = 0xfec0_0000;
const OEM_ID: [u8; 6] = *b"RTVM  ";
const OEM_TABLE: [u8; 8] = *b"RTVMACPI";
/// COM1, as `devices::serial` emulates it.
const COM1_PORT: u16 = 0x3f8;
const COM1_IRQ: u32 = 4;

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

/// The tables, each with the address it is meant for, starting at the RSDP.
pub fn tables(vcpus: u8) -> Vec<(u64, Vec<u8>)> {
    let align = |a: u64| (a + 15) & !15;
    let mut next = align(RSDP_ADDR + 36);
    let mut place = |len: usize| {
        let at = next;
        next = align(next + len as u64);
        at
    };

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    dsdt.append_slice(&com1());
    let dsdt = bytes(&dsdt);
    let dsdt_at = place(dsdt.len());
    // Hardware-reduced: no fixed PM blocks or SCI the VMM would have to emulate.
    let fadt = bytes(
        &FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
            .dsdt_64(dsdt_at)
            .flag(Flags::HwReducedAcpi)
            .finalize(),
    );
    let fadt_at = place(fadt.len());

    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE,
        1,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for cpu in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    let madt = bytes(&madt);
    let madt_at = place(madt.len());

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);
    let xsdt = bytes(&xsdt);
    let xsdt_at = place(xsdt.len());
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_at));

    vec![
        (RSDP_ADDR, rsdp),
        (dsdt_at, dsdt),
        (fadt_at, fadt),
        (madt_at, madt),
        (xsdt_at, xsdt),
    ]
}

/// The DSDT's description of COM1: a 16550 (`PNP0501`) at 0x3f8, 8 ports,
/// on ISA IRQ 4 (edge-triggered, active high, as the serial's irqfd is).
fn com1() -> Vec<u8> {
    let ports = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let resources = aml::ResourceTemplate::new(vec![&ports, &irq]);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &resources);
    bytes(&aml::Device::new(
        "_SB_.COM1".into(),
        vec![&hid, &uid, &crs],
    ))
}

/// Writes the tables for `vcpus` vCPUs; returns the RSDP's address.
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<u64> {
    for (at, table) in tables(vcpus) {
        if at + table.len() as u64 > TABLES_END {
            return Err(Error::Config(format!(
                "ACPI tables for {vcpus} vCPUs do not fit the BIOS area"
            )));
        }
        mem.write_slice(&table, GuestAddress(at))
            .map_err(|e| Error::GuestMemory(format!("writing ACPI tables: {e}")))?;
    }
    Ok(RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, &x| s.wrapping_add(x))
    }

    #[test]
    fn every_table_checks_out() {
        for (at, table) in tables(4) {
            if at == RSDP_ADDR {
                assert_eq!(&table[..8], b"RSD PTR ");
                assert_eq!(checksum(&table[..20]), 0, "RSDP v1 checksum");
                assert_eq!(checksum(&table), 0, "RSDP extended checksum");
            } else {
                let len = u32::from_le_bytes(table[4..8].try_into().unwrap()) as usize;
                assert_eq!(
                    len,
                    table.len(),
                    "{:?} length",
                    std::str::from_utf8(&table[..4])
                );
                assert_eq!(
                    checksum(&table),
                    0,
                    "{:?} checksum",
                    std::str::from_utf8(&table[..4])
                );
            }
        }
    }

    #[test]
    fn madt_lists_one_local_apic_per_vcpu_and_the_ioapic() {
        for vcpus in [1u8, 2, 7] {
            let madt = tables(vcpus)
                .into_iter()
                .find(|(_, t)| &t[..4] == b"APIC")
                .unwrap()
                .1;
            // Interrupt controller structures follow the 44-byte header.
            let (mut at, mut lapics, mut ioapics) = (44, Vec::new(), 0);
            while at < madt.len() {
                let (kind, len) = (madt[at], madt[at + 1] as usize);
                match kind {
                    0 => lapics.push(madt[at + 3]),
                    1 => ioapics += 1,
                    _ => {}
                }
                at += len;
            }
            assert_eq!(lapics, (0..vcpus).collect::<Vec<_>>());
            assert_eq!(ioapics, 1);
        }
    }

    #[test]
    fn the_dsdt_describes_com1_with_its_ports_and_irq() {
        let all = tables(1);
        let dsdt = &all.iter().find(|(_, t)| &t[..4] == b"DSDT").unwrap().1;
        let body = &dsdt[36..];
        let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"COM1"), "a device named COM1");
        // _HID EISAID("PNP0501"): the compressed EISA id, a DWord constant.
        assert!(has(b"_HID\x0c\x41\xd0\x05\x01"), "_HID PNP0501");
        // I/O port descriptor: decode16, min = max = 0x3f8, 8 ports.
        assert!(
            has(&[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]),
            "I/O 0x3f8-0x3ff"
        );
        // Extended IRQ descriptor: consumer, edge, active high, one interrupt: 4.
        assert!(
            has(&[0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0x00, 0x00, 0x00]),
            "IRQ 4"
        );
    }

    #[test]
    fn the_xsdt_points_at_fadt_and_madt_and_the_rsdp_at_the_xsdt() {
        let all = tables(2);
        let find = |sig: &[u8]| {
            all.iter()
                .find(|(_, t)| &t[..4] == sig)
                .map(|(a, _)| *a)
                .unwrap()
        };
        let xsdt = &all.iter().find(|(_, t)| &t[..4] == b"XSDT").unwrap().1;
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(entries, vec![find(b"FACP"), find(b"APIC")]);
        let rsdp = &all[0].1;
        assert_eq!(
            u64::from_le_bytes(rsdp[24..32].try_into().unwrap()),
            find(b"XSDT")
        );
    }
}
