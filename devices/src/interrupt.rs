//! How devices raise interrupts without knowing the hypervisor.

use std::sync::Arc;

/// An edge-triggered interrupt line into the guest (an irqfd on KVM).
pub trait Interrupt: Send + Sync {
    /// Raises the interrupt.
    fn trigger(&self) -> std::io::Result<()>;
}

/// An [`Interrupt`] usable where vm-superio wants a [`vm_superio::Trigger`].
#[derive(Clone)]
pub struct IrqLine(pub Arc<dyn Interrupt>);

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger()
    }
}

/// Test double: counts triggers.
#[cfg(any(test, feature = "test-utils"))]
#[derive(Default)]
pub struct CountingInterrupt(pub std::sync::atomic::AtomicUsize);

#[cfg(any(test, feature = "test-utils"))]
impl Interrupt for CountingInterrupt {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(any(test, feature = "test-utils"))]
impl CountingInterrupt {
    /// How many times the line was raised.
    pub fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}
