//! virtio-vsock (type 19) in Firecracker's hybrid model: the guest's AF_VSOCK streams are
//! carried over host Unix sockets.
//!
//! - Host to guest: a host program connects to `uds_path` and writes `CONNECT <port>\n`; tern
//!   asks the guest to accept on `<port>` and answers `OK <host_port>\n` when it does (or
//!   closes the connection when the guest refuses).
//! - Guest to host: a guest connection to CID 2, port `P` becomes a connection to the Unix
//!   socket `<uds_path>_P`.
//!
//! Flow control is virtio-vsock's credit scheme: tern buffers at most [`BUF_ALLOC`] bytes per
//! connection on the way to the host, and never sends the guest more than its advertised
//! buffer space.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::os::EventSet;
use virtio_queue::QueueOwnedT;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::{
    DEVICE_TOKEN_BASE, DeviceState, DeviceStateError, Poller, QueueCtx, VIRTIO_F_VERSION_1,
    VirtioDevice, read_config_bytes,
};

/// The virtio device ID of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Bytes tern buffers per connection towards the host (the credit it gives the guest).
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Header length.
pub const HDR_LEN: usize = 44;
/// Largest payload tern puts in one packet.
const MAX_PKT_PAYLOAD: usize = 64 * 1024;
/// Most connections at once (both directions); more are refused (RST / closed).
pub const MAX_CONNECTIONS: usize = 1024;
/// Most control packets (RST, RESPONSE, credit updates) waiting for the guest's receive
/// buffers; past it, tern stops taking the guest's transmit queue until the guest reads.
const MAX_CTRL: usize = 1024;

const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: the guest drops its connections (after a restore,
/// their host ends are gone) and keeps its listening sockets.
const EVENT_TRANSPORT_RESET: u32 = 0;

const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_RCV: u32 = 1;
const SHUTDOWN_SEND: u32 = 2;

const TOKEN_LISTENER: u64 = DEVICE_TOKEN_BASE;
const TOKEN_CONN_BASE: u64 = DEVICE_TOKEN_BASE + 1;

/// First host-side port given to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// A packet header (`struct virtio_vsock_hdr`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type (1 = stream).
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed.
    pub fwd_cnt: u32,
}

impl Header {
    /// Parses 44 little-endian bytes.
    pub fn parse(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// The 44 bytes.
    pub fn bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A host program connected to `uds_path`; waiting for its `CONNECT <port>\n`.
    AwaitConnectLine,
    /// We sent the guest a REQUEST; waiting for RESPONSE or RST.
    Connecting,
    /// Data flows.
    Established,
}

struct Conn {
    stream: UnixStream,
    state: State,
    /// Host-side port (ours) and guest-side port.
    local_port: u32,
    peer_port: u32,
    line: Vec<u8>,
    /// Bytes from the guest not yet written to the host socket.
    pending: VecDeque<u8>,
    fwd_cnt: u32,
    fwd_cnt_told: u32,
    /// Guest's receive buffer and how much of what we sent it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes we sent the guest.
    rx_cnt: u32,
    readable: bool,
    writable: bool,
    /// The host closed its side (read returned 0).
    host_eof: bool,
    /// The guest will send no more (SHUTDOWN with SEND).
    guest_send_done: bool,
    /// The guest closed (SHUTDOWN both ways): RST once `pending` reached the host.
    closing: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: State, local_port: u32, peer_port: u32) -> Self {
        Self {
            stream,
            state,
            local_port,
            peer_port,
            line: Vec::new(),
            pending: VecDeque::new(),
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            readable: false,
            writable: true,
            host_eof: false,
            guest_send_done: false,
            closing: false,
        }
    }

    /// How many bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Writes pending guest bytes to the host socket; false when the socket failed.
    fn flush(&mut self) -> bool {
        while !self.pending.is_empty() && self.writable {
            let (a, _) = self.pending.as_slices();
            match self.stream.write(a) {
                Ok(0) => return false,
                Ok(n) => {
                    self.pending.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.writable = false,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if self.pending.is_empty() && self.guest_send_done {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        true
    }
}

/// What the vsock device keeps across a snapshot: its connections are gone (the guest is told
/// with a transport reset event).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockState {
    /// The guest's CID.
    pub guest_cid: u64,
    /// Its counters.
    pub stats: VsockStats,
}

/// Counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockStats {
    /// Connections opened (both directions).
    pub connections: u64,
    /// Payload bytes guest to host.
    pub tx_bytes: u64,
    /// Payload bytes host to guest.
    pub rx_bytes: u64,
    /// Malformed packets dropped.
    pub dropped: u64,
}

/// The vsock device.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    conns: HashMap<u64, Conn>,
    by_ports: HashMap<(u32, u32), u64>,
    next_token: u64,
    next_local_port: u32,
    /// Control packets for the guest, sent before data.
    ctrl: VecDeque<Header>,
    /// Restored from a snapshot: tell the guest its connections are gone once active.
    restored: bool,
    /// Connections (token, bytes waiting) the last idle check found waiting for EPOLLOUT: the
    /// next one retries those still waiting with the same bytes (see [`VirtioDevice::idle`]).
    idle_stuck: Vec<(u64, usize)>,
    /// Counters.
    pub stats: VsockStats,
}

impl Vsock {
    /// A device for `guest_cid`, listening on `uds_path` (a stale socket there is replaced).
    pub fn new(guest_cid: u64, uds_path: &Path) -> std::io::Result<Self> {
        if let Ok(m) = std::fs::symlink_metadata(uds_path) {
            if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) {
                std::fs::remove_file(uds_path)?;
            }
        }
        let listener = UnixListener::bind(uds_path)?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            conns: HashMap::new(),
            by_ports: HashMap::new(),
            next_token: TOKEN_CONN_BASE,
            next_local_port: FIRST_LOCAL_PORT,
            ctrl: VecDeque::new(),
            restored: false,
            idle_stuck: Vec::new(),
            stats: VsockStats::default(),
        })
    }

    /// The host socket path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    fn rst_for(&self, h: &Header) -> Header {
        rst_for(self.guest_cid, h)
    }
}

