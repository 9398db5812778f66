//! Any bytes as a virtio-net queue (see common.rs); datagram socket pairs stand in for the
//! TAP's queues, with a frame waiting on each so the receive path runs too. Bit 6 of the first
//! byte gives the device two queue pairs and the control queue (`VIRTIO_NET_F_MQ`), which the
//! selector can then pick.
#![no_main]

mod common;

use std::os::unix::net::UnixDatagram;

use devices::virtio::net::{DatagramBackend, Net, NetBackend};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let pairs = if data.first().is_some_and(|b| b & 0x40 != 0) {
        2
    } else {
        1
    };
    let mut backends: Vec<Box<dyn NetBackend>> = Vec::new();
    let mut hosts = Vec::new();
    for _ in 0..pairs {
        let Ok((a, b)) = UnixDatagram::pair() else {
            return;
        };
        let _ = a.set_nonblocking(true);
        let _ = b.set_nonblocking(true);
        let _ = b.send(&data[..data.len().min(1500)]);
        backends.push(Box::new(DatagramBackend(a)));
        hosts.push(b);
    }
    if let Ok(net) = Net::with_queue_pairs("fuzz", backends, Some([2, 0, 0, 0, 0, 1]), None, None) {
        common::run(Box::new(net), data);
    }
});
