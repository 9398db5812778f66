//! The flattened device tree an ARM64 guest boots with (vm-fdt): CPUs with PSCI, memory,
//! `/chosen` (command line, initrd, console), the GIC (with a GICv3 ITS when there is PCI),
//! the architected timer, each MMIO device, and the PCI host (`pci-host-ecam-generic`).

use vm_fdt::FdtWriter;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;
use crate::{Error, Result};

const PHANDLE_GIC: u32 = 1;
const PHANDLE_CLOCK: u32 = 2;
const PHANDLE_ITS: u32 = 3;

/// Slots on bus 0 (the host bridge in slot 0).
const PCI_SLOTS: u8 = 32;

// PCI address cells (the PCI bus binding): the space code in the high cell's bits 25:24.
const PCI_SPACE_MEM32: u32 = 0x0200_0000;
const PCI_SPACE_MEM64: u32 = 0x0300_0000;

// Interrupt specifier cells (the GIC binding: type, number, flags).
const GIC_SPI: u32 = 0;
const GIC_PPI: u32 = 1;
const IRQ_TYPE_EDGE_RISING: u32 = 1;
const IRQ_TYPE_LEVEL_HIGH: u32 = 4;

/// Which interrupt controller the VM has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GicVersion {
    /// GICv2 (at most 8 vCPUs).
    V2,
    /// GICv3.
    V3,
}

/// What kind of MMIO device a node describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// PL011 UART.
    Uart,
    /// PL031 real-time clock.
    Rtc,
    /// A virtio-mmio transport.
    Virtio,
}

/// One MMIO device for the device tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    /// Kind.
    pub kind: DeviceKind,
    /// Base address.
    pub base: u64,
    /// Window size.
    pub len: u64,
    /// Its shared peripheral interrupt.
    pub spi: u32,
}

/// What the device tree describes.
#[derive(Debug, Clone)]
pub struct FdtConfig<'a> {
    /// Each vCPU's MPIDR_EL1, in vCPU order.
    pub mpidrs: &'a [u64],
    /// RAM regions (start, size).
    pub regions: &'a [(u64, u64)],
    /// Kernel command line.
    pub cmdline: &'a str,
    /// The initrd's (start, size), if any.
    pub initrd: Option<(u64, u64)>,
    /// The interrupt controller.
    pub gic: GicVersion,
    /// MMIO devices.
    pub devices: &'a [MmioDevice],
    /// The PCI host, if the VM has one. With a GICv3 its MSIs go through an ITS at
    /// [`GIC_ITS_START`], which this also describes; INTx goes to each slot's SPI
    /// ([`pci_intx_spi`]) either way.
    pub pci: Option<crate::PciHost>,
}

fn fdt_err(e: vm_fdt::Error) -> Error {
    Error::Memory(format!("building the device tree: {e}"))
}

/// Builds the device tree blob.
pub fn create_fdt(cfg: &FdtConfig<'_>) -> Result<Vec<u8>> {
    build(cfg).map_err(fdt_err)
}

