//! A fake virtio driver for unit tests and the fuzz targets (feature `test-utils`): guest
//! memory, a transport brought up the way Linux does it, descriptor tables per queue, and a
//! counting interrupt. No KVM.

use std::sync::Arc;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::VirtioDevice;
use super::mmio::*;
use crate::bus::BusDevice;
use crate::interrupt::{CountingInterrupt, IrqLine};

/// Guest memory size of the fake guest.
pub const MEM_SIZE: usize = 0x40_0000;
/// Queue size the fake driver sets.
pub const QSIZE: u16 = 16;
/// Descriptor flag: chained.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: device writes.
pub const F_WRITE: u16 = 2;
/// Where data buffers may go (above the rings).
pub const DATA: u64 = 0x10_0000;

/// Register offsets the fake driver uses.
const REG_STATUS: u64 = 0x070;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;

/// The fake guest.
pub struct Driver {
    /// The transport under test.
    pub dev: MmioTransport,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// Interrupts raised.
    pub irq: Arc<CountingInterrupt>,
    avail_idx: Vec<u16>,
    used_seen: Vec<u16>,
    /// `VIRTIO_RING_F_EVENT_IDX` was negotiated: the driver keeps `used_event` at the last
    /// used index it saw (it wants an interrupt for each new one, as Linux does with
    /// callbacks enabled).
    pub event_idx: bool,
}

/// Where queue `q`'s descriptor table is; its available ring follows at +0x1000, its used
/// ring at +0x2000.
pub fn ring_base(q: usize) -> u64 {
    0x1000 + q as u64 * 0x3000
}

/// Writes a 32-bit register.
pub fn w(dev: &mut MmioTransport, off: u64, v: u32) {
    dev.write(off, &v.to_le_bytes());
}

/// Reads a 32-bit register.
pub fn r(dev: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read(off, &mut b);
    u32::from_le_bytes(b)
}

