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

/// Delivers message-signalled interrupts (MSI, MSI-X) into the guest: KVM's MSI injection on
/// Linux. `devid` is the requester ID (bus << 8 | device << 3 | function), which an ARM64 GICv3
/// ITS needs to find the interrupt's translation.
pub trait MsiSender: Send + Sync {
    /// Writes `data` to `address` as the device would.
    fn send_msi(&self, address: u64, data: u32, devid: u32) -> std::io::Result<()>;
}

/// Test double: records every message.
#[cfg(any(test, feature = "test-utils"))]
#[derive(Default)]
pub struct RecordingMsi(pub std::sync::Mutex<Vec<(u64, u32, u32)>>);

#[cfg(any(test, feature = "test-utils"))]
impl MsiSender for RecordingMsi {
    fn send_msi(&self, address: u64, data: u32, devid: u32) -> std::io::Result<()> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((address, data, devid));
        Ok(())
    }
}

#[cfg(any(test, feature = "test-utils"))]
impl RecordingMsi {
    /// The messages so far, and forgets them.
    pub fn take(&self) -> Vec<(u64, u32, u32)> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
