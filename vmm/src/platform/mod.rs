//! What differs between the platforms tern builds: RAM layout, the interrupt controller, the
//! console UART and other legacy devices, where virtio-mmio devices go, and how the payload is
//! loaded and the vCPUs set up. [`crate::vm`] builds a VM from these and stays the same for
//! every architecture.
//!
//! Each architecture's module provides the same items: `Uart`, `Extra`, `Early`, `ram_regions`,
//! `setup_early`, `legacy_devices`, `virtio_slot`, `boot`, and the boot-timer constants.

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "aarch64")]
pub use aarch64::*;
#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use x86_64::*;

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
