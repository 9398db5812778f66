//! Virtio 1.x devices and their transports.
//!
//! A device implements [`VirtioDevice`]. Its worker half, the same for every transport, is
//! [`device_side::DeviceSide`]: the device, its queues (the virtio-queue crate) and its
//! interrupts ([`interrupt::VirtioInterrupt`]: a shared line with a status register, or per-queue
//! vectors). A transport is a register file beside it: [`mmio::MmioTransport`] (virtio-mmio
//! version 2) or [`pci::PciTransport`] (virtio-pci, modern); both save the core's state as
//! [`state::VirtioState`]. Guest-controlled input — registers, descriptors, buffers — is
//! untrusted: errors become the device's failure status or a short used length, never a panic.
//!
//! Each transport has a [`Poller`] (an epoll set on Linux, a kqueue on macOS: [`crate::os`]) holding one eventfd per queue — registered
//! with the hypervisor as an ioeventfd on the QueueNotify register, so a notification never
//! leaves the kernel — and whatever back-end descriptors the device adds (a TAP, sockets, rate
//! limiter timers). [`worker::spawn`] runs that set on a thread of the device's own, so neither
//! the vCPUs nor the VMM's event loop ever wait for a disk or a socket.

pub mod balloon;
pub mod block;
pub mod device_side;
pub mod driver_state;
pub mod interrupt;
pub mod mmio;
pub mod net;
pub mod pci;

pub mod rng;
pub mod state;
#[cfg(target_os = "linux")]
pub mod tap;
#[cfg(any(test, feature = "test-utils"))]
pub mod testutil;
pub mod transport;
pub mod vsock;

pub mod worker;

use std::any::Any;

use crate::os::EventSet;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

/// `VIRTIO_F_VERSION_1`: the device speaks virtio 1.x (required over MMIO version 2).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// `VIRTIO_RING_F_EVENT_IDX`: each side says up to which ring index it wants no notification
/// (the driver in `used_event`, the device in `avail_event`). The core offers it for every
/// device ([`device_side::DeviceSide`] keeps `avail_event` up to date; interrupts follow
/// `used_event` through virtio-queue's `needs_notification`).
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// The features the core offers beside a device's own.
pub const CORE_FEATURES: u64 = VIRTIO_RING_F_EVENT_IDX;

/// The first epoll token a device may use for its own descriptors; queue eventfds use their
/// queue index.
pub const DEVICE_TOKEN_BASE: u64 = 64;

/// The set a device adds its back-end descriptors to (see [`crate::os::Poller`]).
pub use crate::os::Poller;

/// Whether the VM a device belongs to is paused: its worker's idle check stands down, since a
/// paused guest acknowledges nothing. The VMM's device manager holds one per VM and sets it
/// when it pauses and resumes the vCPUs ([`mmio::MmioTransport::set_pause_flag`]).
pub type PauseFlag = std::sync::Arc<std::sync::atomic::AtomicBool>;

/// What a device works with while it handles an event: its queues, guest memory, the epoll
/// set, and a record of which queues got used buffers (the transport interrupts for those).
pub struct QueueCtx<'a> {
    /// The device's queues, in order.
    pub queues: &'a mut [Queue],
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// The device worker's epoll set.
    pub poller: &'a Poller,
    /// Bit `i` set: queue `i` has new used buffers.
    pub used: u64,
    /// Where the pages the device writes are marked, when the VM tracks dirty pages.
    pub dirty: Option<&'a crate::dirty::DirtyLog>,
    /// With `dirty`: the device-writable buffers of each chain taken in this context and not
    /// yet used, (queue, head, buffers), as the device got them from [`QueueCtx::pop`].
    written: Vec<(usize, u16, WritableBuffers)>,
}

/// A chain's device-writable buffers, `(guest address, length)`.
type WritableBuffers = Vec<(u64, u32)>;

