//! tern's small layer over the host OS: the few descriptor calls that devices and the VMM share.
//! (The event primitives — epoll, eventfd, timerfd — are the next to move here, so that another
//! OS can supply its own.)

use std::os::fd::AsRawFd;

/// Puts `fd` in blocking mode (clears `O_NONBLOCK`): a file opened non-blocking only so that
/// its open could not hang, and then used for blocking I/O.
pub fn set_blocking(fd: &impl AsRawFd) -> std::io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: F_GETFL on a descriptor the caller keeps open for the call; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with the flags just read, less O_NONBLOCK; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
