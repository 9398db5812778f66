//! The VMM thread's view of the VM: typed actions (from the API or the config file) applied to
//! one state machine — configure, start, pause, resume. Only this thread touches VM state.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use event_manager::SubscriberOps;

use crate::console::ConsoleInput;
use crate::hypervisor::Hypervisor;
use crate::logger::LoggerConfig;
use crate::resources::{BootSource, ConfigError, HostLimits, MachineConfig, VmResources};
use crate::vm::{EventLoop, Payload, RunOptions, RunReport, RunningVm};

/// A change to the machine configuration; absent fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineConfigUpdate {
    /// New vCPU count.
    pub vcpu_count: Option<u8>,
    /// New memory size in MiB.
    pub mem_size_mib: Option<u64>,
    /// New SMT setting.
    pub smt: Option<bool>,
    /// New dirty-page tracking setting.
    pub track_dirty_pages: Option<bool>,
    /// Virtio devices on PCI (a tern extension).
    pub pci: Option<bool>,
}

/// Logger settings from the API; absent fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoggerUpdate {
    /// Where log lines go.
    pub log_path: Option<PathBuf>,
    /// Level name (Firecracker's spelling).
    pub level: Option<String>,
    /// Prefix with the level.
    pub show_level: Option<bool>,
    /// Prefix with the source location.
    pub show_log_origin: Option<bool>,
}

/// What the VMM thread can be asked to do.
#[derive(Debug)]
pub enum VmmAction {
    /// Instance id, state and version.
    GetInstanceInfo,
    /// The whole configuration.
    GetVmConfig,
    /// vCPUs and memory.
    GetMachineConfig,
    /// Set the kernel (pre-boot).
    PutBootSource(BootSource),
    /// Replace the machine configuration (pre-boot).
    PutMachineConfig(MachineConfig),
    /// Change parts of the machine configuration (pre-boot).
    PatchMachineConfig(MachineConfigUpdate),
    /// Where the serial console writes (pre-boot).
    PutSerial(Option<PathBuf>),
    /// A custom CPU template (pre-boot).
    PutCpuConfig(crate::resources::CpuTemplate),
    /// Add the virtio-rng entropy device (pre-boot), optionally rate-limited.
    PutEntropy(Option<crate::resources::RateLimiterConfig>),
    /// The SMBIOS identity (pre-boot).
    PutSmbios(Box<crate::resources::SmbiosConfig>),
    /// Add or replace a drive (pre-boot).
    PutDrive(crate::resources::DriveConfig),
    /// Change a running VM's drive: backing file and/or rate limiter.
    PatchDrive {
        /// Which drive.
        drive_id: String,
        /// New backing file.
        path_on_host: Option<PathBuf>,
        /// New rate limiter.
        rate_limiter: Option<crate::resources::RateLimiterConfig>,
    },
    /// Add or replace a network interface (pre-boot).
    PutNet(crate::resources::NetConfig),
    /// Change a running VM's interface rate limiters.
    PatchNet {
        /// Which interface.
        iface_id: String,
        /// New receive limiter.
        rx: Option<crate::resources::RateLimiterConfig>,
        /// New transmit limiter.
        tx: Option<crate::resources::RateLimiterConfig>,
    },
    /// Set the vsock device (pre-boot).
    PutVsock(crate::resources::VsockConfig),
    /// Set the balloon device (pre-boot).
    PutBalloon(crate::resources::BalloonConfig),
    /// The balloon's configuration (and, once running, its actual size).
    GetBalloon,
    /// Change the balloon's target size (after boot).
    PatchBalloon(u32),
    /// The balloon's latest guest statistics.
    GetBalloonStats,
    /// Change the statistics interval (after boot; only if statistics were enabled).
    PatchBalloonStats(u16),
    /// Reconfigure logging.
    PutLogger(LoggerUpdate),
    /// Where metrics are written (a file or FIFO), once.
    PutMetrics(PathBuf),
    /// Write a metrics line now.
    FlushMetrics,
    /// Build and boot the VM.
    InstanceStart,
    /// Pause the vCPUs.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// Press Ctrl+Alt+Del on the guest's keyboard.
    SendCtrlAltDel,
    /// Write a snapshot of the paused VM.
    CreateSnapshot {
        /// `Full` or `Diff`.
        snapshot_type: String,
        /// The state file.
        snapshot_path: PathBuf,
        /// The memory file.
        mem_file_path: PathBuf,
    },
    /// Build the VM from a snapshot (instead of booting).
    LoadSnapshot {
        /// The state file.
        snapshot_path: PathBuf,
        /// The memory file (`File`), or the page-fault handler's socket (`Uffd`).
        mem_path: PathBuf,
        /// True for the `Uffd` back-end.
        uffd: bool,
        /// Run it at once; otherwise it stays paused.
        resume_vm: bool,
        /// Track dirty pages from here on (for diff snapshots of the restored VM).
        track_dirty_pages: bool,
    },
}