/// A descriptor chain as a device gets it from [`QueueCtx::pop`]: its descriptors were read
/// from guest memory once, when it was taken. What the device writes and what the dirty log
/// marks at [`QueueCtx::add_used`] are then the same buffers, even if the guest rewrites its
/// descriptor table in between (the table is guest memory).
pub struct Chain {
    head: u16,
    descs: std::vec::IntoIter<Descriptor>,
}

impl Chain {
    /// The index of the chain's first descriptor: what [`QueueCtx::add_used`] takes back.
    pub fn head_index(&self) -> u16 {
        self.head
    }

    /// The descriptors not iterated yet, as a vector (it reuses the chain's allocation).
    pub fn into_descriptors(self) -> Vec<Descriptor> {
        self.descs.collect()
    }
}

impl Iterator for Chain {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        self.descs.next()
    }
}

impl<'a> QueueCtx<'a> {
    /// A context over `queues` with no used buffers yet.
    pub fn new(
        queues: &'a mut [Queue],
        mem: &'a GuestMemoryMmap,
        poller: &'a Poller,
        dirty: Option<&'a crate::dirty::DirtyLog>,
    ) -> Self {
        Self {
            queues,
            mem,
            poller,
            used: 0,
            dirty,
            written: Vec::new(),
        }
    }

    /// The next chain the driver made available on queue `q` (`None`: none, or no such
    /// queue), its descriptors read now (a looped or broken chain ends where virtio-queue's
    /// walk stops).
    pub fn pop(&mut self, q: usize) -> Option<Chain> {
        let chain: DescriptorChain<&GuestMemoryMmap> =
            self.queues.get_mut(q)?.pop_descriptor_chain(self.mem)?;
        let head = chain.head_index();
        let descs: Vec<Descriptor> = chain.collect();
        if self.dirty.is_some() {
            let writable = descs
                .iter()
                .filter(|d| d.is_write_only())
                .map(|d| (d.addr().0, d.len()))
                .collect();
            // A chain given back (unpop) and taken again replaces its first record.
            self.written.retain(|(wq, wh, _)| (*wq, *wh) != (q, head));
            self.written.push((q, head, writable));
        }
        Some(Chain {
            head,
            descs: descs.into_iter(),
        })
    }

    /// Gives back the chain last taken from queue `q` (a rate-limited request waits for its
    /// tokens): the next [`QueueCtx::pop`] returns it again.
    pub fn unpop(&mut self, q: usize) {
        if let Some(queue) = self.queues.get_mut(q) {
            queue.set_next_avail(queue.next_avail().wrapping_sub(1));
        }
    }

    /// Marks guest memory the device changed outside a used chain (a balloon's discarded
    /// pages), when the VM tracks dirty pages.
    pub fn mark_dirty(&self, gpa: u64, len: u64) {
        if let Some(log) = self.dirty {
            log.mark(gpa, len);
        }
    }

