//! virtio-balloon (type 5): the guest gives pages back on request (inflate), tern drops them
//! from its memory (`madvise(MADV_DONTNEED)`, or fresh anonymous pages over a snapshot's
//! memory file: see `discard`); deflating lets the guest use them again (they fault back in
//! as zeros). Optional statistics queue polled every `stats_polling_interval_s`,
//! and free page reporting (the guest reports free ranges, tern drops them too).

use std::time::Duration;

use crate::os::EventSet;
use crate::os::TimerFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::{
    DEVICE_TOKEN_BASE, DeviceState, DeviceStateError, Poller, QueueCtx, VIRTIO_F_VERSION_1,
    VirtioDevice, read_config_bytes,
};
use std::os::fd::AsRawFd;

/// The virtio device ID of a balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Balloon pages are 4 KiB whatever the guest's page size.
pub const PAGE_SIZE: u64 = 4096;

const F_STATS_VQ: u64 = 1 << 1;
const F_DEFLATE_ON_OOM: u64 = 1 << 2;
const F_REPORTING: u64 = 1 << 5;

const INFLATE: usize = 0;
const DEFLATE: usize = 1;

const TOKEN_STATS_TIMER: u64 = DEVICE_TOKEN_BASE;
const MAX_PFNS_PER_REQUEST: usize = 1 << 16;

/// Firecracker's names of the statistics tags, by tag number.
pub const STAT_NAMES: [&str; 10] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
];

/// How the balloon is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonOptions {
    /// Initial target in MiB.
    pub amount_mib: u32,
    /// Offer DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// Statistics interval (0: no statistics queue).
    pub stats_polling_interval_s: u16,
    /// Offer free page reporting.
    pub free_page_reporting: bool,
}

/// What the guest last reported, plus the balloon's sizes.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalloonSnapshot {
    /// Target in 4 KiB pages.
    pub target_pages: u32,
    /// What the driver says it holds, in 4 KiB pages.
    pub actual_pages: u32,
    /// (tag, value) pairs of the last statistics.
    pub stats: Vec<(u16, u64)>,
    /// Statistics updates received.
    pub stats_updates: u64,
    /// Pages dropped on inflation.
    pub inflated_pages: u64,
    /// Pages the guest took back.
    pub deflated_pages: u64,
    /// Bytes dropped through free page reporting.
    pub reported_bytes: u64,
}

/// What the balloon keeps across a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalloonState {
    /// Sizes and the last statistics.
    pub sizes: BalloonSnapshot,
    /// The statistics buffer the driver left with the device.
    pub held_stats: Option<u16>,
    /// The statistics interval then.
    pub stats_polling_interval_s: u16,
}

/// The balloon device.
pub struct Balloon {
    opts: BalloonOptions,
    queue_sizes: Vec<u16>,
    stats_q: Option<usize>,
    report_q: Option<usize>,
    state: BalloonSnapshot,
    timer: TimerFd,
    /// The stats buffer the driver left with us, to hand back at the next poll.
    held_stats: Option<u16>,
}

impl Balloon {
    /// A balloon with `opts`.
    pub fn new(opts: BalloonOptions) -> std::io::Result<Self> {
        let mut queue_sizes = vec![QUEUE_SIZE, QUEUE_SIZE];
        let mut stats_q = None;
        let mut report_q = None;
        if opts.stats_polling_interval_s > 0 {
            stats_q = Some(queue_sizes.len());
            queue_sizes.push(QUEUE_SIZE);
        }
        if opts.free_page_reporting {
            report_q = Some(queue_sizes.len());
            queue_sizes.push(QUEUE_SIZE);
        }
        Ok(Self {
            opts,
            queue_sizes,
            stats_q,
            report_q,
            state: BalloonSnapshot {
                target_pages: mib_to_pages(opts.amount_mib),
                ..Default::default()
            },
            timer: crate::os::nonblocking_timer()?,
            held_stats: None,
        })
    }

    /// Sets a new target; the caller raises the configuration interrupt.
    pub fn set_target_mib(&mut self, mib: u32) {
        self.state.target_pages = mib_to_pages(mib);
    }

