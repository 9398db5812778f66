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

/// Test double: a `Write` whose bytes can be read back from a clone.
#[cfg(any(test, feature = "test-utils"))]
#[derive(Clone, Default)]
pub struct SharedBuf(pub Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(any(test, feature = "test-utils"))]
impl SharedBuf {
    /// What was written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(any(test, feature = "test-utils"))]
impl std::io::Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
