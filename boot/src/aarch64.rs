//! ARM64: the kernel `Image` (or its gzip form, `Image.gz`) and the initrd. The command line
//! and the initrd's place go into the device tree (`arch::aarch64::fdt`), not guest memory.
//!
//! The Image header is parsed here rather than with linux-loader's PE loader, which only
//! builds for aarch64 targets: this way the loader is unit-tested on any host, and the gzip
//! form goes through the same code.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use arch::aarch64::layout::{DRAM_START, KERNEL_ALIGN};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::{Error, InitrdRegion, Result};

/// "ARM\x64" at offset 56 of an arm64 Image.
const IMAGE_MAGIC: u32 = 0x644d_5241;
/// The header's size.
const HEADER_LEN: usize = 64;
/// Largest kernel tern decompresses (an arm64 Image is 10-60 MiB).
const MAX_KERNEL_SIZE: u64 = 512 << 20;

/// A kernel placed in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedKernel {
    /// Where the boot vCPU starts (the first byte of the Image).
    pub entry: u64,
    /// First guest address after the kernel's memory footprint (`image_size`, which covers
    /// its BSS).
    pub end: u64,
    /// Whether the file was gzip-compressed.
    pub gzip: bool,
}

/// Checks that `path` is an arm64 `Image` or a gzip-compressed one, reading only its header
/// (the gzip form: only as much as decompresses to the header). True when gzip.
pub fn detect(path: &Path) -> Result<bool> {
    let io = |source| Error::KernelFile {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let mut head = [0u8; HEADER_LEN];
    let n = read_full(&mut file, &mut head).map_err(io)?;
    let gzip = n >= 2 && head[..2] == [0x1f, 0x8b];
    if gzip {
        let file = File::open(path).map_err(io)?;
        let mut dec = flate2::read::GzDecoder::new(file);
        let n = read_full(&mut dec, &mut head).unwrap_or(0);
        if n < HEADER_LEN {
            return Err(Error::NotAKernel(path.to_path_buf()));
        }
    } else if n < HEADER_LEN {
        return Err(Error::NotAKernel(path.to_path_buf()));
    }
    if u32::from_le_bytes([head[56], head[57], head[58], head[59]]) != IMAGE_MAGIC {
        return Err(Error::NotAKernel(path.to_path_buf()));
    }
    Ok(gzip)
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads the kernel at `path` (an `Image`, or an `Image.gz`) into guest memory at the start of
/// RAM plus the header's `text_offset`.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel> {
    let io = |source| Error::KernelFile {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let mut raw = Vec::new();
    file.take(MAX_KERNEL_SIZE + 1)
        .read_to_end(&mut raw)
        .map_err(io)?;
    let gzip = raw.starts_with(&[0x1f, 0x8b]);
    let image = if gzip {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .take(MAX_KERNEL_SIZE + 1)
            .read_to_end(&mut out)
            .map_err(|e| Error::KernelLoad {
                path: path.to_path_buf(),
                reason: format!("cannot decompress the gzip Image: {e}"),
            })?;
        out
    } else {
        raw
    };
    if image.len() as u64 > MAX_KERNEL_SIZE {
        return Err(Error::KernelLoad {
            path: path.to_path_buf(),
            reason: format!("larger than {} MiB", MAX_KERNEL_SIZE >> 20),
        });
    }
    place(mem, path, &image, gzip)
}

fn place(mem: &GuestMemoryMmap, path: &Path, image: &[u8], gzip: bool) -> Result<LoadedKernel> {
    let header = image
        .get(..HEADER_LEN)
        .filter(|h| u32::from_le_bytes([h[56], h[57], h[58], h[59]]) == IMAGE_MAGIC)
        .ok_or_else(|| Error::NotAKernel(path.to_path_buf()))?;
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&header[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let image_size = u64_at(16);
    // Kernels before 3.17 leave image_size 0 and expect text_offset 0x80000.
    let text_offset = if image_size == 0 { 0x80000 } else { u64_at(8) };
    if text_offset >= KERNEL_ALIGN {
        return Err(Error::KernelLoad {
            path: path.to_path_buf(),
            reason: format!("text_offset {text_offset:#x} is not below 2 MiB"),
        });
    }
    let entry = DRAM_START + text_offset;
    let footprint = image_size.max(image.len() as u64);
    let ram_end = mem.last_addr().0.saturating_add(1);
    let end = entry.saturating_add(footprint);
    if end > ram_end {
        return Err(Error::KernelLoad {
            path: path.to_path_buf(),
            reason: format!(
                "needs {} MiB of RAM from the start of memory; give the VM more memory (machine-config.mem_size_mib)",
                (end - DRAM_START).div_ceil(1 << 20)
            ),
        });
    }
    mem.write_slice(image, GuestAddress(entry))
        .map_err(|e| Error::KernelLoad {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok(LoadedKernel { entry, end, gzip })
}

/// Reads the initrd at `path` into guest memory right below `top` (the device tree),
/// page-aligned, above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
    top: u64,
) -> Result<InitrdRegion> {
    crate::place_initrd(mem, path, top, kernel.end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vmm_sys_util::tempfile::TempFile;

    fn image(text_offset: u64, image_size: u64, body: usize) -> Vec<u8> {
        let mut v = vec![0u8; HEADER_LEN + body];
        v[8..16].copy_from_slice(&text_offset.to_le_bytes());
        v[16..24].copy_from_slice(&image_size.to_le_bytes());
        v[56..60].copy_from_slice(&IMAGE_MAGIC.to_le_bytes());
        for (i, b) in v[HEADER_LEN..].iter_mut().enumerate() {
            *b = i as u8;
        }
        v
    }

    fn file(bytes: &[u8]) -> TempFile {
        let f = TempFile::new().unwrap();
        f.as_file().write_all(bytes).unwrap();
        f
    }

    fn mem(mib: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(DRAM_START), mib << 20)]).unwrap()
    }

    #[test]
    fn image_and_gzip_image_load_at_text_offset() {
        let img = image(0, 3 << 20, 8192);
        let m = mem(16);
        let f = file(&img);
        let k = load_kernel(&m, f.as_path()).unwrap();
        assert_eq!(
            k,
            LoadedKernel {
                entry: DRAM_START,
                end: DRAM_START + (3 << 20),
                gzip: false
            }
        );
        let mut back = vec![0u8; img.len()];
        m.read_slice(&mut back, GuestAddress(DRAM_START)).unwrap();
        assert_eq!(back, img);

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&image(0x80000, 1 << 20, 100)).unwrap();
        let f = file(&gz.finish().unwrap());
        let m = mem(16);
        let k = load_kernel(&m, f.as_path()).unwrap();
        assert!(k.gzip);
        assert_eq!(k.entry, DRAM_START + 0x80000);
        let magic: u32 = m.read_obj(GuestAddress(k.entry + 56)).unwrap();
        assert_eq!(magic, IMAGE_MAGIC);
    }

    #[test]
    fn bad_kernels_are_refused_with_reasons() {
        let m = mem(16);
        let f =
            file(b"not a kernel at all, just some text that is long enough to be a header......");
        assert!(matches!(
            load_kernel(&m, f.as_path()),
            Err(Error::NotAKernel(_))
        ));
        let f = file(&[0x1f, 0x8b, 0, 1, 2]);
        let e = load_kernel(&m, f.as_path()).unwrap_err().to_string();
        assert!(e.contains("decompress"), "{e}");
        let f = file(&image(0, 64 << 20, 10));
        let e = load_kernel(&m, f.as_path()).unwrap_err().to_string();
        assert!(e.contains("more memory"), "{e}");
        let f = file(&image(4 << 20, 1 << 20, 10));
        assert!(load_kernel(&m, f.as_path()).is_err());
        // detect() reads headers only.
        let f = file(&image(0, 1 << 20, 10));
        assert!(!detect(f.as_path()).unwrap());
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&image(0, 1 << 20, 10)).unwrap();
        let f = file(&gz.finish().unwrap());
        assert!(detect(f.as_path()).unwrap());
        for junk in [&b"short"[..], &[0x1f, 0x8b, 8, 0], &[0u8; 100]] {
            let f = file(junk);
            assert!(matches!(detect(f.as_path()), Err(Error::NotAKernel(_))));
        }
        assert!(load_kernel(&m, Path::new("/nonexistent/Image")).is_err());
    }

    #[test]
    fn initrd_goes_below_the_top_and_above_the_kernel() {
        let m = mem(16);
        let k = LoadedKernel {
            entry: DRAM_START,
            end: DRAM_START + (4 << 20),
            gzip: false,
        };
        let f = file(&[7u8; 5000]);
        let top = DRAM_START + (14 << 20);
        let r = load_initrd(&m, f.as_path(), &k, top).unwrap();
        assert_eq!(r.size, 5000);
        assert_eq!(r.addr % 4096, 0);
        assert!(r.addr + r.size <= top && r.addr >= k.end);
        let big = file(&vec![0u8; 11 << 20]);
        assert!(matches!(
            load_initrd(&m, big.as_path(), &k, top),
            Err(Error::InitrdTooBig { .. })
        ));
    }
}
