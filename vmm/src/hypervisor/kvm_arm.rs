//! KVM's ARM64 register IDs and GIC device attributes to tern's own names
//! ([`super::arm_state`]) and back.
//!
//! Core registers are `KVM_REG_ARM_CORE` IDs indexing `struct kvm_regs` in 32-bit words;
//! system registers are `KVM_REG_ARM64_SYSREG` IDs whose low 16 bits are the encoding.

use arch::aarch64::gic::{
    self as kgic, GRP_CPU_REGS, GRP_CPU_SYSREGS, GRP_DIST_REGS, GRP_REDIST_REGS,
};
use arch::aarch64::regs::{KVM_REG_ARM_CORE, KVM_REG_ARM64, KVM_REG_ARM64_SYSREG};

use super::arm_state::{ArmPower, ArmReg, GicReg};
use super::{HvResult, HypervisorError};

const GROUP_MASK: u64 = 0xffff << 16;
const KVM_REG_SIZE_SHIFT: u64 = 52;
const KVM_REG_SIZE_MASK: u64 = 0xf << KVM_REG_SIZE_SHIFT;
/// The arch field and the rest of the top half: what an ARM64 ID has besides size and group.
const ARCH_MASK: u64 = 0xff00_0000_0000_0000;

// Word indices into struct kvm_regs: regs.regs[31], sp, pc, pstate (u64 each), sp_el1,
// elr_el1, spsr[5], then fp_regs (16-byte aligned): vregs[32] (u128), fpsr, fpcr (u32).
const SP: u64 = 62;
const PC: u64 = 64;
const PSTATE: u64 = 66;
const SP_EL1: u64 = 68;
const ELR_EL1: u64 = 70;
const SPSR: u64 = 72;
const VREGS: u64 = 84;
const FPSR: u64 = 212;
const FPCR: u64 = 213;

fn size_bits(bytes: usize) -> u64 {
    (bytes.trailing_zeros() as u64) << KVM_REG_SIZE_SHIFT
}

/// The bytes an ID's size field says its value has.
pub(super) fn id_width(id: u64) -> usize {
    1usize << ((id & KVM_REG_SIZE_MASK) >> KVM_REG_SIZE_SHIFT)
}

/// CNTVCT_EL0's and CNTV_CVAL_EL0's encodings. KVM's `KVM_REG_ARM_TIMER_CNT` carries the
/// second and `KVM_REG_ARM_TIMER_CVAL` the first (its uapi header says the two were swapped
/// by mistake and are kept so): the conversion swaps them back, so a saved `Sys` register is
/// what its encoding names.
const CNTVCT_EL0: u16 = 0xdf02;
const CNTV_CVAL_EL0: u16 = 0xdf1a;

fn kvm_timer_swap(enc: u16) -> u16 {
    match enc {
        CNTVCT_EL0 => CNTV_CVAL_EL0,
        CNTV_CVAL_EL0 => CNTVCT_EL0,
        other => other,
    }
}

/// tern's name for a KVM one-reg ID.
pub(super) fn reg_from_kvm(id: u64) -> ArmReg {
    if id & ARCH_MASK != KVM_REG_ARM64 {
        return ArmReg::Backend(id);
    }
    let index = id & 0xffff;
    let w = id_width(id);
    match id & GROUP_MASK {
        KVM_REG_ARM_CORE => match (index, w) {
            (0..=60, 8) if index % 2 == 0 => ArmReg::X((index / 2) as u8),
            (SP, 8) => ArmReg::Sp,
            (PC, 8) => ArmReg::Pc,
            (PSTATE, 8) => ArmReg::Pstate,
            (SP_EL1, 8) => ArmReg::SpEl1,
            (ELR_EL1, 8) => ArmReg::ElrEl1,
            (SPSR..=80, 8) if (index - SPSR) % 2 == 0 => ArmReg::Spsr(((index - SPSR) / 2) as u8),
            (VREGS..=208, 16) if (index - VREGS) % 4 == 0 => ArmReg::V(((index - VREGS) / 4) as u8),
            (FPSR, 4) => ArmReg::Fpsr,
            (FPCR, 4) => ArmReg::Fpcr,
            _ => ArmReg::Backend(id),
        },
        KVM_REG_ARM64_SYSREG if w == 8 && (id >> 32) & 0xffff == 0 => {
            ArmReg::Sys(kvm_timer_swap(index as u16))
        }
        _ => ArmReg::Backend(id),
    }
}

