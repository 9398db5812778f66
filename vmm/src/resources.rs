//! `VmResources`: the one validated description of a VM, whatever it came from (config file,
//! API calls). Validation errors name the field in Firecracker's JSON spelling.

use std::path::{Path, PathBuf};

pub use boot::BootProtocol;

/// Kernel command line used when the config gives none.
#[cfg(target_arch = "x86_64")]
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";
/// The kernel command line when the configuration gives none.
#[cfg(target_arch = "aarch64")]
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyAMA0 panic=1";
/// Most vCPUs tern gives one VM (the MADT/APIC ID space and Firecracker's limit).
pub const MAX_VCPUS: u8 = 32;

/// A configuration error: names the field, says what is wrong and what is allowed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct ConfigError {
    /// The field, e.g. `machine-config.vcpu_count`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSource {
    /// Kernel: ELF vmlinux or bzImage.
    pub kernel_image_path: PathBuf,
    /// Optional initrd.
    pub initrd_path: Option<PathBuf>,
    /// Kernel command line; [`DEFAULT_BOOT_ARGS`] when absent.
    pub boot_args: Option<String>,
    /// Entry point choice (tern extension).
    pub boot_protocol: BootProtocol,
}

/// vCPUs and memory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MachineConfig {
    /// Number of vCPUs.
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading (two threads per core).
    pub smt: bool,
    /// Dirty-page tracking for diff snapshots.
    pub track_dirty_pages: bool,
    /// Virtio devices on PCI (`true`) or virtio-mmio (`false`), as an API client chose it (a
    /// tern extension); `None`: the `--enable-pci` flag decides ([`VmResources::pci`]).
    pub pci: Option<bool>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            pci: None,
        }
    }
}

/// A custom CPU template (Firecracker's format, x86): CPUID and MSR bit modifiers applied on top
/// of tern's normalised CPUID and boot MSRs.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CpuTemplate {
    /// CPUID modifiers.
    pub cpuid: Vec<arch::x86_64::cpuid::CpuidModifier>,
    /// MSR modifiers: (MSR index, bits to force).
    pub msrs: Vec<(u32, arch::x86_64::cpuid::BitModifier<u64>)>,
}

/// A custom CPU template: on ARM64, tern has no register modifiers yet, so it is empty.
#[cfg(target_arch = "aarch64")]
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CpuTemplate {}

/// Everything needed to build the VM.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmResources {
    /// The kernel and its arguments.
    pub boot_source: Option<BootSource>,
    /// vCPUs and memory.
    pub machine_config: MachineConfig,
    /// Where the serial console writes; tern's stdout when absent.
    pub serial_out_path: Option<PathBuf>,
    /// Whether the boot-timer device is present.
    pub boot_timer: bool,
    /// Firecracker's `--enable-pci`: every virtio device on PCI unless `machine-config.pci`
    /// says otherwise.
    pub enable_pci: bool,
    /// Custom CPU template.
    pub cpu_template: Option<CpuTemplate>,
    /// A virtio-rng entropy device.
    pub entropy: bool,
    /// The entropy device's rate limiter.
    pub entropy_rate_limiter: Option<RateLimiterConfig>,
    /// virtio-blk drives, in the order they were added (the root device goes first).
    pub drives: Vec<DriveConfig>,
    /// virtio-net interfaces.
    pub net: Vec<NetConfig>,
    /// The virtio-vsock device.
    pub vsock: Option<VsockConfig>,
    /// The virtio-balloon device.
    pub balloon: Option<BalloonConfig>,
    /// The SMBIOS identity (`PUT /tern/v1/smbios`); tern's defaults when absent. Not in
    /// snapshots: the tables live in guest memory, which the snapshot keeps.
    pub smbios: Option<SmbiosConfig>,
}

pub use arch::smbios::SmbiosConfig;

impl VmResources {
    /// Whether the virtio devices go on PCI (virtio-pci) rather than virtio-mmio.
    pub fn pci(&self) -> bool {
        self.machine_config.pci.unwrap_or(self.enable_pci)
    }