fn build(cfg: &FdtConfig<'_>) -> std::result::Result<Vec<u8>, vm_fdt::Error> {
    let mut f = FdtWriter::new()?;
    let root = f.begin_node("")?;
    f.property_string("compatible", "linux,dummy-virt")?;
    f.property_u32("#address-cells", 2)?;
    f.property_u32("#size-cells", 2)?;
    f.property_u32("interrupt-parent", PHANDLE_GIC)?;

    let cpus = f.begin_node("cpus")?;
    f.property_u32("#address-cells", 2)?;
    f.property_u32("#size-cells", 0)?;
    for &mpidr in cfg.mpidrs {
        // The affinity fields (Aff3 and Aff2..Aff0) identify the CPU.
        let id = mpidr & 0xff_00ff_ffff;
        let cpu = f.begin_node(&format!("cpu@{id:x}"))?;
        f.property_string("device_type", "cpu")?;
        f.property_string("compatible", "arm,arm-v8")?;
        f.property_string("enable-method", "psci")?;
        f.property_u64("reg", id)?;
        f.end_node(cpu)?;
    }
    f.end_node(cpus)?;

    for &(start, size) in cfg.regions {
        let m = f.begin_node(&format!("memory@{start:x}"))?;
        f.property_string("device_type", "memory")?;
        f.property_array_u64("reg", &[start, size])?;
        f.end_node(m)?;
    }

    let chosen = f.begin_node("chosen")?;
    f.property_string("bootargs", cfg.cmdline)?;
    if let Some((start, size)) = cfg.initrd {
        f.property_u64("linux,initrd-start", start)?;
        f.property_u64("linux,initrd-end", start + size)?;
    }
    if let Some(uart) = cfg.devices.iter().find(|d| d.kind == DeviceKind::Uart) {
        f.property_string("stdout-path", &format!("/pl011@{:x}", uart.base))?;
    }
    f.end_node(chosen)?;

    let vcpus = cfg.mpidrs.len() as u64;
    match cfg.gic {
        GicVersion::V3 => {
            let redist = gicv3_redist_start(vcpus);
            let gic = f.begin_node(&format!("intc@{GIC_DIST_START:x}"))?;
            f.property_string("compatible", "arm,gic-v3")?;
            f.property_array_u64(
                "reg",
                &[
                    GIC_DIST_START,
                    GIC_DIST_SIZE,
                    redist,
                    vcpus * GICV3_REDIST_SIZE,
                ],
            )?;
            gic_common(&mut f)?;
            if cfg.pci.is_some() {
                let its = f.begin_node(&format!("msi-controller@{GIC_ITS_START:x}"))?;
                f.property_string("compatible", "arm,gic-v3-its")?;
                f.property_null("msi-controller")?;
                f.property_u32("#msi-cells", 1)?;
                f.property_array_u64("reg", &[GIC_ITS_START, GIC_ITS_SIZE])?;
                f.property_phandle(PHANDLE_ITS)?;
                f.end_node(its)?;
            }
            f.end_node(gic)?;
        }
        GicVersion::V2 => {
            let gic = f.begin_node(&format!("intc@{GIC_DIST_START:x}"))?;
            f.property_string("compatible", "arm,cortex-a15-gic")?;
            f.property_array_u64(
                "reg",
                &[
                    GIC_DIST_START,
                    GICV2_DIST_SIZE,
                    GICV2_CPU_START,
                    GICV2_CPU_SIZE,
                ],
            )?;
            gic_common(&mut f)?;
            f.end_node(gic)?;
        }
    }

    // The architected timer's PPIs: secure and non-secure physical, virtual, hypervisor.
    // With a GICv2 the flags also carry the mask of CPUs the PPI goes to.
    let ppi_flags = match cfg.gic {
        GicVersion::V3 => IRQ_TYPE_LEVEL_HIGH,
        GicVersion::V2 => (((1u32 << vcpus.min(8)) - 1) << 8) | IRQ_TYPE_LEVEL_HIGH,
    };
    let timer = f.begin_node("timer")?;
    f.property_string("compatible", "arm,armv8-timer")?;
    f.property_null("always-on")?;
    let mut irqs = Vec::new();
    for ppi in [13, 14, 11, 10] {
        irqs.extend_from_slice(&[GIC_PPI, ppi, ppi_flags]);
    }
    f.property_array_u32("interrupts", &irqs)?;
    f.end_node(timer)?;

    let clock = f.begin_node("apb-pclk")?;
    f.property_string("compatible", "fixed-clock")?;
    f.property_u32("#clock-cells", 0)?;
    f.property_u32("clock-frequency", 24_000_000)?;
    f.property_string("clock-output-names", "clk24mhz")?;
    f.property_phandle(PHANDLE_CLOCK)?;
    f.end_node(clock)?;

    let psci = f.begin_node("psci")?;
    f.property_string("compatible", "arm,psci-0.2")?;
    f.property_string("method", "hvc")?;
    f.end_node(psci)?;

    for d in cfg.devices {
        match d.kind {
            DeviceKind::Uart => {
                let n = f.begin_node(&format!("pl011@{:x}", d.base))?;
                f.property_string_list(
                    "compatible",
                    vec!["arm,pl011".into(), "arm,primecell".into()],
                )?;
                f.property_array_u64("reg", &[d.base, d.len])?;
                f.property_array_u32("interrupts", &[GIC_SPI, d.spi, IRQ_TYPE_LEVEL_HIGH])?;
                f.property_array_u32("clocks", &[PHANDLE_CLOCK, PHANDLE_CLOCK])?;
                f.property_string_list("clock-names", vec!["uartclk".into(), "apb_pclk".into()])?;
                f.end_node(n)?;
            }
            DeviceKind::Rtc => {
                let n = f.begin_node(&format!("rtc@{:x}", d.base))?;
                f.property_string_list(
                    "compatible",
                    vec!["arm,pl031".into(), "arm,primecell".into()],
                )?;
                f.property_array_u64("reg", &[d.base, d.len])?;
                f.property_array_u32("interrupts", &[GIC_SPI, d.spi, IRQ_TYPE_LEVEL_HIGH])?;
                f.property_u32("clocks", PHANDLE_CLOCK)?;
                f.property_string("clock-names", "apb_pclk")?;
                f.end_node(n)?;
            }
            DeviceKind::Virtio => {
                let n = f.begin_node(&format!("virtio_mmio@{:x}", d.base))?;
                f.property_string("compatible", "virtio,mmio")?;
                f.property_array_u64("reg", &[d.base, d.len])?;
                f.property_array_u32("interrupts", &[GIC_SPI, d.spi, IRQ_TYPE_EDGE_RISING])?;
                f.property_null("dma-coherent")?;
                f.end_node(n)?;
            }
        }
    }

    if let Some(pci) = &cfg.pci {
        pci_host(&mut f, pci, cfg.gic == GicVersion::V3)?;
    }

    f.end_node(root)?;
    f.finish()
}

