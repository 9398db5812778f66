//! Building a VM from [`VmResources`] and running it to its end.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::exit::{ExitRequester, GuestExit};
use devices::legacy::boot_timer::BootTimer;
use devices::legacy::serial::ConsoleOutput;
use devices::{Bus, BusDevice};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::console::{ConsoleInput, RawTerminal, SerialInput};
use crate::device_manager::DeviceManager;
use crate::exit::{ExitChannel, VmStop};
use crate::hypervisor::{Hypervisor, Vm};
use crate::platform;
use crate::resources::{HostLimits, VmResources};
use crate::vcpu::{self, Buses};
use crate::{Error, Result};

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered off.
    PowerOff,
    /// The guest reset (reboot).
    Reset,
    /// The guest kernel panicked (and then reset, with `panic=N`).
    Panic,
}

/// Where the guest starts.
pub enum Payload<'a> {
    /// A Linux kernel from [`VmResources::boot_source`].
    Linux,
    /// Raw 32-bit code, loaded at `load_addr` and entered in flat protected mode (the PVH entry
    /// state, paging off). For small test payloads that exercise the vCPU loop and devices.
    Flat32 {
        /// The code.
        code: &'a [u8],
        /// Guest address to load and start at.
        load_addr: u64,
    },
    /// The VM a snapshot describes: memory from `memory`, vCPUs, interrupt controllers and
    /// devices from `state`.
    Snapshot {
        /// The state file's contents.
        state: &'a crate::snapshot::VmState,
        /// Where guest memory comes from.
        memory: MemBackend<'a>,
    },
}

/// Where a restored VM's memory comes from.
#[derive(Debug, Clone, Copy)]
pub enum MemBackend<'a> {
    /// The memory file, mapped privately.
    File(&'a std::path::Path),
    /// A page-fault handler listening on this Unix socket (userfaultfd).
    Uffd(&'a std::path::Path),
}

/// Options that are not part of the VM description.
pub struct RunOptions {
    /// When the process started (for the boot timer).
    pub start: Instant,
    /// Console output; `None` means the configured path or stdout.
    pub console: Option<Box<dyn Write + Send>>,
    /// Where the guest console's input comes from.
    pub console_input: ConsoleInput,
}

/// A built VM, vCPUs not yet started.
pub struct BuiltVm {
    machine: Machine,
    vcpus: Vec<(u8, Box<dyn crate::hypervisor::Vcpu>)>,
    buses: Buses,
    console_input: ConsoleInput,
    input_room: EventFd,
}

/// What a VM is made of, the same before and after its vCPU threads start ([`BuiltVm`],
/// [`RunningVm`]).
pub(crate) struct Machine {
    pub(crate) _vm: Arc<dyn Vm>,
    pub(crate) _mem: GuestMemoryMmap,
    pub(crate) exit: Arc<ExitChannel>,
    pub(crate) panicked: Arc<AtomicBool>,
    pub(crate) boot_timer: Option<Arc<Mutex<BootTimer>>>,
    pub(crate) extra: platform::Extra,
    pub(crate) devices: DeviceManager,
    pub(crate) serial: Arc<Mutex<platform::Uart>>,
    pub(crate) resources: VmResources,
    /// The userfaultfd of a VM restored with the Uffd back-end, and the connection to its
    /// page-fault handler (both kept open with the VM).
    pub(crate) _uffd: Option<(userfaultfd::Uffd, std::os::unix::net::UnixStream)>,
    /// Pages written since the last snapshot (devices' writes; KVM's are folded in when a
    /// snapshot is taken), when the VM tracks dirty pages.
    pub(crate) dirty: Option<Arc<devices::dirty::DirtyLog>>,
}

pub use crate::device_manager::{VirtioHandle, VirtioKind};

/// What a finished run reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunReport {
    /// How the VM ended.
    pub outcome: Outcome,
    /// Wall and CPU time from process start to the guest's boot-timer write, if it wrote.
    pub boot_time: Option<(std::time::Duration, std::time::Duration)>,
}

