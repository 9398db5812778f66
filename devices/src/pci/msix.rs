//! MSI-X (PCI Local Bus 3.0, section 6.8.2): the capability's message control, the vector
//! table (address, data, mask per vector) and the pending bit array. A message for a masked
//! vector, or while the whole function is masked, waits in the PBA and goes out when it is
//! unmasked, as the specification asks. Each vector reaches the guest through the
//! hypervisor's route for it ([`MsiVectors`]), set again only after the guest rewrote the
//! entry and the vector fires.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::interrupt::MsiVectors;
use crate::virtio::interrupt::MsixSink;

/// The MSI-X capability ID.
pub const CAP_ID: u8 = 0x11;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Message control: MSI-X enable.
pub const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: the vector is masked.
const VECTOR_MASKED: u32 = 1;

/// One vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixEntry {
    /// Message address (low and high dwords).
    pub address: u64,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub control: u32,
}

impl Default for MsixEntry {
    fn default() -> Self {
        // Every vector starts masked.
        Self {
            address: 0,
            data: 0,
            control: VECTOR_MASKED,
        }
    }
}

/// The table and PBA in a snapshot (enable and function mask are in the configuration space).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixState {
    /// The vectors.
    pub entries: Vec<MsixEntry>,
    /// Pending bits, 64 vectors per word.
    pub pba: Vec<u64>,
}

/// Whether the hypervisor routes a vector to its entry's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Not yet, or the guest changed the entry since.
    Stale,
    /// Yes.
    Set,
    /// The hypervisor refused this message (said once in the log); the vector's messages
    /// are dropped until the guest rewrites the entry.
    Refused,
}

struct Inner {
    entries: Vec<MsixEntry>,
    pba: Vec<u64>,
    /// Each vector's route in the hypervisor against its entry.
    routes: Vec<Route>,
    enabled: bool,
    function_masked: bool,
}

impl Inner {
    fn masked(&self, v: usize) -> bool {
        self.function_masked || self.entries[v].control & VECTOR_MASKED != 0
    }

    fn pending(&self, v: usize) -> bool {
        self.pba[v / 64] & (1 << (v % 64)) != 0
    }

    fn set_pending(&mut self, v: usize, on: bool) {
        if on {
            self.pba[v / 64] |= 1 << (v % 64);
        } else {
            self.pba[v / 64] &= !(1 << (v % 64));
        }
    }
}

/// A function's MSI-X vectors, shared by the vCPUs (table accesses, the capability's control
/// bits) and the device's worker (messages).
pub struct Msix {
    inner: Mutex<Inner>,
    out: Arc<dyn MsiVectors>,
}

impl Msix {
    /// `vectors` vectors (1..=2048; `out` holds as many), all masked, MSI-X disabled.
    pub fn new(vectors: u16, out: Arc<dyn MsiVectors>) -> Self {
        let n = usize::from(vectors.clamp(1, 2048));
        Self {
            inner: Mutex::new(Inner {
                entries: vec![MsixEntry::default(); n],
                pba: vec![0; n.div_ceil(64)],
                routes: vec![Route::Stale; n],
                enabled: false,
                function_masked: false,
            }),
            out,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The number of vectors.
    pub fn len(&self) -> u16 {
        self.lock().entries.len() as u16
    }

    /// Never true: a function has at least one vector.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The capability's body (after ID and next pointer): message control with the table
    /// size, then the table's and the PBA's offset and BAR.
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> [u8; 10] {
        let mut b = [0u8; 10];
        b[0..2].copy_from_slice(&(self.len() - 1).to_le_bytes());
        b[2..6].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        b[6..10].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        b
    }

    /// Bytes of the table.
    pub fn table_size(&self) -> u64 {
        u64::from(self.len()) * ENTRY_SIZE
    }

    /// Bytes of the PBA.
    pub fn pba_size(&self) -> u64 {
        (self.lock().pba.len() * 8) as u64
    }

    /// The guest wrote message control: enable and function mask. Messages held back by the
    /// function mask go out once nothing masks them.
    pub fn set_control(&self, control: u16) {
        let mut s = self.lock();
        s.enabled = control & CONTROL_ENABLE != 0;
        s.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        self.flush_pending(&mut s);
    }

    /// MSI-X is enabled: the device signals vectors, not INTx.
    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    fn flush_pending(&self, s: &mut Inner) {
        if !s.enabled || s.function_masked {
            return;
        }
        for v in 0..s.entries.len() {
            if s.pending(v) && !s.masked(v) {
                s.set_pending(v, false);
                self.deliver(s, v);
            }
        }
    }

    /// Sets vector `v`'s route if its entry changed since; false when the vector's message
    /// cannot go out (the hypervisor refused the route: logged once, not per message).
    fn route(&self, s: &mut Inner, v: usize) -> bool {
        if s.routes[v] == Route::Stale {
            let e = s.entries[v];
            // `v` indexes a table of at most 2048 vectors.
            s.routes[v] = match self.out.route(v as u16, e.address, e.data) {
                Ok(()) => Route::Set,
                Err(err) => {
                    log::warn!(
                        "MSI-X vector {v}: the message {:#x}/{:#x} cannot be routed ({err}); its interrupts are dropped until the guest reprograms it",
                        e.address,
                        e.data
                    );
                    Route::Refused
                }
            };
        }
        s.routes[v] == Route::Set
    }

    fn deliver(&self, s: &mut Inner, v: usize) {
        if self.route(s, v)
            && let Err(err) = self.out.trigger(v as u16)
        {
            log::warn!("MSI-X vector {v}: {err}");
        }
    }

    /// A guest read of the table at `offset`: aligned dwords or quadwords; anything else
    /// reads zero.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let s = self.lock();
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let off = offset + 4 * i as u64;
            if off % 4 != 0 || chunk.len() != 4 {
                return;
            }
            let Some(e) = s.entries.get((off / ENTRY_SIZE) as usize) else {
                return;
            };
            let v = match off % ENTRY_SIZE {
                0 => e.address as u32,
                4 => (e.address >> 32) as u32,
                8 => e.data,
                _ => e.control,
            };
            chunk.copy_from_slice(&v.to_le_bytes());
        }
    }

