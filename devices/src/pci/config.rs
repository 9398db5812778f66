//! A PCI function's configuration space (PCI Local Bus 3.0, section 6): the type 0 header, the
//! BARs with their sizing protocol, and the capability list, as 256 bytes with a per-byte
//! write mask. Everything the guest writes goes through the mask, so read-only fields stay
//! what the device set and a BAR reads back its size after the guest writes all ones.

/// Offset of the command register.
pub const COMMAND: usize = 0x04;
/// Command: memory space decoding.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command: bus master (the device may write guest memory and send MSIs).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command: INTx disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Offset of the status register.
pub const STATUS: usize = 0x06;
/// Status: the capability list pointer is valid.
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// Offset of the first BAR.
pub const BAR0: usize = 0x10;
/// Offset of the capability list pointer.
pub const CAP_POINTER: usize = 0x34;
/// Offset of the interrupt line register.
pub const INTERRUPT_LINE: usize = 0x3c;
/// Offset of the interrupt pin register.
pub const INTERRUPT_PIN: usize = 0x3d;
/// Size of the conventional configuration space (ECAM's extended space reads as zero).
pub const SIZE: usize = 256;
/// The number of BARs of a type 0 header.
pub const BAR_COUNT: usize = 6;
/// Where the first capability goes (after the type 0 header).
const FIRST_CAP: usize = 0x40;

/// What a PCI function is: the header's identification fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code, subclass and programming interface (24 bits).
    pub class: u32,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

/// A memory BAR: a power-of-two window the guest (or firmware) places.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemBar {
    /// Its size in bytes (a power of two, at least 16).
    pub size: u64,
    /// 64-bit: it takes this BAR register and the next.
    pub is_64bit: bool,
    /// Prefetchable.
    pub prefetchable: bool,
}

/// Why a configuration space cannot be laid out as asked (a programming error in a device
/// model, found by its tests).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// A BAR index past the header's six, or a 64-bit BAR in the last register.
    #[error("BAR {0} does not fit the header")]
    BarIndex(usize),
    /// A BAR size that is not a power of two of at least 16 bytes.
    #[error("BAR size {0:#x} is not a power of two of at least 16 bytes")]
    BarSize(u64),
    /// The capabilities fill the configuration space.
    #[error("no room for a {0}-byte capability")]
    NoRoom(usize),
}

/// 256 bytes of configuration space and which bits of each byte the guest may write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSpace {
    bytes: [u8; SIZE],
    mask: [u8; SIZE],
    bars: [Option<MemBar>; BAR_COUNT],
    last_cap: Option<usize>,
    next_cap: usize,
}

impl ConfigSpace {
    /// A type 0 header for `id`, with memory decoding, bus mastering and INTx disable
    /// writable and no BARs or capabilities yet.
    pub fn new(id: Identity) -> Self {
        let mut c = Self {
            bytes: [0; SIZE],
            mask: [0; SIZE],
            bars: [None; BAR_COUNT],
            last_cap: None,
            next_cap: FIRST_CAP,
        };
        c.put16(0x00, id.vendor);
        c.put16(0x02, id.device);
        c.bytes[0x08] = id.revision;
        c.bytes[0x09..0x0c].copy_from_slice(&id.class.to_le_bytes()[..3]);
        c.put16(0x2c, id.subsystem_vendor);
        c.put16(0x2e, id.subsystem);
        let cmd = COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        c.mask[COMMAND..COMMAND + 2].copy_from_slice(&cmd.to_le_bytes());
        // The interrupt line is the firmware's scratch register.
        c.mask[INTERRUPT_LINE] = 0xff;
        c
    }

    fn put16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn put32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn get32(&self, off: usize) -> u32 {
        let mut b = [0; 4];
        b.copy_from_slice(&self.bytes[off..off + 4]);
        u32::from_le_bytes(b)
    }

    /// Declares memory BAR `index`.
    pub fn add_mem_bar(&mut self, index: usize, bar: MemBar) -> Result<(), LayoutError> {
        if index >= BAR_COUNT || (bar.is_64bit && index + 1 >= BAR_COUNT) {
            return Err(LayoutError::BarIndex(index));
        }
        if bar.size < 16 || !bar.size.is_power_of_two() {
            return Err(LayoutError::BarSize(bar.size));
        }
        let flags = (u32::from(bar.is_64bit) << 2) | (u32::from(bar.prefetchable) << 3);
        let off = BAR0 + 4 * index;
        self.put32(off, flags);
        let addr_mask = !(bar.size - 1);
        self.mask[off..off + 4].copy_from_slice(&((addr_mask as u32) & !0xf).to_le_bytes());
        if bar.is_64bit {
            self.mask[off + 4..off + 8].copy_from_slice(&((addr_mask >> 32) as u32).to_le_bytes());
        }
        self.bars[index] = Some(bar);
        Ok(())
    }

