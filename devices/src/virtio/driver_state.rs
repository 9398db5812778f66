//! What the driver programs through any transport (virtio 1.x sections 2 and 3.1): feature
//! negotiation, the device status state machine and queue selection. virtio-mmio's registers
//! are one layout over it; virtio-pci's common configuration structure is another.

use std::sync::{Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};

use super::VIRTIO_F_VERSION_1;
use super::device_side::DeviceSide;

/// Device status bits.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
/// The driver knows how to drive the device.
pub const STATUS_DRIVER: u32 = 2;
/// The driver is ready; queues may be used.
pub const STATUS_DRIVER_OK: u32 = 4;
/// Feature negotiation is complete.
pub const STATUS_FEATURES_OK: u32 = 8;
/// The device hit an error the driver must reset.
pub const STATUS_NEEDS_RESET: u32 = 0x40;
/// The driver gave up.
pub const STATUS_FAILED: u32 = 0x80;

/// The driver's side of the negotiation, as the transport's registers set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverState {
    /// The virtio device type.
    pub device_type: u32,
    /// What the device offers.
    pub device_features: u64,
    /// Each queue's maximum size.
    pub queue_max: Vec<u16>,
    /// Selected queue.
    pub queue_sel: u32,
    /// Which 32 bits of the device features the driver reads.
    pub device_features_sel: u32,
    /// Which 32 bits of the driver features the driver writes.
    pub driver_features_sel: u32,
    /// What the driver accepted.
    pub driver_features: u64,
    /// Device status.
    pub status: u32,
}

fn lock(side: &Mutex<DeviceSide>) -> MutexGuard<'_, DeviceSide> {
    side.lock().unwrap_or_else(|p| p.into_inner())
}

impl DriverState {
    /// A device of `device_type` offering `device_features`, with queues of `queue_max`.
    pub fn new(device_type: u32, device_features: u64, queue_max: Vec<u16>) -> Self {
        Self {
            device_type,
            device_features,
            queue_max,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
        }
    }

    /// The 32 bits of the device features the selector names (0 past the second word).
    pub fn device_features_word(&self) -> u32 {
        match self.device_features_sel {
            0 => self.device_features as u32,
            1 => (self.device_features >> 32) as u32,
            _ => 0,
        }
    }

    /// The driver writes 32 bits of its features (ignored once FEATURES_OK is set).
    pub fn set_driver_features_word(&mut self, v: u32) {
        if self.status & STATUS_FEATURES_OK != 0 {
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
            _ => {}
        }
    }

    /// The selected queue's maximum size (0 for no such queue).
    pub fn selected_queue_max(&self) -> u16 {
        self.queue_max
            .get(self.queue_sel as usize)
            .copied()
            .unwrap_or(0)
    }

    /// Runs `f` on the selected queue, only before DRIVER_OK (queue registers mean nothing
    /// after it).
    pub fn with_selected_queue(&self, side: &Mutex<DeviceSide>, f: impl FnOnce(&mut Queue)) {
        if self.status & STATUS_DRIVER_OK != 0 {
            return;
        }
        if let Some(q) = lock(side).queues.get_mut(self.queue_sel as usize) {
            f(q);
        }
    }

    /// Status 0: the device forgets everything the driver set up.
    pub fn reset(&mut self, side: &Mutex<DeviceSide>) {
        lock(side).reset();
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
    }

    /// The driver writes the device status: resets on 0, checks FEATURES_OK against what was
    /// offered, and starts the device on DRIVER_OK when features and queues are valid
    /// (otherwise it asks for a reset with NEEDS_RESET). Never fails: a bad driver gets a
    /// status that says so.
    pub fn set_status(&mut self, v: u32, side: &Mutex<DeviceSide>) {
        if v == 0 {
            self.reset(side);
            return;
        }
        // Taking DRIVER_OK back without a reset is a driver error: the device needs a reset.
        if self.status & STATUS_DRIVER_OK != 0 && v & STATUS_DRIVER_OK == 0 {
            log::warn!("virtio: the driver cleared DRIVER_OK without a reset");
            self.status |= STATUS_NEEDS_RESET;
            return;
        }
        // FEATURES_OK only sticks when the driver accepted VERSION_1 and nothing we did not offer.
        let mut v = v;
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let bad = self.driver_features & !self.device_features != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0;
            if bad {
                v &= !STATUS_FEATURES_OK;
            }
        }
        if v & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0 {
            let side = lock(side);
            let valid = side
                .queues
                .iter()
                .all(|q| !q.ready() || q.is_valid(&side.mem));
            drop(side);
            if v & STATUS_FEATURES_OK == 0 || !valid {
                log::warn!("virtio: DRIVER_OK without valid features or queues");
                v |= STATUS_NEEDS_RESET;
            }
        }
        let start = v & STATUS_DRIVER_OK != 0
            && v & STATUS_NEEDS_RESET == 0
            && self.status & STATUS_DRIVER_OK == 0;
        self.status = v;
        if start {
            lock(side).activate(self.driver_features);
        }
    }
}
