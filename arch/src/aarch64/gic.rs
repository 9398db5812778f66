//! Which GIC registers a snapshot holds, as KVM's device attributes (`KVM_DEV_ARM_VGIC_GRP_*`
//! group and attribute), in the order they are written back. Pure data: the hypervisor
//! backend reads and writes them.
//!
//! Sources: Linux's `Documentation/virt/kvm/devices/arm-vgic-v3.rst` and `arm-vgic.rst`; the
//! order follows QEMU's (as Firecracker and Cloud Hypervisor do): the distributor's ID and
//! control first, then its per-interrupt registers; per vCPU the redistributor (its control
//! register after the table bases) and the CPU interface (control before the active-priority
//! registers). Only the "set" forms of set/clear register pairs are kept: a restored VM starts
//! with everything clear, so writing the set form back is the whole state.
//!
//! A VM with PCI also has an ITS (`arm-vgic-its.rst`): its tables live in guest memory, which
//! KVM writes out on a save (the ITS tables, and the redistributors' LPI pending tables) and
//! reads back on a restore; the snapshot holds its registers, [`ITS_REGS`] then [`GITS_CTLR`].

/// `KVM_DEV_ARM_VGIC_GRP_DIST_REGS`.
pub const GRP_DIST_REGS: u32 = 1;
/// `KVM_DEV_ARM_VGIC_GRP_CPU_REGS` (GICv2 CPU interface).
pub const GRP_CPU_REGS: u32 = 2;
/// `KVM_DEV_ARM_VGIC_GRP_REDIST_REGS`.
pub const GRP_REDIST_REGS: u32 = 5;
/// `KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS` (GICv3 CPU interface, 64-bit values).
pub const GRP_CPU_SYSREGS: u32 = 6;

/// `KVM_DEV_ARM_VGIC_GRP_ITS_REGS` (ITS registers by their offset in the ITS control
/// frame; every value is passed as 64 bits).
pub const GRP_ITS_REGS: u32 = 8;

/// `GITS_CTLR`: written back last, once the ITS has read its tables (it enables the ITS).
pub const GITS_CTLR: u32 = 0x0000;

/// The ITS registers a snapshot holds besides [`GITS_CTLR`], in the order they are written
/// back (QEMU's): `GITS_IIDR` first (it picks the layout of the tables in guest memory),
/// `GITS_CBASER` before `GITS_CREADR` (writing the base resets the read pointer),
/// `GITS_CWRITER`, then `GITS_BASER0..7`.
pub const ITS_REGS: [u32; 12] = [
    0x0004, 0x0080, 0x0090, 0x0088, 0x0100, 0x0108, 0x0110, 0x0118, 0x0120, 0x0128, 0x0130, 0x0138,
];

/// One register: its group and attribute. Values are 32 bits wide except in
/// [`GRP_CPU_SYSREGS`] (64).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GicReg {
    /// `KVM_DEV_ARM_VGIC_GRP_*`.
    pub group: u32,
    /// The attribute: offset or system-register encoding, and the vCPU it belongs to.
    pub attr: u64,
}

impl GicReg {
    /// Whether the value is 64 bits wide.
    pub fn wide(&self) -> bool {
        self.group == GRP_CPU_SYSREGS || self.group == GRP_ITS_REGS
    }
}

const GICD_CTLR: u64 = 0x0000;
const GICD_IIDR: u64 = 0x0008;
const GICD_STATUSR: u64 = 0x0010;

/// Per-interrupt distributor registers: (offset, bits per interrupt). The first 32
/// interrupts (SGIs, PPIs) are not the distributor's on a GICv3 (they are banked in each
/// redistributor) and are banked per CPU on a GICv2.
const V3_DIST_PER_IRQ: [(u64, u64); 6] = [
    (0x0100, 1),  // ISENABLER
    (0x0080, 1),  // IGROUPR
    (0x6000, 64), // IROUTER (two 32-bit halves each)
    (0x0c00, 2),  // ICFGR
    (0x0200, 1),  // ISPENDR
    (0x0300, 1),  // ISACTIVER
];
const IPRIORITYR: (u64, u64) = (0x0400, 8);

