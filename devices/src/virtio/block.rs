//! virtio-blk (type 2) on a raw image file: read, write, flush (`fdatasync`), GET_ID, discard
//! and write-zeroes, with Firecracker's rate limiter. Requests run synchronously on the
//! device's worker thread (`pread`/`pwrite` straight into guest memory), so a slow disk stalls
//! only this drive's queue.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::os::EventSet;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{
    DEVICE_TOKEN_BASE, DeviceState, DeviceStateError, Poller, QueueCtx, VIRTIO_F_VERSION_1,
    VirtioDevice, read_config_bytes,
};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig};

/// The virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// The most request queues a drive offers (`num_queues`).
pub const MAX_QUEUES: u16 = 16;
/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_MQ: u64 = 1 << 12;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Most discard / write-zeroes segments in one request, and sectors per segment.
const MAX_SEGMENTS: u32 = 32;
const MAX_SEGMENT_SECTORS: u32 = (1 << 30) / 512;

const TOKEN_LIMITER: u64 = DEVICE_TOKEN_BASE;

/// Why a drive cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The backing file cannot be opened.
    #[error("cannot open drive {id} backing file {path}: {source}")]
    Open {
        /// Drive id.
        id: String,
        /// Path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// The rate limiter's timer cannot be created.
    #[error("drive {id}: rate limiter: {0}", id = .1)]
    Limiter(std::io::Error, String),
    /// io_uring is not available.
    #[error("drive {id}: cannot set up io_uring ({0}); use io_engine \"Sync\"", id = .1)]
    Uring(std::io::Error, String),
    /// `num_queues` out of range.
    #[error("drive {id}: num_queues {0} is out of range: give 1 to {MAX_QUEUES}", id = .1)]
    Queues(u16, String),
}

/// What a drive is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// The drive id (GET_ID answers it, truncated to 20 bytes).
    pub id: String,
    /// The raw image file or block device.
    pub path: PathBuf,
    /// The guest may not write.
    pub read_only: bool,
    /// Optional rate limiter.
    pub rate_limiter: Option<RateLimiterConfig>,
    /// How requests reach the file.
    pub engine: IoEngine,
    /// Request queues (1 to [`MAX_QUEUES`]; more than one offers `VIRTIO_BLK_F_MQ`, and the
    /// guest's blk-mq submits from several vCPUs without sharing one queue). One worker
    /// serves them all.
    pub num_queues: u16,
}

/// How a drive's worker does its reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum IoEngine {
    /// `pread`/`pwrite`, one request after another.
    #[default]
    Sync,
    /// io_uring: every read and write the guest has queued goes to the kernel at once, and the
    /// worker waits for the batch (Firecracker's `"Async"`).
    Uring,
}

/// How many waits for io_uring completions may fail in a row with a transient error before the
/// ring is given up (a 1 ms pause after each EAGAIN/EBUSY: about a second).
#[cfg(target_os = "linux")]
const URING_RETRIES: u32 = 1000;

/// The io_uring engine's ring (Linux only; elsewhere it cannot be made, and `Async` is refused).
#[cfg(target_os = "linux")]
type Ring = io_uring::IoUring;
#[cfg(not(target_os = "linux"))]
type Ring = std::convert::Infallible;

#[cfg(target_os = "linux")]
fn new_ring() -> std::io::Result<Ring> {
    io_uring::IoUring::new(URING_DEPTH)
}

#[cfg(not(target_os = "linux"))]
fn new_ring() -> std::io::Result<Ring> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "io_uring exists on Linux only",
    ))
}

/// Most requests in flight in one io_uring batch.
#[cfg(target_os = "linux")]
const URING_DEPTH: u32 = 128;

/// Reads and writes from this size up, in a batch of more than one request, go to the kernel's
/// io_uring workers (`IOSQE_ASYNC`), which run them side by side; smaller ones, or one alone,
/// run inline in the submitting call, where a page-cache hit costs least (docs/benchmarks.md).
#[cfg(target_os = "linux")]
const URING_ASYNC_BYTES: u64 = 64 * 1024;

/// Whether a request of `bytes` in a batch of `batch_len` requests is handed to io_uring's
/// workers instead of running inline: inline, the page-cache copies of a batch run one after
/// another on the drive's thread.
#[cfg(target_os = "linux")]
fn uring_punts(batch_len: usize, bytes: u64) -> bool {
    batch_len > 1 && bytes >= URING_ASYNC_BYTES
}

/// What a drive keeps across a snapshot (its backing file is opened again from the
/// configuration, and must have as many sectors).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockState {
    /// The drive's id.
    pub id: String,
    /// Whether it was read-only.
    pub read_only: bool,
    /// Its size in 512-byte sectors.
    pub sectors: u64,
    /// Its counters.
    pub stats: BlockStats,
}

/// Counters of one drive.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockStats {
    /// Read requests.
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Flush requests.
    pub flushes: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Requests answered with an error status.
    pub errors: u64,
    /// Times the rate limiter held the queue.
    pub throttled: u64,
}

/// A drive's backing file, opened and sized.
pub struct Backing {
    file: File,
    path: PathBuf,
    sectors: u64,
    is_file: bool,
}

impl Backing {
    /// Flushes what went to this file to disk (an old backing file, before it is let go).
    pub fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn open_backing(id: &str, path: &Path, read_only: bool) -> Result<Backing, BlockError> {
    let err = |source| BlockError::Open {
        id: id.to_string(),
        path: path.to_path_buf(),
        source,
    };
    // Non-blocking, so that a FIFO (refused below) cannot hold the open; the descriptor is
    // made blocking again for the I/O paths.
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    if meta.is_file() || meta.file_type().is_block_device() {
        crate::os::set_blocking(&file).map_err(err)?;
    }
    let bytes = if meta.file_type().is_block_device() {
        use std::io::{Seek, SeekFrom};
        (&file).seek(SeekFrom::End(0)).map_err(err)?
    } else if meta.is_file() {
        meta.len()
    } else {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file or block device",
        )));
    };
    if bytes % SECTOR_SIZE != 0 {
        log::warn!(
            "drive {id}: {} is {bytes} bytes, not a multiple of 512; the last {} bytes are invisible",
            path.display(),
            bytes % SECTOR_SIZE
        );
    }
    Ok(Backing {
        file,
        path: path.to_path_buf(),
        sectors: bytes / SECTOR_SIZE,
        is_file: meta.is_file(),
    })
}

