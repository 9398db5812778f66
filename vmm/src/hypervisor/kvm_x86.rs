//! KVM's x86 state structures to tern's own ([`super::x86_state`]) and back. Fields KVM has
//! and the architecture does not (padding, reserved words, flags that only say which fields
//! are valid) are dropped on the way out and rebuilt on the way in.

use kvm_bindings::*;

use super::x86_state::*;
use super::{HvResult, HypervisorError};

fn bad(op: &'static str, what: String) -> HypervisorError {
    HypervisorError::Call {
        op,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, what),
    }
}

impl From<&kvm_cpuid_entry2> for CpuidEntry {
    fn from(e: &kvm_cpuid_entry2) -> Self {
        Self {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

impl From<&CpuidEntry> for kvm_cpuid_entry2 {
    fn from(e: &CpuidEntry) -> Self {
        Self {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        }
    }
}

impl From<&kvm_msr_entry> for Msr {
    fn from(e: &kvm_msr_entry) -> Self {
        Self {
            index: e.index,
            value: e.data,
        }
    }
}

impl From<&Msr> for kvm_msr_entry {
    fn from(m: &Msr) -> Self {
        Self {
            index: m.index,
            data: m.value,
            ..Default::default()
        }
    }
}

macro_rules! same_fields {
    ($from:expr, $to:ident { $($f:ident),* }) => {
        $to { $($f: $from.$f),* }
    };
}

impl From<&kvm_regs> for GeneralRegs {
    fn from(r: &kvm_regs) -> Self {
        same_fields!(
            r,
            GeneralRegs {
                rax,
                rbx,
                rcx,
                rdx,
                rsi,
                rdi,
                rsp,
                rbp,
                r8,
                r9,
                r10,
                r11,
                r12,
                r13,
                r14,
                r15,
                rip,
                rflags
            }
        )
    }
}

impl From<&GeneralRegs> for kvm_regs {
    fn from(r: &GeneralRegs) -> Self {
        same_fields!(
            r,
            kvm_regs {
                rax,
                rbx,
                rcx,
                rdx,
                rsi,
                rdi,
                rsp,
                rbp,
                r8,
                r9,
                r10,
                r11,
                r12,
                r13,
                r14,
                r15,
                rip,
                rflags
            }
        )
    }
}

impl From<&kvm_segment> for Segment {
    fn from(s: &kvm_segment) -> Self {
        Self {
            base: s.base,
            limit: s.limit,
            selector: s.selector,
            type_: s.type_,
            present: s.present != 0,
            dpl: s.dpl,
            db: s.db != 0,
            s: s.s != 0,
            l: s.l != 0,
            g: s.g != 0,
            avl: s.avl != 0,
            unusable: s.unusable != 0,
        }
    }
}

impl From<&Segment> for kvm_segment {
    fn from(s: &Segment) -> Self {
        Self {
            base: s.base,
            limit: s.limit,
            selector: s.selector,
            type_: s.type_,
            present: s.present.into(),
            dpl: s.dpl,
            db: s.db.into(),
            s: s.s.into(),
            l: s.l.into(),
            g: s.g.into(),
            avl: s.avl.into(),
            unusable: s.unusable.into(),
            padding: 0,
        }
    }
}

impl From<&kvm_dtable> for DescriptorTable {
    fn from(d: &kvm_dtable) -> Self {
        Self {
            base: d.base,
            limit: d.limit,
        }
    }
}

impl From<&DescriptorTable> for kvm_dtable {
    fn from(d: &DescriptorTable) -> Self {
        Self {
            base: d.base,
            limit: d.limit,
            padding: [0; 3],
        }
    }
}

/// The same fields both ways: segments and tables converted, the rest copied.
macro_rules! sregs {
    ($s:expr, $to:ident) => {
        $to {
            cs: (&$s.cs).into(),
            ds: (&$s.ds).into(),
            es: (&$s.es).into(),
            fs: (&$s.fs).into(),
            gs: (&$s.gs).into(),
            ss: (&$s.ss).into(),
            tr: (&$s.tr).into(),
            ldt: (&$s.ldt).into(),
            gdt: (&$s.gdt).into(),
            idt: (&$s.idt).into(),
            cr0: $s.cr0,
            cr2: $s.cr2,
            cr3: $s.cr3,
            cr4: $s.cr4,
            cr8: $s.cr8,
            efer: $s.efer,
            apic_base: $s.apic_base,
            interrupt_bitmap: $s.interrupt_bitmap,
        }
    };
}

impl From<&kvm_sregs> for SpecialRegs {
    fn from(s: &kvm_sregs) -> Self {
        sregs!(s, SpecialRegs)
    }
}

impl From<&SpecialRegs> for kvm_sregs {
    fn from(s: &SpecialRegs) -> Self {
        sregs!(s, kvm_sregs)
    }
}

/// The XSAVE image's words from KVM's 4 KiB `kvm_xsave`.
pub(super) fn xsave_from_kvm(x: &kvm_xsave) -> Vec<u32> {
    x.region.to_vec()
}

/// KVM's `kvm_xsave` from an image of at least 4 KiB (larger images, with AMX state, need
/// KVM_SET_XSAVE2, which tern does not use yet: they are refused).
pub(super) fn xsave_to_kvm(words: &[u32]) -> HvResult<kvm_xsave> {
    let mut x = kvm_xsave::default();
    if words.len() != x.region.len() {
        return Err(bad(
            "KVM_SET_XSAVE",
            format!(
                "the saved XSAVE image has {} bytes; KVM_SET_XSAVE takes {}",
                words.len() * 4,
                x.region.len() * 4
            ),
        ));
    }
    x.region.copy_from_slice(words);
    Ok(x)
}

/// The XCRs KVM reported.
pub(super) fn xcrs_from_kvm(x: &kvm_xcrs) -> Vec<Xcr> {
    let n = (x.nr_xcrs as usize).min(x.xcrs.len());
    x.xcrs[..n]
        .iter()
        .map(|c| Xcr {
            index: c.xcr,
            value: c.value,
        })
        .collect()
}

/// KVM's `kvm_xcrs` (at most 16).
pub(super) fn xcrs_to_kvm(xcrs: &[Xcr]) -> HvResult<kvm_xcrs> {
    let mut x = kvm_xcrs::default();
    if xcrs.len() > x.xcrs.len() {
        return Err(bad(
            "KVM_SET_XCRS",
            format!("{} XCRs saved; KVM takes {}", xcrs.len(), x.xcrs.len()),
        ));
    }
    x.nr_xcrs = xcrs.len() as u32;
    for (k, c) in x.xcrs.iter_mut().zip(xcrs) {
        k.xcr = c.index;
        k.value = c.value;
    }
    Ok(x)
}

impl From<&kvm_debugregs> for DebugRegs {
    fn from(d: &kvm_debugregs) -> Self {
        Self {
            db: d.db,
            dr6: d.dr6,
            dr7: d.dr7,
        }
    }
}

impl From<&DebugRegs> for kvm_debugregs {
    fn from(d: &DebugRegs) -> Self {
        Self {
            db: d.db,
            dr6: d.dr6,
            dr7: d.dr7,
            ..Default::default()
        }
    }
}

/// The LAPIC page's bytes.
pub(super) fn lapic_from_kvm(l: &kvm_lapic_state) -> Vec<u8> {
    l.regs.iter().map(|&b| b as u8).collect()
}

/// KVM's `kvm_lapic_state` from a 1 KiB page.
pub(super) fn lapic_to_kvm(page: &[u8]) -> HvResult<kvm_lapic_state> {
    let mut l = kvm_lapic_state::default();
    if page.len() != l.regs.len() {
        return Err(bad(
            "KVM_SET_LAPIC",
            format!(
                "the saved local APIC page has {} bytes, not {}",
                page.len(),
                l.regs.len()
            ),
        ));
    }
    for (d, &s) in l.regs.iter_mut().zip(page) {
        *d = s as std::os::raw::c_char;
    }
    Ok(l)
}

impl From<&kvm_vcpu_events> for VcpuEvents {
    fn from(e: &kvm_vcpu_events) -> Self {
        let payload = (e.flags & KVM_VCPUEVENT_VALID_PAYLOAD != 0 && e.exception_has_payload != 0)
            .then_some(e.exception_payload);
        Self {
            exception: ExceptionEvent {
                injected: e.exception.injected != 0,
                pending: e.exception.pending != 0,
                vector: e.exception.nr,
                error_code: (e.exception.has_error_code != 0).then_some(e.exception.error_code),
                payload,
            },
            interrupt: InterruptEvent {
                injected: e.interrupt.injected != 0,
                vector: e.interrupt.nr,
                soft: e.interrupt.soft != 0,
                shadow: e.interrupt.shadow,
            },
            nmi: NmiEvent {
                injected: e.nmi.injected != 0,
                pending: e.nmi.pending != 0,
                masked: e.nmi.masked != 0,
            },
            sipi_vector: e.sipi_vector,
            smi: (e.flags & KVM_VCPUEVENT_VALID_SMM != 0).then_some(SmiEvent {
                smm: e.smi.smm != 0,
                pending: e.smi.pending != 0,
                smm_inside_nmi: e.smi.smm_inside_nmi != 0,
                latched_init: e.smi.latched_init != 0,
            }),
            triple_fault_pending: (e.flags & KVM_VCPUEVENT_VALID_TRIPLE_FAULT != 0)
                .then_some(e.triple_fault.pending != 0),
        }
    }
}

/// KVM's `kvm_vcpu_events`, with the flags saying which optional parts are there. The NMI
/// pending and SIPI vector are always written (as Firecracker and QEMU do), the shadow too.
impl From<&VcpuEvents> for kvm_vcpu_events {
    fn from(e: &VcpuEvents) -> Self {
        let mut k = kvm_vcpu_events::default();
        k.exception.injected = e.exception.injected.into();
        k.exception.pending = e.exception.pending.into();
        k.exception.nr = e.exception.vector;
        k.exception.has_error_code = e.exception.error_code.is_some().into();
        k.exception.error_code = e.exception.error_code.unwrap_or(0);
        k.interrupt.injected = e.interrupt.injected.into();
        k.interrupt.nr = e.interrupt.vector;
        k.interrupt.soft = e.interrupt.soft.into();
        k.interrupt.shadow = e.interrupt.shadow;
        k.nmi.injected = e.nmi.injected.into();
        k.nmi.pending = e.nmi.pending.into();
        k.nmi.masked = e.nmi.masked.into();
        k.sipi_vector = e.sipi_vector;
        k.flags = KVM_VCPUEVENT_VALID_NMI_PENDING
            | KVM_VCPUEVENT_VALID_SIPI_VECTOR
            | KVM_VCPUEVENT_VALID_SHADOW;
        if let Some(p) = e.exception.payload {
            k.flags |= KVM_VCPUEVENT_VALID_PAYLOAD;
            k.exception_has_payload = 1;
            k.exception_payload = p;
        }
        if let Some(s) = e.smi {
            k.flags |= KVM_VCPUEVENT_VALID_SMM;
            k.smi.smm = s.smm.into();
            k.smi.pending = s.pending.into();
            k.smi.smm_inside_nmi = s.smm_inside_nmi.into();
            k.smi.latched_init = s.latched_init.into();
        }
        if let Some(t) = e.triple_fault_pending {
            k.flags |= KVM_VCPUEVENT_VALID_TRIPLE_FAULT;
            k.triple_fault.pending = t.into();
        }
        k
    }
}

/// tern's MP state from KVM's (the x86 ones; others are refused).
pub(super) fn mp_state_from_kvm(m: kvm_mp_state) -> HvResult<MpState> {
    Ok(match m.mp_state {
        KVM_MP_STATE_RUNNABLE => MpState::Runnable,
        KVM_MP_STATE_UNINITIALIZED => MpState::Uninitialized,
        KVM_MP_STATE_INIT_RECEIVED => MpState::InitReceived,
        KVM_MP_STATE_HALTED => MpState::Halted,
        KVM_MP_STATE_SIPI_RECEIVED => MpState::SipiReceived,
        KVM_MP_STATE_AP_RESET_HOLD => MpState::ApResetHold,
        other => {
            return Err(bad(
                "KVM_GET_MP_STATE",
                format!("MP state {other} is not an x86 one tern saves"),
            ));
        }
    })
}

/// KVM's MP state.
pub(super) fn mp_state_to_kvm(m: MpState) -> kvm_mp_state {
    kvm_mp_state {
        mp_state: match m {
            MpState::Runnable => KVM_MP_STATE_RUNNABLE,
            MpState::Uninitialized => KVM_MP_STATE_UNINITIALIZED,
            MpState::InitReceived => KVM_MP_STATE_INIT_RECEIVED,
            MpState::Halted => KVM_MP_STATE_HALTED,
            MpState::SipiReceived => KVM_MP_STATE_SIPI_RECEIVED,
            MpState::ApResetHold => KVM_MP_STATE_AP_RESET_HOLD,
        },
    }
}

impl From<&kvm_pic_state> for PicState {
    fn from(p: &kvm_pic_state) -> Self {
        same_fields!(
            p,
            PicState {
                last_irr,
                irr,
                imr,
                isr,
                priority_add,
                irq_base,
                read_reg_select,
                poll,
                special_mask,
                init_state,
                auto_eoi,
                rotate_on_auto_eoi,
                special_fully_nested_mode,
                init4,
                elcr,
                elcr_mask
            }
        )
    }
}

impl From<&PicState> for kvm_pic_state {
    fn from(p: &PicState) -> Self {
        same_fields!(
            p,
            kvm_pic_state {
                last_irr,
                irr,
                imr,
                isr,
                priority_add,
                irq_base,
                read_reg_select,
                poll,
                special_mask,
                init_state,
                auto_eoi,
                rotate_on_auto_eoi,
                special_fully_nested_mode,
                init4,
                elcr,
                elcr_mask
            }
        )
    }
}

impl From<&kvm_ioapic_state> for IoapicState {
    fn from(s: &kvm_ioapic_state) -> Self {
        Self {
            base_address: s.base_address,
            ioregsel: s.ioregsel,
            id: s.id,
            irr: s.irr,
            // SAFETY: each entry is a union of a u64 and bit fields over the same 8 bytes;
            // reading `bits` reads those bytes as the integer they are.
            redirtbl: s.redirtbl.iter().map(|e| unsafe { e.bits }).collect(),
        }
    }
}

/// KVM's IOAPIC state (24 pins).
pub(super) fn ioapic_to_kvm(s: &IoapicState) -> HvResult<kvm_ioapic_state> {
    let mut k = kvm_ioapic_state {
        base_address: s.base_address,
        ioregsel: s.ioregsel,
        id: s.id,
        irr: s.irr,
        ..Default::default()
    };
    if s.redirtbl.len() != k.redirtbl.len() {
        return Err(bad(
            "KVM_SET_IRQCHIP",
            format!(
                "the saved IOAPIC has {} pins; KVM's has {}",
                s.redirtbl.len(),
                k.redirtbl.len()
            ),
        ));
    }
    for (d, &bits) in k.redirtbl.iter_mut().zip(&s.redirtbl) {
        d.bits = bits;
    }
    Ok(k)
}

impl From<&kvm_pit_channel_state> for PitChannel {
    fn from(c: &kvm_pit_channel_state) -> Self {
        same_fields!(
            c,
            PitChannel {
                count,
                latched_count,
                count_latched,
                status_latched,
                status,
                read_state,
                write_state,
                write_latch,
                rw_mode,
                mode,
                bcd,
                gate,
                count_load_time
            }
        )
    }
}

impl From<&PitChannel> for kvm_pit_channel_state {
    fn from(c: &PitChannel) -> Self {
        same_fields!(
            c,
            kvm_pit_channel_state {
                count,
                latched_count,
                count_latched,
                status_latched,
                status,
                read_state,
                write_state,
                write_latch,
                rw_mode,
                mode,
                bcd,
                gate,
                count_load_time
            }
        )
    }
}

impl From<&kvm_pit_state2> for PitState {
    fn from(p: &kvm_pit_state2) -> Self {
        Self {
            channels: [
                (&p.channels[0]).into(),
                (&p.channels[1]).into(),
                (&p.channels[2]).into(),
            ],
            flags: p.flags,
        }
    }
}

impl From<&PitState> for kvm_pit_state2 {
    fn from(p: &PitState) -> Self {
        Self {
            channels: [
                (&p.channels[0]).into(),
                (&p.channels[1]).into(),
                (&p.channels[2]).into(),
            ],
            flags: p.flags,
            ..Default::default()
        }
    }
}

/// The PIC of a `kvm_irqchip` KVM filled in for a PIC chip id.
pub(super) fn pic_from_kvm(chip: &kvm_irqchip) -> PicState {
    // SAFETY: KVM_GET_IRQCHIP with a PIC chip id fills the union's `pic` member; every bit
    // pattern is a valid kvm_pic_state (plain bytes).
    PicState::from(unsafe { &chip.chip.pic })
}

/// The IOAPIC of a `kvm_irqchip` KVM filled in for KVM_IRQCHIP_IOAPIC.
pub(super) fn ioapic_from_kvm(chip: &kvm_irqchip) -> IoapicState {
    // SAFETY: KVM_GET_IRQCHIP with KVM_IRQCHIP_IOAPIC fills the union's `ioapic` member;
    // every bit pattern is a valid kvm_ioapic_state (plain integers).
    IoapicState::from(unsafe { &chip.chip.ioapic })
}

/// A `kvm_irqchip` for KVM_SET_IRQCHIP holding `pic` as chip `chip_id`.
pub(super) fn pic_to_kvm(chip_id: u32, pic: &PicState) -> kvm_irqchip {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    c.chip.pic = pic.into();
    c
}

/// A `kvm_irqchip` for KVM_SET_IRQCHIP holding the IOAPIC.
pub(super) fn ioapic_chip_to_kvm(s: &IoapicState) -> HvResult<kvm_irqchip> {
    let mut c = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    c.chip.ioapic = ioapic_to_kvm(s)?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_round_trip() {
        let r = kvm_regs {
            rax: 1,
            r15: 2,
            rip: 0xffff_ffff_8100_0000,
            rflags: 0x246,
            ..Default::default()
        };
        assert_eq!(kvm_regs::from(&GeneralRegs::from(&r)), r);
        let mut s = kvm_sregs::default();
        s.cs = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x10,
            type_: 11,
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        s.idt = kvm_dtable {
            base: 0xfffffe0000000000,
            limit: 0xfff,
            padding: [0; 3],
        };
        s.cr0 = 0x8005_0033;
        s.efer = 0xd01;
        s.interrupt_bitmap[1] = 1 << 3;
        assert_eq!(kvm_sregs::from(&SpecialRegs::from(&s)), s);
    }

    #[test]
    fn events_keep_what_their_flags_say() {
        let mut e = kvm_vcpu_events::default();
        e.exception.injected = 1;
        e.exception.nr = 14;
        e.exception.has_error_code = 1;
        e.exception.error_code = 2;
        e.nmi.masked = 1;
        e.interrupt.shadow = 1;
        e.flags = KVM_VCPUEVENT_VALID_SMM;
        e.smi.smm = 1;
        let t = VcpuEvents::from(&e);
        assert_eq!(t.exception.error_code, Some(2));
        assert_eq!(t.smi.map(|s| s.smm), Some(true));
        assert_eq!(t.triple_fault_pending, None);
        let back = kvm_vcpu_events::from(&t);
        assert_eq!(back.exception.nr, 14);
        assert_eq!(back.exception.error_code, 2);
        assert_eq!(back.nmi.masked, 1);
        assert_eq!(back.interrupt.shadow, 1);
        assert_ne!(back.flags & KVM_VCPUEVENT_VALID_SMM, 0);
        assert_eq!(back.flags & KVM_VCPUEVENT_VALID_TRIPLE_FAULT, 0);
        assert_eq!(VcpuEvents::from(&back), t);
    }

    #[test]
    fn irqchips_pit_and_sizes_round_trip_or_are_refused() {
        let mut pic = kvm_pic_state {
            imr: 0xfb,
            irq_base: 0x20,
            elcr: 0x0c,
            ..Default::default()
        };
        pic.isr = 1;
        let chip = pic_to_kvm(KVM_IRQCHIP_PIC_SLAVE, &PicState::from(&pic));
        assert_eq!(chip.chip_id, KVM_IRQCHIP_PIC_SLAVE);
        assert_eq!(pic_from_kvm(&chip), PicState::from(&pic));
        let io = IoapicState {
            base_address: 0xfec0_0000,
            ioregsel: 0x10,
            id: 0,
            irr: 0,
            redirtbl: (0..24).map(|i| 0x1_0000 | (0x20 + i)).collect(),
        };
        assert_eq!(ioapic_from_kvm(&ioapic_chip_to_kvm(&io).unwrap()), io);
        let short = IoapicState {
            redirtbl: vec![0; 23],
            ..io
        };
        assert!(ioapic_chip_to_kvm(&short).is_err());
        let mut pit = kvm_pit_state2::default();
        pit.channels[0].count = 0x10000;
        pit.channels[0].mode = 2;
        pit.channels[2].count_load_time = -5;
        pit.flags = 1;
        assert_eq!(kvm_pit_state2::from(&PitState::from(&pit)), pit);
        assert!(xsave_to_kvm(&[0; 1023]).is_err());
        assert_eq!(
            xsave_from_kvm(&xsave_to_kvm(&[7; 1024]).unwrap()),
            vec![7; 1024]
        );
        assert!(lapic_to_kvm(&[0; 1025]).is_err());
        let page: Vec<u8> = (0..1024).map(|i| i as u8).collect();
        assert_eq!(lapic_from_kvm(&lapic_to_kvm(&page).unwrap()), page);
        let xcrs = vec![Xcr { index: 0, value: 7 }];
        assert_eq!(xcrs_from_kvm(&xcrs_to_kvm(&xcrs).unwrap()), xcrs);
        assert!(xcrs_to_kvm(&[Xcr { index: 0, value: 0 }; 17]).is_err());
        for m in [MpState::Runnable, MpState::Halted, MpState::SipiReceived] {
            assert_eq!(mp_state_from_kvm(mp_state_to_kvm(m)).unwrap(), m);
        }
        assert!(
            mp_state_from_kvm(kvm_mp_state {
                mp_state: KVM_MP_STATE_SUSPENDED
            })
            .is_err()
        );
    }
}
