//! The ARM64 platform tern builds: RAM from 2 GiB, devices below it, a flattened device tree
//! describing CPUs (PSCI), memory, the GIC, the architected timer, a PL011 UART, a PL031 RTC and
//! the virtio-mmio devices, and the boot vCPU's entry registers.

pub mod fdt;
pub mod gic;
pub mod layout;
pub mod regs;
