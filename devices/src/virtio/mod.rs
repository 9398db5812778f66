//! Virtio 1.x devices and their MMIO transport.
//!
//! A device implements [`VirtioDevice`]; [`mmio::MmioTransport`] puts it on the MMIO bus with the
//! virtio-mmio (version 2) register layout, owns its queues (the virtio-queue crate) and raises
//! the used-buffer interrupt. Guest-controlled input — registers, descriptors, buffers — is
//! untrusted: errors become the device's failure status or a short used length, never a panic.

pub mod mmio;
pub mod rng;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// `VIRTIO_F_VERSION_1`: the device speaks virtio 1.x (required over MMIO version 2).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (4 = entropy, 2 = block, ...).
    fn device_type(&self) -> u32;
    /// The maximum size of each of its queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The features it offers (must include [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Reads its configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes its configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Handles buffers the driver made available on queue `index`; returns true when it put
    /// anything in the used ring (the transport then decides whether to interrupt).
    fn process_queue(&mut self, index: u16, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;
    /// Forgets everything the driver set up.
    fn reset(&mut self) {}
    /// The device's own state for a snapshot (its queues are saved by the transport).
    fn save(&self) -> serde_json::Value;
    /// Restores what [`VirtioDevice::save`] returned.
    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String>;
}
