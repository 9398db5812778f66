//! The virtio-pci transport, modern (virtio 1.x, section 4.1): a PCI function with vendor
//! 0x1AF4 and device 0x1040 + type, whose BAR 0 holds the common configuration, the ISR, the
//! device configuration, the queue notification registers and the MSI-X table and PBA, each
//! found through a vendor capability. The device's worker half is the same
//! [`DeviceSide`] as over virtio-mmio; interrupts are MSI-X vectors once the driver enables
//! MSI-X, otherwise the ISR's shared line (INTx).

use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::device_side::{DeviceSide, queue_events};
use super::driver_state::DriverState;
use super::interrupt::{MsixVectors, NO_VECTOR, SharedLine, VirtioInterrupt};
use super::state::{RestoreError, VirtioState};
use super::{Poller, VirtioDevice};
use crate::interrupt::{IrqLine, MsiController};
use crate::os::EventFd;
use crate::pci::config::{ConfigSpace, Identity, MemBar};
use crate::pci::msix::{self, Msix, MsixState};
use crate::pci::{NotifyRegistrar, PciDevice};

/// The virtio vendor ID.
pub const VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are this plus the virtio device type.
pub const DEVICE_ID_BASE: u16 = 0x1040;

/// BAR 0's size and the offsets of its regions.
pub const BAR_SIZE: u64 = 0x8000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR: u64 = 0x1000;
const ISR_LEN: u64 = 4;
const DEVICE_CFG: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x1000;
/// Queue notifications: queue `q` at `NOTIFY + q * NOTIFY_MULTIPLIER`.
pub const NOTIFY: u64 = 0x3000;
const NOTIFY_LEN: u64 = 0x1000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x5000;
/// At most this many MSI-X vectors (the table's 4 KiB): queues beyond share vectors.
const MAX_VECTORS: usize = 256;

// Vendor capability types (virtio 1.x, 4.1.4).
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
const CAP_VENDOR: u8 = 0x09;

/// What a virtio-pci transport saves beside the virtio core.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PciTransportState {
    /// The function's configuration space (BARs, command, MSI-X control).
    pub config: Vec<u8>,
    /// The MSI-X table and PBA.
    pub msix: MsixState,
    /// The configuration-change vector.
    pub config_vector: u16,
    /// Each queue's vector.
    pub queue_vectors: Vec<u16>,
}

/// Interrupts of a virtio-pci function: the MSI-X vectors while MSI-X is enabled, otherwise
/// the ISR's shared line.
pub struct PciInterrupt {
    line: SharedLine,
    vectors: MsixVectors,
    msix: Arc<Msix>,
}

impl VirtioInterrupt for PciInterrupt {
    fn used(&self, queues: u64) {
        if self.msix.enabled() {
            self.vectors.used(queues);
        } else {
            self.line.used(queues);
        }
    }

    fn config_changed(&self) {
        if self.msix.enabled() {
            self.vectors.config_changed();
        } else {
            self.line.config_changed();
        }
    }

    fn pending(&self) -> Option<u32> {
        if self.msix.enabled() {
            None
        } else {
            self.line.pending()
        }
    }

    fn raise_pending(&self) {
        if self.msix.enabled() {
            self.vectors.raise_pending();
        } else {
            self.line.raise_pending();
        }
    }

    fn clear(&self) {
        self.line.clear();
        self.vectors.clear();
    }
}

/// An interrupt line that goes nowhere: a function without INTx (its interrupt pin is 0, so
/// the driver uses MSI-X).
struct NoLine;

impl crate::interrupt::Interrupt for NoLine {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where a virtio-pci function's pieces come from.
pub struct PciResources {
    /// Its requester ID (bus << 8 | slot << 3 | function), for MSIs.
    pub devid: u32,
    /// Where the MSI-X vectors come from.
    pub msi: Arc<dyn MsiController>,
    /// Registers queue notifications as ioeventfds.
    pub notify: Arc<dyn NotifyRegistrar>,
    /// The INTx line, where the platform routes one (the interrupt pin is INTA#); `None`: no
    /// INTx, MSI-X only.
    pub intx: Option<IrqLine>,
    /// Where BAR 0 starts (placed as firmware would; the guest may move it).
    pub bar_address: u64,
}

/// A virtio device on the PCI bus.
pub struct PciTransport {
    side: Arc<Mutex<DeviceSide>>,
    interrupt: Arc<PciInterrupt>,
    driver: DriverState,
    queue_evts: Vec<EventFd>,
    config: ConfigSpace,
    msix_cap: usize,
    pci_cfg_cap: usize,
    notify: Arc<dyn NotifyRegistrar>,
    /// Where the notification ioeventfds are registered now (BAR 0's base).
    notify_base: Option<u64>,
}

fn class_of(device_type: u32) -> u32 {
    match device_type {
        2 => 0x01_80_00, // mass storage, other
        1 => 0x02_00_00, // network, Ethernet
        _ => 0xff_00_00, // no class fits
    }
}

impl PciTransport {
    /// `device` on a PCI function that reaches guest memory through `mem`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        res: PciResources,
    ) -> std::io::Result<Self> {
        let queues: Vec<Queue> = device
            .queue_max_sizes()
            .iter()
            .filter_map(|&max| Queue::new(max).ok())
            .collect();
        let poller = Poller::new()?;
        let queue_evts = queue_events(queues.len(), &poller)?;
        Self::assemble(device, mem, res, queues, poller, queue_evts)
    }