/// The PCI host: a generic ECAM root complex with bus 0 only, its two memory windows (no I/O
/// space), with `its` MSIs to the ITS with the requester ID (bus, device, function) as the ITS
/// device ID, and each slot's INTA# to its SPI, edge-triggered as tern raises it.
fn pci_host(
    f: &mut FdtWriter,
    pci: &crate::PciHost,
    its: bool,
) -> std::result::Result<(), vm_fdt::Error> {
    let n = f.begin_node(&format!("pcie@{:x}", pci.ecam))?;
    f.property_string("compatible", "pci-host-ecam-generic")?;
    f.property_string("device_type", "pci")?;
    f.property_u32("#address-cells", 3)?;
    f.property_u32("#size-cells", 2)?;
    f.property_u32("#interrupt-cells", 1)?;
    f.property_array_u32("bus-range", &[0, 0])?;
    f.property_u32("linux,pci-domain", 0)?;
    f.property_array_u64("reg", &[pci.ecam, pci.ecam_size])?;
    let mut ranges = Vec::new();
    for (space, (start, end)) in [(PCI_SPACE_MEM32, pci.mmio32), (PCI_SPACE_MEM64, pci.mmio64)] {
        if end <= start {
            continue;
        }
        let (hi, lo) = ((start >> 32) as u32, start as u32);
        let size = end - start;
        // PCI address (3 cells), CPU address (2), size (2): identity-mapped.
        ranges.extend_from_slice(&[space, hi, lo, hi, lo, (size >> 32) as u32, size as u32]);
    }
    f.property_array_u32("ranges", &ranges)?;
    if its {
        // Requester IDs 0..0x10000 map to ITS device IDs 0..0x10000.
        f.property_array_u32("msi-map", &[0, PHANDLE_ITS, 0, 0x1_0000])?;
    }
    // INTx: (device << 11, 0, 0; pin 1) to the GIC (its two address cells, then the SPI).
    let mut map = Vec::new();
    for slot in 1..PCI_SLOTS {
        map.extend_from_slice(&[
            u32::from(slot) << 11,
            0,
            0,
            1,
            PHANDLE_GIC,
            0,
            0,
            GIC_SPI,
            pci_intx_spi(slot),
            IRQ_TYPE_EDGE_RISING,
        ]);
    }
    f.property_array_u32("interrupt-map", &map)?;
    f.property_array_u32("interrupt-map-mask", &[0xf800, 0, 0, 7])?;
    f.property_null("dma-coherent")?;
    f.end_node(n)
}

fn gic_common(f: &mut FdtWriter) -> std::result::Result<(), vm_fdt::Error> {
    f.property_u32("#interrupt-cells", 3)?;
    f.property_null("interrupt-controller")?;
    f.property_u32("#address-cells", 2)?;
    f.property_u32("#size-cells", 2)?;
    f.property_null("ranges")?;
    // The maintenance interrupt (PPI 9).
    f.property_array_u32("interrupts", &[GIC_PPI, 9, IRQ_TYPE_LEVEL_HIGH])?;
    f.property_phandle(PHANDLE_GIC)
}