    /// Appends a capability whose body (after the ID and next pointer) is `body`, with
    /// `writable` giving the guest-writable bits of each body byte (shorter: the rest is
    /// read-only). Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, LayoutError> {
        let len = 2 + body.len();
        let off = self.next_cap;
        if off + len > SIZE {
            return Err(LayoutError::NoRoom(len));
        }
        self.bytes[off] = id;
        self.bytes[off + 1] = 0;
        self.bytes[off + 2..off + len].copy_from_slice(body);
        for (m, w) in self.mask[off + 2..off + len].iter_mut().zip(writable) {
            *m = *w;
        }
        match self.last_cap {
            Some(prev) => self.bytes[prev + 1] = off as u8,
            None => {
                self.bytes[CAP_POINTER] = off as u8;
                let status = u16::from_le_bytes([self.bytes[STATUS], self.bytes[STATUS + 1]]);
                self.put16(STATUS, status | STATUS_CAP_LIST);
            }
        }
        self.last_cap = Some(off);
        // Capabilities are dword aligned.
        self.next_cap = (off + len + 3) & !3;
        Ok(off)
    }

    /// Sets the interrupt pin (1 = INTA#; 0 = none).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.bytes[INTERRUPT_PIN] = pin;
    }

    /// A guest read of `data.len()` bytes at `offset` (past the end: zero, so ECAM's extended
    /// space holds no capability).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.bytes.get(offset + i).copied().unwrap_or(0);
        }
    }

    /// A guest write through the mask (past the end: ignored).
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, v) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i).filter(|&a| a < SIZE) else {
                return;
            };
            let m = self.mask[at];
            self.bytes[at] = (self.bytes[at] & !m) | (v & m);
        }
    }

    /// Writes bytes the guest cannot (a device's own registers inside a capability).
    pub fn set_bytes(&mut self, offset: usize, data: &[u8]) {
        if let Some(dst) = self.bytes.get_mut(offset..offset + data.len()) {
            dst.copy_from_slice(data);
        }
    }

    /// The bytes at `offset..offset + len` (empty past the end).
    pub fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        self.bytes.get(offset..offset + len).unwrap_or(&[])
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        u16::from_le_bytes([self.bytes[COMMAND], self.bytes[COMMAND + 1]])
    }

    /// Where memory BAR `index` decodes now: `None` when it is not a BAR, memory decoding is
    /// off, or the guest has not placed it (address 0, or all ones while it sizes it).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bars.get(index).copied().flatten()?;
        if self.command() & COMMAND_MEMORY == 0 {
            return None;
        }
        let off = BAR0 + 4 * index;
        let low = u64::from(self.get32(off) & !0xf);
        let high = if bar.is_64bit {
            u64::from(self.get32(off + 4))
        } else {
            0
        };
        let addr = (high << 32) | low;
        let sizing = addr == !(bar.size - 1) & if bar.is_64bit { u64::MAX } else { 0xffff_fff0 };
        (addr != 0 && !sizing).then_some(addr)
    }

    /// Places BAR `index` at `addr` (firmware's job; tern does it for direct Linux boot).
    pub fn set_bar_address(&mut self, index: usize, addr: u64) {
        let Some(bar) = self.bars.get(index).copied().flatten() else {
            return;
        };
        let off = BAR0 + 4 * index;
        let flags = self.get32(off) & 0xf;
        self.put32(off, (addr as u32 & !0xf) | flags);
        if bar.is_64bit {
            self.put32(off + 4, (addr >> 32) as u32);
        }
    }

    /// Memory BAR `index`, if declared.
    pub fn bar(&self, index: usize) -> Option<MemBar> {
        self.bars.get(index).copied().flatten()
    }

    /// The whole space, for a snapshot.
    pub fn save(&self) -> Vec<u8> {
        self.bytes.to_vec()
    }

    /// Puts back what [`ConfigSpace::save`] returned, through the read-only bits: only what the
    /// guest could have written changes (a forged state cannot change the device's identity or
    /// its BAR sizes). Wrong length: refused.
    pub fn restore(&mut self, saved: &[u8]) -> Result<(), String> {
        if saved.len() != SIZE {
            return Err(format!(
                "PCI configuration space of {} bytes, not {SIZE}",
                saved.len()
            ));
        }
        for (i, v) in saved.iter().enumerate() {
            let m = self.mask[i];
            self.bytes[i] = (self.bytes[i] & !m) | (v & m);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: 0x01_00_00,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        }
    }

    fn r32(c: &ConfigSpace, off: usize) -> u32 {
        let mut b = [0; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(c: &mut ConfigSpace, off: usize, v: u32) {
        c.write(off, &v.to_le_bytes());
    }

    #[test]
    fn identity_is_read_only() {
        let mut c = ConfigSpace::new(id());
        assert_eq!(r32(&c, 0), 0x1042_1af4);
        w32(&mut c, 0, 0xdead_beef);
        assert_eq!(r32(&c, 0), 0x1042_1af4);
        assert_eq!(r32(&c, 8), 0x0100_0001, "class and revision");
        assert_eq!(r32(&c, 0x2c), 0x0040_1af4);
    }

    #[test]
    fn a_64bit_bar_sizes_and_moves() {
        let mut c = ConfigSpace::new(id());
        let bar = MemBar {
            size: 0x4000,
            is_64bit: true,
            prefetchable: false,
        };
        c.add_mem_bar(0, bar).unwrap();
        assert_eq!(r32(&c, BAR0), 0b100, "64-bit memory BAR");
        w32(&mut c, BAR0, u32::MAX);
        w32(&mut c, BAR0 + 4, u32::MAX);
        assert_eq!(r32(&c, BAR0), 0xffff_c004, "size 16 KiB");
        assert_eq!(r32(&c, BAR0 + 4), u32::MAX);
        w32(&mut c, COMMAND, u32::from(COMMAND_MEMORY));
        assert_eq!(c.bar_address(0), None, "all ones while sizing");
        w32(&mut c, BAR0, 0xc000_1234);
        w32(&mut c, BAR0 + 4, 0x1);
        assert_eq!(c.bar_address(0), Some(0x1_c000_0000), "aligned to its size");
        w32(&mut c, COMMAND, 0);
        assert_eq!(c.bar_address(0), None, "decoding off");
        assert_eq!(c.bar_address(1), None, "the upper half is no BAR");
        assert!(c.add_mem_bar(5, bar).is_err());
        assert!(
            c.add_mem_bar(
                2,
                MemBar {
                    size: 0x3000,
                    ..bar
                }
            )
            .is_err()
        );
    }

    #[test]
    fn capabilities_chain_and_keep_read_only_bytes() {
        let mut c = ConfigSpace::new(id());
        let a = c
            .add_capability(0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], &[0, 0xc0])
            .unwrap();
        let b = c.add_capability(0x09, &[0xaa, 0xbb], &[]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x4c, "dword aligned");
        assert_ne!(r32(&c, 4) >> 16 & u32::from(STATUS_CAP_LIST), 0);
        let mut p = [0u8];
        c.read(CAP_POINTER, &mut p);
        assert_eq!(p[0], 0x40);
        c.read(a + 1, &mut p);
        assert_eq!(p[0] as usize, b);
        c.read(b + 1, &mut p);
        assert_eq!(p[0], 0, "the list ends");
        c.write(a + 2, &[0xff, 0xff]);
        assert_eq!(c.bytes(a + 2, 2), &[1, 2 | 0xc0]);
        c.write(SIZE - 1, &[1, 2, 3]);
        let mut far = [7u8; 4];
        c.read(SIZE - 2, &mut far);
        assert_eq!(far, [0, 0, 0, 0]);
    }

    #[test]
    fn restore_changes_only_writable_bits() {
        let mut c = ConfigSpace::new(id());
        c.add_mem_bar(
            0,
            MemBar {
                size: 0x1000,
                is_64bit: false,
                prefetchable: false,
            },
        )
        .unwrap();
        c.set_bar_address(0, 0xc000_0000);
        w32(&mut c, COMMAND, 0x6);
        let saved = c.save();
        let mut forged = saved.clone();
        forged[0] = 0;
        let mut d = ConfigSpace::new(id());
        d.add_mem_bar(
            0,
            MemBar {
                size: 0x1000,
                is_64bit: false,
                prefetchable: false,
            },
        )
        .unwrap();
        d.restore(&forged).unwrap();
        assert_eq!(d.save(), saved, "the vendor ID is the device's");
        assert_eq!(d.bar_address(0), Some(0xc000_0000));
        assert!(d.restore(&saved[..10]).is_err());
    }
}
