//! vCPU threads: run guest code, dispatch PIO/MMIO exits to the buses, report stops.

use std::sync::Arc;
use std::thread::JoinHandle;

use devices::Bus;
use devices::exit::GuestExit;

use crate::exit::{ExitChannel, VmStop};
use crate::hypervisor::{Vcpu, VcpuExit};

/// The buses a vCPU dispatches to.
#[derive(Clone)]
pub struct Buses {
    /// Port I/O (x86).
    pub pio: Arc<Bus>,
    /// Memory-mapped I/O.
    pub mmio: Arc<Bus>,
}

/// What the run loop does after one exit.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Run the vCPU again.
    Continue,
    /// Stop this vCPU thread.
    Stop,
}

/// Handles one exit: device accesses go to the buses (reads from nowhere return all ones,
/// writes to nowhere are dropped), stop conditions are posted to `exit`.
pub fn handle_exit(index: u8, exit: VcpuExit<'_>, buses: &Buses, stop: &ExitChannel) -> Next {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !buses.pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            if !buses.pio.write(u64::from(port), data) {
                log::trace!("vcpu{index}: unhandled out {port:#x} {data:?}");
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            if !buses.mmio.read(addr, data) {
                log::debug!("vcpu{index}: unhandled MMIO read at {addr:#x}");
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !buses.mmio.write(addr, data) {
                log::debug!("vcpu{index}: unhandled MMIO write at {addr:#x}");
            }
        }
        VcpuExit::Interrupted => {}
        VcpuExit::Hlt | VcpuExit::SystemOff => {
            stop.post(VmStop::Guest(GuestExit::PowerOff));
            return Next::Stop;
        }
        VcpuExit::Shutdown | VcpuExit::SystemReset => {
            stop.post(VmStop::Guest(GuestExit::Reset));
            return Next::Stop;
        }
        VcpuExit::Unhandled(what) => {
            stop.post(VmStop::VcpuFailed {
                index,
                reason: what,
            });
            return Next::Stop;
        }
    }
    Next::Continue
}

/// Starts vCPU `index` on its own thread.
pub fn spawn(
    index: u8,
    mut vcpu: Box<dyn Vcpu>,
    buses: Buses,
    stop: Arc<ExitChannel>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || {
            loop {
                let next = match vcpu.run() {
                    Ok(exit) => handle_exit(index, exit, &buses, &stop),
                    Err(e) => {
                        stop.post(VmStop::VcpuFailed {
                            index,
                            reason: e.to_string(),
                        });
                        Next::Stop
                    }
                };
                if next == Next::Stop || stop.reason().is_some() {
                    break;
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::BusDevice;
    use std::sync::Mutex;

    struct Const(u8);
    impl BusDevice for Const {
        fn read(&mut self, _o: u64, d: &mut [u8]) {
            d.fill(self.0);
        }
        fn write(&mut self, _o: u64, d: &[u8]) {
            self.0 = d[0];
        }
    }

    fn buses() -> Buses {
        let mut pio = Bus::new();
        pio.insert(Arc::new(Mutex::new(Const(0x42))), 0x80, 1)
            .unwrap();
        Buses {
            pio: Arc::new(pio),
            mmio: Arc::new(Bus::new()),
        }
    }

    #[test]
    fn pio_dispatch_and_unhandled_reads() {
        let b = buses();
        let c = ExitChannel::new().unwrap();
        let mut d = [0u8; 1];
        assert_eq!(
            handle_exit(0, VcpuExit::IoIn(0x80, &mut d), &b, &c),
            Next::Continue
        );
        assert_eq!(d[0], 0x42);
        assert_eq!(
            handle_exit(0, VcpuExit::IoOut(0x80, &[7]), &b, &c),
            Next::Continue
        );
        handle_exit(0, VcpuExit::IoIn(0x80, &mut d), &b, &c);
        assert_eq!(d[0], 7);
        let mut w = [0u8; 4];
        handle_exit(0, VcpuExit::MmioRead(0x1000, &mut w), &b, &c);
        assert_eq!(w, [0xff; 4]);
        assert_eq!(c.reason(), None);
    }

    #[test]
    fn stops_are_posted() {
        let b = buses();
        let c = ExitChannel::new().unwrap();
        assert_eq!(handle_exit(1, VcpuExit::Shutdown, &b, &c), Next::Stop);
        assert_eq!(c.reason(), Some(VmStop::Guest(GuestExit::Reset)));
        let c = ExitChannel::new().unwrap();
        handle_exit(2, VcpuExit::Unhandled("boom".into()), &b, &c);
        assert_eq!(
            c.reason(),
            Some(VmStop::VcpuFailed {
                index: 2,
                reason: "boom".into()
            })
        );
    }
}
