//! The OS layer on Linux: epoll, eventfd and timerfd (through vmm-sys-util).

use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::epoll::{ControlOperation, Epoll};
pub use vmm_sys_util::epoll::{EpollEvent as Ready, EventSet};
pub use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
pub use vmm_sys_util::timerfd::TimerFd;

/// A set of descriptors to wait on (an epoll set); clones share it.
pub struct Poller(std::sync::Arc<Epoll>);

impl Poller {
    /// A new, empty set.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self(std::sync::Arc::new(Epoll::new()?)))
    }

    /// Watches `fd` for `events`, reported as `token`.
    pub fn add(&self, fd: RawFd, events: EventSet, token: u64) -> std::io::Result<()> {
        self.0
            .ctl(ControlOperation::Add, fd, Ready::new(events, token))
    }

    /// Changes what `fd` is watched for.
    pub fn modify(&self, fd: RawFd, events: EventSet, token: u64) -> std::io::Result<()> {
        self.0
            .ctl(ControlOperation::Modify, fd, Ready::new(events, token))
    }

    /// Stops watching `fd` (no error if it was not watched).
    pub fn remove(&self, fd: RawFd) {
        let _ = self.0.ctl(ControlOperation::Delete, fd, Ready::default());
    }

    /// Waits up to `timeout_ms` (-1: forever) for events.
    pub fn wait(&self, timeout_ms: i32, out: &mut [Ready]) -> std::io::Result<usize> {
        loop {
            match self.0.wait(timeout_ms, out) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    /// A second handle on the same set (for the worker thread).
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self(self.0.clone()))
    }
}

/// A timer whose read never blocks: a worker that saw it ready may find it re-armed (a limiter
/// swapped through the API) and must not sleep on it holding the device lock.
pub fn nonblocking_timer() -> std::io::Result<TimerFd> {
    let t = TimerFd::new()?;
    super::set_nonblocking(&t)?;
    Ok(t)
}

impl AsRawFd for Poller {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Fills `buf` from the kernel's random source (getrandom).
pub fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`, which is valid
        // for writes; getrandom writes at most that many bytes.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            done += n as usize;
        }
    }
    Ok(())
}