    /// Changes the statistics interval (not on/off).
    pub fn set_stats_interval(&mut self, secs: u16) -> Result<(), String> {
        if self.stats_q.is_none() || secs == 0 {
            return Err("statistics were not enabled at boot".into());
        }
        self.opts.stats_polling_interval_s = secs;
        self.arm_timer();
        Ok(())
    }

    /// Sizes and the last statistics.
    pub fn snapshot(&self) -> BalloonSnapshot {
        self.state.clone()
    }

    fn arm_timer(&mut self) {
        let every = Duration::from_secs(u64::from(self.opts.stats_polling_interval_s.max(1)));
        if let Err(e) = self.timer.reset(every, Some(every)) {
            log::warn!("balloon: cannot arm the statistics timer: {e}");
        }
    }

    fn config_space(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0..4].copy_from_slice(&self.state.target_pages.to_le_bytes());
        c[4..8].copy_from_slice(&self.state.actual_pages.to_le_bytes());
        c
    }

    fn process_pfns(&mut self, q: usize, ctx: &mut QueueCtx<'_>) {
        let mem = ctx.mem;
        loop {
            let Some(chain) = ctx.pop(q) else {
                return;
            };
            let head = chain.head_index();
            let mut pfns = Vec::new();
            for d in chain {
                // Linux sends at most 256 PFNs a request; anything past 64 Ki is ignored.
                if d.is_write_only() || pfns.len() >= MAX_PFNS_PER_REQUEST {
                    continue;
                }
                let n = ((d.len() / 4) as usize).min(MAX_PFNS_PER_REQUEST - pfns.len());
                let mut buf = vec![0u8; n * 4];
                if mem.read_slice(&mut buf, d.addr()).is_err() {
                    continue;
                }
                pfns.extend(
                    buf.chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
            }
            if q == INFLATE {
                pfns.sort_unstable();
                let mut i = 0;
                while i < pfns.len() {
                    let start = pfns[i];
                    let mut j = i + 1;
                    while j < pfns.len() && pfns[j] == pfns[j - 1].wrapping_add(1) {
                        j += 1;
                    }
                    let pages = (j - i) as u64;
                    // A dropped page reads back as zeros (or the snapshot file's page): a
                    // diff snapshot must carry it.
                    ctx.mark_dirty(u64::from(start) * PAGE_SIZE, pages * PAGE_SIZE);
                    discard(
                        mem,
                        GuestAddress(u64::from(start) * PAGE_SIZE),
                        pages * PAGE_SIZE,
                    );
                    self.state.inflated_pages = self.state.inflated_pages.wrapping_add(pages);
                    i = j;
                }
            } else {
                self.state.deflated_pages =
                    self.state.deflated_pages.wrapping_add(pfns.len() as u64);
            }
            if !ctx.add_used(q, head, 0) {
                return;
            }
        }
    }

    fn process_stats(&mut self, q: usize, ctx: &mut QueueCtx<'_>) {
        let mem = ctx.mem;
        loop {
            let Some(chain) = ctx.pop(q) else {
                return;
            };
            let head = chain.head_index();
            let mut stats = Vec::new();
            for d in chain {
                if d.is_write_only() {
                    continue;
                }
                let n = (d.len() / 10).min(64) as usize;
                let mut buf = vec![0u8; n * 10];
                if mem.read_slice(&mut buf, d.addr()).is_err() {
                    continue;
                }
                for c in buf.chunks_exact(10) {
                    let tag = u16::from_le_bytes([c[0], c[1]]);
                    let mut v = [0u8; 8];
                    v.copy_from_slice(&c[2..10]);
                    stats.push((tag, u64::from_le_bytes(v)));
                }
            }
            if let Some(old) = self.held_stats.replace(head) {
                // A driver that sends a second buffer gets the first one back.
                ctx.add_used(q, old, 0);
            }
            self.state.stats = stats;
            self.state.stats_updates = self.state.stats_updates.wrapping_add(1);
        }
    }

    fn process_reports(&mut self, q: usize, ctx: &mut QueueCtx<'_>) {
        let mem = ctx.mem;
        loop {
            let Some(chain) = ctx.pop(q) else {
                return;
            };
            let head = chain.head_index();
            for d in chain {
                discard(mem, d.addr(), u64::from(d.len()));
                self.state.reported_bytes =
                    self.state.reported_bytes.saturating_add(u64::from(d.len()));
            }
            if !ctx.add_used(q, head, 0) {
                return;
            }
        }
    }
}

