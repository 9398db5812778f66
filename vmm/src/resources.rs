//! `VmResources`: the one validated description of a VM, whatever it came from (config file,
//! API calls). Validation errors name the field in Firecracker's JSON spelling.

use std::path::{Path, PathBuf};

pub use boot::BootProtocol;

/// Kernel command line used when the config gives none.
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineConfig {
    /// Number of vCPUs.
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading (two threads per core).
    pub smt: bool,
    /// Dirty-page tracking for diff snapshots.
    pub track_dirty_pages: bool,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
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
    /// Custom CPU template.
    #[cfg(target_arch = "x86_64")]
    pub cpu_template: Option<CpuTemplate>,
    /// A virtio-rng entropy device.
    pub entropy: bool,
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
        if self.track_dirty_pages {
            return Err(ConfigError::new(
                "machine-config.track_dirty_pages",
                "true is not supported yet: dirty tracking arrives with diff snapshots (use false)",
            ));
        }
        Ok(())
    }
}

impl VmResources {
    /// Checks that the VM can be built: a boot source whose files exist, sane machine values.
    pub fn validate(&self, host: &HostLimits) -> Result<(), ConfigError> {
        self.validate_boot_source()?;
        self.machine_config.validate(host)
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

    /// The kernel command line the guest gets.
    pub fn boot_args(&self) -> &str {
        self.boot_source
            .as_ref()
            .and_then(|b| b.boot_args.as_deref())
            .unwrap_or(DEFAULT_BOOT_ARGS)
    }
}

fn arch_cmdline_max() -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        arch::x86_64::layout::CMDLINE_MAX_SIZE
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        2048
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: HostLimits = HostLimits {
        mem_mib: 4096,
        max_vcpus: 64,
    };

    fn with_kernel() -> VmResources {
        // Any ELF file passes the format check; the test binary is one.
        VmResources {
            boot_source: Some(BootSource {
                kernel_image_path: std::env::current_exe().unwrap(),
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
