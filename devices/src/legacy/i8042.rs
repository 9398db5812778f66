//! The i8042 keyboard controller, for its one job in a VM: a guest write of `0xfe` to port
//! `0x64` (the `reboot=k` reset) ends the VM. Wraps vm-superio's model.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;
use crate::exit::{ExitRequester, GuestExit};

/// Turns the i8042's reset line into a VM exit request.
#[derive(Clone)]
pub struct ResetLine(pub Arc<dyn ExitRequester>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        log::info!("guest reset through the i8042 (reset command 0xfe)");
        self.0.request_exit(GuestExit::Reset);
        Ok(())
    }
}

/// The controller at ports 0x60..=0x64 (data at offset 0, command/status at offset 4).
pub struct I8042 {
    dev: I8042Device<ResetLine>,
}

impl I8042 {
    /// A controller whose reset command stops the VM through `exit`.
    pub fn new(exit: Arc<dyn ExitRequester>) -> Self {
        Self {
            dev: I8042Device::new(ResetLine(exit)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            *b = self.dev.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            if let Err(e) = self.dev.write(off, *b) {
                log::warn!("i8042: write {b:#x} at offset {off}: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::RecordingExit;

    #[test]
    fn reset_command_requests_reset() {
        let rec = Arc::new(RecordingExit::default());
        let mut dev = I8042::new(rec.clone());
        // The kernel polls the status port until the input buffer is empty first.
        let mut status = [0xffu8];
        dev.read(4, &mut status);
        assert_eq!(status[0] & 0x2, 0, "input buffer empty");
        dev.write(4, &[0xfe]);
        assert_eq!(*rec.0.lock().unwrap(), vec![GuestExit::Reset]);
    }

    #[test]
    fn other_commands_do_not_reset() {
        let rec = Arc::new(RecordingExit::default());
        let mut dev = I8042::new(rec.clone());
        dev.write(4, &[0x20]);
        dev.write(0, &[0xfe]);
        assert!(rec.0.lock().unwrap().is_empty());
    }
}