fn mib_to_pages(mib: u32) -> u32 {
    mib.saturating_mul(256)
}

/// Drops `len` bytes of guest memory at `addr` from the host (they read back as zeros).
/// Ranges outside guest memory or crossing a region are skipped; a partial last page is kept.
///
/// Anonymous memory (a booted VM, a Uffd restore) is dropped with `MADV_DONTNEED`. Memory
/// mapped privately from a snapshot's memory file (a File restore) is not: there
/// `MADV_DONTNEED` only drops tern's private copy and the page reads back with the file's
/// contents. Such a range is replaced by fresh anonymous memory instead (`mmap` with
/// `MAP_FIXED` over it), which reads as zeros and frees the copy.
fn discard(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) {
    let page = PAGE_SIZE as usize;
    let len = (len as usize) & !(page - 1);
    if len == 0 {
        return;
    }
    let Ok(slice) = mem.get_slice(addr, len) else {
        log::debug!("balloon: range {:#x}+{len:#x} is not guest memory", addr.0);
        return;
    };
    let file_backed = mem
        .find_region(addr)
        .is_some_and(|r| r.file_offset().is_some());
    let guard = slice.ptr_guard_mut();
    let ptr = guard.as_ptr();
    // madvise and mmap want page-aligned starts; guest pages are 4 KiB-aligned in host memory
    // because every region is mapped page-aligned.
    if (ptr as usize) % page != 0 {
        return;
    }
    let failed = if file_backed {
        // SAFETY: the range (page-aligned start, whole pages) lies inside one mapped guest
        // memory region (get_slice checked it), so MAP_FIXED replaces only guest RAM that the
        // guest gave up, with the same protection; nothing in tern keeps a reference into
        // those pages' contents. KVM follows the new mapping through its MMU notifier.
        let p = unsafe {
            libc::mmap(
                ptr.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        p == libc::MAP_FAILED
    } else {
        // SAFETY: the range lies inside one mapped guest memory region (get_slice checked
        // it); MADV_DONTNEED on private anonymous memory only replaces contents with zero
        // pages, which is what the guest agreed to by giving the pages up.
        unsafe { libc::madvise(ptr.cast(), len, libc::MADV_DONTNEED) != 0 }
    };
    if failed {
        log::warn!(
            "balloon: dropping {:#x}+{len:#x}: {}",
            addr.0,
            std::io::Error::last_os_error()
        );
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1;
        if self.opts.deflate_on_oom {
            f |= F_DEFLATE_ON_OOM;
        }
        if self.stats_q.is_some() {
            f |= F_STATS_VQ;
        }
        if self.report_q.is_some() {
            f |= F_REPORTING;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (offset 4) is the driver's to write.
        if offset == 4 && data.len() == 4 {
            self.state.actual_pages = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        }
    }

    fn activate(&mut self, _features: u64, ctx: &mut QueueCtx<'_>) {
        if let Some(q) = self.stats_q {
            if let Err(e) = ctx
                .poller
                .add(self.timer.as_raw_fd(), EventSet::IN, TOKEN_STATS_TIMER)
            {
                log::warn!("balloon: cannot watch the statistics timer: {e}");
            }
            self.arm_timer();
            self.process_stats(q, ctx);
        }
    }

    fn reset(&mut self, poller: &Poller) {
        poller.remove(self.timer.as_raw_fd());
        let _ = self.timer.reset(Duration::ZERO, None);
        self.held_stats = None;
        self.state.actual_pages = 0;
    }

    fn process_queue(&mut self, index: u16, ctx: &mut QueueCtx<'_>) {
        let q = usize::from(index);
        match q {
            INFLATE | DEFLATE => self.process_pfns(q, ctx),
            _ if Some(q) == self.stats_q => self.process_stats(q, ctx),
            _ if Some(q) == self.report_q => self.process_reports(q, ctx),
            _ => {}
        }
    }

    fn process_backend(&mut self, token: u64, _events: EventSet, ctx: &mut QueueCtx<'_>) {
        if token == TOKEN_STATS_TIMER {
            let _ = self.timer.wait();
            // Hand the buffer back: the driver refills it with fresh statistics.
            if let (Some(q), Some(head)) = (self.stats_q, self.held_stats.take()) {
                ctx.add_used(q, head, 0);
            }
        }
    }

    fn save(&self) -> DeviceState {
        DeviceState::Balloon(BalloonState {
            sizes: self.state.clone(),
            held_stats: self.held_stats,
            stats_polling_interval_s: self.opts.stats_polling_interval_s,
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        let DeviceState::Balloon(s) = state else {
            return Err(DeviceStateError::kind("virtio-balloon", state));
        };
        let queues = self.queue_sizes.len();
        if s.held_stats.is_some() && self.stats_q.is_none() {
            return Err(DeviceStateError::differs(
                "balloon",
                "statistics queue",
                "held buffer",
                format!("{queues} queues, no statistics"),
            ));
        }
        self.state = s.sizes.clone();
        self.held_stats = s.held_stats;
        Ok(())
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::virtio::testutil::*;

    /// Guest memory mapped privately from a file full of 0xAB, as a File restore maps it.
    fn file_backed_memory(bytes: usize) -> (GuestMemoryMmap, vmm_sys_util::tempfile::TempFile) {
        use std::io::Write;
        use vm_memory::mmap::MmapRegionBuilder;
        use vm_memory::{FileOffset, GuestRegionMmap};
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        f.as_file().write_all(&vec![0xAB; bytes]).unwrap();
        let file = f.as_file().try_clone().unwrap();
        let mapping = MmapRegionBuilder::new(bytes)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .with_file_offset(FileOffset::new(file, 0))
            .build()
            .unwrap();
        let region = GuestRegionMmap::new(mapping, GuestAddress(0)).unwrap();
        (GuestMemoryMmap::from_regions(vec![region]).unwrap(), f)
    }

    /// Wave 1 used MADV_DONTNEED here too: the pages read back as the file's 0xAB.
    #[test]
    fn dropped_pages_of_a_restored_vm_read_back_as_zeros() {
        let (mem, f) = file_backed_memory(16 * PAGE_SIZE as usize);
        // The guest wrote to one page (tern's private copy), then gave up pages 2..6.
        mem.write_slice(&[0x11; 16], GuestAddress(3 * PAGE_SIZE))
            .unwrap();
        discard(&mem, GuestAddress(2 * PAGE_SIZE), 4 * PAGE_SIZE);
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for p in 0..16 {
            mem.read_slice(&mut page, GuestAddress(p * PAGE_SIZE))
                .unwrap();
            let want = if (2..6).contains(&p) { 0 } else { 0xAB };
            assert!(page.iter().all(|&b| b == want), "page {p}: {:#x}", page[0]);
        }
        // The memory file itself is untouched.
        let on_disk = std::fs::read(f.as_path()).unwrap();
        assert!(on_disk.iter().all(|&b| b == 0xAB));
        // The new pages are ordinary guest memory again.
        mem.write_slice(&[7; 8], GuestAddress(2 * PAGE_SIZE))
            .unwrap();
        let mut b = [0u8; 8];
        mem.read_slice(&mut b, GuestAddress(2 * PAGE_SIZE)).unwrap();
        assert_eq!(b, [7; 8]);
    }

    #[test]
    fn dropped_anonymous_pages_read_back_as_zeros_and_a_partial_page_is_kept() {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 * PAGE_SIZE as usize)]).unwrap();
        mem.write_slice(&vec![0xCD; 8 * PAGE_SIZE as usize], GuestAddress(0))
            .unwrap();
        discard(&mem, GuestAddress(PAGE_SIZE), PAGE_SIZE + 100);
        let mut page = vec![0u8; PAGE_SIZE as usize];
        mem.read_slice(&mut page, GuestAddress(PAGE_SIZE)).unwrap();
        assert!(page.iter().all(|&b| b == 0));
        mem.read_slice(&mut page, GuestAddress(2 * PAGE_SIZE))
            .unwrap();
        assert!(
            page.iter().all(|&b| b == 0xCD),
            "a partial page was dropped"
        );
    }

    fn balloon(stats: u16, reporting: bool) -> Driver {
        Driver::new(Box::new(
            Balloon::new(BalloonOptions {
                amount_mib: 1,
                deflate_on_oom: true,
                stats_polling_interval_s: stats,
                free_page_reporting: reporting,
            })
            .unwrap(),
        ))
    }

    fn snapshot(d: &mut Driver) -> BalloonSnapshot {
        d.dev.with_device(|dev, _| {
            dev.as_any_mut()
                .downcast_mut::<Balloon>()
                .unwrap()
                .snapshot()
        })
    }

    #[test]
    fn inflate_drops_pages_and_deflate_counts_them() {
        let mut d = balloon(0, false);
        let mut target = [0u8; 4];
        d.dev.read(0x100, &mut target);
        assert_eq!(u32::from_le_bytes(target), 256);
        // Fill two pages, inflate them (plus one out of range), check they read as zero.
        let page = 0x200u32; // 2 MiB
        d.write(u64::from(page) * 4096, &[0xab; 8192]);
        let mut pfns = Vec::new();
        for p in [page, page + 1, 0xffff_ff00] {
            pfns.extend(p.to_le_bytes());
        }
        d.write(DATA, &pfns);
        d.chain(INFLATE, 0, &[(DATA, 12, false)]);
        d.offer(INFLATE, 0);
        assert_eq!(d.take_used(INFLATE), vec![(0, 0)]);
        assert!(d.read(u64::from(page) * 4096, 8192).iter().all(|&b| b == 0));
        d.chain(DEFLATE, 0, &[(DATA, 8, false)]);
        d.offer(DEFLATE, 0);
        let s = snapshot(&mut d);
        assert_eq!((s.inflated_pages, s.deflated_pages), (3, 2));
        // The driver reports its size through `actual`.
        d.dev.write(0x104, &512u32.to_le_bytes());
        assert_eq!(snapshot(&mut d).actual_pages, 512);
    }

    #[test]
    fn stats_buffer_is_held_and_returned_on_the_timer() {
        let mut d = balloon(1, true);
        let mut st = Vec::new();
        for (tag, v) in [(4u16, 1000u64), (5, 2000)] {
            st.extend(tag.to_le_bytes());
            st.extend(v.to_le_bytes());
        }
        d.write(DATA, &st);
        d.chain(2, 0, &[(DATA, 20, false)]);
        d.offer(2, 0);
        assert!(d.take_used(2).is_empty(), "held until the poll");
        let s = snapshot(&mut d);
        assert_eq!(s.stats, vec![(4, 1000), (5, 2000)]);
        // The 1 s timer hands it back.
        let mut waited = 0;
        while d.used_idx(2) == 0 && waited < 30 {
            d.dev.run_ready(100);
            waited += 1;
        }
        assert_eq!(d.take_used(2), vec![(0, 0)]);
        // Free page reporting (queue 3) drops and returns what it gets.
        d.write(0x30_0000, &[7u8; 4096]);
        d.chain(3, 0, &[(0x30_0000, 4096, true)]);
        d.offer(3, 0);
        assert_eq!(d.take_used(3), vec![(0, 0)]);
        assert!(d.read(0x30_0000, 4096).iter().all(|&b| b == 0));
        assert_eq!(snapshot(&mut d).reported_bytes, 4096);
    }

    #[test]
    fn malformed_descriptors_neither_panic_nor_hang() {
        let mut d = balloon(1, true);
        for q in 0..4 {
            d.offer_malformed(q);
        }
    }
}
