//! The ARM PL011 UART (PrimeCell r1p5), the ARM64 console (`ttyAMA0`).
//!
//! Transmission is instant: a byte written to the data register goes straight to the console
//! and the transmit interrupt is raised, as QEMU's model does. Received bytes wait in a 16-byte
//! FIFO; the receive interrupt is raised while it holds anything (Linux reads the FIFO only
//! when interrupted). The interrupt line is edge-triggered: tern pulses it whenever a masked
//! interrupt bit becomes set, and the driver's handler loops until the masked status is clear.

use std::collections::VecDeque;

use crate::os::EventFd;

use super::serial::ConsoleOutput;
use crate::bus::BusDevice;
use crate::interrupt::IrqLine;

const DR: u64 = 0x000;
const RSR_ECR: u64 = 0x004;
const FR: u64 = 0x018;
const ILPR: u64 = 0x020;
const IBRD: u64 = 0x024;
const FBRD: u64 = 0x028;
const LCR_H: u64 = 0x02c;
const CR: u64 = 0x030;
const IFLS: u64 = 0x034;
const IMSC: u64 = 0x038;
const RIS: u64 = 0x03c;
const MIS: u64 = 0x040;
const ICR: u64 = 0x044;
const DMACR: u64 = 0x048;
const ID_START: u64 = 0xfe0;

/// Flag register: receive FIFO empty.
const FR_RXFE: u32 = 1 << 4;
/// Flag register: receive FIFO full.
const FR_RXFF: u32 = 1 << 6;
/// Flag register: transmit FIFO empty.
const FR_TXFE: u32 = 1 << 7;

/// Interrupt bits: receive, transmit, receive timeout.
const INT_RX: u32 = 1 << 4;
const INT_TX: u32 = 1 << 5;
const INT_RT: u32 = 1 << 6;
const INT_ALL: u32 = 0x7ff;

/// Receive FIFO depth.
pub const FIFO_SIZE: usize = 16;

/// Peripheral ID (PL011, r1p5) then PrimeCell ID, one byte per word from 0xfe0.
const ID: [u8; 8] = [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1];

/// A PL011 UART in a 4 KiB MMIO window.
pub struct Pl011 {
    irq: IrqLine,
    out: ConsoleOutput,
    input_room: Option<EventFd>,
    rx: VecDeque<u8>,
    int_level: u32,
    int_mask: u32,
    ibrd: u32,
    fbrd: u32,
    lcr_h: u32,
    cr: u32,
    ifls: u32,
    ilpr: u32,
    dmacr: u32,
}

impl Pl011 {
    /// A UART raising `irq` and writing to `out`; `input_room` is written whenever the guest
    /// empties the receive FIFO.
    pub fn new(irq: IrqLine, out: ConsoleOutput, input_room: Option<EventFd>) -> Self {
        Self {
            irq,
            out,
            input_room,
            rx: VecDeque::with_capacity(FIFO_SIZE),
            int_level: 0,
            int_mask: 0,
            ibrd: 0,
            fbrd: 0,
            lcr_h: 0,
            // UART, transmit and receive enabled (the reset value).
            cr: 0x300,
            ifls: 0x12,
            ilpr: 0,
            dmacr: 0,
        }
    }

