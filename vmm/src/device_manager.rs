//! The devices of one VM: the device manager builds the virtio devices the resources describe
//! (or restores them from a snapshot's state), puts each on its transport — a virtio-mmio
//! window with an interrupt line, or a virtio-pci function with MSI-X on the PCI bus — with
//! its queue notifications, finds them by kind and id for the API (PATCH, balloon), starts
//! their workers, pauses them with the VM and hands their state to a snapshot.
//!
//! `vm::build` calls [`DeviceManager::build`] once; a new virtio device is one more arm in
//! [`DeviceManager::build`] and its own API methods here, not a change to the VM or the
//! controller.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use devices::Bus;
use devices::dirty::DirtyLog;
use devices::interrupt::IrqLine;
use devices::pci::PciBus;
use devices::pci::bus::BarAllocator;
use devices::virtio::device_side::DeviceSide;
use devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use devices::virtio::pci::{PciResources, PciTransport};
use devices::virtio::transport::VirtioTransport;
use devices::virtio::{Poller, VirtioDevice};
use vm_memory::GuestMemoryMmap;

use crate::hypervisor::Vm;
use crate::platform::{self, VirtioSlot};
use crate::resources::{ConfigError, RateLimiterConfig, VmResources};
use crate::snapshot::VirtioSnapshot;
use crate::{Error, Result};

/// Which virtio device a handle is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VirtioKind {
    /// virtio-blk.
    Block,
    /// virtio-net.
    Net,
    /// virtio-vsock.
    Vsock,
    /// virtio-balloon.
    Balloon,
    /// virtio-rng.
    Rng,
}

/// A virtio device of the VM, for its worker thread and for updates through the API.
pub struct VirtioHandle {
    /// What it is.
    pub kind: VirtioKind,
    /// Its API id (drive_id, iface_id) or kind name.
    pub id: String,
    /// Its transport (shared with its bus and the worker thread).
    pub transport: Arc<Mutex<dyn VirtioTransport>>,
}

impl VirtioHandle {
    fn side(&self) -> Arc<Mutex<DeviceSide>> {
        lock(&self.transport).device_side()
    }

    /// Runs `f` on the device (under the device lock).
    pub fn with_device<R>(&self, f: impl FnOnce(&mut dyn VirtioDevice, &Poller) -> R) -> R {
        lock(&self.side()).with_device(f)
    }

    /// True once the driver started the device and until it resets it.
    pub fn is_active(&self) -> bool {
        lock(&self.side()).is_active()
    }

    /// Tells the driver the configuration space changed.
    pub fn config_changed(&self) {
        lock(&self.side()).config_changed();
    }

    /// Makes the worker look at every queue again.
    pub fn kick_queues(&self) {
        lock(&self.transport).kick_queues();
    }
}

/// Where the next virtio-pci function goes while the devices are built.
struct PciBuild {
    bus: PciBus,
    bars: BarAllocator,
}

/// The virtio devices of one VM, in the order the guest sees them.
pub struct DeviceManager {
    mem: GuestMemoryMmap,
    dirty: Option<Arc<DirtyLog>>,
    slots: Vec<VirtioSlot>,
    virtio: Vec<VirtioHandle>,
    paused: devices::virtio::PauseFlag,
    pci: Option<PciBuild>,
}

fn config_err(field: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Config(ConfigError::new(field, reason))
}

