//! Legacy PC devices: 16550 UART, i8042, CMOS/RTC, and Firecracker's boot timer.

pub mod boot_timer;
pub mod cmos;
pub mod i8042;
pub mod serial;
