//! The boot vCPU's entry state on ARM64, as KVM one-reg IDs and values (the arm64 Linux boot
//! protocol: MMU off, interrupts masked, EL1h, `x0` = the device tree's address).
//!
//! The register IDs are the KVM ABI (`KVM_REG_ARM64 | size | group | index`), written out so
//! this module stays plain data that compiles and tests on any host.

/// `KVM_REG_ARM64`.
pub const KVM_REG_ARM64: u64 = 0x6000_0000_0000_0000;
/// `KVM_REG_SIZE_U64`.
pub const KVM_REG_SIZE_U64: u64 = 0x0030_0000_0000_0000;
/// `KVM_REG_ARM_CORE`: the `struct kvm_regs` group, indexed in 32-bit words.
pub const KVM_REG_ARM_CORE: u64 = 0x0010 << 16;
/// `KVM_REG_ARM64_SYSREG`.
pub const KVM_REG_ARM64_SYSREG: u64 = 0x0013 << 16;

/// PSTATE at entry: EL1 with SP_EL1 (EL1h), and D, A, I, F masked.
pub const PSTATE_BOOT: u64 = 0x3c5;

/// The ID of core register at byte `offset` of `struct kvm_regs`.
pub const fn core_reg(offset: u64) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | (offset / 4)
}

/// General register `x<n>` (n < 31).
pub const fn xreg(n: u64) -> u64 {
    core_reg(n * 8)
}

/// The program counter (`regs.pc`, after x0..x30 and sp).
pub const PC: u64 = core_reg(32 * 8);
/// PSTATE (`regs.pstate`).
pub const PSTATE: u64 = core_reg(33 * 8);

/// The ID of system register `op0, op1, CRn, CRm, op2`.
pub const fn sysreg(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> u64 {
    KVM_REG_ARM64
        | KVM_REG_SIZE_U64
        | KVM_REG_ARM64_SYSREG
        | (op0 << 14)
        | (op1 << 11)
        | (crn << 7)
        | (crm << 3)
        | op2
}

/// MPIDR_EL1: the vCPU's affinity, which the device tree's `cpu` nodes name.
pub const MPIDR_EL1: u64 = sysreg(3, 0, 0, 0, 5);

/// The registers the boot vCPU starts with: (ID, value) pairs.
pub fn boot_regs(entry: u64, fdt_addr: u64) -> Vec<(u64, u64)> {
    vec![
        (PSTATE, PSTATE_BOOT),
        (PC, entry),
        (xreg(0), fdt_addr),
        (xreg(1), 0),
        (xreg(2), 0),
        (xreg(3), 0),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_match_the_kvm_abi() {
        // Values from the Linux UAPI (arch/arm64/include/uapi/asm/kvm.h) as QEMU and crosvm
        // print them.
        assert_eq!(xreg(0), 0x6030_0000_0010_0000);
        assert_eq!(xreg(1), 0x6030_0000_0010_0002);
        assert_eq!(PC, 0x6030_0000_0010_0040);
        assert_eq!(PSTATE, 0x6030_0000_0010_0042);
        assert_eq!(MPIDR_EL1, 0x6030_0000_0013_c005);
        let r = boot_regs(0x8020_0000, 0x8fe0_0000);
        assert!(r.contains(&(PC, 0x8020_0000)));
        assert!(r.contains(&(xreg(0), 0x8fe0_0000)));
    }
}
