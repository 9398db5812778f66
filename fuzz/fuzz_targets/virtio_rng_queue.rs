//! Any bytes as a virtio-rng queue: the first bytes fill the descriptor table and available
//! ring in guest memory, the rest pick which heads are offered. The device must never panic or
//! hang, whatever the descriptors say (loops, wild addresses, huge lengths, bad indices).
#![no_main]

use std::sync::Arc;

use devices::BusDevice;
use devices::interrupt::{Interrupt, IrqLine};
use devices::virtio::mmio::{
    MmioTransport, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};
use devices::virtio::rng::Rng;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

struct NoIrq;
impl Interrupt for NoIrq {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

const QSIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;

fn w(dev: &mut MmioTransport, off: u64, v: u32) {
    dev.write(off, &v.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]) else { return };
    let table_len = usize::from(QSIZE) * 16;
    let (table, rest) = data.split_at(data.len().min(table_len));
    if mem.write_slice(table, GuestAddress(DESC)).is_err() {
        return;
    }
    let mut dev = MmioTransport::new(Box::new(Rng::new()), mem.clone(), IrqLine(Arc::new(NoIrq)));
    w(&mut dev, 0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    w(&mut dev, 0x024, 1);
    w(&mut dev, 0x020, 1);
    w(&mut dev, 0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    w(&mut dev, 0x038, u32::from(QSIZE));
    w(&mut dev, 0x080, DESC as u32);
    w(&mut dev, 0x090, AVAIL as u32);
    w(&mut dev, 0x0a0, USED as u32);
    w(&mut dev, 0x044, 1);
    w(&mut dev, 0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    for (i, &head) in rest.iter().take(64).enumerate() {
        let idx = (i + 1) as u16;
        let slot = AVAIL + 4 + u64::from((idx - 1) % QSIZE) * 2;
        let _ = mem.write_obj(u16::from(head), GuestAddress(slot));
        let _ = mem.write_obj(idx, GuestAddress(AVAIL + 2));
        w(&mut dev, 0x050, 0);
    }
});
