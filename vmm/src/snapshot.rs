//! Pause, snapshot, restore: what a VM's state file holds, taking it from a paused VM, and the
//! memory file. The container format is [`crate::snapshot_file`]; building a VM back from a
//! snapshot is [`crate::vm::build`] with [`crate::vm::Payload::Snapshot`].

use std::io::Write;
use std::path::{Path, PathBuf};

use devices::legacy::serial::UartState;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::resources::{
    BalloonConfig, DriveConfig, MachineConfig, NetConfig, RateLimiterConfig, VmResources,
    VsockConfig,
};
use crate::snapshot_file::{self, SnapshotArch, SnapshotFileError};
use crate::vm::{RunningVm, VirtioKind};

/// How long a paused vCPU thread may take to hand over its state.
const VCPU_JOB_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// One virtio device in a state file: which it is, and its transport's and its own state.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VirtioSnapshot {
    /// The kind of device (checked against the configuration on restore).
    pub kind: VirtioKind,
    /// Its API id (drive_id, iface_id) or kind name.
    pub id: String,
    /// Registers, queues and the device's own typed state.
    pub transport: devices::virtio::state::VirtioState,
    /// The PCI function's configuration space and MSI-X table (virtio-pci); `None` on
    /// virtio-mmio.
    pub pci: Option<devices::virtio::pci::PciTransportState>,
}

/// Everything in a state file.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct VmState {
    /// vCPUs and memory size.
    pub machine: MachineConfig,
    /// The devices' configurations (their back-ends are opened again on restore).
    pub drives: Vec<DriveConfig>,
    /// Network interfaces.
    pub net: Vec<NetConfig>,
    /// The vsock device.
    pub vsock: Option<VsockConfig>,
    /// The balloon.
    pub balloon: Option<BalloonConfig>,
    /// The entropy device.
    pub entropy: bool,
    /// Its rate limiter.
    pub entropy_rate_limiter: Option<RateLimiterConfig>,
    /// Guest RAM regions (start, size), stored one after the other in the memory file.
    pub memory: Vec<(u64, u64)>,
    /// The console UART.
    pub uart: UartState,
    /// Each virtio transport, in the order the VM has them.
    pub virtio: Vec<VirtioSnapshot>,
    /// KVM's VM-wide state.
    #[cfg(target_arch = "x86_64")]
    pub vm: crate::hypervisor::X86VmState,
    /// Each vCPU's state.
    #[cfg(target_arch = "x86_64")]
    pub vcpus: Vec<crate::hypervisor::X86VcpuState>,
    /// The GIC.
    #[cfg(target_arch = "aarch64")]
    pub gic: crate::hypervisor::ArmGicState,
    /// Each vCPU's state.
    #[cfg(target_arch = "aarch64")]
    pub vcpus: Vec<crate::hypervisor::ArmVcpuState>,
}

impl VmState {
    /// The configuration a VM restored from this state is built with: its devices, and what
    /// the restoring process says of the rest (console, logging).
    pub fn resources(&self, base: &VmResources) -> VmResources {
        VmResources {
            machine_config: self.machine.clone(),
            drives: self.drives.clone(),
            net: self.net.clone(),
            vsock: self.vsock.clone(),
            balloon: self.balloon.clone(),
            entropy: self.entropy,
            entropy_rate_limiter: self.entropy_rate_limiter,
            boot_source: None,
            cpu_template: None,
            ..base.clone()
        }
    }

    /// Checks that the state describes a VM this tern builds: as many vCPU states as vCPUs, and
    /// the RAM layout this platform gives the configured memory size.
    pub fn check(&self) -> Result<(), SnapshotError> {
        let bad = |m: String| Err(SnapshotError::Inconsistent(m));
        if self.vcpus.len() != usize::from(self.machine.vcpu_count) {
            return bad(format!(
                "{} vCPU states for {} vCPUs",
                self.vcpus.len(),
                self.machine.vcpu_count
            ));
        }
        let Some(bytes) = self.machine.mem_size_mib.checked_mul(1 << 20) else {
            return bad(format!("{} MiB of memory", self.machine.mem_size_mib));
        };
        if self.memory != crate::platform::ram_regions(bytes) {
            return bad(format!(
                "RAM regions {:x?} are not this platform's for {} MiB",
                self.memory, self.machine.mem_size_mib
            ));
        }
        Ok(())
    }

    /// The memory file's expected size (saturating: a forged state cannot overflow it).
    pub fn memory_bytes(&self) -> u64 {
        self.memory
            .iter()
            .fold(0u64, |n, &(_, size)| n.saturating_add(size))
    }
}

