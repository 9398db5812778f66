//! ARM64: RAM from 2 GiB, the in-kernel GIC (v3, or v2), a PL011 UART as the console, a PL031
//! RTC, PSCI for CPU bring-up and power-off/reset, and a device tree instead of firmware
//! tables; with PCI a generic ECAM host and a GICv3 ITS for the functions' MSI-X. Layout:
//! `arch::aarch64::layout`.

use std::sync::{Arc, Mutex};

use arch::aarch64::fdt::{DeviceKind, FdtConfig, MmioDevice};
use arch::aarch64::layout::*;
use devices::Bus;
use devices::exit::ExitRequester;
use devices::interrupt::IrqLine;
use devices::legacy::pl011::Pl011;
use devices::legacy::rtc_pl031::RtcPl031;
use devices::legacy::serial::ConsoleOutput;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::VirtioSlot;
use crate::hypervisor::{Vcpu, Vm};
use crate::resources::VmResources;
use crate::vm::{Payload, insert};
use crate::{Error, Result};

pub use arch::aarch64::layout::{BOOT_TIMER_MAGIC, BOOT_TIMER_SIZE, BOOT_TIMER_START};

/// The console UART: a PL011 (`ttyAMA0`).
pub type Uart = Pl011;

/// Devices only this platform has (none beyond the common ones).
pub struct Extra;

impl Extra {
    /// Ctrl+Alt+Del goes to an x86 keyboard controller; ARM64 has none.
    pub fn ctrl_alt_del(&self) -> std::result::Result<(), String> {
        Err("SendCtrlAltDel needs the x86 i8042 keyboard controller; an ARM64 guest has none (shut it down from inside, or send a signal to tern)".into())
    }
}

/// An ARM64 guest finds SMBIOS tables through UEFI, which direct boot does not have: `cfg` is
/// checked as on x86, then refused.
pub fn check_smbios(
    cfg: &crate::resources::SmbiosConfig,
) -> std::result::Result<(), crate::resources::ConfigError> {
    use crate::resources::ConfigError;
    cfg.check()
        .map_err(|e| ConfigError::new(e.field(), e.to_string()))?;
    Err(ConfigError::new(
        "smbios",
        "an ARM64 guest finds SMBIOS tables through UEFI firmware, and a directly booted \
         one has none; leave smbios out on ARM64",
    ))
}

/// The RAM region of a guest with `bytes` of memory.
pub fn ram_regions(bytes: u64) -> Vec<(u64, u64)> {
    arch::aarch64::layout::ram_regions(bytes)
}

/// What [`setup_early`] made: the vCPUs (initialised, with their MPIDRs) and the GIC.
pub struct Early {
    vcpus: Vec<(u8, Box<dyn Vcpu>)>,
    mpidrs: Vec<u64>,
    gic: arch::aarch64::fdt::GicVersion,
}

/// The vCPUs and the GIC: KVM takes irqfds only once the GIC is initialised, and it
/// initialises only once every vCPU exists.
pub fn setup_early(vm: &dyn Vm, res: &VmResources) -> Result<Early> {
    let vcpu_count = res.machine_config.vcpu_count;
    let mut vcpus = Vec::with_capacity(usize::from(vcpu_count));
    let mut mpidrs = Vec::with_capacity(usize::from(vcpu_count));
    for index in 0..vcpu_count {
        let vcpu = vm.create_vcpu(index)?;
        mpidrs.push(vcpu.arm_mpidr()?);
        vcpus.push((index, vcpu));
    }
    let gic = vm.setup_arm_gic(u64::from(vcpu_count), res.pci())?;
    Ok(Early { vcpus, mpidrs, gic })
}