/// Writes the device tree `blob` at `addr`.
pub fn write_fdt(mem: &GuestMemoryMmap, addr: u64, blob: &[u8]) -> Result<()> {
    if blob.len() as u64 > FDT_MAX_SIZE {
        return Err(Error::Memory(format!(
            "the device tree is {} bytes, more than the {FDT_MAX_SIZE} the arm64 boot protocol allows",
            blob.len()
        )));
    }
    mem.write_slice(blob, GuestAddress(addr))
        .map_err(|source| Error::GuestWrite {
            what: "the device tree",
            addr,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_with<'a>(
        gic: GicVersion,
        mpidrs: &'a [u64],
        devices: &'a [MmioDevice],
    ) -> FdtConfig<'a> {
        FdtConfig {
            mpidrs,
            regions: &[(DRAM_START, 256 << 20)],
            cmdline: "console=ttyAMA0 panic=1",
            initrd: Some((DRAM_START + (200 << 20), 4096)),
            gic,
            devices,
            pci: None,
        }
    }

    /// Finds `needle` in the blob (property names and strings are stored verbatim).
    fn has(blob: &[u8], needle: &[u8]) -> bool {
        blob.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn blob_has_every_node() {
        let devices = [
            MmioDevice {
                kind: DeviceKind::Uart,
                base: UART_START,
                len: 0x1000,
                spi: UART_SPI,
            },
            MmioDevice {
                kind: DeviceKind::Rtc,
                base: RTC_START,
                len: 0x1000,
                spi: RTC_SPI,
            },
            MmioDevice {
                kind: DeviceKind::Virtio,
                base: VIRTIO_MMIO_START,
                len: 0x1000,
                spi: VIRTIO_FIRST_SPI,
            },
        ];
        let blob = create_fdt(&cfg_with(
            GicVersion::V3,
            &[0x8000_0000, 0x8000_0001],
            &devices,
        ))
        .unwrap();
        // FDT magic.
        assert_eq!(&blob[..4], &[0xd0, 0x0d, 0xfe, 0xed]);
        for s in [
            &b"cpu@0\0"[..],
            b"cpu@1\0",
            b"memory@80000000\0",
            b"arm,gic-v3\0",
            b"arm,armv8-timer\0",
            b"arm,psci-0.2\0",
            b"pl011@40000000\0",
            b"rtc@40001000\0",
            b"virtio_mmio@40010000\0",
            b"console=ttyAMA0 panic=1\0",
            b"linux,initrd-start",
            b"/pl011@40000000\0",
        ] {
            assert!(has(&blob, s), "missing {:?}", String::from_utf8_lossy(s));
        }
        let v2 = create_fdt(&cfg_with(GicVersion::V2, &[0], &devices)).unwrap();
        assert!(has(&v2, b"arm,cortex-a15-gic\0"));
        assert!(!has(&v2, b"arm,gic-v3\0"));
    }

    /// The big-endian cells of `values`, as the blob stores a property.
    fn cells(values: &[u32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_be_bytes()).collect()
    }

    #[test]
    fn a_pci_host_comes_with_an_its_and_both_windows() {
        let pci = crate::PciHost {
            ecam: PCI_ECAM_START,
            ecam_size: PCI_ECAM_SIZE,
            mmio32: (PCI_MMIO32_START, PCI_MMIO32_END),
            mmio64: (64 << 30, 128 << 30),
        };
        let mut cfg = cfg_with(GicVersion::V3, &[0], &[]);
        let plain = create_fdt(&cfg).unwrap();
        assert!(!has(&plain, b"pci-host-ecam-generic\0"));
        assert!(!has(&plain, b"arm,gic-v3-its\0"));
        cfg.pci = Some(pci);
        let blob = create_fdt(&cfg).unwrap();
        for s in [
            &b"pcie@30000000\0"[..],
            b"pci-host-ecam-generic\0",
            b"msi-controller@3dfd0000\0",
            b"arm,gic-v3-its\0",
            b"msi-map",
        ] {
            assert!(has(&blob, s), "missing {:?}", String::from_utf8_lossy(s));
        }
        // The 32-bit window, then the 64-bit one (64 GiB at 64 GiB).
        assert!(has(
            &blob,
            &cells(&[
                0x0200_0000,
                0,
                0x1000_0000,
                0,
                0x1000_0000,
                0,
                0x2000_0000,
                0x0300_0000,
                0x10,
                0,
                0x10,
                0,
                0x10,
                0
            ])
        ));
        // Requester IDs map one to one onto ITS device IDs.
        assert!(has(&blob, &cells(&[0, PHANDLE_ITS, 0, 0x1_0000])));
        // Slot 1's and slot 31's INTA# go to their SPIs, edge-triggered.
        let intx =
            |slot: u32, spi: u32| cells(&[slot << 11, 0, 0, 1, PHANDLE_GIC, 0, 0, 0, spi, 1]);
        assert!(has(&blob, &intx(1, VIRTIO_FIRST_SPI)));
        assert!(has(&blob, &intx(31, VIRTIO_FIRST_SPI + 30)));
        assert!(has(&blob, &cells(&[0xf800, 0, 0, 7])));
        // A GICv2 has no ITS: INTx only.
        cfg.gic = GicVersion::V2;
        let v2 = create_fdt(&cfg).unwrap();
        assert!(has(&v2, b"pci-host-ecam-generic\0"));
        assert!(has(&v2, &intx(1, VIRTIO_FIRST_SPI)));
        assert!(!has(&v2, b"arm,gic-v3-its\0"));
        assert!(!has(&v2, b"msi-map"));
    }

    #[test]
    fn oversized_blob_is_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(DRAM_START), 8 << 20)]).unwrap();
        let big = vec![0u8; FDT_MAX_SIZE as usize + 1];
        assert!(write_fdt(&mem, DRAM_START, &big).is_err());
        assert!(write_fdt(&mem, DRAM_START, &big[..64]).is_ok());
    }
}
