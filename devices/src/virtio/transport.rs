//! What the VMM asks of any virtio transport once the device is on its bus: the worker's
//! half, a nudge to look at every queue, and the state for a snapshot. Everything else (the
//! device, its status, its interrupts) is in the [`DeviceSide`] the transports share.

use std::sync::{Arc, Mutex};

use super::device_side::DeviceSide;
use super::pci::PciTransportState;
use super::state::VirtioState;

/// A transport's saved state: the virtio core's, and virtio-pci's own where it is PCI.
#[derive(Debug, Clone, PartialEq)]
pub struct TransportState {
    /// The virtio core.
    pub core: VirtioState,
    /// The PCI function (configuration space, MSI-X); `None` on virtio-mmio.
    pub pci: Option<PciTransportState>,
}

/// A virtio transport (virtio-mmio or virtio-pci) as the VMM drives it.
pub trait VirtioTransport: Send {
    /// The worker's half: the device, its queues and interrupts.
    fn device_side(&self) -> Arc<Mutex<DeviceSide>>;
    /// Makes the worker look at every queue again.
    fn kick_queues(&self);
    /// The state for a snapshot, with `side` (this transport's) locked by the caller.
    fn save_with(&self, side: &DeviceSide) -> TransportState;
}

impl VirtioTransport for super::mmio::MmioTransport {
    fn device_side(&self) -> Arc<Mutex<DeviceSide>> {
        super::mmio::MmioTransport::device_side(self)
    }

    fn kick_queues(&self) {
        super::mmio::MmioTransport::kick_queues(self);
    }

    fn save_with(&self, side: &DeviceSide) -> TransportState {
        TransportState {
            core: super::mmio::MmioTransport::save_with(self, side),
            pci: None,
        }
    }
}

impl VirtioTransport for super::pci::PciTransport {
    fn device_side(&self) -> Arc<Mutex<DeviceSide>> {
        super::pci::PciTransport::device_side(self)
    }

    fn kick_queues(&self) {
        super::pci::PciTransport::kick_queues(self);
    }

    fn save_with(&self, side: &DeviceSide) -> TransportState {
        let (core, pci) = super::pci::PciTransport::save_with(self, side);
        TransportState {
            core,
            pci: Some(pci),
        }
    }
}
