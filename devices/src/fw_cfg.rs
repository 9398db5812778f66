//! QEMU's firmware configuration device (fw_cfg; QEMU's `docs/specs/fw_cfg.rst`), the way
//! OVMF and AAVMF learn the machine they run on: the memory map, the ACPI tables, SMBIOS, the
//! CPU count, the boot order, a kernel to boot. Items are byte strings under a 16-bit
//! selector; named ones ("files") are listed by the directory item [`FILE_DIR`]. The firmware
//! selects an item and reads it a byte at a time through the data register, or in bulk by
//! handing the device a DMA descriptor in guest memory.
//!
//! Registers, x86 ([`Access::Io`], at I/O port 0x510): the selector (16-bit, little-endian)
//! at +0, the data byte at +1, the DMA address at +4 (big-endian; the high half at +4, the low
//! half at +8, whose write starts the transfer). MMIO ([`Access::Mmio`], ARM64 `virt`-style):
//! data at +0 (1 to 8 bytes per read), the selector at +8 (16-bit, big-endian), the DMA
//! address at +0x10 (64-bit big-endian, or two 32-bit halves, the low one at +0x14 starting
//! the transfer). Reading the DMA register gives the signature "QEMU CFG".
//!
//! Items are read-only: a DMA write is refused with the descriptor's error bit, as QEMU does
//! for an item that is not writable.

use std::collections::BTreeMap;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::BusDevice;

/// Item 0x00: the signature "QEMU".
pub const SIGNATURE: u16 = 0x00;
/// Item 0x01: the interface's features (bit 0 traditional, bit 1 DMA), 32-bit little-endian.
pub const ID: u16 = 0x01;
/// Item 0x02: the VM's UUID (16 bytes).
pub const UUID: u16 = 0x02;
/// Item 0x05: the number of boot CPUs, 16-bit little-endian.
pub const NB_CPUS: u16 = 0x05;
/// Item 0x08: the size of the kernel image that follows the setup (x86), 32-bit LE.
pub const KERNEL_SIZE: u16 = 0x08;
/// Item 0x0b: the size of the initrd, 32-bit LE.
pub const INITRD_SIZE: u16 = 0x0b;
/// Item 0x0e: show the boot menu, 16-bit LE.
pub const BOOT_MENU: u16 = 0x0e;
/// Item 0x0f: the most CPUs the VM can have, 16-bit LE.
pub const MAX_CPUS: u16 = 0x0f;
/// Item 0x11: the kernel image (after the x86 setup part).
pub const KERNEL_DATA: u16 = 0x11;
/// Item 0x12: the initrd.
pub const INITRD_DATA: u16 = 0x12;
/// Item 0x14: the size of the command line, NUL included, 32-bit LE.
pub const CMDLINE_SIZE: u16 = 0x14;
/// Item 0x15: the command line, NUL-terminated.
pub const CMDLINE_DATA: u16 = 0x15;
/// Item 0x17: the size of the x86 kernel's setup part, 32-bit LE.
pub const SETUP_SIZE: u16 = 0x17;
/// Item 0x18: the x86 kernel's setup part (boot sector and real-mode code).
pub const SETUP_DATA: u16 = 0x18;
/// Item 0x19: the file directory.
pub const FILE_DIR: u16 = 0x19;
/// The selector of the first file.
pub const FILE_FIRST: u16 = 0x20;
/// Bit of a selector that marks an architecture's own items (x86: 0x8000 and up).
pub const ARCH_LOCAL: u16 = 0x8000;
/// Selector bits that name the item (QEMU's `FW_CFG_ENTRY_MASK`); bit 14 (the old write
/// channel) is ignored.
const ENTRY_MASK: u16 = 0x3fff;
/// The most files: selectors from [`FILE_FIRST`] to the end of the non-arch range.
pub const MAX_FILES: usize = (ENTRY_MASK - FILE_FIRST + 1) as usize;
/// Bytes of a file name in the directory, NUL included.
pub const FILE_NAME_LEN: usize = 56;

/// The ID item's bits.
const ID_TRADITIONAL: u32 = 1;
const ID_DMA: u32 = 2;
/// DMA descriptor control bits.
const DMA_ERROR: u32 = 1;
const DMA_READ: u32 = 2;
const DMA_SKIP: u32 = 4;
const DMA_SELECT: u32 = 8;
const DMA_WRITE: u32 = 0x10;
/// What the DMA register reads as: "QEMU CFG", big-endian.
const DMA_SIGNATURE: u64 = 0x5145_4d55_2043_4647;
/// Bytes of a DMA descriptor: control, length (32-bit each), address (64-bit), big-endian.
const DMA_DESCRIPTOR_LEN: u64 = 16;

