//! JSON bodies in Firecracker's shapes. Unknown fields are refused, as Firecracker does.

use serde::{Deserialize, Serialize};

/// `boot-source` / `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Host path of the kernel (ELF vmlinux or bzImage).
    pub kernel_image_path: String,
    /// Host path of an initrd.
    #[serde(default)]
    pub initrd_path: Option<String>,
    /// Kernel command line.
    #[serde(default)]
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
    #[serde(default)]
    pub cpu_template: Option<String>,
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
    pub drives: Option<serde_json::Value>,
    /// Network interfaces.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Option<serde_json::Value>,
    /// vsock device.
    #[serde(default)]
    pub vsock: Option<serde_json::Value>,
    /// Balloon device.
    #[serde(default)]
    pub balloon: Option<serde_json::Value>,
    /// Entropy device.
    #[serde(default)]
    pub entropy: Option<serde_json::Value>,
    /// Metrics sink.
    #[serde(default)]
    pub metrics: Option<serde_json::Value>,
    /// MMDS configuration.
    #[serde(rename = "mmds-config", default)]
    pub mmds_config: Option<serde_json::Value>,
    /// Custom CPU template.
    #[serde(rename = "cpu-config", default)]
    pub cpu_config: Option<serde_json::Value>,
    /// Persistent memory devices.
    #[serde(default)]
    pub pmem: Option<serde_json::Value>,
    /// Memory hotplug.
    #[serde(rename = "memory-hotplug", default)]
    pub memory_hotplug: Option<serde_json::Value>,
}
