//! An x86 vCPU's and VM's state in tern's own types, as snapshots store them. Every field is
//! architectural (registers, the XSAVE image, the local APIC's register page) or a device
//! model's state (8259 PIC, IOAPIC, 8254 PIT); a backend converts its own structures to and
//! from these (`kvm_x86` for KVM), so a state file does not depend on one hypervisor's C
//! layouts. docs/snapshot-format.md has the version rules.

use serde::{Deserialize, Serialize};

/// One CPUID leaf as the guest sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// EAX on input (the leaf).
    pub function: u32,
    /// ECX on input (the subleaf), where `flags` says it matters.
    pub index: u32,
    /// KVM_CPUID_FLAG_* style bits: bit 0, the subleaf is significant.
    pub flags: u32,
    /// The four output registers.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

/// A model-specific register and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msr {
    /// Its number (ECX of RDMSR).
    pub index: u32,
    /// Its value.
    pub value: u64,
}

/// The general-purpose registers, RIP and RFLAGS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct GeneralRegs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register with its hidden descriptor part.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Base address.
    pub base: u64,
    /// Limit, in bytes (granularity applied).
    pub limit: u32,
    /// The visible selector.
    pub selector: u16,
    /// The descriptor's type field (4 bits).
    pub type_: u8,
    /// P.
    pub present: bool,
    /// DPL (2 bits).
    pub dpl: u8,
    /// D/B.
    pub db: bool,
    /// S (code/data rather than system).
    pub s: bool,
    /// L (64-bit code).
    pub l: bool,
    /// G (4 KiB granularity).
    pub g: bool,
    /// AVL.
    pub avl: bool,
    /// The segment is unusable (a null selector loaded).
    pub unusable: bool,
}

/// GDTR or IDTR.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorTable {
    /// Linear base address.
    pub base: u64,
    /// Limit.
    pub limit: u16,
}

/// Segment, control and descriptor-table registers, EFER, the APIC base, and the external
/// interrupts waiting to be injected (one bit per vector).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SpecialRegs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    /// CR8 (the TPR).
    pub cr8: u64,
    pub efer: u64,
    /// IA32_APIC_BASE.
    pub apic_base: u64,
    /// Pending external interrupts not yet injected, one bit per vector.
    pub interrupt_bitmap: [u64; 4],
}

/// An extended control register (XCR0 is the one there is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xcr {
    /// Its number (ECX of XSETBV).
    pub index: u32,
    /// Its value.
    pub value: u64,
}

/// DR0-DR3, DR6 and DR7.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugRegs {
    /// DR0-DR3.
    pub db: [u64; 4],
    /// DR6.
    pub dr6: u64,
    /// DR7.
    pub dr7: u64,
}

/// An exception being delivered or waiting to be.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExceptionEvent {
    /// Its delivery was under way (re-inject it).
    pub injected: bool,
    /// It is pending (not yet delivered).
    pub pending: bool,
    /// The vector.
    pub vector: u8,
    /// Its error code, if it has one.
    pub error_code: Option<u32>,
    /// Its payload (CR2 of a #PF, DR6 of a #DB) when delivered with one.
    pub payload: Option<u64>,
}

/// An external or software interrupt being delivered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterruptEvent {
    /// Its delivery was under way.
    pub injected: bool,
    /// The vector.
    pub vector: u8,
    /// A software interrupt (INTn).
    pub soft: bool,
    /// The interrupt shadow (STI or MOV SS blocking), as a bit mask.
    pub shadow: u8,
}

/// NMI state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NmiEvent {
    /// An NMI's delivery was under way.
    pub injected: bool,
    /// An NMI is pending.
    pub pending: bool,
    /// NMIs are blocked (inside an NMI handler).
    pub masked: bool,
}

/// SMM state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmiEvent {
    /// The vCPU is in SMM.
    pub smm: bool,
    /// An SMI is pending.
    pub pending: bool,
    /// It entered SMM from inside an NMI handler.
    pub smm_inside_nmi: bool,
    /// An INIT arrived while in SMM.
    pub latched_init: bool,
}