fn guest_memory(mem_mib: u64) -> Result<GuestMemoryMmap> {
    let bytes = mem_mib
        .checked_mul(1 << 20)
        .ok_or_else(|| Error::Memory(format!("{mem_mib} MiB overflows")))?;
    let regions: Vec<(GuestAddress, usize)> = platform::ram_regions(bytes)
        .into_iter()
        .map(|(start, size)| (GuestAddress(start), size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&regions)
        .map_err(|e| Error::Memory(format!("cannot map {mem_mib} MiB of guest memory: {e}")))
}

fn map_guest_memory(vm: &dyn Vm, mem: &GuestMemoryMmap, log_dirty: bool) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| Error::Memory(e.to_string()))?;
        // SAFETY: the region belongs to `mem`, which `BuiltVm` keeps alive as long as the VM.
        unsafe {
            vm.map_memory(
                slot as u32,
                region.start_addr().0,
                region.len(),
                host as u64,
                log_dirty,
            )
        }?;
    }
    Ok(())
}

/// Puts `dev` on `bus` at `base`.
pub(crate) fn insert(
    bus: &mut Bus,
    dev: Arc<Mutex<dyn BusDevice>>,
    base: u64,
    len: u64,
) -> Result<()> {
    bus.insert(dev, base, len)
        .map_err(|e| Error::Device(e.to_string()))
}

/// Builds the VM: memory, interrupt controllers, legacy devices, payload, platform tables and
/// vCPU state.
pub fn build(
    hv: &dyn Hypervisor,
    res: &VmResources,
    payload: Payload<'_>,
    opts: RunOptions,
) -> Result<BuiltVm> {
    match payload {
        Payload::Linux => res.validate(&HostLimits::probe(hv.max_vcpus()))?,
        Payload::Snapshot { .. } => res.validate_devices(&HostLimits::probe(hv.max_vcpus()))?,
        Payload::Flat32 { .. } => {}
    }
    let mut uffd = None;
    let (mem, saved) = match &payload {
        Payload::Snapshot { state, memory } => {
            let mem = match memory {
                MemBackend::File(path) => crate::snapshot::map_memory_file(state, path),
                MemBackend::Uffd(socket) => crate::snapshot::uffd_memory(state, socket).map(|u| {
                    uffd = Some((u.uffd, u.handler));
                    u.mem
                }),
            }
            .map_err(|e| Error::Snapshot(e.to_string()))?;
            (mem, Some(*state))
        }
        _ => (guest_memory(res.machine_config.mem_size_mib)?, None),
    };
    let vm = hv.create_vm()?;
    // Dirty-page tracking (for diff snapshots): KVM logs the guest's writes, the devices'
    // transports mark theirs. A booted VM is in no snapshot yet: every page starts dirty. A
    // restored one starts clean: its pages are those of the snapshot it came from.
    // SAFETY: sysconf with a constant name.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if res.machine_config.track_dirty_pages && page != devices::dirty::PAGE_SIZE as libc::c_long {
        return Err(Error::Config(crate::resources::ConfigError::new(
            "machine-config.track_dirty_pages",
            format!(
                "this host's pages are {page} bytes: dirty-page tracking works with 4 KiB pages (KVM logs one bit per host page)"
            ),
        )));
    }
    let dirty = res.machine_config.track_dirty_pages.then(|| {
        let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        let log = Arc::new(devices::dirty::DirtyLog::new(&regions));
        if saved.is_none() {
            log.mark_all();
        }
        log
    });
    map_guest_memory(vm.as_ref(), &mem, dirty.is_some())?;
    let early = platform::setup_early(vm.as_ref(), res)?;

    let exit = Arc::new(ExitChannel::new()?);
    let exit_dyn: Arc<dyn ExitRequester> = exit.clone();
    let panicked = Arc::new(AtomicBool::new(false));
    let out = match opts.console {
        Some(o) => o,
        None => crate::console::output(res.serial_out_path.as_deref()).map_err(|e| {
            Error::Config(crate::resources::ConfigError::new(
                "serial.serial_out_path",
                format!(
                    "{}: {e}",
                    res.serial_out_path
                        .as_deref()
                        .unwrap_or(std::path::Path::new("-"))
                        .display()
                ),
            ))
        })?,
    };
    let input_room = EventFd::new(libc::EFD_NONBLOCK)?;
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let (serial, extra) = platform::legacy_devices(
        vm.as_ref(),
        &mut pio,
        &mut mmio,
        exit_dyn,
        ConsoleOutput::new(out, panicked.clone()),
        input_room.try_clone()?,
        saved.map(|s| &s.uart),
    )?;
    let boot_timer = if res.boot_timer {
        let timer = Arc::new(Mutex::new(BootTimer::new(
            opts.start,
            platform::BOOT_TIMER_MAGIC,
        )));
        insert(
            &mut mmio,
            timer.clone(),
            platform::BOOT_TIMER_START,
            platform::BOOT_TIMER_SIZE,
        )?;
        Some(timer)
    } else {
        None
    };
    let devices = DeviceManager::build(
        vm.as_ref(),
        &mut pio,
        &mut mmio,
        &mem,
        dirty.clone(),
        res,
        saved.map(|s| s.virtio.as_slice()),
    )?;
    let buses = Buses {
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
    };
    let restoring = matches!(payload, Payload::Snapshot { .. });
    let vcpus = platform::boot(vm.as_ref(), &mem, res, payload, devices.slots(), early)?;
    if restoring {
        // vCPUs and interrupt controllers hold their saved state now.
        devices.raise_pending();
    }

    Ok(BuiltVm {
        machine: Machine {
            _vm: vm,
            _mem: mem,
            exit,
            panicked,
            boot_timer,
            extra,
            devices,
            serial,
            resources: res.clone(),
            _uffd: uffd,
            dirty,
        },
        vcpus,
        buses,
        console_input: opts.console_input,
        input_room,
    })
}

