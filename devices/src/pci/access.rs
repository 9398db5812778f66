//! How the guest reaches the PCI bus: configuration mechanism #1 (an address at 0xCF8, data at
//! 0xCFC..0xCFF), ECAM (4 KiB of configuration space per function in a memory window), and
//! the memory window the BARs live in. Each is a [`BusDevice`] over the shared [`PciBus`].

use std::sync::Arc;

use super::PciBus;
use crate::bus::BusDevice;

/// Ports of configuration mechanism #1: the address register and the data window.
pub const CONFIG_IO_PORT: u64 = 0xcf8;
/// Bytes of ports it takes (address 0xCF8..0xCFB, data 0xCFC..0xCFF).
pub const CONFIG_IO_LEN: u64 = 8;
/// Bytes of ECAM per bus (32 devices × 8 functions × 4 KiB).
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

/// Configuration mechanism #1.
pub struct ConfigIo {
    bus: Arc<PciBus>,
    address: u32,
}

impl ConfigIo {
    /// The ports over `bus`.
    pub fn new(bus: Arc<PciBus>) -> Self {
        Self { bus, address: 0 }
    }

    /// (bus, device, function, register) the address register selects, if enabled.
    fn target(&self, port_offset: u64) -> Option<(u8, u8, u8, usize)> {
        if self.address & (1 << 31) == 0 {
            return None;
        }
        let a = self.address;
        Some((
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 7) as u8,
            (a & 0xfc) as usize + (port_offset - 4) as usize,
        ))
    }
}

impl BusDevice for ConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset < 4 {
            // The address register is read whole.
            if offset == 0 && data.len() == 4 {
                data.copy_from_slice(&self.address.to_le_bytes());
            } else {
                data.fill(0xff);
            }
            return;
        }
        match self.target(offset) {
            Some((b, d, f, reg)) if reg + data.len() <= 256 => {
                self.bus.config_read(b, d, f, reg, data)
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < 4 {
            if let (0, Ok(v)) = (offset, <[u8; 4]>::try_from(data)) {
                self.address = u32::from_le_bytes(v);
            }
            return;
        }
        if let Some((b, d, f, reg)) = self.target(offset) {
            if reg + data.len() <= 256 {
                self.bus.config_write(b, d, f, reg, data);
            }
        }
    }
}

/// ECAM: the configuration space of bus 0, 4 KiB per function (the conventional 256 bytes,
/// then an extended space that holds no capability).
pub struct Ecam {
    bus: Arc<PciBus>,
}

impl Ecam {
    /// ECAM over `bus`.
    pub fn new(bus: Arc<PciBus>) -> Self {
        Self { bus }
    }
}

fn ecam_target(offset: u64) -> (u8, u8, u8, usize) {
    (
        (offset >> 20) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 7) as u8,
        (offset & 0xfff) as usize,
    )
}

impl BusDevice for Ecam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (b, d, f, reg) = ecam_target(offset);
        if reg + data.len() > 4096 {
            data.fill(0xff);
            return;
        }
        self.bus.config_read(b, d, f, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (b, d, f, reg) = ecam_target(offset);
        if reg + data.len() <= 4096 {
            self.bus.config_write(b, d, f, reg, data);
        }
    }
}

/// A memory window where BARs may be placed, at `base` on the MMIO bus; an access no BAR
/// decodes reads all ones.
pub struct BarWindow {
    bus: Arc<PciBus>,
    base: u64,
}

impl BarWindow {
    /// The window at `base` over `bus`.
    pub fn new(bus: Arc<PciBus>, base: u64) -> Self {
        Self { bus, base }
    }
}

impl BusDevice for BarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if !self.bus.mmio_read(self.base + offset, data) {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.bus.mmio_write(self.base + offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r32(d: &mut dyn BusDevice, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn both_mechanisms_reach_the_host_bridge() {
        let bus = Arc::new(PciBus::new());
        let mut io = ConfigIo::new(bus.clone());
        assert_eq!(r32(&mut io, 4), u32::MAX, "disabled address");
        io.write(0, &0x8000_0000u32.to_le_bytes());
        assert_eq!(r32(&mut io, 0), 0x8000_0000);
        assert_eq!(r32(&mut io, 4), 0x0008_1b36);
        let mut w = [0u8; 2];
        io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0008, "the device ID at 0xCFE");
        io.write(0, &0x8000_0800u32.to_le_bytes());
        assert_eq!(r32(&mut io, 4), u32::MAX, "slot 1 is empty");
        io.write(0, &0x8000_0008u32.to_le_bytes());
        assert_eq!(r32(&mut io, 4) >> 8, 0x06_00_00, "class: host bridge");

        let mut ecam = Ecam::new(bus.clone());
        assert_eq!(r32(&mut ecam, 0), 0x0008_1b36);
        assert_eq!(r32(&mut ecam, 0x100), 0, "no extended capabilities");
        assert_eq!(r32(&mut ecam, 1 << 15), u32::MAX, "slot 1 is empty");
        assert_eq!(r32(&mut ecam, 1 << 20), u32::MAX, "there is no bus 1");

        let mut win = BarWindow::new(bus, 0xe000_0000);
        assert_eq!(r32(&mut win, 0), u32::MAX, "no BAR here");
        win.write(0, &[1]);
    }
}