impl VmmAction {
    /// What the request is called, when it is only allowed before the VM starts.
    fn pre_boot_only(&self) -> Option<&'static str> {
        Some(match self {
            VmmAction::PutBootSource(_) => "PUT /boot-source",
            VmmAction::PutMachineConfig(_) => "PUT /machine-config",
            VmmAction::PatchMachineConfig(_) => "PATCH /machine-config",
            VmmAction::PutEntropy(_) => "PUT /entropy",
            VmmAction::PutSmbios(_) => "PUT /tern/v1/smbios",
            VmmAction::PutDrive(_) => "PUT /drives",
            VmmAction::PutNet(_) => "PUT /network-interfaces",
            VmmAction::PutVsock(_) => "PUT /vsock",
            VmmAction::PutBalloon(_) => "PUT /balloon",
            VmmAction::PutCpuConfig(_) => "PUT /cpu-config",
            VmmAction::PutSerial(_) => "PUT /serial",
            VmmAction::InstanceStart => "InstanceStart",
            VmmAction::LoadSnapshot { .. } => "loading a snapshot",
            _ => return None,
        })
    }
}

/// The host's limits for a machine configuration.
fn limits() -> HostLimits {
    HostLimits::probe(usize::from(crate::resources::MAX_VCPUS))
}

/// What an action returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmData {
    /// Nothing (HTTP 204).
    Empty,
    /// `GET /`.
    InstanceInfo {
        /// Instance id.
        id: String,
        /// "Not started", "Running" or "Paused" (Firecracker's words).
        state: &'static str,
        /// tern's version.
        vmm_version: &'static str,
    },
    /// `GET /vm/config`.
    VmConfig(Box<VmResources>),
    /// `GET /machine-config`.
    MachineConfig(MachineConfig),
    /// `GET /balloon`: configuration.
    Balloon(crate::resources::BalloonConfig),
    /// `GET /balloon/statistics`: Firecracker's statistics object.
    BalloonStats(BalloonStats),
}

/// The balloon's statistics in Firecracker's shape (absent tags are left out).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BalloonStats {
    /// Target size in pages and MiB.
    pub target_pages: u32,
    /// Actual size in pages.
    pub actual_pages: u32,
    /// (Firecracker name, value) of each tag the guest reported.
    pub tags: Vec<(&'static str, u64)>,
}

/// Why an action was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// The action does not fit the VM's state (e.g. configuring after start).
    #[error("{0}")]
    InvalidState(String),
    /// A value is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Starting the VM failed.
    #[error("cannot start the VM: {0}")]
    Start(crate::Error),
    /// Something failed inside tern.
    #[error("{0}")]
    Internal(String),
}

impl ActionError {
    /// True when the fault is the client's (HTTP 400) rather than tern's (HTTP 500).
    pub fn is_client_error(&self) -> bool {
        !matches!(self, ActionError::Internal(_))
    }
}

/// Opens the hypervisor when the VM starts (so that configuring needs no KVM access).
pub type HypervisorFactory = Box<dyn Fn() -> Result<Arc<dyn Hypervisor>, crate::Error> + Send>;