fn header(guest_cid: u64, c: &Conn, op: u16) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: guest_cid,
        src_port: c.local_port,
        dst_port: c.peer_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: BUF_ALLOC,
        fwd_cnt: c.fwd_cnt,
    }
}

fn rst_for(guest_cid: u64, h: &Header) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: guest_cid,
        src_port: h.dst_port,
        dst_port: h.src_port,
        type_: TYPE_STREAM,
        op: OP_RST,
        ..Default::default()
    }
}

impl Vsock {
    fn add_conn(&mut self, c: Conn, poller: &Poller) -> Option<u64> {
        if self.conns.len() >= MAX_CONNECTIONS {
            log::warn!("vsock: {MAX_CONNECTIONS} connections open; refusing another");
            return None;
        }
        let token = self.next_token;
        self.next_token += 1;
        if let Err(e) = c.stream.set_nonblocking(true) {
            log::warn!("vsock: {e}");
            return None;
        }
        let ev = EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED | EventSet::READ_HANG_UP;
        if let Err(e) = poller.add(c.stream.as_raw_fd(), ev, token) {
            log::warn!("vsock: cannot watch a connection: {e}");
            return None;
        }
        if c.state != State::AwaitConnectLine {
            self.by_ports.insert((c.local_port, c.peer_port), token);
        }
        self.stats.connections = self.stats.connections.wrapping_add(1);
        self.conns.insert(token, c);
        Some(token)
    }

    fn remove_conn(&mut self, token: u64, poller: &Poller) {
        if let Some(c) = self.conns.remove(&token) {
            poller.remove(c.stream.as_raw_fd());
            // Only its own entry: a host connection still waiting for its CONNECT line has
            // none, and (0, 0) may be a guest connection's.
            let key = (c.local_port, c.peer_port);
            if self.by_ports.get(&key) == Some(&token) {
                self.by_ports.remove(&key);
            }
        }
    }