/// x86's I/O port base and the bytes it covers.
pub const IO_BASE: u64 = 0x510;
/// Bytes of the I/O register block (selector, data, DMA address).
pub const IO_LEN: u64 = 0x0c;
/// Bytes of the MMIO register block.
pub const MMIO_LEN: u64 = 0x18;

/// How the registers are reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// x86 I/O ports.
    Io,
    /// Memory-mapped (ARM64).
    Mmio,
}

/// What cannot be put into fw_cfg.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FwCfgError {
    /// A file name that does not fit the directory's 56 bytes with its NUL, or is empty.
    #[error("fw_cfg file name {0:?} must be 1 to 55 bytes")]
    BadName(String),
    /// Two files of one name.
    #[error("fw_cfg already has a file {0:?}")]
    DuplicateFile(String),
    /// More files than selectors.
    #[error("fw_cfg holds at most {MAX_FILES} files")]
    TooManyFiles,
    /// An item the 32-bit sizes of the interface cannot describe.
    #[error("fw_cfg item {name} is {len} bytes; at most 4 GiB - 1")]
    TooBig {
        /// The item.
        name: String,
        /// Its size.
        len: usize,
    },
    /// A fixed item at a selector this builder does not hand out that way.
    #[error("fw_cfg selector {0:#x} is the signature, the ID, the directory or a file's")]
    ReservedSelector(u16),
}

/// The registers' state, for a snapshot (the items themselves are rebuilt from the VM's
/// configuration).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FwCfgState {
    /// The selected item.
    pub selector: u16,
    /// How far into it the data register has read.
    pub offset: u32,
    /// The DMA address's high half, written before the low half.
    pub dma_high: u32,
}

/// The device.
pub struct FwCfg {
    access: Access,
    mem: GuestMemoryMmap,
    items: BTreeMap<u16, Vec<u8>>,
    /// File name → selector, in name order (the directory's order, as QEMU sorts it).
    files: BTreeMap<String, u16>,
    state: FwCfgState,
}

impl FwCfg {
    /// A device with the signature, the ID (traditional and DMA interfaces) and an empty file
    /// directory; DMA reaches `mem`.
    pub fn new(access: Access, mem: GuestMemoryMmap) -> Self {
        let mut items = BTreeMap::new();
        items.insert(SIGNATURE, b"QEMU".to_vec());
        items.insert(ID, (ID_TRADITIONAL | ID_DMA).to_le_bytes().to_vec());
        let mut d = Self {
            access,
            mem,
            items,
            files: BTreeMap::new(),
            state: FwCfgState::default(),
        };
        d.update_directory();
        d
    }

    /// Sets a numbered item (`UUID`, `NB_CPUS`, the kernel items, an arch-local item).
    pub fn set_item(&mut self, selector: u16, data: Vec<u8>) -> Result<(), FwCfgError> {
        let key = selector & (ENTRY_MASK | ARCH_LOCAL);
        if matches!(key, SIGNATURE | ID | FILE_DIR) || (FILE_FIRST..=ENTRY_MASK).contains(&key) {
            return Err(FwCfgError::ReservedSelector(selector));
        }
        check_len(&format!("{selector:#x}"), data.len())?;
        self.items.insert(key, data);
        Ok(())
    }

