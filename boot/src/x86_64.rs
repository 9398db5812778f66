use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use arch::x86_64::layout::*;
use arch::x86_64::memory::E820Entry;
use arch::x86_64::regs::BootEntry;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::{BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability, load_cmdline};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::{BootProtocol, Error, InitrdRegion, Result};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Offset of the 64-bit entry point from a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Highest initrd address a kernel without a setup header (ELF boot) is assumed to accept.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;

/// The kind of kernel image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF vmlinux.
    Elf,
    /// bzImage.
    BzImage,
}

/// A kernel placed in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// What the file was.
    pub format: KernelFormat,
    /// How the boot vCPU enters it.
    pub entry: BootEntry,
    /// The bzImage setup header, to seed `boot_params`.
    pub setup_header: Option<setup_header>,
    /// First guest address after the kernel.
    pub end: u64,
}

/// Tells an ELF vmlinux from a bzImage by their magic numbers.
pub fn detect_format(path: &Path, file: &mut File) -> Result<KernelFormat> {
    let io = |source| Error::KernelFile {
        path: path.to_path_buf(),
        source,
    };
    let mut head = [0u8; 0x206];
    let n = read_up_to(file, &mut head).map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == KERNEL_HDR_MAGIC.to_le_bytes() {
        return Ok(KernelFormat::BzImage);
    }
    Err(Error::NotAKernel(path.to_path_buf()))
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Loads the kernel at `path` into `mem` and picks its entry point.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    protocol: BootProtocol,
) -> Result<LoadedKernel> {
    let mut file = File::open(path).map_err(|source| Error::KernelFile {
        path: path.to_path_buf(),
        source,
    })?;
    let format = detect_format(path, &mut file)?;
    let load_err = |e: linux_loader::loader::Error| Error::KernelLoad {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let pvh = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => Some(addr.0),
                _ => None,
            };
            let entry = match (protocol, pvh) {
                (BootProtocol::Pvh, None) => return Err(Error::NoPvhEntry(path.to_path_buf())),
                (BootProtocol::Pvh | BootProtocol::Auto, Some(entry)) => BootEntry::Pvh { entry },
                (BootProtocol::Linux, _) | (BootProtocol::Auto, None) => BootEntry::Linux64 {
                    entry: r.kernel_load.0,
                },
            };
            Ok(LoadedKernel {
                format,
                entry,
                setup_header: None,
                end: r.kernel_end,
            })
        }
        KernelFormat::BzImage => {
            if protocol == BootProtocol::Pvh {
                return Err(Error::BzImageNotPvh(path.to_path_buf()));
            }
            let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            Ok(LoadedKernel {
                format,
                entry: BootEntry::Linux64 {
                    entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                },
                setup_header: r.setup_header,
                end: r.kernel_end,
            })
        }
    }
}

/// Loads the initrd at `path` as high as it may go in low RAM (below `low_ram_end` and the
/// kernel's `initrd_addr_max`), above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
    low_ram_end: u64,
) -> Result<InitrdRegion> {
    let addr_max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let top = low_ram_end.min(addr_max + 1);
    crate::place_initrd(mem, path, top, kernel.end)
}

/// Validates `args` as a kernel command line and writes it at [`CMDLINE_START`].
pub fn load_cmdline_str(mem: &GuestMemoryMmap, args: &str) -> Result<usize> {
    let cmdline =
        Cmdline::try_from(args, CMDLINE_MAX_SIZE).map_err(|e| Error::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| Error::Cmdline(e.to_string()))?;
    Ok(args.len() + 1)
}

