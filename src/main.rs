//! `tern`: parse the command line, set up logging, build the VM and run it. Nothing else.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use vmm::logger::{self, LoggerConfig};
use vmm::vm::{Outcome, Payload, RunOptions};

/// Exit code when the guest kernel panicked.
const EXIT_GUEST_PANIC: u8 = 2;

/// tern: a micro-VMM. One process runs one VM.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Path of the API Unix socket (Firecracker dialect).
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
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("tern: error: {msg}");
    ExitCode::from(1)
}

fn open_log(path: &std::path::Path) -> std::io::Result<Box<dyn std::io::Write + Send>> {
    Ok(Box::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?,
    ))
}

fn main() -> ExitCode {
    let start = Instant::now();
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

    let Some(config_file) = cli.config_file.as_deref() else {
        return fail(
            "nothing to run: pass --config-file vm.json (the REST API on --api-sock is not implemented yet)",
        );
    };
    if !cli.no_api {
        eprintln!(
            "tern: warning: the REST API is not implemented yet; running {} without a socket at {}",
            config_file.display(),
            cli.api_sock.display()
        );
    }
    let (mut resources, logger_section) = match api::config::read_config(config_file) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    if let Some(l) = logger_section {
        if let Some(lv) = &l.level {
            match logger::parse_level(lv) {
                Some(lv) => log_cfg.level = lv,
                None => {
                    return fail(format!(
                        "config file {}: logger.level: {lv:?} is not a level",
                        config_file.display()
                    ));
                }
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
    logger::init(log_cfg, sink);
    resources.boot_timer = cli.boot_timer;
    // Everything that can be checked without the hypervisor is checked first.
    let host = vmm::resources::HostLimits::probe(usize::from(vmm::resources::MAX_VCPUS));
    if let Err(e) = resources.validate(&host) {
        return fail(e);
    }

    let hv = match vmm::hypervisor::kvm::KvmHypervisor::new() {
        Ok(h) => h,
        Err(e) => return fail(e),
    };
    let opts = RunOptions {
        start,
        console: None,
        console_input: vmm::console::ConsoleInput::TerminalStdin,
    };
    let outcome = vmm::vm::build(&hv, &resources, Payload::Linux, opts)
        .and_then(|vm| vm.run())
        .map(|r| r.outcome);
    match outcome {
        Ok(Outcome::PowerOff) => {
            log::info!("guest powered off");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Reset) => {
            log::info!("guest reset; tern exits (one process runs one boot)");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Panic) => {
            eprintln!("tern: the guest kernel panicked");
            ExitCode::from(EXIT_GUEST_PANIC)
        }
        Err(e) => fail(e),
    }
}