/// Wakes the event loop when a stop reason is posted.
struct ExitListener(Arc<ExitChannel>);

impl MutEventSubscriber for ExitListener {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0.evt, EventSet::IN)) {
            log::error!("cannot watch the VM stop event: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.evt.read();
    }
}

/// Watches the stop eventfd (level: the loop returns, and the caller reads the reason).
fn exit_listener(exit: Arc<ExitChannel>) -> Arc<Mutex<dyn MutEventSubscriber + Send>> {
    Arc::new(Mutex::new(ExitListener(exit)))
}

/// The event loop tern's VMM thread runs.
pub type EventLoop = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// A VM whose vCPUs are running.
pub struct RunningVm {
    pub(crate) machine: Machine,
    pub(crate) vcpus: Vec<vcpu::VcpuHandle>,
    _terminal: Option<RawTerminal>,
    pub(crate) paused: bool,
}

/// How long a pause may take before it is reported as failed.
pub const PAUSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl BuiltVm {
    /// Registers the VM's event sources on `em` and starts the vCPU threads (parked, when
    /// `paused`: a restored VM that is not to resume yet).
    pub fn start(self, em: &mut EventLoop) -> Result<RunningVm> {
        self.start_with(em, false)
    }

    /// [`BuiltVm::start`], with the vCPUs parked from the start when `paused`.
    pub fn start_with(self, em: &mut EventLoop, paused: bool) -> Result<RunningVm> {
        let mut terminal = None;
        let input = match self.console_input {
            ConsoleInput::None => None,
            ConsoleInput::File(f) => Some(f),
            ConsoleInput::TerminalStdin => {
                let t = RawTerminal::enter();
                let stdin = if t.active() {
                    SerialInput::stdin_file().ok()
                } else {
                    None
                };
                terminal = Some(t);
                stdin
            }
        };
        em.add_subscriber(exit_listener(self.machine.exit.clone()));
        em.add_subscriber(crate::vcpu_dump::subscriber());
        if let Some(source) = input {
            em.add_subscriber(Arc::new(Mutex::new(SerialInput::new(
                self.machine.serial.clone(),
                source,
                self.input_room,
            ))));
        }
        self.machine.devices.start_workers()?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for (index, vcpu) in self.vcpus {
            vcpus.push(vcpu::spawn(
                index,
                vcpu,
                self.buses.clone(),
                self.machine.exit.clone(),
                paused,
            )?);
        }
        self.machine.devices.set_paused(paused);
        Ok(RunningVm {
            machine: self.machine,
            vcpus,
            _terminal: terminal,
            paused,
        })
    }

    /// Starts the VM and runs an event loop until it stops (the `--no-api` path).
    pub fn run(self) -> Result<RunReport> {
        let mut em = EventLoop::new().map_err(|e| Error::EventLoop(format!("{e:?}")))?;
        let mut vm = self.start(&mut em)?;
        loop {
            if let Some(report) = vm.finished() {
                return report;
            }
            if crate::vcpu_dump::take_request() {
                vm.log_vcpus();
            }
            em.run().map_err(|e| Error::EventLoop(format!("{e:?}")))?;
        }
    }
}