impl Driver {
    /// Brings `device` up accepting every offered feature and all its queues.
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        Self::with_features(device, u64::MAX)
    }

    /// Brings `device` up accepting the offered features within `mask`.
    pub fn with_features(device: Box<dyn VirtioDevice>, mask: u64) -> Self {
        let nq = device.queue_max_sizes().len();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let irq = Arc::new(CountingInterrupt::default());
        let mut dev = MmioTransport::new(device, mem.clone(), IrqLine(irq.clone())).unwrap();
        w(&mut dev, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let mut feats = 0u64;
        for sel in 0..2 {
            w(&mut dev, REG_DEVICE_FEATURES_SEL, sel);
            feats |= u64::from(r(&mut dev, REG_DEVICE_FEATURES)) << (32 * sel);
        }
        let feats = feats & mask;
        for sel in 0..2u32 {
            w(&mut dev, REG_DRIVER_FEATURES_SEL, sel);
            w(&mut dev, REG_DRIVER_FEATURES, (feats >> (32 * sel)) as u32);
        }
        w(
            &mut dev,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        for q in 0..nq {
            let base = ring_base(q);
            w(&mut dev, REG_QUEUE_SEL, q as u32);
            w(&mut dev, REG_QUEUE_NUM, u32::from(QSIZE));
            w(&mut dev, REG_QUEUE_DESC_LOW, base as u32);
            w(&mut dev, REG_QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
            w(&mut dev, REG_QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
            w(&mut dev, REG_QUEUE_READY, 1);
        }
        w(
            &mut dev,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(r(&mut dev, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        Self {
            dev,
            mem,
            irq,
            avail_idx: vec![0; nq],
            used_seen: vec![0; nq],
            event_idx: feats & super::VIRTIO_RING_F_EVENT_IDX != 0,
        }
    }

    /// Where queue `q`'s `used_event` is (after the available ring's entries).
    pub fn used_event_addr(q: usize) -> u64 {
        ring_base(q) + 0x1000 + 4 + 2 * u64::from(QSIZE)
    }

    /// Queue `q`'s `avail_event` (after the used ring's entries), which the device writes.
    pub fn avail_event(&self, q: usize) -> u16 {
        self.mem
            .read_obj(GuestAddress(
                ring_base(q) + 0x2000 + 4 + 8 * u64::from(QSIZE),
            ))
            .unwrap()
    }

    /// Sets queue `q`'s `used_event`: no interrupt until the used index passes it.
    pub fn set_used_event(&self, q: usize, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(Self::used_event_addr(q)))
            .unwrap();
    }

    /// Writes descriptor `i` of queue `q` = (addr, len, flags, next).
    pub fn desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = GuestAddress(ring_base(q) + u64::from(i) * 16);
        self.mem.write_obj(addr, base).unwrap();
        self.mem.write_obj(len, base.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, base.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, base.unchecked_add(14)).unwrap();
    }

    /// Writes a chain of (addr, len, device-writes) buffers starting at descriptor `first`.
    pub fn chain(&self, q: usize, first: u16, bufs: &[(u64, u32, bool)]) {
        for (k, &(addr, len, write)) in bufs.iter().enumerate() {
            let i = first + k as u16;
            let mut flags = if write { F_WRITE } else { 0 };
            if k + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            self.desc(q, i, addr, len, flags, i + 1);
        }
    }

    /// Makes chain `head` of queue `q` available without notifying.
    pub fn make_available(&mut self, q: usize, head: u16) {
        if self.event_idx {
            self.set_used_event(q, self.used_idx(q));
        }
        let avail = ring_base(q) + 0x1000;
        let slot = avail + 4 + u64::from(self.avail_idx[q] % QSIZE) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx[q], GuestAddress(avail + 2))
            .unwrap();
    }

    /// Notifies queue `q` and lets the device handle what is ready.
    pub fn notify(&mut self, q: usize) {
        w(&mut self.dev, REG_QUEUE_NOTIFY, q as u32);
        self.dev.run_ready(0);
    }

    /// Makes chain `head` of queue `q` available and notifies.
    pub fn offer(&mut self, q: usize, head: u16) {
        self.make_available(q, head);
        self.notify(q);
    }

    /// The used index of queue `q`.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.mem
            .read_obj(GuestAddress(ring_base(q) + 0x2000 + 2))
            .unwrap()
    }

    /// Used elements (id, len) of queue `q` not returned by an earlier call.
    pub fn take_used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let used = ring_base(q) + 0x2000;
        let idx = self.used_idx(q);
        let mut out = Vec::new();
        while self.used_seen[q] != idx {
            let e = used + 4 + u64::from(self.used_seen[q] % QSIZE) * 8;
            out.push((
                self.mem.read_obj(GuestAddress(e)).unwrap(),
                self.mem.read_obj(GuestAddress(e + 4)).unwrap(),
            ));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        out
    }

    /// Bytes of guest memory.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Writes guest memory.
    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    /// Offers the malformed chains every device must survive on queue `q`: a loop, buffers
    /// outside memory or running off its end, zero-length, wrong-direction and oversized
    /// buffers, a next index beyond the queue. Returns the used elements.
    pub fn offer_malformed(&mut self, q: usize) -> Vec<(u32, u32)> {
        let end = MEM_SIZE as u64;
        // A chain that loops on itself.
        self.desc(q, 0, DATA, 16, F_NEXT, 1);
        self.desc(q, 1, DATA + 0x1000, 16, F_WRITE | F_NEXT, 0);
        self.offer(q, 0);
        // Buffers outside guest memory and running off its end.
        self.desc(q, 2, end + 0x1000, 32, F_NEXT, 3);
        self.desc(q, 3, end - 8, 4096, F_WRITE, 0);
        self.offer(q, 2);
        // Zero-length buffers.
        self.desc(q, 4, DATA, 0, F_NEXT, 5);
        self.desc(q, 5, DATA, 0, F_WRITE, 0);
        self.offer(q, 4);
        // Wrong directions: everything device-writable, then everything device-readable.
        self.desc(q, 6, DATA, 64, F_WRITE | F_NEXT, 7);
        self.desc(q, 7, DATA + 0x100, 1, F_WRITE, 0);
        self.offer(q, 6);
        self.desc(q, 8, DATA, 64, F_NEXT, 9);
        self.desc(q, 9, DATA + 0x100, 64, 0, 0);
        self.offer(q, 8);
        // Oversized buffers.
        self.desc(q, 10, DATA, u32::MAX, F_NEXT, 11);
        self.desc(q, 11, DATA, u32::MAX, F_WRITE, 0);
        self.offer(q, 10);
        // A next index beyond the queue.
        self.desc(q, 12, DATA, 16, F_NEXT, 999);
        self.offer(q, 12);
        // A head beyond the queue.
        self.offer(q, 300);
        let used = self.take_used(q);
        for (id, len) in &used {
            assert!(*id < u32::from(QSIZE), "used id {id}");
            assert!(*len < 1 << 20, "used len {len}");
        }
        used
    }
}