/// The block device.
pub struct Block {
    id: String,
    read_only: bool,
    backing: Backing,
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    uring: Option<Ring>,
    /// A ring that failed with requests still in the kernel: kept open (its in-flight
    /// requests' iovec arrays are leaked) so the kernel never reads a freed iovec. Requests go
    /// through pread/pwrite from then on; this happens once per device at most.
    #[cfg(target_os = "linux")]
    broken_uring: Option<Ring>,
    limiter: Option<RateLimiter>,
    features: u64,
    /// One entry per request queue.
    queue_sizes: Vec<u16>,
    /// Counters.
    pub stats: BlockStats,
}

/// One parsed request's buffers.
struct Request {
    /// The queue it came on (its status goes back there).
    queue: usize,
    head: u16,
    kind: u32,
    sector: u64,
    /// (address, length) of the data buffers, in order.
    data: Vec<(GuestAddress, u32)>,
    /// Direction of every data buffer agrees with the request type.
    directions_ok: bool,
    status: GuestAddress,
}

impl Block {
    /// Opens the drive.
    pub fn new(cfg: &BlockConfig) -> Result<Self, BlockError> {
        let backing = open_backing(&cfg.id, &cfg.path, cfg.read_only)?;
        let limiter = match cfg.rate_limiter {
            Some(c) if !c.is_unlimited() => {
                Some(RateLimiter::new(c).map_err(|e| BlockError::Limiter(e, cfg.id.clone()))?)
            }
            _ => None,
        };
        let uring = match cfg.engine {
            IoEngine::Sync => None,
            IoEngine::Uring => Some(new_ring().map_err(|e| BlockError::Uring(e, cfg.id.clone()))?),
        };
        if !(1..=MAX_QUEUES).contains(&cfg.num_queues) {
            return Err(BlockError::Queues(cfg.num_queues, cfg.id.clone()));
        }
        let mut features = VIRTIO_F_VERSION_1 | F_SEG_MAX | F_BLK_SIZE | F_FLUSH;
        if cfg.num_queues > 1 {
            features |= F_MQ;
        }
        if cfg.read_only {
            features |= F_RO;
        } else if backing.is_file {
            features |= F_DISCARD | F_WRITE_ZEROES;
        }
        Ok(Self {
            id: cfg.id.clone(),
            read_only: cfg.read_only,
            backing,
            uring,
            #[cfg(target_os = "linux")]
            broken_uring: None,
            limiter,
            features,
            queue_sizes: vec![QUEUE_SIZE; usize::from(cfg.num_queues)],
            stats: BlockStats::default(),
        })
    }