/// The PL011 and the PL031 on the MMIO bus. PSCI (in the kernel) powers off and resets.
pub fn legacy_devices(
    vm: &dyn Vm,
    _pio: &mut Bus,
    mmio: &mut Bus,
    _exit: Arc<dyn ExitRequester>,
    out: ConsoleOutput,
    input_room: EventFd,
    saved: Option<&devices::legacy::serial::UartState>,
) -> Result<(Arc<Mutex<Uart>>, Extra)> {
    let irq = IrqLine(vm.interrupt_line(UART_SPI)?);
    let uart = Arc::new(Mutex::new(match saved {
        None => Pl011::new(irq, out, Some(input_room)),
        Some(st) => Pl011::with_state(irq, out, Some(input_room), st)
            .map_err(|e| Error::Snapshot(format!("console UART: {e}")))?,
    }));
    insert(mmio, uart.clone(), UART_START, LEGACY_SIZE)?;
    insert(
        mmio,
        Arc::new(Mutex::new(RtcPl031::default())),
        RTC_START,
        LEGACY_SIZE,
    )?;
    Ok((uart, Extra))
}

/// Where tern places virtio-pci BARs: the 32-bit PCI window.
pub const PCI_BAR_WINDOW: (u64, u64) = (PCI_MMIO32_START, PCI_MMIO32_END);

/// The interrupt (SPI) of PCI slot `slot`'s INTA#, as the device tree's `interrupt-map`
/// routes it.
pub fn pci_intx(slot: u8) -> u32 {
    pci_intx_spi(slot)
}

/// The PCI host of a guest with `mem`: the ECAM and the 32-bit window below the GIC, the
/// 64-bit window above RAM (left out when it would not fit KVM's 40-bit address space).
fn pci_host(mem: &GuestMemoryMmap) -> arch::PciHost {
    let m64 = pci_mmio64_start(super::ram_end(mem));
    let mmio64 = if m64 + PCI_MMIO64_SIZE <= IPA_LIMIT {
        (m64, m64 + PCI_MMIO64_SIZE)
    } else {
        (0, 0)
    };
    arch::PciHost {
        ecam: PCI_ECAM_START,
        ecam_size: PCI_ECAM_SIZE,
        mmio32: (PCI_MMIO32_START, PCI_MMIO32_END),
        mmio64,
    }
}

/// Puts the PCI bus on the machine: its ECAM and the memory windows BARs may be placed in
/// (the device tree describes the same). MSIs go to the ITS, which KVM emulates.
pub fn attach_pci(
    _pio: &mut Bus,
    mmio: &mut Bus,
    bus: Arc<devices::pci::PciBus>,
    mem: &GuestMemoryMmap,
) -> Result<()> {
    super::attach_pci_windows(mmio, &bus, &pci_host(mem))
}

/// Virtio-mmio device `i`: a 4 KiB window from [`VIRTIO_MMIO_START`], SPIs from
/// [`VIRTIO_FIRST_SPI`].
pub fn virtio_slot(i: usize) -> VirtioSlot {
    VirtioSlot {
        base: VIRTIO_MMIO_START + i as u64 * devices::virtio::mmio::WINDOW_SIZE,
        len: devices::virtio::mmio::WINDOW_SIZE,
        irq: VIRTIO_FIRST_SPI + i as u32,
    }
}