impl DeviceManager {
    /// Builds the virtio devices of `res`: on `mmio` (each in the next
    /// `platform::virtio_slot`), or with `res.pci()` as functions of a PCI bus the platform
    /// puts on `pio` and `mmio`. Drives first (the root device as /dev/vda), then network
    /// interfaces, vsock, balloon and rng. With `saved`, each device takes the state a
    /// snapshot holds for it (which must name the same device in the same place).
    pub fn build(
        vm: &dyn Vm,
        pio: &mut Bus,
        mmio: &mut Bus,
        mem: &GuestMemoryMmap,
        dirty: Option<Arc<DirtyLog>>,
        res: &VmResources,
        saved: Option<&[VirtioSnapshot]>,
    ) -> Result<Self> {
        use devices::virtio::{balloon, block, net, rng, vsock};
        let mut dm = Self {
            mem: mem.clone(),
            dirty,
            slots: Vec::new(),
            virtio: Vec::new(),
            paused: devices::virtio::PauseFlag::default(),
            pci: res.pci().then(|| {
                let (start, end) = platform::PCI_BAR_WINDOW;
                PciBuild {
                    bus: PciBus::new(),
                    bars: BarAllocator::new(start, end),
                }
            }),
        };
        for d in res.ordered_drives() {
            let blk = block::Block::new(&block::BlockConfig {
                id: d.drive_id.clone(),
                path: d.path_on_host.clone(),
                read_only: d.is_read_only,
                rate_limiter: d.rate_limiter,
                engine: d.io_engine,
                num_queues: d.num_queues,
            })
            .map_err(|e| config_err(format!("drives[{}]", d.drive_id), e.to_string()))?;
            dm.add(
                vm,
                mmio,
                saved,
                VirtioKind::Block,
                &d.drive_id,
                Box::new(blk),
            )?;
        }
        for n in &res.net {
            let pairs = usize::from(n.num_queue_pairs);
            let taps = net::Tap::open_queues(&n.host_dev_name, pairs).map_err(|e| {
                let multi = if pairs > 1 {
                    format!(
                        "; {pairs} queue pairs need a multi-queue TAP (`ip tuntap add {} mode tap multi_queue`, or none by that name)",
                        n.host_dev_name
                    )
                } else {
                    String::new()
                };
                config_err(
                    format!("network-interfaces[{}].host_dev_name", n.iface_id),
                    format!(
                        "cannot open TAP {}: {e} (does tern have CAP_NET_ADMIN, and is the TAP free?{multi})",
                        n.host_dev_name
                    ),
                )
            })?;
            let dev = net::Net::with_queue_pairs(
                &n.iface_id,
                taps.into_iter()
                    .map(|t| Box::new(t) as Box<dyn net::NetBackend>)
                    .collect(),
                n.guest_mac,
                n.rx_rate_limiter,
                n.tx_rate_limiter,
            )?;
            dm.add(vm, mmio, saved, VirtioKind::Net, &n.iface_id, Box::new(dev))?;
        }
        if let Some(v) = &res.vsock {
            let dev = vsock::Vsock::new(u64::from(v.guest_cid), &v.uds_path).map_err(|e| {
                config_err(
                    "vsock.uds_path",
                    format!("cannot listen on {}: {e}", v.uds_path.display()),
                )
            })?;
            dm.add(vm, mmio, saved, VirtioKind::Vsock, "vsock", Box::new(dev))?;
        }
        if let Some(b) = &res.balloon {
            let dev = balloon::Balloon::new(balloon::BalloonOptions {
                amount_mib: b.amount_mib,
                deflate_on_oom: b.deflate_on_oom,
                stats_polling_interval_s: b.stats_polling_interval_s,
                free_page_reporting: b.free_page_reporting,
            })?;
            dm.add(
                vm,
                mmio,
                saved,
                VirtioKind::Balloon,
                "balloon",
                Box::new(dev),
            )?;
        }
        if res.entropy {
            let dev = match res.entropy_rate_limiter {
                Some(c) => rng::Rng::with_limiter(c)?,
                None => rng::Rng::new(),
            };
            dm.add(vm, mmio, saved, VirtioKind::Rng, "rng", Box::new(dev))?;
        }
        if let Some(p) = dm.pci.take() {
            platform::attach_pci(pio, mmio, Arc::new(p.bus), mem)?;
        }
        Ok(dm)
    }

