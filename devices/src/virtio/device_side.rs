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
    /// Each queue's (available index, next to take) when the last idle check found buffers
    /// there and left them: the guest may have written the index with its notification still
    /// on the way (a vCPU between the two writes), and that is not a lost one.
    idle_queues: Vec<Option<(u16, u16)>>,
    /// Where written guest pages are marked, when the VM tracks dirty pages.
    pub(super) dirty: Option<Arc<crate::dirty::DirtyLog>>,
    /// The VM is paused (its own flag until the VMM shares the VM's).
    pub(super) paused: super::PauseFlag,
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
            idle_queues: vec![None; queues.len()],
            queues,
            poller,
            queue_evts,
            activated: false,
            config_generation: 0,
            triggers: 0,
            idle_seen: None,
            dirty: None,
            paused: super::PauseFlag::default(),
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
        let queue = usize::try_from(token)
            .ok()
            .filter(|&i| i < self.queue_evts.len());
        if let Some(i) = queue {
            let _ = self.queue_evts[i].read();
            if !(self.activated && self.queues[i].ready()) {
                return;
            }
        } else if !self.activated {
            return;
        }
        let before = self.avail_indices();
        let mut ctx = QueueCtx::new(
            &mut self.queues,
            &self.mem,
            &self.poller,
            self.dirty.as_deref(),
        );
        match queue {
            Some(i) => self.device.process_queue(i as u16, &mut ctx),
            None => self.device.process_backend(token, events, &mut ctx),
        }
        let used = ctx.used;
        self.signal_used(used);
        self.rearm(before);
    }

    /// Lets the device process queue `i`; returns which queues got used buffers (not yet
    /// signalled).
    fn run_queue(&mut self, i: usize) -> u64 {
        let mut ctx = QueueCtx::new(
            &mut self.queues,
            &self.mem,
            &self.poller,
            self.dirty.as_deref(),
        );
        self.device.process_queue(i as u16, &mut ctx);
        ctx.used
    }

    /// Each queue's available index now (`None`: not ready, or unreadable).
    fn avail_indices(&self) -> Vec<Option<u16>> {
        self.queues
            .iter()
            .map(|q| {
                q.ready()
                    .then(|| q.avail_idx(&self.mem, Ordering::Acquire).ok().map(|w| w.0))
                    .flatten()
            })
            .collect()
    }

    /// With `VIRTIO_RING_F_EVENT_IDX`, after the device has had its turn: each ready queue's
    /// `avail_event` is set to the next buffer the device will take, so the driver notifies
    /// again from there. A buffer the driver made available after the device last looked but
    /// before that write went without a notification (the driver saw the old `avail_event`):
    /// a queue whose available index moved since `before` is processed again here. A queue
    /// whose buffers were all there before (receive buffers waiting for data, a request held
    /// back by a rate limiter) is not: the device already saw them and chose to wait.
    fn rearm(&mut self, mut before: Vec<Option<u16>>) {
        // Each round needs the driver to have added buffers meanwhile; after this many the
        // queue's own eventfd brings the worker back instead of looping here.
        const ROUNDS: usize = 16;
        let mut again = 0u64;
        for _ in 0..ROUNDS {
            again = 0;
            for (i, q) in self.queues.iter_mut().enumerate() {
                if !q.ready() || !q.event_idx_enabled() {
                    continue;
                }
                if let Some(log) = &self.dirty {
                    // avail_event, right after the used ring's entries.
                    log.mark(q.used_ring() + 4 + 8 * u64::from(q.size()), 2);
                }
                let more = q.enable_notification(&self.mem).unwrap_or(false);
                let now = q.avail_idx(&self.mem, Ordering::Acquire).ok().map(|w| w.0);
                if more && now != before.get(i).copied().flatten() {
                    again |= 1 << i;
                }
            }
            if again == 0 {
                return;
            }
            before = self.avail_indices();
            for i in 0..self.queues.len() {
                if again & (1 << i) == 0 {
                    continue;
                }
                let used = self.run_queue(i);
                self.signal_used(used);
            }
        }
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if again & (1 << i) != 0 {
                let _ = evt.write(1);
            }
        }
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
    /// buffers made available without a notification are processed. Both must be seen at two
    /// idle checks in a row (the same status, the same buffers waiting), so a wake-up still on
    /// its way at the first is not taken for a lost one. Neither happens with a
    /// correct driver and hypervisor; both would stall a lock-step protocol (vsock) for good.
    /// Each recovery is a warning starting with [`RECOVERY_LOG`] and is counted in
    /// `virtio.recovered_interrupts` or `virtio.recovered_notifications`: a safety net that the
    /// tests fail on, not a way things normally work.
    pub fn idle_check(&mut self) {
        // A paused guest acknowledges nothing: nothing is lost then.
        if !self.activated || self.paused.load(Ordering::SeqCst) {
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
        let before = self.avail_indices();
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
            let waiting = q
                .ready()
                .then(|| q.avail_idx(&self.mem, Ordering::Acquire).ok())
                .flatten()
                .map(|a| (a.0, q.next_avail()))
                .filter(|(a, next)| a != next);
            // Buffers are taken here only when they were already waiting, untouched, at the
            // previous idle check: a whole quiet period in which their notification could
            // have come.
            let seen = std::mem::replace(&mut self.idle_queues[i], waiting);
            if waiting.is_none() || waiting != seen {
                continue;
            }
            let used = self.run_queue(i);
            if used != 0 {
                self.recovered(&format!("queue {i} had work no notification announced"));
                self.signal_used(used);
            }
        }
        self.rearm(before);
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
        let event_idx = driver_features & super::VIRTIO_RING_F_EVENT_IDX != 0;
        for q in &mut self.queues {
            q.set_event_idx(event_idx);
        }
        let before = self.avail_indices();
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
        self.rearm(before);
    }

    /// Forgets what the driver set up (status 0).
    pub(super) fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.device.reset(&self.poller);
        self.activated = false;
        self.interrupt.clear();
        // What the idle check saw belongs to the queues the driver just gave up.
        self.idle_queues.fill(None);
        self.idle_seen = None;
    }

    /// Raises again what the driver has not seen (after a restore).
    pub fn raise_pending(&self) {
        self.interrupt.raise_pending();
    }
}

