//! The OS layer on macOS: kqueue for the poller and the timer, a pipe for the event. The names
//! and methods are those of the Linux side (vmm-sys-util's), so devices build unchanged.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

/// Accepted where Linux takes eventfd flags; the macOS event is always non-blocking.
pub const EFD_NONBLOCK: i32 = 0o4000;

/// What a descriptor is watched for, and what happened to it (epoll's bits, so that the two
/// sides read alike).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct EventSet(u32);

impl EventSet {
    /// Readable.
    pub const IN: Self = Self(0x001);
    /// Writable.
    pub const OUT: Self = Self(0x004);
    /// An error on the descriptor.
    pub const ERROR: Self = Self(0x008);
    /// The peer hung up.
    pub const HANG_UP: Self = Self(0x010);
    /// The peer closed its writing side.
    pub const READ_HANG_UP: Self = Self(0x2000);
    /// Report each change once (kqueue's `EV_CLEAR`).
    pub const EDGE_TRIGGERED: Self = Self(1 << 31);

    /// No bits.
    pub const fn empty() -> Self {
        Self(0)
    }

    /// Every bit of `other` is set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Some bit of `other` is set.
    pub const fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }

    /// The bits.
    pub const fn bits(self) -> u32 {
        self.0
    }
}

impl std::ops::BitOr for EventSet {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for EventSet {
    fn bitor_assign(&mut self, rhs: Self) {
        self.0 |= rhs.0;
    }
}

/// One readiness report: what happened, and the token the descriptor was added with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ready {
    events: EventSet,
    data: u64,
}

impl Ready {
    /// A report of `events` for `data`.
    pub fn new(events: EventSet, data: u64) -> Self {
        Self { events, data }
    }

    /// The token.
    pub fn data(&self) -> u64 {
        self.data
    }

    /// What happened.
    pub fn event_set(&self) -> EventSet {
        self.events
    }
}

fn kqueue() -> std::io::Result<OwnedFd> {
    // SAFETY: kqueue takes no arguments; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::kqueue() };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: F_SETFD on the descriptor just created; no memory is passed.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(fd)
}

fn change(
    ident: usize,
    filter: i16,
    flags: u16,
    fflags: u32,
    data: isize,
    udata: u64,
) -> libc::kevent {
    libc::kevent {
        ident,
        filter,
        flags,
        fflags,
        data,
        udata: udata as *mut libc::c_void,
    }
}

/// Applies one change to kqueue `kq`.
fn apply(kq: RawFd, ev: &libc::kevent) -> std::io::Result<()> {
    // SAFETY: one valid change record in, no event list out, no timeout: kevent only reads
    // `ev` for the duration of the call.
    let rc = unsafe { libc::kevent(kq, ev, 1, std::ptr::null_mut(), 0, std::ptr::null()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Waits on kqueue `kq` for up to `out.len()` events, `timeout` (None: forever).
fn collect(
    kq: RawFd,
    out: &mut [libc::kevent],
    timeout: Option<Duration>,
) -> std::io::Result<usize> {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(t.subsec_nanos() as i32),
    });
    let tsp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    let n = out.len().min(i32::MAX as usize) as i32;
    loop {
        // SAFETY: no changes in; `out` has room for `n` records that kevent writes; `tsp` is
        // null or points at a timespec alive for the call.
        let rc = unsafe { libc::kevent(kq, std::ptr::null(), 0, out.as_mut_ptr(), n, tsp) };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A set of descriptors to wait on (a kqueue); clones share it.
pub struct Poller(Arc<OwnedFd>);

impl Poller {
    /// A new, empty set.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self(Arc::new(kqueue()?)))
    }

    /// Watches `fd` for `events`, reported as `token`.
    pub fn add(&self, fd: RawFd, events: EventSet, token: u64) -> std::io::Result<()> {
        let mut flags = libc::EV_ADD;
        if events.contains(EventSet::EDGE_TRIGGERED) {
            flags |= libc::EV_CLEAR;
        }
        let kq = self.0.as_raw_fd();
        if events.contains(EventSet::IN) {
            apply(
                kq,
                &change(fd as usize, libc::EVFILT_READ, flags, 0, 0, token),
            )?;
        }
        if events.contains(EventSet::OUT) {
            apply(
                kq,
                &change(fd as usize, libc::EVFILT_WRITE, flags, 0, 0, token),
            )?;
        }
        Ok(())
    }

    /// Changes what `fd` is watched for.
    pub fn modify(&self, fd: RawFd, events: EventSet, token: u64) -> std::io::Result<()> {
        self.remove(fd);
        self.add(fd, events, token)
    }

    /// Stops watching `fd` (no error if it was not watched).
    pub fn remove(&self, fd: RawFd) {
        let kq = self.0.as_raw_fd();
        for filter in [libc::EVFILT_READ, libc::EVFILT_WRITE] {
            let _ = apply(kq, &change(fd as usize, filter, libc::EV_DELETE, 0, 0, 0));
        }
    }

    /// Waits up to `timeout_ms` (-1: forever) for events.
    pub fn wait(&self, timeout_ms: i32, out: &mut [Ready]) -> std::io::Result<usize> {
        let timeout = u64::try_from(timeout_ms).ok().map(Duration::from_millis);
        // SAFETY: kevent records are plain data; all-zero is a valid (empty) record.
        let mut raw = vec![unsafe { std::mem::zeroed::<libc::kevent>() }; out.len()];
        let n = collect(self.0.as_raw_fd(), &mut raw, timeout)?;
        for (o, k) in out.iter_mut().zip(&raw[..n]) {
            let mut events = match k.filter {
                libc::EVFILT_WRITE => EventSet::OUT,
                _ => EventSet::IN,
            };
            if k.flags & libc::EV_EOF != 0 {
                events |= EventSet::HANG_UP | EventSet::READ_HANG_UP;
            }
            if k.flags & libc::EV_ERROR != 0 {
                events |= EventSet::ERROR;
            }
            *o = Ready::new(events, k.udata as u64);
        }
        Ok(n)
    }

    /// A second handle on the same set (for the worker thread).
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self(self.0.clone()))
    }
}

