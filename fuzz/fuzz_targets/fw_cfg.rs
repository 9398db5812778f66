//! Any bytes as a firmware's accesses to fw_cfg, through the x86 ports or MMIO: selecting
//! any item, reading the data register, DMA descriptors anywhere (inside or outside guest
//! memory, pointing anywhere, any control bits). Nothing may panic or hang.
//!
//! Input: a first byte choosing the access (even: ports, odd: MMIO), then records of 12 bytes
//! [op][offset][len][value: 8 BE] (op even: write, odd: read; `len` % 8 + 1 bytes); guest
//! memory starts as the input's tail, so DMA descriptors come from the fuzzer too.
#![no_main]

use devices::BusDevice;
use devices::fw_cfg::{Access, FwCfg};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]) else {
        return;
    };
    let _ = mem.write_slice(&rest[..rest.len().min(0x1_0000)], GuestAddress(0));
    let access = if mode % 2 == 0 { Access::Io } else { Access::Mmio };
    let mut d = FwCfg::new(access, mem);
    let _ = d.add_file("etc/e820", vec![0xab; 40]);
    let _ = d.add_file("etc/table-loader", vec![1; 4096]);
    let _ = d.set_item(devices::fw_cfg::NB_CPUS, vec![2, 0]);
    for r in rest.chunks_exact(12).take(256) {
        let offset = u64::from(r[1] % 0x20);
        let len = usize::from(r[2] % 8) + 1;
        if r[0] % 2 == 0 {
            d.write(offset, &r[4..4 + len]);
        } else {
            let mut b = [0u8; 8];
            d.read(offset, &mut b[..len]);
        }
    }
});
