//! virtio-net (type 1) on a host TAP device (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`): the
//! 12-byte virtio-net header passes through the TAP unchanged, so checksum and TSO offloads
//! negotiated with the guest are handed to the host kernel (TUNSETOFFLOAD), as Firecracker
//! does. Receive and transmit have their own Firecracker rate limiters.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;

use crate::os::EventSet;
use vm_memory::Bytes;

#[cfg(target_os = "linux")]
pub use super::tap::Tap;
use super::{
    DEVICE_TOKEN_BASE, DeviceState, DeviceStateError, Poller, QueueCtx, VIRTIO_F_VERSION_1,
    VirtioDevice, read_config_bytes,
};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig};

/// The virtio device ID of a network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// The virtio-net header every frame carries (virtio 1.x: `virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: usize = 12;
/// The largest frame with its header: 64 KiB of TSO payload plus Ethernet (with a VLAN tag)
/// and header. A longer one read from the TAP is dropped.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65550 + 4;

/// Queue pairs an interface may have (`num_queue_pairs`; a tern extension).
pub const MAX_QUEUE_PAIRS: usize = 8;

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;
const F_CTRL_VQ: u64 = 1 << 17;
const F_MQ: u64 = 1 << 22;

const TOKEN_RX_LIMITER: u64 = DEVICE_TOKEN_BASE;
const TOKEN_TX_LIMITER: u64 = DEVICE_TOKEN_BASE + 1;
/// Pair `p`'s TAP queue is `TOKEN_TAP + p`.
const TOKEN_TAP: u64 = DEVICE_TOKEN_BASE + 2;

/// Control queue (virtio 1.x 5.1.6.5): class `VIRTIO_NET_CTRL_MQ`, its command
/// `VQ_PAIRS_SET` (a `u16` of pairs), and the ack byte's values.
const CTRL_MQ: u8 = 4;
const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
const CTRL_OK: u8 = 0;
const CTRL_ERR: u8 = 1;
/// The bytes of a command read (class, command and the longest data known).
const CTRL_CMD_MAX: usize = 16;

const TUN_F_CSUM: u32 = 0x01;
const TUN_F_TSO4: u32 = 0x02;
const TUN_F_TSO6: u32 = 0x04;

/// Where the device's frames go: a TAP, or (in tests) anything that reads and writes frames.
pub trait NetBackend: Read + Write + Send {
    /// The descriptor to wait on for incoming frames.
    fn raw_fd(&self) -> std::os::fd::RawFd;
    /// Hands the negotiated offloads to the host side.
    fn set_offload(&self, _tun_flags: u32) -> std::io::Result<()> {
        Ok(())
    }
    /// Takes this queue of a multi-queue back end into use, or out of it (the host sends no
    /// frames to a queue out of use).
    fn set_enabled(&self, _enabled: bool) -> std::io::Result<()> {
        Ok(())
    }
}

/// A Unix datagram socket as the back end, one frame per datagram: the TAP's stand-in in
/// unit tests and fuzzing (the peer socket plays the host's network).
pub struct DatagramBackend(pub std::os::unix::net::UnixDatagram);

impl Read for DatagramBackend {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.0.recv(b)
    }
}