    /// A guest write to the table. Unmasking a vector with a pending message sends it.
    pub fn write_table(&self, offset: u64, data: &[u8]) {
        let mut s = self.lock();
        for (i, chunk) in data.chunks(4).enumerate() {
            let off = offset + 4 * i as u64;
            let Ok(word) = <[u8; 4]>::try_from(chunk) else {
                return;
            };
            if off % 4 != 0 {
                return;
            }
            let v = u32::from_le_bytes(word);
            let index = (off / ENTRY_SIZE) as usize;
            let Some(e) = s.entries.get_mut(index) else {
                return;
            };
            match off % ENTRY_SIZE {
                0 => e.address = (e.address & !0xffff_ffff) | u64::from(v),
                4 => e.address = (e.address & 0xffff_ffff) | (u64::from(v) << 32),
                8 => e.data = v,
                _ => e.control = v & VECTOR_MASKED,
            }
            if off % ENTRY_SIZE != 12 {
                s.routes[index] = Route::Stale;
            }
            if off % ENTRY_SIZE == 12 && !s.masked(index) && s.enabled && s.pending(index) {
                s.set_pending(index, false);
                self.deliver(&mut s, index);
            }
        }
    }

    /// A guest read of the PBA (writes to it are ignored: it is read-only).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let s = self.lock();
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset as usize + i;
            *b = s.pba.get(at / 8).map_or(0, |w| (w >> (8 * (at % 8))) as u8);
        }
    }

    /// The table and PBA, for a snapshot.
    pub fn save(&self) -> MsixState {
        let s = self.lock();
        MsixState {
            entries: s.entries.clone(),
            pba: s.pba.clone(),
        }
    }

    /// Puts back a saved table (the control bits come from the restored configuration space
    /// through [`Msix::set_control`]).
    pub fn restore(&self, state: &MsixState) -> Result<(), String> {
        let mut s = self.lock();
        if state.entries.len() != s.entries.len() || state.pba.len() != s.pba.len() {
            return Err(format!(
                "an MSI-X table of {} vectors, not {}",
                state.entries.len(),
                s.entries.len()
            ));
        }
        s.entries.clone_from(&state.entries);
        s.pba.clone_from(&state.pba);
        s.routes.fill(Route::Stale);
        Ok(())
    }
}

