//! Minimal hardware-reduced ACPI: RSDP → XSDT → {FADT → DSDT, MADT}.
//!
//! The FADT announces hardware-reduced ACPI with a sleep control/status register pair and a
//! reset register on I/O ports, and the DSDT carries the `_S5_` package, so a stock kernel powers
//! off (`poweroff -f`) by writing `SLP_TYP=5 | SLP_EN` to the sleep control port. The MADT lists
//! one local APIC per vCPU and the IOAPIC.

use acpi_tables::{
    Aml,
    aml::{
        AddressSpace as AmlAddressSpace, AddressSpaceCacheable, Device, EISAName, IO, Interrupt,
        Memory32Fixed, Method, Name, Package, Path, ResourceTemplate, Return,
    },
    fadt::{FADTBuilder, Flags},
    gas::{AccessSize, AddressSpace, GAS},
    madt::{EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic},
    mcfg::MCFG,
    rsdp::Rsdp,
    sdt::Sdt,
    xsdt::XSDT,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;
use crate::{Error, Result};

const OEM_ID: [u8; 6] = *b"TERN  ";
const OEM_TABLE_ID: [u8; 8] = *b"TERNVM  ";
const OEM_REVISION: u32 = 1;

/// IAPC_BOOT_ARCH: no VGA, no CMOS RTC to touch before ACPI says so (tern has only a stub).
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;

fn io_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// A virtio-mmio device window to describe in the DSDT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    /// Guest-physical base of its register window.
    pub base: u64,
    /// Size of the window.
    pub len: u64,
    /// Its interrupt (GSI).
    pub gsi: u32,
}

pub use crate::PciHost;

/// The root bridge `PC00` (PNP0A08, bus 0, config ports 0xCF8..0xCFF, the two memory
/// windows) and a motherboard resource (PNP0C02) reserving ECAM, which Linux wants to see
/// before it uses MCFG.
fn pci_root(dsdt: &mut Sdt, pci: &PciHost) {
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0A08"));
    let cid = Name::new("_CID".into(), &EISAName::new("PNP0A03"));
    let zero = 0u8;
    let adr = Name::new("_ADR".into(), &zero);
    let seg = Name::new("_SEG".into(), &zero);
    let uid = Name::new("_UID".into(), &zero);
    let bbn = Name::new("_BBN".into(), &zero);
    let buses = AmlAddressSpace::new_bus_number(0u16, 0u16);
    let cfg_io = IO::new(0xcf8, 0xcf8, 1, 8);
    // Every other port (but the config ports) goes through the bridge too.
    let io_low = AmlAddressSpace::new_io(0u16, 0xcf7u16, None);
    let io_high = AmlAddressSpace::new_io(0xd00u16, 0xffffu16, None);
    let m32 = AmlAddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        pci.mmio32.0 as u32,
        (pci.mmio32.1 - 1) as u32,
        None,
    );
    let m64 = AmlAddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        pci.mmio64.0,
        pci.mmio64.1 - 1,
        None,
    );
    let crs = Name::new(
        "_CRS".into(),
        &ResourceTemplate::new(vec![&buses, &cfg_io, &io_low, &io_high, &m32, &m64]),
    );
    // INTx: each slot's INTA# (device ffff, pin 0) to the link device of its GSI.
    let slots: Vec<(u32, u8, Path, u8)> = (1..=PCI_SLOTS)
        .map(|slot| {
            let link = format!("\\_SB_.{}", link_name(pci_intx_gsi(slot)));
            ((u32::from(slot) << 16) | 0xffff, 0u8, Path::new(&link), 0u8)
        })
        .collect();
    let entries: Vec<Package> = slots
        .iter()
        .map(|(adr, pin, link, index)| Package::new(vec![adr, pin, link, index]))
        .collect();
    let prt = Name::new(
        "_PRT".into(),
        &Package::new(entries.iter().map(|p| p as &dyn Aml).collect()),
    );
    Device::new(
        "_SB_.PC00".into(),
        vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs, &prt],
    )
    .to_aml_bytes(dsdt);
    // One PCI interrupt link (PNP0C0F) per GSI the slots use, fixed at that GSI and
    // edge-triggered, active high, as tern raises it (an irqfd pulse): the default for a _PRT
    // entry naming a GSI itself would be level, active low.
    let mut gsis: Vec<u32> = (1..=PCI_SLOTS).map(pci_intx_gsi).collect();
    gsis.sort_unstable();
    gsis.dedup();
    for gsi in gsis {
        let irq = Interrupt::new(true, true, false, true, gsi);
        let hid = Name::new("_HID".into(), &EISAName::new("PNP0C0F"));
        let uid = Name::new("_UID".into(), &gsi);
        let prs = Name::new("_PRS".into(), &ResourceTemplate::new(vec![&irq]));
        let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&irq]));
        let present = 0x0bu8;
        let ret = Return::new(&present);
        let sta = Method::new("_STA".into(), 0, false, vec![&ret]);
        let srs = Method::new("_SRS".into(), 1, false, vec![]);
        let dis = Method::new("_DIS".into(), 0, false, vec![]);
        let path = format!("_SB_.{}", link_name(gsi));
        Device::new(
            path.as_str().into(),
            vec![&hid, &uid, &prs, &crs, &sta, &srs, &dis],
        )
        .to_aml_bytes(dsdt);
    }
    let mres_hid = Name::new("_HID".into(), &EISAName::new("PNP0C02"));
    let mres_uid = Name::new("_UID".into(), &zero);
    let ecam = Memory32Fixed::new(false, pci.ecam as u32, pci.ecam_size as u32);
    let mres_crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&ecam]));
    Device::new("_SB_.MRES".into(), vec![&mres_hid, &mres_uid, &mres_crs]).to_aml_bytes(dsdt);
}