    fn accept(&mut self, poller: &Poller) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let c = Conn::new(stream, State::AwaitConnectLine, 0, 0);
                    if let Some(t) = self.add_conn(c, poller) {
                        self.service_host(t, poller);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("vsock: accept on {}: {e}", self.uds_path.display());
                    return;
                }
            }
        }
    }

    /// Reads the `CONNECT <port>\n` line of a new host connection.
    fn read_connect_line(&mut self, token: u64, poller: &Poller) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        loop {
            match c.stream.read(&mut byte) {
                Ok(0) => {
                    self.remove_conn(token, poller);
                    return;
                }
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) if c.line.len() < 32 => c.line.push(byte[0]),
                Ok(_) => {
                    log::debug!("vsock: host connection sent an overlong CONNECT line");
                    self.remove_conn(token, poller);
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    c.readable = false;
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.remove_conn(token, poller);
                    return;
                }
            }
        }
        let line = String::from_utf8_lossy(&c.line).into_owned();
        let port = line
            .strip_prefix("CONNECT ")
            .and_then(|p| p.trim().parse::<u32>().ok());
        let Some(port) = port else {
            log::debug!("vsock: host connection sent {line:?}, not CONNECT <port>");
            self.remove_conn(token, poller);
            return;
        };
        // The next local port whose (local, peer) pair no connection has: after the ports
        // wrapped around, or beside a guest connection to a host port in that range, the
        // plain next one could be taken, and its entry would orphan a live connection.
        let mut local = self.next_local_port;
        let mut tries = 0;
        while self.by_ports.contains_key(&(local, port)) {
            tries += 1;
            if tries > MAX_CONNECTIONS {
                log::warn!("vsock: no free local port toward guest port {port}");
                self.remove_conn(token, poller);
                return;
            }
            local = local.wrapping_add(1).max(FIRST_LOCAL_PORT);
        }
        self.next_local_port = local.wrapping_add(1).max(FIRST_LOCAL_PORT);
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        c.local_port = local;
        c.peer_port = port;
        c.state = State::Connecting;
        self.by_ports.insert((local, port), token);
        let h = header(self.guest_cid, &self.conns[&token], OP_REQUEST);
        self.ctrl.push_back(h);
    }

    /// Host socket events: read the handshake line, flush pending bytes.
    fn service_host(&mut self, token: u64, poller: &Poller) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if c.state == State::AwaitConnectLine {
            self.read_connect_line(token, poller);
            return;
        }
        if !c.flush() || (c.closing && c.pending.is_empty()) {
            let h = header(self.guest_cid, c, OP_RST);
            self.ctrl.push_back(h);
            self.remove_conn(token, poller);
            return;
        }
        self.maybe_credit_update(token);
    }

    fn maybe_credit_update(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if c.fwd_cnt.wrapping_sub(c.fwd_cnt_told) >= BUF_ALLOC / 4 {
            c.fwd_cnt_told = c.fwd_cnt;
            let h = header(self.guest_cid, &self.conns[&token], OP_CREDIT_UPDATE);
            self.ctrl.push_back(h);
        }
    }

    /// Fills the guest's receive buffers: control packets first, then data from readable
    /// host sockets with credit.
    fn deliver_rx(&mut self, ctx: &mut QueueCtx<'_>) {
        loop {
            if let Some(h) = self.ctrl.front().copied() {
                if !self.put_rx(ctx, &h, &[]) {
                    return;
                }
                self.ctrl.pop_front();
                continue;
            }
            let ready: Vec<u64> = self
                .conns
                .iter()
                .filter(|(_, c)| {
                    c.state == State::Established
                        && c.readable
                        && !c.host_eof
                        && c.peer_credit() > 0
                })
                .map(|(t, _)| *t)
                .collect();
            if ready.is_empty() {
                return;
            }
            for t in ready {
                if !self.rx_from_host(t, ctx) {
                    return;
                }
            }
        }
    }

    /// Moves one packet of host data to the guest; false when the guest has no buffer.
    fn rx_from_host(&mut self, token: u64, ctx: &mut QueueCtx<'_>) -> bool {
        let Some(c) = self.conns.get_mut(&token) else {
            return true;
        };
        if c.state != State::Established || !c.readable || c.host_eof {
            return true;
        }
        let credit = c.peer_credit() as usize;
        if credit == 0 {
            return true;
        }
        let Some(room) = rx_room(ctx) else {
            return false;
        };
        let want = credit.min(MAX_PKT_PAYLOAD).min(room);
        if want == 0 {
            return false;
        }
        let mut buf = vec![0u8; want];
        match c.stream.read(&mut buf) {
            Ok(0) => {
                c.host_eof = true;
                c.readable = false;
                let mut h = header(self.guest_cid, c, OP_SHUTDOWN);
                h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
                self.ctrl.push_back(h);
                true
            }
            Ok(n) => {
                c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
                c.fwd_cnt_told = c.fwd_cnt;
                let mut h = header(self.guest_cid, c, OP_RW);
                h.len = n as u32;
                self.stats.rx_bytes = self.stats.rx_bytes.wrapping_add(n as u64);
                self.put_rx(ctx, &h, &buf[..n])
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                c.readable = false;
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => true,
            Err(_) => {
                let h = header(self.guest_cid, c, OP_RST);
                self.ctrl.push_back(h);
                self.remove_conn(token, ctx.poller);
                true
            }
        }
    }

    /// Writes one packet into the next receive chain; false when there is none.
    fn put_rx(&mut self, ctx: &mut QueueCtx<'_>, h: &Header, payload: &[u8]) -> bool {
        let mem = ctx.mem;
        let Some(chain) = ctx.pop(RXQ) else {
            return false;
        };
        let head = chain.head_index();
        let mut pkt = h.bytes().to_vec();
        pkt.extend_from_slice(payload);
        let written = scatter(mem, chain, &pkt);
        if written < pkt.len() {
            self.stats.dropped = self.stats.dropped.wrapping_add(1);
            log::debug!("vsock: a receive buffer of the guest is too small or bad");
        }
        ctx.add_used(RXQ, head, written as u32);
        true
    }

    /// `by_ports` named a connection that is gone (it cannot, with `add_conn` and
    /// `remove_conn` keeping both maps): forget the entry and reset the guest's side.
    fn lost_conn(&mut self, key: (u32, u32), h: &Header) {
        log::warn!("vsock: ports {key:?} named a connection that is gone; resetting it");
        self.by_ports.remove(&key);
        let r = self.rst_for(h);
        self.ctrl.push_back(r);
    }

    fn handle_tx(&mut self, h: Header, payload: Vec<u8>, poller: &Poller) {
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID || h.type_ != TYPE_STREAM {
            self.stats.dropped = self.stats.dropped.wrapping_add(1);
            if h.op != OP_RST {
                let r = self.rst_for(&h);
                self.ctrl.push_back(r);
            }
            return;
        }
        let key = (h.dst_port, h.src_port);
        let token = self.by_ports.get(&key).copied();
        if let Some(c) = token.and_then(|t| self.conns.get_mut(&t)) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match (h.op, token) {
            (OP_REQUEST, None) => {
                let path = format!("{}_{}", self.uds_path.display(), h.dst_port);
                match connect_nonblocking(&path) {
                    Ok(stream) => {
                        let mut c = Conn::new(stream, State::Established, h.dst_port, h.src_port);
                        c.peer_buf_alloc = h.buf_alloc;
                        c.peer_fwd_cnt = h.fwd_cnt;
                        let resp = header(self.guest_cid, &c, OP_RESPONSE);
                        if self.add_conn(c, poller).is_some() {
                            self.ctrl.push_back(resp);
                        } else {
                            let r = self.rst_for(&h);
                            self.ctrl.push_back(r);
                        }
                    }
                    Err(e) => {
                        log::debug!("vsock: guest connection to {path}: {e}");
                        let r = self.rst_for(&h);
                        self.ctrl.push_back(r);
                    }
                }
            }
            (OP_RST, None) => {}
            (_, None) => {
                let r = self.rst_for(&h);
                self.ctrl.push_back(r);
            }
            (OP_RESPONSE, Some(t)) => {
                let Some(c) = self.conns.get_mut(&t) else {
                    self.lost_conn(key, &h);
                    return;
                };
                if c.state == State::Connecting {
                    c.state = State::Established;
                    c.readable = true;
                    let ok = format!("OK {}\n", c.local_port);
                    c.pending.extend(ok.as_bytes());
                    // The OK line is not guest data: keep it out of the credit count.
                    c.fwd_cnt = c.fwd_cnt.wrapping_sub(ok.len() as u32);
                    c.fwd_cnt_told = c.fwd_cnt;
                    self.service_host(t, poller);
                } else {
                    let r = self.rst_for(&h);
                    self.ctrl.push_back(r);
                    self.remove_conn(t, poller);
                }
            }
            (OP_RW, Some(t)) => {
                let Some(c) = self.conns.get_mut(&t) else {
                    self.lost_conn(key, &h);
                    return;
                };
                if c.state != State::Established
                    || c.pending.len() + payload.len() > BUF_ALLOC as usize
                {
                    // The guest overran the credit it was given, or sent before connecting.
                    let r = self.rst_for(&h);
                    self.ctrl.push_back(r);
                    self.remove_conn(t, poller);
                    return;
                }
                self.stats.tx_bytes = self.stats.tx_bytes.wrapping_add(payload.len() as u64);
                c.pending.extend(payload);
                self.service_host(t, poller);
            }
            (OP_CREDIT_UPDATE, Some(_)) => {}
            (OP_CREDIT_REQUEST, Some(t)) => {
                let Some(c) = self.conns.get(&t) else {
                    self.lost_conn(key, &h);
                    return;
                };
                let u = header(self.guest_cid, c, OP_CREDIT_UPDATE);
                self.ctrl.push_back(u);
            }
            (OP_SHUTDOWN, Some(t)) => {
                let Some(c) = self.conns.get_mut(&t) else {
                    self.lost_conn(key, &h);
                    return;
                };
                if h.flags & SHUTDOWN_SEND != 0 {
                    c.guest_send_done = true;
                    c.flush();
                }
                if h.flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == SHUTDOWN_SEND | SHUTDOWN_RCV {
                    // A full shutdown: answer with RST once the host has everything.
                    c.closing = true;
                    self.service_host(t, poller);
                }
            }
            (OP_RST, Some(t)) => {
                if let Some(c) = self.conns.get_mut(&t) {
                    c.flush();
                }
                self.remove_conn(t, poller);
            }
            (_, Some(_)) => self.stats.dropped = self.stats.dropped.wrapping_add(1),
        }
    }

    fn process_tx(&mut self, ctx: &mut QueueCtx<'_>) {
        let mem = ctx.mem;
        loop {
            if self.ctrl.len() >= MAX_CTRL {
                return; // the guest must read first (its receive buffers bring us back)
            }
            let Some(chain) = ctx.pop(TXQ) else {
                return;
            };
            let head = chain.head_index();
            let bytes = gather(mem, chain, HDR_LEN + MAX_PKT_PAYLOAD);
            ctx.add_used(TXQ, head, 0);
            let Some(hdr) = bytes.get(..HDR_LEN) else {
                self.stats.dropped = self.stats.dropped.wrapping_add(1);
                continue;
            };
            let mut hb = [0u8; HDR_LEN];
            hb.copy_from_slice(hdr);
            let h = Header::parse(&hb);
            let len = h.len as usize;
            if bytes.len() < HDR_LEN + len {
                self.stats.dropped = self.stats.dropped.wrapping_add(1);
                continue;
            }
            self.handle_tx(h, bytes[HDR_LEN..HDR_LEN + len].to_vec(), ctx.poller);
        }
    }
}

