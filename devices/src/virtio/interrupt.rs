//! How a virtio transport interrupts the driver, whatever the transport: a shared line with an
//! interrupt status register the driver reads and acknowledges (virtio-mmio; PCI INTx with its
//! ISR register), or one vector per queue plus one for configuration changes (PCI MSI-X,
//! no status register).

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};

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

/// `VIRTIO_MSI_NO_VECTOR`: the driver gave this cause no vector (it gets no interrupt).
pub const NO_VECTOR: u16 = 0xffff;

/// Where MSI-X messages go: the transport's MSI-X table, which knows each vector's address,
/// data and mask (a masked vector's message is held in the pending bit array until unmasked).
pub trait MsixSink: Send + Sync {
    /// Sends (or, masked, holds) the message of `vector`.
    fn signal(&self, vector: u16) -> std::io::Result<()>;
}

/// One MSI-X vector per cause, as the driver assigns them (virtio-pci's `config_msix_vector`
/// and each queue's `queue_msix_vector`). There is no status register: each message stands
/// alone, and several queues may share a vector.
pub struct MsixVectors {
    config: AtomicU16,
    queues: Vec<AtomicU16>,
    /// Queues that used buffers since their last message went out (for
    /// [`VirtioInterrupt::raise_pending`] after a restore).
    sent: std::sync::atomic::AtomicU64,
    sink: Arc<dyn MsixSink>,
}

impl MsixVectors {
    /// `queues` queues and the configuration cause, none with a vector yet.
    pub fn new(queues: usize, sink: Arc<dyn MsixSink>) -> Self {
        Self {
            config: AtomicU16::new(NO_VECTOR),
            queues: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            sent: std::sync::atomic::AtomicU64::new(0),
            sink,
        }
    }

    /// The driver assigns `vector` to configuration changes.
    pub fn set_config_vector(&self, vector: u16) {
        self.config.store(vector, Ordering::SeqCst);
    }

    /// The configuration-change vector, as the driver reads it back.
    pub fn config_vector(&self) -> u16 {
        self.config.load(Ordering::SeqCst)
    }

    /// The driver assigns `vector` to queue `q` (out of range: ignored).
    pub fn set_queue_vector(&self, q: usize, vector: u16) {
        if let Some(v) = self.queues.get(q) {
            v.store(vector, Ordering::SeqCst);
        }
    }

    /// Queue `q`'s vector (`NO_VECTOR` out of range), as the driver reads it back.
    pub fn queue_vector(&self, q: usize) -> u16 {
        self.queues
            .get(q)
            .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst))
    }

    fn send(&self, vector: u16) {
        if vector == NO_VECTOR {
            return;
        }
        if let Err(e) = self.sink.signal(vector) {
            log::warn!("virtio: MSI-X vector {vector}: {e}");
        }
    }
}

impl VirtioInterrupt for MsixVectors {
    fn used(&self, queues: u64) {
        // One message per distinct vector, however many of its queues used buffers.
        let mut vectors: Vec<u16> = (0..self.queues.len())
            .filter(|&i| i < 64 && queues & (1 << i) != 0)
            .map(|i| self.queue_vector(i))
            .collect();
        vectors.sort_unstable();
        vectors.dedup();
        self.sent.fetch_or(queues, Ordering::SeqCst);
        for v in vectors {
            self.send(v);
        }
    }

    fn config_changed(&self) {
        self.send(self.config.load(Ordering::SeqCst));
    }

    fn pending(&self) -> Option<u32> {
        None
    }

    fn raise_pending(&self) {
        // Nothing records what the driver has seen: every queue that ever had used buffers
        // gets its message again, which a virtio driver takes as "look at the used ring".
        let q = self.sent.load(Ordering::SeqCst);
        if q != 0 {
            self.used(q);
        }
    }

    fn clear(&self) {
        self.sent.store(0, Ordering::SeqCst);
        self.config.store(NO_VECTOR, Ordering::SeqCst);
        for v in &self.queues {
            v.store(NO_VECTOR, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::CountingInterrupt;

    #[derive(Default)]
    struct Messages(std::sync::Mutex<Vec<u16>>);
    impl MsixSink for Messages {
        fn signal(&self, vector: u16) -> std::io::Result<()> {
            self.0.lock().unwrap().push(vector);
            Ok(())
        }
    }

    #[test]
    fn msix_sends_one_message_per_vector_and_none_without_one() {
        let m = Arc::new(Messages::default());
        let v = MsixVectors::new(3, m.clone());
        v.used(0b111);
        v.config_changed();
        assert!(m.0.lock().unwrap().is_empty(), "no vectors assigned yet");
        v.set_config_vector(0);
        v.set_queue_vector(0, 1);
        v.set_queue_vector(1, 2);
        v.set_queue_vector(2, 2); // queues 1 and 2 share vector 2
        v.set_queue_vector(7, 5); // no such queue
        assert_eq!(v.queue_vector(7), NO_VECTOR);
        v.used(0b110);
        v.used(0b001);
        v.config_changed();
        assert_eq!(*m.0.lock().unwrap(), vec![2, 1, 0]);
        assert_eq!(v.pending(), None, "MSI-X has no status register");
        m.0.lock().unwrap().clear();
        v.raise_pending();
        assert_eq!(*m.0.lock().unwrap(), vec![1, 2]);
        v.clear();
        m.0.lock().unwrap().clear();
        v.used(0b111);
        v.raise_pending();
        assert!(
            m.0.lock().unwrap().is_empty(),
            "a reset forgets the vectors"
        );
    }

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
