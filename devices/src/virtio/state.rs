//! What a virtio transport saves of the virtio core for a snapshot, and how a saved state is
//! checked and put back, the same for every transport: a corrupt or foreign snapshot is
//! refused value by value, never trusted.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};

use super::device_side::DeviceSide;
use super::driver_state::{DriverState, STATUS_DRIVER_OK, STATUS_FEATURES_OK, STATUS_NEEDS_RESET};
use super::{VIRTIO_F_VERSION_1, VirtioDevice};

/// Serde description of virtio-queue's `QueueState` (which has no serde support itself).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(remote = "virtio_queue::QueueState")]
struct QueueStateDef {
    max_size: u16,
    next_avail: u16,
    next_used: u16,
    event_idx_enabled: bool,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

/// One queue's state in a snapshot: virtio-queue's own `QueueState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot(#[serde(with = "QueueStateDef")] pub virtio_queue::QueueState);

/// What every transport saves of the virtio core: what the driver negotiated and set, the
/// queues, the interrupt status (virtio-mmio's register, virtio-pci's ISR) and the device's
/// own state. A transport adds its own (virtio-pci: configuration space and MSI-X).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VirtioState {
    /// The virtio device type, checked on restore.
    pub device_type: u32,
    /// Selected queue.
    pub queue_sel: u32,
    /// Device features selector.
    pub device_features_sel: u32,
    /// Configuration generation.
    pub config_generation: u32,
    /// Driver features selector.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// Device status.
    pub status: u32,
    /// Pending interrupt bits.
    pub interrupt_status: u32,
    /// The queues.
    pub queues: Vec<QueueSnapshot>,
    /// The device's own state.
    pub device: super::DeviceState,
}

/// Why a saved transport state cannot be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestoreError {
    /// The state belongs to another kind of device.
    #[error("the snapshot holds a virtio device of type {saved}, not {expected}")]
    DeviceType {
        /// Type in the snapshot.
        saved: u32,
        /// Type of the device being restored.
        expected: u32,
    },
    /// The device has a different number of queues.
    #[error("the snapshot has {saved} queues, the device {expected}")]
    QueueCount {
        /// Queues in the snapshot.
        saved: usize,
        /// Queues of the device.
        expected: usize,
    },
    /// A queue's saved values are impossible.
    #[error("queue {index}: {reason}")]
    Queue {
        /// Which queue.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// The device refused its state.
    #[error("device state: {0}")]
    Device(String),
    /// The device refused its own state.
    #[error(transparent)]
    DeviceState(#[from] super::DeviceStateError),
    /// No eventfd or epoll set could be made.
    #[error("cannot create the device's event descriptors: {0}")]
    Io(String),
    /// The features the driver accepted were never offered.
    #[error("driver features {0:#x} were not offered by the device")]
    Features(u64),
}

impl VirtioState {
    /// The state of `driver` and `side` (the device side locked by the caller).
    pub(super) fn save(driver: &DriverState, side: &DeviceSide, interrupt_status: u32) -> Self {
        Self {
            device_type: driver.device_type,
            queue_sel: driver.queue_sel,
            device_features_sel: driver.device_features_sel,
            config_generation: side.config_generation,
            driver_features_sel: driver.driver_features_sel,
            driver_features: driver.driver_features,
            status: driver.status,
            interrupt_status,
            queues: side
                .queues
                .iter()
                .map(|q| QueueSnapshot(q.state()))
                .collect(),
            device: side.device.save(),
        }
    }

    /// Checks the state against `device`, restores the device's own state and returns the
    /// queues to build the transport with.
    pub(super) fn restore_queues(
        &self,
        device: &mut dyn VirtioDevice,
    ) -> Result<Vec<Queue>, RestoreError> {
        let expected = device.device_type();
        if self.device_type != expected {
            return Err(RestoreError::DeviceType {
                saved: self.device_type,
                expected,
            });
        }
        let maxes = device.queue_max_sizes().to_vec();
        if self.queues.len() != maxes.len() {
            return Err(RestoreError::QueueCount {
                saved: self.queues.len(),
                expected: maxes.len(),
            });
        }
        if self.driver_features & !(device.features() | super::CORE_FEATURES) != 0 {
            return Err(RestoreError::Features(self.driver_features));
        }
        let mut queues = Vec::with_capacity(maxes.len());
        for (index, (q, max)) in self.queues.iter().zip(maxes).enumerate() {
            if q.0.max_size != max {
                return Err(RestoreError::Queue {
                    index,
                    reason: format!("max size {} is not the device's {max}", q.0.max_size),
                });
            }
            let queue = Queue::try_from(q.0).map_err(|e| RestoreError::Queue {
                index,
                reason: e.to_string(),
            })?;
            queues.push(queue);
        }
        device.restore(&self.device)?;
        Ok(queues)
    }

    /// Puts the driver's registers back into `driver`.
    pub(super) fn restore_driver(&self, driver: &mut DriverState) {
        driver.queue_sel = self.queue_sel;
        driver.device_features_sel = self.device_features_sel;
        driver.driver_features_sel = self.driver_features_sel;
        driver.driver_features = self.driver_features;
        driver.status = self.status;
    }

    /// Starts the restored device on `side` if the driver had started it, after checking
    /// again what a running driver had to pass to get there (a forged state must not start a
    /// device on rings outside guest memory).
    pub(super) fn resume(
        &self,
        side: &mut DeviceSide,
        dirty: Option<Arc<crate::dirty::DirtyLog>>,
    ) -> Result<(), RestoreError> {
        side.config_generation = self.config_generation;
        // Before the device starts: activating can already write guest memory (vsock's
        // transport-reset event).
        side.dirty = dirty;
        if self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_NEEDS_RESET == 0 {
            if self.status & STATUS_FEATURES_OK == 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                return Err(RestoreError::Device(
                    "DRIVER_OK without FEATURES_OK and VERSION_1".into(),
                ));
            }
            if let Some(index) = side
                .queues
                .iter()
                .position(|q| q.ready() && !q.is_valid(&side.mem))
            {
                return Err(RestoreError::Queue {
                    index,
                    reason: "ready, but its rings are not in guest memory".into(),
                });
            }
            side.activate(self.driver_features);
        }
        Ok(())
    }
}
