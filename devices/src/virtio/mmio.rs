//! The virtio-mmio transport, version 2 (virtio 1.x, section 4.2): one 4 KiB window per device.
//! Only the register file is here; the device's worker half is [`super::device_side`], and the
//! interrupt is a [`SharedLine`] with the status register the driver reads and acknowledges.

use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::device_side::queue_events;
pub use super::device_side::{DeviceSide, IDLE_CHECK_MS, RECOVERY_LOG};
use super::driver_state::DriverState;
pub use super::state::{QueueSnapshot, RestoreError, VirtioState};
/// The state a virtio-mmio transport saves: the virtio core's, nothing of its own.
pub type MmioTransportState = VirtioState;
pub use super::driver_state::{
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
};
use super::interrupt::{SharedLine, VirtioInterrupt};
use super::{Poller, VirtioDevice};
use crate::bus::BusDevice;
use crate::interrupt::IrqLine;
use crate::os::EventFd;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

pub use super::interrupt::{INT_CONFIG, INT_USED_BUFFER};
/// Offset of the QueueNotify register (for ioeventfds).
pub const QUEUE_NOTIFY_OFFSET: u64 = REG_QUEUE_NOTIFY;

/// Size of one device's window.
pub const WINDOW_SIZE: u64 = 0x1000;

/// A virtio device on the MMIO bus: the registers the driver programs, and the
/// [`DeviceSide`] its worker thread runs.
pub struct MmioTransport {
    side: Arc<Mutex<DeviceSide>>,
    line: Arc<SharedLine>,
    driver: DriverState,
    queue_evts: Vec<EventFd>,
}

