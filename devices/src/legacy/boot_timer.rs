//! Firecracker's boot-timer device: the guest writes a magic byte when it has booted, and the
//! VMM logs how long that took since the process started.

use std::time::{Duration, Instant};

use crate::bus::BusDevice;

/// CPU time this process has used so far.
pub fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the call writes only into it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// The boot timer. Logs at `info` level (target `boot_timer`) on every magic write.
pub struct BootTimer {
    start: Instant,
    magic: u8,
    /// The last measurement, for tests and metrics.
    pub last: Option<(Duration, Duration)>,
}

impl BootTimer {
    /// A timer counting from `start` (the process start), waiting for `magic`.
    pub fn new(start: Instant, magic: u8) -> Self {
        Self {
            start,
            magic,
            last: None,
        }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.first() != Some(&self.magic) {
            return;
        }
        let wall = self.start.elapsed();
        let cpu = process_cpu_time();
        self.last = Some((wall, cpu));
        log::info!(
            target: "boot_timer",
            "Guest-boot-time = {:>6} us {} ms, {:>6} CPU us {} CPU ms",
            wall.as_micros(),
            wall.as_millis(),
            cpu.as_micros(),
            cpu.as_millis()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_magic_byte_at_offset_0_counts() {
        let mut t = BootTimer::new(Instant::now(), 123);
        t.write(0, &[122]);
        t.write(1, &[123]);
        t.write(0, &[]);
        assert!(t.last.is_none());
        t.write(0, &[123]);
        assert!(t.last.is_some());
    }
}
