//! The i8042 PS/2 controller with a keyboard behind it: enough of the 8042 protocol for Linux's
//! i8042 and atkbd drivers to find a keyboard (self-test, control byte, keyboard ID), so that
//! Ctrl+Alt+Del can be pressed from the API; and the reset command (`0xfe` on port 0x64, what
//! `reboot=k` writes) ends the VM. Data port at offset 0, status/command at offset 4.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::bus::BusDevice;
use crate::exit::{ExitRequester, GuestExit};
use crate::interrupt::IrqLine;

// Status register bits.
const SB_OUT_FULL: u8 = 0x01;
const SB_SYSTEM: u8 = 0x04;
const SB_LAST_WAS_CMD: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;

// Control byte ("CTR") bits.
const CB_KBD_INT: u8 = 0x01;
const CB_POST_OK: u8 = 0x04;
const CB_KBD_DISABLED: u8 = 0x10;

// Controller commands (port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET: u8 = 0xfe;

// Keyboard commands (port 0x60) and replies.
const KBD_SET_LEDS: u8 = 0xed;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_GET_ID: u8 = 0xf2;
const KBD_SET_RATE: u8 = 0xf3;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_OK: u8 = 0xaa;
const KBD_ID: [u8; 2] = [0xab, 0x83];

/// Scancode set 2 codes of Ctrl, Alt and Delete (Delete is an extended key).
const KEY_CTRL: u16 = 0x0014;
const KEY_ALT: u16 = 0x0011;
const KEY_DEL: u16 = 0xe071;

/// What the next data-port write means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    None,
    ControllerCtr,
    ControllerOutp,
    AuxByte,
    KeyboardArg,
    KeyboardScancodeSet,
}

/// The controller and its keyboard.
pub struct I8042 {
    exit: Arc<dyn ExitRequester>,
    irq: IrqLine,
    ctr: u8,
    status_cmd: bool,
    pending: Pending,
    out: VecDeque<u8>,
}

/// Most bytes queued for the guest; a guest that never reads cannot grow it.
const OUT_CAPACITY: usize = 64;

impl I8042 {
    /// A controller raising `irq` (IRQ 1) whose reset command stops the VM through `exit`.
    pub fn new(exit: Arc<dyn ExitRequester>, irq: IrqLine) -> Self {
        Self {
            exit,
            irq,
            ctr: CB_POST_OK | CB_KBD_INT,
            status_cmd: false,
            pending: Pending::None,
            out: VecDeque::new(),
        }
    }

    fn status(&self) -> u8 {
        let mut s = SB_SYSTEM | SB_KBD_ENABLED;
        if !self.out.is_empty() {
            s |= SB_OUT_FULL;
        }
        if self.status_cmd {
            s |= SB_LAST_WAS_CMD;
        }
        s
    }

    fn interrupt(&self) {
        if self.ctr & CB_KBD_INT != 0 && self.ctr & CB_KBD_DISABLED == 0 {
            if let Err(e) = vm_superio::Trigger::trigger(&self.irq) {
                log::warn!("i8042: cannot raise IRQ 1: {e}");
            }
        }
    }

    /// Queues bytes for the guest; interrupts when the output buffer was empty.
    fn push(&mut self, bytes: &[u8]) {
        let was_empty = self.out.is_empty();
        for &b in bytes {
            if self.out.len() < OUT_CAPACITY {
                self.out.push_back(b);
            }
        }
        if was_empty && !self.out.is_empty() {
            self.interrupt();
        }
    }

    fn key(&mut self, code: u16, release: bool) {
        let mut bytes = Vec::with_capacity(3);
        if code > 0xff {
            bytes.push((code >> 8) as u8);
        }
        if release {
            bytes.push(0xf0);
        }
        bytes.push(code as u8);
        self.push(&bytes);
    }

    /// Presses and releases Ctrl+Alt+Del on the keyboard (the API's SendCtrlAltDel).
    pub fn ctrl_alt_del(&mut self) {
        for k in [KEY_CTRL, KEY_ALT, KEY_DEL] {
            self.key(k, false);
        }
        for k in [KEY_DEL, KEY_ALT, KEY_CTRL] {
            self.key(k, true);
        }
    }

    fn command(&mut self, cmd: u8) {
        self.status_cmd = true;
        match cmd {
            CMD_READ_CTR => self.push(&[self.ctr]),
            CMD_WRITE_CTR => self.pending = Pending::ControllerCtr,
            CMD_READ_OUTP => self.push(&[0x01]),
            CMD_WRITE_OUTP => self.pending = Pending::ControllerOutp,
            CMD_WRITE_AUX => self.pending = Pending::AuxByte,
            CMD_SELF_TEST => self.push(&[0x55]),
            CMD_TEST_KBD => self.push(&[0x00]),
            // No mouse: the aux port test fails (clock line stuck low).
            CMD_TEST_AUX => self.push(&[0x01]),
            CMD_DISABLE_KBD => self.ctr |= CB_KBD_DISABLED,
            CMD_ENABLE_KBD => self.ctr &= !CB_KBD_DISABLED,
            CMD_DISABLE_AUX | CMD_ENABLE_AUX => {}
            CMD_RESET => {
                log::info!("guest reset through the i8042 (reset command 0xfe)");
                self.exit.request_exit(GuestExit::Reset);
            }
            other => log::debug!("i8042: ignored command {other:#x}"),
        }
    }

