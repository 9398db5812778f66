//! JSON bodies in Firecracker's shapes. Unknown fields are refused, as Firecracker does.

use serde::{Deserialize, Serialize};

/// `boot-source` / `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Host path of the kernel (ELF vmlinux or bzImage).
    pub kernel_image_path: String,
    /// Host path of an initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// tern extension: "auto" (PVH when the kernel has a PVH note), "pvh" or "linux".
    #[serde(default)]
    pub boot_protocol: Option<BootProtocol>,
}

/// tern extension: which kernel entry point to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BootProtocol {
    /// PVH if available, else the Linux boot protocol.
    Auto,
    /// PVH entry.
    Pvh,
    /// 64-bit Linux boot protocol.
    Linux,
}

/// Firecracker's `huge_pages` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum HugePages {
    /// Normal pages.
    None,
    /// 2 MiB huge pages.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// `machine-config` / `PUT /machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs.
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Two threads per core.
    #[serde(default)]
    pub smt: bool,
    /// Dirty-page tracking.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Huge pages backing guest memory.
    #[serde(default)]
    pub huge_pages: Option<HugePages>,
    /// Firecracker's deprecated static CPU template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Virtio devices on PCI rather than virtio-mmio (a tern extension; absent: the
    /// `--enable-pci` flag decides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci: Option<bool>,
}

/// `logger` / `PUT /logger`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// Where log lines go (a file or FIFO); stderr when absent.
    #[serde(default)]
    pub log_path: Option<String>,
    /// "Error", "Warning", "Info", "Debug", "Trace" or "Off".
    #[serde(default)]
    pub level: Option<String>,
    /// Prefix lines with the level.
    #[serde(default)]
    pub show_level: Option<bool>,
    /// Prefix lines with the source location.
    #[serde(default)]
    pub show_log_origin: Option<bool>,
    /// Only log this module.
    #[serde(default)]
    pub module: Option<String>,
}

/// `metrics` / `PUT /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// File or FIFO that receives one JSON line per flush.
    pub metrics_path: String,
}

/// `serial` / `PUT /serial`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Serial {
    /// File the guest's serial output is written to (stdout when absent).
    #[serde(default)]
    pub serial_out_path: Option<String>,
}

/// A Firecracker `--config-file` document.
///
/// Device sections are accepted as raw JSON here and refused with a message by
/// [`crate::config`] until their devices exist, so an empty `"drives": []` still works.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel and arguments.
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    /// vCPUs and memory.
    #[serde(rename = "machine-config", default)]
    pub machine_config: Option<MachineConfig>,
    /// Logging.
    #[serde(default)]
    pub logger: Option<Logger>,
    /// Serial console output.
    #[serde(default)]
    pub serial: Option<Serial>,
    /// Block devices.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// Network interfaces.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// vsock device.
    #[serde(default)]
    pub vsock: Option<Vsock>,
    /// Balloon device.
    #[serde(default)]
    pub balloon: Option<Balloon>,
    /// Entropy device.
    #[serde(default)]
    pub entropy: Option<Entropy>,
    /// The SMBIOS identity (a tern extension; `PUT /tern/v1/smbios`).
    #[serde(default)]
    pub smbios: Option<vmm::resources::SmbiosConfig>,
    /// Metrics sink.
    #[serde(default)]
    pub metrics: Option<serde_json::Value>,
    /// MMDS configuration.
    #[serde(rename = "mmds-config", default)]
    pub mmds_config: Option<serde_json::Value>,
    /// Custom CPU template.
    #[serde(rename = "cpu-config", default)]
    pub cpu_config: Option<CpuConfig>,
    /// Persistent memory devices.
    #[serde(default)]
    pub pmem: Option<serde_json::Value>,
    /// Memory hotplug.
    #[serde(rename = "memory-hotplug", default)]
    pub memory_hotplug: Option<serde_json::Value>,
}

/// `PATCH /machine-config`: every field optional.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigPatch {
    /// New vCPU count.
    #[serde(default)]
    pub vcpu_count: Option<u8>,
    /// New memory size.
    #[serde(default)]
    pub mem_size_mib: Option<u64>,
    /// New SMT setting.
    #[serde(default)]
    pub smt: Option<bool>,
    /// New dirty tracking setting.
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    /// Huge pages.
    #[serde(default)]
    pub huge_pages: Option<HugePages>,
    /// Static CPU template.
    #[serde(default)]
    pub cpu_template: Option<String>,
    /// Virtio devices on PCI (a tern extension).
    #[serde(default)]
    pub pci: Option<bool>,
}

