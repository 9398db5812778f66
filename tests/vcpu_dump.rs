//! SIGUSR2 makes tern log where each vCPU is in the guest (`vmm::vcpu_dump`). A test binary
//! of its own: the signal and the request it raises are process-wide.

#![cfg(target_arch = "x86_64")]

use std::sync::Mutex;
use std::time::{Duration, Instant};

use devices::interrupt::SharedBuf;
use vmm::VmResources;
use vmm::console::ConsoleInput;
use vmm::hypervisor::kvm::KvmHypervisor;
use vmm::vm::{Payload, RunOptions};

const LOAD_ADDR: u64 = 0x10_0000;

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, r: &log::Record) {
        LINES
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(r.args().to_string());
    }
    fn flush(&self) {}
}

fn lines() -> Vec<String> {
    LINES.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Waits (up to a minute, for slow hosts) for `done` to hold.
fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "{what} did not happen");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn sigusr2_logs_where_a_stuck_guest_is() {
    let hv = match KvmHypervisor::new() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("SKIPPED: no usable KVM on this host: {e}");
            return;
        }
    };
    log::set_logger(&Capture).expect("the only logger");
    log::set_max_level(log::LevelFilter::Warn);
    vmm::vcpu_dump::install();
    // Prints "R", then spins with interrupts off at LOAD_ADDR + 8, as a guest that stopped
    // making progress may.
    let code: &[u8] = &[
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'R', // mov al, 'R'
        0xee, // out dx, al
        0xfa, // cli
        0xeb, 0xfe, // jmp $
    ];
    let mut res = VmResources::default();
    res.machine_config.mem_size_mib = 16;
    let console = SharedBuf::default();
    let opts = RunOptions {
        start: Instant::now(),
        console: Some(Box::new(console.clone())),
        console_input: ConsoleInput::None,
    };
    let vm = vmm::vm::build(
        &hv,
        &res,
        Payload::Flat32 {
            code,
            load_addr: LOAD_ADDR,
        },
        opts,
    )
    .expect("payload VM builds");
    // The VM never stops; the thread ends with the test process.
    std::thread::spawn(move || vm.run());
    wait_for("the guest's R", || console.contents() == b"R");
    // SAFETY: kill(2) of this process; the handler tern installed takes it.
    assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGUSR2) }, 0);
    wait_for("vCPU dump end", || {
        lines().iter().any(|l| l.contains("vCPU dump end"))
    });
    let all = lines();
    let dump = all
        .iter()
        .find(|l| l.starts_with("vCPU 0 dump: "))
        .unwrap_or_else(|| panic!("no vCPU 0 line: {all:?}"));
    assert!(
        dump.contains(&format!("rip {:#x} ", LOAD_ADDR + 8)),
        "{dump}"
    );
    assert!(dump.contains("(IF 0)"), "{dump}");
}