    /// Puts chain `head` with `len` bytes written into queue `q`'s used ring. False (and
    /// logged) when the ring cannot be written: the guest broke the queue.
    pub fn add_used(&mut self, q: usize, head: u16, len: u32) -> bool {
        let Some(queue) = self.queues.get_mut(q) else {
            return false;
        };
        if let Some(log) = self.dirty {
            // What the device may have written into the chain: the writable buffers it got
            // at pop. A chain taken in an earlier context (none of tern's devices keeps one)
            // has no record here, and its descriptors are read again from guest memory.
            match self
                .written
                .iter()
                .position(|(wq, wh, _)| (*wq, *wh) == (q, head))
            {
                Some(i) => crate::dirty::mark_buffers(log, &self.written.swap_remove(i).2),
                None => {
                    crate::dirty::mark_chain(log, self.mem, queue.desc_table(), queue.size(), head)
                }
            }
            // The used ring entry it is about to write (the whole ring: flags, index,
            // entries, avail event).
            log.mark(queue.used_ring(), 6 + 8 * u64::from(queue.size()) + 2);
        }
        match queue.add_used(self.mem, head, len) {
            Ok(()) => {
                self.used |= 1 << q;
                true
            }
            Err(e) => {
                log::warn!("virtio: queue {q}: add_used: {e}");
                false
            }
        }
    }
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (4 = entropy, 2 = block, ...).
    fn device_type(&self) -> u32;
    /// The maximum size of each of its queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The features it offers (must include [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Reads its configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes its configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK having accepted `features`: add back-end descriptors to
    /// `ctx.poller` (tokens from [`DEVICE_TOKEN_BASE`]) and start.
    fn activate(&mut self, _features: u64, _ctx: &mut QueueCtx<'_>) {}
    /// Handles buffers the driver made available on queue `index`.
    fn process_queue(&mut self, index: u16, ctx: &mut QueueCtx<'_>);
    /// Handles a back-end descriptor's `events` (`token` as the device registered it).
    fn process_backend(&mut self, _token: u64, _events: EventSet, _ctx: &mut QueueCtx<'_>) {}
    /// Called by the worker after a quiet period (see [`mmio::DeviceSide::idle_check`]):
    /// retries back-end work that waits for a readiness event. Returns what it found to do,
    /// if anything (a lost event; logged as a warning).
    fn idle(&mut self, _ctx: &mut QueueCtx<'_>) -> Option<String> {
        None
    }
    /// Forgets everything the driver set up and removes back-end descriptors from `poller`.
    fn reset(&mut self, _poller: &Poller) {}
    /// The device's own state for a snapshot (its queues are saved by the transport).
    fn save(&self) -> DeviceState;
    /// Restores what [`VirtioDevice::save`] returned; a state of another kind of device, or
    /// one that contradicts the device's configuration, is refused.
    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceStateError>;
    /// A short summary of the device's internal state, for diagnostics in logs.
    fn describe(&self) -> String {
        String::new()
    }
    /// The device as `Any`, for updates through the API (a drive's new backing file).
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// A device's own state in a snapshot: one typed struct per kind of device, each defined
/// beside its device. It travels inside the snapshot's versioned payload
/// (docs/snapshot-format.md): changing any of these structs is a format change.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeviceState {
    /// virtio-blk.
    Block(block::BlockState),
    /// virtio-net.
    Net(net::NetState),
    /// virtio-rng.
    Rng(rng::RngState),
    /// virtio-balloon.
    Balloon(balloon::BalloonState),
    /// virtio-vsock.
    Vsock(vsock::VsockState),
}

impl DeviceState {
    /// The kind of device, in words.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Block(_) => "virtio-blk",
            Self::Net(_) => "virtio-net",
            Self::Rng(_) => "virtio-rng",
            Self::Balloon(_) => "virtio-balloon",
            Self::Vsock(_) => "virtio-vsock",
        }
    }
}

/// Why a device refused the state it was asked to restore.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceStateError {
    /// The state is another kind of device's.
    #[error("the snapshot holds {found} state for a {expected} device")]
    Kind {
        /// The device's kind.
        expected: &'static str,
        /// The state's kind.
        found: &'static str,
    },
    /// The state contradicts how the device is configured now.
    #[error(
        "{device}: the snapshot's {what} is {saved}, the configured device's is {configured}; restore with the configuration the snapshot was taken with"
    )]
    Differs {
        /// Which device (its id).
        device: String,
        /// Which value.
        what: &'static str,
        /// The snapshot's value.
        saved: String,
        /// The device's value.
        configured: String,
    },
}

impl DeviceStateError {
    /// The state is `found`'s, not `expected`'s.
    pub fn kind(expected: &'static str, found: &DeviceState) -> Self {
        Self::Kind {
            expected,
            found: found.kind(),
        }
    }

    /// Refuses a `what` of device `device` that differs between snapshot and configuration.
    pub fn differs(
        device: &str,
        what: &'static str,
        saved: impl std::fmt::Debug,
        configured: impl std::fmt::Debug,
    ) -> Self {
        Self::Differs {
            device: device.to_string(),
            what,
            saved: format!("{saved:?}"),
            configured: format!("{configured:?}"),
        }
    }
}

