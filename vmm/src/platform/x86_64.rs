//! x86_64: a PC-like machine with the in-kernel LAPIC/IOAPIC/PIC and PIT, a 16550 on COM1, an
//! i8042 (for resets), CMOS, the ACPI PM registers, hardware-reduced ACPI tables, and PVH or
//! 64-bit Linux boot.

use std::sync::{Arc, Mutex};

use arch::x86_64::layout::*;
use devices::Bus;
use devices::exit::ExitRequester;
use devices::interrupt::IrqLine;
use devices::legacy::i8042::I8042;
use devices::legacy::serial::{ConsoleOutput, SerialDevice};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::VirtioSlot;
use crate::hypervisor::{Vcpu, Vm, X86BootState};
use crate::resources::VmResources;
use crate::vm::{Payload, insert};
use crate::{Error, Result};

pub use arch::x86_64::layout::{BOOT_TIMER_MAGIC, BOOT_TIMER_SIZE, BOOT_TIMER_START};

/// The console UART: a 16550 on COM1 (`ttyS0`).
pub type Uart = SerialDevice;

/// Devices only this platform has.
pub struct Extra {
    i8042: Arc<Mutex<I8042>>,
}

impl Extra {
    /// Presses Ctrl+Alt+Del on the guest's keyboard.
    pub fn ctrl_alt_del(&self) -> std::result::Result<(), String> {
        self.i8042
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ctrl_alt_del();
        Ok(())
    }
}

/// The RAM regions of a guest with `bytes` of memory (below and above the 32-bit MMIO hole).
pub fn ram_regions(bytes: u64) -> Vec<(u64, u64)> {
    arch::x86_64::memory::ram_regions(bytes)
}

/// Whether `cfg` can be written: every string, the UUID and the size (the F-segment).
pub fn check_smbios(
    cfg: &crate::resources::SmbiosConfig,
) -> std::result::Result<(), crate::resources::ConfigError> {
    arch::smbios::build(cfg, [0; 16], SMBIOS_START, arch::x86_64::SMBIOS_ROOM)
        .map(|_| ())
        .map_err(|e| crate::resources::ConfigError::new(e.field(), e.to_string()))
}

/// Nothing [`boot`] needs from [`setup_early`] on x86.
pub struct Early;

/// The in-kernel interrupt controllers and PIT, before any device needs an interrupt line.
pub fn setup_early(vm: &dyn Vm, _res: &VmResources) -> Result<Early> {
    vm.setup_x86_platform(KVM_TSS_ADDRESS)?;
    Ok(Early)
}

/// COM1, the i8042, CMOS and the ACPI PM registers on the port I/O bus.
pub fn legacy_devices(
    vm: &dyn Vm,
    pio: &mut Bus,
    _mmio: &mut Bus,
    exit: Arc<dyn ExitRequester>,
    out: ConsoleOutput,
    input_room: EventFd,
    saved: Option<&devices::legacy::serial::UartState>,
) -> Result<(Arc<Mutex<Uart>>, Extra)> {
    let irq = IrqLine(vm.interrupt_line(COM1_GSI)?);
    let uart = match saved {
        None => SerialDevice::new(irq, out, Some(input_room)),
        Some(st) => SerialDevice::with_state(irq, out, Some(input_room), st)
            .map_err(|e| Error::Snapshot(format!("console UART: {e}")))?,
    };
    let serial = Arc::new(Mutex::new(uart));
    insert(pio, serial.clone(), u64::from(COM1_PORT), 8)?;
    let i8042 = Arc::new(Mutex::new(I8042::new(
        exit.clone(),
        IrqLine(vm.interrupt_line(I8042_GSI)?),
    )));
    insert(pio, i8042.clone(), u64::from(I8042_PORT), 5)?;
    insert(
        pio,
        Arc::new(Mutex::new(devices::legacy::cmos::Cmos::default())),
        u64::from(CMOS_PORT),
        2,
    )?;
    insert(
        pio,
        Arc::new(Mutex::new(devices::acpi_pm::AcpiPm::new(
            exit,
            ACPI_S5_SLEEP_TYPE,
            ACPI_RESET_VALUE,
        ))),
        u64::from(ACPI_SLEEP_CONTROL_PORT),
        3,
    )?;
    Ok((serial, Extra { i8042 }))
}