    fn assemble(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        res: PciResources,
        queues: Vec<Queue>,
        poller: Poller,
        queue_evts: Vec<EventFd>,
    ) -> std::io::Result<Self> {
        let bad = |e: crate::pci::config::LayoutError| std::io::Error::other(e.to_string());
        let device_type = device.device_type();
        let vectors = (queues.len() + 1).min(MAX_VECTORS) as u16;
        let msix = Arc::new(Msix::new(vectors, res.msi.vectors(vectors, res.devid)?));
        let has_intx = res.intx.is_some();
        let line =
            SharedLine::new(res.intx.unwrap_or_else(|| {
                IrqLine(Arc::new(NoLine) as Arc<dyn crate::interrupt::Interrupt>)
            }));
        let interrupt = Arc::new(PciInterrupt {
            line,
            vectors: MsixVectors::new(queues.len(), msix.clone()),
            msix: msix.clone(),
        });
        let mut config = ConfigSpace::new(Identity {
            vendor: VENDOR_ID,
            device: DEVICE_ID_BASE + device_type as u16,
            revision: 1,
            class: class_of(device_type),
            subsystem_vendor: VENDOR_ID,
            subsystem: 0x40,
        });
        config
            .add_mem_bar(
                0,
                MemBar {
                    size: BAR_SIZE,
                    is_64bit: true,
                    prefetchable: false,
                },
            )
            .map_err(bad)?;
        config.set_bar_address(0, res.bar_address);
        config.set_interrupt_pin(u8::from(has_intx));
        let cap = |cfg_type: u8, offset: u64, len: u64, extra: &[u8]| {
            let mut b = vec![16 + extra.len() as u8, cfg_type, 0, 0, 0, 0];
            b.extend_from_slice(&(offset as u32).to_le_bytes());
            b.extend_from_slice(&(len as u32).to_le_bytes());
            b.extend_from_slice(extra);
            b
        };
        for (t, off, len, extra) in [
            (CAP_COMMON, COMMON, COMMON_LEN, &[][..]),
            (CAP_ISR, ISR, ISR_LEN, &[][..]),
            (CAP_DEVICE, DEVICE_CFG, DEVICE_CFG_LEN, &[][..]),
            (
                CAP_NOTIFY,
                NOTIFY,
                NOTIFY_LEN,
                &NOTIFY_MULTIPLIER.to_le_bytes()[..],
            ),
        ] {
            config
                .add_capability(CAP_VENDOR, &cap(t, off, len, extra), &[])
                .map_err(bad)?;
        }
        // VIRTIO_PCI_CAP_PCI_CFG: BAR, offset and length are the driver's, and so is the
        // data window after them (an access to it goes to the BAR).
        let pci_cfg_cap = config
            .add_capability(
                CAP_VENDOR,
                &cap(CAP_PCI_CFG, 0, 0, &[0; 4]),
                &[
                    0, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                    0xff, 0xff, 0xff,
                ],
            )
            .map_err(bad)?;
        let msix_cap = config
            .add_capability(
                msix::CAP_ID,
                &msix.capability(0, MSIX_TABLE as u32, MSIX_PBA as u32),
                &[0, 0xc0],
            )
            .map_err(bad)?;
        let vcpu_evts = queue_evts
            .iter()
            .map(|e| e.try_clone())
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            driver: DriverState::new(
                device_type,
                device.features() | super::CORE_FEATURES,
                queues.iter().map(|q| q.max_size()).collect(),
            ),
            side: Arc::new(Mutex::new(DeviceSide::new(
                device,
                mem,
                interrupt.clone(),
                queues,
                poller,
                queue_evts,
            ))),
            interrupt,
            queue_evts: vcpu_evts,
            config,
            msix_cap,
            pci_cfg_cap,
            notify: res.notify,
            notify_base: None,
        })
    }

    fn lock(&self) -> MutexGuard<'_, DeviceSide> {
        self.side.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks every guest page the device writes from now on in `log`.
    pub fn set_dirty_log(&self, log: Arc<crate::dirty::DirtyLog>) {
        self.lock().dirty = Some(log);
    }

    /// Shares the VM's pause flag with the device's worker.
    pub fn set_pause_flag(&self, paused: super::PauseFlag) {
        self.lock().paused = paused;
    }

    /// The worker's half, for [`super::worker::spawn`].
    pub fn device_side(&self) -> Arc<Mutex<DeviceSide>> {
        self.side.clone()
    }

    /// Runs `f` on the device (under the device lock): updates through the API.
    pub fn with_device<R>(&self, f: impl FnOnce(&mut dyn VirtioDevice, &Poller) -> R) -> R {
        self.lock().with_device(f)
    }

    /// True once the driver started the device and until it resets it.
    pub fn is_active(&self) -> bool {
        self.lock().is_active()
    }

    /// Makes the worker look at every queue again.
    pub fn kick_queues(&self) {
        for evt in &self.queue_evts {
            let _ = evt.write(1);
        }
    }

    /// Raises again what the driver has not seen (after a restore).
    pub fn raise_pending(&self) {
        self.interrupt.raise_pending();
    }

    /// Tells the driver the configuration space changed.
    pub fn config_changed(&self) {
        self.lock().config_changed();
    }

    /// Handles ready events on the calling thread (tests).
    pub fn run_ready(&self, timeout_ms: i32) -> usize {
        self.lock().run_ready(timeout_ms)
    }

    /// The device status (driver progress).
    pub fn status(&self) -> u32 {
        self.driver.status
    }

    /// The virtio core's state and the function's own, with the device side locked by the
    /// caller.
    pub fn save_with(&self, side: &DeviceSide) -> (VirtioState, PciTransportState) {
        let core = VirtioState::save(&self.driver, side, self.interrupt.line.status());
        let pci = PciTransportState {
            config: self.config.save(),
            msix: self.interrupt.msix.save(),
            config_vector: self.interrupt.vectors.config_vector(),
            queue_vectors: (0..self.driver.queue_max.len())
                .map(|q| self.interrupt.vectors.queue_vector(q))
                .collect(),
        };
        (core, pci)
    }

    /// A transport for `device` in the saved state, checked value by value. Its BAR is where
    /// the saved configuration space puts it; its notifications are registered there once the
    /// PCI bus looks at it ([`crate::pci::PciBus::add`]).
    pub fn restore(
        mut device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        res: PciResources,
        core: &VirtioState,
        pci: &PciTransportState,
        dirty: Option<Arc<crate::dirty::DirtyLog>>,
    ) -> Result<Self, RestoreError> {
        let queues = core.restore_queues(device.as_mut())?;
        if pci.queue_vectors.len() != queues.len() {
            return Err(RestoreError::QueueCount {
                saved: pci.queue_vectors.len(),
                expected: queues.len(),
            });
        }
        let io = |e: std::io::Error| RestoreError::Io(e.to_string());
        let poller = Poller::new().map_err(io)?;
        let queue_evts = queue_events(queues.len(), &poller).map_err(io)?;
        let mut t = Self::assemble(device, mem, res, queues, poller, queue_evts).map_err(io)?;
        t.config
            .restore(&pci.config)
            .map_err(RestoreError::Device)?;
        t.interrupt
            .msix
            .restore(&pci.msix)
            .map_err(RestoreError::Device)?;
        t.interrupt.msix.set_control(t.msix_control());
        t.interrupt.vectors.set_config_vector(pci.config_vector);
        for (q, v) in pci.queue_vectors.iter().enumerate() {
            t.interrupt.vectors.set_queue_vector(q, *v);
        }
        core.restore_driver(&mut t.driver);
        t.interrupt.line.set_status(core.interrupt_status);
        core.resume(&mut t.lock(), dirty)?;
        t.kick_queues();
        Ok(t)
    }

    fn msix_control(&self) -> u16 {
        let b = self.config.bytes(self.msix_cap + 2, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    fn vector_ok(&self, v: u16) -> u16 {
        if v < self.interrupt.msix.len() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn read_common(&self, offset: u64, len: usize) -> u64 {
        let d = &self.driver;
        let sel = d.queue_sel as usize;
        let queue = |f: &dyn Fn(&Queue) -> u64| self.lock().queues.get(sel).map_or(0, f);
        let v: u64 = match offset {
            0x00 => u64::from(d.device_features_sel),
            0x04 => u64::from(d.device_features_word()),
            0x08 => u64::from(d.driver_features_sel),
            0x0c => match d.driver_features_sel {
                0 => d.driver_features & 0xffff_ffff,
                1 => d.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.interrupt.vectors.config_vector()),
            0x12 => d.queue_max.len() as u64,
            0x14 => u64::from(d.status as u8),
            0x15 => u64::from(self.lock().config_generation as u8),
            0x16 => u64::from(d.queue_sel as u16),
            0x18 => queue(&|q| u64::from(q.size())),
            0x1a => u64::from(self.interrupt.vectors.queue_vector(sel)),
            0x1c => queue(&|q| u64::from(q.ready())),
            0x1e if sel < d.queue_max.len() => sel as u64,
            0x20 | 0x24 => queue(&|q| q.desc_table()) >> (8 * (offset - 0x20)),
            0x28 | 0x2c => queue(&|q| q.avail_ring()) >> (8 * (offset - 0x28)),
            0x30 | 0x34 => queue(&|q| q.used_ring()) >> (8 * (offset - 0x30)),
            _ => 0,
        };
        match len {
            1 => v & 0xff,
            2 => v & 0xffff,
            4 => v & 0xffff_ffff,
            _ => v,
        }
    }

    fn write_common(&mut self, offset: u64, v: u64) {
        let w32 = v as u32;
        match offset {
            0x00 => self.driver.device_features_sel = w32,
            0x08 => self.driver.driver_features_sel = w32,
            0x0c => self.driver.set_driver_features_word(w32),
            0x10 => {
                let v = self.vector_ok(v as u16);
                self.interrupt.vectors.set_config_vector(v);
            }
            0x14 => self.driver.set_status(u32::from(v as u8), &self.side),
            0x16 => self.driver.queue_sel = u32::from(v as u16),
            0x18 => self
                .driver
                .with_selected_queue(&self.side, |q| q.set_size(v as u16)),
            0x1a => {
                if self.driver.status & super::driver_state::STATUS_DRIVER_OK == 0 {
                    let vec = self.vector_ok(v as u16);
                    self.interrupt
                        .vectors
                        .set_queue_vector(self.driver.queue_sel as usize, vec);
                }
            }
            // Only 1 enables a queue; a driver takes one back by resetting the device.
            0x1c if v == 1 => self
                .driver
                .with_selected_queue(&self.side, |q| q.set_ready(true)),
            0x20..=0x37 => {
                // Dword halves, or a whole quadword at the low half.
                let (low, high) = match offset & 7 {
                    0 if v >> 32 != 0 => (Some(w32), Some((v >> 32) as u32)),
                    0 => (Some(w32), None),
                    _ => (None, Some(w32)),
                };
                let field = offset & !7;
                self.driver
                    .with_selected_queue(&self.side, |q| match field {
                        0x20 => q.set_desc_table_address(low, high),
                        0x28 => q.set_avail_ring_address(low, high),
                        _ => q.set_used_ring_address(low, high),
                    });
            }
            _ => log::debug!("virtio-pci: ignored common write {v:#x} at {offset:#x}"),
        }
    }

    fn notify_queue(&self, offset: u64) {
        // Reached only where no ioeventfd took the write.
        let q = (offset / u64::from(NOTIFY_MULTIPLIER)) as usize;
        if let Some(evt) = self.queue_evts.get(q) {
            if let Err(e) = evt.write(1) {
                log::warn!("virtio-pci: queue {q} notify: {e}");
            }
        }
    }

    fn register_notify(&mut self, base: Option<u64>) {
        if let Some(old) = self.notify_base.take() {
            for (q, evt) in self.queue_evts.iter().enumerate() {
                let at = old + NOTIFY + q as u64 * u64::from(NOTIFY_MULTIPLIER);
                if let Err(e) = self.notify.unregister(evt, at) {
                    log::warn!("virtio-pci: queue {q} notification at {at:#x}: {e}");
                }
            }
        }
        if let Some(new) = base {
            for (q, evt) in self.queue_evts.iter().enumerate() {
                let at = new + NOTIFY + q as u64 * u64::from(NOTIFY_MULTIPLIER);
                // Without the ioeventfd the write still arrives, as a VM exit.
                if let Err(e) = self.notify.register(evt, at) {
                    log::warn!("virtio-pci: queue {q} notification at {at:#x}: {e}");
                }
            }
            self.notify_base = Some(new);
        }
    }

    /// The PCI configuration access capability's window: BAR 0 at the offset and length the
    /// driver put in the capability.
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let c = self.pci_cfg_cap;
        let bar = self.config.bytes(c + 4, 1)[0];
        let off = self.config.bytes(c + 8, 4);
        let len = self.config.bytes(c + 12, 4);
        let off = u32::from_le_bytes([off[0], off[1], off[2], off[3]]);
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]);
        (bar == 0 && matches!(len, 1 | 2 | 4)).then_some((u64::from(off), len as usize))
    }

    fn touches_cfg_data(&self, offset: usize, len: usize) -> bool {
        let data = self.pci_cfg_cap + 16;
        offset < data + 4 && offset + len > data
    }
}