/// Reads a little-endian configuration space `cfg` at `offset` into `data` (zeros beyond it).
pub fn read_config_bytes(cfg: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= cfg.len() {
        return;
    }
    let n = data.len().min(cfg.len() - start);
    data[..n].copy_from_slice(&cfg[start..start + n]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::{DirtyLog, PAGE_SIZE};
    use vm_memory::{Bytes, GuestAddress};

    /// Writes descriptor `i` of the table at 0x1000: one device-writable buffer, no next.
    fn writable_desc(mem: &GuestMemoryMmap, i: u64, addr: u64, len: u32) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&2u16.to_le_bytes()); // VIRTQ_DESC_F_WRITE
        mem.write_slice(&d, GuestAddress(0x1000 + i * 16)).unwrap();
    }

    /// Guest memory and a ready queue (table 0x1000, rings 0x2000 and 0x3000) with one chain
    /// available: descriptor 0, a 4 KiB device-writable buffer at 0x10_0000.
    fn one_chain() -> (GuestMemoryMmap, Queue) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let mut q = Queue::new(16).unwrap();
        q.set_size(16);
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0x2000), Some(0));
        q.set_used_ring_address(Some(0x3000), Some(0));
        q.set_ready(true);
        writable_desc(&mem, 0, 0x10_0000, 4096);
        // Available ring: flags 0, idx 1, ring[0] = descriptor 0.
        mem.write_slice(&[0, 0, 1, 0, 0, 0], GuestAddress(0x2000))
            .unwrap();
        (mem, q)
    }

    fn marked(log: &DirtyLog, gpa: u64) -> bool {
        let page = gpa / PAGE_SIZE;
        log.bitmap(0)[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// The dirty log marks the buffer the device got at pop, not what the descriptor table
    /// says when the chain is used: a guest rewriting its descriptor in between cannot keep a
    /// page the device wrote out of a diff snapshot (review: "mark_chain re-reads").
    #[test]
    fn used_chains_mark_the_buffers_the_device_got() {
        let (mem, q) = one_chain();
        let log = DirtyLog::new(&[(0, 0x40_0000)]);
        let poller = Poller::new().unwrap();
        let mut queues = [q];
        let mut ctx = QueueCtx::new(&mut queues, &mem, &poller, Some(&log));
        let chain = ctx.pop(0).unwrap();
        let head = chain.head_index();
        let descs: Vec<Descriptor> = chain.collect();
        assert_eq!(descs.len(), 1);
        assert_eq!(descs[0].addr().0, 0x10_0000);
        // The device writes its buffer; the guest points the descriptor elsewhere.
        mem.write_slice(&[0xaa; 4096], descs[0].addr()).unwrap();
        writable_desc(&mem, 0, 0x20_0000, 4096);
        assert!(ctx.add_used(0, head, 4096));
        assert!(
            marked(&log, 0x10_0000),
            "the page the device wrote is marked"
        );
        assert!(!marked(&log, 0x20_0000), "the page it did not write is not");
        assert!(marked(&log, 0x3000), "the used ring is marked");
        assert_eq!(ctx.used, 1);
    }

    /// A chain given back (a rate-limited request) and taken again is marked once, at its use.
    #[test]
    fn a_chain_taken_twice_is_recorded_once() {
        let (mem, q) = one_chain();
        let log = DirtyLog::new(&[(0, 0x40_0000)]);
        let poller = Poller::new().unwrap();
        let mut queues = [q];
        let mut ctx = QueueCtx::new(&mut queues, &mem, &poller, Some(&log));
        let first = ctx.pop(0).unwrap();
        ctx.unpop(0);
        let again = ctx.pop(0).unwrap();
        assert_eq!(first.head_index(), again.head_index());
        assert_eq!(ctx.written.len(), 1);
        assert!(ctx.add_used(0, again.head_index(), 0));
        assert!(ctx.written.is_empty());
        assert!(marked(&log, 0x10_0000));
    }
}