/// Where tern places virtio-pci BARs: the 32-bit PCI window.
pub const PCI_BAR_WINDOW: (u64, u64) = (PCI_MMIO32_START, PCI_MMIO32_END);

/// The interrupt (GSI) of PCI slot `slot`'s INTA#, as the DSDT's `_PRT` routes it.
pub fn pci_intx(slot: u8) -> u32 {
    pci_intx_gsi(slot)
}

fn pci_host(mem: &GuestMemoryMmap) -> arch::PciHost {
    let m64 = pci_mmio64_start(super::ram_end(mem));
    arch::PciHost {
        ecam: PCI_ECAM_START,
        ecam_size: PCI_ECAM_SIZE,
        mmio32: (PCI_MMIO32_START, PCI_MMIO32_END),
        mmio64: (m64, m64 + PCI_MMIO64_SIZE),
    }
}

/// Puts the PCI bus on the machine: configuration mechanism #1 at 0xCF8, ECAM, and the two
/// memory windows BARs may be placed in (the ACPI tables describe the same).
pub fn attach_pci(
    pio: &mut Bus,
    mmio: &mut Bus,
    bus: Arc<devices::pci::PciBus>,
    mem: &GuestMemoryMmap,
) -> Result<()> {
    use devices::pci::access::{CONFIG_IO_LEN, CONFIG_IO_PORT, ConfigIo};
    insert(
        pio,
        Arc::new(Mutex::new(ConfigIo::new(bus.clone()))),
        CONFIG_IO_PORT,
        CONFIG_IO_LEN,
    )?;
    super::attach_pci_windows(mmio, &bus, &pci_host(mem))
}

/// Virtio-mmio device `i`: a 4 KiB window from 0xd000_0000, GSIs from 5.
pub fn virtio_slot(i: usize) -> VirtioSlot {
    VirtioSlot {
        base: VIRTIO_MMIO_START + i as u64 * devices::virtio::mmio::WINDOW_SIZE,
        len: devices::virtio::mmio::WINDOW_SIZE,
        irq: VIRTIO_FIRST_GSI + i as u32,
    }
}

/// Loads the payload, writes the ACPI tables and boot information, and creates the vCPUs
/// with CPUID, MSRs and (for the boot vCPU) the entry state.
pub fn boot(
    vm: &dyn Vm,
    mem: &GuestMemoryMmap,
    res: &VmResources,
    payload: Payload<'_>,
    virtio: &[VirtioSlot],
    _early: Early,
) -> Result<Vec<(u8, Box<dyn Vcpu>)>> {
    let vcpu_count = res.machine_config.vcpu_count;
    let boot_entry = match payload {
        Payload::Snapshot { state, .. } => return restore(vm, state),
        Payload::Linux => Some(load_linux(mem, res, vcpu_count, virtio)?),
        Payload::Flat32 { code, load_addr } => {
            use vm_memory::Bytes;
            mem.write_slice(code, GuestAddress(load_addr))
                .map_err(|e| Error::Memory(format!("test payload: {e}")))?;
            Some(arch::x86_64::regs::BootEntry::Pvh { entry: load_addr })
        }
    };

    let supported = vm.supported_cpuid()?;
    let mut msrs = arch::x86_64::msr::boot_msrs();
    if let Some(t) = &res.cpu_template {
        for (index, b) in &t.msrs {
            match msrs.iter_mut().find(|m| m.index == *index) {
                Some(m) => m.data = (m.data & !b.mask) | (b.value & b.mask),
                None => msrs.push(kvm_bindings::kvm_msr_entry {
                    index: *index,
                    data: b.value & b.mask,
                    ..Default::default()
                }),
            }
        }
    }
    let mut vcpus = Vec::with_capacity(usize::from(vcpu_count));
    for index in 0..vcpu_count {
        let mut vcpu = vm.create_vcpu(index)?;
        let mut cpuid = supported.clone();
        arch::x86_64::cpuid::normalize(&mut cpuid, index, vcpu_count);
        if let Some(t) = &res.cpu_template {
            arch::x86_64::cpuid::apply_modifiers(&mut cpuid, &t.cpuid).map_err(|e| {
                Error::Config(crate::resources::ConfigError::new(
                    "cpu-config.cpuid_modifiers",
                    e,
                ))
            })?;
        }
        if index > 0 {
            // Application processors wait for the boot vCPU's INIT/SIPI in the in-kernel LAPIC.
            vcpu.configure_x86(&cpuid, &msrs, None)?;
        } else if let Some(entry) = boot_entry {
            let setup = move |s: &mut kvm_bindings::kvm_sregs| {
                arch::x86_64::regs::setup_boot_sregs(mem, entry, s).map_err(|e| e.to_string())
            };
            let regs = arch::x86_64::regs::boot_regs(entry);
            vcpu.configure_x86(
                &cpuid,
                &msrs,
                Some(X86BootState {
                    regs,
                    sregs_setup: &setup,
                }),
            )?;
        }
        vcpus.push((index, vcpu));
    }
    Ok(vcpus)
}