impl RunningVm {
    /// The run's report once the VM has stopped; `None` while it runs.
    pub fn finished(&self) -> Option<Result<RunReport>> {
        let stop = self.machine.exit.reason()?;
        let _ = std::io::stdout().flush();
        let outcome = match stop {
            VmStop::Guest(_) if self.machine.panicked.load(Ordering::SeqCst) => Outcome::Panic,
            VmStop::Guest(GuestExit::PowerOff) => Outcome::PowerOff,
            VmStop::Guest(GuestExit::Reset) => Outcome::Reset,
            VmStop::VcpuFailed { index, reason } => {
                return Some(Err(Error::Vcpu { index, reason }));
            }
        };
        let boot_time = self
            .machine
            .boot_timer
            .as_ref()
            .and_then(|t| t.lock().unwrap_or_else(|p| p.into_inner()).last);
        Some(Ok(RunReport { outcome, boot_time }))
    }

    /// Stops all vCPUs where they are. Idempotent.
    pub fn pause(&mut self) -> Result<()> {
        if !self.paused {
            let t = std::time::Instant::now();
            self.machine.devices.set_paused(true);
            if let Err(e) = vcpu::pause_all(&self.vcpus, PAUSE_TIMEOUT) {
                // The vCPUs that did stop (or were asked to) run again: a pause that failed
                // leaves the VM running, not half parked.
                vcpu::resume_all(&self.vcpus);
                self.machine.devices.set_paused(false);
                return Err(Error::Pause(e.to_string()));
            }
            metrics::METRICS
                .latencies_us
                .pause_vm
                .set(t.elapsed().as_micros() as u64);
            self.paused = true;
        }
        Ok(())
    }

    /// Lets paused vCPUs run again. Idempotent.
    pub fn resume(&mut self) {
        if self.paused {
            let t = std::time::Instant::now();
            vcpu::resume_all(&self.vcpus);
            self.machine.devices.set_paused(false);
            metrics::METRICS
                .latencies_us
                .resume_vm
                .set(t.elapsed().as_micros() as u64);
            self.paused = false;
        }
    }

    /// Presses Ctrl+Alt+Del on the guest's keyboard (x86 only: an error elsewhere).
    pub fn ctrl_alt_del(&self) -> std::result::Result<(), String> {
        self.machine.extra.ctrl_alt_del()
    }

    /// The VM's devices (PATCH, balloon, lookup by id).
    pub fn devices(&self) -> &DeviceManager {
        &self.machine.devices
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }
}