    /// The saved state of device `index`, which must be `kind` `id`.
    fn saved_state<'a>(
        saved: Option<&'a [VirtioSnapshot]>,
        index: usize,
        kind: VirtioKind,
        id: &str,
    ) -> Result<Option<&'a VirtioSnapshot>> {
        let Some(states) = saved else {
            return Ok(None);
        };
        let s = states.get(index).ok_or_else(|| {
            Error::Snapshot(format!("the snapshot has no state for {kind:?} {id}"))
        })?;
        if s.kind != kind || s.id != id {
            return Err(Error::Snapshot(format!(
                "device {index} of the snapshot is {:?} {}, not {kind:?} {id}",
                s.kind, s.id
            )));
        }
        Ok(Some(s))
    }

    /// Puts `dev` in the next PCI slot: a virtio-pci function (new, or restored from `saved`)
    /// with its BAR placed in the window and its MSI-X vectors.
    fn add_pci(
        &mut self,
        vm: &dyn Vm,
        saved: Option<&VirtioSnapshot>,
        kind: VirtioKind,
        id: &str,
        dev: Box<dyn VirtioDevice>,
    ) -> Result<()> {
        let Some(p) = self.pci.as_mut() else {
            return Err(Error::Device("no PCI bus".into()));
        };
        let too_many = |e: devices::pci::PciError| config_err("machine-config.pci", e.to_string());
        let slot = p.bus.next_slot().map_err(too_many)?;
        let res = PciResources {
            devid: (slot as u32) << 3,
            msi: vm.msi_controller(),
            notify: vm.notify_registrar(),
            // `slot` is below the bus's 32.
            intx: Some(IrqLine(vm.interrupt_line(platform::pci_intx(slot as u8))?)),
            bar_address: p
                .bars
                .allocate(devices::virtio::pci::BAR_SIZE)
                .map_err(too_many)?,
        };
        let transport = match saved {
            None => PciTransport::new(dev, self.mem.clone(), res)
                .map_err(|e| Error::Device(format!("{kind:?} {id}: {e}")))?,
            Some(s) => {
                let pci = s.pci.as_ref().ok_or_else(|| {
                    Error::Snapshot(format!(
                        "{kind:?} {id} was on virtio-mmio when the snapshot was taken, and this VM is on PCI"
                    ))
                })?;
                PciTransport::restore(
                    dev,
                    self.mem.clone(),
                    res,
                    &s.transport,
                    pci,
                    self.dirty.clone(),
                )
                .map_err(|e| Error::Snapshot(format!("{kind:?} {id}: {e}")))?
            }
        };
        if let Some(log) = &self.dirty {
            transport.set_dirty_log(log.clone());
        }
        transport.set_pause_flag(self.paused.clone());
        let transport = Arc::new(Mutex::new(transport));
        // Placing it on the bus registers its notifications where its BAR decodes.
        p.bus.add(transport.clone()).map_err(too_many)?;
        self.virtio.push(VirtioHandle {
            kind,
            id: id.to_string(),
            transport,
        });
        Ok(())
    }

    /// Puts `dev` in the next slot: its transport (new, or restored from `saved`), interrupt
    /// line, queue notifications and MMIO window.
    fn add(
        &mut self,
        vm: &dyn Vm,
        mmio: &mut Bus,
        saved: Option<&[VirtioSnapshot]>,
        kind: VirtioKind,
        id: &str,
        dev: Box<dyn VirtioDevice>,
    ) -> Result<()> {
        let index = self.virtio.len();
        let saved = Self::saved_state(saved, index, kind, id)?;
        if self.pci.is_some() {
            return self.add_pci(vm, saved, kind, id, dev);
        }
        let slot = platform::virtio_slot(index);
        let irq = IrqLine(vm.interrupt_line(slot.irq)?);
        let transport = match saved {
            None => MmioTransport::new(dev, self.mem.clone(), irq)
                .map_err(|e| Error::Device(format!("{kind:?} {id}: {e}")))?,
            Some(s) => {
                if s.pci.is_some() {
                    return Err(Error::Snapshot(format!(
                        "{kind:?} {id} was on PCI when the snapshot was taken, and this VM is on virtio-mmio"
                    )));
                }
                MmioTransport::restore(dev, self.mem.clone(), irq, &s.transport, self.dirty.clone())
                    .map_err(|e| Error::Snapshot(format!("{kind:?} {id}: {e}")))?
            }
        };
        if let Some(log) = &self.dirty {
            transport.set_dirty_log(log.clone());
        }
        transport.set_pause_flag(self.paused.clone());
        for (q, evt) in transport.queue_events()?.iter().enumerate() {
            vm.register_notify(evt, slot.base + QUEUE_NOTIFY_OFFSET, q as u32)?;
        }
        let transport = Arc::new(Mutex::new(transport));
        crate::vm::insert(mmio, transport.clone(), slot.base, slot.len)?;
        self.slots.push(slot);
        self.virtio.push(VirtioHandle {
            kind,
            id: id.to_string(),
            transport,
        });
        Ok(())
    }

    /// Where each device sits (for the platform's device tree or command line).
    pub fn slots(&self) -> &[VirtioSlot] {
        &self.slots
    }

    /// The devices, in slot order.
    pub fn handles(&self) -> &[VirtioHandle] {
        &self.virtio
    }

    /// The virtio device `kind` with API id `id`.
    pub fn get(&self, kind: VirtioKind, id: &str) -> Option<&VirtioHandle> {
        self.virtio.iter().find(|h| h.kind == kind && h.id == id)
    }

    /// After a restore, with vCPUs and interrupt controllers back in their saved state: the
    /// interrupts the devices had pending (or raised while being restored) go to the guest
    /// again.
    pub fn raise_pending(&self) {
        for h in &self.virtio {
            lock(&h.side()).raise_pending();
        }
    }

    /// Starts one worker thread per device.
    pub fn start_workers(&self) -> std::io::Result<()> {
        for h in &self.virtio {
            let side = h.side();
            devices::virtio::worker::spawn(
                side,
                format!("virtio-{}", h.id).chars().take(15).collect(),
            )?;
        }
        Ok(())
    }

    /// Tells the workers the VM is paused (they stop taking new work from the queues) or runs
    /// again.
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }

    /// Holds every device and its worker while `f` runs with their saved states, in slot
    /// order: no device writes guest memory until `f` returns (a snapshot reads memory in it).
    pub fn with_saved<R>(&self, f: impl FnOnce(Vec<VirtioSnapshot>) -> R) -> R {
        let transports: Vec<_> = self.virtio.iter().map(|h| lock(&h.transport)).collect();
        let sides: Vec<_> = transports.iter().map(|t| t.device_side()).collect();
        let guards: Vec<_> = sides.iter().map(|s| lock(s)).collect();
        let states = self
            .virtio
            .iter()
            .zip(&transports)
            .zip(&guards)
            .map(|((h, t), side)| {
                let state = t.save_with(side);
                VirtioSnapshot {
                    kind: h.kind,
                    id: h.id.clone(),
                    transport: state.core,
                    pci: state.pci,
                }
            })
            .collect();
        f(states)
    }

    /// Changes a drive's backing file and/or rate limiter (PATCH /drives).
    pub fn patch_drive(
        &self,
        id: &str,
        path: Option<&std::path::Path>,
        limiter: Option<RateLimiterConfig>,
    ) -> std::result::Result<(), String> {
        use devices::virtio::block::Block;
        let h = self
            .get(VirtioKind::Block, id)
            .ok_or_else(|| format!("there is no drive {id:?}"))?;
        let read_only = h.with_device(|dev, _| {
            dev.as_any_mut()
                .downcast_mut::<Block>()
                .map(|b| b.read_only())
                .ok_or("not a block device")
        })?;
        // The new file is opened with nothing locked: a slow open stalls neither the device
        // worker nor a vCPU touching the device's registers.
        let new = path
            .map(|p| Block::open_backing(id, p, read_only))
            .transpose()
            .map_err(|e| e.to_string())?;
        let active = h.is_active();
        let old = h.with_device(|dev, poller| {
            let blk = dev
                .as_any_mut()
                .downcast_mut::<Block>()
                .ok_or("not a block device")?;
            if let Some(l) = limiter {
                blk.set_rate_limiter(l, poller, active)
                    .map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(new.map(|b| blk.swap_backing(b)))
        })?;
        if path.is_some() {
            h.config_changed();
        }
        // Requests a swapped-out limiter was holding back: look at the queue again.
        h.kick_queues();
        // What went to the old file reaches the disk before it is let go.
        if let Some(old) = old {
            if let Err(e) = old.flush() {
                log::warn!(
                    "drive {id}: flushing the old backing file {}: {e}",
                    old.path().display()
                );
            }
        }
        Ok(())
    }

    /// Changes an interface's rate limiters (PATCH /network-interfaces).
    pub fn patch_net(
        &self,
        id: &str,
        rx: Option<RateLimiterConfig>,
        tx: Option<RateLimiterConfig>,
    ) -> std::result::Result<(), String> {
        use devices::virtio::net::Net;
        let h = self
            .get(VirtioKind::Net, id)
            .ok_or_else(|| format!("there is no network interface {id:?}"))?;
        let active = h.is_active();
        h.with_device(|dev, poller| {
            dev.as_any_mut()
                .downcast_mut::<Net>()
                .ok_or_else(|| "not a network device".to_string())?
                .set_rate_limiters(rx, tx, poller, active)
                .map_err(|e| e.to_string())
        })?;
        h.kick_queues();
        Ok(())
    }

    /// Runs `f` on the balloon; returns what it returned and the balloon's handle.
    fn with_balloon<R>(
        &self,
        f: impl FnOnce(&mut devices::virtio::balloon::Balloon) -> R,
    ) -> Option<(R, &VirtioHandle)> {
        let h = self.get(VirtioKind::Balloon, "balloon")?;
        let r = h.with_device(|dev, _| {
            dev.as_any_mut()
                .downcast_mut::<devices::virtio::balloon::Balloon>()
                .map(f)
        })?;
        Some((r, h))
    }

    /// The balloon's sizes and latest statistics; `None` without a balloon.
    pub fn balloon_stats(&self) -> Option<crate::controller::BalloonStats> {
        let (s, _) = self.with_balloon(|b| b.snapshot())?;
        Some(crate::controller::BalloonStats {
            target_pages: s.target_pages,
            actual_pages: s.actual_pages,
            tags: s
                .stats
                .iter()
                .filter_map(|&(tag, v)| {
                    devices::virtio::balloon::STAT_NAMES
                        .get(usize::from(tag))
                        .map(|n| (*n, v))
                })
                .collect(),
        })
    }

    /// Sets the balloon's target and tells the driver.
    pub fn set_balloon_target(&self, mib: u32) -> std::result::Result<(), String> {
        let ((), t) = self
            .with_balloon(|b| b.set_target_mib(mib))
            .ok_or("there is no balloon device")?;
        t.config_changed();
        Ok(())
    }

    /// Changes the balloon's statistics interval.
    pub fn set_balloon_stats_interval(&self, secs: u16) -> std::result::Result<(), String> {
        self.with_balloon(|b| b.set_stats_interval(secs))
            .ok_or("there is no balloon device")?
            .0
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
