//! The transport-neutral half of a virtio device: what its worker thread runs. It holds the
//! device, its queues (virtio-queue), their notification eventfds and the device's back-end
//! descriptors in one [`Poller`], and raises interrupts through [`VirtioInterrupt`], so that a
//! transport (virtio-mmio today, virtio-pci next) is only a register file beside it.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::interrupt::VirtioInterrupt;
use super::{Poller, QueueCtx, VirtioDevice};
use crate::os::{EFD_NONBLOCK, EventFd, EventSet, Ready};

/// How every warning of a recovered lost wake-up begins (see [`DeviceSide::idle_check`]).
pub const RECOVERY_LOG: &str = "virtio recovery";

/// The part of a transport the device's worker thread works on, the same for every transport:
/// the device, its queues, its epoll set and its interrupts. The vCPU side (a transport's
/// register file: [`super::mmio::MmioTransport`]) takes this lock only for queue setup,
/// configuration space and status changes, never for interrupt status or notifications, so a
/// device busy with I/O does not stall a vCPU handling its interrupt.
pub struct DeviceSide {
    pub(super) device: Box<dyn VirtioDevice>,
    pub(super) mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    pub(super) queues: Vec<Queue>,
    poller: Poller,
    queue_evts: Vec<EventFd>,
    /// DRIVER_OK was set (and not NEEDS_RESET) and the device was activated.
    activated: bool,
    pub(super) config_generation: u32,
    /// Interrupts raised so far, and what [`DeviceSide::idle_check`] saw last time.
    triggers: u64,
    idle_seen: Option<(u32, u64)>,
    /// Where written guest pages are marked, when the VM tracks dirty pages.
    pub(super) dirty: Option<Arc<crate::dirty::DirtyLog>>,
}

/// How long the worker waits without events before [`DeviceSide::idle_check`].
pub const IDLE_CHECK_MS: i32 = 1000;

/// One non-blocking eventfd per queue, each in `poller` with its queue index as token.
pub fn queue_events(n: usize, poller: &Poller) -> std::io::Result<Vec<EventFd>> {
    (0..n)
        .map(|i| {
            let evt = EventFd::new(EFD_NONBLOCK)?;
            poller.add(evt.as_raw_fd(), EventSet::IN, i as u64)?;
            Ok(evt)
        })
        .collect()
}

