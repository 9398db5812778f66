//! Fixed guest-physical addresses and interrupt numbers of the ARM64 platform.
//!
//! ```text
//! 0x1000_0000  PCI 32-bit memory window (BARs), up to the ECAM
//! 0x3000_0000  PCI ECAM, bus 0 (1 MiB)
//! 0x3dfd_0000  GICv3 ITS (128 KiB; with PCI only)
//! 0x3ffb_0000.. GIC redistributors (GICv3, 128 KiB per vCPU, growing down from the distributor)
//! 0x3ffe_0000  GICv2 CPU interface (8 KiB)   0x3fff_0000  GIC distributor (64 KiB)
//! 0x4000_0000  PL011 UART   0x4000_1000  PL031 RTC   0x4000_2000  boot timer
//! 0x4001_0000  virtio-mmio windows (4 KiB each)
//! 0x8000_0000  RAM: kernel at the start (2 MiB aligned + text_offset), initrd below the
//!              device tree, the device tree in the last 2 MiB
//! 64 GiB       PCI 64-bit memory window (64 GiB; at the next GiB above RAM for bigger guests)
//! ```
//!
//! Interrupts: shared peripheral interrupt (SPI) `n` is GIC interrupt ID `32 + n`, and KVM's
//! irqfd GSI `n`; the device tree names it `<0 n flags>`.

/// Start of guest RAM.
pub const DRAM_START: u64 = 0x8000_0000;
/// Most RAM: up to 1 TiB of guest-physical addresses (KVM's default 40-bit IPA space).
pub const DRAM_MAX_SIZE: u64 = (1 << 40) - DRAM_START;
/// The device tree lives in the last 2 MiB of RAM.
pub const FDT_MAX_SIZE: u64 = 0x20_0000;
/// The kernel is loaded at a 2 MiB boundary (plus the Image's text_offset).
pub const KERNEL_ALIGN: u64 = 0x20_0000;

/// Start of the device (MMIO) area.
pub const MMIO_START: u64 = 0x4000_0000;
/// PL011 UART (the console, `ttyAMA0`).
pub const UART_START: u64 = MMIO_START;
/// PL031 RTC.
pub const RTC_START: u64 = MMIO_START + 0x1000;
/// Size of each legacy device window.
pub const LEGACY_SIZE: u64 = 0x1000;
/// Firecracker's boot-timer device.
pub const BOOT_TIMER_START: u64 = MMIO_START + 0x2000;
/// Size of the boot-timer window.
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// The byte a guest writes to the boot timer.
pub const BOOT_TIMER_MAGIC: u8 = 123;
/// Virtio-mmio device windows start here.
pub const VIRTIO_MMIO_START: u64 = MMIO_START + 0x1_0000;

/// GIC distributor.
pub const GIC_DIST_START: u64 = MMIO_START - GIC_DIST_SIZE;
/// GIC distributor size (KVM: 64 KiB for GICv3; GICv2 uses the first 4 KiB).
pub const GIC_DIST_SIZE: u64 = 0x1_0000;
/// GICv2 distributor size.
pub const GICV2_DIST_SIZE: u64 = 0x1000;
/// GICv2 CPU interface.
pub const GICV2_CPU_START: u64 = GIC_DIST_START - 0x1_0000;
/// GICv2 CPU interface size.
pub const GICV2_CPU_SIZE: u64 = 0x2000;
/// Size of one GICv3 redistributor (two 64 KiB frames).
pub const GICV3_REDIST_SIZE: u64 = 0x2_0000;

/// The GICv3 redistributor region for `vcpus` vCPUs, right below the distributor.
pub const fn gicv3_redist_start(vcpus: u64) -> u64 {
    GIC_DIST_START - vcpus * GICV3_REDIST_SIZE
}

/// The GICv3 ITS (MSI translation for PCI) frame size: control and translation, 64 KiB each.
pub const GIC_ITS_SIZE: u64 = 0x2_0000;
/// The GICv3 ITS, below the largest redistributor region.
pub const GIC_ITS_START: u64 = gicv3_redist_start(MAX_VCPUS as u64) - GIC_ITS_SIZE;
/// Where an MSI is written to be translated by the ITS (`GITS_TRANSLATER`).
pub const GIC_ITS_TRANSLATER: u64 = GIC_ITS_START + 0x1_0040;