/// Loads the kernel and initrd, writes the device tree and sets
/// the boot vCPU's entry registers.
pub fn boot(
    vm: &dyn Vm,
    mem: &GuestMemoryMmap,
    res: &VmResources,
    payload: Payload<'_>,
    virtio: &[VirtioSlot],
    early: Early,
) -> Result<Vec<(u8, Box<dyn Vcpu>)>> {
    match payload {
        Payload::Flat32 { .. } => {
            return Err(Error::Device(
                "flat 32-bit test payloads are x86 code; ARM64 boots Linux only".into(),
            ));
        }
        Payload::Snapshot { state, .. } => return restore(vm, state, early),
        Payload::Linux => {}
    }
    let vcpu_count = res.machine_config.vcpu_count;
    let Early {
        mut vcpus,
        mpidrs,
        gic,
    } = early;

    let boot_src = res.boot_source.as_ref().ok_or_else(|| {
        Error::Config(crate::resources::ConfigError::new("boot-source", "missing"))
    })?;
    let kernel = boot::aarch64::load_kernel(mem, &boot_src.kernel_image_path)?;
    let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    let fdt_addr = arch::aarch64::layout::fdt_addr(&regions)
        .ok_or_else(|| Error::Memory("too little RAM for the kernel and its device tree".into()))?;
    if kernel.end > fdt_addr {
        return Err(Error::Memory(format!(
            "the kernel needs {} MiB from the start of RAM, which leaves no room for the device tree; give the VM more memory (machine-config.mem_size_mib)",
            (kernel.end - DRAM_START).div_ceil(1 << 20)
        )));
    }
    let initrd = match &boot_src.initrd_path {
        Some(p) => Some(boot::aarch64::load_initrd(mem, p, &kernel, fdt_addr)?),
        None => None,
    };
    let mut devices = vec![
        MmioDevice {
            kind: DeviceKind::Uart,
            base: UART_START,
            len: LEGACY_SIZE,
            spi: UART_SPI,
        },
        MmioDevice {
            kind: DeviceKind::Rtc,
            base: RTC_START,
            len: LEGACY_SIZE,
            spi: RTC_SPI,
        },
    ];
    devices.extend(virtio.iter().map(|s| MmioDevice {
        kind: DeviceKind::Virtio,
        base: s.base,
        len: s.len,
        spi: s.irq,
    }));
    let cmdline = res.full_boot_args();
    let blob = arch::aarch64::fdt::create_fdt(&FdtConfig {
        mpidrs: &mpidrs,
        regions: &regions,
        cmdline: &cmdline,
        initrd: initrd.map(|r| (r.addr, r.size)),
        gic,
        devices: &devices,
        pci: res.pci().then(|| pci_host(mem)),
    })?;
    arch::aarch64::fdt::write_fdt(mem, fdt_addr, &blob)?;
    if let Some((_, boot_vcpu)) = vcpus.first_mut() {
        boot_vcpu.set_arm_regs(&arch::aarch64::regs::boot_regs(kernel.entry, fdt_addr))?;
    }
    log::info!(
        "booting {} (arm64 Image{}, {gic:?}) with {} vCPUs and {} MiB",
        boot_src.kernel_image_path.display(),
        if kernel.gzip { ", gzip" } else { "" },
        vcpu_count,
        res.machine_config.mem_size_mib
    );
    Ok(vcpus)
}

/// The vCPUs (created and initialised as for a boot, by [`setup_early`]) and the GIC as a
/// snapshot saved them: registers and MP state first, then the GIC, whose redistributors
/// belong to the vCPUs.
fn restore(
    vm: &dyn Vm,
    state: &crate::snapshot::VmState,
    early: Early,
) -> Result<Vec<(u8, Box<dyn Vcpu>)>> {
    let snap =
        |what: &str, e: crate::hypervisor::HypervisorError| Error::Snapshot(format!("{what}: {e}"));
    let want = match early.gic {
        arch::aarch64::fdt::GicVersion::V3 => 3,
        arch::aarch64::fdt::GicVersion::V2 => 2,
    };
    if state.gic.version != want {
        return Err(Error::Snapshot(format!(
            "the snapshot's VM had a GICv{}, this host gives a GICv{want}: restore it on a host like the one it was taken on",
            state.gic.version
        )));
    }
    let mut vcpus = early.vcpus;
    for ((index, vcpu), s) in vcpus.iter_mut().zip(&state.vcpus) {
        if early.mpidrs.get(usize::from(*index)) != Some(&s.mpidr) {
            return Err(Error::Snapshot(format!(
                "vCPU {index}: saved MPIDR {:#x}, this VM's is {:?}",
                s.mpidr,
                early.mpidrs.get(usize::from(*index))
            )));
        }
        vcpu.restore_arm_state(s)
            .map_err(|e| snap(&format!("vCPU {index}"), e))?;
    }
    vm.restore_arm_gic(&state.gic).map_err(|e| snap("GIC", e))?;
    log::info!(
        "restored {} vCPUs and a GICv{want}{} from the snapshot",
        vcpus.len(),
        if state.gic.its.is_some() {
            " with its ITS (registers, and its tables from guest memory)"
        } else {
            ""
        }
    );
    Ok(vcpus)
}
