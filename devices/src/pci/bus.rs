//! The root bus: up to 32 single-function devices on bus 0 (slot 0 is the host bridge), and
//! the map from guest-physical address to the BAR decoding there, kept current as the guest
//! programs BARs and the command register.

use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use super::PciDevice;
use super::config::BAR_COUNT;
use super::host_bridge::HostBridge;

/// Device slots on the bus.
pub const SLOTS: usize = 32;

/// Why a device cannot go on the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    /// Every slot is taken.
    #[error(
        "the PCI bus has {SLOTS} slots (one is the host bridge): {0} devices do not fit; configure fewer devices"
    )]
    NoSlot(usize),
    /// No room left in the BAR windows.
    #[error("no room for a {size:#x}-byte BAR in the PCI memory windows; configure fewer devices")]
    NoRoom {
        /// The BAR's size.
        size: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Decoded {
    base: u64,
    size: u64,
    slot: usize,
    bar: usize,
}

type Function = Arc<Mutex<dyn PciDevice>>;

/// Bus 0 of PCI segment 0.
pub struct PciBus {
    slots: Vec<Option<Function>>,
    decode: RwLock<Vec<Decoded>>,
}

fn lock(f: &Function) -> MutexGuard<'_, dyn PciDevice + 'static> {
    f.lock().unwrap_or_else(|p| p.into_inner())
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    /// A bus with the host bridge in slot 0.
    pub fn new() -> Self {
        let mut slots: Vec<Option<Function>> = vec![None; SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(HostBridge::default())));
        Self {
            slots,
            decode: RwLock::new(Vec::new()),
        }
    }

    /// The next free slot (for a device about to be made: its requester ID).
    pub fn next_slot(&self) -> Result<usize, PciError> {
        self.slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciError::NoSlot(SLOTS))
    }

    /// Puts `dev` in the next free slot and returns the slot; its BARs decode wherever its
    /// configuration space says.
    pub fn add(&mut self, dev: Function) -> Result<usize, PciError> {
        let slot = self.next_slot()?;
        self.slots[slot] = Some(dev);
        self.refresh(slot);
        Ok(slot)
    }

    fn function(&self, bus: u8, dev: u8, func: u8) -> Option<&Function> {
        if bus != 0 || func != 0 {
            return None;
        }
        self.slots.get(usize::from(dev))?.as_ref()
    }

    /// A configuration read (no such function: all ones, as the bus reads when nobody
    /// answers).
    pub fn config_read(&self, bus: u8, dev: u8, func: u8, offset: usize, data: &mut [u8]) {
        match self.function(bus, dev, func) {
            Some(f) if offset < super::config::SIZE => lock(f).config_read(offset, data),
            Some(_) => data.fill(0),
            None => data.fill(0xff),
        }
    }

    /// A configuration write; the BAR map follows what it changed.
    pub fn config_write(&self, bus: u8, dev: u8, func: u8, offset: usize, data: &[u8]) {
        if offset >= super::config::SIZE {
            return;
        }
        if self.function(bus, dev, func).is_some() {
            let slot = usize::from(dev);
            if let Some(f) = self.function(bus, dev, func) {
                lock(f).config_write(offset, data);
            }
            // Only the command register and the BARs move BARs.
            let touches = |lo: usize, hi: usize| offset < hi && offset + data.len() > lo;
            if touches(0x04, 0x06) || touches(0x10, 0x28) {
                self.refresh(slot);
            }
        }
    }

    /// Brings the BAR map of `slot` up to date, telling the device what moved.
    fn refresh(&self, slot: usize) {
        let Some(Some(f)) = self.slots.get(slot) else {
            return;
        };
        let mut dev = lock(f);
        let mut map = self.decode.write().unwrap_or_else(|p| p.into_inner());
        for bar in 0..BAR_COUNT {
            let now = dev.bar_range(bar);
            let pos = map.iter().position(|d| d.slot == slot && d.bar == bar);
            let was = pos.map(|p| map[p]);
            if was.map(|d| (d.base, d.size)) == now {
                continue;
            }
            if let Some(p) = pos {
                map.remove(p);
            }
            if let Some((base, size)) = now {
                if map
                    .iter()
                    .any(|d| d.base < base.saturating_add(size) && base < d.base + d.size)
                {
                    log::warn!(
                        "PCI 00:{slot:02x}.0 BAR {bar} at {base:#x} overlaps another BAR; the first one placed answers"
                    );
                }
                map.push(Decoded {
                    base,
                    size,
                    slot,
                    bar,
                });
            }
            dev.bar_moved(bar, was.map(|d| d.base), now.map(|n| n.0));
        }
    }

    fn find(&self, addr: u64) -> Option<(Function, usize, u64)> {
        let map = self.decode.read().unwrap_or_else(|p| p.into_inner());
        let d = map
            .iter()
            .find(|d| addr >= d.base && addr - d.base < d.size)?;
        let f = self.slots.get(d.slot)?.as_ref()?.clone();
        Some((f, d.bar, addr - d.base))
    }

    /// A memory read at guest-physical `addr`; false when no BAR decodes it.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((f, bar, off)) => {
                lock(&f).bar_read(bar, off, data);
                true
            }
            None => false,
        }
    }

    /// A memory write at guest-physical `addr`; false when no BAR decodes it.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((f, bar, off)) => {
                lock(&f).bar_write(bar, off, data);
                true
            }
            None => false,
        }
    }

    /// The slots that hold a device, host bridge included.
    pub fn occupied(&self) -> Vec<usize> {
        (0..SLOTS).filter(|&s| self.slots[s].is_some()).collect()
    }
}