    /// The drive id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.backing.sectors
    }

    /// The backing file's path.
    pub fn path(&self) -> &Path {
        &self.backing.path
    }

    /// Whether the drive is read-only (what [`Block::open_backing`] needs to know).
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Opens and sizes a new backing file for drive `id` (PATCH /drives), without touching the
    /// device: done before the device is locked, so that a slow open stalls neither the worker
    /// nor the vCPUs. A FIFO or anything else that is not a regular file or block device is
    /// refused without blocking.
    pub fn open_backing(id: &str, path: &Path, read_only: bool) -> Result<Backing, BlockError> {
        open_backing(id, path, read_only)
    }

    /// Switches to `new` (from [`Block::open_backing`]) and returns the old backing file, which
    /// the caller flushes (see [`Backing::flush`]) once the device is unlocked. The caller
    /// then tells the driver the configuration (capacity) changed.
    pub fn swap_backing(&mut self, new: Backing) -> Backing {
        std::mem::replace(&mut self.backing, new)
    }

    /// Replaces the rate limiter (PATCH /drives), moving its timer in the worker's epoll set
    /// (`active`: the driver started the device). A failure changes nothing.
    pub fn set_rate_limiter(
        &mut self,
        cfg: RateLimiterConfig,
        poller: &Poller,
        active: bool,
    ) -> std::io::Result<()> {
        let new = if cfg.is_unlimited() {
            None
        } else {
            Some(RateLimiter::new(cfg)?)
        };
        if let Some(old) = &self.limiter {
            poller.remove(old.timer_fd());
        }
        self.limiter = new;
        if let (Some(l), true) = (&self.limiter, active) {
            poller.add(l.timer_fd(), EventSet::IN, TOKEN_LIMITER)?;
        }
        Ok(())
    }

    /// The rate limiter's timer descriptor, if there is a limiter.
    pub fn limiter_timer(&self) -> Option<std::os::fd::RawFd> {
        self.limiter.as_ref().map(|l| l.timer_fd())
    }

    fn config_space(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&self.backing.sectors.to_le_bytes());
        // seg_max: as many data segments as a chain can hold besides header and status.
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c[34..36].copy_from_slice(&(self.queue_sizes.len() as u16).to_le_bytes()); // num_queues
        c[36..40].copy_from_slice(&MAX_SEGMENT_SECTORS.to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&MAX_SEGMENTS.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&MAX_SEGMENT_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&MAX_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    fn parse(chain: super::Chain, mem: &GuestMemoryMmap, queue: usize) -> Result<Request, u16> {
        let head = chain.head_index();
        let descs = chain.into_descriptors();
        let (Some(first), Some(last)) = (descs.first(), descs.last()) else {
            return Err(head);
        };
        if descs.len() < 2 || first.is_write_only() || first.len() < 16 {
            return Err(head);
        }
        if !last.is_write_only() || last.len() < 1 {
            return Err(head);
        }
        let kind: u32 = mem.read_obj(first.addr()).map_err(|_| head)?;
        let sector: u64 = mem
            .read_obj(first.addr().checked_add(8).ok_or(head)?)
            .map_err(|_| head)?;
        let middle = &descs[1..descs.len() - 1];
        let device_writes = matches!(kind, T_IN | T_GET_ID);
        let directions_ok = middle.iter().all(|d| d.is_write_only() == device_writes);
        Ok(Request {
            queue,
            head,
            kind,
            sector,
            data: middle.iter().map(|d| (d.addr(), d.len())).collect(),
            directions_ok,
            status: last.addr(),
        })
    }

    /// Bytes of data a request moves (for the bandwidth bucket).
    fn data_len(r: &Request) -> u64 {
        match r.kind {
            T_IN | T_OUT => r.data.iter().map(|d| u64::from(d.1)).sum(),
            _ => 0,
        }
    }

    /// The bytes a discard or write-zeroes request's segments cover (what is unreadable or
    /// malformed counts nothing: [`Self::segments`] refuses it when the request runs).
    fn zeroed_bytes(r: &Request, mem: &GuestMemoryMmap) -> u64 {
        let mut total = 0u64;
        let mut count = 0u32;
        for &(addr, len) in &r.data {
            for i in 0..len / 16 {
                count += 1;
                if count > MAX_SEGMENTS {
                    return total;
                }
                let mut num = [0u8; 4];
                let at = addr.checked_add(u64::from(i) * 16 + 8);
                if at.is_some_and(|a| mem.read_slice(&mut num, a).is_ok()) {
                    total = total.saturating_add(u64::from(u32::from_le_bytes(num)) * SECTOR_SIZE);
                }
            }
        }
        total
    }

    /// Does the request; returns the status and the bytes written into guest buffers.
    fn execute(&mut self, r: &Request, mem: &GuestMemoryMmap) -> (u8, u32) {
        if !r.directions_ok {
            return (S_IOERR, 0);
        }
        match r.kind {
            T_IN | T_OUT => {
                let total: u64 = Self::data_len(r);
                let Some(start) = r.sector.checked_mul(SECTOR_SIZE) else {
                    return (S_IOERR, 0);
                };
                let end = start.checked_add(total);
                if end.is_none_or(|e| e > self.backing.sectors * SECTOR_SIZE) {
                    return (S_IOERR, 0);
                }
                if r.kind == T_OUT && self.read_only {
                    return (S_IOERR, 0);
                }
                let mut off = start;
                for &(addr, len) in &r.data {
                    if let Err(e) = self.transfer(r.kind == T_IN, mem, addr, len, off) {
                        log::debug!("drive {}: I/O at {off}: {e}", self.id);
                        return (S_IOERR, 0);
                    }
                    off += u64::from(len);
                }
                if r.kind == T_IN {
                    self.stats.reads = self.stats.reads.wrapping_add(1);
                    self.stats.read_bytes = self.stats.read_bytes.wrapping_add(total);
                    (S_OK, total.min(u64::from(u32::MAX - 1)) as u32)
                } else {
                    self.stats.writes = self.stats.writes.wrapping_add(1);
                    self.stats.write_bytes = self.stats.write_bytes.wrapping_add(total);
                    (S_OK, 0)
                }
            }
            T_FLUSH => {
                self.stats.flushes = self.stats.flushes.wrapping_add(1);
                match self.backing.file.sync_data() {
                    Ok(()) => (S_OK, 0),
                    Err(e) => {
                        log::warn!("drive {}: fdatasync: {e}", self.id);
                        (S_IOERR, 0)
                    }
                }
            }
            T_GET_ID => {
                let mut id = [0u8; ID_BYTES];
                let n = self.id.len().min(ID_BYTES);
                id[..n].copy_from_slice(&self.id.as_bytes()[..n]);
                let mut done = 0usize;
                for &(addr, len) in &r.data {
                    let n = (len as usize).min(ID_BYTES - done);
                    if mem.write_slice(&id[done..done + n], addr).is_err() {
                        return (S_IOERR, 0);
                    }
                    done += n;
                }
                (S_OK, done as u32)
            }
            T_DISCARD | T_WRITE_ZEROES if self.read_only => (S_IOERR, 0),
            T_DISCARD | T_WRITE_ZEROES if self.features & F_DISCARD == 0 => (S_UNSUPP, 0),
            T_DISCARD | T_WRITE_ZEROES => match self.segments(r, mem) {
                Ok(()) => (S_OK, 0),
                Err(s) => (s, 0),
            },
            _ => (S_UNSUPP, 0),
        }
    }

    fn segments(&mut self, r: &Request, mem: &GuestMemoryMmap) -> Result<(), u8> {
        let mut count = 0u32;
        for &(addr, len) in &r.data {
            if len % 16 != 0 {
                return Err(S_IOERR);
            }
            for i in 0..len / 16 {
                count += 1;
                if count > MAX_SEGMENTS {
                    return Err(S_IOERR);
                }
                let at = addr.checked_add(u64::from(i) * 16).ok_or(S_IOERR)?;
                let mut seg = [0u8; 16];
                mem.read_slice(&mut seg, at).map_err(|_| S_IOERR)?;
                let sector = u64::from_le_bytes(seg[0..8].try_into().map_err(|_| S_IOERR)?);
                let num = u32::from_le_bytes(seg[8..12].try_into().map_err(|_| S_IOERR)?);
                let flags = u32::from_le_bytes(seg[12..16].try_into().map_err(|_| S_IOERR)?);
                if num > MAX_SEGMENT_SECTORS
                    || sector
                        .checked_add(u64::from(num))
                        .is_none_or(|e| e > self.backing.sectors)
                {
                    return Err(S_IOERR);
                }
                let unmap = r.kind == T_DISCARD || flags & 1 != 0;
                self.zero_range(sector * SECTOR_SIZE, u64::from(num) * SECTOR_SIZE, unmap)?;
            }
        }
        Ok(())
    }

    /// Punches a hole (`unmap`) or zeroes a range in place; false where the file system (or
    /// the OS: fallocate is Linux's) cannot.
    #[cfg(target_os = "linux")]
    fn fallocate_zero(&self, off: u64, len: u64, unmap: bool) -> bool {
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        // SAFETY: fallocate on a descriptor we own, with range values checked against the file.
        let rc = unsafe {
            libc::fallocate(
                self.backing.file.as_raw_fd(),
                mode,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        rc == 0
    }

    #[cfg(not(target_os = "linux"))]
    fn fallocate_zero(&self, _off: u64, _len: u64, _unmap: bool) -> bool {
        false
    }

    fn zero_range(&mut self, off: u64, len: u64, unmap: bool) -> Result<(), u8> {
        if len == 0 {
            return Ok(());
        }
        if self.fallocate_zero(off, len, unmap) {
            return Ok(());
        }
        // No fallocate support: write zeros (discard may simply do nothing).
        if unmap {
            return Ok(());
        }
        let zeros = vec![0u8; 64 * 1024];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            use std::os::unix::fs::FileExt;
            self.backing
                .file
                .write_all_at(&zeros[..n], off + done)
                .map_err(|_| S_IOERR)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Moves `len` bytes between guest memory at `addr` and the file at `off`.
    fn transfer(
        &self,
        read: bool,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: u32,
        mut off: u64,
    ) -> std::io::Result<()> {
        let fd = self.backing.file.as_raw_fd();
        for slice in mem.get_slices(addr, len as usize) {
            let slice = slice.map_err(std::io::Error::other)?;
            let mut done = 0usize;
            while done < slice.len() {
                let rest = slice.len() - done;
                let n = if read {
                    let guard = slice.ptr_guard_mut();
                    // SAFETY: `guard` points at `slice.len()` bytes of mapped guest memory,
                    // kept mapped by `mem` for this call; we write at most `rest` bytes from
                    // offset `done`.
                    unsafe { libc::pread(fd, guard.as_ptr().add(done).cast(), rest, off as i64) }
                } else {
                    let guard = slice.ptr_guard();
                    // SAFETY: as above, reading at most `rest` bytes from offset `done`.
                    unsafe { libc::pwrite(fd, guard.as_ptr().add(done).cast(), rest, off as i64) }
                };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the backing file ended early",
                    ));
                }
                done += n as usize;
                off += n as u64;
            }
        }
        Ok(())
    }
    fn process_queue_sync(&mut self, ctx: &mut QueueCtx<'_>, q: usize) {
        loop {
            let req = match self.next_request(ctx, q) {
                Ok(r) => r,
                Err(true) => return,
                Err(false) => continue,
            };
            let (status, written) = self.execute(&req, ctx.mem);
            if !self.complete(ctx, &req, status, written) {
                return;
            }
        }
    }

    /// Pops the next request that may go now: parsed, and allowed by the rate limiter.
    /// `Err(true)`: the queue is empty or the limiter said wait; `Err(false)`: a chain without
    /// a usable status buffer was given back (try the next).
    fn next_request(&mut self, ctx: &mut QueueCtx<'_>, q: usize) -> Result<Request, bool> {
        let mem = ctx.mem;
        let Some(chain) = ctx.pop(q) else {
            return Err(true);
        };
        let req = match Self::parse(chain, mem, q) {
            Ok(r) => r,
            Err(head) => {
                self.stats.errors = self.stats.errors.wrapping_add(1);
                return if ctx.add_used(q, head, 0) {
                    Err(false)
                } else {
                    Err(true)
                };
            }
        };
        // Reads and writes cost their bytes; write-zeroes the bytes it zeroes (where the file
        // system cannot zero a range in place, tern writes them); a discard only its op.
        let bytes = match req.kind {
            T_WRITE_ZEROES => Self::zeroed_bytes(&req, mem),
            _ => Self::data_len(&req),
        };
        let charge = bytes.min(self.backing.sectors * SECTOR_SIZE);
        if let Some(l) = &mut self.limiter {
            if !l.consume(charge) {
                self.stats.throttled = self.stats.throttled.wrapping_add(1);
                ctx.unpop(q);
                return Err(true);
            }
        }
        Ok(req)
    }

    fn complete(
        &mut self,
        ctx: &mut QueueCtx<'_>,
        req: &Request,
        status: u8,
        written: u32,
    ) -> bool {
        if status != S_OK {
            self.stats.errors = self.stats.errors.wrapping_add(1);
        }
        let len = match ctx.mem.write_obj(status, req.status) {
            Ok(()) => written.saturating_add(1),
            Err(_) => written,
        };
        ctx.add_used(req.queue, req.head, len)
    }

    /// The io_uring engine: reads and writes of all queued requests go to the kernel as one
    /// batch; anything else (flush, GET_ID, discard, bad requests) runs after the batch
    /// completes, so a flush covers every write completed before it.
    #[cfg(target_os = "linux")]
    fn process_queue_uring(&mut self, ctx: &mut QueueCtx<'_>, q: usize) {
        loop {
            let mut batch: Vec<(Request, Vec<libc::iovec>, u64)> = Vec::new();
            let mut other: Option<Request> = None;
            let mut stop = false;
            while batch.len() < URING_DEPTH as usize {
                match self.next_request(ctx, q) {
                    Err(true) => {
                        stop = true;
                        break;
                    }
                    Err(false) => continue,
                    Ok(req) => match self.iovecs(&req, ctx.mem) {
                        Some((iov, total)) => batch.push((req, iov, total)),
                        None => {
                            other = Some(req);
                            break;
                        }
                    },
                }
            }
            if !batch.is_empty() && !self.run_batch(&mut batch, ctx) {
                return;
            }
            if let Some(req) = other {
                let (status, written) = self.execute(&req, ctx.mem);
                if !self.complete(ctx, &req, status, written) {
                    return;
                }
            }
            if stop {
                return;
            }
        }
    }

    /// The iovecs of a valid read or write (None for anything else, which `execute` handles).
    #[cfg(target_os = "linux")]
    fn iovecs(&self, r: &Request, mem: &GuestMemoryMmap) -> Option<(Vec<libc::iovec>, u64)> {
        if !r.directions_ok || !matches!(r.kind, T_IN | T_OUT) {
            return None;
        }
        if r.kind == T_OUT && self.read_only {
            return None;
        }
        let total = Self::data_len(r);
        let start = r.sector.checked_mul(SECTOR_SIZE)?;
        if start.checked_add(total)? > self.backing.sectors * SECTOR_SIZE {
            return None;
        }
        let mut iov = Vec::with_capacity(r.data.len());
        for &(addr, len) in &r.data {
            for slice in mem.get_slices(addr, len as usize) {
                let slice = slice.ok()?;
                iov.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
            }
        }
        if iov.len() > libc::UIO_MAXIOV as usize {
            return None;
        }
        Some((iov, start))
    }

    /// Submits one read/write per request and waits for all; false when the used ring broke.
    #[cfg(target_os = "linux")]
    fn run_batch(
        &mut self,
        batch: &mut [(Request, Vec<libc::iovec>, u64)],
        ctx: &mut QueueCtx<'_>,
    ) -> bool {
        let fd = io_uring::types::Fd(self.backing.file.as_raw_fd());
        let Some(ring) = self.uring.as_mut() else {
            return false;
        };
        let mut results: Vec<Option<i32>> = vec![None; batch.len()];
        let batch_len = batch.len();
        for (i, (req, iov, off)) in batch.iter().enumerate() {
            let flags = if uring_punts(batch_len, Self::data_len(req)) {
                io_uring::squeue::Flags::ASYNC
            } else {
                io_uring::squeue::Flags::empty()
            };
            let entry = if req.kind == T_IN {
                io_uring::opcode::Readv::new(fd, iov.as_ptr(), iov.len() as u32)
                    .offset(*off)
                    .build()
            } else {
                io_uring::opcode::Writev::new(fd, iov.as_ptr(), iov.len() as u32)
                    .offset(*off)
                    .build()
            }
            .flags(flags)
            .user_data(i as u64);
            // SAFETY: the iovecs point into guest memory, mapped for the VM's lifetime, and
            // the iovec arrays live in `batch` until every completion of this batch was reaped
            // below, or, when the ring fails first, forever (`broken_uring`); the file
            // descriptor stays open (owned by `self.backing`).
            if unsafe { ring.submission().push(&entry) }.is_err() {
                results[i] = Some(-libc::EBUSY);
            }
        }
        let mut pending = results.iter().filter(|r| r.is_none()).count();
        // Waits that failed in a row with a transient error (interrupted, the kernel short of
        // resources, the completion queue full): retried, a bounded number of times.
        let mut transient = 0u32;
        while pending > 0 {
            let failed = match ring.submit_and_wait(1) {
                Ok(_) => {
                    transient = 0;
                    None
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) && transient < URING_RETRIES =>
                {
                    transient += 1;
                    if e.raw_os_error() != Some(libc::EINTR) {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    None
                }
                Err(e) => Some(e),
            };
            for cqe in ring.completion() {
                if let Some(r) = results.get_mut(cqe.user_data() as usize) {
                    if r.is_none() {
                        pending -= 1;
                    }
                    *r = Some(cqe.result());
                }
            }
            if let Some(e) = failed {
                // What is still in the kernel may yet complete. Its completions are reaped
                // from the (memory-mapped) queue for a while; what has not completed then
                // fails with an I/O error and is not done again (a write could land twice,
                // a read race its redo). The ring stays open and the iovecs are leaked, so
                // the kernel never reads freed memory.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
                while pending > 0 && std::time::Instant::now() < deadline {
                    for cqe in ring.completion() {
                        if let Some(r) = results.get_mut(cqe.user_data() as usize) {
                            if r.is_none() {
                                pending -= 1;
                            }
                            *r = Some(cqe.result());
                        }
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                log::error!(
                    "drive {}: io_uring: {e}; {pending} requests still in the kernel fail with an I/O error, later ones use pread/pwrite",
                    self.id
                );
                for r in results.iter_mut().filter(|r| r.is_none()) {
                    *r = Some(-libc::EIO);
                }
                if pending > 0 {
                    for b in batch.iter_mut() {
                        std::mem::forget(std::mem::take(&mut b.1));
                    }
                }
                self.broken_uring = self.uring.take();
                break;
            }
        }
        for (i, (req, _, _)) in batch.iter().enumerate() {
            let total = Self::data_len(req);
            let ok = results[i].is_some_and(|n| n >= 0 && n as u64 == total);
            let (status, written) = match (ok, req.kind) {
                (false, _) => (S_IOERR, 0),
                (true, T_IN) => {
                    self.stats.reads = self.stats.reads.wrapping_add(1);
                    self.stats.read_bytes = self.stats.read_bytes.wrapping_add(total);
                    (S_OK, total.min(u64::from(u32::MAX - 1)) as u32)
                }
                (true, _) => {
                    self.stats.writes = self.stats.writes.wrapping_add(1);
                    self.stats.write_bytes = self.stats.write_bytes.wrapping_add(total);
                    (S_OK, 0)
                }
            };
            if !self.complete(ctx, req, status, written) {
                return false;
            }
        }
        true
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // writeback toggling is not offered: nothing to write.
    }

    fn activate(&mut self, _features: u64, ctx: &mut QueueCtx<'_>) {
        if let Some(fd) = self.limiter_timer() {
            if let Err(e) = ctx.poller.add(fd, EventSet::IN, TOKEN_LIMITER) {
                log::warn!(
                    "drive {}: cannot watch the rate limiter timer: {e}",
                    self.id
                );
            }
        }
    }

    fn reset(&mut self, poller: &Poller) {
        if let Some(fd) = self.limiter_timer() {
            poller.remove(fd);
        }
    }

    fn process_backend(&mut self, token: u64, _events: EventSet, ctx: &mut QueueCtx<'_>) {
        if token == TOKEN_LIMITER {
            if let Some(l) = &mut self.limiter {
                l.timer_fired();
            }
            // One limiter for the drive: every queue may go on now.
            for q in 0..self.queue_sizes.len() {
                self.process_queue(q as u16, ctx);
            }
        }
    }

    fn process_queue(&mut self, index: u16, ctx: &mut QueueCtx<'_>) {
        let q = usize::from(index);
        if q >= self.queue_sizes.len() {
            return;
        }
        #[cfg(target_os = "linux")]
        if self.uring.is_some() {
            self.process_queue_uring(ctx, q);
            return;
        }
        self.process_queue_sync(ctx, q);
    }

    fn save(&self) -> DeviceState {
        DeviceState::Block(BlockState {
            id: self.id.clone(),
            read_only: self.read_only,
            sectors: self.backing.sectors,
            stats: self.stats,
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        let DeviceState::Block(s) = state else {
            return Err(DeviceStateError::kind("virtio-blk", state));
        };
        if s.id != self.id {
            return Err(DeviceStateError::differs(
                &self.id, "drive id", &s.id, &self.id,
            ));
        }
        if s.sectors != self.backing.sectors {
            return Err(DeviceStateError::differs(
                &self.id,
                "size in sectors",
                s.sectors,
                self.backing.sectors,
            ));
        }
        if s.read_only != self.read_only {
            return Err(DeviceStateError::differs(
                &self.id,
                "read-only setting",
                s.read_only,
                self.read_only,
            ));
        }
        self.stats = s.stats;
        Ok(())
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::virtio::testutil::*;
    use vmm_sys_util::tempfile::TempFile;

    const HDR: u64 = DATA;
    const BUF: u64 = DATA + 0x1000;
    const STATUS: u64 = DATA + 0x800;

    fn drive(
        bytes: u64,
        read_only: bool,
        limiter: Option<RateLimiterConfig>,
    ) -> (Driver, TempFile) {
        drive_with(bytes, read_only, limiter, IoEngine::Sync)
    }

    fn drive_with(
        bytes: u64,
        read_only: bool,
        limiter: Option<RateLimiterConfig>,
        engine: IoEngine,
    ) -> (Driver, TempFile) {
        let f = TempFile::new().unwrap();
        f.as_file().set_len(bytes).unwrap();
        let cfg = BlockConfig {
            id: "rootfs".into(),
            path: f.as_path().to_path_buf(),
            read_only,
            rate_limiter: limiter,
            engine,
            num_queues: 1,
        };
        (Driver::new(Box::new(Block::new(&cfg).unwrap())), f)
    }

    /// Offers request `kind` at `sector` with one data buffer of `len` bytes at BUF on
    /// descriptors from `first`; returns (status byte, used len).
    fn request(d: &mut Driver, first: u16, kind: u32, sector: u64, len: u32) -> Option<(u8, u32)> {
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        d.write(HDR, &hdr);
        d.write(STATUS, &[0xff]);
        let device_writes = matches!(kind, T_IN | T_GET_ID);
        if len > 0 {
            d.chain(
                0,
                first,
                &[
                    (HDR, 16, false),
                    (BUF, len, device_writes),
                    (STATUS, 1, true),
                ],
            );
        } else {
            d.chain(0, first, &[(HDR, 16, false), (STATUS, 1, true)]);
        }
        d.offer(0, first);
        let used = d.take_used(0);
        used.last().map(|&(_, l)| (d.read(STATUS, 1)[0], l))
    }

    #[test]
    fn write_read_flush_and_id() {
        let (mut d, f) = drive(1 << 20, false, None);
        // Capacity in the config space.
        let mut cap = [0u8; 8];
        d.dev.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 2048);
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        d.write(BUF, &pattern);
        assert_eq!(request(&mut d, 0, T_OUT, 8, 4096), Some((S_OK, 1)));
        assert_eq!(request(&mut d, 0, T_FLUSH, 0, 0), Some((S_OK, 1)));
        let on_disk = std::fs::read(f.as_path()).unwrap();
        assert_eq!(&on_disk[4096..8192], &pattern[..]);
        d.write(BUF, &[0u8; 4096]);
        assert_eq!(request(&mut d, 0, T_IN, 8, 4096), Some((S_OK, 4097)));
        assert_eq!(d.read(BUF, 4096), pattern);
        assert_eq!(request(&mut d, 0, T_GET_ID, 0, 20), Some((S_OK, 21)));
        assert_eq!(&d.read(BUF, 7), b"rootfs\0");
        assert!(d.irq.count() >= 4);
        // Unknown request types are unsupported, not fatal.
        assert_eq!(request(&mut d, 0, 99, 0, 0), Some((S_UNSUPP, 1)));
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn io_uring_engine_does_the_same() {
        // Kernels without io_uring, and qemu-user (the aarch64 unit tests), refuse its setup.
        if let Err(e) = io_uring::IoUring::new(8) {
            eprintln!("SKIPPED io_uring_engine_does_the_same: io_uring is not available here: {e}");
            return;
        }
        let (mut d, f) = drive_with(1 << 20, false, None, IoEngine::Uring);
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 13 % 251) as u8).collect();
        d.write(BUF, &pattern);
        // A write split over two descriptors, then flush, then reads.
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&T_OUT.to_le_bytes());
        hdr[8..16].copy_from_slice(&16u64.to_le_bytes());
        d.write(HDR, &hdr);
        d.chain(
            0,
            0,
            &[
                (HDR, 16, false),
                (BUF, 4096, false),
                (BUF + 4096, 4096, false),
                (STATUS, 1, true),
            ],
        );
        d.offer(0, 0);
        assert_eq!(d.take_used(0), vec![(0, 1)]);
        assert_eq!(d.read(STATUS, 1)[0], S_OK);
        assert_eq!(request(&mut d, 0, T_FLUSH, 0, 0), Some((S_OK, 1)));
        assert_eq!(
            &std::fs::read(f.as_path()).unwrap()[8192..16384],
            &pattern[..]
        );
        d.write(BUF, &[0u8; 8192]);
        assert_eq!(request(&mut d, 0, T_IN, 17, 4096), Some((S_OK, 4097)));
        assert_eq!(d.read(BUF, 4096), &pattern[512..4608]);
        // Out of range, unsupported and malformed requests behave as with pread/pwrite.
        assert_eq!(request(&mut d, 0, T_IN, 2047, 1024), Some((S_IOERR, 1)));
        assert_eq!(request(&mut d, 0, 99, 0, 0), Some((S_UNSUPP, 1)));
        assert!(!d.offer_malformed(0).is_empty());
        assert_eq!(request(&mut d, 0, T_GET_ID, 0, 20), Some((S_OK, 21)));
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn io_uring_batches_of_large_requests_go_to_its_workers_and_complete_alike() {
        // Only a batch of more than one request hands its large ones to the workers.
        assert!(!uring_punts(1, 1 << 20));
        assert!(!uring_punts(8, URING_ASYNC_BYTES - 1));
        assert!(uring_punts(2, URING_ASYNC_BYTES));
        if let Err(e) = io_uring::IoUring::new(8) {
            eprintln!(
                "SKIPPED io_uring_batches_of_large_requests: io_uring is not available here: {e}"
            );
            return;
        }
        let (mut d, f) = drive_with(1 << 20, false, None, IoEngine::Uring);
        const BIG: u32 = 128 * 1024;
        let hdr_at = |k: u64| 0x20_0000 + k * 0x100;
        let status_at = |k: u64| 0x20_0800 + k;
        let buf_at = |k: u64| 0x21_0000 + k * u64::from(BIG);
        let offer_batch = |d: &mut Driver, kind: u32, reqs: &[(u64, u32)]| {
            for (k, &(sector, len)) in reqs.iter().enumerate() {
                let k = k as u64;
                let mut hdr = [0u8; 16];
                hdr[0..4].copy_from_slice(&kind.to_le_bytes());
                hdr[8..16].copy_from_slice(&sector.to_le_bytes());
                d.write(hdr_at(k), &hdr);
                d.write(status_at(k), &[0xff]);
                let first = (k * 3) as u16;
                d.chain(
                    0,
                    first,
                    &[
                        (hdr_at(k), 16, false),
                        (buf_at(k), len, kind == T_IN),
                        (status_at(k), 1, true),
                    ],
                );
                d.make_available(0, first);
            }
            // One notification for the whole batch.
            d.notify(0);
            let mut used = d.take_used(0);
            used.sort();
            used
        };
        // Two large writes and a small one, in one batch.
        let data: Vec<Vec<u8>> = (0..3u32)
            .map(|k| {
                (0..BIG)
                    .map(|i| (i.wrapping_mul(k + 3) % 251) as u8)
                    .collect()
            })
            .collect();
        for (k, v) in data.iter().enumerate() {
            d.write(buf_at(k as u64), v);
        }
        let writes = [(0, BIG), (512, BIG), (1024, 4096)];
        assert_eq!(
            offer_batch(&mut d, T_OUT, &writes),
            vec![(0, 1), (3, 1), (6, 1)]
        );
        for k in 0..3 {
            assert_eq!(d.read(status_at(k), 1)[0], S_OK, "write {k}");
        }
        let on_disk = std::fs::read(f.as_path()).unwrap();
        assert_eq!(&on_disk[..BIG as usize], &data[0][..]);
        assert_eq!(&on_disk[512 * 512..512 * 512 + BIG as usize], &data[1][..]);
        assert_eq!(&on_disk[1024 * 512..1024 * 512 + 4096], &data[2][..4096]);
        // The same back as one batch of reads, into cleared buffers.
        for k in 0..3 {
            d.write(buf_at(k), &vec![0u8; BIG as usize]);
        }
        assert_eq!(
            offer_batch(&mut d, T_IN, &writes),
            vec![(0, BIG + 1), (3, BIG + 1), (6, 4096 + 1)]
        );
        assert_eq!(d.read(buf_at(0), BIG as usize), data[0]);
        assert_eq!(d.read(buf_at(1), BIG as usize), data[1]);
        assert_eq!(d.read(buf_at(2), 4096), &data[2][..4096]);
    }

    #[test]
    fn out_of_range_and_read_only_are_refused() {
        let (mut d, f) = drive(1 << 20, true, None);
        let mut feats = [0u8; 4];
        d.dev.write(0x14, &0u32.to_le_bytes());
        d.dev.read(0x10, &mut feats);
        assert_ne!(u32::from_le_bytes(feats) as u64 & F_RO, 0, "RO offered");
        d.write(BUF, &[0xaa; 512]);
        assert_eq!(request(&mut d, 0, T_OUT, 0, 512), Some((S_IOERR, 1)));
        assert_eq!(
            request(&mut d, 0, T_WRITE_ZEROES, 0, 16),
            Some((S_IOERR, 1))
        );
        assert!(std::fs::read(f.as_path()).unwrap().iter().all(|&b| b == 0));
        // Reads past the end, and a sector number that overflows.
        assert_eq!(request(&mut d, 0, T_IN, 2047, 1024), Some((S_IOERR, 1)));
        assert_eq!(
            request(&mut d, 0, T_IN, u64::MAX / 256, 512),
            Some((S_IOERR, 1))
        );
        assert_eq!(request(&mut d, 0, T_IN, 2047, 512), Some((S_OK, 513)));
    }

    #[test]
    fn discard_and_write_zeroes_clear_ranges() {
        let (mut d, f) = drive(1 << 20, false, None);
        std::fs::write(f.as_path(), vec![0x5au8; 1 << 20]).unwrap();
        // One segment: sectors 8..16, then write-zeroes sectors 100..101.
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&8u64.to_le_bytes());
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        d.write(BUF, &seg);
        assert_eq!(request(&mut d, 0, T_DISCARD, 0, 16), Some((S_OK, 1)));
        seg[0..8].copy_from_slice(&100u64.to_le_bytes());
        seg[8..12].copy_from_slice(&1u32.to_le_bytes());
        d.write(BUF, &seg);
        assert_eq!(request(&mut d, 0, T_WRITE_ZEROES, 0, 16), Some((S_OK, 1)));
        let disk = std::fs::read(f.as_path()).unwrap();
        assert_eq!(disk.len(), 1 << 20, "size kept");
        assert!(disk[4096..8192].iter().all(|&b| b == 0));
        assert!(disk[51200..51712].iter().all(|&b| b == 0));
        assert_eq!(disk[4095], 0x5a);
        assert_eq!(disk[8192], 0x5a);
        assert_eq!(disk[51712], 0x5a);
        // A segment beyond the end, and a ragged segment list.
        seg[0..8].copy_from_slice(&2047u64.to_le_bytes());
        seg[8..12].copy_from_slice(&2u32.to_le_bytes());
        d.write(BUF, &seg);
        assert_eq!(request(&mut d, 0, T_DISCARD, 0, 16), Some((S_IOERR, 1)));
        assert_eq!(request(&mut d, 0, T_DISCARD, 0, 15), Some((S_IOERR, 1)));
    }

    #[test]
    fn malformed_descriptors_neither_panic_nor_hang() {
        let (mut d, f) = drive(1 << 20, false, None);
        let used = d.offer_malformed(0);
        assert!(!used.is_empty());
        // The device still works afterwards.
        d.write(BUF, &[1u8; 512]);
        assert_eq!(request(&mut d, 0, T_OUT, 0, 512), Some((S_OK, 1)));
        assert_eq!(std::fs::read(f.as_path()).unwrap()[0], 1);
    }

    #[test]
    fn rate_limiter_holds_requests_until_tokens_return() {
        let limiter = RateLimiterConfig {
            bandwidth: None,
            ops: Some(crate::rate_limiter::TokenBucketConfig {
                size: 2,
                one_time_burst: 0,
                refill_time: 200,
            }),
        };
        let (mut d, _f) = drive(1 << 20, false, Some(limiter));
        for i in 0..3u16 {
            d.chain(
                0,
                i * 2,
                &[(HDR, 16, false), (STATUS + u64::from(i), 1, true)],
            );
            d.make_available(0, i * 2);
        }
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&T_FLUSH.to_le_bytes());
        d.write(HDR, &hdr);
        d.notify(0);
        assert_eq!(d.take_used(0).len(), 2, "two ops allowed at once");
        // The third completes when the limiter's timer fires (one token: 100 ms).
        let mut waited = 0;
        while d.used_idx(0) < 3 && waited < 50 {
            d.dev.run_ready(100);
            waited += 1;
        }
        assert_eq!(d.take_used(0).len(), 1);
    }

    /// Two request queues: offered with VIRTIO_BLK_F_MQ and `num_queues` 2, each request
    /// completes on the queue it came on, with both engines; 0 or 17 queues are refused.
    #[test]
    fn requests_complete_on_the_queue_they_came_on() {
        for engine in [IoEngine::Sync, IoEngine::Uring] {
            let f = TempFile::new().unwrap();
            f.as_file().set_len(1 << 20).unwrap();
            let cfg = BlockConfig {
                id: "mq".into(),
                path: f.as_path().to_path_buf(),
                read_only: false,
                rate_limiter: None,
                engine,
                num_queues: 2,
            };
            let blk = match Block::new(&cfg) {
                Ok(b) => b,
                Err(BlockError::Uring(..)) => continue, // no io_uring here: the Sync pass ran
                Err(e) => panic!("{e}"),
            };
            assert_ne!(blk.features() & F_MQ, 0);
            let mut d = Driver::new(Box::new(blk));
            let mut nq = [0u8; 2];
            d.dev.read(0x100 + 34, &mut nq);
            assert_eq!(u16::from_le_bytes(nq), 2);
            // A write on queue 1, read back on queue 0.
            let mut hdr = [0u8; 16];
            hdr[0..4].copy_from_slice(&T_OUT.to_le_bytes());
            hdr[8..16].copy_from_slice(&4u64.to_le_bytes());
            d.write(HDR, &hdr);
            d.write(BUF, &[0x5a; 512]);
            d.chain(
                1,
                0,
                &[(HDR, 16, false), (BUF, 512, false), (STATUS, 1, true)],
            );
            d.offer(1, 0);
            assert_eq!(d.take_used(1), vec![(0, 1)], "{engine:?}");
            assert!(d.take_used(0).is_empty());
            assert_eq!(d.read(STATUS, 1)[0], S_OK);
            d.write(BUF, &[0; 512]);
            assert_eq!(request(&mut d, 0, T_IN, 4, 512), Some((S_OK, 513)));
            assert_eq!(d.read(BUF, 512), vec![0x5a; 512]);
            assert!(d.take_used(1).is_empty());
        }
        for n in [0, MAX_QUEUES + 1] {
            let f = TempFile::new().unwrap();
            let cfg = BlockConfig {
                id: "mq".into(),
                path: f.as_path().to_path_buf(),
                read_only: false,
                rate_limiter: None,
                engine: IoEngine::Sync,
                num_queues: n,
            };
            assert!(matches!(Block::new(&cfg), Err(BlockError::Queues(..))));
        }
        // One queue: no VIRTIO_BLK_F_MQ.
        let (d, _f) = drive(1 << 20, false, None);
        let mut feats = [0u8; 4];
        let mut dev = d.dev;
        dev.write(0x14, &0u32.to_le_bytes());
        dev.read(0x10, &mut feats);
        assert_eq!(u64::from(u32::from_le_bytes(feats)) & F_MQ, 0);
    }

    /// Write-zeroes goes through the bandwidth limiter for the bytes it zeroes (wave 1 charged
    /// it nothing: a guest could bypass a limit with it); a discard costs only its op.
    #[test]
    fn write_zeroes_is_charged_its_bytes_and_discard_is_not() {
        let limiter = RateLimiterConfig {
            bandwidth: Some(crate::rate_limiter::TokenBucketConfig {
                size: 8192,
                one_time_burst: 0,
                refill_time: 100,
            }),
            ops: None,
        };
        let (mut d, _f) = drive(1 << 20, false, Some(limiter));
        let seg = |sector: u64, num: u32| {
            let mut s = [0u8; 16];
            s[0..8].copy_from_slice(&sector.to_le_bytes());
            s[8..12].copy_from_slice(&num.to_le_bytes());
            s
        };
        // Discards of 512 KiB each: free for the bandwidth bucket.
        d.write(BUF, &seg(0, 1024));
        for _ in 0..3 {
            assert_eq!(request(&mut d, 0, T_DISCARD, 0, 16), Some((S_OK, 1)));
        }
        // 8 KiB of write-zeroes empties the 8 KiB bucket: the next waits for its refill.
        d.write(BUF, &seg(0, 16));
        assert_eq!(request(&mut d, 0, T_WRITE_ZEROES, 0, 16), Some((S_OK, 1)));
        assert_eq!(request(&mut d, 0, T_WRITE_ZEROES, 0, 16), None, "held back");
        let mut waited = 0;
        while d.used_idx(0) < 5 && waited < 50 {
            d.dev.run_ready(100);
            waited += 1;
        }
        assert_eq!(d.used_idx(0), 5, "released when the bucket refilled");
    }

    /// A FIFO as a new backing file is refused at once: wave 1's blocking open of a read-only
    /// drive waited for a writer that never came, holding the device.
    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = TempFile::new().unwrap();
        let p = dir.as_path().with_extension("fifo");
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path only.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for read_only in [true, false] {
            let e = Block::open_backing("blk", &p, read_only).err().unwrap();
            assert!(e.to_string().contains("not a regular file"), "{e}");
        }
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn backing_file_can_change_and_state_is_checked() {
        let (mut d, _f) = drive(1 << 20, false, None);
        let other = TempFile::new().unwrap();
        other.as_file().set_len(2 << 20).unwrap();
        let state = d.dev.save();
        d.dev.with_device(|dev, _| {
            let blk = dev.as_any_mut().downcast_mut::<Block>().unwrap();
            let new = Block::open_backing("blk", other.as_path(), false).unwrap();
            blk.swap_backing(new).flush().unwrap();
            assert_eq!(blk.sectors(), 4096);
            assert!(Block::open_backing("blk", Path::new("/nonexistent/x"), false).is_err());
        });
        d.dev.config_changed();
        let mut gen_ = [0u8; 4];
        d.dev.read(0xfc, &mut gen_);
        assert_eq!(u32::from_le_bytes(gen_), 1);
        // The old state no longer fits the resized drive.
        d.dev.with_device(|dev, _| {
            let e = dev.restore(&state.device).unwrap_err();
            assert!(
                matches!(
                    e,
                    DeviceStateError::Differs {
                        what: "size in sectors",
                        ..
                    }
                ),
                "{e}"
            );
        });
    }
}
