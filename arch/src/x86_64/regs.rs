//! The register state a vCPU starts in, for the two boot protocols tern speaks.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{GDT_64BIT, GDT_PVH, segment_from_gdt};
use super::layout::*;
use crate::{Error, Result};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// 64-bit Linux boot protocol: long mode, identity-mapped first GiB, `%rsi` = zero page.
    Linux64 {
        /// The kernel's 64-bit entry point.
        entry: u64,
    },
    /// PVH: 32-bit protected mode, paging off, `%ebx` = `hvm_start_info`.
    Pvh {
        /// The PVH entry point from the kernel's ELF note.
        entry: u64,
    },
}

/// General-purpose registers of the boot vCPU.
pub fn boot_regs(entry: BootEntry) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        BootEntry::Linux64 { entry } => {
            regs.rip = entry;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        BootEntry::Pvh { entry } => {
            regs.rip = entry;
            regs.rbx = PVH_INFO_START;
        }
    }
    regs
}

/// FPU state every vCPU starts with (what a reset x87/SSE unit holds).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: u64,
    val: T,
) -> Result<()> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| Error::GuestWrite { what, addr, source })
}

/// Writes the GDT (and, for 64-bit entry, the identity page tables) into guest memory and sets
/// the boot vCPU's segment and control registers in `sregs` (read from the vCPU first).
pub fn setup_boot_sregs(
    mem: &GuestMemoryMmap,
    entry: BootEntry,
    sregs: &mut kvm_sregs,
) -> Result<()> {
    let gdt = match entry {
        BootEntry::Linux64 { .. } => GDT_64BIT,
        BootEntry::Pvh { .. } => GDT_PVH,
    };
    for (i, e) in gdt.iter().enumerate() {
        write(mem, "GDT", GDT_START + 8 * i as u64, *e)?;
    }
    write(mem, "IDT", IDT_START, 0u64)?;
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;

    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match entry {
        BootEntry::Linux64 { .. } => {
            // Identity-map the first GiB with 2 MiB pages: enough for the kernel's early code,
            // which builds its own tables.
            write(mem, "PML4", PML4_START, PDPTE_START | 0x03)?;
            write(mem, "PDPTE", PDPTE_START, PDE_START | 0x03)?;
            for i in 0..512u64 {
                write(mem, "PDE", PDE_START + i * 8, (i << 21) | 0x83)?;
            }
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootEntry::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn linux64_enters_long_mode_with_identity_map() {
        let m = mem();
        let mut sregs = kvm_sregs::default();
        setup_boot_sregs(&m, BootEntry::Linux64 { entry: 0x100_0000 }, &mut sregs).unwrap();
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cr3, PML4_START);
        assert_eq!(sregs.cs.l, 1);
        let pde5: u64 = m.read_obj(GuestAddress(PDE_START + 5 * 8)).unwrap();
        assert_eq!(pde5, (5 << 21) | 0x83);
        let regs = boot_regs(BootEntry::Linux64 { entry: 0x100_0000 });
        assert_eq!((regs.rip, regs.rsi), (0x100_0000, ZERO_PAGE_START));
    }

    #[test]
    fn pvh_enters_protected_mode_without_paging() {
        let m = mem();
        let mut sregs = kvm_sregs {
            cr0: X86_CR0_PG,
            ..Default::default()
        };
        setup_boot_sregs(&m, BootEntry::Pvh { entry: 0x100_0680 }, &mut sregs).unwrap();
        assert_eq!(sregs.cr0 & X86_CR0_PG, 0);
        assert_eq!(sregs.cr0 & X86_CR0_PE, X86_CR0_PE);
        assert_eq!(sregs.cs.db, 1);
        assert_eq!(
            boot_regs(BootEntry::Pvh { entry: 0x100_0680 }).rbx,
            PVH_INFO_START
        );
    }
}
