//! An ARM64 vCPU's and GIC's state in tern's own types, as snapshots store them. Registers are
//! named architecturally (general, FP/SIMD, and system registers by their MRS encoding, which
//! KVM's one-reg IDs and Hypervisor.framework's `hv_sys_reg_t` both carry); what only one
//! backend has (KVM's firmware pseudo-registers, say) is kept as that backend's raw ID. A
//! backend converts (`kvm_arm` for KVM). docs/snapshot-format.md has the version rules.

use serde::{Deserialize, Serialize};

/// One ARM64 vCPU register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ArmReg {
    /// X0-X30.
    X(u8),
    /// SP_EL0.
    Sp,
    /// PC.
    Pc,
    /// PSTATE.
    Pstate,
    /// SP_EL1.
    SpEl1,
    /// ELR_EL1.
    ElrEl1,
    /// SPSR_EL1, SPSR_abt, SPSR_und, SPSR_irq, SPSR_fiq (0-4).
    Spsr(u8),
    /// V0-V31 (128 bits).
    V(u8),
    /// FPSR (32 bits).
    Fpsr,
    /// FPCR (32 bits).
    Fpcr,
    /// A system register by its encoding: `op0 << 14 | op1 << 11 | CRn << 7 | CRm << 3 | op2`.
    Sys(u16),
    /// A register only the backend that saved it knows: its raw ID there.
    Backend(u64),
}

impl ArmReg {
    /// The value's width in bytes, where the architecture fixes it (`None` for
    /// [`ArmReg::Backend`], whose ID says).
    pub fn width(&self) -> Option<usize> {
        match self {
            ArmReg::V(_) => Some(16),
            ArmReg::Fpsr | ArmReg::Fpcr => Some(4),
            ArmReg::Backend(_) => None,
            _ => Some(8),
        }
    }
}

/// A vCPU's power state (PSCI).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArmPower {
    /// Running.
    On,
    /// Powered off (PSCI CPU_OFF, or a secondary never started).
    Off,
    /// Suspended (WFI-like PSCI suspend).
    Suspended,
}

/// Everything of one ARM64 vCPU, for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArmVcpuState {
    /// MPIDR_EL1 (also among `regs`; kept apart to check the restored vCPU and to address
    /// its GIC redistributor).
    pub mpidr: u64,
    /// Running, off or suspended.
    pub power: ArmPower,
    /// Each register and its value's bytes (little-endian), in the order they are written
    /// back.
    pub regs: Vec<(ArmReg, Vec<u8>)>,
}

/// One GIC register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GicReg {
    /// A distributor register at this offset (GICv2: banked ones for CPU `cpu`; 0 otherwise).
    Dist {
        /// The CPU of a banked GICv2 register.
        cpu: u8,
        /// The offset in the distributor's frame.
        offset: u32,
    },
    /// A GICv3 redistributor register of the vCPU with this MPIDR, at this offset from its
    /// RD_base (the SGI_base frame follows at 64 KiB).
    Redist {
        /// The vCPU's MPIDR_EL1 affinity.
        mpidr: u64,
        /// The offset.
        offset: u32,
    },
    /// A GICv3 CPU interface system register (ICC_*) of the vCPU with this MPIDR, by its
    /// encoding (as [`ArmReg::Sys`]); 64 bits wide.
    CpuSys {
        /// The vCPU's MPIDR_EL1 affinity.
        mpidr: u64,
        /// The encoding.
        encoding: u16,
    },
    /// A GICv2 CPU interface register of CPU `cpu`, at this offset.
    Cpu {
        /// The CPU.
        cpu: u8,
        /// The offset.
        offset: u32,
    },
}

/// The GIC's state, for a snapshot: each register and its value, in the order they are written
/// back. Distributor, redistributor and GICv2 CPU interface registers are 32 bits wide,
/// GICv3 CPU interface system registers 64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArmGicState {
    /// 3 (GICv3) or 2 (GICv2).
    pub version: u8,
    /// The registers.
    pub regs: Vec<(GicReg, u64)>,
    /// The ITS of a VM with PCI (its tables are in guest memory).
    pub its: Option<ArmItsState>,
}

/// A GICv3 ITS's registers, for a snapshot; the device, collection and interrupt translation
/// tables it points to are in guest memory, written there when the snapshot was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArmItsState {
    /// Each register but `GITS_CTLR`, by its offset in the ITS control frame, with its
    /// value, in the order they are written back (`arch::aarch64::gic::ITS_REGS`).
    pub regs: Vec<(u32, u64)>,
    /// `GITS_CTLR`, written back once the ITS has read its tables.
    pub ctlr: u64,
}