    /// Adds the file `name` (such as `etc/e820`); returns its selector.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<u16, FwCfgError> {
        if name.is_empty() || name.len() >= FILE_NAME_LEN || name.contains('\0') {
            return Err(FwCfgError::BadName(name.to_string()));
        }
        if self.files.contains_key(name) {
            return Err(FwCfgError::DuplicateFile(name.to_string()));
        }
        if self.files.len() >= MAX_FILES {
            return Err(FwCfgError::TooManyFiles);
        }
        check_len(name, data.len())?;
        // `files` is shorter than MAX_FILES, so the selector stays within ENTRY_MASK.
        let selector = FILE_FIRST + self.files.len() as u16;
        self.items.insert(selector, data);
        self.files.insert(name.to_string(), selector);
        self.update_directory();
        Ok(selector)
    }

    /// The selector of file `name`.
    pub fn file(&self, name: &str) -> Option<u16> {
        self.files.get(name).copied()
    }

    fn update_directory(&mut self) {
        let mut dir = Vec::with_capacity(4 + 64 * self.files.len());
        dir.extend_from_slice(&(self.files.len() as u32).to_be_bytes());
        for (name, &sel) in &self.files {
            let len = self.items.get(&sel).map_or(0, Vec::len);
            // Sizes were checked to fit 32 bits when the file was added.
            dir.extend_from_slice(&(len as u32).to_be_bytes());
            dir.extend_from_slice(&sel.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut n = [0u8; FILE_NAME_LEN];
            n[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&n);
        }
        self.items.insert(FILE_DIR, dir);
    }

    /// The registers, for a snapshot.
    pub fn save(&self) -> FwCfgState {
        self.state
    }

    /// Puts the registers back (the items are the VM's, built again).
    pub fn restore(&mut self, state: FwCfgState) {
        self.state = state;
    }

    fn select(&mut self, selector: u16) {
        self.state.selector = selector & (ENTRY_MASK | ARCH_LOCAL);
        self.state.offset = 0;
    }

    fn current(&self) -> &[u8] {
        self.items
            .get(&self.state.selector)
            .map_or(&[][..], Vec::as_slice)
    }

    /// The next byte of the selected item (0 past its end).
    fn data_byte(&mut self) -> u8 {
        let at = self.state.offset as usize;
        let b = self.current().get(at).copied().unwrap_or(0);
        if at < self.current().len() {
            self.state.offset += 1;
        }
        b
    }

    /// Runs the DMA descriptor at `addr`: its result (0, or the error bit) goes back into
    /// its control word. A descriptor outside guest memory is dropped, as there is nowhere
    /// to report it.
    fn dma(&mut self, addr: u64) {
        let mut d = [0u8; DMA_DESCRIPTOR_LEN as usize];
        if self.mem.read_slice(&mut d, GuestAddress(addr)).is_err() {
            log::debug!("fw_cfg: DMA descriptor at {addr:#x} is outside guest memory");
            return;
        }
        let word = |i: usize| u32::from_be_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]);
        let control = word(0);
        let mut length = word(4);
        let mut target = u64::from_be_bytes([d[8], d[9], d[10], d[11], d[12], d[13], d[14], d[15]]);
        if control & DMA_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        let mut error = control & DMA_WRITE != 0 && length > 0;
        let (read, skip) = (control & DMA_READ != 0, control & DMA_SKIP != 0);
        if !error && (read || skip) {
            while length > 0 {
                let at = self.state.offset as usize;
                let item = self.current();
                let n = if at < item.len() {
                    let n = (item.len() - at).min(length as usize);
                    if read
                        && self
                            .mem
                            .write_slice(&item[at..at + n], GuestAddress(target))
                            .is_err()
                    {
                        error = true;
                        break;
                    }
                    // `n` is at most `length`, a u32.
                    self.state.offset += n as u32;
                    n as u32
                } else {
                    // Past the end: zeros, as QEMU gives.
                    if read && !self.zero(target, length) {
                        error = true;
                        break;
                    }
                    length
                };
                length -= n;
                target = target.wrapping_add(u64::from(n));
            }
        }
        let result = if error { DMA_ERROR } else { 0 };
        if self
            .mem
            .write_slice(&result.to_be_bytes(), GuestAddress(addr))
            .is_err()
        {
            log::debug!("fw_cfg: cannot write the DMA result at {addr:#x}");
        }
    }

    fn zero(&self, at: u64, len: u32) -> bool {
        let zeros = [0u8; 4096];
        let mut done = 0u64;
        while done < u64::from(len) {
            let n = (u64::from(len) - done).min(zeros.len() as u64);
            if self
                .mem
                .write_slice(&zeros[..n as usize], GuestAddress(at.wrapping_add(done)))
                .is_err()
            {
                return false;
            }
            done += n;
        }
        true
    }

    /// The DMA register read as `data.len()` bytes at `offset` into it (big-endian).
    fn read_signature(offset: u64, data: &mut [u8]) {
        let sig = DMA_SIGNATURE.to_be_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = sig.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    /// A write to the DMA register: `offset` 0 is the high half (or, with 8 bytes, all of
    /// it), 4 the low half, which starts the transfer.
    fn write_dma(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 8) => {
                let mut b = [0u8; 8];
                b.copy_from_slice(data);
                self.state.dma_high = 0;
                self.dma(u64::from_be_bytes(b));
            }
            (0, 4) => {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                self.state.dma_high = u32::from_be_bytes(b);
            }
            (4, 4) => {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                let addr =
                    (u64::from(self.state.dma_high) << 32) | u64::from(u32::from_be_bytes(b));
                self.state.dma_high = 0;
                self.dma(addr);
            }
            _ => log::debug!(
                "fw_cfg: ignored a {}-byte DMA write at +{offset}",
                data.len()
            ),
        }
    }
}