const V2_DIST_PER_IRQ: [(u64, u64); 7] = [
    (0x0100, 1), // ISENABLER
    (0x0080, 1), // IGROUPR
    (0x0800, 8), // ITARGETSR
    (0x0c00, 2), // ICFGR
    (0x0200, 1), // ISPENDR
    (0x0300, 1), // ISACTIVER
    (0x0400, 8), // IPRIORITYR
];

/// The 32-bit words of a per-interrupt register from interrupt 32 on.
fn spi_words(group: u32, cpu: u64, (base, bits): (u64, u64), nr_irqs: u32) -> Vec<GicReg> {
    let start = base + 32 * bits / 8;
    let bytes = (u64::from(nr_irqs).saturating_sub(32)) * bits / 8;
    (0..bytes / 4)
        .map(|w| GicReg {
            group,
            attr: cpu | (start + 4 * w),
        })
        .collect()
}

/// MPIDR_EL1 packed as KVM's GICv3 attributes want it (Aff3.Aff2.Aff1.Aff0), in bits 63:32.
pub fn v3_cpu_field(mpidr: u64) -> u64 {
    (((mpidr & 0xff_0000_0000) >> 8) | (mpidr & 0xff_ffff)) << 32
}

/// The GICv3 distributor's registers for `nr_irqs` interrupts.
pub fn v3_dist(nr_irqs: u32) -> Vec<GicReg> {
    let one = |attr| GicReg {
        group: GRP_DIST_REGS,
        attr,
    };
    let mut regs = vec![one(GICD_IIDR), one(GICD_CTLR), one(GICD_STATUSR)];
    for r in V3_DIST_PER_IRQ.into_iter().chain([IPRIORITYR]) {
        regs.extend(spi_words(GRP_DIST_REGS, 0, r, nr_irqs));
    }
    regs
}

/// The redistributor of the vCPU with `mpidr`: its own registers (control last), then its
/// SGI/PPI frame.
pub fn v3_redist(mpidr: u64) -> Vec<GicReg> {
    let cpu = v3_cpu_field(mpidr);
    let one = |off: u64| GicReg {
        group: GRP_REDIST_REGS,
        attr: cpu | off,
    };
    const SGI: u64 = 0x1_0000;
    let mut regs: Vec<GicReg> = [
        0x0010, // STATUSR
        0x0014, // WAKER
        0x0070,
        0x0074, // PROPBASER
        0x0078,
        0x007c,       // PENDBASER
        0x0000,       // CTLR
        SGI + 0x0080, // IGROUPR0
        SGI + 0x0100, // ISENABLER0
        SGI + 0x0c00,
        SGI + 0x0c04, // ICFGR0, ICFGR1
        SGI + 0x0200, // ISPENDR0
        SGI + 0x0300, // ISACTIVER0
    ]
    .into_iter()
    .map(one)
    .collect();
    regs.extend((0..8).map(|w| one(SGI + 0x0400 + 4 * w))); // IPRIORITYR0-7
    regs
}

