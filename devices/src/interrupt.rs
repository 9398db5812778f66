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

/// Where a VM's message-signalled interrupts (MSI-X) come from: KVM routes each vector to a
/// GSI and raises it through an irqfd. `devid` is the requester ID (bus << 8 | device << 3 |
/// function), which an ARM64 GICv3 ITS needs to find the interrupt's translation.
pub trait MsiController: Send + Sync {
    /// `count` vectors for the function `devid`, none routed yet.
    fn vectors(&self, count: u16, devid: u32) -> std::io::Result<Arc<dyn MsiVectors>>;
}

/// One function's vectors as the hypervisor holds them.
pub trait MsiVectors: Send + Sync {
    /// From now on vector `vector` writes `data` to `address` (the guest changed its table
    /// entry).
    fn route(&self, vector: u16, address: u64, data: u32) -> std::io::Result<()>;
    /// Sends vector `vector`'s message as last routed.
    fn trigger(&self, vector: u16) -> std::io::Result<()>;
}

/// What a [`RecordingMsi`] saw.
#[cfg(any(test, feature = "test-utils"))]
#[derive(Default)]
struct MsiLog {
    /// (devid, vector) → (address, data).
    routes: std::collections::HashMap<(u32, u16), (u64, u32)>,
    route_calls: usize,
    sent: Vec<(u64, u32, u32)>,
    /// Routes to this address fail, as a hypervisor refuses a message it cannot deliver.
    refused: Option<u64>,
}

/// Test double: an MSI controller that records every message sent as (address, data, devid).
#[cfg(any(test, feature = "test-utils"))]
#[derive(Clone, Default)]
pub struct RecordingMsi {
    log: Arc<std::sync::Mutex<MsiLog>>,
    devid: u32,
}

#[cfg(any(test, feature = "test-utils"))]
impl MsiController for RecordingMsi {
    fn vectors(&self, _count: u16, devid: u32) -> std::io::Result<Arc<dyn MsiVectors>> {
        Ok(Arc::new(Self {
            log: self.log.clone(),
            devid,
        }))
    }
}

#[cfg(any(test, feature = "test-utils"))]
impl MsiVectors for RecordingMsi {
    fn route(&self, vector: u16, address: u64, data: u32) -> std::io::Result<()> {
        let mut log = self.lock();
        log.route_calls += 1;
        if log.refused == Some(address) {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        log.routes.insert((self.devid, vector), (address, data));
        Ok(())
    }

    fn trigger(&self, vector: u16) -> std::io::Result<()> {
        let mut log = self.lock();
        let &(address, data) = log.routes.get(&(self.devid, vector)).ok_or_else(|| {
            std::io::Error::other(format!("vector {vector} triggered before it was routed"))
        })?;
        log.sent.push((address, data, self.devid));
        Ok(())
    }
}

#[cfg(any(test, feature = "test-utils"))]
impl RecordingMsi {
    fn lock(&self) -> std::sync::MutexGuard<'_, MsiLog> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The messages so far, and forgets them.
    pub fn take(&self) -> Vec<(u64, u32, u32)> {
        std::mem::take(&mut self.lock().sent)
    }

    /// Routes to `address` fail from now on.
    pub fn refuse(&self, address: u64) {
        self.lock().refused = Some(address);
    }

    /// How many times a route was set (or tried).
    pub fn route_calls(&self) -> usize {
        self.lock().route_calls
    }
}
