//! How a running VM comes to an end: devices and vCPU threads post a reason, the VMM thread
//! wakes on an eventfd and stops the VM.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use devices::exit::{ExitRequester, GuestExit};
use vmm_sys_util::eventfd::EventFd;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmStop {
    /// The guest reset or powered off.
    Guest(GuestExit),
    /// A vCPU hit something tern cannot handle.
    VcpuFailed {
        /// Which vCPU.
        index: u8,
        /// What happened.
        reason: String,
    },
}

/// The first stop reason wins; later ones are logged and dropped.
pub struct ExitChannel {
    reason: Mutex<Option<VmStop>>,
    /// Set once a reason is posted: what vCPU threads check after every exit, without a lock.
    stopping: AtomicBool,
    /// Readable once a reason is posted.
    pub evt: EventFd,
}

impl ExitChannel {
    /// A channel with no reason posted.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            stopping: AtomicBool::new(false),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Posts `stop` unless a reason is already there, and wakes the VMM thread.
    pub fn post(&self, stop: VmStop) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(stop);
            self.stopping.store(true, Ordering::Release);
        } else {
            log::debug!("VM already stopping; ignoring {stop:?}");
        }
        if let Err(e) = self.evt.write(1) {
            log::error!("cannot wake the VMM thread: {e}");
        }
    }

    /// Whether a reason was posted (cheap; for hot paths).
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// The reason, if one was posted.
    pub fn reason(&self) -> Option<VmStop> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ExitRequester for ExitChannel {
    fn request_exit(&self, reason: GuestExit) {
        self.post(VmStop::Guest(reason));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes() {
        let c = ExitChannel::new().unwrap();
        assert_eq!(c.reason(), None);
        assert!(!c.is_stopping());
        c.request_exit(GuestExit::PowerOff);
        c.post(VmStop::VcpuFailed {
            index: 1,
            reason: "x".into(),
        });
        assert_eq!(c.reason(), Some(VmStop::Guest(GuestExit::PowerOff)));
        assert!(c.is_stopping());
        assert!(c.evt.read().unwrap() >= 1);
    }
}
