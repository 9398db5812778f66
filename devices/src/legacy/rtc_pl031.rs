//! The ARM PL031 real-time clock (vm-superio's model) on the MMIO bus: the ARM64 guest reads
//! the wall-clock time from it at boot.

use vm_superio::Rtc;
use vm_superio::rtc_pl031::NoEvents;

use crate::bus::BusDevice;

/// A PL031 in a 4 KiB window. Its alarm interrupt is not wired (Linux does not need it).
#[derive(Default)]
pub struct RtcPl031(Rtc<NoEvents>);

impl BusDevice for RtcPl031 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u16::try_from(offset), <&mut [u8; 4]>::try_from(&mut *data)) {
            (Ok(off), Ok(word)) if off % 4 == 0 => self.0.read(off, word),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), Ok(word)) = (u16::try_from(offset), <&[u8; 4]>::try_from(data)) {
            if off % 4 == 0 {
                self.0.write(off, word);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_time_and_its_primecell_id() {
        let mut rtc = RtcPl031::default();
        let mut w = [0u8; 4];
        rtc.read(0, &mut w); // RTCDR: seconds since the epoch
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let t = u64::from(u32::from_le_bytes(w));
        assert!(t + 5 >= now && t <= now + 5, "{t} vs {now}");
        rtc.read(0xfe0, &mut w);
        assert_eq!(w[0], 0x31, "PL031 part number");
        let mut odd = [0u8; 2];
        rtc.read(1, &mut odd);
        rtc.write(0x1_0000_0000, &[1, 2, 3, 4]);
    }
}