impl PciDevice for PciTransport {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        if self.touches_cfg_data(offset, data.len()) {
            if let Some((off, len)) = self.pci_cfg_window() {
                let mut b = [0u8; 4];
                self.bar_read(0, off, &mut b[..len]);
                self.config.set_bytes(self.pci_cfg_cap + 16, &b);
            }
        }
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        if self.touches_cfg_data(offset, data.len()) {
            if let Some((off, len)) = self.pci_cfg_window() {
                let b = self.config.bytes(self.pci_cfg_cap + 16, 4).to_vec();
                self.bar_write(0, off, &b[..len]);
            }
        }
        let ctl = self.msix_cap + 2;
        if offset < ctl + 2 && offset + data.len() > ctl {
            self.interrupt.msix.set_control(self.msix_control());
        }
    }

    fn bar_range(&self, index: usize) -> Option<(u64, u64)> {
        Some((
            self.config.bar_address(index)?,
            self.config.bar(index)?.size,
        ))
    }

    fn bar_read(&mut self, index: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if index != 0 {
            return;
        }
        let len = data.len();
        match offset {
            o if (COMMON..COMMON + COMMON_LEN).contains(&o) => {
                if matches!(len, 1 | 2 | 4 | 8) {
                    let v = self.read_common(o, len);
                    data.copy_from_slice(&v.to_le_bytes()[..len]);
                }
            }
            o if (ISR..ISR + ISR_LEN).contains(&o) => {
                // Reading the ISR acknowledges it (and lowers INTx).
                let status = self.interrupt.line.status();
                self.interrupt.line.acknowledge(status);
                data[0] = status as u8;
            }
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&o) => {
                self.lock().device.read_config(o - DEVICE_CFG, data);
            }
            o if (MSIX_TABLE..MSIX_TABLE + self.interrupt.msix.table_size()).contains(&o) => {
                self.interrupt.msix.read_table(o - MSIX_TABLE, data);
            }
            o if (MSIX_PBA..MSIX_PBA + self.interrupt.msix.pba_size()).contains(&o) => {
                self.interrupt.msix.read_pba(o - MSIX_PBA, data);
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, index: usize, offset: u64, data: &[u8]) {
        if index != 0 {
            return;
        }
        let len = data.len();
        match offset {
            o if (COMMON..COMMON + COMMON_LEN).contains(&o) => {
                if matches!(len, 1 | 2 | 4 | 8) {
                    let mut b = [0u8; 8];
                    b[..len].copy_from_slice(data);
                    self.write_common(o, u64::from_le_bytes(b));
                }
            }
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&o) => {
                self.lock().device.write_config(o - DEVICE_CFG, data);
            }
            o if (NOTIFY..NOTIFY + NOTIFY_LEN).contains(&o) => self.notify_queue(o - NOTIFY),
            o if (MSIX_TABLE..MSIX_TABLE + self.interrupt.msix.table_size()).contains(&o) => {
                self.interrupt.msix.write_table(o - MSIX_TABLE, data);
            }
            _ => log::debug!("virtio-pci: ignored BAR write at {offset:#x}"),
        }
    }

    fn bar_moved(&mut self, index: usize, _from: Option<u64>, to: Option<u64>) {
        if index == 0 {
            self.register_notify(to);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::{CountingInterrupt, RecordingMsi};
    use crate::pci::PciBus;
    use crate::pci::config::{CAP_POINTER, COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY};
    use crate::virtio::driver_state::*;
    use crate::virtio::rng::Rng;
    use vm_memory::{Bytes, GuestAddress};

    #[derive(Default)]
    struct Notifies(Mutex<Vec<(bool, u64)>>);
    impl NotifyRegistrar for Notifies {
        fn register(&self, _evt: &EventFd, addr: u64) -> std::io::Result<()> {
            self.0.lock().unwrap().push((true, addr));
            Ok(())
        }
        fn unregister(&self, _evt: &EventFd, addr: u64) -> std::io::Result<()> {
            self.0.lock().unwrap().push((false, addr));
            Ok(())
        }
    }

    const BAR: u64 = 0xe000_0000;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const BUF: u64 = 0x8000;

    struct Guest {
        bus: PciBus,
        t: Arc<Mutex<PciTransport>>,
        mem: GuestMemoryMmap,
        msi: Arc<RecordingMsi>,
        intx: Arc<CountingInterrupt>,
        notifies: Arc<Notifies>,
        /// Region offsets in BAR 0 by capability type.
        regions: Vec<(u8, u64)>,
        msix_cap: usize,
    }

    impl Guest {
        fn cfg(&self, off: usize, len: usize) -> u32 {
            let mut b = [0u8; 4];
            self.bus.config_read(0, 1, 0, off, &mut b[..len]);
            u32::from_le_bytes(b)
        }
        fn set_cfg(&self, off: usize, data: &[u8]) {
            self.bus.config_write(0, 1, 0, off, data);
        }
        fn region(&self, t: u8) -> u64 {
            self.regions.iter().find(|r| r.0 == t).unwrap().1
        }
        fn rd(&self, off: u64, len: usize) -> u64 {
            let mut b = [0u8; 8];
            assert!(self.bus.mmio_read(BAR + off, &mut b[..len]));
            u64::from_le_bytes(b)
        }
        fn wr(&self, off: u64, v: u64, len: usize) {
            assert!(self.bus.mmio_write(BAR + off, &v.to_le_bytes()[..len]));
        }
        fn common(&self, reg: u64, v: u64, len: usize) {
            self.wr(self.region(CAP_COMMON) + reg, v, len);
        }
        fn common_rd(&self, reg: u64, len: usize) -> u64 {
            self.rd(self.region(CAP_COMMON) + reg, len)
        }
    }

    /// Finds the capabilities and brings the device up as Linux's virtio_pci does.
    fn guest() -> Guest {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let msi = Arc::new(RecordingMsi::default());
        let intx = Arc::new(CountingInterrupt::default());
        let notifies = Arc::new(Notifies::default());
        let t = PciTransport::new(
            Box::new(Rng::new()),
            mem.clone(),
            PciResources {
                devid: 1 << 3,
                msi: msi.clone(),
                notify: notifies.clone(),
                intx: Some(IrqLine(intx.clone())),
                bar_address: BAR,
            },
        )
        .unwrap();
        let t = Arc::new(Mutex::new(t));
        let mut bus = PciBus::new();
        assert_eq!(bus.add(t.clone()).unwrap(), 1);
        let mut g = Guest {
            bus,
            t,
            mem,
            msi,
            intx,
            notifies,
            regions: Vec::new(),
            msix_cap: 0,
        };
        assert_eq!(g.cfg(0, 4), 0x1044_1af4, "virtio-rng, modern");
        assert_eq!(g.cfg(0x3d, 1), 1, "INTA#");
        let mut cap = g.cfg(CAP_POINTER, 1) as usize;
        while cap != 0 {
            match g.cfg(cap, 1) as u8 {
                CAP_VENDOR => {
                    let t = g.cfg(cap + 3, 1) as u8;
                    assert_eq!(g.cfg(cap + 4, 1), 0, "BAR 0");
                    g.regions.push((t, u64::from(g.cfg(cap + 8, 4))));
                    if t == CAP_NOTIFY {
                        assert_eq!(g.cfg(cap + 16, 4), NOTIFY_MULTIPLIER);
                    }
                }
                msix::CAP_ID => g.msix_cap = cap,
                other => panic!("unexpected capability {other:#x}"),
            }
            cap = g.cfg(cap + 1, 1) as usize;
        }
        assert_eq!(g.regions.len(), 5, "common, ISR, device, notify, PCI cfg");
        assert_ne!(g.msix_cap, 0);
        assert!(g.notifies.0.lock().unwrap().is_empty(), "not decoding yet");
        g.set_cfg(
            COMMAND,
            &(COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes(),
        );
        assert_eq!(
            *g.notifies.0.lock().unwrap(),
            vec![(true, BAR + NOTIFY)],
            "the queue's ioeventfd"
        );
        // MSI-X: enable, vector 0 for config changes, vector 1 for the queue, both unmasked.
        g.set_cfg(g.msix_cap + 2, &msix::CONTROL_ENABLE.to_le_bytes());
        assert_eq!(g.cfg(g.msix_cap + 2, 2) & 0x7ff, 1, "two vectors");
        for v in 0..2u64 {
            g.wr(MSIX_TABLE + 16 * v, 0xfee0_0000, 4);
            g.wr(MSIX_TABLE + 16 * v + 8, 0x30 + v, 4);
            g.wr(MSIX_TABLE + 16 * v + 12, 0, 4);
        }
        g.common(0x14, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER), 1);
        g.common(0x00, 1, 4);
        assert_eq!(g.common_rd(0x04, 4), 1, "VERSION_1");
        g.common(0x08, 1, 4);
        g.common(0x0c, 1, 4);
        g.common(
            0x14,
            u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK),
            1,
        );
        assert_ne!(g.common_rd(0x14, 1) as u32 & STATUS_FEATURES_OK, 0);
        g.common(0x10, 0, 2);
        assert_eq!(g.common_rd(0x10, 2), 0);
        assert_eq!(g.common_rd(0x12, 2), 1, "one queue");
        g.common(0x16, 0, 2);
        assert_eq!(g.common_rd(0x18, 2), 256, "the maximum until set");
        g.common(0x18, 16, 2);
        g.common(0x1a, 99, 2);
        assert_eq!(g.common_rd(0x1a, 2), u64::from(NO_VECTOR), "no such vector");
        g.common(0x1a, 1, 2);
        assert_eq!(g.common_rd(0x1a, 2), 1);
        assert_eq!(g.common_rd(0x1e, 2), 0, "queue_notify_off");
        g.common(0x20, DESC, 4);
        g.common(0x24, 0, 4);
        g.common(0x28, AVAIL, 8);
        g.common(0x30, USED, 4);
        assert_eq!(g.common_rd(0x28, 8), AVAIL);
        g.common(0x1c, 1, 2);
        g.common(
            0x14,
            u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK),
            1,
        );
        assert_eq!(g.common_rd(0x14, 1) as u32 & STATUS_NEEDS_RESET, 0);
        g
    }

    fn offer(g: &Guest, n: u16) {
        g.mem.write_obj(BUF, GuestAddress(DESC)).unwrap();
        g.mem.write_obj(64u32, GuestAddress(DESC + 8)).unwrap();
        g.mem.write_obj(2u16, GuestAddress(DESC + 12)).unwrap(); // device writes
        g.mem
            .write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * u64::from(n % 16)))
            .unwrap();
        g.mem.write_obj(n + 1, GuestAddress(AVAIL + 2)).unwrap();
        // No ioeventfd in a unit test: the write reaches the BAR.
        g.wr(g.region(CAP_NOTIFY), 0, 2);
        g.t.lock().unwrap().run_ready(0);
    }

    fn used_idx(g: &Guest) -> u16 {
        g.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    #[test]
    fn rng_works_over_msix() {
        let g = guest();
        offer(&g, 0);
        assert_eq!(used_idx(&g), 1);
        assert_eq!(
            g.msi.take(),
            vec![(0xfee0_0000, 0x31, 1 << 3)],
            "queue 0's vector"
        );
        g.t.lock().unwrap().config_changed();
        assert_eq!(
            g.msi.take(),
            vec![(0xfee0_0000, 0x30, 1 << 3)],
            "config vector"
        );
        // Masked: held in the PBA, sent on unmask.
        g.wr(MSIX_TABLE + 16 + 12, 1, 4);
        offer(&g, 1);
        assert!(g.msi.take().is_empty());
        assert_eq!(g.rd(MSIX_PBA, 8), 0b10);
        g.wr(MSIX_TABLE + 16 + 12, 0, 4);
        assert_eq!(g.msi.take().len(), 1);
        // The ISR and the INTx line are not used with MSI-X.
        assert_eq!(g.rd(g.region(CAP_ISR), 1), 0);
        assert_eq!(g.intx.count(), 0);
    }

    #[test]
    fn without_msix_the_isr_says_why() {
        let g = guest();
        g.set_cfg(g.msix_cap + 2, &0u16.to_le_bytes());
        let before = g.intx.count();
        offer(&g, 0);
        assert!(g.msi.take().is_empty());
        assert!(g.intx.count() > before, "INTx raised");
        assert_eq!(g.rd(g.region(CAP_ISR), 1), 1, "used buffer");
        assert_eq!(g.rd(g.region(CAP_ISR), 1), 0, "read clears it");
    }

    #[test]
    fn a_moved_bar_keeps_working_and_its_notifications_follow() {
        let g = guest();
        g.notifies.0.lock().unwrap().clear();
        let moved = 0xe010_0000u64;
        g.set_cfg(0x10, &(moved as u32).to_le_bytes());
        assert_eq!(
            *g.notifies.0.lock().unwrap(),
            vec![(false, BAR + NOTIFY), (true, moved + NOTIFY)]
        );
        let mut b = [0u8; 2];
        assert!(
            !g.bus.mmio_read(BAR + 0x12, &mut b),
            "nothing at the old place"
        );
        assert!(g.bus.mmio_read(moved + 0x12, &mut b));
        assert_eq!(u16::from_le_bytes(b), 1, "num_queues at the new place");
        g.set_cfg(COMMAND, &0u16.to_le_bytes());
        assert_eq!(
            g.notifies.0.lock().unwrap().last(),
            Some(&(false, moved + NOTIFY)),
            "memory decoding off: no notifications"
        );
    }

    #[test]
    fn the_pci_cfg_capability_reaches_the_bar() {
        let g = guest();
        let cap = {
            let mut c = g.cfg(CAP_POINTER, 1) as usize;
            while !(g.cfg(c, 1) == u32::from(CAP_VENDOR)
                && g.cfg(c + 3, 1) == u32::from(CAP_PCI_CFG))
            {
                c = g.cfg(c + 1, 1) as usize;
            }
            c
        };
        g.set_cfg(cap + 4, &[0]);
        g.set_cfg(cap + 8, &0x12u32.to_le_bytes());
        g.set_cfg(cap + 12, &2u32.to_le_bytes());
        assert_eq!(
            g.cfg(cap + 16, 2),
            1,
            "num_queues through configuration space"
        );
        g.set_cfg(cap + 8, &0x16u32.to_le_bytes());
        g.set_cfg(cap + 16, &[5, 0]);
        assert_eq!(g.common_rd(0x16, 2), 5, "queue_select written through it");
    }

    #[test]
    fn save_and_restore_keep_vectors_bar_and_queue() {
        let g = guest();
        offer(&g, 0);
        g.msi.take();
        let (core, pci) = {
            let t = g.t.lock().unwrap();
            let side = t.device_side();
            let side = side.lock().unwrap();
            t.save_with(&side)
        };
        let bytes = postcard::to_stdvec(&(core.clone(), pci.clone())).unwrap();
        let (core2, pci2): (VirtioState, PciTransportState) = postcard::from_bytes(&bytes).unwrap();
        let msi = Arc::new(RecordingMsi::default());
        let notifies = Arc::new(Notifies::default());
        let r = PciTransport::restore(
            Box::new(Rng::new()),
            g.mem.clone(),
            PciResources {
                devid: 1 << 3,
                msi: msi.clone(),
                notify: notifies.clone(),
                intx: Some(IrqLine(Arc::new(CountingInterrupt::default()))),
                bar_address: 0,
            },
            &core2,
            &pci2,
            None,
        )
        .unwrap();
        let side = r.device_side();
        assert_eq!(r.save_with(&side.lock().unwrap()), (core, pci));
        let r = Arc::new(Mutex::new(r));
        let mut bus = PciBus::new();
        bus.add(r.clone()).unwrap();
        assert_eq!(
            *notifies.0.lock().unwrap(),
            vec![(true, BAR + NOTIFY)],
            "registered where the saved BAR is"
        );
        // The restored device goes on where the queue was, on the saved vector.
        g.mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2)).unwrap();
        g.mem.write_obj(2u16, GuestAddress(AVAIL + 2)).unwrap();
        r.lock().unwrap().kick_queues();
        r.lock().unwrap().run_ready(0);
        assert_eq!(used_idx(&g), 2);
        assert_eq!(msi.take(), vec![(0xfee0_0000, 0x31, 1 << 3)]);
        // A state of another shape is refused.
        let mut bad = pci2.clone();
        bad.queue_vectors.push(0);
        assert!(
            PciTransport::restore(
                Box::new(Rng::new()),
                g.mem.clone(),
                PciResources {
                    devid: 0,
                    msi,
                    notify: notifies,
                    intx: None,
                    bar_address: 0,
                },
                &core2,
                &bad,
                None,
            )
            .is_err()
        );
    }

    #[test]
    fn odd_accesses_neither_panic_nor_change_state() {
        let g = guest();
        for off in [
            0u64, 1, 3, 0x37, 0x1001, 0x2fff, 0x3ffe, 0x4ffd, 0x5007, 0x7fff,
        ] {
            for len in [1usize, 2, 3, 4, 8] {
                let mut b = vec![0u8; len];
                g.bus.mmio_read(BAR + off, &mut b);
            }
        }
        for off in [0x3u64, 0x13, 0x1e, 0x4005, 0x5000, 0x6000] {
            g.bus.mmio_write(BAR + off, &[0xff; 3]);
        }
        assert_eq!(
            g.common_rd(0x14, 1) as u32 & STATUS_DRIVER_OK,
            STATUS_DRIVER_OK
        );
        offer(&g, 0);
        assert_eq!(used_idx(&g), 1);
    }
}