/// Why a snapshot could not be taken or loaded.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The state file is bad or could not be written.
    #[error(transparent)]
    File(#[from] SnapshotFileError),
    /// The VM must be paused first.
    #[error("the VM is running: pause it first (PATCH /vm {{\"state\": \"Paused\"}})")]
    NotPaused,
    /// KVM refused to hand over or take back some state.
    #[error("{0}")]
    Hypervisor(String),
    /// The memory file could not be written or does not fit the state.
    #[error("memory file {path}: {reason}")]
    Memory {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A device's state could not be taken or restored.
    #[error("device {0}")]
    Device(String),
    /// The state and memory files would be one file.
    #[error("snapshot_path and mem_file_path are both {0}: give two files")]
    SamePath(PathBuf),
    /// The state does not describe a VM this tern builds.
    #[error("the snapshot's VM is inconsistent: {0}")]
    Inconsistent(String),
    /// A snapshot type other than `Full` and `Diff`.
    #[error("snapshot_type {0:?} is unknown: use \"Full\" or \"Diff\"")]
    UnknownType(String),
    /// A diff snapshot of a VM that does not track dirty pages.
    #[error(
        "a Diff snapshot needs dirty-page tracking: start the VM with machine-config track_dirty_pages true (or load it with track_dirty_pages true), then take a Full snapshot as the base"
    )]
    NotTracking,
}

/// What a snapshot's memory file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotType {
    /// All of guest memory.
    Full,
    /// Only the pages written since the VM's last snapshot (or since it was loaded), at their
    /// offsets in a sparse file as large as a full one: merge it onto its base
    /// ([`merge_diff`], `tern-rebase-snap`) before loading.
    Diff,
}

impl std::str::FromStr for SnapshotType {
    type Err = SnapshotError;
    fn from_str(s: &str) -> Result<Self, SnapshotError> {
        match s {
            "Full" => Ok(Self::Full),
            "Diff" => Ok(Self::Diff),
            other => Err(SnapshotError::UnknownType(other.to_string())),
        }
    }
}

impl RunningVm {
    /// Writes a full snapshot of the paused VM: the state to `snapshot_path`, guest memory to
    /// `mem_path`, each atomically. On failure the VM stays paused and intact, and neither
    /// file is left half-written under its name.
    ///
    /// With dirty-page tracking on, the pages written since the last snapshot are KVM's dirty
    /// log plus what the devices marked; a `Diff` snapshot writes only those, and every
    /// successful snapshot starts the count over (a failed one keeps it).
    pub fn snapshot(
        &self,
        kind: SnapshotType,
        snapshot_path: &Path,
        mem_path: &Path,
    ) -> Result<(), SnapshotError> {
        if !self.paused {
            return Err(SnapshotError::NotPaused);
        }
        if snapshot_path == mem_path {
            return Err(SnapshotError::SamePath(snapshot_path.to_path_buf()));
        }
        if kind == SnapshotType::Diff && self.machine.dirty.is_none() {
            return Err(SnapshotError::NotTracking);
        }
        let mut vcpu_states = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            #[cfg(target_arch = "x86_64")]
            let job = |vcpu: &mut dyn crate::hypervisor::Vcpu| vcpu.save_x86_state();
            #[cfg(target_arch = "aarch64")]
            let job = |vcpu: &mut dyn crate::hypervisor::Vcpu| vcpu.save_arm_state();
            let s = crate::vcpu::run_on_paused(v, VCPU_JOB_TIMEOUT, job)
                .map_err(SnapshotError::Hypervisor)?
                .map_err(|e| SnapshotError::Hypervisor(e.to_string()))?;
            vcpu_states.push(s);
        }
        #[cfg(target_arch = "x86_64")]
        let vm_state = self.machine._vm.save_x86_state();
        #[cfg(target_arch = "aarch64")]
        let vm_state = {
            let mpidrs: Vec<u64> = vcpu_states.iter().map(|v| v.mpidr).collect();
            self.machine._vm.save_arm_gic(&mpidrs)
        };
        let vm_state = vm_state.map_err(|e| SnapshotError::Hypervisor(e.to_string()))?;
        let memory: Vec<(u64, u64)> = self
            .machine
            ._mem
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect();
        // The pages this snapshot holds, per region, taken out of the log while every device
        // is held (KVM's log folded in first): what a device writes after this is in the next
        // diff. A failure below puts them back, so nothing is lost.
        let mut saved_pages = Vec::new();
        let put_back = |saved: &[Vec<u64>]| {
            if let Some(log) = &self.machine.dirty {
                for (slot, bits) in saved.iter().enumerate() {
                    log.merge(slot, bits);
                }
            }
        };
        let uart = self
            .machine
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .save();
        let io = |source| {
            SnapshotError::File(SnapshotFileError::Io {
                path: snapshot_path.to_path_buf(),
                source,
            })
        };
        // Every device and its worker are held while their state and guest memory are read,
        // so none writes guest memory in between.
        let files = self.machine.devices.with_saved(|virtio| {
            if let Some(log) = &self.machine.dirty {
                for (slot, r) in self.machine._mem.iter().enumerate() {
                    match self.machine._vm.dirty_log(slot as u32, r.len()) {
                        Ok(bits) => log.merge(slot, &bits),
                        Err(e) => {
                            // (put back below, as for every failure)
                            return Err(SnapshotError::Hypervisor(e.to_string()));
                        }
                    }
                    saved_pages.push(log.take(slot));
                }
            }
            // The state file is written first: a state path that cannot be written fails before
            // the (much longer) memory write, not after it.
            let res = &self.machine.resources;
            let state = VmState {
                // The transport the devices are on now, whatever flags the restoring
                // process gets.
                machine: res.effective_machine_config(),
                drives: res.ordered_drives().into_iter().cloned().collect(),
                net: res.net.clone(),
                vsock: res.vsock.clone(),
                balloon: res.balloon.clone(),
                entropy: res.entropy,
                entropy_rate_limiter: res.entropy_rate_limiter,
                memory,
                uart,
                virtio,
                #[cfg(target_arch = "x86_64")]
                vm: vm_state,
                #[cfg(target_arch = "aarch64")]
                gic: vm_state,
                vcpus: vcpu_states,
            };
            let state_file = snapshot_file::encode(&state, SnapshotArch::native())
                .map_err(SnapshotError::from)
                .and_then(|bytes| {
                    snapshot_file::write_pending(snapshot_path, |f| f.write_all(&bytes)).map_err(io)
                });
            state_file.and_then(|state_file| {
                let mem_file = match kind {
                    SnapshotType::Full => write_memory(&self.machine._mem, mem_path),
                    SnapshotType::Diff => {
                        write_memory_diff(&self.machine._mem, mem_path, &saved_pages)
                    }
                }?;
                Ok((state_file, mem_file))
            })
        });
        // Both files are complete on disk before either gets its name: a failure leaves
        // neither, and never a new memory file beside an old state file.
        let outcome = files.and_then(|(state_file, mem_file)| {
            mem_file.commit().map_err(|e| SnapshotError::Memory {
                path: mem_path.to_path_buf(),
                reason: e.to_string(),
            })?;
            state_file.commit().map_err(io)
        });
        if outcome.is_err() {
            put_back(&saved_pages);
        }
        outcome
    }
}

