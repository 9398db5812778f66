//! The hardware-reduced ACPI power-management registers: sleep control (S5 = power off), sleep
//! status and reset. Their ports are announced in the FADT.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::exit::{ExitRequester, GuestExit};

/// `SLP_EN` in the sleep control register.
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// Sleep control at offset 0, sleep status at 1, reset at 2.
pub struct AcpiPm {
    exit: Arc<dyn ExitRequester>,
    s5_sleep_type: u8,
    reset_value: u8,
}

impl AcpiPm {
    /// Powers off on `SLP_TYP = s5_sleep_type | SLP_EN`, resets on `reset_value` at offset 2.
    pub fn new(exit: Arc<dyn ExitRequester>, s5_sleep_type: u8, reset_value: u8) -> Self {
        Self {
            exit,
            s5_sleep_type,
            reset_value,
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // No wake events ever pending; sleep control reads as 0.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 if v & SLP_EN != 0 && (v >> SLP_TYP_SHIFT) & SLP_TYP_MASK == self.s5_sleep_type => {
                log::info!("guest entered ACPI S5 (power off)");
                self.exit.request_exit(GuestExit::PowerOff)
            }
            2 if v == self.reset_value => {
                log::info!("guest reset through the ACPI reset register");
                self.exit.request_exit(GuestExit::Reset)
            }
            _ => log::debug!("acpi-pm: ignored write {v:#x} at offset {offset}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::RecordingExit;

    #[test]
    fn s5_with_slp_en_powers_off_and_reset_resets() {
        let rec = Arc::new(RecordingExit::default());
        let mut pm = AcpiPm::new(rec.clone(), 5, 1);
        pm.write(0, &[5 << 2]); // SLP_TYP without SLP_EN: nothing
        pm.write(0, &[(3 << 2) | SLP_EN]); // S3: not supported, nothing
        pm.write(1, &[0xff]);
        pm.write(0, &[]);
        assert!(rec.0.lock().unwrap().is_empty());
        pm.write(0, &[(5 << 2) | SLP_EN]);
        pm.write(2, &[1]);
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![GuestExit::PowerOff, GuestExit::Reset]
        );
    }
}