impl DeviceSide {
    /// The worker half of `device`, its `queues` and their eventfds (in `poller`), raising
    /// `interrupt`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
        poller: Poller,
        queue_evts: Vec<EventFd>,
    ) -> Self {
        Self {
            device,
            mem,
            interrupt,
            queues,
            poller,
            queue_evts,
            activated: false,
            config_generation: 0,
            triggers: 0,
            idle_seen: None,
            dirty: None,
        }
    }

    /// The device, for updates through the API.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// Runs `f` on the device and the epoll set (to swap a back-end descriptor).
    pub fn with_device<R>(&mut self, f: impl FnOnce(&mut dyn VirtioDevice, &Poller) -> R) -> R {
        f(self.device.as_mut(), &self.poller)
    }

    /// True once the driver started the device (DRIVER_OK) and until it resets it.
    pub fn is_active(&self) -> bool {
        self.activated
    }

    /// Tells the driver the configuration space changed (a resized drive, a balloon target).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.activated {
            self.triggers = self.triggers.wrapping_add(1);
            self.interrupt.config_changed();
        }
    }

    /// Handles one event of the epoll set: a queue notification (`token` below the queue
    /// count) or a device back-end descriptor. Called by the worker thread.
    pub fn handle_event(&mut self, token: u64, events: EventSet) {
        let mut ctx = QueueCtx::new(
            &mut self.queues,
            &self.mem,
            &self.poller,
            self.dirty.as_deref(),
        );
        if let Some(evt) = usize::try_from(token)
            .ok()
            .and_then(|i| self.queue_evts.get(i))
        {
            let _ = evt.read();
            match ctx.queues.get(token as usize) {
                Some(q) if self.activated && q.ready() => {}
                _ => return,
            }
            self.device.process_queue(token as u16, &mut ctx);
        } else if self.activated {
            self.device.process_backend(token, events, &mut ctx);
        } else {
            return;
        }
        let used = ctx.used;
        self.signal_used(used);
    }

    fn signal_used(&mut self, used: u64) {
        if used == 0 {
            return;
        }
        let mem = &self.mem;
        let mut needs = 0u64;
        for (i, q) in self.queues.iter_mut().enumerate() {
            if used & (1 << i) != 0 && q.needs_notification(mem).unwrap_or(true) {
                needs |= 1 << i;
            }
        }
        if needs != 0 {
            self.triggers = self.triggers.wrapping_add(1);
            self.interrupt.used(needs);
        }
    }

    /// Handles whatever events are ready within `timeout_ms` (the worker's loop body; tests
    /// call it directly). Returns how many were handled.
    pub fn run_ready(&mut self, timeout_ms: i32) -> usize {
        let mut events = [Ready::default(); 16];
        let n = match self.poller.wait(timeout_ms, &mut events) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("virtio: epoll: {e}");
                return 0;
            }
        };
        for ev in &events[..n] {
            self.handle_event(ev.data(), ev.event_set());
        }
        n
    }

    /// Where each queue stands and the device's own summary, for diagnostics.
    pub fn describe(&self) -> String {
        let mut out = match self.interrupt.pending() {
            Some(status) => format!("interrupt status {status:#x}; "),
            None => String::new(),
        };
        for (i, q) in self.queues.iter().enumerate() {
            let avail = q.avail_idx(&self.mem, Ordering::Acquire).map(|w| w.0);
            let used = q.used_idx(&self.mem, Ordering::Acquire).map(|w| w.0);
            out += &format!(
                "queue {i}: avail {avail:?} taken {} used {used:?}; ",
                q.next_avail()
            );
        }
        out + &self.device.describe()
    }

    /// The worker calls this after [`IDLE_CHECK_MS`] without events. It recovers from a lost
    /// wake-up, and says so: an interrupt the driver never acknowledged is raised again, and
    /// buffers made available without a notification are processed. Neither happens with a
    /// correct driver and hypervisor; both would stall a lock-step protocol (vsock) for good.
    /// Each recovery is a warning starting with [`RECOVERY_LOG`] and is counted in
    /// `virtio.recovered_interrupts` or `virtio.recovered_notifications`: a safety net that the
    /// tests fail on, not a way things normally work.
    pub fn idle_check(&mut self) {
        // A paused guest acknowledges nothing: nothing is lost then.
        if !self.activated || super::VM_PAUSED.load(Ordering::SeqCst) {
            self.idle_seen = None;
            return;
        }
        // Only a transport with a status register can tell an unacknowledged interrupt.
        if let Some(status) = self.interrupt.pending() {
            let seen = (status, self.triggers);
            if status != 0 && self.idle_seen == Some(seen) {
                log::warn!(
                    "{RECOVERY_LOG} (virtio type {}): interrupt status {status:#x} not acknowledged for {IDLE_CHECK_MS} ms; raising the interrupt again ({})",
                    self.device.device_type(),
                    self.describe()
                );
                metrics::METRICS.virtio.recovered_interrupts.inc();
                self.triggers = self.triggers.wrapping_add(1);
                self.interrupt.raise_pending();
            }
            self.idle_seen = self.interrupt.pending().map(|s| (s, self.triggers));
        }
        let mut ctx = QueueCtx::new(
            &mut self.queues,
            &self.mem,
            &self.poller,
            self.dirty.as_deref(),
        );
        let found = self.device.idle(&mut ctx);
        let used = ctx.used;
        if let Some(what) = found {
            self.recovered(&format!("{what} with no event announcing it"));
        }
        self.signal_used(used);
        for i in 0..self.queues.len() {
            let q = &self.queues[i];
            let pending = q.ready()
                && q.avail_idx(&self.mem, Ordering::Acquire)
                    .is_ok_and(|a| a.0 != q.next_avail());
            if !pending {
                continue;
            }
            let mut ctx = QueueCtx::new(
                &mut self.queues,
                &self.mem,
                &self.poller,
                self.dirty.as_deref(),
            );
            self.device.process_queue(i as u16, &mut ctx);
            let used = ctx.used;
            if used != 0 {
                self.recovered(&format!("queue {i} had work no notification announced"));
                self.signal_used(used);
            }
        }
    }

    /// Logs and counts a lost notification the idle check made up for.
    fn recovered(&self, what: &str) {
        log::warn!(
            "{RECOVERY_LOG} (virtio type {}): {what}; done now ({})",
            self.device.device_type(),
            self.describe()
        );
        metrics::METRICS.virtio.recovered_notifications.inc();
    }

    /// A handle on the epoll set, for [`super::worker::spawn`].
    pub fn poller(&self) -> std::io::Result<Poller> {
        self.poller.try_clone()
    }

    /// Starts the device with the features the driver accepted (DRIVER_OK).
    pub(super) fn activate(&mut self, driver_features: u64) {
        let mut ctx = QueueCtx::new(
            &mut self.queues,
            &self.mem,
            &self.poller,
            self.dirty.as_deref(),
        );
        self.device.activate(driver_features, &mut ctx);
        let used = ctx.used;
        self.activated = true;
        self.signal_used(used);
    }

    /// Forgets what the driver set up (status 0).
    pub(super) fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.device.reset(&self.poller);
        self.activated = false;
        self.interrupt.clear();
    }

    /// Raises again what the driver has not seen (after a restore).
    pub fn raise_pending(&self) {
        self.interrupt.raise_pending();
    }
}