    /// Queues input bytes for the guest; returns how many fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let n = self.input_room().min(bytes.len());
        if n == 0 {
            return 0;
        }
        self.rx.extend(&bytes[..n]);
        metrics::METRICS.uart.read_count.add(n as u64);
        self.raise(INT_RX);
        n
    }

    /// Room left in the receive FIFO.
    pub fn input_room(&self) -> usize {
        FIFO_SIZE - self.rx.len()
    }

    /// The registers and receive FIFO, for a snapshot.
    pub fn save(&self) -> super::serial::UartState {
        super::serial::UartState {
            regs: [
                self.int_level,
                self.int_mask,
                self.ibrd,
                self.fbrd,
                self.lcr_h,
                self.cr,
                self.ifls,
                self.ilpr,
                self.dmacr,
            ]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect(),
            rx: self.rx.iter().copied().collect(),
        }
    }

    /// A UART as [`Pl011::new`], in the state [`Pl011::save`] returned. A pending masked
    /// interrupt is raised again (the line is an edge: the pulse before the snapshot is gone).
    pub fn with_state(
        irq: IrqLine,
        out: ConsoleOutput,
        input_room: Option<EventFd>,
        state: &super::serial::UartState,
    ) -> Result<Self, String> {
        if state.regs.len() != 9 * 4 {
            return Err(format!(
                "PL011 state has {} register bytes, not 36",
                state.regs.len()
            ));
        }
        if state.rx.len() > FIFO_SIZE {
            return Err(format!(
                "PL011 state has {} bytes in a {FIFO_SIZE}-byte FIFO",
                state.rx.len()
            ));
        }
        let r: Vec<u32> = state
            .regs
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let mut u = Self::new(irq, out, input_room);
        u.int_level = r[0] & INT_ALL;
        u.int_mask = r[1] & INT_ALL;
        u.ibrd = r[2];
        u.fbrd = r[3];
        u.lcr_h = r[4];
        u.cr = r[5];
        u.ifls = r[6];
        u.ilpr = r[7];
        u.dmacr = r[8];
        u.rx = state.rx.iter().copied().collect();
        u.update(0);
        Ok(u)
    }

    /// Sets interrupt bits and pulses the line if a masked bit became set.
    fn raise(&mut self, bits: u32) {
        let before = self.int_level & self.int_mask;
        self.int_level |= bits;
        self.update(before);
    }

    fn update(&mut self, masked_before: u32) {
        let now = self.int_level & self.int_mask;
        if now & !masked_before != 0 {
            if let Err(e) = vm_superio::Trigger::trigger(&self.irq) {
                log::warn!("pl011: interrupt: {e}");
            }
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            DR => {
                let b = self.rx.pop_front().map(u32::from).unwrap_or(0);
                if self.rx.is_empty() {
                    self.int_level &= !(INT_RX | INT_RT);
                    if let Some(evt) = &self.input_room {
                        if let Err(e) = evt.write(1) {
                            log::warn!("pl011: cannot signal input room: {e}");
                        }
                    }
                }
                b
            }
            RSR_ECR => 0,
            FR => {
                let mut fr = FR_TXFE;
                if self.rx.is_empty() {
                    fr |= FR_RXFE;
                }
                if self.rx.len() == FIFO_SIZE {
                    fr |= FR_RXFF;
                }
                fr
            }
            ILPR => self.ilpr,
            IBRD => self.ibrd,
            FBRD => self.fbrd,
            LCR_H => self.lcr_h,
            CR => self.cr,
            IFLS => self.ifls,
            IMSC => self.int_mask,
            RIS => self.int_level,
            MIS => self.int_level & self.int_mask,
            DMACR => self.dmacr,
            o if (ID_START..ID_START + 0x20).contains(&o) && o % 4 == 0 => {
                u32::from(ID[((o - ID_START) / 4) as usize])
            }
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            DR => {
                let _ = std::io::Write::write_all(&mut self.out, &[v as u8]);
                let _ = std::io::Write::flush(&mut self.out);
                self.raise(INT_TX);
            }
            RSR_ECR => {}
            ILPR => self.ilpr = v,
            IBRD => self.ibrd = v,
            FBRD => self.fbrd = v,
            LCR_H => self.lcr_h = v,
            CR => self.cr = v,
            IFLS => self.ifls = v,
            IMSC => {
                let before = self.int_level & self.int_mask;
                self.int_mask = v & INT_ALL;
                self.update(before);
            }
            ICR => self.int_level &= !v,
            DMACR => self.dmacr = v,
            _ => log::debug!("pl011: ignored write {v:#x} at {offset:#x}"),
        }
        // Bytes still waiting keep the receive interrupt up even after a clear.
        if !self.rx.is_empty() && self.int_level & INT_RX == 0 {
            self.raise(INT_RX);
        }
    }
}