/// The VM's state and everything needed to change it.
pub struct Controller {
    id: String,
    start: Instant,
    resources: VmResources,
    logger: LoggerConfig,
    hypervisor: HypervisorFactory,
    console_input: Option<ConsoleInput>,
    vm: Option<RunningVm>,
    metrics_sink: Option<crate::sink::Sink>,
}

fn pre_boot(vm: &Option<RunningVm>, what: &str) -> Result<(), ActionError> {
    match vm {
        None => Ok(()),
        Some(_) => Err(ActionError::InvalidState(format!(
            "{what} is only allowed before the VM starts (InstanceStart was already done)"
        ))),
    }
}

impl Controller {
    /// A controller for a not-yet-started VM.
    pub fn new(
        id: String,
        start: Instant,
        resources: VmResources,
        logger: LoggerConfig,
        hypervisor: HypervisorFactory,
        console_input: ConsoleInput,
    ) -> Self {
        Self {
            id,
            start,
            resources,
            logger,
            hypervisor,
            console_input: Some(console_input),
            vm: None,
            metrics_sink: None,
        }
    }

    /// "Not started", "Running" or "Paused".
    pub fn state(&self) -> &'static str {
        match &self.vm {
            None => "Not started",
            Some(vm) if vm.is_paused() => "Paused",
            Some(_) => "Running",
        }
    }

    /// The running VM's report once it has stopped.
    pub fn finished(&self) -> Option<crate::Result<RunReport>> {
        self.vm.as_ref().and_then(|vm| vm.finished())
    }

    /// Applies `action`; `em` is the VMM thread's event loop (the VM registers on it at start).
    pub fn handle(
        &mut self,
        action: VmmAction,
        em: &mut EventLoop,
    ) -> Result<VmmData, ActionError> {
        if let Some(what) = action.pre_boot_only() {
            pre_boot(&self.vm, what)?;
        }
        match action {
            VmmAction::GetInstanceInfo => Ok(VmmData::InstanceInfo {
                id: self.id.clone(),
                state: self.state(),
                vmm_version: env!("CARGO_PKG_VERSION"),
            }),
            VmmAction::GetVmConfig => Ok(VmmData::VmConfig(Box::new(self.resources.clone()))),
            VmmAction::GetMachineConfig => Ok(VmmData::MachineConfig(
                self.resources.effective_machine_config(),
            )),
            a @ (VmmAction::PutBootSource(_)
            | VmmAction::PutMachineConfig(_)
            | VmmAction::PatchMachineConfig(_)
            | VmmAction::PutEntropy(_)
            | VmmAction::PutSmbios(_)
            | VmmAction::PutDrive(_)
            | VmmAction::PutNet(_)
            | VmmAction::PutVsock(_)
            | VmmAction::PutBalloon(_)
            | VmmAction::PutCpuConfig(_)
            | VmmAction::PutSerial(_)) => self.configure(a),
            a @ (VmmAction::PatchDrive { .. }
            | VmmAction::PatchNet { .. }
            | VmmAction::GetBalloon
            | VmmAction::PatchBalloon(_)
            | VmmAction::GetBalloonStats
            | VmmAction::PatchBalloonStats(_)) => self.update_running(a),
            a @ (VmmAction::PutLogger(_) | VmmAction::PutMetrics(_) | VmmAction::FlushMetrics) => {
                self.outputs(a)
            }
            a => self.lifecycle(a, em),
        }
    }

    /// The configuration of a VM not started yet (its `pre_boot` check is done).
    fn configure(&mut self, action: VmmAction) -> Result<VmmData, ActionError> {
        match action {
            VmmAction::PutBootSource(b) => {
                let mut candidate = self.resources.clone();
                candidate.boot_source = Some(b);
                candidate.validate_boot_source()?;
                self.resources = candidate;
                Ok(VmmData::Empty)
            }
            VmmAction::PutMachineConfig(m) => {
                m.validate(&limits())?;
                self.resources.machine_config = m;
                Ok(VmmData::Empty)
            }
            VmmAction::PatchMachineConfig(u) => {
                let mut m = self.resources.machine_config.clone();
                m.vcpu_count = u.vcpu_count.unwrap_or(m.vcpu_count);
                m.mem_size_mib = u.mem_size_mib.unwrap_or(m.mem_size_mib);
                m.smt = u.smt.unwrap_or(m.smt);
                m.track_dirty_pages = u.track_dirty_pages.unwrap_or(m.track_dirty_pages);
                m.pci = u.pci.or(m.pci);
                m.validate(&limits())?;
                self.resources.machine_config = m;
                Ok(VmmData::Empty)
            }
            VmmAction::PutEntropy(limiter) => {
                if let Some(l) = &limiter {
                    l.check("entropy.rate_limiter")
                        .map_err(|m| ConfigError::new("entropy.rate_limiter", m))?;
                }
                self.resources.entropy = true;
                self.resources.entropy_rate_limiter = limiter;
                Ok(VmmData::Empty)
            }
            VmmAction::PutSmbios(c) => {
                self.resources.put_smbios(*c)?;
                Ok(VmmData::Empty)
            }
            VmmAction::PutDrive(d) => {
                self.resources.put_drive(d)?;
                Ok(VmmData::Empty)
            }
            VmmAction::PutNet(n) => {
                self.resources.put_net(n)?;
                Ok(VmmData::Empty)
            }
            VmmAction::PutVsock(v) => {
                v.validate()?;
                self.resources.vsock = Some(v);
                Ok(VmmData::Empty)
            }
            VmmAction::PutBalloon(b) => {
                self.resources.balloon = Some(b);
                Ok(VmmData::Empty)
            }
            VmmAction::PutCpuConfig(t) => {
                self.resources.cpu_template = Some(t);
                Ok(VmmData::Empty)
            }
            VmmAction::PutSerial(path) => {
                self.resources.serial_out_path = path;
                Ok(VmmData::Empty)
            }
            other => Err(ActionError::Internal(format!(
                "{other:?} reached the wrong handler"
            ))),
        }
    }

    /// Changes to a running VM's devices, and what they report.
    fn update_running(&mut self, action: VmmAction) -> Result<VmmData, ActionError> {
        match action {
            VmmAction::PatchDrive {
                drive_id,
                path_on_host,
                rate_limiter,
            } => {
                let vm = self.vm.as_ref().ok_or_else(|| {
                    ActionError::InvalidState(
                        "PATCH /drives changes a running VM; before boot, PUT the drive again"
                            .into(),
                    )
                })?;
                if let Some(l) = &rate_limiter {
                    l.check("drive.rate_limiter")
                        .map_err(|m| ConfigError::new("drive.rate_limiter", m))?;
                }
                vm.devices()
                    .patch_drive(&drive_id, path_on_host.as_deref(), rate_limiter)
                    .map_err(|m| ConfigError::new(format!("drives[{drive_id}]"), m))?;
                if let Some(d) = self
                    .resources
                    .drives
                    .iter_mut()
                    .find(|d| d.drive_id == drive_id)
                {
                    if let Some(p) = path_on_host {
                        d.path_on_host = p;
                    }
                    if rate_limiter.is_some() {
                        d.rate_limiter = rate_limiter;
                    }
                }
                Ok(VmmData::Empty)
            }
            VmmAction::PatchNet { iface_id, rx, tx } => {
                let vm = self.vm.as_ref().ok_or_else(|| {
                    ActionError::InvalidState(
                        "PATCH /network-interfaces changes a running VM; before boot, PUT the interface again".into(),
                    )
                })?;
                for (name, l) in [("rx_rate_limiter", &rx), ("tx_rate_limiter", &tx)] {
                    if let Some(l) = l {
                        l.check(name).map_err(|m| ConfigError::new(name, m))?;
                    }
                }
                vm.devices()
                    .patch_net(&iface_id, rx, tx)
                    .map_err(|m| ConfigError::new(format!("network-interfaces[{iface_id}]"), m))?;
                if let Some(n) = self
                    .resources
                    .net
                    .iter_mut()
                    .find(|n| n.iface_id == iface_id)
                {
                    if rx.is_some() {
                        n.rx_rate_limiter = rx;
                    }
                    if tx.is_some() {
                        n.tx_rate_limiter = tx;
                    }
                }
                Ok(VmmData::Empty)
            }
            VmmAction::GetBalloon => match &self.resources.balloon {
                None => Err(ActionError::InvalidState(
                    "no balloon device is configured (PUT /balloon first)".into(),
                )),
                Some(b) => {
                    let mut b = b.clone();
                    if let Some(vm) = &self.vm {
                        if let Some(s) = vm.devices().balloon_stats() {
                            b.amount_mib = s.target_pages / 256;
                        }
                    }
                    Ok(VmmData::Balloon(b))
                }
            },
            VmmAction::PatchBalloon(mib) => {
                let vm = self.vm.as_ref().ok_or_else(|| {
                    ActionError::InvalidState(
                        "PATCH /balloon changes a running VM; before boot, PUT /balloon".into(),
                    )
                })?;
                if u64::from(mib) > self.resources.machine_config.mem_size_mib {
                    return Err(ConfigError::new(
                        "balloon.amount_mib",
                        format!(
                            "{mib} MiB is more than the guest's {} MiB",
                            self.resources.machine_config.mem_size_mib
                        ),
                    )
                    .into());
                }
                vm.devices()
                    .set_balloon_target(mib)
                    .map_err(ActionError::InvalidState)?;
                if let Some(b) = &mut self.resources.balloon {
                    b.amount_mib = mib;
                }
                Ok(VmmData::Empty)
            }
            VmmAction::GetBalloonStats => {
                let vm = self.vm.as_ref().ok_or_else(|| {
                    ActionError::InvalidState("the VM has not started: no statistics yet".into())
                })?;
                match (&self.resources.balloon, vm.devices().balloon_stats()) {
                    (Some(b), Some(s)) if b.stats_polling_interval_s > 0 => {
                        Ok(VmmData::BalloonStats(s))
                    }
                    (Some(_), _) => Err(ActionError::InvalidState(
                        "balloon statistics are off (stats_polling_interval_s is 0)".into(),
                    )),
                    (None, _) => Err(ActionError::InvalidState(
                        "no balloon device is configured".into(),
                    )),
                }
            }
            VmmAction::PatchBalloonStats(secs) => {
                let vm = self.vm.as_ref().ok_or_else(|| {
                    ActionError::InvalidState(
                        "PATCH /balloon/statistics changes a running VM; before boot, PUT /balloon"
                            .into(),
                    )
                })?;
                let b = self.resources.balloon.as_mut().ok_or_else(|| {
                    ActionError::InvalidState("no balloon device is configured".into())
                })?;
                if (b.stats_polling_interval_s == 0) != (secs == 0) {
                    return Err(ActionError::InvalidState(
                        "statistics can be retimed but not switched on or off after boot".into(),
                    ));
                }
                vm.devices()
                    .set_balloon_stats_interval(secs)
                    .map_err(ActionError::InvalidState)?;
                b.stats_polling_interval_s = secs;
                Ok(VmmData::Empty)
            }
            other => Err(ActionError::Internal(format!(
                "{other:?} reached the wrong handler"
            ))),
        }
    }

    /// Where logs and metrics go.
    fn outputs(&mut self, action: VmmAction) -> Result<VmmData, ActionError> {
        match action {
            VmmAction::PutLogger(u) => {
                let mut cfg = self.logger.clone();
                if let Some(l) = &u.level {
                    cfg.level = crate::logger::parse_level(l).ok_or_else(|| {
                        ConfigError::new("logger.level", format!("{l:?} is not a level (use Error, Warning, Info, Debug, Trace or Off)"))
                    })?;
                }
                cfg.show_level = u.show_level.unwrap_or(cfg.show_level);
                cfg.show_log_origin = u.show_log_origin.unwrap_or(cfg.show_log_origin);
                let sink = match &u.log_path {
                    Some(p) => Some(crate::sink::Sink::open(p, "log").map_err(|e| {
                        ConfigError::new("logger.log_path", format!("{}: {e}", p.display()))
                    })?),
                    None => None,
                };
                crate::logger::init(cfg.clone(), sink)
                    .map_err(|e| ActionError::Internal(format!("cannot start the logger: {e}")))?;
                self.logger = cfg;
                Ok(VmmData::Empty)
            }
            VmmAction::PutMetrics(path) => {
                if self.metrics_sink.is_some() {
                    return Err(ActionError::InvalidState(
                        "metrics are already configured (PUT /metrics works once)".into(),
                    ));
                }
                let f = crate::sink::Sink::open(&path, "metrics").map_err(|e| {
                    ConfigError::new("metrics.metrics_path", format!("{}: {e}", path.display()))
                })?;
                self.metrics_sink = Some(f);
                Ok(VmmData::Empty)
            }
            VmmAction::FlushMetrics => {
                if self.metrics_sink.is_none() {
                    return Err(ActionError::InvalidState(
                        "metrics are not configured: PUT /metrics with a metrics_path first".into(),
                    ));
                }
                self.flush_metrics();
                // The line is in the file when the client hears back, unless the reader is
                // stalled (then the answer waits at most FLUSH_WAIT).
                if let Some(f) = &self.metrics_sink {
                    f.drain(crate::sink::FLUSH_WAIT);
                }
                Ok(VmmData::Empty)
            }
            other => Err(ActionError::Internal(format!(
                "{other:?} reached the wrong handler"
            ))),
        }
    }

    /// Start, snapshot, restore, pause, resume and Ctrl+Alt+Del.
    fn lifecycle(&mut self, action: VmmAction, em: &mut EventLoop) -> Result<VmmData, ActionError> {
        match action {
            VmmAction::InstanceStart => {
                let t = Instant::now();
                self.resources.validate(&limits())?;
                let hv = (self.hypervisor)().map_err(ActionError::Start)?;
                let opts = RunOptions {
                    start: self.start,
                    console: None,
                    console_input: self.lend_console_input()?,
                };
                let vm = crate::vm::build(hv.as_ref(), &self.resources, Payload::Linux, opts)
                    .and_then(|built| built.start(em))
                    .map_err(ActionError::Start)?;
                self.console_input = None;
                metrics::METRICS
                    .latencies_us
                    .vm_start
                    .set(t.elapsed().as_micros() as u64);
                self.vm = Some(vm);
                Ok(VmmData::Empty)
            }
            VmmAction::CreateSnapshot {
                snapshot_type,
                snapshot_path,
                mem_file_path,
            } => {
                let kind: crate::snapshot::SnapshotType =
                    snapshot_type
                        .parse()
                        .map_err(|e: crate::snapshot::SnapshotError| {
                            ActionError::InvalidState(e.to_string())
                        })?;
                let Some(vm) = &self.vm else {
                    return Err(ActionError::InvalidState(
                        "cannot snapshot: the VM has not started".into(),
                    ));
                };
                let t = Instant::now();
                vm.snapshot(kind, &snapshot_path, &mem_file_path)
                    .map_err(|e| match e {
                        // Not paused, not tracking, or a path that cannot be written: the
                        // client's to fix.
                        crate::snapshot::SnapshotError::NotPaused
                        | crate::snapshot::SnapshotError::NotTracking
                        | crate::snapshot::SnapshotError::SamePath(_)
                        | crate::snapshot::SnapshotError::File(_)
                        | crate::snapshot::SnapshotError::Memory { .. } => {
                            ActionError::InvalidState(e.to_string())
                        }
                        other => ActionError::Internal(other.to_string()),
                    })?;
                let latencies = &metrics::METRICS.latencies_us;
                match kind {
                    crate::snapshot::SnapshotType::Full => &latencies.full_create_snapshot,
                    crate::snapshot::SnapshotType::Diff => &latencies.diff_create_snapshot,
                }
                .set(t.elapsed().as_micros() as u64);
                Ok(VmmData::Empty)
            }
            VmmAction::LoadSnapshot {
                snapshot_path,
                mem_path,
                uffd,
                resume_vm,
                track_dirty_pages,
            } => {
                let t = Instant::now();
                let state = crate::snapshot::load_state(&snapshot_path)
                    .and_then(|s| s.check().map(|()| s))
                    .map_err(|e| ActionError::InvalidState(e.to_string()))?;
                let mut res = state.resources(&self.resources);
                res.machine_config.track_dirty_pages = track_dirty_pages;
                let hv = (self.hypervisor)().map_err(ActionError::Start)?;
                let opts = RunOptions {
                    start: self.start,
                    console: None,
                    console_input: self.lend_console_input()?,
                };
                let memory = if uffd {
                    crate::vm::MemBackend::Uffd(&mem_path)
                } else {
                    crate::vm::MemBackend::File(&mem_path)
                };
                let payload = Payload::Snapshot {
                    state: &state,
                    memory,
                };
                let vm = crate::vm::build(hv.as_ref(), &res, payload, opts)
                    .and_then(|built| built.start_with(em, !resume_vm))
                    .map_err(ActionError::Start)?;
                self.console_input = None;
                metrics::METRICS
                    .latencies_us
                    .load_snapshot
                    .set(t.elapsed().as_micros() as u64);
                self.resources = res;
                self.vm = Some(vm);
                Ok(VmmData::Empty)
            }
            VmmAction::Pause => match &mut self.vm {
                None => Err(ActionError::InvalidState(
                    "cannot pause: the VM has not started".into(),
                )),
                Some(vm) => vm
                    .pause()
                    .map(|()| VmmData::Empty)
                    .map_err(|e| ActionError::Internal(e.to_string())),
            },
            VmmAction::SendCtrlAltDel => match &self.vm {
                None => Err(ActionError::InvalidState(
                    "cannot send Ctrl+Alt+Del: the VM has not started".into(),
                )),
                Some(vm) => vm
                    .ctrl_alt_del()
                    .map(|()| VmmData::Empty)
                    .map_err(ActionError::InvalidState),
            },
            VmmAction::Resume => match &mut self.vm {
                None => Err(ActionError::InvalidState(
                    "cannot resume: the VM has not started".into(),
                )),
                Some(vm) => {
                    vm.resume();
                    Ok(VmmData::Empty)
                }
            },
            other => Err(ActionError::Internal(format!(
                "{other:?} reached the wrong handler"
            ))),
        }
    }
}