/// The slots a _PRT describes: every one but the host bridge's.
const PCI_SLOTS: u8 = 31;

/// The name of GSI `gsi`'s PCI interrupt link device.
fn link_name(gsi: u32) -> String {
    format!("LK{:02X}", gsi & 0xff)
}

fn dsdt(virtio: &[MmioDevice], pci: Option<&PciHost>) -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let s5_type = ACPI_S5_SLEEP_TYPE;
    let s5 = Name::new("_S5_".into(), &Package::new(vec![&s5_type]));
    s5.to_aml_bytes(&mut dsdt);
    // With hardware-reduced ACPI the kernel has no legacy PIC, so ISA IRQs are not identity
    // mapped to IOAPIC pins: a legacy device's interrupt works only if the DSDT describes it.
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    let uid_val = 0u8;
    let uid = Name::new("_UID".into(), &uid_val);
    let irq = Interrupt::new(true, true, false, false, COM1_GSI);
    let io = IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&io, &irq]));
    Device::new("_SB_.COM1".into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut dsdt);
    // The i8042 keyboard controller (data 0x60, command/status 0x64, IRQ 1), for Linux's
    // i8042/atkbd drivers (and so the API's SendCtrlAltDel).
    let kbd_hid = Name::new("_HID".into(), &EISAName::new("PNP0303"));
    let kbd_irq = Interrupt::new(true, true, false, false, I8042_GSI);
    let kbd_data = IO::new(I8042_PORT, I8042_PORT, 1, 1);
    let kbd_cmd = IO::new(I8042_PORT + 4, I8042_PORT + 4, 1, 1);
    let kbd_crs = Name::new(
        "_CRS".into(),
        &ResourceTemplate::new(vec![&kbd_data, &kbd_cmd, &kbd_irq]),
    );
    Device::new("_SB_.PS2K".into(), vec![&kbd_hid, &kbd_crs]).to_aml_bytes(&mut dsdt);
    // virtio-mmio devices: "LNRO0005" is what Linux's virtio_mmio driver matches in ACPI.
    for (i, d) in virtio.iter().enumerate() {
        let hid_str: &'static str = "LNRO0005";
        let hid = Name::new("_HID".into(), &hid_str);
        let uid_val = i as u32;
        let uid = Name::new("_UID".into(), &uid_val);
        let mem = Memory32Fixed::new(true, d.base as u32, d.len as u32);
        let irq = Interrupt::new(true, true, false, false, d.gsi);
        let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&mem, &irq]));
        let path = format!("_SB_.V{i:03X}");
        Device::new(path.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut dsdt);
    }
    if let Some(pci) = pci {
        pci_root(&mut dsdt, pci);
    }
    // Sdt::append keeps the header's length field as created; fix it up before checksumming.
    let len = dsdt.len() as u32;
    dsdt.write_u32(4, len);
    dsdt.update_checksum();
    dsdt.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH_VGA_NOT_PRESENT.into();
    fadt.sleep_control_reg = io_gas(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_gas(ACPI_SLEEP_STATUS_PORT);
    fadt.reset_reg = io_gas(ACPI_RESET_PORT);
    fadt.reset_value = ACPI_RESET_VALUE;
    bytes(&fadt.finalize())
}

