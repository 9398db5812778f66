//! A minimal MC146818 CMOS/RTC: index port at offset 0, data at offset 1. The clock registers
//! read the host's UTC time in BCD; the update-in-progress bit is never set, so a guest never
//! waits on it. Other CMOS bytes are plain storage.

use crate::bus::BusDevice;

const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
/// 32.768 kHz time base, 1024 Hz periodic rate; UIP clear.
const REG_A_VALUE: u8 = 0x26;
/// 24-hour mode, BCD.
const REG_B_VALUE: u8 = 0x02;
/// Valid RAM and time.
const REG_D_VALUE: u8 = 0x80;

/// The CMOS chip.
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    now: fn() -> i64,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Default for Cmos {
    fn default() -> Self {
        Self::with_clock(unix_now)
    }
}

fn bcd(v: i64) -> u8 {
    let v = v.rem_euclid(100) as u8;
    ((v / 10) << 4) | (v % 10)
}

/// (year, month 1-12, day 1-31, weekday 1-7 with Sunday = 1) of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64, i64) {
    // Howard Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    // 1970-01-01 was a Thursday (weekday 5 with Sunday = 1).
    let wd = (days + 4).rem_euclid(7) + 1;
    (y, m, d, wd)
}

impl Cmos {
    /// A CMOS whose clock reads `now()` (seconds since the Unix epoch).
    pub fn with_clock(now: fn() -> i64) -> Self {
        Self {
            index: 0,
            ram: [0; 128],
            now,
        }
    }

    fn register(&self, idx: u8) -> u8 {
        let t = (self.now)();
        let (secs, days) = (t.rem_euclid(86_400), t.div_euclid(86_400));
        let (y, mo, d, wd) = civil_from_days(days);
        match idx {
            0x00 => bcd(secs % 60),
            0x02 => bcd(secs / 60 % 60),
            0x04 => bcd(secs / 3600),
            0x06 => bcd(wd),
            0x07 => bcd(d),
            0x08 => bcd(mo),
            0x09 => bcd(y % 100),
            REG_CENTURY => bcd(y / 100),
            REG_A => REG_A_VALUE,
            REG_B => REG_B_VALUE,
            REG_C => 0,
            REG_D => REG_D_VALUE,
            i => self.ram[usize::from(i & 0x7f)],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            0 => self.index,
            1 => self.register(self.index),
            _ => 0xff,
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask.
            0 => self.index = v & 0x7f,
            1 if self.index > REG_D && self.index != REG_CENTURY => {
                self.ram[usize::from(self.index)] = v
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_reg(c: &mut Cmos, idx: u8) -> u8 {
        c.write(0, &[idx]);
        let mut b = [0u8];
        c.read(1, &mut b);
        b[0]
    }

    #[test]
    fn clock_reads_bcd_utc() {
        // 2026-11-23 12:34:56 UTC, a Monday.
        let mut c = Cmos::with_clock(|| 1_795_437_296);
        assert_eq!(read_reg(&mut c, 0x00), 0x56);
        assert_eq!(read_reg(&mut c, 0x02), 0x34);
        assert_eq!(read_reg(&mut c, 0x04), 0x12);
        assert_eq!(read_reg(&mut c, 0x07), 0x23);
        assert_eq!(read_reg(&mut c, 0x08), 0x11);
        assert_eq!(read_reg(&mut c, 0x09), 0x26);
        assert_eq!(read_reg(&mut c, REG_CENTURY), 0x20);
        assert_eq!(read_reg(&mut c, 0x06), 2);
        assert_eq!(
            read_reg(&mut c, REG_A) & 0x80,
            0,
            "never update-in-progress"
        );
    }

    #[test]
    fn ram_is_storage_and_clock_is_read_only() {
        let mut c = Cmos::with_clock(|| 0);
        c.write(0, &[0x80 | 0x20]);
        c.write(1, &[0x5a]);
        assert_eq!(read_reg(&mut c, 0x20), 0x5a);
        c.write(0, &[0x00]);
        c.write(1, &[0x99]);
        assert_eq!(read_reg(&mut c, 0x00), 0x00);
    }
}