/// One request for the VMM thread, with where to send the answer.
pub struct Request {
    /// What to do.
    pub action: VmmAction,
    /// Where the result goes.
    pub reply: std::sync::mpsc::Sender<Result<VmmData, ActionError>>,
}

/// The VMM thread's end of the request channel: requests, and an eventfd written after each.
pub struct RequestQueue {
    /// Incoming requests.
    pub rx: std::sync::mpsc::Receiver<Request>,
    /// Readable when requests are waiting.
    pub wake: vmm_sys_util::eventfd::EventFd,
}

/// Drains an eventfd so that the level-triggered loop can sleep again.
struct Wake(vmm_sys_util::eventfd::EventFd);

impl event_manager::MutEventSubscriber for Wake {
    fn init(&mut self, ops: &mut event_manager::EventOps) {
        if let Err(e) = ops.add(event_manager::Events::new(
            &self.0,
            vmm_sys_util::epoll::EventSet::IN,
        )) {
            log::error!("cannot watch the API request queue: {e:?}");
        }
    }

    fn process(&mut self, _: event_manager::Events, _: &mut event_manager::EventOps) {
        let _ = self.0.read();
    }
}

/// How often metrics are written when a sink is configured.
pub const METRICS_PERIOD: std::time::Duration = std::time::Duration::from_secs(60);