/// `PUT /actions`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// What to do.
    pub action_type: ActionType,
}

/// Firecracker's instance actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum ActionType {
    /// Boot the VM.
    InstanceStart,
    /// Press Ctrl+Alt+Del on the guest's keyboard.
    SendCtrlAltDel,
    /// Write the metrics now.
    FlushMetrics,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// The wanted state.
    pub state: VmStateValue,
}

/// `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// `Full` or `Diff` (default `Full`).
    #[serde(default = "full")]
    pub snapshot_type: String,
    /// Where the state file goes.
    pub snapshot_path: String,
    /// Where guest memory goes.
    pub mem_file_path: String,
    /// Firecracker's (removed) target version field: accepted and ignored.
    #[serde(default)]
    pub version: Option<String>,
}

fn full() -> String {
    "Full".into()
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    /// `File` or `Uffd`.
    pub backend_type: String,
    /// The memory file (File) or the page-fault handler's socket (Uffd).
    pub backend_path: String,
}

/// `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// The state file.
    pub snapshot_path: String,
    /// Where guest memory comes from.
    #[serde(default)]
    pub mem_backend: Option<MemBackend>,
    /// The older way to name the memory file.
    #[serde(default)]
    pub mem_file_path: Option<String>,
    /// Track dirty pages for a later diff snapshot.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Firecracker's older name for it.
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    /// Resume the VM once loaded.
    #[serde(default)]
    pub resume_vm: bool,
}

impl SnapshotLoadParams {
    /// Where memory comes from, checked: exactly one of `mem_backend` and `mem_file_path`.
    /// The path, and true for the `Uffd` back-end (the handler's socket).
    pub fn mem_source(&self) -> Result<(String, bool), FieldError> {
        match (&self.mem_backend, &self.mem_file_path) {
            (Some(_), Some(_)) => Err((
                "snapshot-load.mem_backend".into(),
                "give mem_backend or mem_file_path, not both".into(),
            )),
            (None, None) => Err((
                "snapshot-load.mem_backend".into(),
                "missing: say where guest memory comes from".into(),
            )),
            (None, Some(p)) => Ok((p.clone(), false)),
            (Some(b), None) => match b.backend_type.as_str() {
                "File" => Ok((b.backend_path.clone(), false)),
                "Uffd" => Ok((b.backend_path.clone(), true)),
                other => Err((
                    "snapshot-load.mem_backend.backend_type".into(),
                    format!("{other:?} is not File or Uffd"),
                )),
            },
        }
    }
}

/// The states a client may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum VmStateValue {
    /// Stop the vCPUs.
    Paused,
    /// Run them again.
    Resumed,
}

/// Problems mapping a model onto tern's configuration: (field, message).
pub type FieldError = (String, String);

impl BootSource {
    /// The VMM's view.
    pub fn into_vmm(self) -> vmm::resources::BootSource {
        vmm::resources::BootSource {
            kernel_image_path: self.kernel_image_path.into(),
            initrd_path: self.initrd_path.map(Into::into),
            boot_args: self.boot_args,
            boot_protocol: match self.boot_protocol {
                None | Some(BootProtocol::Auto) => vmm::resources::BootProtocol::Auto,
                Some(BootProtocol::Pvh) => vmm::resources::BootProtocol::Pvh,
                Some(BootProtocol::Linux) => vmm::resources::BootProtocol::Linux,
            },
        }
    }

    /// The JSON view of the VMM's boot source.
    pub fn from_vmm(b: &vmm::resources::BootSource) -> Self {
        Self {
            kernel_image_path: b.kernel_image_path.display().to_string(),
            initrd_path: b.initrd_path.as_ref().map(|p| p.display().to_string()),
            boot_args: b.boot_args.clone(),
            boot_protocol: Some(match b.boot_protocol {
                vmm::resources::BootProtocol::Auto => BootProtocol::Auto,
                vmm::resources::BootProtocol::Pvh => BootProtocol::Pvh,
                vmm::resources::BootProtocol::Linux => BootProtocol::Linux,
            }),
        }
    }
}

/// Refuses the Firecracker machine-config fields tern does not support yet.
fn check_unsupported(
    huge_pages: Option<HugePages>,
    cpu_template: Option<&str>,
) -> Result<(), FieldError> {
    if huge_pages == Some(HugePages::Hugetlbfs2M) {
        return Err((
            "machine-config.huge_pages".into(),
            "\"2M\" is not supported yet (use \"None\")".into(),
        ));
    }
    if cpu_template.is_some_and(|t| t != "None") {
        return Err((
            "machine-config.cpu_template".into(),
            "static CPU templates are not supported (omit it or use \"None\")".into(),
        ));
    }
    Ok(())
}