/// Connects to the Unix socket `path` without blocking: a listener whose backlog is full is
/// an error (the guest gets RST), not a stalled device.
fn connect_nonblocking(path: &str) -> std::io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    // Linux sets both flags with the socket; elsewhere they are set right after.
    #[cfg(target_os = "linux")]
    let kind = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    #[cfg(not(target_os = "linux"))]
    let kind = libc::SOCK_STREAM;
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, kind, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    #[cfg(not(target_os = "linux"))]
    {
        crate::os::set_nonblocking(&stream)?;
        // SAFETY: F_SETFD on the socket just made; no memory is passed.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (d, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    // SAFETY: `addr` is a valid sockaddr_un of the given size for the duration of the call.
    let rc = unsafe {
        libc::connect(
            fd,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

impl Vsock {
    /// Puts a transport-reset event in the event queue's next buffer (none: the guest gave
    /// none, and keeps its stale connections until they time out).
    fn transport_reset(&mut self, ctx: &mut QueueCtx<'_>) {
        let mem = ctx.mem;
        let Some(chain) = ctx.pop(EVQ) else {
            log::warn!("vsock: no event buffer for the transport reset after restore");
            return;
        };
        let head = chain.head_index();
        let n = scatter(mem, chain, &EVENT_TRANSPORT_RESET.to_le_bytes());
        ctx.add_used(EVQ, head, n as u32);
    }
}

/// Copies a readable chain's bytes (at most `max`); stops at a device-writable buffer.
fn gather(mem: &GuestMemoryMmap, chain: super::Chain, max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for d in chain {
        if d.is_write_only() {
            break;
        }
        let n = (d.len() as usize).min(max - out.len());
        let start = out.len();
        out.resize(start + n, 0);
        if mem.read_slice(&mut out[start..], d.addr()).is_err() {
            out.truncate(start);
            break;
        }
        if out.len() == max {
            break;
        }
    }
    out
}

/// Writes `data` across a chain's writable buffers; returns the bytes written.
fn scatter(mem: &GuestMemoryMmap, chain: super::Chain, data: &[u8]) -> usize {
    let mut done = 0;
    for d in chain {
        if done == data.len() || !d.is_write_only() {
            break;
        }
        let n = (d.len() as usize).min(data.len() - done);
        if mem.write_slice(&data[done..done + n], d.addr()).is_err() {
            break;
        }
        done += n;
    }
    done
}

/// Payload room of the next receive chain, without taking it.
fn rx_room(ctx: &mut QueueCtx<'_>) -> Option<usize> {
    let mem = ctx.mem;
    let queue = ctx.queues.get_mut(RXQ)?;
    let mut it = queue.iter(mem).ok()?;
    let chain = it.next()?;
    let room: usize = chain
        .filter(|d| d.is_write_only())
        .map(|d| d.len() as usize)
        .sum();
    it.go_to_previous_position();
    Some(room.saturating_sub(HDR_LEN))
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, _features: u64, ctx: &mut QueueCtx<'_>) {
        if std::mem::take(&mut self.restored) {
            self.transport_reset(ctx);
        }
        if let Err(e) = ctx
            .poller
            .add(self.listener.as_raw_fd(), EventSet::IN, TOKEN_LISTENER)
        {
            log::error!("vsock: cannot watch {}: {e}", self.uds_path.display());
        }
    }

    fn reset(&mut self, poller: &Poller) {
        poller.remove(self.listener.as_raw_fd());
        let tokens: Vec<u64> = self.conns.keys().copied().collect();
        for t in tokens {
            self.remove_conn(t, poller);
        }
        self.ctrl.clear();
    }

    fn process_queue(&mut self, _index: u16, ctx: &mut QueueCtx<'_>) {
        // Any queue: the guest may have sent, consumed data (credit) or given buffers. The
        // second round takes what the control-packet cap held back in the first.
        for _ in 0..2 {
            self.process_tx(ctx);
            self.deliver_rx(ctx);
        }
    }

    fn idle(&mut self, ctx: &mut QueueCtx<'_>) -> Option<String> {
        // A write that would block waits for EPOLLOUT; try once more in case it was lost, if
        // it was already waiting, with the same bytes, at the previous idle check (an EPOLLOUT
        // on its way at the first is not a lost one).
        let stuck: Vec<(u64, usize)> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.writable && !c.pending.is_empty())
            .map(|(t, c)| (*t, c.pending.len()))
            .collect();
        let seen = std::mem::replace(&mut self.idle_stuck, stuck.clone());
        let mut flushed = 0;
        for t in stuck.into_iter().filter(|s| seen.contains(s)).map(|s| s.0) {
            let Some(c) = self.conns.get_mut(&t) else {
                continue;
            };
            let before = c.pending.len();
            c.writable = true;
            self.service_host(t, ctx.poller);
            if self.conns.get(&t).is_none_or(|c| c.pending.len() < before) {
                flushed += 1;
            }
        }
        self.deliver_rx(ctx);
        (flushed > 0).then(|| format!("{flushed} connections could write to their host socket"))
    }

    fn process_backend(&mut self, token: u64, events: EventSet, ctx: &mut QueueCtx<'_>) {
        if token == TOKEN_LISTENER {
            self.accept(ctx.poller);
        } else if let Some(c) = self.conns.get_mut(&token) {
            if events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
                c.readable = true;
            }
            if events.contains(EventSet::OUT) {
                c.writable = true;
            }
            self.service_host(token, ctx.poller);
        }
        self.deliver_rx(ctx);
    }

    fn save(&self) -> DeviceState {
        DeviceState::Vsock(VsockState {
            guest_cid: self.guest_cid,
            stats: self.stats,
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        let DeviceState::Vsock(s) = state else {
            return Err(DeviceStateError::kind("virtio-vsock", state));
        };
        if s.guest_cid != self.guest_cid {
            return Err(DeviceStateError::differs(
                "vsock",
                "guest CID",
                s.guest_cid,
                self.guest_cid,
            ));
        }
        self.restored = true;
        self.stats = s.stats;
        Ok(())
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn describe(&self) -> String {
        let mut out = format!(
            "{} control packets waiting, {:?}; ",
            self.ctrl.len(),
            self.stats
        );
        for (t, c) in &self.conns {
            out += &format!(
                "connection {t}: {:?} ports {}/{} pending {} fwd_cnt {} told {} peer buf_alloc {} fwd_cnt {} rx_cnt {} credit {} readable {} writable {} host_eof {} guest_send_done {} closing {}; ",
                c.state,
                c.local_port,
                c.peer_port,
                c.pending.len(),
                c.fwd_cnt,
                c.fwd_cnt_told,
                c.peer_buf_alloc,
                c.peer_fwd_cnt,
                c.rx_cnt,
                c.peer_credit(),
                c.readable,
                c.writable,
                c.host_eof,
                c.guest_send_done,
                c.closing
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testutil::*;
    use std::io::{BufRead, BufReader};
    use vmm_sys_util::tempdir::TempDir;

    const CID: u64 = 3;
    const TX_HDR: u64 = DATA;
    const RX_BUF: u64 = DATA + 0x10000;

    struct T {
        d: Driver,
        dir: TempDir,
        rx_next: u16,
        tx_next: u16,
    }

    fn setup() -> T {
        let dir = TempDir::new().unwrap();
        let dev = Vsock::new(CID, &dir.as_path().join("v.sock")).unwrap();
        T {
            d: Driver::new(Box::new(dev)),
            dir,
            rx_next: 0,
            tx_next: 0,
        }
    }

    impl T {
        fn uds(&self) -> PathBuf {
            self.dir.as_path().join("v.sock")
        }

        /// The guest sends a packet.
        fn send(&mut self, op: u16, src_port: u32, dst_port: u32, payload: &[u8]) {
            let h = Header {
                src_cid: CID,
                dst_cid: HOST_CID,
                src_port,
                dst_port,
                len: payload.len() as u32,
                type_: TYPE_STREAM,
                op,
                flags: if op == OP_SHUTDOWN { 3 } else { 0 },
                buf_alloc: 65536,
                fwd_cnt: 0,
            };
            let i = self.tx_next;
            let at = TX_HDR + u64::from(i % 8) * 0x2000;
            self.d.write(at, &h.bytes());
            self.d.write(at + 0x100, payload);
            if payload.is_empty() {
                self.d.chain(TXQ, i % QSIZE, &[(at, 44, false)]);
            } else {
                self.d.desc(TXQ, i % QSIZE, at, 44, 1, (i + 1) % QSIZE);
                self.d
                    .desc(TXQ, (i + 1) % QSIZE, at + 0x100, payload.len() as u32, 0, 0);
            }
            self.tx_next = self.tx_next.wrapping_add(2);
            self.d.offer(TXQ, i % QSIZE);
        }

        /// The guest gives `n` receive buffers.
        fn give_rx(&mut self, n: u16) {
            for _ in 0..n {
                let i = self.rx_next % QSIZE;
                self.d
                    .chain(RXQ, i, &[(RX_BUF + u64::from(i) * 0x1000, 0x1000, true)]);
                self.d.make_available(RXQ, i);
                self.rx_next += 1;
            }
            self.d.notify(RXQ);
        }

        /// Packets the device put in receive buffers.
        fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
            self.d
                .take_used(RXQ)
                .into_iter()
                .map(|(id, len)| {
                    let b = self.d.read(RX_BUF + u64::from(id) * 0x1000, len as usize);
                    let mut hb = [0u8; HDR_LEN];
                    hb.copy_from_slice(&b[..HDR_LEN]);
                    (Header::parse(&hb), b[HDR_LEN..].to_vec())
                })
                .collect()
        }
    }

    #[test]
    fn guest_initiated_connection_carries_data_both_ways() {
        let mut t = setup();
        let listener = UnixListener::bind(format!("{}_5001", t.uds().display())).unwrap();
        t.give_rx(4);
        t.send(OP_REQUEST, 1234, 5001, &[]);
        let got = t.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.op, OP_RESPONSE);
        assert_eq!((got[0].0.src_port, got[0].0.dst_port), (5001, 1234));
        assert_eq!(got[0].0.buf_alloc, BUF_ALLOC);
        let (mut host, _) = listener.accept().unwrap();
        t.send(OP_RW, 1234, 5001, b"hello");
        let mut buf = [0u8; 5];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        host.write_all(b"world").unwrap();
        t.d.dev.run_ready(200);
        let got = t.received();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0.op, OP_RW);
        assert_eq!(got[0].1, b"world");
        assert_eq!(got[0].0.fwd_cnt, 5, "the 5 bytes we forwarded");
        // The host closes: the guest is told to shut down.
        drop(host);
        t.d.dev.run_ready(200);
        let got = t.received();
        assert_eq!(got.last().map(|p| p.0.op), Some(OP_SHUTDOWN), "{got:?}");
    }

    /// A host connection that leaves before its CONNECT line must not take a guest
    /// connection on ports (0, 0) with it (wave 1 removed that key for it, orphaning the
    /// guest's connection: its data was answered with a reset).
    #[test]
    fn a_host_connection_gone_before_connect_leaves_other_connections_alone() {
        let mut t = setup();
        let listener = UnixListener::bind(format!("{}_0", t.uds().display())).unwrap();
        t.give_rx(8);
        t.send(OP_REQUEST, 0, 0, &[]);
        assert_eq!(t.received()[0].0.op, OP_RESPONSE);
        let (mut host, _) = listener.accept().unwrap();
        host.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let early = UnixStream::connect(t.uds()).unwrap();
        t.d.dev.run_ready(100);
        drop(early);
        t.d.dev.run_ready(100);
        t.send(OP_RW, 0, 0, b"still here");
        let mut buf = [0u8; 10];
        assert!(
            host.read_exact(&mut buf).is_ok(),
            "the guest's data never came"
        );
        assert_eq!(&buf, b"still here");
        assert!(t.received().iter().all(|p| p.0.op != OP_RST));
    }

    #[test]
    fn idle_check_recovers_a_lost_writable_and_readable_event() {
        let mut t = setup();
        let listener = UnixListener::bind(format!("{}_5001", t.uds().display())).unwrap();
        t.give_rx(4);
        t.send(OP_REQUEST, 1234, 5001, &[]);
        assert_eq!(t.received().len(), 1);
        let (mut host, _) = listener.accept().unwrap();
        host.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        while t.d.dev.run_ready(50) > 0 {}
        // Pretend the socket said EAGAIN and its EPOLLOUT never came: the bytes wait...
        let side = t.d.dev.device_side();
        let stall = |side: &std::sync::Arc<std::sync::Mutex<crate::virtio::mmio::DeviceSide>>| {
            side.lock().unwrap().with_device(|d, _| {
                let v = d.as_any_mut().downcast_mut::<Vsock>().unwrap();
                for c in v.conns.values_mut() {
                    c.writable = false;
                }
            })
        };
        stall(&side);
        t.send(OP_RW, 1234, 5001, b"late");
        let pending = side.lock().unwrap().with_device(|d, _| {
            let v = d.as_any_mut().downcast_mut::<Vsock>().unwrap();
            v.conns.values().map(|c| c.pending.len()).sum::<usize>()
        });
        assert_eq!(pending, 4);
        // ...past the first idle check (an EPOLLOUT may be on its way)...
        side.lock().unwrap().idle_check();
        let pending_now = side.lock().unwrap().with_device(|d, _| {
            let v = d.as_any_mut().downcast_mut::<Vsock>().unwrap();
            v.conns.values().map(|c| c.pending.len()).sum::<usize>()
        });
        assert_eq!(pending_now, 4, "retried at the first idle check");
        // ...until the second retries the write.
        side.lock().unwrap().idle_check();
        let mut buf = [0u8; 4];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"late");
        // Host data whose EPOLLIN was lost (not yet seen by the device) reaches the guest too.
        host.write_all(b"back").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        side.lock().unwrap().with_device(|d, _| {
            let v = d.as_any_mut().downcast_mut::<Vsock>().unwrap();
            for c in v.conns.values_mut() {
                c.readable = true;
            }
        });
        side.lock().unwrap().idle_check();
        let got = t.received();
        assert_eq!(
            got.last().map(|p| p.1.as_slice()),
            Some(&b"back"[..]),
            "{got:?}"
        );
    }

    #[test]
    fn restored_device_tells_the_guest_its_connections_are_gone() {
        let mut t = setup();
        // The guest gives an event buffer; nothing happens to it while running.
        let ev = DATA + 0x30000;
        t.d.write(ev, &[0xff; 8]);
        t.d.chain(EVQ, 0, &[(ev, 8, true)]);
        t.d.make_available(EVQ, 0);
        t.d.notify(EVQ);
        assert_eq!(t.d.used_idx(EVQ), 0);
        let saved = t.d.dev.save();
        let mem = t.d.mem.clone();
        let T { d, dir, .. } = t;
        let path = dir.as_path().join("v.sock");
        // A new process: the same socket path (the old listener went with its process).
        drop(d);
        let irq = std::sync::Arc::new(crate::interrupt::CountingInterrupt::default());
        let log = std::sync::Arc::new(crate::dirty::DirtyLog::new(&[(0, 1 << 32)]));
        let _restored = crate::virtio::mmio::MmioTransport::restore(
            Box::new(Vsock::new(CID, &path).unwrap()),
            mem.clone(),
            crate::interrupt::IrqLine(irq.clone()),
            &saved,
            Some(log.clone()),
        )
        .unwrap();
        let used_ring = saved.queues[EVQ].0.used_ring;
        // The event and the used ring it went through are in the next diff snapshot.
        let marked =
            |gpa: u64| log.bitmap(0)[(gpa / 4096 / 64) as usize] & (1 << (gpa / 4096 % 64)) != 0;
        assert!(
            marked(used_ring) && marked(ev),
            "{} pages marked",
            log.count()
        );
        let idx: u16 = mem
            .read_obj(vm_memory::GuestAddress(used_ring + 2))
            .unwrap();
        assert_eq!(idx, 1, "one event delivered");
        let len: u32 = mem
            .read_obj(vm_memory::GuestAddress(used_ring + 8))
            .unwrap();
        assert_eq!(len, 4);
        let event: u32 = mem.read_obj(vm_memory::GuestAddress(ev)).unwrap();
        assert_eq!(event, EVENT_TRANSPORT_RESET);
        assert_eq!(irq.count(), 1, "and the guest is interrupted");
    }

    #[test]
    fn host_initiated_connection_gets_ok_after_the_guest_accepts() {
        let mut t = setup();
        t.give_rx(4);
        let mut host = UnixStream::connect(t.uds()).unwrap();
        host.write_all(b"CONNECT 5000\n").unwrap();
        t.d.dev.run_ready(200);
        t.d.dev.run_ready(50);
        let got = t.received();
        assert_eq!(got.len(), 1, "{got:?}");
        let req = got[0].0;
        assert_eq!((req.op, req.dst_port, req.dst_cid), (OP_REQUEST, 5000, CID));
        assert!(req.src_port >= FIRST_LOCAL_PORT);
        t.send(OP_RESPONSE, 5000, req.src_port, &[]);
        let mut line = String::new();
        BufReader::new(&host).read_line(&mut line).unwrap();
        assert_eq!(line, format!("OK {}\n", req.src_port));
        t.send(OP_RW, 5000, req.src_port, b"ping");
        let mut buf = [0u8; 4];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        // A guest refusal (RST) closes the host side.
        let mut other = UnixStream::connect(t.uds()).unwrap();
        other.write_all(b"CONNECT 6000\n").unwrap();
        t.d.dev.run_ready(200);
        t.d.dev.run_ready(50);
        let req = t.received()[0].0;
        t.send(OP_RST, 6000, req.src_port, &[]);
        other
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        assert_eq!(other.read(&mut buf).unwrap(), 0, "closed");
    }

    #[test]
    fn bad_requests_are_reset_not_fatal() {
        let mut t = setup();
        t.give_rx(8);
        // Nobody listens on the port: RST.
        t.send(OP_REQUEST, 1, 7777, &[]);
        // Data on a connection that does not exist: RST.
        t.send(OP_RW, 2, 7777, b"x");
        // A bad CONNECT line from the host closes that connection only.
        let mut host = UnixStream::connect(t.uds()).unwrap();
        host.write_all(b"HELLO\n").unwrap();
        t.d.dev.run_ready(200);
        t.d.dev.run_ready(50);
        let ops: Vec<u16> = t.received().iter().map(|p| p.0.op).collect();
        assert_eq!(ops, vec![OP_RST, OP_RST]);
        let mut b = [0u8; 1];
        host.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        assert_eq!(host.read(&mut b).unwrap(), 0);
    }

    #[test]
    fn malformed_descriptors_neither_panic_nor_hang() {
        let mut t = setup();
        for q in 0..3 {
            t.d.offer_malformed(q);
        }
    }
}