/// Writes the boot information for `kernel`: a `boot_params` zero page for the Linux boot
/// protocol or an `hvm_start_info` with its memory map for PVH.
pub fn write_boot_info(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<InitrdRegion>,
    e820: &[E820Entry],
    rsdp_addr: u64,
) -> Result<()> {
    match kernel.entry {
        BootEntry::Pvh { .. } => write_pvh_info(mem, cmdline_len, initrd, e820, rsdp_addr),
        BootEntry::Linux64 { .. } => {
            write_zero_page(mem, kernel, cmdline_len, initrd, e820, rsdp_addr)
        }
    }
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<InitrdRegion>,
    e820: &[E820Entry],
    rsdp_addr: u64,
) -> Result<()> {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(rd) = initrd {
        params.hdr.ramdisk_image = rd.addr as u32;
        params.hdr.ramdisk_size = rd.size as u32;
        params.ext_ramdisk_image = (rd.addr >> 32) as u32;
        params.ext_ramdisk_size = (rd.size >> 32) as u32;
    }
    params.acpi_rsdp_addr = rsdp_addr;
    if e820.len() > params.e820_table.len() {
        return Err(Error::BootInfo(
            "the e820 map",
            format!("{} entries is too many", e820.len()),
        ));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| Error::BootInfo("boot_params", e.to_string()))
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    _cmdline_len: usize,
    initrd: Option<InitrdRegion>,
    e820: &[E820Entry],
    rsdp_addr: u64,
) -> Result<()> {
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp_addr,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let modules_addr =
        PVH_MEMMAP_START + (memmap.len() * size_of::<hvm_memmap_table_entry>()) as u64;
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if let Some(rd) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = modules_addr;
        params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
        params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
        let module = linux_loader::loader::elf::start_info::hvm_modlist_entry {
            paddr: rd.addr,
            size: rd.size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(modules_addr));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|e| Error::BootInfo("hvm_start_info", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::Bytes;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    fn temp_file(name: &str, data: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("tern-boot-{}-{name}", std::process::id()));
        File::create(&p).unwrap().write_all(data).unwrap();
        p
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let p = temp_file("garbage", b"hello, this is not a kernel");
        let err = load_kernel(&mem(), &p, BootProtocol::Auto).unwrap_err();
        assert!(matches!(err, Error::NotAKernel(_)), "{err}");
        assert!(err.to_string().contains("not a Linux kernel"));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn missing_kernel_names_the_path() {
        let err = load_kernel(
            &mem(),
            Path::new("/nonexistent/vmlinux"),
            BootProtocol::Auto,
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    }

    #[test]
    fn truncated_elf_is_refused_cleanly() {
        let p = temp_file("elf", b"\x7fELF\x02\x01\x01");
        let err = load_kernel(&mem(), &p, BootProtocol::Auto).unwrap_err();
        assert!(matches!(err, Error::KernelLoad { .. }), "{err}");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let p = temp_file("initrd", &[7u8; 10_000]);
        let k = LoadedKernel {
            format: KernelFormat::Elf,
            entry: BootEntry::Linux64 { entry: 0x100_0000 },
            setup_header: None,
            end: 0x200_0000,
        };
        let rd = load_initrd(&mem(), &p, &k, 64 << 20).unwrap();
        assert_eq!(rd.addr % 4096, 0);
        assert!(rd.addr + rd.size <= 64 << 20);
        assert!(rd.addr >= k.end);
        let small = LoadedKernel {
            end: (64 << 20) - 4096,
            ..k
        };
        assert!(matches!(
            load_initrd(&mem(), &p, &small, 64 << 20),
            Err(Error::InitrdTooBig { .. })
        ));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn zero_page_carries_cmdline_e820_and_initrd() {
        let m = mem();
        let n = load_cmdline_str(&m, "console=ttyS0 quiet").unwrap();
        let k = LoadedKernel {
            format: KernelFormat::Elf,
            entry: BootEntry::Linux64 { entry: 0x100_0000 },
            setup_header: None,
            end: 0x200_0000,
        };
        let e820 = arch::x86_64::memory::e820_map(&[(0, 64 << 20)]);
        let rd = InitrdRegion {
            addr: 0x300_0000,
            size: 0x1000,
        };
        write_boot_info(&m, &k, n, Some(rd), &e820, ACPI_START).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!(p.e820_entries as usize, e820.len());
        assert_eq!({ p.acpi_rsdp_addr }, ACPI_START);
    }

    #[test]
    fn pvh_start_info_has_magic_and_module() {
        let m = mem();
        let k = LoadedKernel {
            format: KernelFormat::Elf,
            entry: BootEntry::Pvh { entry: 0x100_0680 },
            setup_header: None,
            end: 0x200_0000,
        };
        let e820 = arch::x86_64::memory::e820_map(&[(0, 64 << 20)]);
        let rd = InitrdRegion {
            addr: 0x300_0000,
            size: 0x1000,
        };
        write_boot_info(&m, &k, 10, Some(rd), &e820, ACPI_START).unwrap();
        let info: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_entries as usize, e820.len());
        let module: linux_loader::loader::elf::start_info::hvm_modlist_entry =
            m.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (rd.addr, rd.size));
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        let long = "a".repeat(CMDLINE_MAX_SIZE + 10);
        assert!(matches!(
            load_cmdline_str(&mem(), &long),
            Err(Error::Cmdline(_))
        ));
    }
}