impl MachineConfig {
    /// The VMM's view, refusing what tern does not support.
    pub fn into_vmm(self) -> Result<vmm::resources::MachineConfig, FieldError> {
        check_unsupported(self.huge_pages, self.cpu_template.as_deref())?;
        Ok(vmm::resources::MachineConfig {
            vcpu_count: self.vcpu_count,
            mem_size_mib: self.mem_size_mib,
            smt: self.smt,
            track_dirty_pages: self.track_dirty_pages,
            pci: self.pci,
        })
    }

    /// The JSON view of the VMM's machine configuration.
    pub fn from_vmm(m: &vmm::resources::MachineConfig) -> Self {
        Self {
            vcpu_count: m.vcpu_count,
            mem_size_mib: m.mem_size_mib,
            smt: m.smt,
            track_dirty_pages: m.track_dirty_pages,
            huge_pages: Some(HugePages::None),
            cpu_template: None,
            pci: m.pci,
        }
    }
}

impl MachineConfigPatch {
    /// The VMM's view, refusing what tern does not support.
    pub fn into_vmm(self) -> Result<vmm::controller::MachineConfigUpdate, FieldError> {
        check_unsupported(self.huge_pages, self.cpu_template.as_deref())?;
        Ok(vmm::controller::MachineConfigUpdate {
            vcpu_count: self.vcpu_count,
            mem_size_mib: self.mem_size_mib,
            smt: self.smt,
            track_dirty_pages: self.track_dirty_pages,
            pci: self.pci,
        })
    }
}

/// `cpu-config` / `PUT /cpu-config`: Firecracker's custom CPU template (x86 fields).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CpuConfig {
    /// KVM capabilities to require or refuse (`"!56"`); tern accepts only an empty list.
    #[serde(default)]
    pub kvm_capabilities: Vec<String>,
    /// CPUID changes.
    #[serde(default)]
    pub cpuid_modifiers: Vec<CpuidLeafModifier>,
    /// MSR changes.
    #[serde(default)]
    pub msr_modifiers: Vec<MsrModifier>,
}

/// One CPUID leaf/subleaf's changes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidLeafModifier {
    /// Leaf, as `"0x1"` or decimal.
    pub leaf: String,
    /// Subleaf, as `"0x0"` or decimal.
    pub subleaf: String,
    /// KVM's CPUID entry flags (informational).
    #[serde(default)]
    pub flags: u32,
    /// Register bitmaps.
    pub modifiers: Vec<CpuidRegisterModifier>,
}

/// One register's bitmap.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidRegisterModifier {
    /// `eax`, `ebx`, `ecx` or `edx`.
    pub register: String,
    /// `0b` + up to 32 of `0`, `1`, `x`.
    pub bitmap: String,
}

/// One MSR's bitmap.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MsrModifier {
    /// MSR index, as `"0x10a"` or decimal.
    pub addr: String,
    /// `0b` + up to 64 of `0`, `1`, `x`.
    pub bitmap: String,
}

#[cfg(target_arch = "x86_64")]
fn number(field: &str, s: &str) -> Result<u32, FieldError> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| {
        (
            field.to_string(),
            format!("{s:?} is not a number (use 0x.. or decimal)"),
        )
    })
}

impl CpuConfig {
    /// The VMM's view, with every number and bitmap checked.
    #[cfg(target_arch = "aarch64")]
    pub fn into_vmm(self) -> Result<vmm::resources::CpuTemplate, FieldError> {
        for (name, empty) in [
            ("kvm_capabilities", self.kvm_capabilities.is_empty()),
            ("cpuid_modifiers", self.cpuid_modifiers.is_empty()),
            ("msr_modifiers", self.msr_modifiers.is_empty()),
        ] {
            if !empty {
                return Err((
                    format!("cpu-config.{name}"),
                    "is not supported on ARM64 (CPUID and MSRs are x86; leave it empty)".into(),
                ));
            }
        }
        Ok(vmm::resources::CpuTemplate::default())
    }

