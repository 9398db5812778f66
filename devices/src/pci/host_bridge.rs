//! The host bridge at 00:00.0: a function with no BARs that tells the guest a PCI host
//! bridge is there (class 06/00/00).

use super::PciDevice;
use super::config::{ConfigSpace, Identity};

/// Red Hat, Inc.: the vendor of the generic PCIe host bridge (the ID QEMU's `gpex` uses too).
const VENDOR: u16 = 0x1b36;
/// The generic PCIe host bridge.
const DEVICE: u16 = 0x0008;

/// The host bridge.
pub struct HostBridge {
    config: ConfigSpace,
}

impl Default for HostBridge {
    fn default() -> Self {
        Self {
            config: ConfigSpace::new(Identity {
                vendor: VENDOR,
                device: DEVICE,
                revision: 0,
                class: 0x06_00_00,
                subsystem_vendor: 0,
                subsystem: 0,
            }),
        }
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }

    fn bar_range(&self, _index: usize) -> Option<(u64, u64)> {
        None
    }

    fn bar_read(&mut self, _index: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn bar_write(&mut self, _index: usize, _offset: u64, _data: &[u8]) {}
}
