//! The x86_64 PC-like platform tern builds: a memory map with a 32-bit MMIO hole, 64-bit and PVH
//! boot CPU state, CPUID normalisation, boot MSRs, minimal (hardware-reduced) ACPI tables and
//! SMBIOS in the F-segment.

pub mod acpi;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod memory;
pub mod msr;
pub mod regs;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::smbios::SmbiosConfig;

/// Bytes the F-segment holds for the SMBIOS entry point and tables.
pub const SMBIOS_ROOM: usize = (layout::SMBIOS_END - layout::SMBIOS_START) as usize;

/// Writes the SMBIOS entry point and tables for `cfg` at [`layout::SMBIOS_START`]; `uuid` is
/// the system UUID when `cfg` names none.
pub fn write_smbios(
    mem: &GuestMemoryMmap,
    cfg: &SmbiosConfig,
    uuid: [u8; 16],
) -> crate::Result<()> {
    let blob = crate::smbios::build(cfg, uuid, layout::SMBIOS_START, SMBIOS_ROOM)?;
    mem.write_slice(&blob, GuestAddress(layout::SMBIOS_START))
        .map_err(|source| crate::Error::GuestWrite {
            what: "SMBIOS tables",
            addr: layout::SMBIOS_START,
            source,
        })
}