impl BusDevice for Pl011 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = self.read_reg(offset & !3);
        let shift = (offset & 3) * 8;
        let bytes = (v >> shift).to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut word = [0u8; 4];
        let n = data.len().min(4);
        word[..n].copy_from_slice(&data[..n]);
        self.write_reg(offset, u32::from_le_bytes(word));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::{CountingInterrupt, SharedBuf};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn uart() -> (Pl011, SharedBuf, Arc<CountingInterrupt>, Arc<AtomicBool>) {
        let buf = SharedBuf::default();
        let irq = Arc::new(CountingInterrupt::default());
        let panicked = Arc::new(AtomicBool::new(false));
        let dev = Pl011::new(
            IrqLine(irq.clone()),
            ConsoleOutput::new(Box::new(buf.clone()), panicked.clone()),
            None,
        );
        (dev, buf, irq, panicked)
    }

    fn r(d: &mut Pl011, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(d: &mut Pl011, off: u64, v: u32) {
        d.write(off, &v.to_le_bytes());
    }

    #[test]
    fn state_survives_save_and_restore() {
        let (mut d, _buf, _irq, _p) = uart();
        w(&mut d, LCR_H, 0x70);
        w(&mut d, IBRD, 13);
        w(&mut d, IMSC, INT_RX);
        d.enqueue_input(b"ab");
        let st = d.save();
        let irq = Arc::new(CountingInterrupt::default());
        let out = ConsoleOutput::new(
            Box::new(SharedBuf::default()),
            Arc::new(AtomicBool::new(false)),
        );
        let mut e = Pl011::with_state(IrqLine(irq.clone()), out, None, &st).unwrap();
        // The pending receive interrupt is raised again; registers and FIFO are as they were.
        assert_eq!(irq.count(), 1);
        assert_eq!(r(&mut e, LCR_H), 0x70);
        assert_eq!(r(&mut e, IBRD), 13);
        assert_eq!(r(&mut e, MIS), INT_RX);
        assert_eq!(r(&mut e, DR) & 0xff, u32::from(b'a'));
        assert_eq!(r(&mut e, DR) & 0xff, u32::from(b'b'));
        assert_eq!(e.save().rx, Vec::<u8>::new());
        // Foreign or damaged states are refused.
        let out = || {
            ConsoleOutput::new(
                Box::new(SharedBuf::default()),
                Arc::new(AtomicBool::new(false)),
            )
        };
        let mut bad = st.clone();
        bad.regs.pop();
        assert!(Pl011::with_state(IrqLine(irq.clone()), out(), None, &bad).is_err());
        let mut bad = st.clone();
        bad.rx = vec![0; FIFO_SIZE + 1];
        assert!(Pl011::with_state(IrqLine(irq), out(), None, &bad).is_err());
    }

    #[test]
    fn ids_identify_a_pl011_primecell() {
        let (mut d, _, _, _) = uart();
        let id: Vec<u32> = (0..8).map(|i| r(&mut d, ID_START + i * 4)).collect();
        assert_eq!(id, [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1]);
    }

    #[test]
    fn output_reaches_the_console_and_notices_a_panic() {
        let (mut d, buf, irq, panicked) = uart();
        for b in b"Kernel panic - not syncing: x\n" {
            w(&mut d, DR, u32::from(*b));
        }
        assert_eq!(&*buf.contents(), b"Kernel panic - not syncing: x\n");
        assert!(panicked.load(Ordering::SeqCst));
        assert_eq!(irq.count(), 0, "TX interrupt masked");
        assert_eq!(r(&mut d, RIS) & INT_TX, INT_TX);
        assert_ne!(r(&mut d, FR) & FR_TXFE, 0);
        // Unmasking a pending bit pulses the line once.
        w(&mut d, IMSC, INT_TX);
        assert_eq!(irq.count(), 1);
        assert_eq!(r(&mut d, MIS), INT_TX);
        w(&mut d, ICR, INT_TX);
        assert_eq!(r(&mut d, MIS), 0);
    }

    #[test]
    fn input_fills_the_fifo_and_interrupts_until_drained() {
        let evt = EventFd::new(crate::os::EFD_NONBLOCK).unwrap();
        let (mut d, _, irq, _) = uart();
        d.input_room = Some(evt.try_clone().unwrap());
        w(&mut d, IMSC, INT_RX | INT_RT);
        assert_ne!(r(&mut d, FR) & FR_RXFE, 0);
        assert_eq!(d.enqueue_input(&[b'x'; 20]), FIFO_SIZE);
        assert_eq!(d.enqueue_input(b"y"), 0);
        assert_ne!(r(&mut d, FR) & FR_RXFF, 0);
        assert_eq!(irq.count(), 1);
        assert_eq!(r(&mut d, MIS), INT_RX);
        // Clearing RX while bytes wait raises it again.
        w(&mut d, ICR, INT_RX);
        assert_eq!(r(&mut d, MIS), INT_RX);
        for _ in 0..FIFO_SIZE {
            assert_eq!(r(&mut d, DR), u32::from(b'x'));
        }
        assert_eq!(r(&mut d, MIS), 0);
        assert_ne!(r(&mut d, FR) & FR_RXFE, 0);
        assert_eq!(evt.read().unwrap(), 1);
        assert_eq!(r(&mut d, DR), 0, "empty FIFO reads 0");
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let (mut d, _, _, _) = uart();
        let mut b = [0u8; 8];
        d.read(0xfff, &mut b);
        d.read(FR + 1, &mut b[..1]);
        d.write(0x800, &[1, 2, 3, 4, 5, 6, 7, 8]);
        d.write(DR, &[]);
    }
}