/// A system register's encoding in KVM's GICv3 CPU interface attributes.
const fn sysreg(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> u64 {
    (op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2
}

/// `ICC_CTLR_EL1`'s encoding.
pub const ICC_CTLR_EL1: u64 = sysreg(3, 0, 12, 12, 4);

/// The GICv3 CPU interface of the vCPU with `mpidr`, before the active-priority registers:
/// SRE first, CTLR (which fixes how many active-priority registers there are) next.
pub fn v3_cpu_sysregs(mpidr: u64) -> Vec<GicReg> {
    let cpu = v3_cpu_field(mpidr);
    [
        sysreg(3, 0, 12, 12, 5), // ICC_SRE_EL1
        ICC_CTLR_EL1,
        sysreg(3, 0, 12, 12, 6), // ICC_IGRPEN0_EL1
        sysreg(3, 0, 12, 12, 7), // ICC_IGRPEN1_EL1
        sysreg(3, 0, 4, 6, 0),   // ICC_PMR_EL1
        sysreg(3, 0, 12, 8, 3),  // ICC_BPR0_EL1
        sysreg(3, 0, 12, 12, 3), // ICC_BPR1_EL1
    ]
    .into_iter()
    .map(|r| GicReg {
        group: GRP_CPU_SYSREGS,
        attr: cpu | r,
    })
    .collect()
}

/// The active-priority registers (`ICC_AP0R<n>_EL1`, `ICC_AP1R<n>_EL1`) a CPU interface
/// whose `ICC_CTLR_EL1` reads `ctlr` has: n up to 0, 1 or 3 for 5, 6 or 7 priority bits.
pub fn v3_cpu_apr(mpidr: u64, ctlr: u64) -> Vec<GicReg> {
    let cpu = v3_cpu_field(mpidr);
    let pri_bits = ((ctlr >> 8) & 7) + 1;
    let last = match pri_bits {
        7 => 3,
        6 => 1,
        _ => 0,
    };
    let ap0 = (0..=last).map(|n| sysreg(3, 0, 12, 8, 4 + n));
    let ap1 = (0..=last).map(|n| sysreg(3, 0, 12, 9, n));
    ap0.chain(ap1)
        .map(|r| GicReg {
            group: GRP_CPU_SYSREGS,
            attr: cpu | r,
        })
        .collect()
}

/// The GICv2 distributor for `nr_irqs` interrupts and `cpus` CPUs: ID and control, the
/// shared interrupts, then each CPU's banked first 32 interrupts and pending SGIs.
pub fn v2_dist(nr_irqs: u32, cpus: u8) -> Vec<GicReg> {
    let one = |cpu: u64, off: u64| GicReg {
        group: GRP_DIST_REGS,
        attr: (cpu << 32) | off,
    };
    let mut regs = vec![one(0, GICD_IIDR), one(0, GICD_CTLR)];
    for r in V2_DIST_PER_IRQ {
        regs.extend(spi_words(GRP_DIST_REGS, 0, r, nr_irqs));
    }
    for cpu in 0..u64::from(cpus) {
        for off in [0x0080, 0x0100, 0x0200, 0x0300, 0x0c04] {
            regs.push(one(cpu, off)); // IGROUPR0, ISENABLER0, ISPENDR0, ISACTIVER0, ICFGR1
        }
        regs.extend((0..8).map(|w| one(cpu, 0x0400 + 4 * w))); // IPRIORITYR0-7
        regs.extend((0..8).map(|w| one(cpu, 0x0800 + 4 * w))); // ITARGETSR0-7
        regs.extend((0..4).map(|w| one(cpu, 0x0f20 + 4 * w))); // SPENDSGIR0-3
    }
    regs
}

/// The GICv2 CPU interface of CPU `cpu`.
pub fn v2_cpu(cpu: u8) -> Vec<GicReg> {
    [0x00, 0x04, 0x08, 0x1c, 0xd0, 0xd4, 0xd8, 0xdc] // CTLR PMR BPR ABPR APR0-3
        .into_iter()
        .map(|off| GicReg {
            group: GRP_CPU_REGS,
            attr: (u64::from(cpu) << 32) | off,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v3_lists_cover_the_shared_interrupts_once() {
        let d = v3_dist(128);
        // IIDR, CTLR, STATUSR; 96 SPIs: 3 words for each 1-bit register (4 of them), 6 for
        // ICFGR, 24 for IPRIORITYR, 192 for IROUTER.
        assert_eq!(d.len(), 3 + 4 * 3 + 6 + 24 + 192);
        assert_eq!(d[0].attr, GICD_IIDR);
        assert_eq!(d[1].attr, GICD_CTLR);
        assert!(d.iter().all(|r| r.group == GRP_DIST_REGS && !r.wide()));
        // SGIs and PPIs are not the distributor's: ISENABLER starts at word 1.
        assert!(d.iter().any(|r| r.attr == 0x104));
        assert!(!d.iter().any(|r| r.attr == 0x100));
        assert!(d.iter().any(|r| r.attr == 0x6100) && d.iter().any(|r| r.attr == 0x6104));
        assert_eq!(d.iter().map(|r| r.attr).max(), Some(0x6000 + 128 * 8 - 4));
        let mut attrs: Vec<u64> = d.iter().map(|r| r.attr).collect();
        attrs.sort_unstable();
        attrs.dedup();
        assert_eq!(attrs.len(), d.len(), "no register twice");
    }

    #[test]
    fn redistributors_and_cpu_interfaces_are_addressed_by_affinity() {
        // Aff3 = 1, Aff2 = 2, Aff1 = 3, Aff0 = 4 (bit 31, RES1, is dropped).
        let mpidr = 0x01_8002_0304;
        assert_eq!(v3_cpu_field(mpidr), 0x0102_0304 << 32);
        let r = v3_redist(mpidr);
        assert_eq!(r.len(), 7 + 6 + 8);
        assert!(r.iter().all(|g| g.attr >> 32 == 0x0102_0304));
        let ctlr_at = r.iter().position(|g| g.attr & 0xffff_ffff == 0).unwrap();
        let propbase_at = r.iter().position(|g| g.attr & 0xffff_ffff == 0x70).unwrap();
        assert!(
            propbase_at < ctlr_at,
            "the control register after the table bases"
        );
        let s = v3_cpu_sysregs(0x8000_0000);
        assert_eq!(s[0].attr, 0xc665); // ICC_SRE_EL1 first
        assert_eq!(s[1].attr, ICC_CTLR_EL1);
        assert_eq!(ICC_CTLR_EL1, 0xc664);
        assert!(s.iter().all(|g| g.wide()));
        assert!(s.iter().any(|g| g.attr == 0xc230)); // ICC_PMR_EL1
        // Active-priority registers follow the priority bits ICC_CTLR_EL1 reports.
        assert_eq!(v3_cpu_apr(0, 4 << 8).len(), 2);
        assert_eq!(v3_cpu_apr(0, 5 << 8).len(), 4);
        let all = v3_cpu_apr(0, 6 << 8);
        assert_eq!(all.len(), 8);
        assert_eq!(all[0].attr, 0xc644);
        assert_eq!(all[4].attr, 0xc648);
    }

    #[test]
    fn its_registers_go_back_in_a_working_order() {
        let at = |off: u32| ITS_REGS.iter().position(|&r| r == off).unwrap();
        assert_eq!(at(0x4), 0, "GITS_IIDR first");
        assert!(at(0x80) < at(0x90), "GITS_CBASER before GITS_CREADR");
        // All eight GITS_BASERn, no register twice, and never GITS_CTLR.
        assert_eq!(
            (0..8)
                .filter(|n| ITS_REGS.contains(&(0x100 + 8 * n)))
                .count(),
            8
        );
        let mut r = ITS_REGS.to_vec();
        r.sort_unstable();
        r.dedup();
        assert_eq!(r.len(), ITS_REGS.len());
        assert!(!ITS_REGS.contains(&GITS_CTLR));
    }

    #[test]
    fn v2_banks_the_first_interrupts_per_cpu() {
        let d = v2_dist(128, 2);
        let per_cpu = 5 + 8 + 8 + 4;
        // IIDR, CTLR; 96 SPIs: 4 one-bit registers (3 words), ICFGR 6, ITARGETSR and
        // IPRIORITYR 24 each.
        assert_eq!(d.len(), 2 + 4 * 3 + 6 + 24 + 24 + 2 * per_cpu);
        assert!(d.iter().any(|r| r.attr == (1 << 32) | 0x100));
        assert!(d.iter().any(|r| r.attr == 0x820)); // ITARGETSR8: SPIs 32-35
        let c = v2_cpu(1);
        assert_eq!(c.len(), 8);
        assert!(
            c.iter()
                .all(|r| r.group == GRP_CPU_REGS && r.attr >> 32 == 1)
        );
    }
}