fn madt(vcpu_count: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for i in 0..vcpu_count {
        madt.add_structure(ProcessorLocalApic::new(i, i, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    bytes(&madt)
}

fn mcfg(pci: &PciHost) -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(pci.ecam, 0, 0, 0);
    bytes(&mcfg)
}

/// Writes the ACPI tables for `vcpu_count` vCPUs, the virtio-mmio devices and the PCI host
/// bridge (if any) at [`ACPI_START`] and returns the RSDP's address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    vcpu_count: u8,
    virtio: &[MmioDevice],
    pci: Option<&PciHost>,
) -> Result<u64> {
    // The MADT's processor UIDs and APIC IDs are 8 bits; APIC ID 0xff is broadcast.
    if vcpu_count == u8::MAX {
        return Err(Error::TooManyVcpus(vcpu_count.into(), 254));
    }
    let align = |a: u64| (a + 15) & !15;
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);

    let dsdt = dsdt(virtio, pci);
    let madt = madt(vcpu_count);
    let mcfg = pci.map(mcfg).unwrap_or_default();
    // The XSDT holds two or three 8-byte pointers after its 36-byte header.
    let entries = if pci.is_some() { 3 } else { 2 };
    let fadt_addr = align(xsdt_addr + 36 + entries * 8);
    let fadt_len = acpi_tables::fadt::FADT::len() as u64;
    let dsdt_addr = align(fadt_addr + fadt_len);
    let madt_addr = align(dsdt_addr + dsdt.len() as u64);
    let mcfg_addr = align(madt_addr + madt.len() as u64);
    let end = mcfg_addr + mcfg.len() as u64;
    if end > ACPI_END {
        return Err(Error::TooManyVcpus(vcpu_count.into(), 254));
    }
    let fadt = fadt(dsdt_addr);

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    if pci.is_some() {
        xsdt.add_entry(mcfg_addr);
    }

    for (what, addr, data) in [
        ("ACPI RSDP", rsdp_addr, bytes(&Rsdp::new(OEM_ID, xsdt_addr))),
        ("ACPI XSDT", xsdt_addr, bytes(&xsdt)),
        ("ACPI FADT", fadt_addr, fadt),
        ("ACPI DSDT", dsdt_addr, dsdt),
        ("ACPI MADT", madt_addr, madt),
        ("ACPI MCFG", mcfg_addr, mcfg),
    ] {
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(|source| Error::GuestWrite { what, addr, source })?;
    }
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(data: &[u8]) -> bool {
        data.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn table_at(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
        let mut v = vec![0u8; len as usize];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn tables_chain_and_checksum() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dev = MmioDevice {
            base: VIRTIO_MMIO_START,
            len: 0x1000,
            gsi: 5,
        };
        let rsdp = write_tables(&mem, 4, &[dev], None).unwrap();
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(rsdp)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        let xsdt_addr: u64 = mem.read_obj(GuestAddress(rsdp + 24)).unwrap();
        let xsdt = table_at(&mem, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let fadt_addr = u64::from_le_bytes(xsdt[36..44].try_into().unwrap());
        let madt_addr = u64::from_le_bytes(xsdt[44..52].try_into().unwrap());
        let fadt = table_at(&mem, fadt_addr);
        assert_eq!(&fadt[..4], b"FACP");
        assert!(checksum_ok(&fadt));
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "hardware-reduced flag");
        // X_DSDT at offset 140.
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table_at(&mem, dsdt_addr);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(&dsdt));
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        assert!(dsdt.windows(4).any(|w| w == b"COM1"));
        assert!(dsdt.windows(4).any(|w| w == b"PS2K"));
        assert!(dsdt.windows(8).any(|w| w == b"LNRO0005"));
        assert!(dsdt.windows(4).any(|w| w == b"V000"));
        let madt = table_at(&mem, madt_addr);
        assert_eq!(&madt[..4], b"APIC");
        assert!(checksum_ok(&madt));
        // Header (44) + 4 local APICs (8 each) + 1 IOAPIC (12).
        assert_eq!(madt.len(), 44 + 4 * 8 + 12);
    }

    #[test]
    fn many_vcpus_still_fit() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(write_tables(&mem, 254, &[], None).is_ok());
        assert!(write_tables(&mem, 255, &[], None).is_err());
        let pci = PciHost {
            ecam: PCI_ECAM_START,
            ecam_size: PCI_ECAM_SIZE,
            mmio32: (PCI_MMIO32_START, PCI_MMIO32_END),
            mmio64: (64 << 30, 128 << 30),
        };
        assert!(write_tables(&mem, 254, &[], Some(&pci)).is_ok());
    }

    #[test]
    fn a_pci_host_gets_mcfg_and_a_root_bridge() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let pci = PciHost {
            ecam: PCI_ECAM_START,
            ecam_size: PCI_ECAM_SIZE,
            mmio32: (PCI_MMIO32_START, PCI_MMIO32_END),
            mmio64: (64 << 30, 128 << 30),
        };
        let rsdp = write_tables(&mem, 2, &[], Some(&pci)).unwrap();
        let xsdt_addr: u64 = mem.read_obj(GuestAddress(rsdp + 24)).unwrap();
        let xsdt = table_at(&mem, xsdt_addr);
        assert_eq!(xsdt.len(), 36 + 3 * 8);
        let mcfg_addr = u64::from_le_bytes(xsdt[52..60].try_into().unwrap());
        let mcfg = table_at(&mem, mcfg_addr);
        assert_eq!(&mcfg[..4], b"MCFG");
        assert!(checksum_ok(&mcfg));
        // One allocation: base, segment 0, buses 0..=0.
        assert_eq!(mcfg.len(), 44 + 16);
        assert_eq!(
            u64::from_le_bytes(mcfg[44..52].try_into().unwrap()),
            PCI_ECAM_START
        );
        assert_eq!((mcfg[54], mcfg[55]), (0, 0));
        let fadt_addr = u64::from_le_bytes(xsdt[36..44].try_into().unwrap());
        let fadt = table_at(&mem, fadt_addr);
        let dsdt = table_at(&mem, u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
        assert!(checksum_ok(&dsdt));
        assert!(dsdt.windows(4).any(|w| w == b"PC00"));
        assert!(dsdt.windows(4).any(|w| w == b"MRES"));
        // PNP0A08 as an EISA ID: 0x41d0, 0x0a08.
        assert!(dsdt.windows(4).any(|w| w == [0x41, 0xd0, 0x0a, 0x08]));
        // INTx: the _PRT, and a link device (PNP0C0F: 0x41d0, 0x0c0f) for each GSI 5..=23,
        // edge-triggered, active high, shareable (an extended IRQ descriptor: 0x89, length 6,
        // flags 0b1011, one interrupt).
        assert!(dsdt.windows(4).any(|w| w == b"_PRT"));
        assert!(dsdt.windows(4).any(|w| w == [0x41, 0xd0, 0x0c, 0x0f]));
        for gsi in 5u32..=23 {
            let name = link_name(gsi);
            assert!(dsdt.windows(4).any(|w| w == name.as_bytes()), "{name}");
            let mut desc = vec![0x89, 6, 0, 0b1011, 1];
            desc.extend_from_slice(&gsi.to_le_bytes());
            assert!(dsdt.windows(desc.len()).any(|w| w == desc), "{name}");
        }
        assert!(!dsdt.windows(4).any(|w| w == link_name(24).as_bytes()));
    }
}