/// Writes the pages `dirty` marks (one bitmap per region, one bit per
/// [`devices::dirty::PAGE_SIZE`] page) at their offsets in a sparse file as large as a full
/// memory file, for `path`. A marked page is written even if it is all zeros: merged onto a
/// base, it must replace what the base has there.
fn write_memory_diff(
    mem: &GuestMemoryMmap,
    path: &Path,
    dirty: &[Vec<u64>],
) -> Result<snapshot_file::PendingFile, SnapshotError> {
    write_pages(mem, path, false, |region, p| {
        dirty
            .get(region)
            .and_then(|bits| bits.get((p / 64) as usize))
            .is_some_and(|w| w & (1 << (p % 64)) != 0)
    })
}

/// Writes guest memory, region after region, for `path` (renamed into place on commit). Pages
/// that are all zeros (never touched, or cleared) are left as holes, which read back as zeros:
/// the file is as large as guest RAM but takes only the room of the pages in use, and a
/// mostly empty guest is written in a fraction of the time.
fn write_memory(
    mem: &GuestMemoryMmap,
    path: &Path,
) -> Result<snapshot_file::PendingFile, SnapshotError> {
    write_pages(mem, path, true, |_, _| true)
}

/// Writes the pages `want(region index, page index)` selects at their offsets in a file as
/// large as all of guest memory (the rest are holes); with `skip_zero`, selected pages that
/// are all zeros are left as holes too.
fn write_pages(
    mem: &GuestMemoryMmap,
    path: &Path,
    skip_zero: bool,
    want: impl Fn(usize, u64) -> bool,
) -> Result<snapshot_file::PendingFile, SnapshotError> {
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestAddress};
    const PAGE: u64 = devices::dirty::PAGE_SIZE;
    const CHUNK: u64 = 256; // pages read at a time (1 MiB)
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    snapshot_file::write_pending(path, |f| {
        f.set_len(total)?;
        let mut buf = Vec::new();
        let mut offset = 0u64;
        for (index, r) in mem.iter().enumerate() {
            let pages = r.len().div_ceil(PAGE);
            let mut p = 0;
            while p < pages {
                if !want(index, p) {
                    p += 1;
                    continue;
                }
                let first = p;
                while p < pages && want(index, p) && p - first < CHUNK {
                    p += 1;
                }
                let start = first * PAGE;
                let len = (p * PAGE).min(r.len()) - start;
                buf.resize(len as usize, 0);
                mem.read_slice(&mut buf, GuestAddress(r.start_addr().0 + start))
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                if !skip_zero {
                    f.write_all_at(&buf, offset + start)?;
                    continue;
                }
                // Runs of pages with data, written one run at a time. Each page is compared
                // with a zero page once (memcmp: a byte loop here took 1.6 s per 256 MiB in a
                // debug build, tens of seconds under TCG).
                let data: Vec<bool> = buf.chunks(PAGE as usize).map(|pg| !is_zero(pg)).collect();
                let mut i = 0;
                while i < data.len() {
                    if !data[i] {
                        i += 1;
                        continue;
                    }
                    let run = i;
                    while i < data.len() && data[i] {
                        i += 1;
                    }
                    let from = run * PAGE as usize;
                    let to = (i * PAGE as usize).min(buf.len());
                    f.write_all_at(&buf[from..to], offset + start + from as u64)?;
                }
            }
            offset += r.len();
        }
        Ok(())
    })
    .map_err(|e| SnapshotError::Memory {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// True when `page` (at most one page long) is all zeros.
fn is_zero(page: &[u8]) -> bool {
    static ZERO: [u8; devices::dirty::PAGE_SIZE as usize] = [0; devices::dirty::PAGE_SIZE as usize];
    page.len() <= ZERO.len() && page == &ZERO[..page.len()]
}

/// Copies the pages a diff memory file holds (its data ranges: the file is sparse) onto its
/// base memory file, in place: `base` then holds guest memory as of the diff snapshot. Both
/// must be as large, and the diff must sit on a file system that keeps holes (ext4, xfs,
/// btrfs, tmpfs). Apply diffs in the order they were taken.
pub fn merge_diff(base: &Path, diff: &Path) -> Result<u64, SnapshotError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let err = |path: &Path, reason: String| SnapshotError::Memory {
        path: path.to_path_buf(),
        reason,
    };
    let d = std::fs::File::open(diff).map_err(|e| err(diff, e.to_string()))?;
    let b = std::fs::OpenOptions::new()
        .write(true)
        .open(base)
        .map_err(|e| err(base, e.to_string()))?;
    let dlen = d.metadata().map_err(|e| err(diff, e.to_string()))?.len();
    let blen = b.metadata().map_err(|e| err(base, e.to_string()))?.len();
    if dlen != blen {
        return Err(err(
            diff,
            format!(
                "{dlen} bytes, but the base {} has {blen}: not its diff",
                base.display()
            ),
        ));
    }
    let seek = |at: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on a file descriptor `d` owns; no memory is passed.
        let r = unsafe { libc::lseek(d.as_raw_fd(), at as libc::off_t, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None) // no data after `at`
            } else {
                Err(e)
            };
        }
        Ok(Some(r as u64))
    };
    let mut copied = 0u64;
    let mut at = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while at < dlen {
        let Some(start) = seek(at, libc::SEEK_DATA).map_err(|e| err(diff, e.to_string()))? else {
            break;
        };
        let end = seek(start, libc::SEEK_HOLE)
            .map_err(|e| err(diff, e.to_string()))?
            .unwrap_or(dlen)
            .min(dlen);
        if end <= start {
            break; // the file changed under us; what is past its size is not the diff's
        }
        let mut pos = start;
        while pos < end {
            let n = ((end - pos) as usize).min(buf.len());
            d.read_exact_at(&mut buf[..n], pos)
                .map_err(|e| err(diff, e.to_string()))?;
            b.write_all_at(&buf[..n], pos)
                .map_err(|e| err(base, e.to_string()))?;
            pos += n as u64;
        }
        copied += end - start;
        at = end;
    }
    b.sync_all().map_err(|e| err(base, e.to_string()))?;
    Ok(copied)
}

