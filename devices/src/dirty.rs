//! Guest pages the VMM itself wrote: the device half of dirty-page tracking for diff
//! snapshots. KVM's dirty log sees only the guest's own writes; every buffer a virtio device
//! fills (and the used rings it updates) is marked here by the transport.

use std::sync::atomic::{AtomicU64, Ordering};

/// Page size the log counts in (KVM's dirty log is per 4 KiB page on x86_64 and ARM64 with
/// 4 KiB pages).
pub const PAGE_SIZE: u64 = 4096;

/// One bit per guest page, per RAM region.
#[derive(Debug)]
pub struct DirtyLog {
    regions: Vec<Region>,
}

#[derive(Debug)]
struct Region {
    start: u64,
    len: u64,
    bits: Vec<AtomicU64>,
}

impl DirtyLog {
    /// A clean log for RAM regions `(start, len)`.
    pub fn new(regions: &[(u64, u64)]) -> Self {
        Self {
            regions: regions
                .iter()
                .map(|&(start, len)| Region {
                    start,
                    len,
                    bits: (0..len.div_ceil(PAGE_SIZE).div_ceil(64))
                        .map(|_| AtomicU64::new(0))
                        .collect(),
                })
                .collect(),
        }
    }

    /// Marks every page of every region (a VM that booted here: nothing is in any snapshot).
    pub fn mark_all(&self) {
        for r in &self.regions {
            self.mark(r.start, r.len);
        }
    }

    /// Marks the pages under `[gpa, gpa + len)`; the parts outside guest RAM are ignored.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = gpa.saturating_add(len);
        for r in &self.regions {
            let r_end = r.start + r.len;
            let (s, e) = (gpa.max(r.start), end.min(r_end));
            if s >= e {
                continue;
            }
            let first = (s - r.start) / PAGE_SIZE;
            let last = (e - 1 - r.start) / PAGE_SIZE;
            // One atomic OR per 64 pages.
            let mut page = first;
            while page <= last {
                let bit = page % 64;
                let n = (64 - bit).min(last - page + 1);
                let mask = if n == 64 {
                    u64::MAX
                } else {
                    ((1u64 << n) - 1) << bit
                };
                if let Some(w) = r.bits.get((page / 64) as usize) {
                    w.fetch_or(mask, Ordering::Relaxed);
                }
                page += n;
            }
        }
    }

    /// ORs a bitmap (one bit per page, as KVM's dirty log) into region `index`.
    pub fn merge(&self, index: usize, bitmap: &[u64]) {
        if let Some(r) = self.regions.get(index) {
            for (w, &b) in r.bits.iter().zip(bitmap) {
                if b != 0 {
                    w.fetch_or(b, Ordering::Relaxed);
                }
            }
        }
    }

    /// A copy of region `index`'s bitmap.
    pub fn bitmap(&self, index: usize) -> Vec<u64> {
        self.regions.get(index).map_or_else(Vec::new, |r| {
            r.bits.iter().map(|w| w.load(Ordering::Relaxed)).collect()
        })
    }

    /// Takes region `index`'s bitmap out of the log (the pages a snapshot is about to hold),
    /// leaving it clear: pages marked from now on are the next snapshot's.
    pub fn take(&self, index: usize) -> Vec<u64> {
        self.regions.get(index).map_or_else(Vec::new, |r| {
            r.bits
                .iter()
                .map(|w| w.swap(0, Ordering::Relaxed))
                .collect()
        })
    }

    /// Marked pages in all regions.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|r| &r.bits)
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }
}

/// Marks device-writable buffers `(address, length)` of one chain. A chain claiming more
/// writable room than there is RAM marks everything once, instead of marking all of RAM again
/// per buffer.
pub fn mark_buffers(log: &DirtyLog, bufs: &[(u64, u32)]) {
    let ram: u64 = log.regions.iter().map(|r| r.len).sum();
    let mut claimed = 0u64;
    for &(addr, len) in bufs {
        claimed = claimed.saturating_add(u64::from(len));
        if claimed > ram {
            log.mark_all();
            return;
        }
        log.mark(addr, u64::from(len));
    }
}