/// KVM's one-reg ID for a register.
pub(super) fn reg_to_kvm(r: ArmReg) -> HvResult<u64> {
    let core =
        |index: u64, bytes: usize| KVM_REG_ARM64 | size_bits(bytes) | KVM_REG_ARM_CORE | index;
    let bad = |what: String| HypervisorError::Call {
        op: "KVM_SET_ONE_REG (a saved register)",
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, what),
    };
    Ok(match r {
        ArmReg::X(n) if n < 31 => core(u64::from(n) * 2, 8),
        ArmReg::Sp => core(SP, 8),
        ArmReg::Pc => core(PC, 8),
        ArmReg::Pstate => core(PSTATE, 8),
        ArmReg::SpEl1 => core(SP_EL1, 8),
        ArmReg::ElrEl1 => core(ELR_EL1, 8),
        ArmReg::Spsr(n) if n < 5 => core(SPSR + u64::from(n) * 2, 8),
        ArmReg::V(n) if n < 32 => core(VREGS + u64::from(n) * 4, 16),
        ArmReg::Fpsr => core(FPSR, 4),
        ArmReg::Fpcr => core(FPCR, 4),
        ArmReg::Sys(enc) => {
            KVM_REG_ARM64 | size_bits(8) | KVM_REG_ARM64_SYSREG | u64::from(kvm_timer_swap(enc))
        }
        ArmReg::Backend(id) => id,
        other => return Err(bad(format!("{other:?} is not an ARM64 register"))),
    })
}

/// tern's power state from `KVM_MP_STATE_*`.
pub(super) fn power_from_kvm(mp_state: u32) -> HvResult<ArmPower> {
    use kvm_bindings::{KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_STOPPED, KVM_MP_STATE_SUSPENDED};
    Ok(match mp_state {
        KVM_MP_STATE_RUNNABLE => ArmPower::On,
        KVM_MP_STATE_STOPPED => ArmPower::Off,
        KVM_MP_STATE_SUSPENDED => ArmPower::Suspended,
        other => {
            return Err(HypervisorError::Call {
                op: "KVM_GET_MP_STATE",
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("MP state {other} is not an ARM64 one tern saves"),
                ),
            });
        }
    })
}

/// `KVM_MP_STATE_*` for a power state.
pub(super) fn power_to_kvm(p: ArmPower) -> u32 {
    use kvm_bindings::{KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_STOPPED, KVM_MP_STATE_SUSPENDED};
    match p {
        ArmPower::On => KVM_MP_STATE_RUNNABLE,
        ArmPower::Off => KVM_MP_STATE_STOPPED,
        ArmPower::Suspended => KVM_MP_STATE_SUSPENDED,
    }
}

/// MPIDR_EL1 from KVM's packed GICv3 affinity field (Aff3.Aff2.Aff1.Aff0 in bits 63:32).
fn mpidr_from_field(attr: u64) -> u64 {
    let f = attr >> 32;
    ((f & 0xff00_0000) << 8) | (f & 0xff_ffff)
}

/// tern's name for a GIC device attribute.
pub(super) fn gic_from_kvm(r: kgic::GicReg) -> HvResult<GicReg> {
    let offset = (r.attr & 0xffff_ffff) as u32;
    Ok(match r.group {
        GRP_DIST_REGS => GicReg::Dist {
            cpu: (r.attr >> 32) as u8,
            offset,
        },
        GRP_REDIST_REGS => GicReg::Redist {
            mpidr: mpidr_from_field(r.attr),
            offset,
        },
        GRP_CPU_SYSREGS => GicReg::CpuSys {
            mpidr: mpidr_from_field(r.attr),
            encoding: (r.attr & 0xffff) as u16,
        },
        GRP_CPU_REGS => GicReg::Cpu {
            cpu: (r.attr >> 32) as u8,
            offset,
        },
        group => {
            return Err(HypervisorError::Call {
                op: "KVM_GET_DEVICE_ATTR (GIC register of an unknown group)",
                source: std::io::Error::other(format!("group {group}")),
            });
        }
    })
}