impl Write for DatagramBackend {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.send(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl NetBackend for DatagramBackend {
    fn raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// What an interface keeps across a snapshot (its TAP is opened again from the configuration).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetState {
    /// The interface's id.
    pub id: String,
    /// The MAC it offered the guest, if any.
    pub mac: Option<[u8; 6]>,
    /// Its queue pairs, and how many of them the driver uses.
    pub queue_pairs: u16,
    /// Pairs in use (`VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`; 1 without it).
    pub active_pairs: u16,
    /// Its counters.
    pub stats: NetStats,
}

/// Counters of one interface.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetStats {
    /// Frames given to the guest.
    pub rx_packets: u64,
    /// Bytes given to the guest (headers excluded).
    pub rx_bytes: u64,
    /// Frames sent by the guest.
    pub tx_packets: u64,
    /// Bytes sent by the guest (headers excluded).
    pub tx_bytes: u64,
    /// Frames dropped (too large for the guest's buffer, malformed, or refused by the TAP).
    pub dropped: u64,
}

/// One receive/transmit queue pair and the TAP queue (descriptor) behind it.
struct Pair {
    backend: Box<dyn NetBackend>,
    rx_frame: Vec<u8>,
    /// Length of a frame read from the TAP and not yet delivered.
    rx_pending: Option<usize>,
    /// The pending frame's tokens were taken already.
    rx_paid: bool,
    /// The TAP queue is attached (as it is once opened): the host kernel may send frames to it.
    attached: bool,
}

/// The network device: one queue pair per TAP queue, and with more than one pair the control
/// queue through which the driver says how many it uses (`VIRTIO_NET_F_MQ`).
pub struct Net {
    id: String,
    pairs: Vec<Pair>,
    /// Pairs the driver uses (the TAP queues beyond are detached, so the host kernel sends
    /// nothing there): 1 until the driver says otherwise.
    active: usize,
    /// The control queue's index, once the driver accepted `VIRTIO_NET_F_CTRL_VQ`.
    ctrl: Option<usize>,
    queue_sizes: Vec<u16>,
    mac: Option<[u8; 6]>,
    rx_limiter: Option<RateLimiter>,
    tx_limiter: Option<RateLimiter>,
    tx_frame: Vec<u8>,
    /// Counters.
    pub stats: NetStats,
}

fn limiter(c: Option<RateLimiterConfig>) -> std::io::Result<Option<RateLimiter>> {
    match c {
        Some(c) if !c.is_unlimited() => Ok(Some(RateLimiter::new(c)?)),
        _ => Ok(None),
    }
}

const fn rxq(pair: usize) -> usize {
    2 * pair
}

const fn txq(pair: usize) -> usize {
    2 * pair + 1
}

impl Net {
    /// A device `id` on `backend`, one queue pair.
    pub fn new(
        id: &str,
        backend: Box<dyn NetBackend>,
        mac: Option<[u8; 6]>,
        rx: Option<RateLimiterConfig>,
        tx: Option<RateLimiterConfig>,
    ) -> std::io::Result<Self> {
        Self::with_queue_pairs(id, vec![backend], mac, rx, tx)
    }