    /// The VMM's view, with every number and bitmap checked.
    #[cfg(target_arch = "x86_64")]
    pub fn into_vmm(self) -> Result<vmm::resources::CpuTemplate, FieldError> {
        use arch::x86_64::cpuid::{BitModifier, CpuidModifier, CpuidReg, parse_bitmap};
        if !self.kvm_capabilities.is_empty() {
            return Err((
                "cpu-config.kvm_capabilities".into(),
                "is not supported yet (leave it empty)".into(),
            ));
        }
        let mut t = vmm::resources::CpuTemplate::default();
        for (i, m) in self.cpuid_modifiers.into_iter().enumerate() {
            let f = |k: &str| format!("cpu-config.cpuid_modifiers[{i}].{k}");
            let mut registers = Vec::new();
            for (j, r) in m.modifiers.into_iter().enumerate() {
                let reg = match r.register.to_ascii_lowercase().as_str() {
                    "eax" => CpuidReg::Eax,
                    "ebx" => CpuidReg::Ebx,
                    "ecx" => CpuidReg::Ecx,
                    "edx" => CpuidReg::Edx,
                    other => {
                        return Err((
                            f(&format!("modifiers[{j}].register")),
                            format!("{other:?} is not eax, ebx, ecx or edx"),
                        ));
                    }
                };
                let b = parse_bitmap(&r.bitmap, 32)
                    .map_err(|e| (f(&format!("modifiers[{j}].bitmap")), e))?;
                registers.push((
                    reg,
                    BitModifier {
                        mask: b.mask as u32,
                        value: b.value as u32,
                    },
                ));
            }
            t.cpuid.push(CpuidModifier {
                leaf: number(&f("leaf"), &m.leaf)?,
                subleaf: number(&f("subleaf"), &m.subleaf)?,
                registers,
            });
        }
        for (i, m) in self.msr_modifiers.into_iter().enumerate() {
            let f = |k: &str| format!("cpu-config.msr_modifiers[{i}].{k}");
            let b = parse_bitmap(&m.bitmap, 64).map_err(|e| (f("bitmap"), e))?;
            t.msrs.push((number(&f("addr"), &m.addr)?, b));
        }
        Ok(t)
    }
}

/// `entropy` / `PUT /entropy`: the virtio-rng device.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Entropy {
    /// Firecracker's token-bucket rate limiter.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

impl Entropy {
    /// Checks the limiter's values.
    pub fn check(&self) -> Result<(), FieldError> {
        if let Some(r) = &self.rate_limiter {
            r.check("entropy.rate_limiter")
                .map_err(|m| ("entropy.rate_limiter".to_string(), m))?;
        }
        Ok(())
    }
}

pub use vmm::resources::RateLimiterConfig;

/// Firecracker's `cache_type` of a drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum CacheType {
    /// Firecracker: flushes are not passed on. tern passes them on (fdatasync) either way.
    Unsafe,
    /// Flushes reach the disk.
    Writeback,
}

/// Firecracker's `io_engine` of a drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum IoEngine {
    /// Synchronous I/O.
    Sync,
    /// io_uring.
    Async,
}

/// `drives[]` / `PUT /drives/{drive_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// Unique id.
    pub drive_id: String,
    /// Host path of the raw image.
    pub path_on_host: String,
    /// The guest's root device.
    pub is_root_device: bool,
    /// The guest may not write.
    #[serde(default)]
    pub is_read_only: bool,
    /// Root by partition UUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Cache mode (accepted; flushes always reach the disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    /// I/O engine: `Sync` (pread/pwrite) or `Async` (io_uring); each drive has its own worker
    /// thread either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
    /// Rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// Request queues (a tern extension; Firecracker's drives have one). 1 by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
    /// vhost-user-blk socket (not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

impl Drive {
    /// The VMM's drive description.
    pub fn into_vmm(self) -> Result<vmm::resources::DriveConfig, FieldError> {
        if self.socket.is_some() {
            return Err((
                format!("drives[{}].socket", self.drive_id),
                "vhost-user drives are not supported: give path_on_host".into(),
            ));
        }
        Ok(vmm::resources::DriveConfig {
            drive_id: self.drive_id,
            path_on_host: self.path_on_host.into(),
            is_root_device: self.is_root_device,
            is_read_only: self.is_read_only,
            partuuid: self.partuuid,
            rate_limiter: self.rate_limiter,
            io_engine: match self.io_engine {
                Some(IoEngine::Async) => vmm::resources::IoEngineKind::Uring,
                _ => vmm::resources::IoEngineKind::Sync,
            },
            num_queues: self.num_queues.unwrap_or(1),
        })
    }

    /// The API shape of a drive.
    pub fn from_vmm(d: &vmm::resources::DriveConfig) -> Self {
        Self {
            drive_id: d.drive_id.clone(),
            path_on_host: d.path_on_host.display().to_string(),
            is_root_device: d.is_root_device,
            is_read_only: d.is_read_only,
            partuuid: d.partuuid.clone(),
            cache_type: None,
            io_engine: Some(match d.io_engine {
                vmm::resources::IoEngineKind::Uring => IoEngine::Async,
                vmm::resources::IoEngineKind::Sync => IoEngine::Sync,
            }),
            rate_limiter: d.rate_limiter,
            num_queues: (d.num_queues != 1).then_some(d.num_queues),
            socket: None,
        }
    }
}

