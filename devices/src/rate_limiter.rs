//! Firecracker's rate limiter: a bandwidth bucket (bytes) and an ops bucket (requests), each a
//! token bucket of `size` tokens refilled completely every `refill_time` ms, plus an optional
//! `one_time_burst` spent first. A request larger than a bucket passes when the bucket is full
//! and leaves it in debt, so any size goes through at the configured average rate.
//!
//! When a bucket runs dry the limiter arms its timerfd for the moment enough tokens will be
//! back; the device's worker waits on that descriptor and retries then.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::os::{TimerFd, nonblocking_timer};
use serde::{Deserialize, Serialize};

/// One token bucket, in Firecracker's JSON shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Tokens the bucket holds (bytes or operations).
    pub size: u64,
    /// Extra tokens spent before the bucket, once.
    #[serde(default)]
    pub one_time_burst: u64,
    /// Milliseconds to refill an empty bucket.
    pub refill_time: u64,
}

/// A rate limiter, in Firecracker's JSON shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// Bytes.
    #[serde(default)]
    pub bandwidth: Option<TokenBucketConfig>,
    /// Operations.
    #[serde(default)]
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimiterConfig {
    /// Checks the values; `field` names the section in the message.
    pub fn check(&self, field: &str) -> Result<(), String> {
        for (name, b) in [("bandwidth", &self.bandwidth), ("ops", &self.ops)] {
            if let Some(b) = b {
                if b.size == 0 {
                    return Err(format!(
                        "{field}.{name}.size must be at least 1 (omit {name} for no limit)"
                    ));
                }
                if b.refill_time == 0 {
                    return Err(format!(
                        "{field}.{name}.refill_time must be at least 1 ms (omit {name} for no limit)"
                    ));
                }
            }
        }
        Ok(())
    }

    /// True when neither bucket is set.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }
}

/// Which bucket a request draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// Bytes.
    Bytes,
    /// Operations.
    Ops,
}

#[derive(Debug, Clone)]
struct Bucket {
    size: u64,
    refill_ns: u64,
    /// Tokens available; negative after an oversized request.
    budget: i128,
    burst: u64,
    last: Instant,
}

impl Bucket {
    fn new(c: &TokenBucketConfig, now: Instant) -> Self {
        Self {
            size: c.size,
            refill_ns: c.refill_time.saturating_mul(1_000_000),
            budget: i128::from(c.size),
            burst: c.one_time_burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let ns = now.saturating_duration_since(self.last).as_nanos();
        if ns == 0 {
            return;
        }
        let add = ns * u128::from(self.size) / u128::from(self.refill_ns.max(1));
        if add == 0 {
            return; // keep `last` so that small steps add up
        }
        self.budget = (self.budget + add as i128).min(i128::from(self.size));
        self.last = now;
    }

    /// Takes `n` tokens, or says how long until they can be taken.
    fn take(&mut self, n: u64, now: Instant) -> Result<(), Duration> {
        if self.burst > 0 {
            let from_burst = n.min(self.burst);
            self.burst -= from_burst;
            if from_burst == n {
                return Ok(());
            }
            return self.take(n - from_burst, now);
        }
        self.refill(now);
        let need = i128::from(n.min(self.size));
        if self.budget >= need {
            self.budget -= i128::from(n);
            return Ok(());
        }
        let missing = (need - self.budget) as u128;
        let ns = missing * u128::from(self.refill_ns) / u128::from(self.size.max(1));
        Err(Duration::from_nanos(
            u64::try_from(ns).unwrap_or(u64::MAX).saturating_add(1),
        ))
    }

    fn give_back(&mut self, n: u64) {
        self.budget = (self.budget + i128::from(n)).min(i128::from(self.size));
    }
}

/// A rate limiter with its timer.
pub struct RateLimiter {
    bandwidth: Option<Bucket>,
    ops: Option<Bucket>,
    timer: TimerFd,
    blocked: bool,
    config: RateLimiterConfig,
}

impl RateLimiter {
    /// A limiter for `config` (full buckets).
    pub fn new(config: RateLimiterConfig) -> std::io::Result<Self> {
        let now = Instant::now();
        Ok(Self {
            bandwidth: config.bandwidth.as_ref().map(|c| Bucket::new(c, now)),
            ops: config.ops.as_ref().map(|c| Bucket::new(c, now)),
            timer: nonblocking_timer()?,
            blocked: false,
            config,
        })
    }

    /// The configuration it runs.
    pub fn config(&self) -> RateLimiterConfig {
        self.config
    }

    /// The timer descriptor to wait on: readable when a blocked limiter may go on.
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// True while waiting for the timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The timer fired: clears the blocked state (call before retrying).
    pub fn timer_fired(&mut self) {
        let _ = self.timer.wait();
        self.blocked = false;
    }

    /// Takes one operation and `bytes` bytes, or neither (and arms the timer).
    pub fn consume(&mut self, bytes: u64) -> bool {
        if self.blocked {
            return false;
        }
        let now = Instant::now();
        if let Some(ops) = &mut self.ops {
            if let Err(wait) = ops.take(1, now) {
                self.block(wait);
                return false;
            }
        }
        if bytes > 0 {
            if let Some(bw) = &mut self.bandwidth {
                if let Err(wait) = bw.take(bytes, now) {
                    if let Some(ops) = &mut self.ops {
                        ops.give_back(1);
                    }
                    self.block(wait);
                    return false;
                }
            }
        }
        true
    }