/// Maps the memory file privately (copy-on-write: pages load on first touch, and the file is
/// never written) as the guest RAM `state` describes. The file must be exactly as large.
pub fn map_memory_file(state: &VmState, path: &Path) -> Result<GuestMemoryMmap, SnapshotError> {
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};
    let err = |reason: String| SnapshotError::Memory {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let len = file.metadata().map_err(|e| err(e.to_string()))?.len();
    let want = state.memory_bytes();
    if len != want {
        return Err(err(format!(
            "{len} bytes, but the snapshot's guest has {want} bytes of RAM (the wrong memory file, or a truncated copy?)"
        )));
    }
    let file = std::sync::Arc::new(file);
    let mut regions = Vec::with_capacity(state.memory.len());
    let mut offset = 0u64;
    for &(start, size) in &state.memory {
        let size_usize = usize::try_from(size).map_err(|_| err(format!("region size {size}")))?;
        let mapping = MmapRegionBuilder::new(size_usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .with_file_offset(FileOffset::from_arc(file.clone(), offset))
            .build()
            .map_err(|e| err(format!("cannot map {size} bytes at offset {offset}: {e}")))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| err(format!("region at {start:#x} overflows")))?;
        regions.push(region);
        offset = offset.saturating_add(size);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| err(format!("regions: {e}")))
}

