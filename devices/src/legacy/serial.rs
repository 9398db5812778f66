//! The 16550 UART (vm-superio's model) on the bus, with a console sink that notices a guest
//! kernel panic in the output.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::os::EventFd;
use vm_superio::Serial;
use vm_superio::serial::SerialEvents;

use crate::bus::BusDevice;
use crate::interrupt::IrqLine;

/// What a Linux kernel prints first when it panics.
pub const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";

/// Where console output goes: the writer, plus a watch for [`PANIC_MARKER`].
pub struct ConsoleOutput {
    out: Box<dyn Write + Send>,
    /// How many bytes of [`PANIC_MARKER`] the output ends with so far.
    matched: usize,
    panicked: Arc<AtomicBool>,
}

impl ConsoleOutput {
    /// Output to `out`; `panicked` is set once the guest prints a kernel panic.
    pub fn new(out: Box<dyn Write + Send>, panicked: Arc<AtomicBool>) -> Self {
        Self {
            out,
            matched: 0,
            panicked,
        }
    }

    /// Follows the output byte by byte. On a mismatch the match restarts at this byte, which is
    /// exact because the marker's first byte never occurs again inside it (a test checks that).
    fn scan(&mut self, buf: &[u8]) {
        for &b in buf {
            self.matched = if PANIC_MARKER[self.matched] == b {
                self.matched + 1
            } else {
                usize::from(PANIC_MARKER[0] == b)
            };
            if self.matched == PANIC_MARKER.len() {
                self.matched = 0;
                if !self.panicked.swap(true, Ordering::SeqCst) {
                    metrics::METRICS.vmm.panic_count.inc();
                }
            }
        }
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        metrics::METRICS.uart.write_count.add(buf.len() as u64);
        self.scan(buf);
        // A console whose reader went away (closed pipe) must not stop the guest.
        match self.out.write_all(buf) {
            Ok(()) => {}
            Err(e) => log::debug!("console output: {e}"),
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.out.flush();
        Ok(())
    }
}

/// Signals an eventfd when the guest has drained the receive FIFO, so that a paused input
/// source can resume.
pub struct InputRoom(Option<EventFd>);

impl SerialEvents for InputRoom {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Some(evt) = &self.0 {
            if let Err(e) = evt.write(1) {
                log::warn!("serial: cannot signal input room: {e}");
            }
        }
    }
}

/// A 16550 UART on 8 consecutive ports.
pub struct SerialDevice {
    serial: Serial<IrqLine, InputRoom, ConsoleOutput>,
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `out`; `input_room` is written whenever the guest
    /// empties the receive FIFO.
    pub fn new(irq: IrqLine, out: ConsoleOutput, input_room: Option<EventFd>) -> Self {
        Self {
            serial: Serial::with_events(irq, InputRoom(input_room), out),
        }
    }

    /// Queues input bytes for the guest; returns how many fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.serial.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        match self.serial.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => {
                metrics::METRICS.uart.read_count.add(n as u64);
                n
            }
            Err(e) => {
                log::warn!("serial input: {e:?}");
                0
            }
        }
    }

    /// Room left in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// The registers and receive FIFO, for a snapshot.
    pub fn save(&self) -> UartState {
        let s = self.serial.state();
        UartState {
            regs: vec![
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            rx: s.in_buffer,
        }
    }
}

impl SerialDevice {
    /// A UART as [`SerialDevice::new`], in the state [`SerialDevice::save`] returned.
    pub fn with_state(
        irq: IrqLine,
        out: ConsoleOutput,
        input_room: Option<EventFd>,
        state: &UartState,
    ) -> Result<Self, String> {
        let [
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
        ] = state.regs[..]
        else {
            return Err(format!(
                "16550 state has {} registers, not 9",
                state.regs.len()
            ));
        };
        let st = vm_superio::serial::SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: state.rx.clone(),
        };
        let serial = Serial::from_state(&st, irq, InputRoom(input_room), out)
            .map_err(|e| format!("16550 state: {e:?}"))?;
        Ok(Self { serial })
    }
}

