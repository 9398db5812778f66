//! How a virtio transport interrupts the driver, whatever the transport: a shared line with an
//! interrupt status register the driver reads and acknowledges (virtio-mmio; PCI INTx with its
//! ISR register), or one vector per queue plus one for configuration changes (PCI MSI-X,
//! no status register).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::interrupt::IrqLine;

/// Interrupt status: the device used buffers.
pub const INT_USED_BUFFER: u32 = 1;
/// Interrupt status: the configuration space changed.
pub const INT_CONFIG: u32 = 2;

/// What the transport-neutral device half ([`super::device_side::DeviceSide`]) asks of the
/// transport's interrupts.
pub trait VirtioInterrupt: Send + Sync {
    /// Buffers were used on the queues whose bits `queues` sets (bit `i`: queue `i`).
    fn used(&self, queues: u64);
    /// The configuration space changed.
    fn config_changed(&self);
    /// Status bits the driver has not acknowledged yet; `None` where the transport has no
    /// status register (MSI-X: each message stands alone).
    fn pending(&self) -> Option<u32>;
    /// Raises again whatever is pending (a restored VM's interrupt controllers missed it, or
    /// the driver never saw it).
    fn raise_pending(&self);
    /// Forgets what is pending (a device reset).
    fn clear(&self);
}

/// One line shared by every cause, with the interrupt status register the driver reads to
/// learn the cause and writes to acknowledge it.
pub struct SharedLine {
    status: Arc<AtomicU32>,
    line: IrqLine,
}

impl SharedLine {
    /// A line raised through `line`, nothing pending.
    pub fn new(line: IrqLine) -> Self {
        Self {
            status: Arc::new(AtomicU32::new(0)),
            line,
        }
    }

    /// The status register's bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledged `bits`.
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets the status to `bits` without raising the line (a restore; see
    /// [`VirtioInterrupt::raise_pending`]).
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = vm_superio::Trigger::trigger(&self.line) {
            log::warn!("virtio: interrupt: {e}");
        }
    }
}

impl VirtioInterrupt for SharedLine {
    fn used(&self, queues: u64) {
        if queues != 0 {
            self.raise(INT_USED_BUFFER);
        }
    }

    fn config_changed(&self) {
        self.raise(INT_CONFIG);
    }

    fn pending(&self) -> Option<u32> {
        Some(self.status())
    }

    fn raise_pending(&self) {
        if self.status() != 0 {
            self.raise(0);
        }
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::CountingInterrupt;

    #[test]
    fn a_shared_line_keeps_the_cause_until_acknowledged() {
        let irq = Arc::new(CountingInterrupt::default());
        let l = SharedLine::new(IrqLine(irq.clone()));
        l.used(0);
        assert_eq!((l.status(), irq.count()), (0, 0), "no queue, no interrupt");
        l.used(0b101);
        l.config_changed();
        assert_eq!(l.pending(), Some(INT_USED_BUFFER | INT_CONFIG));
        assert_eq!(irq.count(), 2);
        l.acknowledge(INT_USED_BUFFER);
        assert_eq!(l.status(), INT_CONFIG);
        l.raise_pending();
        assert_eq!(irq.count(), 3);
        l.acknowledge(INT_CONFIG);
        l.raise_pending();
        assert_eq!(irq.count(), 3, "nothing pending, nothing raised");
        l.set_status(INT_CONFIG);
        assert_eq!(
            irq.count(),
            3,
            "a restored status is raised only when asked"
        );
        l.clear();
        assert_eq!(l.pending(), Some(0));
    }
}