/// PCI ECAM: configuration space of bus 0, 1 MiB.
pub const PCI_ECAM_START: u64 = 0x3000_0000;
/// Size of the ECAM window.
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// The 32-bit PCI memory window, where tern places BARs.
pub const PCI_MMIO32_START: u64 = 0x1000_0000;
/// End (exclusive) of the 32-bit PCI memory window.
pub const PCI_MMIO32_END: u64 = PCI_ECAM_START;
/// Size of the 64-bit PCI memory window (it starts above RAM: [`pci_mmio64_start`]).
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;
/// The guest-physical address space KVM gives an ARM64 VM by default (40 bits).
pub const IPA_LIMIT: u64 = 1 << 40;

/// Where the 64-bit PCI memory window starts for a guest whose RAM ends at `ram_end`: at
/// 64 GiB, or at the next GiB above RAM for bigger guests.
pub fn pci_mmio64_start(ram_end: u64) -> u64 {
    ram_end.next_multiple_of(1 << 30).max(64 << 30)
}

/// Interrupts the GIC implements: 32 private + 96 shared.
pub const GIC_NR_IRQS: u32 = 128;
/// SPI of the UART.
pub const UART_SPI: u32 = 1;
/// SPI of the RTC.
pub const RTC_SPI: u32 = 2;
/// SPI of the first virtio-mmio device (the next ones count up).
pub const VIRTIO_FIRST_SPI: u32 = 16;
/// Most virtio devices: one SPI each, up to the GIC's last interrupt.
pub const MAX_VIRTIO_DEVICES: usize = (GIC_NR_IRQS - 32 - VIRTIO_FIRST_SPI) as usize;
/// The SPI of PCI slot `slot`'s INTA# (every tern function uses pin A): the virtio-mmio SPIs
/// (unused on PCI), one per slot.
pub fn pci_intx_spi(slot: u8) -> u32 {
    VIRTIO_FIRST_SPI + u32::from(slot.saturating_sub(1)) % MAX_VIRTIO_DEVICES as u32
}

/// Most vCPUs with a GICv3 (their redistributors fit below the distributor). A GICv2 takes 8.
pub const MAX_VCPUS: usize = 256;
/// Most vCPUs with a GICv2.
pub const GICV2_MAX_VCPUS: usize = 8;

/// Largest command line the arm64 kernel accepts (COMMAND_LINE_SIZE), including the NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// The guest RAM region for `mem_bytes` of memory: one block from [`DRAM_START`].
pub fn ram_regions(mem_bytes: u64) -> Vec<(u64, u64)> {
    vec![(DRAM_START, mem_bytes)]
}

/// Where the device tree goes for RAM `regions`: the last [`FDT_MAX_SIZE`] bytes of the
/// first region. The arm64 boot protocol wants it 8-byte aligned, at most 2 MiB, and alone in
/// its 2 MiB block; `None` when RAM is too small to spare that.
pub fn fdt_addr(regions: &[(u64, u64)]) -> Option<u64> {
    let &(start, size) = regions.first()?;
    if size < FDT_MAX_SIZE * 2 {
        return None;
    }
    Some(start + size - FDT_MAX_SIZE)
}

// The regions do not overlap (checked at compile time).
const _: () = {
    assert!(gicv3_redist_start(MAX_VCPUS as u64) > 0x2000_0000);
    assert!(GICV2_CPU_START + GICV2_CPU_SIZE <= GIC_DIST_START);
    assert!(GIC_ITS_START + GIC_ITS_SIZE <= gicv3_redist_start(MAX_VCPUS as u64));
    assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= GIC_ITS_START);
    assert!(PCI_MMIO32_END <= PCI_ECAM_START);
    assert!(GIC_DIST_START + GIC_DIST_SIZE == MMIO_START);
    assert!(BOOT_TIMER_START + BOOT_TIMER_SIZE <= VIRTIO_MMIO_START);
    assert!(VIRTIO_MMIO_START + MAX_VIRTIO_DEVICES as u64 * 0x1000 <= DRAM_START);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_tree_goes_at_the_top_of_ram() {
        assert_eq!(
            fdt_addr(&ram_regions(256 << 20)),
            Some(DRAM_START + (254 << 20))
        );
        assert_eq!(fdt_addr(&ram_regions(2 << 20)), None);
    }
}