    /// The machine configuration as the VM gets it: `pci` says `true` when `--enable-pci`
    /// put the devices on PCI (and stays absent for the mmio default, as Firecracker shows it).
    pub fn effective_machine_config(&self) -> MachineConfig {
        let mut m = self.machine_config.clone();
        if self.pci() {
            m.pci = Some(true);
        }
        m
    }

    /// Sets the SMBIOS identity, once it is known to fit the platform.
    pub fn put_smbios(&mut self, cfg: SmbiosConfig) -> Result<(), ConfigError> {
        crate::platform::check_smbios(&cfg)?;
        self.smbios = Some(cfg);
        Ok(())
    }
}

pub use devices::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
pub use devices::virtio::block::IoEngine as IoEngineKind;

/// A drive (`PUT /drives/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DriveConfig {
    /// Unique id; GET_ID answers it.
    pub drive_id: String,
    /// Raw image file or block device.
    pub path_on_host: PathBuf,
    /// Mount as the guest's root (`root=/dev/vda`).
    pub is_root_device: bool,
    /// The guest may not write.
    pub is_read_only: bool,
    /// Root by partition UUID instead of /dev/vda.
    pub partuuid: Option<String>,
    /// Rate limiter.
    pub rate_limiter: Option<RateLimiterConfig>,
    /// `pread`/`pwrite` or io_uring (Firecracker's `io_engine` Sync / Async).
    pub io_engine: IoEngineKind,
    /// Request queues (1 to `devices::virtio::block::MAX_QUEUES`; a tern extension).
    pub num_queues: u16,
}

/// A network interface (`PUT /network-interfaces/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    /// Unique id.
    pub iface_id: String,
    /// The host TAP device's name.
    pub host_dev_name: String,
    /// The guest's MAC address.
    pub guest_mac: Option<[u8; 6]>,
    /// Limits what the guest receives.
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits what the guest sends.
    pub tx_rate_limiter: Option<RateLimiterConfig>,
    /// Queue pairs (1 to `devices::virtio::net::MAX_QUEUE_PAIRS`; a tern extension): more
    /// than one opens the TAP as a multi-queue TAP, one queue per pair.
    pub num_queue_pairs: u16,
}

/// The vsock device (`PUT /vsock`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub guest_cid: u32,
    /// The host Unix socket that stands for the guest.
    pub uds_path: PathBuf,
}

/// The balloon device (`PUT /balloon`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalloonConfig {
    /// Target balloon size in MiB.
    pub amount_mib: u32,
    /// Let the guest take pages back when it runs out of memory.
    pub deflate_on_oom: bool,
    /// Seconds between statistics updates (0: no statistics).
    pub stats_polling_interval_s: u16,
    /// Free page reporting.
    pub free_page_reporting: bool,
}

/// Checks a Firecracker-style id (`drive_id`, `iface_id`).
pub fn check_id(field: &str, id: &str) -> Result<(), ConfigError> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(ConfigError::new(
            field,
            format!("{id:?} is not a valid id: use 1 to 64 letters, digits or '_'"),
        ));
    }
    Ok(())
}

impl DriveConfig {
    /// Checks the drive alone: id, backing file, limiter.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_id("drives.drive_id", &self.drive_id)?;
        let field = format!("drives[{}].path_on_host", self.drive_id);
        match std::fs::metadata(&self.path_on_host) {
            Ok(m)
                if m.is_file()
                    || std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()) => {}
            Ok(_) => {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "{} is not a regular file or block device",
                        self.path_on_host.display()
                    ),
                ));
            }
            Err(e) => {
                return Err(ConfigError::new(
                    field,
                    format!("{}: {e}", self.path_on_host.display()),
                ));
            }
        }
        if let Some(r) = &self.rate_limiter {
            r.check(&format!("drives[{}].rate_limiter", self.drive_id))
                .map_err(|m| ConfigError::new("drives.rate_limiter", m))?;
        }
        let max = devices::virtio::block::MAX_QUEUES;
        if !(1..=max).contains(&self.num_queues) {
            return Err(ConfigError::new(
                format!("drives[{}].num_queues", self.drive_id),
                format!("{} is out of range: give 1 to {max}", self.num_queues),
            ));
        }
        if self.partuuid.is_some() && !self.is_root_device {
            return Err(ConfigError::new(
                format!("drives[{}].partuuid", self.drive_id),
                "only means something on the root device (set is_root_device or drop partuuid)",
            ));
        }
        Ok(())
    }
}

