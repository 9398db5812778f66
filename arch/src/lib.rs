//! What a guest platform looks like, per CPU architecture: memory layout, boot-time CPU state,
//! firmware tables. Pure data: nothing here talks to a hypervisor.

#![deny(missing_docs)]

// Plain data on every host (unit-tested on x86_64 too); used by the aarch64 build.
pub mod aarch64;
pub mod smbios;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

/// Errors building platform data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The guest memory is too small or laid out wrongly for the platform.
    #[error("guest memory: {0}")]
    Memory(String),
    /// Writing a table or structure into guest memory failed.
    #[error("cannot write {what} into guest memory at {addr:#x}: {source}")]
    GuestWrite {
        /// What was being written.
        what: &'static str,
        /// Where it was to go.
        addr: u64,
        /// The memory error.
        source: vm_memory::GuestMemoryError,
    },
    /// The SMBIOS configuration cannot be written.
    #[error("{field}: {0}", field = .0.field())]
    Smbios(#[from] smbios::SmbiosError),
    /// Too many vCPUs for the platform description.
    #[error("{0} vCPUs do not fit the platform tables (at most {1})")]
    TooManyVcpus(usize, usize),
}

/// A PCI host bridge as the firmware tables (ACPI on x86_64) or the device tree (ARM64)
/// describe it: its ECAM window and the memory windows its BARs may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciHost {
    /// ECAM base (bus 0).
    pub ecam: u64,
    /// ECAM size.
    pub ecam_size: u64,
    /// The 32-bit memory window, `[start, end)`.
    pub mmio32: (u64, u64),
    /// The 64-bit memory window, `[start, end)`.
    pub mmio64: (u64, u64),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
