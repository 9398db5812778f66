//! Fixed guest-physical addresses of the x86_64 platform.
//!
//! ```text
//! 0x0000_0500  GDT                      0x0000_6000  PVH hvm_start_info
//! 0x0000_0520  IDT (empty)              0x0000_7000  zero page (boot_params) / PVH memory map
//! 0x0000_8ff0  boot stack top           0x0000_9000  PML4, 0xa000 PDPTE, 0xb000 PDE
//! 0x0002_0000  kernel command line      0x0009_fc00  EBDA start (end of low RAM)
//! 0x000e_0000  ACPI tables (RSDP first) 0x000f_0000  SMBIOS (entry point, then tables)
//! 0x0010_0000  high memory: kernel, initrd, RAM
//! 0xc000_0000  MMIO hole start: boot timer, then device windows (0xd000_0000 virtio-mmio)
//! 0xfec0_0000  IOAPIC                   0xfee0_0000  LAPIC
//! 0x1_0000_0000 RAM above 4 GiB when the guest has more than the hole leaves below it
//! ```

/// Global descriptor table.
pub const GDT_START: u64 = 0x500;
/// Interrupt descriptor table (left empty: the kernel installs its own).
pub const IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map table (follows the start info page).
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page table.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (2 MiB pages, identity map of the first GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line the x86 kernel accepts (COMMAND_LINE_SIZE), including the NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: low RAM ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables live in the BIOS read-only area where the kernel also scans for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
/// End of the ACPI area.
pub const ACPI_END: u64 = 0xf0000;
/// SMBIOS: the F-segment, where Linux scans for the entry point on 16-byte boundaries.
pub const SMBIOS_START: u64 = 0xf0000;
/// End of the SMBIOS area.
pub const SMBIOS_END: u64 = 0x100000;
/// First address of high memory.
pub const HIMEM_START: u64 = 0x100000;
/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// First address above 4 GiB.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// Firecracker's boot-timer device (a guest write of [`BOOT_TIMER_MAGIC`] logs the boot time).
pub const BOOT_TIMER_START: u64 = MMIO_HOLE_START;
/// Size of the boot-timer window.
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// The byte a guest writes to the boot timer.
pub const BOOT_TIMER_MAGIC: u8 = 123;
/// Virtio-mmio device windows start here (one 4 KiB window each).
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// GSI of the first virtio-mmio device (the next ones count up).
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// Most virtio devices: one IOAPIC pin each, GSIs 5 to 23 (KVM's IOAPIC has 24 pins).
pub const MAX_VIRTIO_DEVICES: usize = 24 - VIRTIO_FIRST_GSI as usize;
/// PCI ECAM (MCFG): configuration space of bus 0, 1 MiB.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// Size of the ECAM window (one bus).
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// The 32-bit PCI memory window, where tern places BARs (below the IOAPIC).
pub const PCI_MMIO32_START: u64 = 0xe100_0000;
/// End (exclusive) of the 32-bit PCI memory window.
pub const PCI_MMIO32_END: u64 = IOAPIC_START;
/// Size of the 64-bit PCI memory window (it starts above RAM: [`pci_mmio64_start`]).
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;
/// IOAPIC base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// LAPIC base.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS somewhere in the hole.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// PIO: ACPI sleep control register (hardware-reduced ACPI, written on S5 = power off).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// PIO: ACPI sleep status register.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// PIO: ACPI reset register (`reboot=acpi`).
pub const ACPI_RESET_PORT: u16 = 0x602;
/// Value written to the reset register.
pub const ACPI_RESET_VALUE: u8 = 1;
/// The S5 (soft off) sleep type tern announces in the DSDT's `_S5_` package.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;
/// PIO: first 16550 UART (COM1, ttyS0).
pub const COM1_PORT: u16 = 0x3f8;
/// GSI of COM1.
pub const COM1_GSI: u32 = 4;
/// PIO: i8042 keyboard controller data port (command port is +4).
pub const I8042_PORT: u16 = 0x60;
/// GSI of the i8042 keyboard.
pub const I8042_GSI: u32 = 1;
/// PIO: CMOS/RTC index and data ports.
pub const CMOS_PORT: u16 = 0x70;

/// The GSI of PCI slot `slot`'s INTA# (every tern function uses pin A): the virtio-mmio GSIs
/// (unused on PCI), one per slot from slot 1, shared from slot 20 on.
pub fn pci_intx_gsi(slot: u8) -> u32 {
    VIRTIO_FIRST_GSI + u32::from(slot.saturating_sub(1)) % MAX_VIRTIO_DEVICES as u32
}

/// Where the 64-bit PCI memory window starts for a guest whose RAM ends at `ram_end`: at
/// 64 GiB, or at the next GiB above RAM for bigger guests.
pub fn pci_mmio64_start(ram_end: u64) -> u64 {
    ram_end.next_multiple_of(1 << 30).max(64 << 30)
}
