//! Any bytes as a guest's accesses to the PCI bus: configuration reads and writes through
//! 0xCF8/0xCFC and ECAM, and reads and writes anywhere in the BAR window, with a virtio-pci
//! function (virtio-rng, MSI-X) on the bus. Sizing, moving and disabling BARs, MSI-X table
//! and control writes, the PCI configuration access capability, the common configuration:
//! nothing may panic or hang.
//!
//! Input: records of 12 bytes [op][offset: 4][len][value: 6]: op % 4 = 0 config write, 1
//! config read (through ECAM when bit 2 is set, else the ports), 2 BAR-window write, 3
//! BAR-window read.
#![no_main]

use std::sync::{Arc, Mutex};

use devices::BusDevice;
use devices::interrupt::RecordingMsi;
use devices::os::EventFd;
use devices::pci::access::{BarWindow, ConfigIo, Ecam};
use devices::pci::{NotifyRegistrar, PciBus};
use devices::virtio::pci::{PciResources, PciTransport};
use devices::virtio::rng::Rng;
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};

struct NoNotify;
impl NotifyRegistrar for NoNotify {
    fn register(&self, _: &EventFd, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn unregister(&self, _: &EventFd, _: u64) -> std::io::Result<()> {
        Ok(())
    }
}

const WINDOW: u64 = 0xe100_0000;
const WINDOW_END: u64 = 0xfec0_0000;

fuzz_target!(|data: &[u8]| {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]) else {
        return;
    };
    let Ok(t) = PciTransport::new(
        Box::new(Rng::new()),
        mem,
        PciResources {
            devid: 8,
            msi: Arc::new(RecordingMsi::default()),
            notify: Arc::new(NoNotify),
            intx: None,
            bar_address: WINDOW,
        },
    ) else {
        return;
    };
    let t = Arc::new(Mutex::new(t));
    let mut bus = PciBus::new();
    if bus.add(t.clone()).is_err() {
        return;
    }
    let bus = Arc::new(bus);
    let mut io = ConfigIo::new(bus.clone());
    let mut ecam = Ecam::new(bus.clone());
    let mut win = BarWindow::new(bus, WINDOW);
    for rec in data.chunks_exact(12) {
        let off = u32::from_le_bytes([rec[1], rec[2], rec[3], rec[4]]);
        let len = [1usize, 2, 4, 8][usize::from(rec[5] & 3)];
        let mut v = [0u8; 8];
        v[..6].copy_from_slice(&rec[6..12]);
        match rec[0] % 4 {
            0 | 1 => {
                let write = rec[0] % 4 == 0;
                if rec[0] & 4 != 0 {
                    // ECAM: bus 0, any device, function and register.
                    let at = u64::from(off & 0xf_ffff);
                    if write {
                        ecam.write(at, &v[..len.min(4)]);
                    } else {
                        ecam.read(at, &mut v[..len.min(4)]);
                    }
                } else {
                    io.write(0, &(0x8000_0000 | (off & 0x00ff_fffc)).to_le_bytes());
                    let port = 4 + u64::from(off & 3);
                    if write {
                        io.write(port, &v[..len.min(4)]);
                    } else {
                        io.read(port, &mut v[..len.min(4)]);
                    }
                }
            }
            2 => win.write(u64::from(off) % (WINDOW_END - WINDOW), &v[..len]),
            _ => win.read(u64::from(off) % (WINDOW_END - WINDOW), &mut v[..len]),
        }
        // The worker's half runs too: whatever the accesses set up is used.
        t.lock().unwrap_or_else(|p| p.into_inner()).run_ready(0);
    }
});
