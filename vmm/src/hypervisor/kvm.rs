//! The KVM backend.

use std::sync::Arc;

use devices::interrupt::Interrupt;
use kvm_bindings::kvm_userspace_memory_region;
#[cfg(target_arch = "x86_64")]
use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, Msrs, kvm_cpuid_entry2, kvm_msr_entry,
    kvm_pit_config,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::{HvResult, Hypervisor, HypervisorError, Vcpu, VcpuExit, Vm};

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

/// KVM on `/dev/kvm`.
pub struct KvmHypervisor {
    kvm: Kvm,
}

impl KvmHypervisor {
    /// Opens `/dev/kvm`.
    pub fn new() -> HvResult<Self> {
        let kvm = Kvm::new().map_err(|e| HypervisorError::Open {
            path: "/dev/kvm",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        Ok(Self { kvm })
    }
}

impl Hypervisor for KvmHypervisor {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    fn create_vm(&self) -> HvResult<Arc<dyn Vm>> {
        let vm = self
            .kvm
            .create_vm()
            .map_err(HypervisorError::call("KVM_CREATE_VM"))?;
        #[cfg(target_arch = "x86_64")]
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(HypervisorError::call("KVM_GET_SUPPORTED_CPUID"))?
            .as_slice()
            .to_vec();
        #[cfg(target_arch = "x86_64")]
        let msr_list = self
            .kvm
            .get_msr_index_list()
            .map_err(HypervisorError::call("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        let vm = Arc::new(vm);
        Ok(Arc::new(KvmVm {
            msi_router: Arc::new(super::kvm_msi::GsiRouter::new(vm.clone())),
            vm,
            #[cfg(target_arch = "x86_64")]
            cpuid,
            #[cfg(target_arch = "x86_64")]
            msr_list: Arc::new(msr_list),
            #[cfg(target_arch = "aarch64")]
            gic: std::sync::Mutex::new(None),
            #[cfg(target_arch = "aarch64")]
            its: std::sync::Mutex::new(None),
        }))
    }
}

struct KvmVm {
    /// Shared with the MSI and ioeventfd handles the devices hold.
    vm: Arc<VmFd>,
    /// The GSI routes of the MSI-X vectors.
    msi_router: Arc<super::kvm_msi::GsiRouter>,
    #[cfg(target_arch = "x86_64")]
    cpuid: Vec<kvm_cpuid_entry2>,
    /// The MSRs KVM can save and restore (`KVM_GET_MSR_INDEX_LIST`).
    #[cfg(target_arch = "x86_64")]
    msr_list: Arc<Vec<u32>>,
    /// The GIC device (kept open as long as the VM) and its version.
    #[cfg(target_arch = "aarch64")]
    gic: std::sync::Mutex<Option<(kvm_ioctls::DeviceFd, arch::aarch64::fdt::GicVersion)>>,
    /// The GICv3 ITS of a VM with PCI.
    #[cfg(target_arch = "aarch64")]
    its: std::sync::Mutex<Option<kvm_ioctls::DeviceFd>>,
}

/// An irqfd: writing the eventfd raises the GSI in the in-kernel irqchip.
struct IrqFd(EventFd);

impl Interrupt for IrqFd {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// ioeventfds without a data match, for virtio-pci's per-queue notification addresses
/// (the driver writes 16 bits there).
struct KvmNotify(Arc<VmFd>);

impl devices::pci::NotifyRegistrar for KvmNotify {
    fn register(&self, evt: &EventFd, addr: u64) -> std::io::Result<()> {
        self.0
            .register_ioevent(
                evt,
                &kvm_ioctls::IoEventAddress::Mmio(addr),
                kvm_ioctls::NoDatamatch,
            )
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    fn unregister(&self, evt: &EventFd, addr: u64) -> std::io::Result<()> {
        self.0
            .unregister_ioevent(
                evt,
                &kvm_ioctls::IoEventAddress::Mmio(addr),
                kvm_ioctls::NoDatamatch,
            )
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

impl Vm for KvmVm {
    fn msi_controller(&self) -> Arc<dyn devices::interrupt::MsiController> {
        Arc::new(super::kvm_msi::KvmMsi(self.msi_router.clone()))
    }

    fn notify_registrar(&self) -> Arc<dyn devices::pci::NotifyRegistrar> {
        Arc::new(KvmNotify(self.vm.clone()))
    }

    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
        log_dirty: bool,
    ) -> HvResult<()> {
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr,
            flags: if log_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
        };
        // SAFETY: the caller guarantees the host range stays mapped for the VM's lifetime.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(HypervisorError::call("KVM_SET_USER_MEMORY_REGION"))
    }

    fn dirty_log(&self, slot: u32, size: u64) -> HvResult<Vec<u64>> {
        let size = usize::try_from(size).map_err(|_| HypervisorError::Call {
            op: "KVM_GET_DIRTY_LOG",
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        self.vm
            .get_dirty_log(slot, size)
            .map_err(HypervisorError::call("KVM_GET_DIRTY_LOG"))
    }

    fn create_vcpu(&self, index: u8) -> HvResult<Box<dyn Vcpu>> {
        let fd = self
            .vm
            .create_vcpu(u64::from(index))
            .map_err(HypervisorError::call("KVM_CREATE_VCPU"))?;
        #[cfg(target_arch = "aarch64")]
        {
            // PSCI 0.2+ in the kernel (CPU_ON, SYSTEM_OFF, SYSTEM_RESET); the secondary vCPUs
            // start powered off until the boot vCPU turns them on.
            let mut kvi = kvm_bindings::kvm_vcpu_init::default();
            self.vm
                .get_preferred_target(&mut kvi)
                .map_err(HypervisorError::call("KVM_ARM_PREFERRED_TARGET"))?;
            kvi.features[0] |= 1 << kvm_bindings::KVM_ARM_VCPU_PSCI_0_2;
            if index > 0 {
                kvi.features[0] |= 1 << kvm_bindings::KVM_ARM_VCPU_POWER_OFF;
            }
            fd.vcpu_init(&kvi)
                .map_err(HypervisorError::call("KVM_ARM_VCPU_INIT"))?;
        }
        Ok(Box::new(KvmVcpu {
            fd,
            #[cfg(target_arch = "x86_64")]
            msr_list: self.msr_list.clone(),
        }))
    }

    fn interrupt_line(&self, gsi: u32) -> HvResult<Arc<dyn Interrupt>> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| HypervisorError::Call {
            op: "eventfd",
            source,
        })?;
        self.vm
            .register_irqfd(&evt, gsi)
            .map_err(HypervisorError::call("KVM_IRQFD"))?;
        Ok(Arc::new(IrqFd(evt)))
    }

    fn register_notify(&self, evt: &EventFd, addr: u64, datamatch: u32) -> HvResult<()> {
        self.vm
            .register_ioevent(evt, &kvm_ioctls::IoEventAddress::Mmio(addr), datamatch)
            .map_err(HypervisorError::call("KVM_IOEVENTFD"))
    }

    #[cfg(target_arch = "x86_64")]
    fn setup_x86_platform(&self, tss_address: u64) -> HvResult<()> {
        self.vm
            .set_tss_address(tss_address as usize)
            .map_err(HypervisorError::call("KVM_SET_TSS_ADDR"))?;
        self.vm
            .create_irq_chip()
            .map_err(HypervisorError::call("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.vm
            .create_pit2(pit)
            .map_err(HypervisorError::call("KVM_CREATE_PIT2"))
    }

    #[cfg(target_arch = "x86_64")]
    fn supported_cpuid(&self) -> HvResult<Vec<kvm_cpuid_entry2>> {
        Ok(self.cpuid.clone())
    }

    #[cfg(target_arch = "x86_64")]
    fn save_x86_state(&self) -> HvResult<super::X86VmState> {
        use kvm_bindings::{KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
        let clock = self
            .vm
            .get_clock()
            .map_err(HypervisorError::call("KVM_GET_CLOCK"))?;
        let get = |chip_id| {
            let mut chip = kvm_bindings::kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.vm
                .get_irqchip(&mut chip)
                .map_err(HypervisorError::call("KVM_GET_IRQCHIP"))
                .map(|()| chip)
        };
        let pic_master = super::kvm_x86::pic_from_kvm(&get(KVM_IRQCHIP_PIC_MASTER)?);
        let pic_slave = super::kvm_x86::pic_from_kvm(&get(KVM_IRQCHIP_PIC_SLAVE)?);
        let ioapic = super::kvm_x86::ioapic_from_kvm(&get(KVM_IRQCHIP_IOAPIC)?);
        let pit = self
            .vm
            .get_pit2()
            .map_err(HypervisorError::call("KVM_GET_PIT2"))?;
        Ok(super::X86VmState {
            clock_ns: clock.clock,
            pic_master,
            pic_slave,
            ioapic,
            pit: (&pit).into(),
        })
    }

    #[cfg(target_arch = "x86_64")]
    fn restore_x86_state(&self, state: &super::X86VmState) -> HvResult<()> {
        use kvm_bindings::{KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
        self.vm
            .set_pit2(&(&state.pit).into())
            .map_err(HypervisorError::call("KVM_SET_PIT2"))?;
        let clock = kvm_bindings::kvm_clock_data {
            clock: state.clock_ns,
            ..Default::default()
        };
        self.vm
            .set_clock(&clock)
            .map_err(HypervisorError::call("KVM_SET_CLOCK"))?;
        for chip in [
            super::kvm_x86::pic_to_kvm(KVM_IRQCHIP_PIC_MASTER, &state.pic_master),
            super::kvm_x86::pic_to_kvm(KVM_IRQCHIP_PIC_SLAVE, &state.pic_slave),
            super::kvm_x86::ioapic_chip_to_kvm(&state.ioapic)?,
        ] {
            self.vm
                .set_irqchip(&chip)
                .map_err(HypervisorError::call("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }

    #[cfg(target_arch = "aarch64")]
    fn setup_arm_gic(&self, vcpus: u64, its: bool) -> HvResult<arch::aarch64::fdt::GicVersion> {
        use arch::aarch64::fdt::GicVersion;
        use arch::aarch64::layout::*;
        use kvm_bindings::*;
        let v3 = [
            (KVM_VGIC_V3_ADDR_TYPE_DIST, GIC_DIST_START),
            (KVM_VGIC_V3_ADDR_TYPE_REDIST, gicv3_redist_start(vcpus)),
        ];
        let v2 = [
            (KVM_VGIC_V2_ADDR_TYPE_DIST, GIC_DIST_START),
            (KVM_VGIC_V2_ADDR_TYPE_CPU, GICV2_CPU_START),
        ];
        let (fd, version) = match self.create_gic(kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3, &v3) {
            Ok(fd) => (fd, GicVersion::V3),
            Err(e3) => {
                if vcpus as usize > GICV2_MAX_VCPUS {
                    return Err(e3);
                }
                if its {
                    log::warn!(
                        "no GICv3 ({e3}); using a GICv2, which has no ITS for MSI-X: the PCI \
                         functions interrupt through INTx instead (each slot's SPI)"
                    );
                } else {
                    log::info!("no GICv3 ({e3}); using a GICv2");
                }
                (
                    self.create_gic(kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V2, &v2)?,
                    GicVersion::V2,
                )
            }
        };
        *self.gic.lock().unwrap_or_else(|p| p.into_inner()) = Some((fd, version));
        if its && version == GicVersion::V3 {
            let fd = self.create_its()?;
            *self.its.lock().unwrap_or_else(|p| p.into_inner()) = Some(fd);
            log::info!("GICv3 ITS at {GIC_ITS_START:#x} (MSIs of the PCI functions)");
        }
        Ok(version)
    }

    #[cfg(target_arch = "aarch64")]
    fn save_arm_gic(&self, mpidrs: &[u64]) -> HvResult<super::ArmGicState> {
        use arch::aarch64::fdt::GicVersion;
        use arch::aarch64::gic;
        use arch::aarch64::layout::GIC_NR_IRQS;
        let guard = self.gic.lock().unwrap_or_else(|p| p.into_inner());
        let Some((fd, version)) = guard.as_ref() else {
            return Err(no_gic());
        };
        let mut regs = Vec::new();
        let mut read_all = |list: Vec<gic::GicReg>| -> HvResult<()> {
            for r in list {
                regs.push((super::kvm_arm::gic_from_kvm(r)?, gic_get(fd, r)?));
            }
            Ok(())
        };
        match version {
            GicVersion::V3 => {
                read_all(gic::v3_dist(GIC_NR_IRQS))?;
                for &mpidr in mpidrs {
                    read_all(gic::v3_redist(mpidr))?;
                    let sys = gic::v3_cpu_sysregs(mpidr);
                    let ctlr_reg = sys[1];
                    read_all(sys)?;
                    // ICC_CTLR_EL1 says how many active-priority registers follow.
                    let ctlr = gic_get(fd, ctlr_reg)?;
                    read_all(gic::v3_cpu_apr(mpidr, ctlr))?;
                }
            }
            GicVersion::V2 => {
                let cpus = u8::try_from(mpidrs.len()).unwrap_or(u8::MAX);
                read_all(gic::v2_dist(GIC_NR_IRQS, cpus))?;
                for cpu in 0..cpus {
                    read_all(gic::v2_cpu(cpu))?;
                }
            }
        }
        let its = match self.its.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(its) => {
                // The redistributors' pending LPIs, then the ITS's own tables, into guest
                // memory (which the snapshot saves after this).
                ctrl(
                    fd,
                    kvm_bindings::KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES,
                    "KVM_SET_DEVICE_ATTR (GIC: save the LPI pending tables)",
                )?;
                ctrl(
                    its,
                    kvm_bindings::KVM_DEV_ARM_ITS_SAVE_TABLES,
                    "KVM_SET_DEVICE_ATTR (ITS: save its tables)",
                )?;
                let mut its_regs = Vec::with_capacity(gic::ITS_REGS.len());
                for off in gic::ITS_REGS {
                    its_regs.push((off, gic_get(its, its_reg(off))?));
                }
                Some(super::ArmItsState {
                    regs: its_regs,
                    ctlr: gic_get(its, its_reg(gic::GITS_CTLR))?,
                })
            }
            None => None,
        };
        Ok(super::ArmGicState {
            version: match version {
                GicVersion::V3 => 3,
                GicVersion::V2 => 2,
            },
            regs,
            its,
        })
    }

    #[cfg(target_arch = "aarch64")]
    fn restore_arm_gic(&self, state: &super::ArmGicState) -> HvResult<()> {
        let guard = self.gic.lock().unwrap_or_else(|p| p.into_inner());
        let Some((fd, _)) = guard.as_ref() else {
            return Err(no_gic());
        };
        for &(name, value) in &state.regs {
            gic_set(fd, super::kvm_arm::gic_to_kvm(name), value).inspect_err(|_| {
                log::warn!("GIC register {name:?} = {value:#x} refused");
            })?;
        }
        let its = self.its.lock().unwrap_or_else(|p| p.into_inner());
        match (its.as_ref(), &state.its) {
            (None, None) => Ok(()),
            (Some(fd), Some(saved)) => {
                // The redistributors are back (above); the ITS's registers but its control,
                // its tables from guest memory, then its control, which enables it.
                for &(off, value) in &saved.regs {
                    gic_set(fd, its_reg(off), value).inspect_err(|_| {
                        log::warn!("ITS register {off:#x} = {value:#x} refused");
                    })?;
                }
                ctrl(
                    fd,
                    kvm_bindings::KVM_DEV_ARM_ITS_RESTORE_TABLES,
                    "KVM_SET_DEVICE_ATTR (ITS: restore its tables)",
                )?;
                gic_set(fd, its_reg(arch::aarch64::gic::GITS_CTLR), saved.ctlr)
            }
            (Some(_), None) => Err(HypervisorError::Unsupported(
                "the snapshot's VM had no ITS (no PCI), and this one has".into(),
            )),
            (None, Some(_)) => Err(HypervisorError::Unsupported(
                "the snapshot's VM had an ITS (PCI), and this one has none".into(),
            )),
        }
    }
}

/// ITS register `offset` (64 bits through the attribute, whatever its width).
#[cfg(target_arch = "aarch64")]
fn its_reg(offset: u32) -> arch::aarch64::gic::GicReg {
    arch::aarch64::gic::GicReg {
        group: arch::aarch64::gic::GRP_ITS_REGS,
        attr: u64::from(offset),
    }
}

/// A `KVM_DEV_ARM_VGIC_GRP_CTRL` command without a value.
#[cfg(target_arch = "aarch64")]
fn ctrl(fd: &kvm_ioctls::DeviceFd, attr: u32, what: &'static str) -> HvResult<()> {
    let a = kvm_bindings::kvm_device_attr {
        group: kvm_bindings::KVM_DEV_ARM_VGIC_GRP_CTRL,
        attr: u64::from(attr),
        addr: 0,
        flags: 0,
    };
    fd.set_device_attr(&a).map_err(HypervisorError::call(what))
}

#[cfg(target_arch = "aarch64")]
fn no_gic() -> HypervisorError {
    HypervisorError::Call {
        op: "GIC state (the VM has no GIC yet)",
        source: std::io::Error::from_raw_os_error(libc::ENODEV),
    }
}

/// The device attribute for GIC register `r`, its value at `value`. One u64 serves both
/// widths: KVM reads or writes 32 bits for most groups, which on little-endian ARM64 are the
/// low half of the u64.
#[cfg(target_arch = "aarch64")]
fn gic_attr(r: arch::aarch64::gic::GicReg, value: *const u64) -> kvm_bindings::kvm_device_attr {
    kvm_bindings::kvm_device_attr {
        group: r.group,
        attr: r.attr,
        addr: value as u64,
        flags: 0,
    }
}

/// Reads one GIC register (32 bits, or 64 for GICv3 CPU interface system registers).
#[cfg(target_arch = "aarch64")]
fn gic_get(fd: &kvm_ioctls::DeviceFd, r: arch::aarch64::gic::GicReg) -> HvResult<u64> {
    let mut value: u64 = 0;
    let mut a = gic_attr(r, &raw mut value);
    // SAFETY: `addr` points to a live u64, at least as wide as what KVM writes for any group.
    unsafe { fd.get_device_attr(&mut a) }
        .map_err(HypervisorError::call("KVM_GET_DEVICE_ATTR (GIC register)"))?;
    Ok(value)
}

/// Writes one GIC register (see [`gic_get`]).
#[cfg(target_arch = "aarch64")]
fn gic_set(fd: &kvm_ioctls::DeviceFd, r: arch::aarch64::gic::GicReg, value: u64) -> HvResult<()> {
    let value = if r.wide() { value } else { value & 0xffff_ffff };
    fd.set_device_attr(&gic_attr(r, &raw const value))
        .map_err(HypervisorError::call("KVM_SET_DEVICE_ATTR (GIC register)"))
}

/// Places region `kind` of a GIC or ITS device at `base` (`KVM_DEV_ARM_VGIC_GRP_ADDR`).
#[cfg(target_arch = "aarch64")]
fn set_address(
    fd: &kvm_ioctls::DeviceFd,
    kind: u32,
    base: u64,
    what: &'static str,
) -> HvResult<()> {
    // KVM reads the address through the pointer during the call.
    fd.set_device_attr(&kvm_bindings::kvm_device_attr {
        group: kvm_bindings::KVM_DEV_ARM_VGIC_GRP_ADDR,
        attr: u64::from(kind),
        addr: &raw const base as u64,
        flags: 0,
    })
    .map_err(HypervisorError::call(what))
}

#[cfg(target_arch = "aarch64")]
impl KvmVm {
    /// Creates an in-kernel device of `kind` (a GIC or an ITS).
    fn create_arm_device(&self, kind: u32, what: &'static str) -> HvResult<kvm_ioctls::DeviceFd> {
        let mut dev = kvm_bindings::kvm_create_device {
            type_: kind,
            fd: 0,
            flags: 0,
        };
        self.vm
            .create_device(&mut dev)
            .map_err(HypervisorError::call(what))
    }

    /// Creates the GICv3 ITS at `GIC_ITS_START` and initialises it (after the GIC).
    fn create_its(&self) -> HvResult<kvm_ioctls::DeviceFd> {
        use kvm_bindings::*;
        let fd = self.create_arm_device(
            kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_ITS,
            "KVM_CREATE_DEVICE (GICv3 ITS)",
        )?;
        set_address(
            &fd,
            KVM_VGIC_ITS_ADDR_TYPE,
            arch::aarch64::layout::GIC_ITS_START,
            "KVM_SET_DEVICE_ATTR (ITS address)",
        )?;
        ctrl(
            &fd,
            KVM_DEV_ARM_VGIC_CTRL_INIT,
            "KVM_SET_DEVICE_ATTR (ITS init)",
        )?;
        Ok(fd)
    }

    /// Creates a GIC of `kind`, places its regions and initialises it.
    fn create_gic(&self, kind: u32, regions: &[(u32, u64)]) -> HvResult<kvm_ioctls::DeviceFd> {
        use kvm_bindings::*;
        let fd = self.create_arm_device(kind, "KVM_CREATE_DEVICE (GIC)")?;
        let set = |group: u32, attr: u64, addr: u64, what: &'static str| {
            let a = kvm_device_attr {
                group,
                attr,
                addr,
                flags: 0,
            };
            fd.set_device_attr(&a).map_err(HypervisorError::call(what))
        };
        for &(kind, base) in regions {
            set_address(&fd, kind, base, "KVM_SET_DEVICE_ATTR (GIC region address)")?;
        }
        let nr_irqs: u32 = arch::aarch64::layout::GIC_NR_IRQS;
        set(
            KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
            0,
            &raw const nr_irqs as u64,
            "KVM_SET_DEVICE_ATTR (GIC interrupt count)",
        )?;
        ctrl(
            &fd,
            KVM_DEV_ARM_VGIC_CTRL_INIT,
            "KVM_SET_DEVICE_ATTR (GIC init)",
        )?;
        Ok(fd)
    }
}

struct KvmVcpu {
    fd: VcpuFd,
    #[cfg(target_arch = "x86_64")]
    msr_list: Arc<Vec<u32>>,
}

// LAPIC register offsets and delivery modes for the LINT pins.
#[cfg(target_arch = "x86_64")]
const APIC_LVT0: usize = 0x350;
#[cfg(target_arch = "x86_64")]
const APIC_LVT1: usize = 0x360;
#[cfg(target_arch = "x86_64")]
const APIC_MODE_NMI: u32 = 0x4;
#[cfg(target_arch = "x86_64")]
const APIC_MODE_EXTINT: u32 = 0x7;

#[cfg(target_arch = "x86_64")]
fn set_lvt_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&regs[offset..offset + 4]) {
        *b = *r as u8;
    }
    let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (r, b) in regs[offset..offset + 4].iter_mut().zip(v.to_le_bytes()) {
        *r = b as std::os::raw::c_char;
    }
}

impl Vcpu for KvmVcpu {
    fn run(&mut self) -> HvResult<VcpuExit<'_>> {
        use kvm_ioctls::VcpuExit as K;
        match self.fd.run() {
            Ok(exit) => Ok(match exit {
                K::IoIn(port, data) => VcpuExit::IoIn(port, data),
                K::IoOut(port, data) => VcpuExit::IoOut(port, data),
                K::MmioRead(addr, data) => VcpuExit::MmioRead(addr, data),
                K::MmioWrite(addr, data) => VcpuExit::MmioWrite(addr, data),
                K::Hlt => VcpuExit::Hlt,
                K::Shutdown => VcpuExit::Shutdown,
                K::Intr => VcpuExit::Interrupted,
                K::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => VcpuExit::SystemOff,
                K::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => VcpuExit::SystemReset,
                K::FailEntry(reason, cpu) => VcpuExit::Unhandled(format!(
                    "KVM_EXIT_FAIL_ENTRY (hardware entry failure reason {reason:#x} on cpu {cpu})"
                )),
                K::InternalError => VcpuExit::Unhandled(
                    "KVM_EXIT_INTERNAL_ERROR (KVM could not emulate a guest instruction)".into(),
                ),
                other => VcpuExit::Unhandled(format!("{other:?}")),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(VcpuExit::Interrupted)
            }
            Err(e) => Err(HypervisorError::call("KVM_RUN")(e)),
        }
    }

    #[cfg(target_arch = "aarch64")]
    fn set_arm_regs(&mut self, regs: &[(u64, u64)]) -> HvResult<()> {
        for &(id, value) in regs {
            self.fd
                .set_one_reg(id, &value.to_le_bytes())
                .map_err(HypervisorError::call("KVM_SET_ONE_REG"))?;
        }
        Ok(())
    }

    #[cfg(target_arch = "aarch64")]
    fn arm_mpidr(&self) -> HvResult<u64> {
        let mut b = [0u8; 8];
        self.fd
            .get_one_reg(arch::aarch64::regs::MPIDR_EL1, &mut b)
            .map_err(HypervisorError::call("KVM_GET_ONE_REG (MPIDR_EL1)"))?;
        Ok(u64::from_le_bytes(b))
    }

    #[cfg(target_arch = "aarch64")]
    fn save_arm_state(&self) -> HvResult<super::ArmVcpuState> {
        use kvm_bindings::RegList;
        // kvm-bindings caps the list at 500 entries (KVM lists about 450 without SVE).
        let fam = |_| HypervisorError::Call {
            op: "KVM_GET_REG_LIST (more registers than the 500 kvm-bindings allows)",
            source: std::io::Error::from_raw_os_error(libc::E2BIG),
        };
        let mut list = RegList::new(500).map_err(fam)?;
        if let Err(e) = self.fd.get_reg_list(&mut list) {
            if e.errno() != libc::E2BIG {
                return Err(HypervisorError::call("KVM_GET_REG_LIST")(e));
            }
            // KVM wrote how many it has.
            let n = list.as_fam_struct_ref().n as usize;
            list = RegList::new(n).map_err(fam)?;
            self.fd
                .get_reg_list(&mut list)
                .map_err(HypervisorError::call("KVM_GET_REG_LIST"))?;
        }
        let mut regs = Vec::with_capacity(list.as_slice().len());
        for &id in list.as_slice() {
            let mut value = vec![0u8; super::kvm_arm::id_width(id)];
            self.fd
                .get_one_reg(id, &mut value)
                .map_err(|e| HypervisorError::Call {
                    op: "KVM_GET_ONE_REG (one of KVM_GET_REG_LIST)",
                    source: std::io::Error::from_raw_os_error(e.errno()),
                })?;
            regs.push((super::kvm_arm::reg_from_kvm(id), value));
        }
        let mp_state = self
            .fd
            .get_mp_state()
            .map_err(HypervisorError::call("KVM_GET_MP_STATE"))?
            .mp_state;
        Ok(super::ArmVcpuState {
            mpidr: self.arm_mpidr()?,
            power: super::kvm_arm::power_from_kvm(mp_state)?,
            regs,
        })
    }

    #[cfg(target_arch = "aarch64")]
    fn restore_arm_state(&mut self, s: &super::ArmVcpuState) -> HvResult<()> {
        for (name, value) in &s.regs {
            let id = super::kvm_arm::reg_to_kvm(*name)?;
            if super::kvm_arm::id_width(id) != value.len() {
                return Err(HypervisorError::Call {
                    op: "KVM_SET_ONE_REG (a saved register)",
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{name:?} was saved with {} bytes", value.len()),
                    ),
                });
            }
            self.fd.set_one_reg(id, value).map_err(|e| {
                log::warn!(
                    "KVM_SET_ONE_REG {name:?} ({id:#x}, {} bytes) refused",
                    value.len()
                );
                HypervisorError::call("KVM_SET_ONE_REG (a saved register)")(e)
            })?;
        }
        self.fd
            .set_mp_state(kvm_bindings::kvm_mp_state {
                mp_state: super::kvm_arm::power_to_kvm(s.power),
            })
            .map_err(HypervisorError::call("KVM_SET_MP_STATE"))
    }

    #[cfg(target_arch = "x86_64")]
    fn save_x86_state(&self) -> HvResult<super::X86VcpuState> {
        let call = HypervisorError::call;
        // First: KVM_GET_MP_STATE processes pending INIT/SIPI, which changes the rest.
        let mp_state = self.fd.get_mp_state().map_err(call("KVM_GET_MP_STATE"))?;
        let cpuid = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(call("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let tsc_khz = self.fd.get_tsc_khz().ok();
        // Batches of MSRs; KVM stops at the first one it cannot read, which is skipped.
        let mut msrs = Vec::with_capacity(self.msr_list.len());
        let mut rest: &[u32] = &self.msr_list;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(64)];
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut list = Msrs::from_entries(&entries).map_err(|_| HypervisorError::Call {
                op: "KVM_GET_MSRS",
                source: std::io::Error::other("too many MSRs"),
            })?;
            let n = self.fd.get_msrs(&mut list).map_err(call("KVM_GET_MSRS"))?;
            msrs.extend_from_slice(&list.as_slice()[..n.min(chunk.len())]);
            // A short read stopped at an MSR KVM cannot read: skip that one.
            let skip = if n < chunk.len() { n + 1 } else { chunk.len() };
            rest = &rest[skip.min(rest.len())..];
        }
        use super::kvm_x86 as conv;
        Ok(super::X86VcpuState {
            cpuid: cpuid.iter().map(Into::into).collect(),
            tsc_khz,
            msrs: msrs.iter().map(Into::into).collect(),
            regs: (&self.fd.get_regs().map_err(call("KVM_GET_REGS"))?).into(),
            sregs: (&self.fd.get_sregs().map_err(call("KVM_GET_SREGS"))?).into(),
            xsave: conv::xsave_from_kvm(&self.fd.get_xsave().map_err(call("KVM_GET_XSAVE"))?),
            xcrs: conv::xcrs_from_kvm(&self.fd.get_xcrs().map_err(call("KVM_GET_XCRS"))?),
            debugregs: (&self
                .fd
                .get_debug_regs()
                .map_err(call("KVM_GET_DEBUGREGS"))?)
                .into(),
            lapic: conv::lapic_from_kvm(&self.fd.get_lapic().map_err(call("KVM_GET_LAPIC"))?),
            // Last, as Firecracker does: pending events as of the end.
            events: (&self
                .fd
                .get_vcpu_events()
                .map_err(call("KVM_GET_VCPU_EVENTS"))?)
                .into(),
            mp_state: conv::mp_state_from_kvm(mp_state)?,
        })
    }

    #[cfg(target_arch = "x86_64")]
    fn restore_x86_state(&mut self, s: &super::X86VcpuState) -> HvResult<()> {
        use super::kvm_x86 as conv;
        let call = HypervisorError::call;
        let entries: Vec<kvm_cpuid_entry2> = s.cpuid.iter().map(Into::into).collect();
        let cpuid = CpuId::from_entries(&entries).map_err(|_| HypervisorError::Call {
            op: "KVM_SET_CPUID2",
            source: std::io::Error::other("too many CPUID entries"),
        })?;
        self.fd.set_cpuid2(&cpuid).map_err(call("KVM_SET_CPUID2"))?;
        if let Some(khz) = s.tsc_khz {
            // Another host's TSC rate: KVM scales where the CPU can; otherwise time drifts.
            if let Err(e) = self.fd.set_tsc_khz(khz) {
                log::warn!("cannot set the TSC to {khz} kHz: {e}; guest time may drift");
            }
        }
        self.fd
            .set_mp_state(conv::mp_state_to_kvm(s.mp_state))
            .map_err(call("KVM_SET_MP_STATE"))?;
        self.fd
            .set_regs(&(&s.regs).into())
            .map_err(call("KVM_SET_REGS"))?;
        self.fd
            .set_sregs(&(&s.sregs).into())
            .map_err(call("KVM_SET_SREGS"))?;
        let xsave = conv::xsave_to_kvm(&s.xsave)?;
        // SAFETY: `xsave` is a whole kvm_xsave (its 4 KiB region, no trailing components, as
        // KVM_SET_XSAVE reads); KVM validates the image's contents.
        unsafe { self.fd.set_xsave(&xsave) }.map_err(call("KVM_SET_XSAVE"))?;
        self.fd
            .set_xcrs(&conv::xcrs_to_kvm(&s.xcrs)?)
            .map_err(call("KVM_SET_XCRS"))?;
        self.fd
            .set_debug_regs(&(&s.debugregs).into())
            .map_err(call("KVM_SET_DEBUGREGS"))?;
        // The LAPIC before the MSRs: the TSC deadline MSR needs the LAPIC's timer mode.
        self.fd
            .set_lapic(&conv::lapic_to_kvm(&s.lapic)?)
            .map_err(call("KVM_SET_LAPIC"))?;
        let msrs: Vec<kvm_msr_entry> = s.msrs.iter().map(Into::into).collect();
        for chunk in msrs.chunks(64) {
            let list = Msrs::from_entries(chunk).map_err(|_| HypervisorError::Call {
                op: "KVM_SET_MSRS",
                source: std::io::Error::other("too many MSRs"),
            })?;
            let n = self.fd.set_msrs(&list).map_err(call("KVM_SET_MSRS"))?;
            if let Some(refused) = chunk.get(n) {
                return Err(HypervisorError::Call {
                    op: "KVM_SET_MSRS",
                    source: std::io::Error::other(format!(
                        "MSR {:#x} was refused (a snapshot from a host with other CPU features?)",
                        refused.index
                    )),
                });
            }
        }
        self.fd
            .set_vcpu_events(&(&s.events).into())
            .map_err(call("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    #[cfg(target_arch = "x86_64")]
    fn configure_x86(
        &mut self,
        cpuid: &[kvm_cpuid_entry2],
        msrs: &[kvm_msr_entry],
        boot: Option<super::X86BootState<'_>>,
    ) -> HvResult<()> {
        let cpuid = CpuId::from_entries(cpuid).map_err(|_| HypervisorError::Call {
            op: "KVM_SET_CPUID2",
            source: std::io::Error::other("too many CPUID entries"),
        })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(HypervisorError::call("KVM_SET_CPUID2"))?;
        let msr_list = Msrs::from_entries(msrs).map_err(|_| HypervisorError::Call {
            op: "KVM_SET_MSRS",
            source: std::io::Error::other("too many MSRs"),
        })?;
        let n = self
            .fd
            .set_msrs(&msr_list)
            .map_err(HypervisorError::call("KVM_SET_MSRS"))?;
        if n != msrs.len() {
            return Err(HypervisorError::Call {
                op: "KVM_SET_MSRS",
                source: std::io::Error::other(format!("only {n} of {} MSRs were set", msrs.len())),
            });
        }
        self.fd
            .set_fpu(&arch::x86_64::regs::boot_fpu())
            .map_err(HypervisorError::call("KVM_SET_FPU"))?;

        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(HypervisorError::call("KVM_GET_LAPIC"))?;
        set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        self.fd
            .set_lapic(&lapic)
            .map_err(HypervisorError::call("KVM_SET_LAPIC"))?;

        if let Some(boot) = boot {
            let mut sregs = self
                .fd
                .get_sregs()
                .map_err(HypervisorError::call("KVM_GET_SREGS"))?;
            (boot.sregs_setup)(&mut sregs).map_err(|e| HypervisorError::Call {
                op: "boot CPU state",
                source: std::io::Error::other(e),
            })?;
            self.fd
                .set_sregs(&sregs)
                .map_err(HypervisorError::call("KVM_SET_SREGS"))?;
            self.fd
                .set_regs(&boot.regs)
                .map_err(HypervisorError::call("KVM_SET_REGS"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[cfg(target_arch = "x86_64")]
mod tests {
    use super::*;

    #[test]
    fn lvt_mode_bits_are_replaced_only() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0] = 0x10u8 as std::os::raw::c_char; // vector bits
        regs[APIC_LVT0 + 1] = 0x05; // some previous mode
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT0] as u8, 0x10);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x07);
    }
}