/// The vCPUs and KVM's VM state as a snapshot saved them.
fn restore(vm: &dyn Vm, state: &crate::snapshot::VmState) -> Result<Vec<(u8, Box<dyn Vcpu>)>> {
    let snap =
        |what: &str, e: crate::hypervisor::HypervisorError| Error::Snapshot(format!("{what}: {e}"));
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for (i, s) in state.vcpus.iter().enumerate() {
        let index =
            u8::try_from(i).map_err(|_| Error::Snapshot(format!("{} vCPUs", state.vcpus.len())))?;
        let mut vcpu = vm.create_vcpu(index)?;
        vcpu.restore_x86_state(s)
            .map_err(|e| snap(&format!("vCPU {index}"), e))?;
        vcpus.push((index, vcpu));
    }
    vm.restore_x86_state(&state.vm)
        .map_err(|e| snap("interrupt controllers and clock", e))?;
    Ok(vcpus)
}

fn load_linux(
    mem: &GuestMemoryMmap,
    res: &VmResources,
    vcpu_count: u8,
    virtio: &[VirtioSlot],
) -> Result<arch::x86_64::regs::BootEntry> {
    let boot = res.boot_source.as_ref().ok_or_else(|| {
        Error::Config(crate::resources::ConfigError::new("boot-source", "missing"))
    })?;
    let kernel = boot::load_kernel(mem, &boot.kernel_image_path, boot.boot_protocol)?;
    let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    let initrd = match &boot.initrd_path {
        Some(p) => Some(boot::load_initrd(
            mem,
            p,
            &kernel,
            arch::x86_64::memory::low_ram_end(&regions),
        )?),
        None => None,
    };
    let cmdline_len = boot::load_cmdline_str(mem, &res.full_boot_args())?;
    let tables: Vec<arch::x86_64::acpi::MmioDevice> = virtio
        .iter()
        .map(|s| arch::x86_64::acpi::MmioDevice {
            base: s.base,
            len: s.len,
            gsi: s.irq,
        })
        .collect();
    let pci = res.pci().then(|| pci_host(mem));
    let rsdp = arch::x86_64::acpi::write_tables(mem, vcpu_count, &tables, pci.as_ref())?;
    let smbios = res.smbios.clone().unwrap_or_default();
    let mut uuid = [0u8; 16];
    if smbios.uuid.is_none() {
        // A random (version 4) UUID per VM, as a VM manager would give it.
        devices::os::fill_random(&mut uuid)
            .map_err(|e| Error::Device(format!("random bytes for the SMBIOS UUID: {e}")))?;
        uuid[6] = (uuid[6] & 0x0f) | 0x40;
        uuid[8] = (uuid[8] & 0x3f) | 0x80;
    }
    arch::x86_64::write_smbios(mem, &smbios, uuid)?;
    let e820 = arch::x86_64::memory::e820_map(&regions);
    boot::write_boot_info(mem, &kernel, cmdline_len, initrd, &e820, rsdp)?;
    log::info!(
        "booting {} ({:?}, {:?}) with {} vCPUs and {} MiB",
        boot.kernel_image_path.display(),
        kernel.format,
        kernel.entry,
        vcpu_count,
        res.machine_config.mem_size_mib
    );
    Ok(kernel.entry)
}