#[cfg(test)]
mod tests {
    use super::super::VIRTIO_RING_F_EVENT_IDX;
    use super::super::rng::Rng;
    use super::super::testutil::{DATA, Driver, F_WRITE};

    fn rng_driver(mask: u64) -> Driver {
        Driver::with_features(Box::new(Rng::new()), mask)
    }

    #[test]
    fn event_idx_is_offered_and_the_device_keeps_avail_event_current() {
        let mut d = rng_driver(u64::MAX);
        assert!(d.event_idx, "the core offers VIRTIO_RING_F_EVENT_IDX");
        for i in 0..5u16 {
            d.desc(0, i, DATA + u64::from(i) * 64, 64, F_WRITE, 0);
            d.offer(0, i);
            // Notify me when you make buffer i + 1 available.
            assert_eq!(d.avail_event(0), i + 1);
        }
        assert_eq!(d.take_used(0).len(), 5);
        assert_eq!(
            d.irq.count(),
            5,
            "used_event at the last used index: one interrupt each"
        );
    }

    #[test]
    fn used_event_ahead_holds_interrupts_back() {
        let mut d = rng_driver(u64::MAX);
        d.desc(0, 0, DATA, 64, F_WRITE, 0);
        d.offer(0, 0);
        assert_eq!(d.irq.count(), 1);
        // A driver with callbacks off (or batching) moves used_event ahead: no interrupt
        // until the used index passes it.
        d.event_idx = false;
        d.set_used_event(0, 3);
        for i in 1..4u16 {
            d.desc(0, i, DATA + u64::from(i) * 64, 64, F_WRITE, 0);
            d.offer(0, i);
        }
        // Used index 2, 3: held back; 4 passes used_event 3.
        assert_eq!(d.take_used(0).len(), 4);
        assert_eq!(d.irq.count(), 2);
    }

    #[test]
    fn buffers_made_available_together_are_all_taken_and_avail_event_moves_past_them() {
        let mut d = rng_driver(u64::MAX);
        d.desc(0, 0, DATA, 64, F_WRITE, 0);
        d.desc(0, 1, DATA + 64, 64, F_WRITE, 0);
        // Two buffers, one notification: the device takes both and asks from 2 on.
        d.make_available(0, 0);
        d.make_available(0, 1);
        d.notify(0);
        assert_eq!(d.take_used(0).len(), 2);
        assert_eq!(d.avail_event(0), 2);
    }

    #[test]
    fn an_unacknowledged_interrupt_is_raised_again_only_while_the_vm_runs() {
        let mut d = rng_driver(u64::MAX);
        let paused = super::super::PauseFlag::default();
        d.dev.set_pause_flag(paused.clone());
        d.desc(0, 0, DATA, 64, F_WRITE, 0);
        d.offer(0, 0);
        assert_eq!(d.irq.count(), 1);
        let side = d.dev.device_side();
        let idle = || side.lock().unwrap().idle_check();
        // The driver never acknowledges. Paused: nothing is lost, nothing raised again.
        paused.store(true, std::sync::atomic::Ordering::SeqCst);
        idle();
        idle();
        assert_eq!(d.irq.count(), 1);
        // Running: the first quiet check notes the status, the second raises it again.
        paused.store(false, std::sync::atomic::Ordering::SeqCst);
        idle();
        idle();
        assert_eq!(d.irq.count(), 2);
    }

    #[test]
    fn without_event_idx_avail_event_is_left_alone() {
        let mut d = rng_driver(!VIRTIO_RING_F_EVENT_IDX);
        assert!(!d.event_idx);
        d.desc(0, 0, DATA, 64, F_WRITE, 0);
        d.offer(0, 0);
        assert_eq!(d.take_used(0).len(), 1);
        assert_eq!(d.avail_event(0), 0);
    }
}