/// `PATCH /drives/{drive_id}`: a new backing file or rate limiter for a running VM.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// Which drive.
    pub drive_id: String,
    /// New backing file.
    #[serde(default)]
    pub path_on_host: Option<String>,
    /// New rate limiter.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// `network-interfaces[]` / `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// Unique id.
    pub iface_id: String,
    /// The host TAP device.
    pub host_dev_name: String,
    /// The guest's MAC, "aa:bb:cc:dd:ee:ff".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Limits traffic to the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits traffic from the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
    /// Queue pairs (a tern extension; Firecracker's interfaces have one). 1 by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queue_pairs: Option<u16>,
}

/// Parses "aa:bb:cc:dd:ee:ff".
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Formats a MAC address.
pub fn format_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

impl NetworkInterface {
    /// The VMM's interface description.
    pub fn into_vmm(self) -> Result<vmm::resources::NetConfig, FieldError> {
        let guest_mac = match &self.guest_mac {
            None => None,
            Some(m) => Some(parse_mac(m).ok_or_else(|| {
                (
                    format!("network-interfaces[{}].guest_mac", self.iface_id),
                    format!("{m:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"),
                )
            })?),
        };
        Ok(vmm::resources::NetConfig {
            iface_id: self.iface_id,
            host_dev_name: self.host_dev_name,
            guest_mac,
            rx_rate_limiter: self.rx_rate_limiter,
            tx_rate_limiter: self.tx_rate_limiter,
            num_queue_pairs: self.num_queue_pairs.unwrap_or(1),
        })
    }

    /// The API shape.
    pub fn from_vmm(n: &vmm::resources::NetConfig) -> Self {
        Self {
            iface_id: n.iface_id.clone(),
            host_dev_name: n.host_dev_name.clone(),
            guest_mac: n.guest_mac.as_ref().map(format_mac),
            rx_rate_limiter: n.rx_rate_limiter,
            tx_rate_limiter: n.tx_rate_limiter,
            num_queue_pairs: (n.num_queue_pairs != 1).then_some(n.num_queue_pairs),
        }
    }
}

/// `PATCH /network-interfaces/{iface_id}`: new rate limiters.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    /// Which interface.
    pub iface_id: String,
    /// New receive limiter.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// New transmit limiter.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// `vsock` / `PUT /vsock`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// Deprecated in Firecracker; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    /// The guest's CID.
    pub guest_cid: u32,
    /// The host Unix socket.
    pub uds_path: String,
}

impl Vsock {
    /// The VMM's description.
    pub fn into_vmm(self) -> vmm::resources::VsockConfig {
        vmm::resources::VsockConfig {
            guest_cid: self.guest_cid,
            uds_path: self.uds_path.into(),
        }
    }
}

/// `balloon` / `PUT /balloon`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    /// Target size in MiB.
    pub amount_mib: u32,
    /// Deflate when the guest runs out of memory.
    pub deflate_on_oom: bool,
    /// Statistics interval in seconds (0: off).
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Free page hinting (not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_page_hinting: Option<bool>,
    /// Free page reporting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_page_reporting: Option<bool>,
}

impl Balloon {
    /// The VMM's description.
    pub fn into_vmm(self) -> Result<vmm::resources::BalloonConfig, FieldError> {
        if self.free_page_hinting == Some(true) {
            return Err((
                "balloon.free_page_hinting".into(),
                "is not supported: use free_page_reporting".into(),
            ));
        }
        Ok(vmm::resources::BalloonConfig {
            amount_mib: self.amount_mib,
            deflate_on_oom: self.deflate_on_oom,
            stats_polling_interval_s: self.stats_polling_interval_s,
            free_page_reporting: self.free_page_reporting.unwrap_or(false),
        })
    }

    /// The API shape.
    pub fn from_vmm(b: &vmm::resources::BalloonConfig) -> Self {
        Self {
            amount_mib: b.amount_mib,
            deflate_on_oom: b.deflate_on_oom,
            stats_polling_interval_s: b.stats_polling_interval_s,
            free_page_hinting: None,
            free_page_reporting: Some(b.free_page_reporting),
        }
    }
}

/// `PATCH /balloon`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// New target size in MiB.
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    /// New interval in seconds.
    pub stats_polling_interval_s: u16,
}