/// Events the vCPU was in the middle of, or that wait for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuEvents {
    /// The exception.
    pub exception: ExceptionEvent,
    /// The interrupt.
    pub interrupt: InterruptEvent,
    /// NMIs.
    pub nmi: NmiEvent,
    /// The SIPI vector received (for an AP waiting for a SIPI).
    pub sipi_vector: u32,
    /// SMM, when saved.
    pub smi: Option<SmiEvent>,
    /// A triple fault is pending, when saved.
    pub triple_fault_pending: Option<bool>,
}

/// Where a vCPU is in its power-up sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MpState {
    /// Running (or ready to).
    Runnable,
    /// An AP before INIT.
    Uninitialized,
    /// INIT received, waiting for SIPI.
    InitReceived,
    /// HLT, waiting for an interrupt.
    Halted,
    /// SIPI received.
    SipiReceived,
    /// An AP parked by the firmware (AMD SEV-ES AP reset hold).
    ApResetHold,
}

/// Everything of one x86 vCPU, for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct X86VcpuState {
    /// CPUID as set.
    pub cpuid: Vec<CpuidEntry>,
    /// The TSC frequency, when the hypervisor reports it.
    pub tsc_khz: Option<u32>,
    /// MSRs (every one the hypervisor lists that reads back).
    pub msrs: Vec<Msr>,
    /// General registers.
    pub regs: GeneralRegs,
    /// Segment, control and descriptor-table registers.
    pub sregs: SpecialRegs,
    /// The XSAVE image (legacy region, XSAVE header, extended components) as XSAVE writes it
    /// in its standard form, in 32-bit words; at least the 4 KiB legacy size.
    pub xsave: Vec<u32>,
    /// Extended control registers.
    pub xcrs: Vec<Xcr>,
    /// Debug registers.
    pub debugregs: DebugRegs,
    /// The local APIC's 1 KiB register page, laid out as the xAPIC MMIO page (register at
    /// offset 0x20 is the ID, 0x80 the TPR, ...).
    pub lapic: Vec<u8>,
    /// Pending exceptions, interrupts and NMIs.
    pub events: VcpuEvents,
    /// Running, halted, waiting for SIPI...
    pub mp_state: MpState,
}

/// The state of one 8259A PIC.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct PicState {
    pub last_irr: u8,
    /// Interrupt request register.
    pub irr: u8,
    /// Interrupt mask register.
    pub imr: u8,
    /// In-service register.
    pub isr: u8,
    pub priority_add: u8,
    /// The vector base (ICW2).
    pub irq_base: u8,
    pub read_reg_select: u8,
    pub poll: u8,
    pub special_mask: u8,
    pub init_state: u8,
    pub auto_eoi: u8,
    pub rotate_on_auto_eoi: u8,
    pub special_fully_nested_mode: u8,
    pub init4: u8,
    /// Edge/level control register.
    pub elcr: u8,
    pub elcr_mask: u8,
}

/// The state of the IOAPIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoapicState {
    /// Its MMIO base.
    pub base_address: u64,
    /// The selected register.
    pub ioregsel: u32,
    /// Its APIC ID.
    pub id: u32,
    /// Pending level interrupts.
    pub irr: u32,
    /// The redirection table, one 64-bit entry per pin.
    pub redirtbl: Vec<u64>,
}

/// One 8254 PIT channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct PitChannel {
    /// The reload value.
    pub count: u32,
    pub latched_count: u16,
    pub count_latched: u8,
    pub status_latched: u8,
    pub status: u8,
    pub read_state: u8,
    pub write_state: u8,
    pub write_latch: u8,
    pub rw_mode: u8,
    /// The counter mode (0-5).
    pub mode: u8,
    pub bcd: u8,
    pub gate: u8,
    /// When the count was loaded, on the host's monotonic clock in ns.
    pub count_load_time: i64,
}

/// The 8254 PIT.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitState {
    /// Channels 0-2.
    pub channels: [PitChannel; 3],
    /// Bit 0: HPET legacy mode (channel 0 silent); bit 1: speaker data on.
    pub flags: u32,
}

/// Everything of an x86 VM besides its vCPUs, for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct X86VmState {
    /// The guest's kvmclock (pvclock) time, in ns.
    pub clock_ns: u64,
    /// The master 8259.
    pub pic_master: PicState,
    /// The slave 8259.
    pub pic_slave: PicState,
    /// The IOAPIC.
    pub ioapic: IoapicState,
    /// The PIT.
    pub pit: PitState,
}
