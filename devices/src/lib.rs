//! Everything the guest sees on its buses. Devices never know about the hypervisor: they raise
//! interrupts through [`interrupt::Interrupt`] and ask the VMM to stop the VM through
//! [`exit::ExitRequester`], both implemented by `vmm`.

#![deny(missing_docs)]

pub mod acpi_pm;
pub mod bus;
pub mod dirty;
pub mod exit;
pub mod fw_cfg;
pub mod interrupt;
pub mod legacy;
pub mod os;
pub mod pci;
pub mod rate_limiter;
pub mod virtio;

pub use bus::{Bus, BusDevice};
