//! The hypervisor behind a small interface. Only this module's backends call hypervisor APIs
//! (KVM ioctls today; Hypervisor.framework later); the rest of tern speaks these traits.
//!
//! Saved state (snapshots) is tern's own types ([`x86_state`], [`arm_state`]), converted at
//! the backend. Booting an x86 vCPU still takes kvm-bindings'
//! CPUID, MSR and register structures (only KVM runs x86 guests).

pub mod arm_state;
#[cfg(target_os = "linux")]
pub mod kvm;
#[cfg(all(target_os = "linux", target_arch = "aarch64"))]
mod kvm_arm;
#[cfg(target_os = "linux")]
mod kvm_msi;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod kvm_x86;
pub mod x86_state;

#[cfg(target_arch = "aarch64")]
pub use arm_state::{ArmGicState, ArmItsState, ArmVcpuState};

#[cfg(target_arch = "x86_64")]
pub use x86_state::{X86VcpuState, X86VmState};

use std::sync::Arc;

use devices::interrupt::Interrupt;

/// Errors from a hypervisor backend.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// The hypervisor device could not be opened.
    #[error(
        "cannot open {path}: {source} (is KVM available and are you allowed to use it? try `ls -l /dev/kvm`)"
    )]
    Open {
        /// The device path.
        path: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A hypervisor call failed.
    #[error("{op} failed: {source}")]
    Call {
        /// The operation.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The host's hypervisor cannot give the VM what it was configured with.
    #[error("{0}")]
    Unsupported(String),
}

impl HypervisorError {
    pub(crate) fn call(op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> Self {
        move |e| HypervisorError::Call {
            op,
            source: std::io::Error::from_raw_os_error(e.errno()),
        }
    }
}

/// Result type of hypervisor calls.
pub type HvResult<T> = std::result::Result<T, HypervisorError>;

/// Why a vCPU stopped running guest code.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// Port read: fill the slice.
    IoIn(u16, &'a mut [u8]),
    /// Port write.
    IoOut(u16, &'a [u8]),
    /// MMIO read: fill the slice.
    MmioRead(u64, &'a mut [u8]),
    /// MMIO write.
    MmioWrite(u64, &'a [u8]),
    /// The vCPU halted (only without an in-kernel irqchip).
    Hlt,
    /// Triple fault or equivalent: the machine resets.
    Shutdown,
    /// The platform asked for power-off.
    SystemOff,
    /// The platform asked for a reset.
    SystemReset,
    /// The run was interrupted by a signal; run again.
    Interrupted,
    /// Something the VMM does not handle.
    Unhandled(String),
}

/// A hypervisor: makes VMs.
pub trait Hypervisor: Send + Sync {
    /// A short name for logs ("kvm").
    fn name(&self) -> &'static str;
    /// The most vCPUs one VM may have.
    fn max_vcpus(&self) -> usize;
    /// A new, empty VM.
    fn create_vm(&self) -> HvResult<Arc<dyn Vm>>;
}

/// A VM: memory, interrupt controllers, vCPUs.
pub trait Vm: Send + Sync {
    /// Maps `size` bytes of host memory at `host_addr` into the guest at `guest_addr`; with
    /// `log_dirty`, the hypervisor records which pages the guest writes ([`Vm::dirty_log`]).
    ///
    /// # Safety
    /// The host range must stay mapped and valid for as long as the VM exists.
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
        log_dirty: bool,
    ) -> HvResult<()>;

    /// The pages of memory slot `slot` (`size` bytes) the guest wrote since the last call, one
    /// bit per 4 KiB page; the log starts over.
    fn dirty_log(&self, slot: u32, size: u64) -> HvResult<Vec<u64>>;

    /// Creates vCPU `index`.
    fn create_vcpu(&self, index: u8) -> HvResult<Box<dyn Vcpu>>;

    /// An edge interrupt line into the guest's interrupt controller at `gsi`.
    fn interrupt_line(&self, gsi: u32) -> HvResult<Arc<dyn Interrupt>>;

    /// Signals `evt` instead of exiting when the guest writes the 32-bit value `datamatch` to
    /// the MMIO address `addr` (a virtio queue notification).
    fn register_notify(
        &self,
        evt: &vmm_sys_util::eventfd::EventFd,
        addr: u64,
        datamatch: u32,
    ) -> HvResult<()>;

    /// Where the MSI-X vectors of PCI functions come from (virtio-pci).
    fn msi_controller(&self) -> Arc<dyn devices::interrupt::MsiController>;

    /// Registers eventfds signalled by any write to an MMIO address (virtio-pci queue
    /// notifications, which move with their BAR).
    fn notify_registrar(&self) -> Arc<dyn devices::pci::NotifyRegistrar>;

    /// x86: in-kernel LAPIC/IOAPIC/PIC and PIT, and the TSS the hypervisor needs.
    #[cfg(target_arch = "x86_64")]
    fn setup_x86_platform(&self, tss_address: u64) -> HvResult<()>;

    /// x86: the CPUID the hypervisor can give a guest.
    #[cfg(target_arch = "x86_64")]
    fn supported_cpuid(&self) -> HvResult<Vec<kvm_bindings::kvm_cpuid_entry2>>;

    /// x86: the clock, interrupt controllers and PIT (vCPUs paused).
    #[cfg(target_arch = "x86_64")]
    fn save_x86_state(&self) -> HvResult<X86VmState>;

    /// x86: puts back what [`Vm::save_x86_state`] returned.
    #[cfg(target_arch = "x86_64")]
    fn restore_x86_state(&self, state: &X86VmState) -> HvResult<()>;

    /// ARM64: creates and initialises the interrupt controller for `vcpus` vCPUs (all created
    /// already) at the addresses of `arch::aarch64::layout`: a GICv3, or a GICv2 where the
    /// host has no GICv3 emulation. With `its` (a VM with PCI, whose MSIs it translates) a
    /// GICv3 gets an ITS at `GIC_ITS_START`; a GICv2 has none (the functions use INTx).
    #[cfg(target_arch = "aarch64")]
    fn setup_arm_gic(&self, vcpus: u64, its: bool) -> HvResult<arch::aarch64::fdt::GicVersion>;

    /// ARM64: the GIC's distributor, and for each vCPU (by MPIDR, in vCPU order) its
    /// redistributor and CPU interface, and the ITS if there is one (vCPUs paused; this
    /// writes the ITS tables and LPI pending tables into guest memory, so it goes before
    /// the memory is saved).
    #[cfg(target_arch = "aarch64")]
    fn save_arm_gic(&self, mpidrs: &[u64]) -> HvResult<ArmGicState>;

    /// ARM64: puts back what [`Vm::save_arm_gic`] returned (the vCPUs restored first).
    #[cfg(target_arch = "aarch64")]
    fn restore_arm_gic(&self, state: &ArmGicState) -> HvResult<()>;
}

/// One virtual CPU. Runs on its own thread.
pub trait Vcpu: Send {
    /// Runs guest code until the next exit.
    fn run(&mut self) -> HvResult<VcpuExit<'_>>;

    /// x86: CPUID, MSRs, FPU, LAPIC LINT pins, then general and special registers.
    /// `sregs_setup` adjusts the special registers read from the vCPU.
    #[cfg(target_arch = "x86_64")]
    fn configure_x86(
        &mut self,
        cpuid: &[kvm_bindings::kvm_cpuid_entry2],
        msrs: &[kvm_bindings::kvm_msr_entry],
        boot: Option<X86BootState<'_>>,
    ) -> HvResult<()>;

    /// x86: the whole vCPU state (the vCPU not running).
    #[cfg(target_arch = "x86_64")]
    fn save_x86_state(&self) -> HvResult<X86VcpuState>;

    /// x86: puts back what [`Vcpu::save_x86_state`] returned.
    #[cfg(target_arch = "x86_64")]
    fn restore_x86_state(&mut self, state: &X86VcpuState) -> HvResult<()>;

    /// ARM64: sets registers, as (KVM one-reg ID, value) pairs (`arch::aarch64::regs`).
    #[cfg(target_arch = "aarch64")]
    fn set_arm_regs(&mut self, regs: &[(u64, u64)]) -> HvResult<()>;

    /// ARM64: the vCPU's MPIDR_EL1 (its affinity, as the device tree names it).
    #[cfg(target_arch = "aarch64")]
    fn arm_mpidr(&self) -> HvResult<u64>;

    /// ARM64: every register `KVM_GET_REG_LIST` names (core, FP/SIMD, system registers,
    /// timers, firmware pseudo-registers) and the MP state (the vCPU not running).
    #[cfg(target_arch = "aarch64")]
    fn save_arm_state(&self) -> HvResult<ArmVcpuState>;

    /// ARM64: puts back what [`Vcpu::save_arm_state`] returned (on a vCPU initialised as the
    /// saved one was).
    #[cfg(target_arch = "aarch64")]
    fn restore_arm_state(&mut self, state: &ArmVcpuState) -> HvResult<()>;
}

/// The boot vCPU's entry state on x86.
#[cfg(target_arch = "x86_64")]
pub struct X86BootState<'a> {
    /// General-purpose registers.
    pub regs: kvm_bindings::kvm_regs,
    /// Edits the special registers (writes GDT/page tables as needed).
    pub sregs_setup: &'a dyn Fn(&mut kvm_bindings::kvm_sregs) -> Result<(), String>,
}