fn check_len(name: &str, len: usize) -> Result<(), FwCfgError> {
    if u32::try_from(len).is_err() {
        return Err(FwCfgError::TooBig {
            name: name.to_string(),
            len,
        });
    }
    Ok(())
}

impl BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (self.access, offset) {
            (Access::Io, 1) | (Access::Mmio, 0) => {
                for b in data.iter_mut() {
                    *b = self.data_byte();
                }
            }
            (Access::Io, o @ 4..12) => Self::read_signature(o - 4, data),
            (Access::Mmio, o @ 0x10..0x18) => Self::read_signature(o - 0x10, data),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (self.access, offset, data.len()) {
            (Access::Io, 0, 2) => self.select(u16::from_le_bytes([data[0], data[1]])),
            (Access::Mmio, 8, 2) => self.select(u16::from_be_bytes([data[0], data[1]])),
            (Access::Io, o @ (4 | 8), _) => self.write_dma(o - 4, data),
            (Access::Mmio, o @ (0x10 | 0x14), _) => self.write_dma(o - 0x10, data),
            // Writes through the data register are gone from the interface; ignored.
            _ => log::debug!(
                "fw_cfg: ignored a {}-byte write at +{offset:#x}",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESC: u64 = 0x1000;
    const BUF: u64 = 0x2000;

    fn dev(access: Access) -> FwCfg {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        FwCfg::new(access, mem)
    }

    fn read_item(d: &mut FwCfg, sel: u16, n: usize) -> Vec<u8> {
        d.write(0, &sel.to_le_bytes());
        (0..n)
            .map(|_| {
                let mut b = [0u8];
                d.read(1, &mut b);
                b[0]
            })
            .collect()
    }

    fn dma(d: &mut FwCfg, control: u32, len: u32, target: u64) -> u32 {
        let mut desc = Vec::new();
        desc.extend_from_slice(&control.to_be_bytes());
        desc.extend_from_slice(&len.to_be_bytes());
        desc.extend_from_slice(&target.to_be_bytes());
        d.mem.write_slice(&desc, GuestAddress(DESC)).unwrap();
        d.write(4, &0u32.to_be_bytes());
        d.write(8, &(DESC as u32).to_be_bytes());
        let mut r = [0u8; 4];
        d.mem.read_slice(&mut r, GuestAddress(DESC)).unwrap();
        u32::from_be_bytes(r)
    }

    #[test]
    fn signature_id_and_the_directory_through_the_ports() {
        let mut d = dev(Access::Io);
        assert_eq!(read_item(&mut d, SIGNATURE, 4), b"QEMU");
        assert_eq!(read_item(&mut d, ID, 4), [3, 0, 0, 0], "traditional + DMA");
        assert_eq!(
            read_item(&mut d, SIGNATURE, 6),
            [b'Q', b'E', b'M', b'U', 0, 0],
            "zeros past the end"
        );
        let sel = d.add_file("etc/e820", vec![1, 2, 3]).unwrap();
        assert_eq!(sel, FILE_FIRST);
        let b = d.add_file("bootorder", b"/pci@i0cf8/x\n".to_vec()).unwrap();
        let dir = read_item(&mut d, FILE_DIR, 4 + 2 * 64);
        assert_eq!(&dir[..4], &[0, 0, 0, 2]);
        // Sorted by name: bootorder, then etc/e820.
        assert_eq!(&dir[4..8], &13u32.to_be_bytes());
        assert_eq!(&dir[8..10], &b.to_be_bytes());
        assert_eq!(&dir[12..21], b"bootorder");
        assert_eq!(dir[21], 0);
        assert_eq!(&dir[68..72], &3u32.to_be_bytes());
        assert_eq!(&dir[72..74], &FILE_FIRST.to_be_bytes());
        assert_eq!(&dir[76..84], b"etc/e820");
        assert_eq!(read_item(&mut d, sel, 3), [1, 2, 3]);
        let mut s = [0u8; 4];
        d.read(4, &mut s);
        assert_eq!(&s, b"QEMU");
        d.read(8, &mut s);
        assert_eq!(&s, b" CFG");
    }

    #[test]
    fn dma_reads_skips_and_refuses_writes() {
        let mut d = dev(Access::Io);
        let sel = d
            .add_file("etc/table-loader", (0u8..200).collect())
            .unwrap();
        // Select and read 100 bytes, skip 50, read the rest and past the end.
        let select = (u32::from(sel) << 16) | DMA_SELECT;
        assert_eq!(dma(&mut d, select | DMA_READ, 100, BUF), 0);
        let mut got = vec![0u8; 100];
        d.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(got, (0u8..100).collect::<Vec<_>>());
        assert_eq!(dma(&mut d, DMA_SKIP, 50, 0), 0);
        d.mem.write_slice(&[0xff; 64], GuestAddress(BUF)).unwrap();
        assert_eq!(dma(&mut d, DMA_READ, 64, BUF), 0);
        let mut got = vec![0u8; 64];
        d.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(&got[..50], &(150u8..200).collect::<Vec<_>>()[..]);
        assert_eq!(&got[50..], &[0; 14], "zeros past the end");
        assert_eq!(dma(&mut d, DMA_WRITE, 4, BUF), DMA_ERROR, "read-only");
        assert_eq!(
            dma(&mut d, select | DMA_READ, 16, 0xffff_fff0),
            DMA_ERROR,
            "a target outside guest memory"
        );
        // A descriptor outside memory is dropped without a panic.
        d.write(4, &0u32.to_be_bytes());
        d.write(8, &0xffff_0000u32.to_be_bytes());
    }

    #[test]
    fn mmio_registers_are_big_endian() {
        let mut d = dev(Access::Mmio);
        d.set_item(NB_CPUS, 4u16.to_le_bytes().to_vec()).unwrap();
        d.write(8, &NB_CPUS.to_be_bytes());
        let mut b = [0u8; 2];
        d.read(0, &mut b);
        assert_eq!(u16::from_le_bytes(b), 4);
        d.write(8, &SIGNATURE.to_be_bytes());
        let mut w = [0u8; 8];
        d.read(0, &mut w);
        assert_eq!(&w, b"QEMU\0\0\0\0", "an 8-byte read, then zeros");
        d.read(0x10, &mut w);
        assert_eq!(&w, b"QEMU CFG");
        let sel = d.add_file("etc/x", vec![9; 8]).unwrap();
        let mut desc = Vec::new();
        desc.extend_from_slice(&((u32::from(sel) << 16) | DMA_SELECT | DMA_READ).to_be_bytes());
        desc.extend_from_slice(&8u32.to_be_bytes());
        desc.extend_from_slice(&BUF.to_be_bytes());
        d.mem.write_slice(&desc, GuestAddress(DESC)).unwrap();
        d.write(0x10, &DESC.to_be_bytes());
        let mut got = [0u8; 8];
        d.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(got, [9; 8]);
    }

    #[test]
    fn bad_items_are_refused() {
        let mut d = dev(Access::Io);
        assert_eq!(
            d.add_file("", vec![]),
            Err(FwCfgError::BadName(String::new()))
        );
        assert!(matches!(
            d.add_file(&"x".repeat(56), vec![]),
            Err(FwCfgError::BadName(_))
        ));
        d.add_file(&"x".repeat(55), vec![]).unwrap();
        assert!(matches!(
            d.add_file(&"x".repeat(55), vec![]),
            Err(FwCfgError::DuplicateFile(_))
        ));
        assert_eq!(
            d.set_item(FILE_DIR, vec![]),
            Err(FwCfgError::ReservedSelector(FILE_DIR))
        );
        assert_eq!(
            d.set_item(FILE_FIRST, vec![]),
            Err(FwCfgError::ReservedSelector(FILE_FIRST))
        );
        d.set_item(ARCH_LOCAL | 3, vec![1]).unwrap();
        assert_eq!(read_item(&mut d, ARCH_LOCAL | 3, 1), [1]);
    }

    #[test]
    fn the_registers_round_trip() {
        let mut d = dev(Access::Io);
        d.add_file("a", b"hello".to_vec()).unwrap();
        assert_eq!(read_item(&mut d, FILE_FIRST, 2), b"he");
        d.write(4, &0x12u32.to_be_bytes());
        let s = d.save();
        assert_eq!(
            s,
            FwCfgState {
                selector: FILE_FIRST,
                offset: 2,
                dma_high: 0x12
            }
        );
        let mut e = dev(Access::Io);
        e.add_file("a", b"hello".to_vec()).unwrap();
        e.restore(s);
        let mut b = [0u8];
        e.read(1, &mut b);
        assert_eq!(b[0], b'l', "goes on where it was");
    }
}