/// Marks what a device may have written for descriptor chain `head` of a split queue: every
/// device-writable buffer of the chain, indirect tables included. The walk is bounded (a
/// looped chain ends it) and ignores what guest memory cannot hold.
pub fn mark_chain<M: vm_memory::GuestMemory>(
    log: &DirtyLog,
    mem: &M,
    desc_table: u64,
    queue_size: u16,
    head: u16,
) {
    use vm_memory::{Bytes, GuestAddress};
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const F_INDIRECT: u16 = 4;
    let read = |table: u64, i: u64| -> Option<(u64, u32, u16, u16)> {
        let mut d = [0u8; 16];
        mem.read_slice(&mut d, GuestAddress(table.checked_add(i.checked_mul(16)?)?))
            .ok()?;
        let addr = u64::from_le_bytes(d[0..8].try_into().ok()?);
        let len = u32::from_le_bytes(d[8..12].try_into().ok()?);
        let flags = u16::from_le_bytes(d[12..14].try_into().ok()?);
        let next = u16::from_le_bytes(d[14..16].try_into().ok()?);
        Some((addr, len, flags, next))
    };
    let mut table = desc_table;
    let mut size = u64::from(queue_size);
    let mut i = u64::from(head);
    let mut indirect = false;
    // At most one pass over the direct table plus one over an indirect table.
    let mut budget = u64::from(queue_size) + 1;
    let mut writable = Vec::new();
    while budget > 0 && i < size {
        budget -= 1;
        let Some((addr, len, flags, next)) = read(table, i) else {
            break;
        };
        if flags & F_INDIRECT != 0 && !indirect {
            indirect = true;
            table = addr;
            // virtio-queue takes indirect tables of at most u16::MAX entries.
            size = u64::from(len / 16).min(u64::from(u16::MAX));
            budget = size;
            i = 0;
            continue;
        }
        if flags & F_WRITE != 0 {
            writable.push((addr, len));
        }
        if flags & F_NEXT == 0 {
            break;
        }
        i = u64::from(next);
    }
    mark_buffers(log, &writable);
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const MB: u64 = 1 << 20;

    fn pages(log: &DirtyLog, index: usize) -> Vec<u64> {
        let mut out = Vec::new();
        for (w, bits) in log.bitmap(index).iter().enumerate() {
            for b in 0..64 {
                if bits & (1 << b) != 0 {
                    out.push(w as u64 * 64 + b);
                }
            }
        }
        out
    }

    #[test]
    fn marks_pages_clips_to_ram_and_takes_what_a_snapshot_saves() {
        let log = DirtyLog::new(&[(0, MB), (4 * MB, MB)]);
        log.mark(4095, 2); // straddles pages 0 and 1
        log.mark(MB - 10, 100); // runs past the region's end
        log.mark(2 * MB, 4096); // a hole between regions
        log.mark(4 * MB + 8192, 0); // nothing
        log.mark(u64::MAX - 5, 100); // overflow saturates
        assert_eq!(pages(&log, 0), vec![0, 1, 255]);
        assert!(pages(&log, 1).is_empty());
        let saved = log.take(0);
        assert_eq!((saved[0], saved[3]), (0b11, 1 << 63), "{saved:x?}");
        assert!(pages(&log, 0).is_empty());
        log.mark(4096 * 7, 1); // marked after the take
        assert_eq!(pages(&log, 0), vec![7]);
        log.merge(0, &saved); // a failed snapshot puts its pages back
        assert_eq!(pages(&log, 0), vec![0, 1, 7, 255]);
        log.take(0);
        log.mark(4096 * 7, 1);
        log.merge(1, &[0b101]);
        assert_eq!(pages(&log, 1), vec![0, 2]);
        assert_eq!(log.count(), 3);
        // A run across a word boundary, and whole words.
        let runs = DirtyLog::new(&[(0, MB)]);
        runs.mark(60 * 4096 + 1, 10 * 4096);
        assert_eq!(pages(&runs, 0), (60..=70).collect::<Vec<u64>>());
        runs.mark(64 * 4096, 128 * 4096);
        assert_eq!(runs.count(), 4 + 128); // 60..=191
        log.mark_all();
        assert_eq!(log.count(), 512);
    }

    #[test]
    fn chains_mark_their_writable_buffers_and_loops_end() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MB as usize)]).unwrap();
        let log = DirtyLog::new(&[(0, MB)]);
        let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&d, GuestAddress(0x1000 + i * 16)).unwrap();
        };
        // 0 (read-only, page 16) -> 1 (writable, page 17) -> 2 (indirect table at 0x3000)
        desc(0, 16 * 4096, 100, 1, 1);
        desc(1, 17 * 4096, 4096, 1 | 2, 2);
        desc(2, 0x3000, 32, 4, 0);
        let ind = |i: u64, addr: u64, flags: u16, next: u16| {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&10u32.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&d, GuestAddress(0x3000 + i * 16)).unwrap();
        };
        ind(0, 20 * 4096, 1 | 2, 1);
        ind(1, 21 * 4096, 2, 0);
        mark_chain(&log, &mem, 0x1000, 8, 0);
        assert_eq!(pages(&log, 0), vec![17, 20, 21]);

        // A loop (3 -> 4 -> 3) of writable buffers ends; an index beyond the queue is ignored.
        let log = DirtyLog::new(&[(0, MB)]);
        desc(3, 30 * 4096, 1, 1 | 2, 4);
        desc(4, 31 * 4096, 1, 1 | 2, 3);
        mark_chain(&log, &mem, 0x1000, 8, 3);
        assert_eq!(pages(&log, 0), vec![30, 31]);
        mark_chain(&log, &mem, 0x1000, 8, 9);
        mark_chain(&log, &mem, u64::MAX - 8, 8, 0);
        assert_eq!(log.count(), 2);

        // A looped indirect table of buffers each claiming all of RAM: everything is marked,
        // once, and the walk ends.
        let log = DirtyLog::new(&[(0, MB)]);
        desc(5, 0x5000, 16 * 4, 4, 0);
        for i in 0..4u64 {
            let mut d = [0u8; 16];
            d[8..12].copy_from_slice(&(MB as u32).to_le_bytes());
            d[12..14].copy_from_slice(&3u16.to_le_bytes()); // NEXT | WRITE
            d[14..16].copy_from_slice(&(((i + 1) % 4) as u16).to_le_bytes());
            mem.write_slice(&d, GuestAddress(0x5000 + i * 16)).unwrap();
        }
        mark_chain(&log, &mem, 0x1000, 8, 5);
        assert_eq!(log.count(), 256);
    }
}