/// Fires every [`METRICS_PERIOD`]; the serve loop then writes a metrics line.
struct MetricsTimer {
    timer: vmm_sys_util::timerfd::TimerFd,
    due: Arc<std::sync::atomic::AtomicBool>,
}

impl event_manager::MutEventSubscriber for MetricsTimer {
    fn init(&mut self, ops: &mut event_manager::EventOps) {
        let armed = self.timer.reset(METRICS_PERIOD, Some(METRICS_PERIOD));
        if let Err(e) = armed.map_err(|e| format!("{e}")).and_then(|()| {
            ops.add(event_manager::Events::new(
                &self.timer,
                vmm_sys_util::epoll::EventSet::IN,
            ))
            .map_err(|e| format!("{e:?}"))
        }) {
            log::error!("periodic metrics disabled: {e}");
        }
    }

    fn process(&mut self, _: event_manager::Events, _: &mut event_manager::EventOps) {
        let _ = self.timer.wait();
        self.due.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Controller {
    /// The console input for a VM being built: a duplicate, so the original stays here for
    /// a later attempt if this one fails (the caller drops it once the VM runs).
    fn lend_console_input(&self) -> Result<ConsoleInput, ActionError> {
        match &self.console_input {
            None => Ok(ConsoleInput::None),
            Some(c) => c
                .try_clone()
                .map_err(|e| ActionError::Internal(format!("console input: {e}"))),
        }
    }

    /// Queues one metrics line for the configured sink; a line its full queue cannot take is
    /// counted in `logger.missed_metrics_count`. Never waits for the reader.
    fn flush_metrics(&mut self) {
        if let Some(f) = &self.metrics_sink {
            let mut line = metrics::METRICS.json_line();
            line.push('\n');
            if !f.push(line.as_bytes()) {
                metrics::METRICS.logger.missed_metrics_count.inc();
            }
        }
    }

    /// Applies `first` (if any; its failure ends serving), then serves requests until the VM,
    /// once started, stops; returns how it ended.
    pub fn serve(
        &mut self,
        queue: RequestQueue,
        first: Option<VmmAction>,
    ) -> Result<RunReport, ActionError> {
        let mut em =
            EventLoop::new().map_err(|e| ActionError::Internal(format!("event loop: {e:?}")))?;
        em.add_subscriber(Arc::new(std::sync::Mutex::new(Wake(queue.wake))));
        let metrics_due = Arc::new(std::sync::atomic::AtomicBool::new(false));
        match vmm_sys_util::timerfd::TimerFd::new() {
            Ok(timer) => {
                em.add_subscriber(Arc::new(std::sync::Mutex::new(MetricsTimer {
                    timer,
                    due: metrics_due.clone(),
                })));
            }
            Err(e) => log::error!("periodic metrics disabled: {e}"),
        }
        if let Some(action) = first {
            self.handle(action, &mut em)?;
        }
        loop {
            while let Ok(req) = queue.rx.try_recv() {
                let result = self.handle(req.action, &mut em);
                if let Err(e) = &result {
                    log::warn!("request refused: {e}");
                }
                // The client may have gone; its answer is then dropped.
                let _ = req.reply.send(result);
            }
            if metrics_due.swap(false, std::sync::atomic::Ordering::SeqCst) {
                self.flush_metrics();
            }
            if crate::vcpu_dump::take_request()
                && let Some(vm) = self.vm.as_mut()
            {
                vm.log_vcpus();
            }
            if let Some(report) = self.finished() {
                // A last line, so that the end of the run is in the metrics too.
                self.flush_metrics();
                if let Some(f) = &self.metrics_sink {
                    f.drain(crate::sink::FLUSH_WAIT);
                }
                return report.map_err(ActionError::Start);
            }
            em.run()
                .map_err(|e| ActionError::Internal(format!("event loop: {e:?}")))?;
        }
    }
}
