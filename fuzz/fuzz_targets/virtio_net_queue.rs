//! Any bytes as a virtio-net queue (see common.rs); a datagram socket pair stands in for the
//! TAP, with a frame waiting on it so the receive path runs too.
#![no_main]

mod common;

use std::os::unix::net::UnixDatagram;

use devices::virtio::net::{DatagramBackend, Net};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((a, b)) = UnixDatagram::pair() else {
        return;
    };
    let _ = a.set_nonblocking(true);
    let _ = b.set_nonblocking(true);
    let _ = b.send(&data[..data.len().min(1500)]);
    if let Ok(net) = Net::new(
        "fuzz",
        Box::new(DatagramBackend(a)),
        Some([2, 0, 0, 0, 0, 1]),
        None,
        None,
    ) {
        common::run(Box::new(net), data);
    }
});