impl NetConfig {
    /// Checks the interface alone.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_id("network-interfaces.iface_id", &self.iface_id)?;
        if self.host_dev_name.is_empty() || self.host_dev_name.len() > 15 {
            return Err(ConfigError::new(
                format!("network-interfaces[{}].host_dev_name", self.iface_id),
                format!("{:?} is not a TAP name (1 to 15 bytes)", self.host_dev_name),
            ));
        }
        if let Some(mac) = self.guest_mac {
            if mac[0] & 1 != 0 {
                return Err(ConfigError::new(
                    format!("network-interfaces[{}].guest_mac", self.iface_id),
                    "is a multicast address: the lowest bit of the first byte must be 0",
                ));
            }
        }
        let max = devices::virtio::net::MAX_QUEUE_PAIRS as u16;
        if !(1..=max).contains(&self.num_queue_pairs) {
            return Err(ConfigError::new(
                format!("network-interfaces[{}].num_queue_pairs", self.iface_id),
                format!("{} is out of range: give 1 to {max}", self.num_queue_pairs),
            ));
        }
        for (name, r) in [
            ("rx_rate_limiter", &self.rx_rate_limiter),
            ("tx_rate_limiter", &self.tx_rate_limiter),
        ] {
            if let Some(r) = r {
                let f = format!("network-interfaces[{}].{name}", self.iface_id);
                r.check(&f).map_err(|m| ConfigError::new(f.clone(), m))?;
            }
        }
        Ok(())
    }
}

impl VsockConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.guest_cid < 3 {
            return Err(ConfigError::new(
                "vsock.guest_cid",
                format!("{} is reserved: give 3 or more", self.guest_cid),
            ));
        }
        let s = self.uds_path.as_os_str().len();
        if s == 0 || s > 96 {
            return Err(ConfigError::new(
                "vsock.uds_path",
                "must be 1 to 96 bytes (a Unix socket path, with room for _<port> after it)",
            ));
        }
        Ok(())
    }
}

/// Facts about the host that bound a VM.
#[derive(Debug, Clone, Copy)]
pub struct HostLimits {
    /// Host memory in MiB.
    pub mem_mib: u64,
    /// The most vCPUs the hypervisor allows in one VM.
    pub max_vcpus: usize,
}

impl HostLimits {
    /// Reads the host's memory size from `/proc/meminfo`; `max_vcpus` from the hypervisor.
    pub fn probe(max_vcpus: usize) -> Self {
        let mem_kib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("MemTotal:")?
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
            })
            .unwrap_or(u64::MAX / 1024);
        Self {
            mem_mib: mem_kib / 1024,
            max_vcpus,
        }
    }
}

fn check_file(field: &str, path: &Path) -> Result<(), ConfigError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(ConfigError::new(
            field,
            format!("{} is not a regular file", path.display()),
        )),
        Err(e) => Err(ConfigError::new(field, format!("{}: {e}", path.display()))),
    }
}

impl MachineConfig {
    /// Checks the values against tern's and the host's limits.
    pub fn validate(&self, host: &HostLimits) -> Result<(), ConfigError> {
        let max = usize::from(MAX_VCPUS).min(host.max_vcpus.max(1));
        if self.vcpu_count == 0 || usize::from(self.vcpu_count) > max {
            return Err(ConfigError::new(
                "machine-config.vcpu_count",
                format!("{} is out of range: give 1 to {max}", self.vcpu_count),
            ));
        }
        if self.mem_size_mib == 0 {
            return Err(ConfigError::new(
                "machine-config.mem_size_mib",
                "0 MiB: give the guest memory (at least 64 MiB for a Linux guest)",
            ));
        }
        if self.mem_size_mib > host.mem_mib {
            return Err(ConfigError::new(
                "machine-config.mem_size_mib",
                format!(
                    "{} MiB is more than this host's {} MiB of memory; give less",
                    self.mem_size_mib, host.mem_mib
                ),
            ));
        }
        if self.smt {
            return Err(ConfigError::new(
                "machine-config.smt",
                "true is not supported yet: tern gives each vCPU its own core (use false)",
            ));
        }
        // `pci` needs no check here: every platform has the bus, and its slots are checked
        // with the devices (`VmResources::validate_devices`).
        Ok(())
    }
}

