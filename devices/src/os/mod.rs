//! tern's small layer over the host OS: the event primitives devices and their workers wait on,
//! so that the devices crate builds for another OS.
//!
//! - [`Poller`]: a set of descriptors to wait on, each with a token (epoll on Linux, kqueue on
//!   macOS), and [`EventSet`]/[`Ready`] for what is asked and what happened;
//! - [`EventFd`]: a wake-up a thread writes and another waits on (eventfd on Linux, a pipe on
//!   macOS); on Linux it is vmm-sys-util's, because KVM takes it as an ioeventfd or irqfd;
//! - [`TimerFd`]: a timer that is a descriptor (timerfd on Linux, a kqueue with one timer on
//!   macOS), never blocking its reader.
//!
//! Both sides offer the same names and methods; the Linux one is the reference.

use std::os::fd::AsRawFd;

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub use linux::*;

#[cfg(target_os = "macos")]
mod macos;
#[cfg(target_os = "macos")]
pub use macos::*;

/// Puts `fd` in blocking mode (clears `O_NONBLOCK`): a file opened non-blocking only so that
/// its open could not hang, and then used for blocking I/O.
pub fn set_blocking(fd: &impl AsRawFd) -> std::io::Result<()> {
    set_flag(fd, libc::O_NONBLOCK, false)
}

/// Puts `fd` in non-blocking mode.
pub fn set_nonblocking(fd: &impl AsRawFd) -> std::io::Result<()> {
    set_flag(fd, libc::O_NONBLOCK, true)
}

fn set_flag(fd: &impl AsRawFd, flag: libc::c_int, on: bool) -> std::io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: F_GETFL on a descriptor the caller keeps open for the call; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let new = if on { flags | flag } else { flags & !flag };
    // SAFETY: F_SETFL with the flags just read, one changed; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, new) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_eventfd_wakes_the_poller_with_its_token() {
        let p = Poller::new().unwrap();
        let e = EventFd::new(EFD_NONBLOCK).unwrap();
        p.add(e.as_raw_fd(), EventSet::IN, 7).unwrap();
        let mut out = [Ready::default(); 4];
        assert_eq!(p.wait(0, &mut out).unwrap(), 0);
        e.write(1).unwrap();
        let n = p.wait(1000, &mut out).unwrap();
        assert_eq!(n, 1);
        assert_eq!(out[0].data(), 7);
        assert!(out[0].event_set().contains(EventSet::IN));
        assert!(e.read().is_ok());
        // Drained: a non-blocking read says it would block.
        assert_eq!(e.read().unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
        p.remove(e.as_raw_fd());
        e.write(1).unwrap();
        assert_eq!(p.wait(0, &mut out).unwrap(), 0);
    }

    #[test]
    fn a_timer_fires_once_and_never_blocks_its_reader() {
        let p = Poller::new().unwrap();
        let mut t = nonblocking_timer().unwrap();
        p.add(t.as_raw_fd(), EventSet::IN, 3).unwrap();
        assert!(t.wait().is_err(), "not armed: nothing to read, no blocking");
        t.reset(Duration::from_millis(5), None).unwrap();
        let mut out = [Ready::default(); 4];
        assert_eq!(p.wait(5000, &mut out).unwrap(), 1);
        assert_eq!(out[0].data(), 3);
        assert!(t.wait().unwrap() >= 1);
        assert_eq!(
            p.wait(50, &mut out).unwrap(),
            0,
            "a one-shot timer fired again"
        );
    }

    #[test]
    fn blocking_mode_can_be_set_and_cleared() {
        let e = EventFd::new(EFD_NONBLOCK).unwrap();
        let flags = |fd: &EventFd| {
            // SAFETY: F_GETFL on a descriptor `fd` owns.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) }
        };
        set_blocking(&e).unwrap();
        assert_eq!(flags(&e) & libc::O_NONBLOCK, 0);
        set_nonblocking(&e).unwrap();
        assert_ne!(flags(&e) & libc::O_NONBLOCK, 0);
    }
}