impl AsRawFd for Poller {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// A wake-up one thread writes and another waits on: a non-blocking pipe. Readable while
/// written and not yet read; the count is not kept (tern uses it as a signal).
#[derive(Debug)]
pub struct EventFd {
    read: OwnedFd,
    write: OwnedFd,
}

impl EventFd {
    /// A new event (`_flags` as Linux's eventfd takes them: it is always non-blocking here).
    pub fn new(_flags: i32) -> std::io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into the array it is given.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors are fresh and owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        for fd in [&read, &write] {
            super::set_nonblocking(fd)?;
            // SAFETY: F_SETFD on a descriptor we own; no memory is passed.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        Ok(Self { read, write })
    }

    /// Signals the event (`_v` is not kept). A full pipe is already readable: not an error.
    pub fn write(&self, _v: u64) -> std::io::Result<()> {
        let b = 1u8;
        // SAFETY: writes one byte from a local into the pipe we own.
        let rc = unsafe { libc::write(self.write.as_raw_fd(), (&b as *const u8).cast(), 1) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Takes every pending signal and says how many there were; `WouldBlock` if none.
    pub fn read(&self) -> std::io::Result<u64> {
        let mut total = 0u64;
        let mut buf = [0u8; 64];
        loop {
            // SAFETY: reads at most `buf.len()` bytes into `buf`.
            let rc =
                unsafe { libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if rc > 0 {
                total += rc as u64;
                continue;
            }
            let e = std::io::Error::last_os_error();
            if rc < 0 && e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if total > 0 {
                return Ok(total);
            }
            return Err(if rc == 0 {
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof)
            } else {
                e
            });
        }
    }

    /// A second handle on the same event.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            read: self.read.try_clone()?,
            write: self.write.try_clone()?,
        })
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }
}

/// The identifier of the one timer in a [`TimerFd`]'s kqueue.
const TIMER_IDENT: usize = 1;

/// A timer that is a descriptor: a kqueue holding one `EVFILT_TIMER`, readable (in a
/// [`Poller`]) once it has fired. Reading never blocks.
#[derive(Debug)]
pub struct TimerFd {
    kq: OwnedFd,
}

impl TimerFd {
    /// A disarmed timer.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self { kq: kqueue()? })
    }

    /// Fires after `dur`, then every `interval` if given (kqueue's periodic timer fires every
    /// `interval` from now: tern's callers always pass `dur` = `interval`). A zero `dur`
    /// disarms it.
    pub fn reset(&mut self, dur: Duration, interval: Option<Duration>) -> std::io::Result<()> {
        let kq = self.kq.as_raw_fd();
        let _ = apply(
            kq,
            &change(TIMER_IDENT, libc::EVFILT_TIMER, libc::EV_DELETE, 0, 0, 0),
        );
        // What had fired and was not read yet goes too.
        let _ = self.wait();
        if dur.is_zero() {
            return Ok(());
        }
        let (every, flags) = match interval {
            Some(i) if !i.is_zero() => (i, libc::EV_ADD),
            _ => (dur, libc::EV_ADD | libc::EV_ONESHOT),
        };
        let ns = isize::try_from(every.as_nanos()).unwrap_or(isize::MAX);
        apply(
            kq,
            &change(
                TIMER_IDENT,
                libc::EVFILT_TIMER,
                flags,
                libc::NOTE_NSECONDS,
                ns,
                0,
            ),
        )
    }

    /// How many times it fired since the last call; `WouldBlock` if it has not.
    pub fn wait(&mut self) -> std::io::Result<u64> {
        // SAFETY: kevent records are plain data; all-zero is a valid (empty) record.
        let mut out = [unsafe { std::mem::zeroed::<libc::kevent>() }];
        match collect(self.kq.as_raw_fd(), &mut out, Some(Duration::ZERO))? {
            0 => Err(std::io::Error::from(std::io::ErrorKind::WouldBlock)),
            _ => Ok(u64::try_from(out[0].data).unwrap_or(1).max(1)),
        }
    }
}

impl AsRawFd for TimerFd {
    fn as_raw_fd(&self) -> RawFd {
        self.kq.as_raw_fd()
    }
}

/// A timer whose read never blocks (every [`TimerFd`] here).
pub fn nonblocking_timer() -> std::io::Result<TimerFd> {
    TimerFd::new()
}

/// Fills `buf` from the kernel's random source (getentropy, 256 bytes at a time).
pub fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    for chunk in buf.chunks_mut(256) {
        // SAFETY: the pointer and length describe `chunk`, valid for writes and at most the
        // 256 bytes getentropy accepts.
        if unsafe { libc::getentropy(chunk.as_mut_ptr().cast(), chunk.len()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
