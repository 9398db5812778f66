//! `tern`: parse the command line, set up logging, build the VM and run it. Nothing else.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use std::sync::{Arc, mpsc};

use clap::Parser;
use vmm::VmResources;
use vmm::console::ConsoleInput;
use vmm::controller::{Controller, RequestQueue, VmmAction};
use vmm::hypervisor::Hypervisor;
use vmm::logger::{self, LoggerConfig};
use vmm::vm::{Outcome, Payload, RunOptions};
use vmm_sys_util::eventfd::EventFd;

/// Exit code when the guest kernel panicked.
const EXIT_GUEST_PANIC: u8 = 2;
/// Exit code when a thread of tern's own panicked (a bug in tern: report it).
const EXIT_TERN_PANIC: i32 = 70;

/// A panic in any of tern's threads (a vCPU, a device worker, the API) ends the process, its
/// message on stderr and in the log: a VM left running without one of its threads would hang
/// its guest or its API clients with nothing saying why.
fn end_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        let thread = std::thread::current();
        log::error!(
            "thread {} panicked: {info}; tern ends (exit code {EXIT_TERN_PANIC}); this is a bug in tern",
            thread.name().unwrap_or("(unnamed)")
        );
        logger::flush();
        std::process::exit(EXIT_TERN_PANIC);
    }));
}

/// tern: a micro-VMM. One process runs one VM.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Path of the API Unix socket (Firecracker's REST API).
    #[arg(long, value_name = "PATH", default_value = "/run/tern.socket")]
    api_sock: PathBuf,
    /// Instance id, shown in log lines.
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// Boot the VM described by this Firecracker-format JSON file.
    #[arg(long, value_name = "PATH")]
    config_file: Option<PathBuf>,
    /// Run without the API socket (needs --config-file).
    #[arg(long)]
    no_api: bool,
    /// Write log lines to this file or FIFO instead of stderr.
    #[arg(long, value_name = "PATH")]
    log_path: Option<PathBuf>,
    /// Log level: Error, Warning, Info, Debug, Trace or Off.
    #[arg(long, default_value = "Info")]
    level: String,
    /// Prefix log lines with their level.
    #[arg(long)]
    show_level: bool,
    /// Prefix log lines with their source location.
    #[arg(long)]
    show_log_origin: bool,
    /// Add Firecracker's boot-timer device: a guest write of 123 to MMIO 0xc0000000 logs the
    /// time since tern started.
    #[arg(long)]
    boot_timer: bool,
    /// Put every virtio device on PCI (virtio-pci with MSI-X) instead of virtio-mmio, as
    /// Firecracker's --enable-pci does (x86_64).
    #[arg(long)]
    enable_pci: bool,
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    logger::flush();
    eprintln!("tern: error: {msg}");
    ExitCode::from(1)
}

fn open_log(path: &std::path::Path) -> std::io::Result<vmm::sink::Sink> {
    vmm::sink::Sink::open(path, "log")
}

fn main() -> ExitCode {
    let start = Instant::now();
    end_on_panic();
    // SIGUSR2 logs where each vCPU is in the guest (docs/testing.md).
    vmm::vcpu_dump::install();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };

    let Some(level) = logger::parse_level(&cli.level) else {
        return fail(format!(
            "--level: {:?} is not a level (use Error, Warning, Info, Debug, Trace or Off)",
            cli.level
        ));
    };
    let mut log_cfg = LoggerConfig {
        level,
        show_level: cli.show_level,
        show_log_origin: cli.show_log_origin,
        id: cli.id.clone(),
    };
    let mut log_path = cli.log_path.clone();

    let (mut resources, logger_section) = match cli.config_file.as_deref() {
        Some(path) => match api::config::read_config(path) {
            Ok(r) => r,
            Err(e) => return fail(e),
        },
        None if cli.no_api => {
            return fail("--no-api needs --config-file vm.json (nothing else describes the VM)");
        }
        None => (VmResources::default(), None),
    };
    if let Some(l) = logger_section {
        if let Some(lv) = &l.level {
            match logger::parse_level(lv) {
                Some(lv) => log_cfg.level = lv,
                None => return fail(format!("logger.level: {lv:?} is not a level")),
            }
        }
        log_cfg.show_level |= l.show_level.unwrap_or(false);
        log_cfg.show_log_origin |= l.show_log_origin.unwrap_or(false);
        if l.log_path.is_some() {
            log_path = l.log_path.map(PathBuf::from);
        }
    }
    let sink = match log_path.as_deref().map(open_log).transpose() {
        Ok(s) => s,
        Err(e) => {
            return fail(format!(
                "log path {}: {e}",
                log_path.unwrap_or_default().display()
            ));
        }
    };
    if let Err(e) = logger::init(log_cfg.clone(), sink) {
        return fail(format!("cannot start the logger: {e}"));
    }
    resources.boot_timer = cli.boot_timer;
    resources.enable_pci = cli.enable_pci;

    let outcome = if cli.no_api {
        run_without_api(&resources, start)
    } else {
        run_with_api(&cli, resources, log_cfg, start)
    };
    let code = match outcome {
        Ok(Outcome::PowerOff) => {
            log::info!("guest powered off");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Reset) => {
            log::info!("guest reset; tern exits (one process runs one boot)");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Panic) => {
            logger::flush();
            eprintln!("tern: the guest kernel panicked");
            ExitCode::from(EXIT_GUEST_PANIC)
        }
        Err(e) => return fail(e),
    };
    logger::flush();
    code
}