impl MsixSink for Msix {
    fn signal(&self, vector: u16) -> std::io::Result<()> {
        let mut s = self.lock();
        let v = usize::from(vector);
        if v >= s.entries.len() || !s.enabled {
            return Ok(());
        }
        if s.masked(v) {
            s.set_pending(v, true);
            return Ok(());
        }
        if !self.route(&mut s, v) {
            return Ok(());
        }
        drop(s);
        self.out.trigger(vector)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::RecordingMsi;

    fn w(m: &Msix, off: u64, v: u32) {
        m.write_table(off, &v.to_le_bytes());
    }

    fn program(m: &Msix, v: u64, addr: u64, data: u32) {
        w(m, v * 16, addr as u32);
        w(m, v * 16 + 4, (addr >> 32) as u32);
        w(m, v * 16 + 8, data);
    }

    fn vectors(n: u16, devid: u32) -> (RecordingMsi, Arc<dyn MsiVectors>) {
        use crate::interrupt::MsiController;
        let out = RecordingMsi::default();
        let v = out.vectors(n, devid).unwrap();
        (out, v)
    }

    #[test]
    fn masked_messages_wait_in_the_pba() {
        let (out, v) = vectors(3, 0x18);
        let m = Msix::new(3, v);
        assert_eq!(
            m.capability(0, 0x4000, 0x5000)[..2],
            [2, 0],
            "table size - 1"
        );
        m.signal(0).unwrap();
        assert!(out.take().is_empty(), "MSI-X disabled: nothing");
        m.set_control(CONTROL_ENABLE);
        program(&m, 1, 0xfee0_0000, 0x41);
        m.signal(1).unwrap();
        assert!(out.take().is_empty(), "vectors start masked");
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        w(&m, 16 + 12, 0);
        assert_eq!(
            out.take(),
            vec![(0xfee0_0000, 0x41, 0x18)],
            "sent on unmask"
        );
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        m.signal(1).unwrap();
        assert_eq!(out.take().len(), 1);
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.signal(1).unwrap();
        assert!(out.take().is_empty(), "function masked");
        m.set_control(CONTROL_ENABLE);
        assert_eq!(out.take().len(), 1, "sent when the function is unmasked");
        m.signal(7).unwrap();
        assert!(out.take().is_empty(), "no such vector");
    }

    #[test]
    fn a_route_is_set_when_its_entry_changed() {
        let (out, v) = vectors(2, 0);
        let m = Msix::new(2, v);
        m.set_control(CONTROL_ENABLE);
        program(&m, 0, 0xfee0_0000, 0x41);
        w(&m, 12, 0);
        assert_eq!(out.route_calls(), 0, "nothing fired yet");
        m.signal(0).unwrap();
        m.signal(0).unwrap();
        assert_eq!(out.route_calls(), 1, "routed once, at the first message");
        assert_eq!(out.take(), vec![(0xfee0_0000, 0x41, 0); 2]);
        // Linux moves a vector to another CPU by rewriting address and data.
        w(&m, 12, 1);
        program(&m, 0, 0xfee0_1000, 0x42);
        w(&m, 12, 0);
        m.signal(0).unwrap();
        assert_eq!(out.route_calls(), 2);
        assert_eq!(out.take(), vec![(0xfee0_1000, 0x42, 0)]);
        // A message the hypervisor cannot route: dropped, tried once, not per message.
        out.refuse(0xdead_0000);
        w(&m, 12, 1);
        program(&m, 0, 0xdead_0000, 1);
        w(&m, 12, 0);
        let calls = out.route_calls();
        m.signal(0).unwrap();
        m.signal(0).unwrap();
        assert_eq!(out.route_calls(), calls + 1);
        assert!(out.take().is_empty());
        program(&m, 0, 0xfee0_1000, 0x42);
        m.signal(0).unwrap();
        assert_eq!(
            out.take(),
            vec![(0xfee0_1000, 0x42, 0)],
            "a good entry again"
        );
        // A restored table is routed afresh.
        let saved = m.save();
        let (out2, v2) = vectors(2, 0);
        let n = Msix::new(2, v2);
        n.restore(&saved).unwrap();
        n.set_control(CONTROL_ENABLE);
        n.signal(0).unwrap();
        assert_eq!(out2.take(), vec![(0xfee0_1000, 0x42, 0)]);
    }

    #[test]
    fn the_table_reads_back_and_round_trips() {
        let (_out, v) = vectors(2, 0);
        let m = Msix::new(2, v);
        program(&m, 0, 0x1_fee0_1000, 7);
        let mut b = [0u8; 8];
        m.read_table(0, &mut b);
        assert_eq!(u64::from_le_bytes(b), 0x1_fee0_1000, "quadword read");
        let mut c = [0u8; 4];
        m.read_table(12, &mut c);
        assert_eq!(u32::from_le_bytes(c), 1, "masked");
        m.read_table(2, &mut c);
        assert_eq!(c, [0; 4], "misaligned reads zero");
        m.read_table(64, &mut c);
        assert_eq!(c, [0; 4], "past the table");
        w(&m, 64, 5); // past the table: ignored
        let saved = m.save();
        let n = Msix::new(2, vectors(2, 0).1);
        n.restore(&saved).unwrap();
        assert_eq!(n.save(), saved);
        assert!(Msix::new(4, vectors(4, 0).1).restore(&saved).is_err());
    }
}