    /// Takes `n` tokens of one kind only (virtio-net charges bytes and ops separately).
    pub fn consume_one(&mut self, n: u64, kind: TokenType) -> bool {
        if self.blocked {
            return false;
        }
        let bucket = match kind {
            TokenType::Bytes => &mut self.bandwidth,
            TokenType::Ops => &mut self.ops,
        };
        let Some(b) = bucket else {
            return true;
        };
        match b.take(n, Instant::now()) {
            Ok(()) => true,
            Err(wait) => {
                self.block(wait);
                false
            }
        }
    }

    fn block(&mut self, wait: Duration) {
        self.blocked = true;
        // A timer at least 1 ms out: shorter waits only spin.
        let wait = wait.max(Duration::from_millis(1));
        if let Err(e) = self.timer.reset(wait, None) {
            log::warn!("rate limiter: cannot arm the timer ({e}); retrying without one");
            self.blocked = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, refill_ms: u64, burst: u64) -> TokenBucketConfig {
        TokenBucketConfig {
            size,
            one_time_burst: burst,
            refill_time: refill_ms,
        }
    }

    /// A refill time the API accepts (any u64 of milliseconds) cannot overflow the wait: wave
    /// 1's `as u64 + 1` panicked here in a debug build.
    #[test]
    fn the_longest_refill_time_waits_without_overflow() {
        let now = Instant::now();
        let mut b = Bucket::new(&bucket(1, u64::MAX, 0), now);
        assert!(b.take(1, now).is_ok());
        let wait = b.take(1, now).unwrap_err();
        assert_eq!(wait, Duration::from_nanos(u64::MAX));
    }

    #[test]
    fn bucket_refills_over_time_and_reports_the_wait() {
        let t0 = Instant::now();
        let mut b = Bucket::new(&bucket(1000, 100, 0), t0);
        assert!(b.take(600, t0).is_ok());
        let wait = b.take(600, t0).unwrap_err();
        // 200 tokens missing at 10 tokens/ms: 20 ms.
        assert!(
            wait >= Duration::from_millis(20) && wait < Duration::from_millis(21),
            "{wait:?}"
        );
        assert!(b.take(600, t0 + Duration::from_millis(20)).is_ok());
        // Refill never exceeds the size.
        let mut b = Bucket::new(&bucket(1000, 100, 0), t0);
        b.refill(t0 + Duration::from_secs(100));
        assert_eq!(b.budget, 1000);
    }

    #[test]
    fn oversized_requests_pass_when_full_and_leave_debt() {
        let t0 = Instant::now();
        let mut b = Bucket::new(&bucket(100, 10, 0), t0);
        assert!(b.take(1000, t0).is_ok());
        assert_eq!(b.budget, -900);
        // Paying the debt back takes 1000 tokens' time (100 ms) before the next full request.
        assert!(b.take(100, t0 + Duration::from_millis(50)).is_err());
        assert!(b.take(100, t0 + Duration::from_millis(100)).is_ok());
    }

    #[test]
    fn one_time_burst_is_spent_first_and_once() {
        let t0 = Instant::now();
        let mut b = Bucket::new(&bucket(10, 1000, 50), t0);
        assert!(b.take(50, t0).is_ok());
        assert_eq!(b.budget, 10);
        assert!(b.take(10, t0).is_ok());
        assert!(b.take(1, t0).is_err());
    }

    #[test]
    fn limiter_blocks_arms_the_timer_and_resumes() {
        let mut rl = RateLimiter::new(RateLimiterConfig {
            bandwidth: Some(bucket(4096, 20, 0)),
            ops: Some(bucket(100, 1000, 0)),
        })
        .unwrap();
        assert!(rl.consume(4096));
        assert!(!rl.consume(4096), "bandwidth exhausted");
        assert!(rl.is_blocked());
        assert!(!rl.consume(1), "blocked until the timer fires");
        // The timer fires within the refill time.
        let mut pfd = libc::pollfd {
            fd: rl.timer_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, count 1.
        let n = unsafe { libc::poll(&mut pfd, 1, 1000) };
        assert_eq!(n, 1);
        rl.timer_fired();
        assert!(rl.consume(4096));
        // The op given back on the bandwidth refusal is not lost: 2 of 100 spent (plus
        // whatever refilled meanwhile).
        assert!((98..100).contains(&rl.ops.as_ref().unwrap().budget));
    }

    #[test]
    fn config_checks() {
        let bad = RateLimiterConfig {
            bandwidth: Some(bucket(0, 100, 0)),
            ops: None,
        };
        assert!(bad.check("x").unwrap_err().contains("x.bandwidth.size"));
        let bad = RateLimiterConfig {
            bandwidth: None,
            ops: Some(bucket(10, 0, 0)),
        };
        assert!(bad.check("x").unwrap_err().contains("refill_time"));
        assert!(RateLimiterConfig::default().is_unlimited());
        let v: RateLimiterConfig =
            serde_json::from_str(r#"{"bandwidth":{"size":100,"refill_time":10}}"#).unwrap();
        assert_eq!(v.bandwidth.unwrap().one_time_burst, 0);
        assert!(serde_json::from_str::<RateLimiterConfig>(r#"{"bw":{}}"#).is_err());
    }
}
