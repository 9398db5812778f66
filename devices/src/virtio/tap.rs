//! A Linux TAP device as virtio-net's back end (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`): frames
//! carry the 12-byte virtio-net header, and the guest's offloads become `TUNSETOFFLOAD`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};

use super::net::{NetBackend, VNET_HDR_LEN};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const IFF_TAP: i16 = 0x0002;
const IFF_MULTI_QUEUE: i16 = 0x0100;
const IFF_ATTACH_QUEUE: i16 = 0x0200;
const IFF_DETACH_QUEUE: i16 = 0x0400;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

/// A TAP device.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (creating if needed) the TAP `name`, non-blocking, with virtio-net headers.
    pub fn open(name: &str) -> std::io::Result<Self> {
        Self::open_with(name, 0)
    }

    /// Opens `n` queues of the multi-queue TAP `name` (`IFF_MULTI_QUEUE`; created if needed),
    /// one descriptor each, for a virtio-net device with `n` queue pairs. With `n` = 1 it is
    /// [`Tap::open`] (a TAP made without `IFF_MULTI_QUEUE` opens only that way).
    pub fn open_queues(name: &str, n: usize) -> std::io::Result<Vec<Self>> {
        if n <= 1 {
            return Ok(vec![Self::open(name)?]);
        }
        (0..n)
            .map(|_| Self::open_with(name, IFF_MULTI_QUEUE))
            .collect()
    }

    fn open_with(name: &str, extra: i16) -> std::io::Result<Self> {
        if name.is_empty() || name.len() >= 16 || name.contains('\0') {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a TAP name is 1 to 15 bytes",
            ));
        }
        // SAFETY: open(2) with a NUL-terminated constant path; the result is checked.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        ifr[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | extra).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a 40-byte `struct ifreq`, which `ifr` is.
        if unsafe { libc::ioctl(fd, TUNSETIFF as _, ifr.as_mut_ptr()) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hdr = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
        if unsafe { libc::ioctl(fd, TUNSETVNETHDRSZ as _, &hdr) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let end = ifr[..16].iter().position(|&b| b == 0).unwrap_or(16);
        Ok(Self {
            file,
            name: String::from_utf8_lossy(&ifr[..end]).into_owned(),
        })
    }

    /// Makes the TAP outlive this process (for tests and tools: `ip tuntap add`).
    pub fn persist(&self) -> std::io::Result<()> {
        // SAFETY: TUNSETPERSIST takes an integer argument by value.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETPERSIST as _,
                1 as libc::c_ulong,
            )
        } < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Attaches this queue to its multi-queue TAP, or detaches it: the kernel spreads incoming
    /// frames over the attached queues only.
    pub fn set_queue_attached(&self, attached: bool) -> std::io::Result<()> {
        let mut ifr = [0u8; 40];
        let flags = if attached {
            IFF_ATTACH_QUEUE
        } else {
            IFF_DETACH_QUEUE
        };
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETQUEUE reads a 40-byte `struct ifreq` (its flags), which `ifr` is.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETQUEUE as _, ifr.as_mut_ptr()) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD as _,
                flags as libc::c_ulong,
            )
        } < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Read for Tap {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }
}

impl Write for Tap {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl NetBackend for Tap {
    fn raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
    fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        Tap::set_offload(self, flags)
    }
    fn set_enabled(&self, enabled: bool) -> std::io::Result<()> {
        self.set_queue_attached(enabled)
    }
}
