//! What differs between the platforms tern builds: RAM layout, the interrupt controller, the
//! console UART and other legacy devices, where virtio-mmio devices go, and how the payload is
//! loaded and the vCPUs set up. [`crate::vm`] builds a VM from these and stays the same for
//! every architecture.
//!
//! Each architecture's module provides the same items: `Uart`, `Extra`, `Early`, `ram_regions`,
//! `setup_early`, `legacy_devices`, `virtio_slot`, `boot`, the boot-timer constants, and for
//! PCI `PCI_BAR_WINDOW`, `pci_intx` and `attach_pci` (the slot check and the ECAM and BAR
//! windows are shared, here).

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "aarch64")]
pub use aarch64::*;
#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use x86_64::*;

use std::sync::{Arc, Mutex};

use devices::Bus;

use crate::Result;
use crate::resources::ConfigError;
use crate::vm::insert;

/// Where the guest's RAM ends (the 64-bit PCI window goes above it).
pub(crate) fn ram_end(mem: &vm_memory::GuestMemoryMmap) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter()
        .map(|r| r.start_addr().0 + r.len())
        .max()
        .unwrap_or(0)
}

/// Whether `devices` virtio devices fit the PCI bus (one function per slot, the host bridge
/// in slot 0): the same bus on every platform.
pub fn check_pci(devices: usize) -> std::result::Result<(), ConfigError> {
    let slots = devices::pci::bus::SLOTS - 1;
    if devices > slots {
        return Err(ConfigError::new(
            "machine-config.pci",
            format!(
                "{devices} virtio devices (drives, network interfaces, vsock, balloon, entropy) do not fit the PCI bus's {slots} free slots; configure fewer devices"
            ),
        ));
    }
    Ok(())
}

/// Puts the PCI bus's ECAM and the memory windows its BARs may be placed in on the MMIO bus
/// (the firmware tables or the device tree describe the same `host`), and says so.
pub(crate) fn attach_pci_windows(
    mmio: &mut Bus,
    bus: &Arc<devices::pci::PciBus>,
    host: &arch::PciHost,
) -> Result<()> {
    use devices::pci::access::{BarWindow, Ecam};
    insert(
        mmio,
        Arc::new(Mutex::new(Ecam::new(bus.clone()))),
        host.ecam,
        host.ecam_size,
    )?;
    for (start, end) in [host.mmio32, host.mmio64] {
        if end > start {
            insert(
                mmio,
                Arc::new(Mutex::new(BarWindow::new(bus.clone(), start))),
                start,
                end - start,
            )?;
        }
    }
    log::info!(
        "PCI: {} device(s) on bus 0, ECAM at {:#x}, BARs in {:#x}..{:#x} and {:#x}..{:#x}",
        bus.occupied().len() - 1,
        host.ecam,
        host.mmio32.0,
        host.mmio32.1,
        host.mmio64.0,
        host.mmio64.1
    );
    Ok(())
}

/// Where one virtio-mmio device sits: its window and interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioSlot {
    /// Base address of its register window.
    pub base: u64,
    /// Window size.
    pub len: u64,
    /// Its interrupt: a GSI (x86) or a shared peripheral interrupt (ARM64); the hypervisor's
    /// irqfd number either way.
    pub irq: u32,
}