    fn data(&mut self, byte: u8) {
        self.status_cmd = false;
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::ControllerCtr => self.ctr = byte,
            Pending::ControllerOutp => {
                // Bit 0 of the output port is the CPU reset line, active low.
                if byte & 1 == 0 {
                    self.exit.request_exit(GuestExit::Reset);
                }
            }
            Pending::AuxByte => {}
            Pending::KeyboardArg => self.push(&[KBD_ACK]),
            Pending::KeyboardScancodeSet => {
                // 0 asks which set is active: set 2.
                if byte == 0 {
                    self.push(&[KBD_ACK, 0x02]);
                } else {
                    self.push(&[KBD_ACK]);
                }
            }
            Pending::None => match byte {
                KBD_RESET => {
                    self.out.clear();
                    self.push(&[KBD_ACK, KBD_SELF_TEST_OK]);
                }
                KBD_GET_ID => self.push(&[KBD_ACK, KBD_ID[0], KBD_ID[1]]),
                KBD_SET_LEDS | KBD_SET_RATE => {
                    self.pending = Pending::KeyboardArg;
                    self.push(&[KBD_ACK]);
                }
                KBD_SCANCODE_SET => {
                    self.pending = Pending::KeyboardScancodeSet;
                    self.push(&[KBD_ACK]);
                }
                _ => self.push(&[KBD_ACK]),
            },
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let [b] = data else { return };
        *b = match offset {
            0 => {
                let v = self.out.pop_front().unwrap_or(0);
                if !self.out.is_empty() {
                    self.interrupt();
                }
                v
            }
            4 => self.status(),
            // Port 0x61 and the ones between belong to nobody here.
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [b] = data else { return };
        match offset {
            0 => self.data(*b),
            4 => self.command(*b),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::RecordingExit;
    use crate::interrupt::CountingInterrupt;

    fn dev() -> (I8042, Arc<RecordingExit>, Arc<CountingInterrupt>) {
        let rec = Arc::new(RecordingExit::default());
        let irq = Arc::new(CountingInterrupt::default());
        (I8042::new(rec.clone(), IrqLine(irq.clone())), rec, irq)
    }

    fn read(d: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        d.read(offset, &mut b);
        b[0]
    }

    fn drain(d: &mut I8042) -> Vec<u8> {
        let mut v = Vec::new();
        while read(d, 4) & SB_OUT_FULL != 0 {
            v.push(read(d, 0));
        }
        v
    }

    #[test]
    fn reset_command_requests_reset() {
        let (mut d, rec, _) = dev();
        assert_eq!(read(&mut d, 4) & 0x2, 0, "input buffer always empty");
        d.write(4, &[CMD_RESET]);
        assert_eq!(*rec.0.lock().unwrap(), vec![GuestExit::Reset]);
    }

    #[test]
    fn linux_probe_sequence() {
        let (mut d, rec, _) = dev();
        d.write(4, &[CMD_SELF_TEST]);
        assert_eq!(drain(&mut d), [0x55]);
        d.write(4, &[CMD_READ_CTR]);
        let ctr = drain(&mut d)[0];
        d.write(4, &[CMD_WRITE_CTR]);
        d.write(0, &[ctr | 0x40]);
        d.write(4, &[CMD_READ_CTR]);
        assert_eq!(drain(&mut d), [ctr | 0x40]);
        d.write(4, &[CMD_TEST_KBD]);
        assert_eq!(drain(&mut d), [0x00]);
        d.write(0, &[KBD_GET_ID]);
        assert_eq!(drain(&mut d), [KBD_ACK, 0xab, 0x83]);
        d.write(0, &[KBD_SCANCODE_SET]);
        d.write(0, &[0]);
        assert_eq!(drain(&mut d), [KBD_ACK, KBD_ACK, 0x02]);
        d.write(0, &[KBD_SET_LEDS]);
        d.write(0, &[0x07]);
        assert_eq!(drain(&mut d), [KBD_ACK, KBD_ACK]);
        d.write(0, &[KBD_RESET]);
        assert_eq!(drain(&mut d), [KBD_ACK, KBD_SELF_TEST_OK]);
        assert!(rec.0.lock().unwrap().is_empty());
    }

    #[test]
    fn ctrl_alt_del_sends_set2_scancodes_with_interrupts() {
        let (mut d, _, irq) = dev();
        d.ctrl_alt_del();
        let before = irq.count();
        assert!(before >= 1);
        let bytes = drain(&mut d);
        assert_eq!(
            bytes,
            [
                0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14
            ]
        );
        // One interrupt per byte: the first on queueing, then one per read that leaves more.
        assert_eq!(irq.count(), bytes.len());
    }

    #[test]
    fn no_interrupts_when_the_guest_disabled_them() {
        let (mut d, _, irq) = dev();
        d.write(4, &[CMD_WRITE_CTR]);
        d.write(0, &[CB_POST_OK]);
        d.ctrl_alt_del();
        assert_eq!(irq.count(), 0);
    }

    #[test]
    fn output_port_reset_line_and_bounded_queue() {
        let (mut d, rec, _) = dev();
        for _ in 0..1000 {
            d.ctrl_alt_del();
        }
        assert!(drain(&mut d).len() <= OUT_CAPACITY);
        d.write(4, &[CMD_WRITE_OUTP]);
        d.write(0, &[0xfe]);
        assert_eq!(*rec.0.lock().unwrap(), vec![GuestExit::Reset]);
        d.write(0, &[1, 2]);
        d.write(9, &[1]);
    }
}
