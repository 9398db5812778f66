//! virtio-net (type 1) on a host TAP device (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`): the
//! 12-byte virtio-net header passes through the TAP unchanged, so checksum and TSO offloads
//! negotiated with the guest are handed to the host kernel (TUNSETOFFLOAD), as Firecracker
//! does. Receive and transmit have their own Firecracker rate limiters.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;

use crate::os::EventSet;
use virtio_queue::QueueT;
use vm_memory::Bytes;

#[cfg(target_os = "linux")]
pub use super::tap::Tap;
use super::{
    DEVICE_TOKEN_BASE, DeviceState, DeviceStateError, Poller, QueueCtx, VIRTIO_F_VERSION_1,
    VirtioDevice, read_config_bytes, unpop,
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

const RX: usize = 0;
const TX: usize = 1;

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;

const TOKEN_TAP: u64 = DEVICE_TOKEN_BASE;
const TOKEN_RX_LIMITER: u64 = DEVICE_TOKEN_BASE + 1;
const TOKEN_TX_LIMITER: u64 = DEVICE_TOKEN_BASE + 2;

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

/// The network device.
pub struct Net {
    id: String,
    backend: Box<dyn NetBackend>,
    mac: Option<[u8; 6]>,
    rx_limiter: Option<RateLimiter>,
    tx_limiter: Option<RateLimiter>,
    rx_frame: Vec<u8>,
    /// Length of a frame read from the TAP and not yet delivered.
    rx_pending: Option<usize>,
    /// The pending frame's tokens were taken already.
    rx_paid: bool,
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

impl Net {
    /// A device `id` on `backend`.
    pub fn new(
        id: &str,
        backend: Box<dyn NetBackend>,
        mac: Option<[u8; 6]>,
        rx: Option<RateLimiterConfig>,
        tx: Option<RateLimiterConfig>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            id: id.to_string(),
            backend,
            mac,
            rx_limiter: limiter(rx)?,
            tx_limiter: limiter(tx)?,
            rx_frame: vec![0; MAX_FRAME],
            rx_pending: None,
            rx_paid: false,
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

    /// Delivers frames from the backend until it is empty, the guest has no buffers, or the
    /// rx limiter says wait.
    fn process_rx(&mut self, ctx: &mut QueueCtx<'_>) {
        loop {
            let len = match self.rx_pending {
                Some(n) => n,
                None => match self.backend.read(&mut self.rx_frame) {
                    Ok(0) => return,
                    // A TAP reports a truncated frame's full length: drop it.
                    Ok(n) if n > self.rx_frame.len() => {
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
            self.rx_pending = Some(len);
            if !self.rx_paid {
                if let Some(l) = &mut self.rx_limiter {
                    if !l.consume(len as u64) {
                        return; // the timer brings us back
                    }
                }
                self.rx_paid = true;
            }
            let mem = ctx.mem;
            let Some(queue) = ctx.queues.get_mut(RX) else {
                return;
            };
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
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
                    .write_slice(&self.rx_frame[done..done + n], d.addr())
                    .is_err()
                {
                    ok = false;
                    break;
                }
                done += n;
            }
            self.rx_pending = None;
            self.rx_paid = false;
            if ok && done == len {
                self.stats.rx_packets = self.stats.rx_packets.wrapping_add(1);
                self.stats.rx_bytes = self
                    .stats
                    .rx_bytes
                    .wrapping_add((len - VNET_HDR_LEN.min(len)) as u64);
                if !ctx.add_used(RX, head, len as u32) {
                    return;
                }
            } else {
                self.stats.dropped = self.stats.dropped.wrapping_add(1);
                if !ctx.add_used(RX, head, 0) {
                    return;
                }
            }
        }
    }

    fn process_tx(&mut self, ctx: &mut QueueCtx<'_>) {
        let mem = ctx.mem;
        loop {
            let Some(queue) = ctx.queues.get_mut(TX) else {
                return;
            };
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
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
                        unpop(queue);
                        return;
                    }
                }
            }
            if !ok || len < VNET_HDR_LEN {
                self.stats.dropped = self.stats.dropped.wrapping_add(1);
            } else {
                // A TAP takes a frame whole or not at all.
                match self.backend.write(&self.tx_frame) {
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
            if !ctx.add_used(TX, head, 0) {
                return;
            }
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
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
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 8];
        if let Some(m) = self.mac {
            cfg[..6].copy_from_slice(&m);
        }
        read_config_bytes(&cfg, offset, data);
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
        if let Err(e) = self.backend.set_offload(tun) {
            log::warn!("net {}: TUNSETOFFLOAD {tun:#x}: {e}", self.id);
        }
        let fd = self.backend.raw_fd();
        if let Err(e) = ctx
            .poller
            .add(fd, EventSet::IN | EventSet::EDGE_TRIGGERED, TOKEN_TAP)
        {
            log::error!("net {}: cannot watch the TAP: {e}", self.id);
        }
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
        self.process_rx(ctx);
    }

    fn reset(&mut self, poller: &Poller) {
        poller.remove(self.backend.raw_fd());
        for l in [&self.rx_limiter, &self.tx_limiter].into_iter().flatten() {
            poller.remove(l.timer_fd());
        }
        self.rx_pending = None;
        self.rx_paid = false;
    }

    fn process_queue(&mut self, index: u16, ctx: &mut QueueCtx<'_>) {
        match usize::from(index) {
            RX => self.process_rx(ctx),
            TX => {
                self.process_tx(ctx);
                // Sending may have freed room for a frame the guest answers at once.
                self.process_rx(ctx);
            }
            _ => {}
        }
    }

    fn process_backend(&mut self, token: u64, _events: EventSet, ctx: &mut QueueCtx<'_>) {
        match token {
            TOKEN_TAP => self.process_rx(ctx),
            TOKEN_RX_LIMITER => {
                if let Some(l) = &mut self.rx_limiter {
                    l.timer_fired();
                }
                self.process_rx(ctx);
            }
            TOKEN_TX_LIMITER => {
                if let Some(l) = &mut self.tx_limiter {
                    l.timer_fired();
                }
                self.process_tx(ctx);
            }
            _ => {}
        }
    }

    fn save(&self) -> DeviceState {
        DeviceState::Net(NetState {
            id: self.id.clone(),
            mac: self.mac,
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
}
