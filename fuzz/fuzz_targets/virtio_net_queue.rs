//! Any bytes as a virtio-net queue (see common.rs); a datagram socket pair stands in for the
//! TAP, with a frame waiting on it so the receive path runs too.
#![no_main]

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;

use devices::virtio::net::{Net, NetBackend};
use libfuzzer_sys::fuzz_target;

struct Sock(UnixDatagram);
impl Read for Sock {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.0.recv(b)
    }
}
impl Write for Sock {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.send(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl NetBackend for Sock {
    fn raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok((a, b)) = UnixDatagram::pair() else { return };
    let _ = a.set_nonblocking(true);
    let _ = b.set_nonblocking(true);
    let _ = b.send(&data[..data.len().min(1500)]);
    if let Ok(net) = Net::new("fuzz", Box::new(Sock(a)), Some([2, 0, 0, 0, 0, 1]), None, None) {
        common::run(Box::new(net), data);
    }
});
