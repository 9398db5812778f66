//! Loading what the guest runs: a Linux kernel (ELF vmlinux, with or without a PVH note, or a
//! bzImage), its initrd and command line, and the boot information the kernel reads first
//! (`boot_params` for the Linux boot protocol, `hvm_start_info` for PVH).

#![deny(missing_docs)]

// Plain file and memory work: built (and unit-tested) on every host, used on aarch64.
pub mod aarch64;
#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use x86_64::*;

use std::path::PathBuf;

/// Errors loading a guest payload. Each names the file involved and says what to check.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel file could not be opened or read.
    #[error("kernel image {path}: {source}")]
    KernelFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a kernel this architecture boots.
    #[cfg_attr(
        target_arch = "aarch64",
        error("kernel image {0}: not a Linux kernel (expected an arm64 Image or Image.gz)")
    )]
    #[cfg_attr(
        not(target_arch = "aarch64"),
        error("kernel image {0}: not a Linux kernel (expected an ELF vmlinux or a bzImage)")
    )]
    NotAKernel(PathBuf),
    /// The kernel parsed but could not be placed in guest memory.
    #[error("kernel image {path}: {reason}")]
    KernelLoad {
        /// The file.
        path: PathBuf,
        /// What the loader said.
        reason: String,
    },
    /// PVH was asked for but the kernel has no PVH entry note.
    #[error(
        "kernel image {0}: boot_protocol \"pvh\" needs a vmlinux with a PVH note (XEN_ELFNOTE_PHYS32_ENTRY); use \"linux\" or \"auto\""
    )]
    NoPvhEntry(PathBuf),
    /// PVH was asked for a bzImage.
    #[error(
        "kernel image {0}: a bzImage boots through the Linux boot protocol only; use boot_protocol \"linux\" or \"auto\""
    )]
    BzImageNotPvh(PathBuf),
    /// The initrd could not be opened or read.
    #[error("initrd {path}: {source}")]
    InitrdFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The initrd does not fit in guest memory beside the kernel.
    #[error(
        "initrd {path} ({size} bytes) does not fit in guest memory beside the kernel; give the VM more memory (machine-config.mem_size_mib)"
    )]
    InitrdTooBig {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The kernel command line is invalid or too long.
    #[error("boot-source.boot_args: {0}")]
    Cmdline(String),
    /// Writing boot information into guest memory failed.
    #[error("writing {0} into guest memory failed: {1}")]
    BootInfo(&'static str, String),
    /// A platform table could not be built.
    #[error(transparent)]
    Arch(#[from] arch::Error),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// An initrd placed in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdRegion {
    /// Guest address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Reads the initrd at `path` into guest memory right below `top`, page-aligned, and not
/// below `kernel_end`.
fn place_initrd(
    mem: &vm_memory::GuestMemoryMmap,
    path: &std::path::Path,
    top: u64,
    kernel_end: u64,
) -> Result<InitrdRegion> {
    use vm_memory::{Bytes, GuestAddress};
    let io = |source| Error::InitrdFile {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let too_big = || Error::InitrdTooBig {
        path: path.to_path_buf(),
        size,
    };
    let addr = top.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if addr < kernel_end {
        return Err(too_big());
    }
    let len = usize::try_from(size).map_err(|_| too_big())?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|e| Error::InitrdFile {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
    Ok(InitrdRegion { addr, size })
}

/// Which entry point to use for a kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BootProtocol {
    /// PVH when the kernel has a PVH note, otherwise the Linux boot protocol.
    #[default]
    Auto,
    /// The PVH entry (ELF vmlinux with a PVH note only).
    Pvh,
    /// The 64-bit Linux boot protocol (ELF vmlinux or bzImage).
    Linux,
}
