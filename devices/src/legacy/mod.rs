//! Legacy devices: the PC's 16550 UART, i8042 and CMOS/RTC, ARM's PL011 UART, and Firecracker's
//! boot timer.

pub mod boot_timer;
pub mod cmos;
pub mod i8042;
pub mod pl011;
pub mod rtc_pl031;
pub mod serial;
