//! Shared driver for the virtio queue fuzz targets: any bytes become one queue's descriptor
//! table, buffer contents and the heads offered, through the devices crate's own fake driver
//! (`devices::virtio::testutil`, the one the unit tests use). The device must neither panic
//! nor hang.
//!
//! Input layout: [selector: 1][descriptor table: 16 * 16][buffer bytes: 2048][heads...]. The
//! selector's low bits pick the queue; bit 7 set declines `VIRTIO_RING_F_EVENT_IDX`, so both
//! notification schemes are fuzzed.

#![allow(dead_code)]

use devices::virtio::testutil::{DATA, Driver, QSIZE, ring_base};
use devices::virtio::{VIRTIO_RING_F_EVENT_IDX, VirtioDevice};

/// Brings `device` up, lays the input out in guest memory and offers the chosen heads.
pub fn run(device: Box<dyn VirtioDevice>, data: &[u8]) {
    let nq = device.queue_max_sizes().len();
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let q = usize::from(sel & 0x7f) % nq;
    let mask = if sel & 0x80 != 0 {
        !VIRTIO_RING_F_EVENT_IDX
    } else {
        u64::MAX
    };
    let (table, rest) = rest.split_at(rest.len().min(usize::from(QSIZE) * 16));
    let (buffers, heads) = rest.split_at(rest.len().min(2048));
    let mut d = Driver::with_features(device, mask);
    d.write(ring_base(q), table);
    d.write(DATA, buffers);
    for &head in heads.iter().take(64) {
        d.make_available(q, u16::from(head));
        d.notify(q);
    }
}
