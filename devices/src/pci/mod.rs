//! PCI: one root bus (segment 0, bus 0) behind a host bridge at 00:00.0, configuration access
//! through the 0xCF8/0xCFC ports and ECAM, memory BARs the guest may move, and MSI-X.
//!
//! A function implements [`PciDevice`]: its configuration space ([`config::ConfigSpace`]) and
//! its BARs. [`bus::PciBus`] finds functions by slot and BARs by address; the bus devices in
//! [`access`] put it on tern's port and MMIO buses. A BAR move needs no change to those buses:
//! one MMIO window covers every place a BAR may go, and the PCI bus keeps the map from
//! address to BAR.

pub mod access;
pub mod bus;
pub mod config;
pub mod host_bridge;
pub mod msix;

pub use bus::{PciBus, PciError};

/// A PCI function as the bus sees it.
pub trait PciDevice: Send {
    /// A configuration read at `offset` (0..256).
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    /// A configuration write at `offset` (0..256).
    fn config_write(&mut self, offset: usize, data: &[u8]);
    /// Where memory BAR `index` decodes now, and its size (`None`: not a BAR, not placed, or
    /// memory decoding off).
    fn bar_range(&self, index: usize) -> Option<(u64, u64)>;
    /// A read of `data.len()` bytes at `offset` inside BAR `index`.
    fn bar_read(&mut self, index: usize, offset: u64, data: &mut [u8]);
    /// A write inside BAR `index`.
    fn bar_write(&mut self, index: usize, offset: u64, data: &[u8]);
    /// BAR `index` moved from `from` to `to` (`None`: not decoding): what the device
    /// registered at the old address (ioeventfds) follows it.
    fn bar_moved(&mut self, _index: usize, _from: Option<u64>, _to: Option<u64>) {}
}

/// Signals an eventfd, without a VM exit, when the guest writes to an address (KVM's
/// ioeventfd): how a virtio-pci queue notification reaches the device's worker. Implemented
/// by the VMM; the device registers and unregisters as its BAR moves.
pub trait NotifyRegistrar: Send + Sync {
    /// Any write to the MMIO address `addr` signals `evt`.
    fn register(&self, evt: &crate::os::EventFd, addr: u64) -> std::io::Result<()>;
    /// Undoes [`NotifyRegistrar::register`].
    fn unregister(&self, evt: &crate::os::EventFd, addr: u64) -> std::io::Result<()>;
}