/// One guest RAM region as the page-fault handler sees it (Firecracker's
/// `GuestRegionUffdMapping`): where it is mapped in tern, its size, where its pages start in the
/// memory file, and the page size.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UffdMapping {
    /// Host virtual address of the region in tern.
    pub base_host_virt_addr: u64,
    /// Bytes.
    pub size: u64,
    /// Offset of the region's first page in the memory file.
    pub offset: u64,
    /// Page size in bytes.
    pub page_size: u64,
    /// The same in KiB (Firecracker's older field).
    pub page_size_kib: u64,
}

/// Guest memory for the `Uffd` back-end: anonymous private mappings registered with a new
/// userfaultfd, which goes with the region layout to the page-fault handler listening on the
/// Unix socket `socket` (Firecracker's protocol: one message with the JSON array of
/// [`UffdMapping`]s as body and the userfaultfd as `SCM_RIGHTS`). The handler fills each page
/// on first touch; restore time does not grow with memory size. The connection stays open as
/// long as the VM: its end tells the handler the VM is gone.
pub fn uffd_memory(state: &VmState, socket: &Path) -> Result<UffdMemory, SnapshotError> {
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{GuestAddress, GuestRegionMmap};
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let err = |reason: String| SnapshotError::Memory {
        path: socket.to_path_buf(),
        reason,
    };
    let mut regions = Vec::with_capacity(state.memory.len());
    for &(start, size) in &state.memory {
        let len = usize::try_from(size).map_err(|_| err(format!("region size {size}")))?;
        let mapping = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| err(format!("cannot map {size} bytes: {e}")))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| err(format!("region at {start:#x} overflows")))?;
        regions.push(region);
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| err(format!("regions: {e}")))?;
    // Kernel-mode faults too: KVM touches guest memory on the guest's behalf.
    let uffd = userfaultfd::UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .require_features(userfaultfd::FeatureFlags::EVENT_REMOVE)
        .create()
        .map_err(|e| {
            err(format!(
                "cannot create a userfaultfd ({e:?}; a kernel with CONFIG_USERFAULTFD, and root or vm.unprivileged_userfaultfd=1?)"
            ))
        })?;
    // SAFETY: sysconf with a constant name.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let mut mappings = Vec::with_capacity(state.memory.len());
    let mut offset = 0u64;
    for r in mem.iter() {
        let host = r
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| err(e.to_string()))?;
        uffd.register(host.cast(), r.len() as usize).map_err(|e| {
            err(format!(
                "cannot register guest memory with the userfaultfd: {e}"
            ))
        })?;
        mappings.push(UffdMapping {
            base_host_virt_addr: host as u64,
            size: r.len(),
            offset,
            page_size: page,
            page_size_kib: page / 1024,
        });
        offset += r.len();
    }
    let body = serde_json::to_vec(&mappings).map_err(|e| err(e.to_string()))?;
    let stream = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| err(format!("no page-fault handler listens there: {e}")))?;
    stream
        .send_with_fd(&body[..], std::os::fd::AsRawFd::as_raw_fd(&uffd))
        .map_err(|e| err(format!("cannot hand the userfaultfd over: {e}")))?;
    Ok(UffdMemory {
        mem,
        uffd,
        handler: stream,
    })
}

/// What [`uffd_memory`] sets up.
pub struct UffdMemory {
    /// Guest memory, filled by the handler.
    pub mem: GuestMemoryMmap,
    /// The userfaultfd (tern's copy).
    pub uffd: userfaultfd::Uffd,
    /// The connection to the handler.
    pub handler: std::os::unix::net::UnixStream,
}

