//! Guest RAM regions and the e820 map.

use super::layout::*;

/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// One e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The RAM regions of a guest with `mem_bytes` of memory: everything below the 32-bit MMIO
/// hole first, the rest above 4 GiB.
pub fn ram_regions(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_HOLE_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (FIRST_ADDR_PAST_32BITS, mem_bytes - MMIO_HOLE_START),
        ]
    }
}

/// The e820 map the guest kernel sees for the given RAM regions (as returned by
/// [`ram_regions`]): low RAM up to the EBDA, the BIOS area reserved, high RAM.
pub fn e820_map(regions: &[(u64, u64)]) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for &(start, size) in regions {
        let end = start + size;
        let start = start.max(HIMEM_START);
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// The highest address (exclusive) of RAM below the MMIO hole.
pub fn low_ram_end(regions: &[(u64, u64)]) -> u64 {
    regions
        .iter()
        .filter(|(start, _)| *start < MMIO_HOLE_START)
        .map(|(start, size)| start + size)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(ram_regions(256 << 20), vec![(0, 256 << 20)]);
    }

    #[test]
    fn large_guest_splits_around_the_hole() {
        let regions = ram_regions(5 << 30);
        assert_eq!(regions[0], (0, MMIO_HOLE_START));
        assert_eq!(regions[1].0, 1 << 32);
        assert_eq!(regions[0].1 + regions[1].1, 5 << 30);
        let map = e820_map(&regions);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        // Everything but the BIOS area between the EBDA and 1 MiB is RAM.
        assert_eq!(ram, (5 << 30) - (HIMEM_START - EBDA_START));
        assert!(
            map.iter()
                .all(|e| e.addr + e.size <= MMIO_HOLE_START || e.addr >= 1 << 32)
        );
        assert_eq!(low_ram_end(&regions), MMIO_HOLE_START);
    }
}
