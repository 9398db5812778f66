//! Shared driver for the virtio queue fuzz targets: any bytes become one queue's descriptor
//! table, buffer contents and the heads offered. The device must neither panic nor hang.
//!
//! Input layout: [queue selector: 1][descriptor table: 16 * 16][buffer bytes: 2048][heads...].

#![allow(dead_code)]

use std::sync::Arc;

use devices::BusDevice;
use devices::interrupt::{Interrupt, IrqLine};
use devices::virtio::VirtioDevice;
use devices::virtio::mmio::{
    MmioTransport, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

struct NoIrq;
impl Interrupt for NoIrq {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

const QSIZE: u16 = 16;
const MEM: usize = 0x20000;
const BUFFERS: u64 = 0x10000;

fn ring(q: u64) -> u64 {
    0x1000 + q * 0x3000
}

fn w(dev: &mut MmioTransport, off: u64, v: u32) {
    dev.write(off, &v.to_le_bytes());
}

/// Brings `device` up, lays the input out in guest memory and offers the chosen heads.
pub fn run(device: Box<dyn VirtioDevice>, data: &[u8]) {
    let nq = device.queue_max_sizes().len();
    let features = device.features();
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let q = u64::from(sel) % nq as u64;
    let (table, rest) = rest.split_at(rest.len().min(usize::from(QSIZE) * 16));
    let (buffers, heads) = rest.split_at(rest.len().min(2048));
    if mem.write_slice(table, GuestAddress(ring(q))).is_err()
        || mem.write_slice(buffers, GuestAddress(BUFFERS)).is_err()
    {
        return;
    }
    let Ok(mut dev) = MmioTransport::new(device, mem.clone(), IrqLine(Arc::new(NoIrq))) else {
        return;
    };
    w(&mut dev, 0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    for sel in 0..2u32 {
        w(&mut dev, 0x024, sel);
        w(&mut dev, 0x020, (features >> (32 * sel)) as u32);
    }
    w(
        &mut dev,
        0x070,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    for i in 0..nq as u64 {
        w(&mut dev, 0x030, i as u32);
        w(&mut dev, 0x038, u32::from(QSIZE));
        w(&mut dev, 0x080, ring(i) as u32);
        w(&mut dev, 0x090, (ring(i) + 0x1000) as u32);
        w(&mut dev, 0x0a0, (ring(i) + 0x2000) as u32);
        w(&mut dev, 0x044, 1);
    }
    w(
        &mut dev,
        0x070,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
    let avail = ring(q) + 0x1000;
    for (i, &head) in heads.iter().take(64).enumerate() {
        let idx = (i + 1) as u16;
        let slot = avail + 4 + u64::from((idx - 1) % QSIZE) * 2;
        let _ = mem.write_obj(u16::from(head), GuestAddress(slot));
        let _ = mem.write_obj(idx, GuestAddress(avail + 2));
        w(&mut dev, 0x050, q as u32);
        dev.run_ready(0);
    }
}