impl VmResources {
    /// Checks that the VM can be built: a boot source whose files exist, sane machine values.
    pub fn validate(&self, host: &HostLimits) -> Result<(), ConfigError> {
        self.validate_boot_source()?;
        self.validate_devices(host)
    }

    /// [`VmResources::validate`] without the boot source (a VM restored from a snapshot).
    pub fn validate_devices(&self, host: &HostLimits) -> Result<(), ConfigError> {
        self.machine_config.validate(host)?;
        for d in &self.drives {
            d.validate()?;
        }
        for n in &self.net {
            n.validate()?;
        }
        if let Some(v) = &self.vsock {
            v.validate()?;
        }
        let devices = self.drives.len()
            + self.net.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.balloon.is_some())
            + usize::from(self.entropy);
        if self.pci() {
            crate::platform::check_pci(devices)?;
        } else if devices > max_virtio_devices() {
            return Err(ConfigError::new(
                "drives",
                format!(
                    "{devices} virtio devices (drives, network interfaces, vsock, balloon, entropy) \
                     are more than the {} this machine has interrupt lines for",
                    max_virtio_devices()
                ),
            ));
        }
        if let Some(b) = &self.balloon {
            if u64::from(b.amount_mib) > self.machine_config.mem_size_mib {
                return Err(ConfigError::new(
                    "balloon.amount_mib",
                    format!(
                        "{} MiB is more than the guest's {} MiB",
                        b.amount_mib, self.machine_config.mem_size_mib
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks the boot source alone: present, its files exist, the kernel is a kernel.
    pub fn validate_boot_source(&self) -> Result<(), ConfigError> {
        let boot = self.boot_source.as_ref().ok_or_else(|| {
            ConfigError::new(
                "boot-source",
                "missing: say which kernel to boot (kernel_image_path)",
            )
        })?;
        check_file("boot-source.kernel_image_path", &boot.kernel_image_path)?;
        #[cfg(target_arch = "x86_64")]
        {
            let path = &boot.kernel_image_path;
            let mut f = std::fs::File::open(path).map_err(|e| {
                ConfigError::new(
                    "boot-source.kernel_image_path",
                    format!("{}: {e}", path.display()),
                )
            })?;
            boot::detect_format(path, &mut f).map_err(|_| {
                ConfigError::new(
                    "boot-source.kernel_image_path",
                    format!(
                        "{} is not a Linux kernel (expected an ELF vmlinux or a bzImage)",
                        path.display()
                    ),
                )
            })?;
        }
        #[cfg(target_arch = "aarch64")]
        boot::aarch64::detect(&boot.kernel_image_path).map_err(|_| {
            ConfigError::new(
                "boot-source.kernel_image_path",
                format!(
                    "{} is not a Linux kernel (expected an arm64 Image or Image.gz)",
                    boot.kernel_image_path.display()
                ),
            )
        })?;
        if let Some(initrd) = &boot.initrd_path {
            check_file("boot-source.initrd_path", initrd)?;
        }
        if let Some(args) = &boot.boot_args {
            if args.len() >= arch_cmdline_max() {
                return Err(ConfigError::new(
                    "boot-source.boot_args",
                    format!(
                        "{} bytes is too long (at most {})",
                        args.len(),
                        arch_cmdline_max() - 1
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Adds or replaces (same id) a drive.
    pub fn put_drive(&mut self, d: DriveConfig) -> Result<(), ConfigError> {
        d.validate()?;
        if d.is_root_device
            && self
                .drives
                .iter()
                .any(|o| o.is_root_device && o.drive_id != d.drive_id)
        {
            return Err(ConfigError::new(
                format!("drives[{}].is_root_device", d.drive_id),
                "another drive is already the root device (only one may be)",
            ));
        }
        match self.drives.iter_mut().find(|o| o.drive_id == d.drive_id) {
            Some(o) => *o = d,
            None => self.drives.push(d),
        }
        Ok(())
    }

    /// Adds or replaces (same id) a network interface.
    pub fn put_net(&mut self, n: NetConfig) -> Result<(), ConfigError> {
        n.validate()?;
        if let Some(o) = self.net.iter().find(|o| {
            o.iface_id != n.iface_id
                && (o.host_dev_name == n.host_dev_name
                    || (o.guest_mac.is_some() && o.guest_mac == n.guest_mac))
        }) {
            return Err(ConfigError::new(
                format!("network-interfaces[{}]", n.iface_id),
                format!(
                    "interface {} already uses this host_dev_name or guest_mac",
                    o.iface_id
                ),
            ));
        }
        match self.net.iter_mut().find(|o| o.iface_id == n.iface_id) {
            Some(o) => *o = n,
            None => self.net.push(n),
        }
        Ok(())
    }

    /// The drives in the order the guest sees them: the root device first (`/dev/vda`).
    pub fn ordered_drives(&self) -> Vec<&DriveConfig> {
        let mut v: Vec<&DriveConfig> = self.drives.iter().filter(|d| d.is_root_device).collect();
        v.extend(self.drives.iter().filter(|d| !d.is_root_device));
        v
    }

    /// The kernel command line the guest gets, with the root device's `root=` when a drive
    /// is the root device.
    pub fn full_boot_args(&self) -> String {
        let mut args = self.boot_args().to_string();
        if let Some(d) = self.drives.iter().find(|d| d.is_root_device) {
            let root = match &d.partuuid {
                Some(u) => format!("PARTUUID={u}"),
                None => "/dev/vda".to_string(),
            };
            let mode = if d.is_read_only { "ro" } else { "rw" };
            args.push_str(&format!(" root={root} {mode}"));
        }
        args
    }

    /// The kernel command line the guest gets.
    pub fn boot_args(&self) -> &str {
        self.boot_source
            .as_ref()
            .and_then(|b| b.boot_args.as_deref())
            .unwrap_or(DEFAULT_BOOT_ARGS)
    }
}

fn max_virtio_devices() -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        arch::x86_64::layout::MAX_VIRTIO_DEVICES
    }
    #[cfg(target_arch = "aarch64")]
    {
        arch::aarch64::layout::MAX_VIRTIO_DEVICES
    }
}

fn arch_cmdline_max() -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        arch::x86_64::layout::CMDLINE_MAX_SIZE
    }
    #[cfg(target_arch = "aarch64")]
    {
        arch::aarch64::layout::CMDLINE_MAX_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: HostLimits = HostLimits {
        mem_mib: 4096,
        max_vcpus: 64,
    };

    /// A file that passes the kernel format check: x86 takes any ELF (the test binary is
    /// one); ARM64 wants an Image header, written once per test process.
    fn test_kernel() -> PathBuf {
        if cfg!(target_arch = "aarch64") {
            static IMAGE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
            IMAGE
                .get_or_init(|| {
                    let p = std::env::temp_dir()
                        .join(format!("tern-test-Image-{}", std::process::id()));
                    let mut h = vec![0u8; 64];
                    h[16..24].copy_from_slice(&(1u64 << 20).to_le_bytes());
                    h[56..60].copy_from_slice(b"ARM\x64");
                    std::fs::write(&p, h).unwrap();
                    p
                })
                .clone()
        } else {
            std::env::current_exe().unwrap()
        }
    }

    /// x86_64 keeps a configuration that fits and refuses what does not, naming the field;
    /// ARM64 refuses any (no UEFI, so no way to hand the guest SMBIOS), after the same checks.
    #[test]
    fn smbios_is_checked_when_put() {
        let mut r = VmResources::default();
        let good = SmbiosConfig {
            serial: Some("SN-1".into()),
            ..Default::default()
        };
        let put = r.put_smbios(good.clone());
        if cfg!(target_arch = "x86_64") {
            assert_eq!(put, Ok(()));
            assert_eq!(r.smbios, Some(good));
        } else {
            let e = put.unwrap_err();
            assert_eq!(e.field, "smbios");
            assert!(e.message.contains("leave smbios out on ARM64"), "{e}");
            assert_eq!(r.smbios, None);
        }
        let mut r = VmResources::default();
        let e = r
            .put_smbios(SmbiosConfig {
                uuid: Some("nope".into()),
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(e.field, "smbios.uuid");
        if cfg!(target_arch = "x86_64") {
            let e = r
                .put_smbios(SmbiosConfig {
                    oem_strings: vec!["x".repeat(40_000), "y".repeat(40_000)],
                    ..Default::default()
                })
                .unwrap_err();
            assert_eq!(e.field, "smbios");
            assert!(e.message.contains("at most 65536 fit"), "{e}");
        }
        assert_eq!(r.smbios, None, "nothing half-set");
    }

    fn with_kernel() -> VmResources {
        VmResources {
            boot_source: Some(BootSource {
                kernel_image_path: test_kernel(),
                initrd_path: None,
                boot_args: None,
                boot_protocol: BootProtocol::Auto,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn good_config_validates() {
        assert_eq!(with_kernel().validate(&HOST), Ok(()));
        assert_eq!(with_kernel().boot_args(), DEFAULT_BOOT_ARGS);
    }

    #[test]
    fn zero_and_too_many_vcpus_name_the_field() {
        for n in [0, 33] {
            let mut r = with_kernel();
            r.machine_config.vcpu_count = n;
            let e = r.validate(&HOST).unwrap_err();
            assert_eq!(e.field, "machine-config.vcpu_count");
        }
        let mut r = with_kernel();
        r.machine_config.vcpu_count = 8;
        let small = HostLimits {
            max_vcpus: 4,
            ..HOST
        };
        assert!(r.validate(&small).unwrap_err().message.contains("1 to 4"));
    }

    #[test]
    fn too_many_virtio_devices_are_refused() {
        let mut r = with_kernel();
        for i in 0..max_virtio_devices() {
            r.net.push(NetConfig {
                iface_id: format!("eth{i}"),
                host_dev_name: format!("tap{i}"),
                guest_mac: None,
                rx_rate_limiter: None,
                tx_rate_limiter: None,
                num_queue_pairs: 1,
            });
        }
        assert_eq!(r.validate(&HOST), Ok(()));
        r.entropy = true;
        let e = r.validate(&HOST).unwrap_err();
        assert!(e.message.contains("interrupt lines"), "{e}");
    }

    #[test]
    fn memory_bounds() {
        let mut r = with_kernel();
        r.machine_config.mem_size_mib = 0;
        assert_eq!(
            r.validate(&HOST).unwrap_err().field,
            "machine-config.mem_size_mib"
        );
        r.machine_config.mem_size_mib = 4097;
        let e = r.validate(&HOST).unwrap_err();
        assert!(e.message.contains("more than this host"), "{e}");
    }

    #[test]
    fn missing_files_name_field_and_path() {
        let mut r = with_kernel();
        r.boot_source.as_mut().unwrap().kernel_image_path = "/no/such/vmlinux".into();
        let e = r.validate(&HOST).unwrap_err();
        assert_eq!(e.field, "boot-source.kernel_image_path");
        assert!(e.message.contains("/no/such/vmlinux"));
        let mut r = with_kernel();
        r.boot_source.as_mut().unwrap().kernel_image_path = "/etc/hostname".into();
        assert!(
            r.validate(&HOST)
                .unwrap_err()
                .message
                .contains("not a Linux kernel")
        );
        let mut r = with_kernel();
        r.boot_source.as_mut().unwrap().initrd_path = Some("/".into());
        assert!(
            r.validate(&HOST)
                .unwrap_err()
                .message
                .contains("not a regular file")
        );
        assert_eq!(
            VmResources::default().validate(&HOST).unwrap_err().field,
            "boot-source"
        );
    }

    #[test]
    fn host_limits_probe_reads_meminfo() {
        assert!(HostLimits::probe(1).mem_mib > 0);
    }
}