    /// A device `id` with one queue pair per backend (1 to [`MAX_QUEUE_PAIRS`]: the queues of
    /// a multi-queue TAP). The rate limiters are the interface's, shared by its pairs.
    pub fn with_queue_pairs(
        id: &str,
        backends: Vec<Box<dyn NetBackend>>,
        mac: Option<[u8; 6]>,
        rx: Option<RateLimiterConfig>,
        tx: Option<RateLimiterConfig>,
    ) -> std::io::Result<Self> {
        let n = backends.len();
        if !(1..=MAX_QUEUE_PAIRS).contains(&n) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("net {id}: {n} queue pairs: give 1 to {MAX_QUEUE_PAIRS}"),
            ));
        }
        // Two queues a pair, and the control queue when there is more than one pair.
        let queues = 2 * n + usize::from(n > 1);
        Ok(Self {
            id: id.to_string(),
            pairs: backends
                .into_iter()
                .map(|backend| Pair {
                    backend,
                    rx_frame: vec![0; MAX_FRAME],
                    rx_pending: None,
                    rx_paid: false,
                    attached: true,
                })
                .collect(),
            active: 1,
            ctrl: None,
            queue_sizes: vec![QUEUE_SIZE; queues],
            mac,
            rx_limiter: limiter(rx)?,
            tx_limiter: limiter(tx)?,
            tx_frame: Vec::with_capacity(MAX_FRAME),
            stats: NetStats::default(),
        })
    }

    /// Replaces the limiters given (PATCH /network-interfaces), re-registering their timers.
    pub fn set_rate_limiters(
        &mut self,
        rx: Option<RateLimiterConfig>,
        tx: Option<RateLimiterConfig>,
        poller: &Poller,
        active: bool,
    ) -> std::io::Result<()> {
        // Make both first, so that a failure changes nothing.
        let new_rx = rx.map(|c| limiter(Some(c))).transpose()?;
        let new_tx = tx.map(|c| limiter(Some(c))).transpose()?;
        for (new, slot, token) in [
            (new_rx, &mut self.rx_limiter, TOKEN_RX_LIMITER),
            (new_tx, &mut self.tx_limiter, TOKEN_TX_LIMITER),
        ] {
            let Some(new) = new else { continue };
            if let Some(old) = slot.as_ref() {
                poller.remove(old.timer_fd());
            }
            *slot = new;
            if let (Some(l), true) = (slot.as_ref(), active) {
                poller.add(l.timer_fd(), EventSet::IN, token)?;
            }
        }
        Ok(())
    }

    /// The queue pairs the device has.
    pub fn queue_pairs(&self) -> usize {
        self.pairs.len()
    }

    /// Attaches the TAP queues of the pairs in use and detaches the others (a TAP refuses to
    /// attach a queue twice, so only changes are made).
    fn apply_active(&mut self) {
        if self.pairs.len() == 1 {
            return;
        }
        for (i, p) in self.pairs.iter_mut().enumerate() {
            let want = i < self.active;
            if p.attached == want {
                continue;
            }
            match p.backend.set_enabled(want) {
                Ok(()) => p.attached = want,
                Err(e) => log::warn!(
                    "net {}: TAP queue {i}: {} it: {e}",
                    self.id,
                    if want { "attaching" } else { "detaching" }
                ),
            }
        }
    }

    /// Delivers frames from pair `p`'s TAP queue until it is empty, the guest has no buffers,
    /// or the rx limiter says wait.
    fn process_rx(&mut self, p: usize, ctx: &mut QueueCtx<'_>) {
        let Some(pair) = self.pairs.get_mut(p) else {
            return;
        };
        loop {
            let len = match pair.rx_pending {
                Some(n) => n,
                None => match pair.backend.read(&mut pair.rx_frame) {
                    Ok(0) => return,
                    // A TAP reports a truncated frame's full length: drop it.
                    Ok(n) if n > pair.rx_frame.len() => {
                        self.stats.dropped = self.stats.dropped.wrapping_add(1);
                        continue;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("net {}: reading the TAP: {e}", self.id);
                        return;
                    }
                },
            };
            pair.rx_pending = Some(len);
            if !pair.rx_paid {
                if let Some(l) = &mut self.rx_limiter {
                    if !l.consume(len as u64) {
                        return; // the timer brings us back
                    }
                }
                pair.rx_paid = true;
            }
            let mem = ctx.mem;
            let Some(chain) = ctx.pop(rxq(p)) else {
                // No buffers: keep the frame until the driver gives some (rx notify).
                return;
            };
            let head = chain.head_index();
            let mut done = 0usize;
            let mut ok = true;
            for d in chain {
                if done == len {
                    break;
                }
                if !d.is_write_only() {
                    ok = false;
                    break;
                }
                let n = (d.len() as usize).min(len - done);
                if mem
                    .write_slice(&pair.rx_frame[done..done + n], d.addr())
                    .is_err()
                {
                    ok = false;
                    break;
                }
                done += n;
            }
            pair.rx_pending = None;
            pair.rx_paid = false;
            let used = if ok && done == len {
                self.stats.rx_packets = self.stats.rx_packets.wrapping_add(1);
                self.stats.rx_bytes = self
                    .stats
                    .rx_bytes
                    .wrapping_add((len - VNET_HDR_LEN.min(len)) as u64);
                len as u32
            } else {
                self.stats.dropped = self.stats.dropped.wrapping_add(1);
                0
            };
            if !ctx.add_used(rxq(p), head, used) {
                return;
            }
        }
    }

    /// Sends what the guest queued on pair `p` through its TAP queue.
    fn process_tx(&mut self, p: usize, ctx: &mut QueueCtx<'_>) {
        let mem = ctx.mem;
        let Some(pair) = self.pairs.get_mut(p) else {
            return;
        };
        loop {
            let Some(chain) = ctx.pop(txq(p)) else {
                return;
            };
            let head = chain.head_index();
            self.tx_frame.clear();
            let mut ok = true;
            for d in chain {
                let n = d.len() as usize;
                if d.is_write_only() || self.tx_frame.len() + n > MAX_FRAME {
                    ok = false;
                    break;
                }
                let start = self.tx_frame.len();
                self.tx_frame.resize(start + n, 0);
                if mem
                    .read_slice(&mut self.tx_frame[start..], d.addr())
                    .is_err()
                {
                    ok = false;
                    break;
                }
            }
            let len = self.tx_frame.len();
            if ok {
                if let Some(l) = &mut self.tx_limiter {
                    if !l.consume(len as u64) {
                        ctx.unpop(txq(p));
                        return;
                    }
                }
            }
            if !ok || len < VNET_HDR_LEN {
                self.stats.dropped = self.stats.dropped.wrapping_add(1);
            } else {
                // A TAP takes a frame whole or not at all.
                match pair.backend.write(&self.tx_frame) {
                    Ok(n) if n < len => self.stats.dropped = self.stats.dropped.wrapping_add(1),
                    Ok(_) => {
                        self.stats.tx_packets = self.stats.tx_packets.wrapping_add(1);
                        self.stats.tx_bytes = self
                            .stats
                            .tx_bytes
                            .wrapping_add((len - VNET_HDR_LEN) as u64);
                    }
                    Err(e) => {
                        log::debug!("net {}: TAP write: {e}", self.id);
                        self.stats.dropped = self.stats.dropped.wrapping_add(1);
                    }
                }
            }
            if !ctx.add_used(txq(p), head, 0) {
                return;
            }
        }
    }

    /// The control queue: `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` sets the pairs in use; every
    /// other command (none of their features is offered) is answered with an error.
    fn process_ctrl(&mut self, q: usize, ctx: &mut QueueCtx<'_>) {
        let mem = ctx.mem;
        loop {
            let Some(chain) = ctx.pop(q) else {
                return;
            };
            let head = chain.head_index();
            // class, command, data (at most a few bytes for the commands known), then the
            // device-written ack byte.
            let mut cmd = [0u8; CTRL_CMD_MAX];
            let mut got = 0usize;
            let mut ack_at = None;
            let mut ok = true;
            for d in chain {
                if d.is_write_only() {
                    if d.len() >= 1 && ack_at.is_none() {
                        ack_at = Some(d.addr());
                    }
                    continue;
                }
                let n = (d.len() as usize).min(CTRL_CMD_MAX - got);
                if mem.read_slice(&mut cmd[got..got + n], d.addr()).is_err() {
                    ok = false;
                }
                got += n;
            }
            let ack = if ok && got >= 4 && cmd[0] == CTRL_MQ && cmd[1] == CTRL_MQ_VQ_PAIRS_SET {
                let n = usize::from(u16::from_le_bytes([cmd[2], cmd[3]]));
                if (1..=self.pairs.len()).contains(&n) {
                    self.active = n;
                    self.apply_active();
                    log::info!(
                        "net {}: the driver uses {n} of its {} queue pairs",
                        self.id,
                        self.pairs.len()
                    );
                    CTRL_OK
                } else {
                    CTRL_ERR
                }
            } else {
                CTRL_ERR
            };
            let written = ack_at.is_some_and(|a| mem.write_obj(ack, a).is_ok());
            if !ctx.add_used(q, head, u32::from(written)) {
                return;
            }
            // Frames may wait on a pair just taken into use.
            for p in 0..self.active {
                self.process_rx(p, ctx);
            }
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | F_CSUM
            | F_GUEST_CSUM
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_HOST_TSO4
            | F_HOST_TSO6;
        if self.mac.is_some() {
            f |= F_MAC;
        }
        if self.pairs.len() > 1 {
            f |= F_CTRL_VQ | F_MQ;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac, status (no VIRTIO_NET_F_STATUS: unused), max_virtqueue_pairs.
        let mut cfg = [0u8; 10];
        if let Some(m) = self.mac {
            cfg[..6].copy_from_slice(&m);
        }
        cfg[8..10].copy_from_slice(&(self.pairs.len() as u16).to_le_bytes());
        let len = if self.pairs.len() > 1 { 10 } else { 8 };
        read_config_bytes(&cfg[..len], offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, features: u64, ctx: &mut QueueCtx<'_>) {
        // What the guest accepts to receive is what the TAP may hand over.
        let mut tun = 0;
        if features & F_GUEST_CSUM != 0 {
            tun |= TUN_F_CSUM;
            if features & F_GUEST_TSO4 != 0 {
                tun |= TUN_F_TSO4;
            }
            if features & F_GUEST_TSO6 != 0 {
                tun |= TUN_F_TSO6;
            }
        }
        // The control queue follows every pair with VIRTIO_NET_F_MQ, the first without.
        self.ctrl = (features & F_CTRL_VQ != 0 && self.pairs.len() > 1).then(|| {
            if features & F_MQ != 0 {
                2 * self.pairs.len()
            } else {
                2
            }
        });
        if features & F_MQ == 0 {
            self.active = 1;
        }
        for (i, p) in self.pairs.iter().enumerate() {
            if let Err(e) = p.backend.set_offload(tun) {
                log::warn!("net {}: TUNSETOFFLOAD {tun:#x}: {e}", self.id);
            }
            if let Err(e) = ctx.poller.add(
                p.backend.raw_fd(),
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                TOKEN_TAP + i as u64,
            ) {
                log::error!("net {}: cannot watch TAP queue {i}: {e}", self.id);
            }
        }
        self.apply_active();
        for (l, token) in [
            (&self.rx_limiter, TOKEN_RX_LIMITER),
            (&self.tx_limiter, TOKEN_TX_LIMITER),
        ] {
            if let Some(l) = l {
                if let Err(e) = ctx.poller.add(l.timer_fd(), EventSet::IN, token) {
                    log::warn!("net {}: cannot watch a rate limiter timer: {e}", self.id);
                }
            }
        }
        // Frames that arrived before the driver was ready.
        for p in 0..self.active {
            self.process_rx(p, ctx);
        }
    }

    fn reset(&mut self, poller: &Poller) {
        for p in &mut self.pairs {
            poller.remove(p.backend.raw_fd());
            p.rx_pending = None;
            p.rx_paid = false;
        }
        for l in [&self.rx_limiter, &self.tx_limiter].into_iter().flatten() {
            poller.remove(l.timer_fd());
        }
        self.active = 1;
        self.ctrl = None;
    }

    fn process_queue(&mut self, index: u16, ctx: &mut QueueCtx<'_>) {
        let q = usize::from(index);
        if Some(q) == self.ctrl {
            self.process_ctrl(q, ctx);
            return;
        }
        let p = q / 2;
        if q % 2 == 0 {
            self.process_rx(p, ctx);
        } else {
            self.process_tx(p, ctx);
            // Sending may have freed room for a frame the guest answers at once.
            self.process_rx(p, ctx);
        }
    }

    fn process_backend(&mut self, token: u64, _events: EventSet, ctx: &mut QueueCtx<'_>) {
        match token {
            TOKEN_RX_LIMITER => {
                if let Some(l) = &mut self.rx_limiter {
                    l.timer_fired();
                }
                for p in 0..self.pairs.len() {
                    self.process_rx(p, ctx);
                }
            }
            TOKEN_TX_LIMITER => {
                if let Some(l) = &mut self.tx_limiter {
                    l.timer_fired();
                }
                for p in 0..self.pairs.len() {
                    self.process_tx(p, ctx);
                }
            }
            t if t >= TOKEN_TAP => {
                if let Ok(p) = usize::try_from(t - TOKEN_TAP) {
                    self.process_rx(p, ctx);
                }
            }
            _ => {}
        }
    }

    fn save(&self) -> DeviceState {
        DeviceState::Net(NetState {
            id: self.id.clone(),
            mac: self.mac,
            queue_pairs: self.pairs.len() as u16,
            active_pairs: self.active as u16,
            stats: self.stats,
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        let DeviceState::Net(s) = state else {
            return Err(DeviceStateError::kind("virtio-net", state));
        };
        if s.id != self.id {
            return Err(DeviceStateError::differs(
                &self.id,
                "interface id",
                &s.id,
                &self.id,
            ));
        }
        if s.mac != self.mac {
            return Err(DeviceStateError::differs(&self.id, "MAC", s.mac, self.mac));
        }
        let pairs = self.pairs.len() as u16;
        if s.queue_pairs != pairs {
            return Err(DeviceStateError::differs(
                &self.id,
                "queue pairs",
                s.queue_pairs,
                pairs,
            ));
        }
        if !(1..=pairs).contains(&s.active_pairs) {
            return Err(DeviceStateError::differs(
                &self.id,
                "queue pairs in use",
                s.active_pairs,
                format!("1 to {pairs}"),
            ));
        }
        self.active = usize::from(s.active_pairs);
        self.stats = s.stats;
        Ok(())
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// Reads the 12-byte header of a frame (for tests and tools).
pub fn frame_payload(frame: &[u8]) -> &[u8] {
    &frame[VNET_HDR_LEN.min(frame.len())..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::virtio::testutil::*;
    use std::os::unix::net::UnixDatagram;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    const RX: usize = 0;
    const TX: usize = 1;

    fn net_stats(d: &Driver) -> NetStats {
        match d.dev.save().device {
            DeviceState::Net(n) => n.stats,
            other => panic!("{other:?}"),
        }
    }

    fn net(rx: Option<RateLimiterConfig>) -> (Driver, UnixDatagram) {
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let mac = [0x06, 0, 0xac, 0x10, 0, 2];
        let dev = Net::new("eth0", Box::new(DatagramBackend(a)), Some(mac), rx, None).unwrap();
        (Driver::new(Box::new(dev)), b)
    }

    fn frame(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn frames_cross_both_ways() {
        let (mut d, host) = net(None);
        let mut mac = [0u8; 6];
        d.dev.read(0x100, &mut mac);
        assert_eq!(mac, [0x06, 0, 0xac, 0x10, 0, 2]);
        // Guest -> host: header and payload split over two descriptors.
        let f = frame(1000, 1);
        d.write(DATA, &f[..VNET_HDR_LEN]);
        d.write(DATA + 0x1000, &f[VNET_HDR_LEN..]);
        d.chain(TX, 0, &[(DATA, 12, false), (DATA + 0x1000, 988, false)]);
        d.offer(TX, 0);
        assert_eq!(d.take_used(TX), vec![(0, 0)]);
        let mut got = vec![0u8; 2000];
        let n = host.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &f[..]);
        // Host -> guest: a frame waits until the guest offers a buffer, then lands in it.
        let f = frame(1500, 7);
        host.send(&f).unwrap();
        d.dev.run_ready(100);
        assert!(d.take_used(RX).is_empty());
        d.chain(
            RX,
            0,
            &[(DATA + 0x4000, 1000, true), (DATA + 0x5000, 1000, true)],
        );
        d.offer(RX, 0);
        assert_eq!(d.take_used(RX), vec![(0, 1500)]);
        let mut back = d.read(DATA + 0x4000, 1000);
        back.extend(d.read(DATA + 0x5000, 500));
        assert_eq!(back, f);
        assert!(d.irq.count() >= 2);
    }

    #[test]
    fn a_frame_too_big_for_the_buffer_is_dropped_not_truncated() {
        let (mut d, host) = net(None);
        host.send(&frame(3000, 3)).unwrap();
        host.send(&frame(100, 4)).unwrap();
        d.chain(RX, 0, &[(DATA, 1000, true)]);
        d.chain(RX, 1, &[(DATA + 0x1000, 1000, true)]);
        d.make_available(RX, 0);
        d.offer(RX, 1);
        assert_eq!(d.take_used(RX), vec![(0, 0), (1, 100)]);
    }

    #[test]
    fn malformed_descriptors_neither_panic_nor_hang() {
        let (mut d, host) = net(None);
        d.offer_malformed(TX);
        for _ in 0..4 {
            host.send(&frame(64, 9)).unwrap();
        }
        d.offer_malformed(RX);
        // Still working afterwards.
        let f = frame(60, 2);
        d.write(DATA, &f);
        d.chain(TX, 0, &[(DATA, 60, false)]);
        d.offer(TX, 0);
        let mut got = [0u8; 100];
        // Drain what the malformed tx chains may have sent.
        let mut last = 0;
        while let Ok(n) = host.recv(&mut got) {
            last = n;
        }
        assert_eq!(last, 60);
    }

    /// A TAP that claims a frame longer than the buffer (what a TAP reports on truncation).
    struct Liar(crate::os::EventFd, bool);
    impl Read for Liar {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            if std::mem::replace(&mut self.1, false) {
                Ok(MAX_FRAME + 100)
            } else {
                Err(std::io::ErrorKind::WouldBlock.into())
            }
        }
    }
    impl Write for Liar {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl NetBackend for Liar {
        fn raw_fd(&self) -> std::os::fd::RawFd {
            self.0.as_raw_fd()
        }
    }

    #[test]
    fn an_overlong_frame_from_the_tap_is_dropped() {
        let evt = crate::os::EventFd::new(crate::os::EFD_NONBLOCK).unwrap();
        evt.write(1).unwrap();
        let dev = Net::new("eth0", Box::new(Liar(evt, true)), None, None, None).unwrap();
        let mut d = Driver::new(Box::new(dev));
        d.chain(
            RX,
            0,
            &[(DATA, 0x10000, true), (DATA + 0x10000, 0x10000, true)],
        );
        d.offer(RX, 0);
        assert!(d.take_used(RX).is_empty(), "nothing delivered");
        assert_eq!(net_stats(&d).dropped, 1);
    }

    #[test]
    fn rx_rate_limiter_delays_delivery() {
        let rx = RateLimiterConfig {
            bandwidth: None,
            ops: Some(crate::rate_limiter::TokenBucketConfig {
                size: 1,
                one_time_burst: 0,
                refill_time: 100,
            }),
        };
        let (mut d, host) = net(Some(rx));
        for i in 0..3 {
            d.chain(RX, i * 2, &[(DATA + u64::from(i) * 0x1000, 2000, true)]);
            d.make_available(RX, i * 2);
        }
        for _ in 0..3 {
            host.send(&frame(100, 1)).unwrap();
        }
        d.notify(RX);
        d.dev.run_ready(0);
        assert_eq!(d.take_used(RX).len(), 1, "one frame per 100 ms");
        let mut got = 0;
        for _ in 0..30 {
            d.dev.run_ready(50);
            got += d.take_used(RX).len();
            if got == 2 {
                break;
            }
        }
        assert_eq!(got, 2);
        assert_eq!(net_stats(&d).rx_packets, 3);
    }

    /// A datagram back end that records whether the device has its queue in use.
    struct Queue1(DatagramBackend, Arc<AtomicBool>);
    impl Read for Queue1 {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.0.read(b)
        }
    }
    impl Write for Queue1 {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl NetBackend for Queue1 {
        fn raw_fd(&self) -> std::os::fd::RawFd {
            self.0.raw_fd()
        }
        fn set_enabled(&self, enabled: bool) -> std::io::Result<()> {
            // A TAP refuses to attach an attached queue (or detach a detached one), and the
            // device would only log it: fail the test instead.
            assert_ne!(
                self.1.swap(enabled, Ordering::SeqCst),
                enabled,
                "the device set a TAP queue's state to the one it had"
            );
            Ok(())
        }
    }

    /// A two-pair interface: the driver, each pair's host end and whether it is in use.
    fn net2() -> (Driver, Vec<UnixDatagram>, Vec<Arc<AtomicBool>>) {
        let mut backends: Vec<Box<dyn NetBackend>> = vec![];
        let (mut hosts, mut on) = (vec![], vec![]);
        for _ in 0..2 {
            let (a, b) = UnixDatagram::pair().unwrap();
            a.set_nonblocking(true).unwrap();
            b.set_nonblocking(true).unwrap();
            let flag = Arc::new(AtomicBool::new(true));
            backends.push(Box::new(Queue1(DatagramBackend(a), flag.clone())));
            hosts.push(b);
            on.push(flag);
        }
        let dev = Net::with_queue_pairs("eth0", backends, None, None, None).unwrap();
        (Driver::new(Box::new(dev)), hosts, on)
    }

    /// Sends a control command on queue 4 (after two pairs) and returns the device's ack.
    fn ctrl(d: &mut Driver, head: u16, cmd: &[u8]) -> u8 {
        let at = DATA + 0x8000 + u64::from(head) * 0x100;
        d.write(at, cmd);
        d.write(at + 0x80, &[0xff]);
        d.chain(
            4,
            head,
            &[(at, cmd.len() as u32, false), (at + 0x80, 1, true)],
        );
        d.offer(4, head);
        assert_eq!(d.take_used(4), vec![(u32::from(head), 1)]);
        d.read(at + 0x80, 1)[0]
    }

    #[test]
    fn two_queue_pairs_are_offered_and_the_driver_takes_them_into_use() {
        let (mut d, hosts, on) = net2();
        let side = d.dev.device_side();
        assert_eq!(side.lock().unwrap().device_mut().queue_max_sizes().len(), 5);
        drop(side);
        let mut pairs = [0u8; 2];
        d.dev.read(0x100 + 8, &mut pairs);
        assert_eq!(u16::from_le_bytes(pairs), 2, "max_virtqueue_pairs");
        // Until the driver says otherwise, only the first pair's TAP queue is attached.
        assert!(on[0].load(Ordering::SeqCst) && !on[1].load(Ordering::SeqCst));
        assert_eq!(
            ctrl(&mut d, 0, &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 2, 0]),
            CTRL_OK
        );
        assert!(on[0].load(Ordering::SeqCst) && on[1].load(Ordering::SeqCst));
        // More pairs than there are, zero pairs, and a command of a class not offered fail.
        assert_eq!(
            ctrl(&mut d, 1, &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 3, 0]),
            CTRL_ERR
        );
        assert_eq!(
            ctrl(&mut d, 2, &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 0, 0]),
            CTRL_ERR
        );
        assert_eq!(ctrl(&mut d, 3, &[0, 0, 1]), CTRL_ERR);
        assert!(
            on[1].load(Ordering::SeqCst),
            "a refused command changes nothing"
        );
        // Pair 1: its TAP queue's frames land on receive queue 2, queue 3 sends through it.
        let f = frame(200, 5);
        hosts[1].send(&f).unwrap();
        d.chain(2, 0, &[(DATA, 2000, true)]);
        d.offer(2, 0);
        assert_eq!(d.take_used(2), vec![(0, 200)]);
        assert_eq!(d.read(DATA, 200), f);
        assert!(d.take_used(RX).is_empty());
        let f = frame(300, 6);
        d.write(DATA + 0x1000, &f);
        d.chain(3, 0, &[(DATA + 0x1000, 300, false)]);
        d.offer(3, 0);
        assert_eq!(d.take_used(3), vec![(0, 0)]);
        let mut got = [0u8; 1000];
        assert_eq!(hosts[1].recv(&mut got).unwrap(), 300);
        assert_eq!(&got[..300], &f[..]);
        assert!(
            hosts[0].recv(&mut got).is_err(),
            "nothing went through pair 0"
        );
        // Back to one pair: the second TAP queue is detached again.
        assert_eq!(
            ctrl(&mut d, 4, &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 1, 0]),
            CTRL_OK
        );
        assert!(!on[1].load(Ordering::SeqCst));
    }

    #[test]
    fn pairs_in_use_survive_a_snapshot_and_a_different_pair_count_is_refused() {
        let (mut d, _hosts, _on) = net2();
        assert_eq!(
            ctrl(&mut d, 0, &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 2, 0]),
            CTRL_OK
        );
        let state = d.dev.save();
        let DeviceState::Net(n) = &state.device else {
            panic!("{:?}", state.device);
        };
        assert_eq!((n.queue_pairs, n.active_pairs), (2, 2));
        let (a, _b) = UnixDatagram::pair().unwrap();
        let mut one = Net::new("eth0", Box::new(DatagramBackend(a)), None, None, None).unwrap();
        let e = one.restore(&state.device).unwrap_err();
        assert!(e.to_string().contains("queue pairs"), "{e}");
        let mut bad = n.clone();
        bad.active_pairs = 3;
        let (a, _b) = UnixDatagram::pair().unwrap();
        let (c, _d) = UnixDatagram::pair().unwrap();
        let backends: Vec<Box<dyn NetBackend>> =
            vec![Box::new(DatagramBackend(a)), Box::new(DatagramBackend(c))];
        let mut two = Net::with_queue_pairs("eth0", backends, None, None, None).unwrap();
        let e = two.restore(&DeviceState::Net(bad)).unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");
        two.restore(&state.device).unwrap();
        assert_eq!(two.active, 2);
    }

    #[test]
    fn more_pairs_than_the_maximum_are_refused() {
        let backends: Vec<Box<dyn NetBackend>> = (0..=MAX_QUEUE_PAIRS)
            .map(|_| {
                let (a, _b) = UnixDatagram::pair().unwrap();
                Box::new(DatagramBackend(a)) as Box<dyn NetBackend>
            })
            .collect();
        let e = Net::with_queue_pairs("eth0", backends, None, None, None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("queue pairs"), "{e}");
    }
}