/// The API socket path, for the signal handler to remove.
static SOCKET_PATH: std::sync::OnceLock<std::ffi::CString> = std::sync::OnceLock::new();

extern "C" fn remove_socket_and_exit(
    sig: libc::c_int,
    _: *mut libc::siginfo_t,
    _: *mut libc::c_void,
) {
    if let Some(p) = SOCKET_PATH.get() {
        // SAFETY: unlink and _exit are async-signal-safe; the path is a valid C string that
        // lives for the whole process.
        unsafe { libc::unlink(p.as_ptr()) };
    }
    // SAFETY: _exit ends the process without running anything else.
    unsafe { libc::_exit(128 + sig) };
}

/// On SIGTERM, SIGINT or SIGHUP: remove the API socket, exit with 128 + the signal.
fn remove_on_signal(sock: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    if let Ok(c) = std::ffi::CString::new(sock.as_os_str().as_bytes()) {
        let _ = SOCKET_PATH.set(c);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            if let Err(e) =
                vmm_sys_util::signal::register_signal_handler(sig, remove_socket_and_exit)
            {
                log::warn!("cannot handle signal {sig}: {e}");
            }
        }
    }
}

fn kvm() -> Result<Arc<dyn Hypervisor>, vmm::Error> {
    Ok(Arc::new(vmm::hypervisor::kvm::KvmHypervisor::new()?))
}

/// `--no-api`: check everything that needs no hypervisor, then boot and run to the end.
fn run_without_api(resources: &VmResources, start: Instant) -> Result<Outcome, String> {
    let host = vmm::resources::HostLimits::probe(usize::from(vmm::resources::MAX_VCPUS));
    resources.validate(&host).map_err(|e| e.to_string())?;
    let hv = kvm().map_err(|e| e.to_string())?;
    let opts = RunOptions {
        start,
        console: None,
        console_input: ConsoleInput::TerminalStdin,
    };
    vmm::vm::build(hv.as_ref(), resources, Payload::Linux, opts)
        .and_then(|vm| vm.run())
        .map(|r| r.outcome)
        .map_err(|e| e.to_string())
}

/// The API socket: serve until the VM, once started, stops. With `--config-file` the VM
/// starts right away, as in Firecracker.
fn run_with_api(
    cli: &Cli,
    resources: VmResources,
    log_cfg: LoggerConfig,
    start: Instant,
) -> Result<Outcome, String> {
    if cli.config_file.is_some() {
        let host = vmm::resources::HostLimits::probe(usize::from(vmm::resources::MAX_VCPUS));
        resources.validate(&host).map_err(|e| e.to_string())?;
    }
    let listener = api::server::bind(&cli.api_sock).map_err(|e| e.to_string())?;
    let sock = cli.api_sock.clone();
    remove_on_signal(&sock);
    let result = (|| {
        let (tx, rx) = mpsc::channel();
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
        let api_wake = wake.try_clone().map_err(|e| format!("eventfd: {e}"))?;
        api::server::spawn(listener, tx, api_wake).map_err(|e| format!("API thread: {e}"))?;
        metrics::METRICS
            .api_server
            .process_startup_time_us
            .set(start.elapsed().as_micros() as u64);
        metrics::METRICS
            .api_server
            .process_startup_time_cpu_us
            .set(devices::legacy::boot_timer::process_cpu_time().as_micros() as u64);
        log::info!("API socket ready at {}", sock.display());
        let mut ctl = Controller::new(
            cli.id.clone(),
            start,
            resources,
            log_cfg,
            Box::new(kvm),
            ConsoleInput::TerminalStdin,
        );
        let first = cli
            .config_file
            .is_some()
            .then_some(VmmAction::InstanceStart);
        ctl.serve(RequestQueue { rx, wake }, first)
            .map(|r| r.outcome)
            .map_err(|e| e.to_string())
    })();
    let _ = std::fs::remove_file(&sock);
    result
}