/// A UART's registers and receive FIFO in a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UartState {
    /// The registers, in the model's order.
    pub regs: Vec<u8>,
    /// Bytes the guest has not read yet.
    pub rx: Vec<u8>,
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            *b = self.serial.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            if let Err(e) = self.serial.write(off, *b) {
                log::warn!("serial write: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::{CountingInterrupt, SharedBuf};

    const THR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;

    fn uart() -> (
        SerialDevice,
        SharedBuf,
        Arc<CountingInterrupt>,
        Arc<AtomicBool>,
    ) {
        let buf = SharedBuf::default();
        let irq = Arc::new(CountingInterrupt::default());
        let panicked = Arc::new(AtomicBool::new(false));
        let dev = SerialDevice::new(
            IrqLine(irq.clone()),
            ConsoleOutput::new(Box::new(buf.clone()), panicked.clone()),
            None,
        );
        (dev, buf, irq, panicked)
    }

    #[test]
    fn guest_output_reaches_the_sink() {
        let (mut dev, buf, _, _) = uart();
        for b in b"hello\n" {
            dev.write(THR, &[*b]);
        }
        assert_eq!(&*buf.contents(), b"hello\n");
        let mut lsr = [0u8];
        dev.read(LSR, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter empty");
    }

    #[test]
    fn input_raises_the_interrupt_when_enabled() {
        let (mut dev, _, irq, _) = uart();
        dev.write(IER, &[0x01]); // received-data interrupt
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        assert!(irq.count() >= 1);
        let mut lsr = [0u8];
        dev.read(LSR, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut rbr = [0u8];
        dev.read(0, &mut rbr);
        assert_eq!(rbr[0], b'a');
    }

    #[test]
    fn full_fifo_takes_no_more_input() {
        let (mut dev, _, _, _) = uart();
        let room = dev.input_room();
        assert_eq!(dev.enqueue_input(&vec![b'x'; room + 10]), room);
        assert_eq!(dev.enqueue_input(b"y"), 0);
    }

    #[test]
    fn draining_the_fifo_signals_room() {
        let evt = EventFd::new(crate::os::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(
            IrqLine(Arc::new(CountingInterrupt::default())),
            ConsoleOutput::new(
                Box::new(SharedBuf::default()),
                Arc::new(AtomicBool::new(false)),
            ),
            Some(evt.try_clone().unwrap()),
        );
        dev.enqueue_input(b"ab");
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert!(evt.read().is_err(), "not empty yet");
        dev.read(0, &mut b);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn state_survives_save_and_restore() {
        let with = |st: &UartState| {
            SerialDevice::with_state(
                IrqLine(Arc::new(CountingInterrupt::default())),
                ConsoleOutput::new(
                    Box::new(SharedBuf::default()),
                    Arc::new(AtomicBool::new(false)),
                ),
                None,
                st,
            )
        };
        let (mut dev, _, _, _) = uart();
        dev.write(IER, &[0x03]);
        dev.write(7, &[0x5a]); // scratch
        dev.enqueue_input(b"xy");
        let saved = dev.save();
        let mut back = with(&saved).unwrap();
        assert_eq!(back.save(), saved);
        let mut b = [0u8];
        back.read(IER, &mut b);
        assert_eq!(b[0], 0x03);
        back.read(0, &mut b);
        assert_eq!(b[0], b'x');
        let bad = UartState {
            regs: vec![1, 2],
            rx: vec![],
        };
        assert!(with(&bad).is_err());
    }

    #[test]
    fn panic_marker_is_noticed_across_writes() {
        let (mut dev, _, _, panicked) = uart();
        for b in b"[ 1.0] Kernel pa" {
            dev.write(THR, &[*b]);
        }
        assert!(!panicked.load(Ordering::SeqCst));
        for b in b"nic - not syncing: Attempted to kill init!" {
            dev.write(THR, &[*b]);
        }
        assert!(panicked.load(Ordering::SeqCst));
    }

    #[test]
    fn marker_restart_is_exact() {
        // scan() restarts a match at the current byte; that is only right if the marker's first
        // byte does not recur inside it.
        assert!(!PANIC_MARKER[1..].contains(&PANIC_MARKER[0]));
        let (mut dev, _, _, panicked) = uart();
        for b in b"KKernel panic - not syncinKernel panic - not syncing" {
            dev.write(THR, &[*b]);
        }
        assert!(panicked.load(Ordering::SeqCst));
        let (mut dev, _, _, panicked) = uart();
        for b in b"Kernel panic - not syncin" {
            dev.write(THR, &[*b]);
        }
        assert!(!panicked.load(Ordering::SeqCst));
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let (mut dev, buf, _, _) = uart();
        dev.write(THR, &[1, 2]);
        dev.write(u64::MAX, &[1]);
        let mut d = [0u8; 2];
        dev.read(0, &mut d);
        assert!(buf.contents().is_empty());
    }
}