/// Reads and checks a state file.
pub fn load_state(path: &Path) -> Result<VmState, SnapshotError> {
    Ok(snapshot_file::read(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::tempdir::TempDir;

    /// The state file's format as serde sees it (every struct's fields in order, every enum's
    /// variants, every type), traced by serde-reflection and compared with the one committed
    /// beside the format version that describes it (`vmm/snapshot-schema/ARCH.json`). postcard
    /// is not self-describing: a field added anywhere (a drive's `num_queues` once went in
    /// unnoticed this way) changes what a file means, so it must come with a new version.
    #[test]
    fn the_state_format_is_the_one_its_version_names() {
        use serde_reflection::{Tracer, TracerConfig};
        let mut tracer = Tracer::new(TracerConfig::default());
        // Every enum is traced on its own first, so that all its variants are known.
        tracer
            .trace_simple_type::<devices::virtio::DeviceState>()
            .unwrap();
        tracer
            .trace_simple_type::<crate::resources::IoEngineKind>()
            .unwrap();
        tracer.trace_simple_type::<VirtioKind>().unwrap();
        #[cfg(target_arch = "x86_64")]
        tracer
            .trace_simple_type::<crate::hypervisor::x86_state::MpState>()
            .unwrap();
        #[cfg(target_arch = "aarch64")]
        {
            use crate::hypervisor::arm_state::{ArmPower, ArmReg, GicReg};
            tracer.trace_simple_type::<ArmReg>().unwrap();
            tracer.trace_simple_type::<ArmPower>().unwrap();
            tracer.trace_simple_type::<GicReg>().unwrap();
        }
        // Enums deeper inside are explored one variant a pass.
        let mut passes = 0;
        while let Err(e) = tracer.trace_simple_type::<VmState>() {
            passes += 1;
            assert!(passes < 64, "tracing the state: {e}");
        }
        let registry = tracer.registry().unwrap();
        let schema = serde_json::to_string_pretty(&registry).unwrap();
        let arch = std::env::consts::ARCH;
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("snapshot-schema/{arch}.json"));
        let now = format!(
            "{{\"format_version\": {},\n\"types\": {schema}}}\n",
            crate::snapshot_file::FORMAT_VERSION
        );
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        if committed == now {
            return;
        }
        let committed_version = committed
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("{\"format_version\": "))
            .and_then(|v| v.trim_end_matches(',').parse::<u32>().ok());
        let same_version = committed_version == Some(crate::snapshot_file::FORMAT_VERSION);
        if std::env::var_os("TERN_BLESS_SCHEMA").is_some() && !same_version {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, now).unwrap();
            return;
        }
        panic!(
            "the snapshot state's format differs from {} ({}). A change to any type in the state \
             is a format change: bump FORMAT_VERSION in vmm/src/snapshot_file.rs, note it in \
             docs/snapshot-format.md, make the fixture again (cargo test --test payload -- \
             --ignored fixture::make), then write this file with TERN_BLESS_SCHEMA=1 cargo test \
             -p vmm the_state_format (it refuses to while the version is the same).\nnow:\n{now}",
            path.display(),
            if same_version {
                "same version"
            } else {
                "another version"
            }
        );
    }

    fn state(memory: Vec<(u64, u64)>) -> VmState {
        VmState {
            machine: MachineConfig::default(),
            drives: Vec::new(),
            net: Vec::new(),
            vsock: None,
            balloon: None,
            entropy: true,
            entropy_rate_limiter: None,
            memory,
            uart: UartState {
                regs: vec![1, 2, 3, 4, 5, 6, 7, 8, 9],
                rx: b"in".to_vec(),
            },
            virtio: vec![VirtioSnapshot {
                kind: VirtioKind::Rng,
                id: "rng".into(),
                pci: None,
                transport: devices::virtio::state::VirtioState {
                    device_type: 4,
                    queue_sel: 0,
                    device_features_sel: 0,
                    config_generation: 0,
                    driver_features_sel: 0,
                    driver_features: 0,
                    status: 0,
                    interrupt_status: 0,
                    queues: Vec::new(),
                    device: devices::virtio::DeviceState::Rng(devices::virtio::rng::RngState {
                        bytes_served: 7,
                    }),
                },
            }],
            #[cfg(target_arch = "x86_64")]
            vm: crate::hypervisor::X86VmState {
                clock_ns: 1_000_000,
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: crate::hypervisor::x86_state::IoapicState {
                    base_address: 0xfec0_0000,
                    ioregsel: 0,
                    id: 0,
                    irr: 0,
                    redirtbl: vec![1 << 16; 24],
                },
                pit: Default::default(),
            },
            #[cfg(target_arch = "aarch64")]
            gic: crate::hypervisor::ArmGicState {
                version: 3,
                regs: vec![(
                    crate::hypervisor::arm_state::GicReg::Dist { cpu: 0, offset: 0 },
                    0x12,
                )],
                its: Some(crate::hypervisor::ArmItsState {
                    regs: vec![(0x80, 0x1234)],
                    ctlr: 1,
                }),
            },
            vcpus: Vec::new(),
        }
    }

    /// A vCPU state with one register.
    #[cfg(target_arch = "aarch64")]
    fn vcpu_state() -> crate::hypervisor::ArmVcpuState {
        crate::hypervisor::ArmVcpuState {
            mpidr: 0x8000_0000,
            power: crate::hypervisor::arm_state::ArmPower::On,
            regs: vec![(
                crate::hypervisor::arm_state::ArmReg::Pstate,
                0x3c5u64.to_le_bytes().to_vec(),
            )],
        }
    }

    /// An x86 vCPU state of zeros.
    #[cfg(target_arch = "x86_64")]
    fn vcpu_state() -> crate::hypervisor::X86VcpuState {
        crate::hypervisor::X86VcpuState {
            cpuid: Vec::new(),
            tsc_khz: None,
            msrs: Vec::new(),
            regs: Default::default(),
            sregs: Default::default(),
            xsave: vec![0; 1024],
            xcrs: Vec::new(),
            debugregs: Default::default(),
            lapic: vec![0; 1024],
            events: Default::default(),
            mp_state: crate::hypervisor::x86_state::MpState::Runnable,
        }
    }

    #[test]
    fn state_round_trips_through_the_file_format() {
        let mut s = state(vec![(0, 4096), (1 << 32, 8192)]);
        #[cfg(target_arch = "x86_64")]
        {
            use crate::hypervisor::x86_state::{CpuidEntry, GeneralRegs, Msr};
            let regs = GeneralRegs {
                rip: 0xffff_ffff_8100_0000,
                ..Default::default()
            };
            let leaf = CpuidEntry {
                function: 1,
                index: 0,
                flags: 0,
                eax: 0x806f8,
                ebx: 0,
                ecx: 0x8000_0000,
                edx: 0,
            };
            s.vcpus.push(crate::hypervisor::X86VcpuState {
                cpuid: vec![leaf; 3],
                tsc_khz: Some(2_500_000),
                msrs: vec![Msr {
                    index: 0x10,
                    value: 12345,
                }],
                regs,
                ..vcpu_state()
            });
        }
        #[cfg(target_arch = "aarch64")]
        s.vcpus.push(vcpu_state());
        let bytes = snapshot_file::encode(&s, SnapshotArch::native()).unwrap();
        let back: VmState = snapshot_file::decode(&bytes, Path::new("s")).unwrap();
        assert_eq!(back.memory, s.memory);
        assert_eq!(back.uart, s.uart);
        assert_eq!(back.virtio, s.virtio);
        assert_eq!(back.memory_bytes(), 4096 + 8192);
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(back.vcpus[0].regs.rip, 0xffff_ffff_8100_0000);
            assert_eq!(back.vcpus[0].msrs[0].value, 12345);
            assert_eq!(back.vcpus[0], s.vcpus[0]);
            assert_eq!(back.vm, s.vm);
            assert_eq!(back.vcpus[0].tsc_khz, Some(2_500_000));
        }
        #[cfg(target_arch = "aarch64")]
        {
            assert_eq!(back.vcpus, s.vcpus);
            assert_eq!(back.gic, s.gic);
        }
    }

    #[test]
    fn inconsistent_states_are_refused() {
        let regions = crate::platform::ram_regions(128 << 20);
        let s = state(vec![(0, 4096)]);
        let e = s.check().unwrap_err().to_string();
        assert!(e.contains("0 vCPU states for 1 vCPUs"), "{e}");
        let mut s = state(regions);
        s.vcpus.push(vcpu_state());
        assert!(s.check().is_ok());
        s.memory[0].1 += 4096;
        assert!(s.check().unwrap_err().to_string().contains("RAM regions"));
        s.machine.mem_size_mib = u64::MAX;
        assert!(s.check().is_err());
    }

    #[test]
    fn memory_file_is_mapped_privately_and_must_fit() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("mem");
        let mut data = vec![0u8; 3 * 4096];
        data[4096] = 0xaa;
        data[2 * 4096 + 5] = 0xbb;
        std::fs::write(&path, &data).unwrap();
        let s = state(vec![(0, 4096), (0x10_0000, 2 * 4096)]);
        let mem = map_memory_file(&s, &path).unwrap();
        let b: u8 = mem.read_obj(GuestAddress(0x10_0000)).unwrap();
        assert_eq!(b, 0xaa);
        let b: u8 = mem.read_obj(GuestAddress(0x10_0000 + 4096 + 5)).unwrap();
        assert_eq!(b, 0xbb);
        // Guest writes stay in this process: the file is the snapshot for the next one too.
        mem.write_obj(0x55u8, GuestAddress(0)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        // Written back out, the regions come out in order.
        let out = dir.as_path().join("again");
        write_memory(&mem, &out).unwrap().commit().unwrap();
        let again = std::fs::read(&out).unwrap();
        assert_eq!(again.len(), data.len());
        assert_eq!(again[0], 0x55);
        assert_eq!(&again[1..], &data[1..]);
        // The wrong size is refused, naming both sizes.
        let small = state(vec![(0, 8 * 4096)]);
        let e = map_memory_file(&small, &path).unwrap_err().to_string();
        assert!(
            e.contains("12288 bytes") && e.contains("32768 bytes of RAM"),
            "{e}"
        );
        let e = map_memory_file(&s, &dir.as_path().join("absent")).unwrap_err();
        assert!(e.to_string().contains("absent"), "{e}");
        // A memory file that cannot be written leaves nothing behind.
        let bad = dir.as_path().join("no/dir/mem");
        assert!(write_memory(&mem, &bad).is_err());
        assert_eq!(std::fs::read_dir(dir.as_path()).unwrap().count(), 2);
    }

    #[test]
    fn a_diff_holds_only_dirty_pages_and_merges_onto_its_base() {
        const P: usize = 4096;
        let dir = TempDir::new().unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 64 * P),
            (GuestAddress(0x100_0000), 300 * P),
        ])
        .unwrap();
        for i in 0..364u64 {
            let at = if i < 64 {
                i * 4096
            } else {
                0x100_0000 + (i - 64) * 4096
            };
            mem.write_obj(i, GuestAddress(at + 8)).unwrap();
        }
        let base = dir.as_path().join("base");
        write_memory(&mem, &base).unwrap().commit().unwrap();

        // The guest writes pages 3 and 63 of the first region and a 260-page run (longer than
        // one write) of the second; the log says so.
        let log = devices::dirty::DirtyLog::new(&[(0, 64 * 4096), (0x100_0000, 300 * 4096)]);
        let writes: [(u64, usize); 3] = [
            (3 * 4096, 1),
            (63 * 4096 + 100, 1),
            (0x100_0000 + 20 * 4096, 260 * P),
        ];
        for (gpa, len) in writes {
            mem.write_slice(&vec![0xee; len], GuestAddress(gpa))
                .unwrap();
            log.mark(gpa, len as u64);
        }
        let bits = vec![log.bitmap(0), log.bitmap(1)];
        let diff = dir.as_path().join("diff");
        write_memory_diff(&mem, &diff, &bits)
            .unwrap()
            .commit()
            .unwrap();
        let full = dir.as_path().join("full");
        write_memory(&mem, &full).unwrap().commit().unwrap();

        // As large as a full file, and sparse: only the dirty pages take room.
        let meta = std::fs::metadata(&diff).unwrap();
        assert_eq!(meta.len(), 364 * 4096);
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 <= 280 * 4096,
            "{} blocks",
            meta.blocks()
        );

        // Merged onto the base, it is the full snapshot taken at the same point.
        let copied = merge_diff(&base, &diff).unwrap();
        assert!(copied >= 262 * 4096, "{copied}");
        assert_eq!(std::fs::read(&base).unwrap(), std::fs::read(&full).unwrap());

        // A diff of another size is not this base's.
        let other = dir.as_path().join("other");
        std::fs::write(&other, [1u8; 4096]).unwrap();
        let e = merge_diff(&base, &other).unwrap_err().to_string();
        assert!(e.contains("not its diff"), "{e}");
        assert!(merge_diff(&base, &dir.as_path().join("absent")).is_err());
    }

    #[test]
    fn zero_pages_are_holes_in_a_full_memory_file() {
        use std::os::unix::fs::MetadataExt;
        let dir = TempDir::new().unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        // Data in three places: one byte, a page's last byte, a 3-page run.
        mem.write_obj(1u8, GuestAddress(0)).unwrap();
        mem.write_obj(2u8, GuestAddress(5 * 4096 + 4095)).unwrap();
        mem.write_slice(&[3u8; 3 * 4096], GuestAddress(1000 * 4096))
            .unwrap();
        let path = dir.as_path().join("mem");
        write_memory(&mem, &path).unwrap().commit().unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 8 << 20);
        assert!(meta.blocks() * 512 <= 64 * 4096, "{} blocks", meta.blocks());
        let data = std::fs::read(&path).unwrap();
        let mut back = vec![0u8; 8 << 20];
        mem.read_slice(&mut back, GuestAddress(0)).unwrap();
        assert!(
            data == back,
            "the file reads back as guest memory, zeros included"
        );
    }
}