/// KVM's device attribute for a GIC register.
pub(super) fn gic_to_kvm(r: GicReg) -> kgic::GicReg {
    match r {
        GicReg::Dist { cpu, offset } => kgic::GicReg {
            group: GRP_DIST_REGS,
            attr: (u64::from(cpu) << 32) | u64::from(offset),
        },
        GicReg::Redist { mpidr, offset } => kgic::GicReg {
            group: GRP_REDIST_REGS,
            attr: kgic::v3_cpu_field(mpidr) | u64::from(offset),
        },
        GicReg::CpuSys { mpidr, encoding } => kgic::GicReg {
            group: GRP_CPU_SYSREGS,
            attr: kgic::v3_cpu_field(mpidr) | u64::from(encoding),
        },
        GicReg::Cpu { cpu, offset } => kgic::GicReg {
            group: GRP_CPU_REGS,
            attr: (u64::from(cpu) << 32) | u64::from(offset),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arch::aarch64::regs;

    #[test]
    fn core_and_system_registers_get_their_names_and_back() {
        assert_eq!(reg_from_kvm(regs::xreg(0)), ArmReg::X(0));
        assert_eq!(reg_from_kvm(regs::xreg(30)), ArmReg::X(30));
        assert_eq!(reg_from_kvm(regs::PC), ArmReg::Pc);
        assert_eq!(reg_from_kvm(regs::PSTATE), ArmReg::Pstate);
        assert_eq!(reg_from_kvm(regs::MPIDR_EL1), ArmReg::Sys(0xc005));
        // The IDs Linux's api.rst lists: SP, SPSR_FIQ, V0, V31, FPSR, FPCR.
        for (id, name) in [
            (0x6030_0000_0010_003e, ArmReg::Sp),
            (0x6030_0000_0010_0050, ArmReg::Spsr(4)),
            (0x6040_0000_0010_0054, ArmReg::V(0)),
            (0x6040_0000_0010_00d0, ArmReg::V(31)),
            (0x6020_0000_0010_00d4, ArmReg::Fpsr),
            (0x6020_0000_0010_00d5, ArmReg::Fpcr),
        ] {
            assert_eq!(reg_from_kvm(id), name, "{id:#x}");
            assert_eq!(reg_to_kvm(name).unwrap(), id);
            assert_eq!(Some(id_width(id)), name.width());
        }
        // KVM's firmware pseudo-register (PSCI version) stays KVM's own.
        let fw = 0x6030_0000_0014_0000;
        assert_eq!(reg_from_kvm(fw), ArmReg::Backend(fw));
        assert_eq!(reg_to_kvm(ArmReg::Backend(fw)).unwrap(), fw);
        for id in [
            regs::xreg(7),
            regs::PC,
            regs::MPIDR_EL1,
            regs::sysreg(3, 3, 14, 3, 1),
        ] {
            assert_eq!(reg_to_kvm(reg_from_kvm(id)).unwrap(), id);
        }
        // KVM_REG_ARM_TIMER_CNT (its ID has CNTV_CVAL's encoding) is the counter.
        let timer_cnt = regs::sysreg(3, 3, 14, 3, 2);
        assert_eq!(reg_from_kvm(timer_cnt), ArmReg::Sys(CNTVCT_EL0));
        assert_eq!(reg_to_kvm(ArmReg::Sys(CNTVCT_EL0)).unwrap(), timer_cnt);
        assert_eq!(
            reg_from_kvm(regs::sysreg(3, 3, 14, 0, 2)),
            ArmReg::Sys(CNTV_CVAL_EL0)
        );
        assert!(reg_to_kvm(ArmReg::X(31)).is_err());
        assert!(reg_to_kvm(ArmReg::V(32)).is_err());
    }

    #[test]
    fn gic_attributes_get_their_names_and_back() {
        let mpidr = 0x01_0000_0203;
        for r in kgic::v3_dist(64)
            .into_iter()
            .chain(kgic::v3_redist(mpidr))
            .chain(kgic::v3_cpu_sysregs(mpidr))
            .chain(kgic::v2_dist(64, 2))
            .chain(kgic::v2_cpu(1))
        {
            let name = gic_from_kvm(r).unwrap();
            assert_eq!(gic_to_kvm(name), r, "{name:?}");
        }
        assert_eq!(
            gic_from_kvm(kgic::v3_cpu_sysregs(mpidr)[1]).unwrap(),
            GicReg::CpuSys {
                mpidr,
                encoding: kgic::ICC_CTLR_EL1 as u16
            }
        );
        assert!(gic_from_kvm(kgic::GicReg { group: 9, attr: 0 }).is_err());
        for p in [ArmPower::On, ArmPower::Off, ArmPower::Suspended] {
            assert_eq!(power_from_kvm(power_to_kvm(p)).unwrap(), p);
        }
    }
}