/// Places BARs in a window, each aligned to its size (the firmware's job; tern does it for a
/// directly booted kernel, which takes what it finds).
#[derive(Debug, Clone)]
pub struct BarAllocator {
    next: u64,
    end: u64,
}

impl BarAllocator {
    /// Allocates from `[start, end)`.
    pub fn new(start: u64, end: u64) -> Self {
        Self { next: start, end }
    }

    /// A base for a BAR of `size` (a power of two).
    pub fn allocate(&mut self, size: u64) -> Result<u64, PciError> {
        let base = self
            .next
            .checked_next_multiple_of(size)
            .filter(|b| b.checked_add(size).is_some_and(|e| e <= self.end))
            .ok_or(PciError::NoRoom { size })?;
        self.next = base + size;
        Ok(base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::{COMMAND, COMMAND_MEMORY, ConfigSpace, Identity, MemBar};

    /// (BAR, from, to) of each move.
    type Moves = Arc<Mutex<Vec<(usize, Option<u64>, Option<u64>)>>>;

    struct Dev {
        config: ConfigSpace,
        moves: Moves,
        last_write: Option<(usize, u64, Vec<u8>)>,
    }

    impl PciDevice for Dev {
        fn config_read(&mut self, offset: usize, data: &mut [u8]) {
            self.config.read(offset, data);
        }
        fn config_write(&mut self, offset: usize, data: &[u8]) {
            self.config.write(offset, data);
        }
        fn bar_range(&self, index: usize) -> Option<(u64, u64)> {
            Some((
                self.config.bar_address(index)?,
                self.config.bar(index)?.size,
            ))
        }
        fn bar_read(&mut self, index: usize, offset: u64, data: &mut [u8]) {
            data.fill(index as u8 + offset as u8);
        }
        fn bar_write(&mut self, index: usize, offset: u64, data: &[u8]) {
            self.last_write = Some((index, offset, data.to_vec()));
        }
        fn bar_moved(&mut self, index: usize, from: Option<u64>, to: Option<u64>) {
            self.moves.lock().unwrap().push((index, from, to));
        }
    }

    fn dev() -> (Arc<Mutex<Dev>>, Moves) {
        let mut config = ConfigSpace::new(Identity {
            vendor: 0x1af4,
            device: 0x1044,
            revision: 1,
            class: 0xff_00_00,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        config
            .add_mem_bar(
                0,
                MemBar {
                    size: 0x1000,
                    is_64bit: true,
                    prefetchable: false,
                },
            )
            .unwrap();
        config.set_bar_address(0, 0xe000_0000);
        let moves = Arc::new(Mutex::new(Vec::new()));
        (
            Arc::new(Mutex::new(Dev {
                config,
                moves: moves.clone(),
                last_write: None,
            })),
            moves,
        )
    }

    #[test]
    fn bars_decode_only_with_memory_enabled_and_follow_moves() {
        let mut bus = PciBus::new();
        let (d, moves) = dev();
        assert_eq!(bus.add(d.clone()).unwrap(), 1, "slot 0 is the host bridge");
        let mut b = [0u8; 4];
        bus.config_read(0, 0, 0, 0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0008_1b36, "the host bridge");
        bus.config_read(0, 5, 0, 0, &mut b);
        assert_eq!(b, [0xff; 4], "an empty slot");
        bus.config_read(0, 1, 1, 0, &mut b);
        assert_eq!(b, [0xff; 4], "no function 1");
        assert!(!bus.mmio_read(0xe000_0000, &mut b), "memory decoding off");
        bus.config_write(0, 1, 0, COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert!(bus.mmio_read(0xe000_0010, &mut b));
        assert_eq!(b, [0x10; 4]);
        assert!(bus.mmio_write(0xe000_0ffc, &[1, 2, 3, 4]));
        assert_eq!(
            d.lock().unwrap().last_write,
            Some((0, 0xffc, vec![1, 2, 3, 4]))
        );
        assert!(!bus.mmio_write(0xe000_1000, &[0]), "past the BAR");
        // The guest moves the BAR (64-bit: two dword writes).
        bus.config_write(0, 1, 0, 0x10, &0xe010_0000u32.to_le_bytes());
        bus.config_write(0, 1, 0, 0x14, &1u32.to_le_bytes());
        assert!(
            !bus.mmio_read(0xe000_0000, &mut b),
            "gone from the old place"
        );
        assert!(bus.mmio_read(0x1_e010_0000, &mut b));
        assert_eq!(
            *moves.lock().unwrap(),
            vec![
                (0, None, Some(0xe000_0000)),
                (0, Some(0xe000_0000), Some(0xe010_0000)),
                (0, Some(0xe010_0000), Some(0x1_e010_0000)),
            ]
        );
        bus.config_write(0, 1, 0, COMMAND, &0u16.to_le_bytes());
        assert_eq!(
            moves.lock().unwrap().last(),
            Some(&(0, Some(0x1_e010_0000), None))
        );
        assert_eq!(bus.occupied(), vec![0, 1]);
    }

    #[test]
    fn the_bus_refuses_a_33rd_device() {
        let mut bus = PciBus::new();
        for _ in 1..SLOTS {
            bus.add(dev().0).unwrap();
        }
        assert_eq!(bus.add(dev().0), Err(PciError::NoSlot(SLOTS)));
    }

    #[test]
    fn bars_are_aligned_to_their_size() {
        let mut a = BarAllocator::new(0x1000, 0x10000);
        assert_eq!(a.allocate(0x100).unwrap(), 0x1000);
        assert_eq!(a.allocate(0x4000).unwrap(), 0x4000);
        assert_eq!(a.allocate(0x8000).unwrap(), 0x8000);
        assert_eq!(a.allocate(0x10), Err(PciError::NoRoom { size: 0x10 }));
    }
}
