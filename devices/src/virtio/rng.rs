//! virtio-rng (entropy device, type 4): fills the driver's write-only buffers with bytes from the
//! host's `getrandom(2)`.

use crate::os::EventSet;
use vm_memory::Bytes;

use super::{
    DEVICE_TOKEN_BASE, DeviceState, DeviceStateError, Poller, QueueCtx, VIRTIO_F_VERSION_1,
    VirtioDevice,
};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig};

const TOKEN_LIMITER: u64 = DEVICE_TOKEN_BASE;

/// The virtio device ID of an entropy source.
pub const VIRTIO_ID_RNG: u32 = 4;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes given for one request, whatever the driver asks.
pub const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;

/// What the entropy device keeps across a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RngState {
    /// Random bytes handed to the guest so far.
    pub bytes_served: u64,
}

/// The entropy device.
pub struct Rng {
    /// Bytes handed to the guest so far.
    pub bytes_served: u64,
    limiter: Option<RateLimiter>,
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Rng {
    /// A new device.
    pub fn new() -> Self {
        Self {
            bytes_served: 0,
            limiter: None,
        }
    }

    /// A device whose bytes are limited by `config` (Firecracker's `entropy.rate_limiter`).
    pub fn with_limiter(config: RateLimiterConfig) -> std::io::Result<Self> {
        let limiter = if config.is_unlimited() {
            None
        } else {
            Some(RateLimiter::new(config)?)
        };
        Ok(Self {
            bytes_served: 0,
            limiter,
        })
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0); // no configuration space
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn save(&self) -> DeviceState {
        DeviceState::Rng(RngState {
            bytes_served: self.bytes_served,
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        let DeviceState::Rng(s) = state else {
            return Err(DeviceStateError::kind("virtio-rng", state));
        };
        self.bytes_served = s.bytes_served;
        Ok(())
    }

    fn activate(&mut self, _features: u64, ctx: &mut QueueCtx<'_>) {
        if let Some(l) = &self.limiter {
            if let Err(e) = ctx.poller.add(l.timer_fd(), EventSet::IN, TOKEN_LIMITER) {
                log::warn!("virtio-rng: cannot watch the rate limiter timer: {e}");
            }
        }
    }

    fn reset(&mut self, poller: &Poller) {
        if let Some(l) = &self.limiter {
            poller.remove(l.timer_fd());
        }
    }

    fn process_backend(&mut self, token: u64, _events: EventSet, ctx: &mut QueueCtx<'_>) {
        if token == TOKEN_LIMITER {
            if let Some(l) = &mut self.limiter {
                l.timer_fired();
            }
            self.process_queue(0, ctx);
        }
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn process_queue(&mut self, _index: u16, ctx: &mut QueueCtx<'_>) {
        let mem = ctx.mem;
        loop {
            let Some(chain) = ctx.pop(0) else {
                return;
            };
            let head = chain.head_index();
            // The chain iterator stops at the queue size, so a looped chain ends.
            let bufs: Vec<_> = chain
                .filter(|d| d.is_write_only() && d.len() > 0)
                .map(|d| (d.addr(), d.len()))
                .collect();
            let wanted = bufs
                .iter()
                .map(|b| u64::from(b.1))
                .sum::<u64>()
                .min(u64::from(MAX_BYTES_PER_REQUEST));
            if let Some(l) = &mut self.limiter {
                if !l.consume(wanted) {
                    // Try again when the limiter's timer fires.
                    ctx.unpop(0);
                    return;
                }
            }
            let mut written: u32 = 0;
            for (addr, len) in bufs {
                let room = MAX_BYTES_PER_REQUEST - written;
                let len = len.min(room);
                if len == 0 {
                    break;
                }
                let mut bytes = vec![0u8; len as usize];
                if let Err(e) = crate::os::fill_random(&mut bytes) {
                    log::warn!("virtio-rng: getrandom: {e}");
                    break;
                }
                if let Err(e) = mem.write_slice(&bytes, addr) {
                    log::debug!("virtio-rng: bad buffer {:#x}+{len}: {e}", addr.0);
                    break;
                }
                written += len;
            }
            if !ctx.add_used(0, head, written) {
                return;
            }
            self.bytes_served = self.bytes_served.wrapping_add(u64::from(written));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limiter::TokenBucketConfig;
    use crate::virtio::testutil::*;

    #[test]
    fn rate_limiter_spaces_out_requests() {
        let limit = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 1024,
                one_time_burst: 0,
                refill_time: 100,
            }),
            ops: None,
        };
        let mut d = Driver::new(Box::new(Rng::with_limiter(limit).unwrap()));
        for i in 0..3u16 {
            d.chain(0, i, &[(DATA + u64::from(i) * 0x1000, 1024, true)]);
            d.make_available(0, i);
        }
        d.notify(0);
        assert_eq!(
            d.take_used(0),
            vec![(0, 1024)],
            "one bucket's worth at once"
        );
        // Another notification does not get past the empty bucket.
        d.notify(0);
        assert!(d.take_used(0).is_empty());
        let t = std::time::Instant::now();
        let mut got = 0;
        while got < 2 && t.elapsed() < std::time::Duration::from_secs(5) {
            d.dev.run_ready(50);
            got += d.take_used(0).len();
        }
        assert_eq!(got, 2, "the limiter's timer released the rest");
    }
}
