//! The x86_64 PC-like platform tern builds: a memory map with a 32-bit MMIO hole, 64-bit and PVH
//! boot CPU state, CPUID normalisation, boot MSRs and minimal (hardware-reduced) ACPI tables.

pub mod acpi;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod memory;
pub mod msr;
pub mod regs;