impl MmioTransport {
    /// `device` on a transport that reaches guest memory through `mem` and interrupts on `irq`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: IrqLine,
    ) -> std::io::Result<Self> {
        let queues: Vec<Queue> = device
            .queue_max_sizes()
            .iter()
            .filter_map(|&max| Queue::new(max).ok())
            .collect();
        let poller = Poller::new()?;
        let queue_evts = queue_events(queues.len(), &poller)?;
        Self::assemble(device, mem, irq, queues, poller, queue_evts)
    }

    fn assemble(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: IrqLine,
        queues: Vec<Queue>,
        poller: Poller,
        queue_evts: Vec<EventFd>,
    ) -> std::io::Result<Self> {
        let line = Arc::new(SharedLine::new(irq));
        let vcpu_evts = queue_evts
            .iter()
            .map(|e| e.try_clone())
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            driver: DriverState::new(
                device.device_type(),
                device.features() | super::CORE_FEATURES,
                queues.iter().map(|q| q.max_size()).collect(),
            ),
            side: Arc::new(Mutex::new(DeviceSide::new(
                device,
                mem,
                line.clone(),
                queues,
                poller,
                queue_evts,
            ))),
            line,
            queue_evts: vcpu_evts,
        })
    }

    fn lock(&self) -> MutexGuard<'_, DeviceSide> {
        self.side.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks every guest page the device writes from now on in `log` (dirty-page tracking
    /// for diff snapshots).
    pub fn set_dirty_log(&self, log: Arc<crate::dirty::DirtyLog>) {
        self.lock().dirty = Some(log);
    }

    /// Shares the VM's pause flag with the device's worker (see [`super::PauseFlag`]).
    pub fn set_pause_flag(&self, paused: super::PauseFlag) {
        self.lock().paused = paused;
    }

    /// The worker's half, for [`super::worker::spawn`].
    pub fn device_side(&self) -> Arc<Mutex<DeviceSide>> {
        self.side.clone()
    }

    /// One eventfd per queue, to be signalled when the driver writes the queue's index to the
    /// QueueNotify register (at [`QUEUE_NOTIFY_OFFSET`]): the hypervisor's ioeventfd.
    pub fn queue_events(&self) -> std::io::Result<Vec<EventFd>> {
        self.queue_evts.iter().map(|e| e.try_clone()).collect()
    }

    /// Runs `f` on the device (under the device lock): updates through the API.
    pub fn with_device<R>(&self, f: impl FnOnce(&mut dyn VirtioDevice, &Poller) -> R) -> R {
        self.lock().with_device(f)
    }

    /// True once the driver started the device (DRIVER_OK) and until it resets it.
    pub fn is_active(&self) -> bool {
        self.lock().is_active()
    }

    /// Makes the worker look at every queue again (after a rate limiter was swapped).
    pub fn kick_queues(&self) {
        for evt in &self.queue_evts {
            let _ = evt.write(1);
        }
    }

    /// Raises the interrupt again if its status has bits set: after a restore, once the
    /// interrupt controllers hold their saved state (a pulse sent while they were being
    /// rebuilt is lost, and the driver would wait for it forever).
    pub fn raise_pending(&self) {
        self.line.raise_pending();
    }

    /// Tells the driver the configuration space changed.
    pub fn config_changed(&self) {
        self.lock().config_changed();
    }

    /// Handles ready events on the calling thread (tests; the worker does this in production).
    pub fn run_ready(&self, timeout_ms: i32) -> usize {
        self.lock().run_ready(timeout_ms)
    }

    /// The transport's and device's state, for a snapshot (with the VM paused).
    pub fn save(&self) -> MmioTransportState {
        self.save_with(&self.lock())
    }

    /// [`MmioTransport::save`] with the device side already locked by the caller (who holds
    /// every device's lock so that no worker writes guest memory while it is saved).
    pub fn save_with(&self, side: &DeviceSide) -> MmioTransportState {
        VirtioState::save(&self.driver, side, self.line.status())
    }

    /// A transport for `device` in the state `state` describes, checked value by value:
    /// a corrupt or foreign snapshot is refused, never trusted.
    pub fn restore(
        mut device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: IrqLine,
        state: &MmioTransportState,
        dirty: Option<Arc<crate::dirty::DirtyLog>>,
    ) -> Result<Self, RestoreError> {
        let queues = state.restore_queues(device.as_mut())?;
        let io = |e: std::io::Error| RestoreError::Io(e.to_string());
        let poller = Poller::new().map_err(io)?;
        let queue_evts = queue_events(queues.len(), &poller).map_err(io)?;
        let mut t = Self::assemble(device, mem, irq, queues, poller, queue_evts).map_err(io)?;
        state.restore_driver(&mut t.driver);
        t.line.set_status(state.interrupt_status);
        state.resume(&mut t.lock(), dirty)?;
        // Buffers the driver made available just before the snapshot: the worker looks at
        // every queue once it starts.
        t.kick_queues();
        Ok(t)
    }

    /// The device status register (driver progress).
    pub fn status(&self) -> u32 {
        self.driver.status
    }

    fn notify(&mut self, index: u32) {
        // Reached only where no ioeventfd took the write: signal the queue's eventfd the same.
        if let Some(evt) = self.queue_evts.get(index as usize) {
            if let Err(e) = evt.write(1) {
                log::warn!("virtio-mmio: queue {index} notify: {e}");
            }
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.driver.device_type,
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => self.driver.device_features_word(),
            REG_QUEUE_NUM_MAX => u32::from(self.driver.selected_queue_max()),
            REG_QUEUE_READY => self
                .lock()
                .queues
                .get(self.driver.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.line.status(),
            REG_STATUS => self.driver.status,
            REG_CONFIG_GENERATION => self.lock().config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.driver.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver.driver_features_sel = v,
            REG_DRIVER_FEATURES => self.driver.set_driver_features_word(v),
            REG_QUEUE_SEL => self.driver.queue_sel = v,
            // A size beyond 16 bits is no size at all: virtio-queue refuses 0 as invalid.
            REG_QUEUE_NUM => self
                .driver
                .with_selected_queue(&self.side, |q| q.set_size(u16::try_from(v).unwrap_or(0))),
            REG_QUEUE_READY => self
                .driver
                .with_selected_queue(&self.side, |q| q.set_ready(v == 1)),
            REG_QUEUE_NOTIFY => self.notify(v),
            REG_INTERRUPT_ACK => self.line.acknowledge(v),
            REG_STATUS => self.driver.set_status(v, &self.side),
            REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => {
                let (low, high) = if offset & 4 == 0 {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                self.driver
                    .with_selected_queue(&self.side, |q| match offset & !4 {
                        REG_QUEUE_DESC_LOW => q.set_desc_table_address(low, high),
                        REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(low, high),
                        _ => q.set_used_ring_address(low, high),
                    });
            }
            _ => log::debug!("virtio-mmio: ignored write {v:#x} at {offset:#x}"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.lock().device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        // Registers are 32-bit and aligned; anything else reads as zero.
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(word) if offset % 4 == 0 => *word = self.read_reg(offset).to_le_bytes(),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.lock().device.write_config(offset - CONFIG_SPACE, data);
            return;
        }
        if let (Ok(word), true) = (<[u8; 4]>::try_from(data), offset % 4 == 0) {
            self.write_reg(offset, u32::from_le_bytes(word));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::CountingInterrupt;
    use crate::virtio::rng::Rng;
    use std::sync::Arc;
    use vm_memory::{Address, Bytes, GuestAddress};

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const QSIZE: u16 = 16;
    const MEM_SIZE: usize = 0x10_0000;

    struct Guest {
        dev: MmioTransport,
        mem: GuestMemoryMmap,
        irq: Arc<CountingInterrupt>,
        avail_idx: u16,
    }

    fn w(dev: &mut MmioTransport, off: u64, v: u32) {
        dev.write(off, &v.to_le_bytes());
    }

    fn r(dev: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        dev.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// Does what the Linux driver does to bring the device up, with one queue.
    fn guest() -> Guest {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let irq = Arc::new(CountingInterrupt::default());
        let mut dev =
            MmioTransport::new(Box::new(Rng::new()), mem.clone(), IrqLine(irq.clone())).unwrap();
        assert_eq!(r(&mut dev, REG_MAGIC), MAGIC);
        assert_eq!(r(&mut dev, REG_VERSION), 2);
        assert_eq!(r(&mut dev, REG_DEVICE_ID), 4);
        w(&mut dev, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut dev, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut dev, REG_DEVICE_FEATURES), 1, "VERSION_1 offered");
        w(&mut dev, REG_DRIVER_FEATURES_SEL, 1);
        w(&mut dev, REG_DRIVER_FEATURES, 1);
        w(
            &mut dev,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(r(&mut dev, REG_STATUS) & STATUS_FEATURES_OK, 0);
        w(&mut dev, REG_QUEUE_SEL, 0);
        assert_eq!(r(&mut dev, REG_QUEUE_NUM_MAX), 256);
        w(&mut dev, REG_QUEUE_NUM, u32::from(QSIZE));
        w(&mut dev, REG_QUEUE_DESC_LOW, DESC as u32);
        w(&mut dev, REG_QUEUE_DESC_HIGH, 0);
        w(&mut dev, REG_QUEUE_DRIVER_LOW, AVAIL as u32);
        w(&mut dev, REG_QUEUE_DEVICE_LOW, USED as u32);
        w(&mut dev, REG_QUEUE_READY, 1);
        w(
            &mut dev,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(r(&mut dev, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        Guest {
            dev,
            mem,
            irq,
            avail_idx: 0,
        }
    }

    impl Guest {
        /// Writes descriptor `i` = (addr, len, flags, next).
        fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let base = GuestAddress(DESC + u64::from(i) * 16);
            self.mem.write_obj(addr, base).unwrap();
            self.mem.write_obj(len, base.unchecked_add(8)).unwrap();
            self.mem.write_obj(flags, base.unchecked_add(12)).unwrap();
            self.mem.write_obj(next, base.unchecked_add(14)).unwrap();
        }

        /// Makes chain `head` available without notifying (a QueueNotify lost, or not yet
        /// written).
        fn make_available(&mut self, head: u16) {
            let slot = AVAIL + 4 + u64::from(self.avail_idx % QSIZE) * 2;
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.mem
                .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
                .unwrap();
        }

        /// Makes chain `head` available and notifies.
        fn offer(&mut self, head: u16) {
            self.make_available(head);
            w(&mut self.dev, REG_QUEUE_NOTIFY, 0);
            self.dev.run_ready(0);
        }

        fn used(&self) -> (u16, Vec<(u32, u32)>) {
            let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
            let elems = (0..idx.min(QSIZE))
                .map(|i| {
                    let e = USED + 4 + u64::from(i) * 8;
                    (
                        self.mem.read_obj(GuestAddress(e)).unwrap(),
                        self.mem.read_obj(GuestAddress(e + 4)).unwrap(),
                    )
                })
                .collect();
            (idx, elems)
        }
    }

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    #[test]
    fn rng_fills_a_buffer_and_interrupts() {
        let mut g = guest();
        g.desc(0, 0x8000, 64, F_WRITE, 0);
        g.offer(0);
        assert_eq!(g.used(), (1, vec![(0, 64)]));
        let mut buf = [0u8; 64];
        g.mem.read_slice(&mut buf, GuestAddress(0x8000)).unwrap();
        assert!(buf.iter().any(|&b| b != 0), "random bytes arrived");
        assert_eq!(g.irq.count(), 1);
        assert_eq!(r(&mut g.dev, REG_INTERRUPT_STATUS), INT_USED_BUFFER);
        w(&mut g.dev, REG_INTERRUPT_ACK, INT_USED_BUFFER);
        assert_eq!(r(&mut g.dev, REG_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn written_buffers_and_the_used_ring_are_marked_dirty() {
        let mut g = guest();
        let log = Arc::new(crate::dirty::DirtyLog::new(&[(0, MEM_SIZE as u64)]));
        g.dev.set_dirty_log(log.clone());
        // A read-only buffer is not marked; the writable one (two pages) and the ring are.
        g.desc(0, 0x20000, 16, F_NEXT, 1);
        g.desc(1, 0x30ff0, 32, F_WRITE, 0);
        g.offer(0);
        assert_eq!(g.used().0, 1);
        let pages: Vec<u64> = log
            .bitmap(0)
            .iter()
            .enumerate()
            .flat_map(|(w, &b)| {
                (0..64)
                    .filter(move |i| b & (1 << i) != 0)
                    .map(move |i| w as u64 * 64 + i)
            })
            .collect();
        assert!(pages.contains(&0x30) && pages.contains(&0x31), "{pages:x?}");
        assert!(!pages.contains(&0x20), "{pages:x?}");
        assert!(pages.contains(&(USED / 4096)), "{pages:x?}");
        assert_eq!(pages.len(), 3, "{pages:x?}");
    }

    /// Runs the worker's idle check on the device side.
    fn idle_check(g: &Guest) {
        g.dev.device_side().lock().unwrap().idle_check();
    }

    #[test]
    fn idle_check_recovers_a_lost_notification_and_a_lost_interrupt() {
        let mut g = guest();
        // A buffer made available without writing QueueNotify: nothing happens until the
        // worker's idle check finds it.
        g.desc(0, 0x8000, 32, F_WRITE, 0);
        g.make_available(0);
        g.dev.run_ready(0);
        assert_eq!(g.used().0, 0);
        // The first idle check leaves it: its notification may still be on the way...
        idle_check(&g);
        assert_eq!(g.used().0, 0);
        // ...the second, a whole quiet period later, takes it.
        idle_check(&g);
        assert_eq!(g.used(), (1, vec![(0, 32)]));
        assert_eq!(g.irq.count(), 1);
        // The driver never acknowledges: the first idle check notes the status, the second
        // (a whole idle period later) raises the interrupt again; nothing new after an ack.
        idle_check(&g);
        assert_eq!(g.irq.count(), 1);
        idle_check(&g);
        assert_eq!(g.irq.count(), 2);
        w(&mut g.dev, REG_INTERRUPT_ACK, INT_USED_BUFFER);
        idle_check(&g);
        idle_check(&g);
        assert_eq!(g.irq.count(), 2);
        // A notified buffer is handled at once and the idle check finds nothing more.
        g.desc(1, 0x9000, 16, F_WRITE, 0);
        g.offer(1);
        assert_eq!(g.used().0, 2);
        w(&mut g.dev, REG_INTERRUPT_ACK, INT_USED_BUFFER);
        idle_check(&g);
        idle_check(&g);
        assert_eq!(g.used().0, 2);
        assert_eq!(g.irq.count(), 3);
    }

    #[test]
    fn work_whose_notification_comes_after_an_idle_check_is_not_a_recovery() {
        let mut g = guest();
        // The guest wrote the available index; its QueueNotify is still on the way when the
        // idle check looks.
        g.desc(0, 0x8000, 32, F_WRITE, 0);
        g.make_available(0);
        idle_check(&g);
        assert_eq!(g.used().0, 0, "the idle check took buffers seen only once");
        w(&mut g.dev, REG_QUEUE_NOTIFY, 0);
        while g.dev.run_ready(0) > 0 {}
        assert_eq!(g.used(), (1, vec![(0, 32)]));
        idle_check(&g);
        idle_check(&g);
        assert_eq!(g.used().0, 1);
    }

    #[test]
    fn malformed_descriptors_neither_panic_nor_hang() {
        let mut g = guest();
        // A chain that loops on itself.
        g.desc(0, 0x8000, 16, F_WRITE | F_NEXT, 1);
        g.desc(1, 0x9000, 16, F_WRITE | F_NEXT, 0);
        g.offer(0);
        // A buffer outside guest memory.
        g.desc(2, MEM_SIZE as u64 + 0x1000, 32, F_WRITE, 0);
        g.offer(2);
        // A buffer that runs off the end of memory.
        g.desc(3, MEM_SIZE as u64 - 8, 4096, F_WRITE, 0);
        g.offer(3);
        // Zero-length, read-only (wrong direction) and oversized buffers.
        g.desc(4, 0x8000, 0, F_WRITE, 0);
        g.offer(4);
        g.desc(5, 0x8000, 128, 0, 0);
        g.offer(5);
        g.desc(6, 0x10000, u32::MAX, F_WRITE, 0);
        g.offer(6);
        // A next index beyond the queue.
        g.desc(7, 0x8000, 8, F_WRITE | F_NEXT, 999);
        g.offer(7);
        let (idx, used) = g.used();
        assert!(idx <= 7, "used {used:?}");
        for (id, len) in &used {
            assert!(*id < u32::from(QSIZE));
            assert!(*len <= crate::virtio::rng::MAX_BYTES_PER_REQUEST);
        }
        // The zero-length and read-only requests got nothing; the oversized one is capped.
        assert!(used.contains(&(4, 0)) && used.contains(&(5, 0)), "{used:?}");
        assert!(
            used.contains(&(6, crate::virtio::rng::MAX_BYTES_PER_REQUEST)),
            "{used:?}"
        );
    }

    #[test]
    fn save_and_restore_continue_where_the_queue_was() {
        let mut g = guest();
        g.desc(0, 0x8000, 32, F_WRITE, 0);
        g.offer(0);
        let state = g.dev.save();
        // Through postcard, as a snapshot file carries it.
        let bytes = postcard::to_allocvec(&state).unwrap();
        let back: MmioTransportState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, state);
        let served = |d: &super::super::DeviceState| match d {
            super::super::DeviceState::Rng(r) => r.bytes_served,
            other => panic!("{other:?}"),
        };
        assert_eq!(served(&back.device), 32);
        let irq = Arc::new(CountingInterrupt::default());
        g.dev = MmioTransport::restore(
            Box::new(Rng::new()),
            g.mem.clone(),
            IrqLine(irq.clone()),
            &back,
            None,
        )
        .unwrap();
        assert_eq!(g.dev.status() & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
        g.desc(1, 0x9000, 16, F_WRITE, 0);
        g.offer(1);
        // The second request lands in the second used slot: the used index was restored.
        assert_eq!(g.used(), (2, vec![(0, 32), (1, 16)]));
        assert_eq!(irq.count(), 1);
        assert_eq!(served(&g.dev.save().device), 48);
    }

    #[test]
    fn corrupt_or_foreign_state_is_refused() {
        let g = guest();
        let good = g.dev.save();
        let restore = |s: &MmioTransportState| {
            let irq = IrqLine(Arc::new(CountingInterrupt::default()));
            MmioTransport::restore(Box::new(Rng::new()), g.mem.clone(), irq, s, None).err()
        };
        let mut s = good.clone();
        s.device_type = 2;
        assert_eq!(
            restore(&s),
            Some(RestoreError::DeviceType {
                saved: 2,
                expected: 4
            })
        );
        let mut s = good.clone();
        s.queues.push(s.queues[0]);
        assert!(matches!(restore(&s), Some(RestoreError::QueueCount { .. })));
        let mut s = good.clone();
        s.queues[0].0.size = 3;
        assert!(matches!(
            restore(&s),
            Some(RestoreError::Queue { index: 0, .. })
        ));
        let mut s = good.clone();
        s.queues[0].0.max_size = 4096;
        assert!(matches!(restore(&s), Some(RestoreError::Queue { .. })));
        let mut s = good.clone();
        s.driver_features |= 1 << 40;
        assert!(matches!(restore(&s), Some(RestoreError::Features(_))));
        let mut s = good.clone();
        // Another kind of device's state.
        s.device = super::super::DeviceState::Vsock(crate::virtio::vsock::VsockState {
            guest_cid: 3,
            stats: Default::default(),
        });
        assert!(matches!(
            restore(&s),
            Some(RestoreError::DeviceState(
                super::super::DeviceStateError::Kind {
                    expected: "virtio-rng",
                    found: "virtio-vsock"
                }
            ))
        ));
        // A running device whose rings lie outside guest memory, or that never agreed on
        // VERSION_1, is not started from a forged state.
        let mut s = good.clone();
        s.queues[0].0.desc_table = MEM_SIZE as u64 + 0x1000;
        assert!(matches!(
            restore(&s),
            Some(RestoreError::Queue { index: 0, .. })
        ));
        let mut s = good.clone();
        s.driver_features &= !crate::virtio::VIRTIO_F_VERSION_1;
        assert!(matches!(restore(&s), Some(RestoreError::Device(_))));
        assert_eq!(restore(&good), None);
    }

    #[test]
    fn interrupt_registers_and_notify_do_not_wait_for_a_busy_device() {
        let mut g = guest();
        let side = g.dev.device_side();
        // The worker is in the middle of a long batch of I/O.
        let busy = side.lock().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            let dev = &mut g.dev;
            s.spawn(move || {
                // What a vCPU does in the device's interrupt handler and to submit more.
                let status = r(dev, REG_INTERRUPT_STATUS);
                w(dev, REG_INTERRUPT_ACK, status);
                w(dev, REG_QUEUE_NOTIFY, 0);
                tx.send(()).unwrap();
            });
            let done = rx.recv_timeout(std::time::Duration::from_secs(10));
            drop(busy);
            assert!(done.is_ok(), "a vCPU waited for the device lock");
        });
    }

    #[test]
    fn clearing_driver_ok_without_a_reset_asks_for_one() {
        let mut g = guest();
        w(&mut g.dev, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let st = r(&mut g.dev, REG_STATUS);
        assert_ne!(st & STATUS_NEEDS_RESET, 0);
        assert_ne!(st & STATUS_DRIVER_OK, 0, "queue registers stay locked");
        w(&mut g.dev, REG_QUEUE_NUM, 2);
        assert_eq!(g.dev.save().queues[0].0.size, QSIZE);
        w(&mut g.dev, REG_STATUS, 0);
        assert_eq!(r(&mut g.dev, REG_STATUS), 0);
    }

    #[test]
    fn bad_driver_setup_is_refused_not_fatal() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let irq = Arc::new(CountingInterrupt::default());
        let mut dev = MmioTransport::new(Box::new(Rng::new()), mem, IrqLine(irq.clone())).unwrap();
        // Features without VERSION_1: FEATURES_OK does not stick.
        w(
            &mut dev,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r(&mut dev, REG_STATUS) & STATUS_FEATURES_OK, 0);
        // A queue that does not exist, odd sizes and widths, notifications before DRIVER_OK.
        w(&mut dev, REG_QUEUE_SEL, 7);
        w(&mut dev, REG_QUEUE_NUM, 3);
        w(&mut dev, REG_QUEUE_READY, 1);
        assert_eq!(r(&mut dev, REG_QUEUE_NUM_MAX), 0);
        w(&mut dev, REG_QUEUE_NOTIFY, 0);
        w(&mut dev, REG_QUEUE_NOTIFY, u32::MAX);
        dev.write(REG_STATUS, &[1, 2]);
        dev.write(REG_STATUS + 1, &[0, 0, 0, 0]);
        let mut b = [0u8; 2];
        dev.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        // DRIVER_OK with an unusable queue asks for a reset instead of running.
        w(&mut dev, REG_QUEUE_SEL, 0);
        w(&mut dev, REG_QUEUE_NUM, 3); // not a power of two: ignored, the size stays valid
        w(&mut dev, REG_QUEUE_DESC_LOW, 0xffff_f000); // but the table is outside guest memory
        w(&mut dev, REG_QUEUE_READY, 1);
        w(&mut dev, REG_DRIVER_FEATURES_SEL, 1);
        w(&mut dev, REG_DRIVER_FEATURES, 1);
        w(
            &mut dev,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        w(
            &mut dev,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_ne!(r(&mut dev, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        w(&mut dev, REG_QUEUE_NOTIFY, 0);
        dev.run_ready(0);
        assert_eq!(irq.count(), 0);
        // Writing 0 resets everything.
        w(&mut dev, REG_STATUS, 0);
        assert_eq!(r(&mut dev, REG_STATUS), 0);
    }
}
