//! Tiny guest payloads on the host's KVM, no nest: 32-bit code assembled here exercises the vCPU
//! loop, PIO and MMIO dispatch, the UART, the i8042 reset, ACPI power-off, the boot timer and
//! the triple-fault path. These run on any host with a usable /dev/kvm (kvm_pvm included).

use std::time::Instant;

use devices::interrupt::SharedBuf;

use vmm::VmResources;
use vmm::console::ConsoleInput;
use vmm::hypervisor::kvm::KvmHypervisor;
use vmm::vm::{Outcome, Payload, RunOptions, RunReport};

const LOAD_ADDR: u64 = 0x10_0000;

/// A tiny x86 assembler: just the instructions these payloads use.
#[derive(Default)]
struct Asm(Vec<u8>);

impl Asm {
    fn mov_dx(mut self, port: u16) -> Self {
        self.0.extend([0x66, 0xba]);
        self.0.extend(port.to_le_bytes());
        self
    }
    fn mov_al(mut self, v: u8) -> Self {
        self.0.extend([0xb0, v]);
        self
    }
    fn out_dx_al(mut self) -> Self {
        self.0.push(0xee);
        self
    }
    fn in_al_dx(mut self) -> Self {
        self.0.push(0xec);
        self
    }
    fn out_imm_al(mut self, port: u8) -> Self {
        self.0.extend([0xe6, port]);
        self
    }
    /// mov byte [addr], v
    fn store8(mut self, addr: u32, v: u8) -> Self {
        self.0.extend([0xc6, 0x05]);
        self.0.extend(addr.to_le_bytes());
        self.0.push(v);
        self
    }
    /// mov al, [addr]
    fn load8(mut self, addr: u32) -> Self {
        self.0.push(0xa0);
        self.0.extend(addr.to_le_bytes());
        self
    }
    fn print(self, text: &[u8]) -> Self {
        text.iter()
            .fold(self.mov_dx(0x3f8), |a, &c| a.mov_al(c).out_dx_al())
    }
    fn print_al(self) -> Self {
        self.mov_dx(0x3f8).out_dx_al()
    }
    fn ud2(mut self) -> Self {
        self.0.extend([0x0f, 0x0b]);
        self
    }
    fn raw(mut self, bytes: &[u8]) -> Self {
        self.0.extend(bytes);
        self
    }
    fn hlt(mut self) -> Self {
        self.0.push(0xf4);
        self
    }
    /// i8042 reset, as `reboot=k` does.
    fn reset(self) -> Self {
        self.mov_al(0xfe).out_imm_al(0x64).hlt()
    }
    /// ACPI S5: SLP_TYP=5 | SLP_EN to the sleep control port.
    fn poweroff(self) -> Self {
        self.mov_dx(0x600)
            .mov_al((5 << 2) | (1 << 5))
            .out_dx_al()
            .hlt()
    }
}

fn kvm() -> Option<KvmHypervisor> {
    match KvmHypervisor::new() {
        Ok(h) => Some(h),
        Err(e) => {
            eprintln!("SKIPPED: no usable KVM on this host: {e}");
            None
        }
    }
}

/// Runs `code` in a 16 MiB VM shaped by `tweak`; returns the report and the console output
/// (captured unless `tweak` sets a serial output path).
fn run_with(code: Asm, tweak: impl FnOnce(&mut VmResources)) -> Option<(RunReport, Vec<u8>)> {
    run_with_input(code, tweak, ConsoleInput::None)
}

fn run_with_input(
    code: Asm,
    tweak: impl FnOnce(&mut VmResources),
    mut input: ConsoleInput,
) -> Option<(RunReport, Vec<u8>)> {
    let hv = kvm()?;
    let mut res = VmResources::default();
    res.machine_config.mem_size_mib = 16;
    tweak(&mut res);
    let console = SharedBuf::default();
    let opts = RunOptions {
        start: Instant::now(),
        console: res
            .serial_out_path
            .is_none()
            .then(|| Box::new(console.clone()) as Box<dyn std::io::Write + Send>),
        console_input: std::mem::replace(&mut input, ConsoleInput::None),
    };
    let payload = Payload::Flat32 {
        code: &code.0,
        load_addr: LOAD_ADDR,
    };
    let report = vmm::vm::build(&hv, &res, payload, opts)
        .and_then(|vm| vm.run())
        .expect("payload VM runs");
    Some((report, console.contents()))
}

fn run(code: Asm, vcpus: u8, boot_timer: bool) -> Option<(RunReport, Vec<u8>)> {
    run_with(code, |r| {
        r.machine_config.vcpu_count = vcpus;
        r.boot_timer = boot_timer;
    })
}

#[test]
fn serial_output_then_i8042_reset() {
    let Some((r, out)) = run(
        Asm::default().print(b"Hi from a payload\n").reset(),
        1,
        false,
    ) else {
        return;
    };
    assert_eq!(out, b"Hi from a payload\n");
    assert_eq!(r.outcome, Outcome::Reset);
}

#[test]
fn acpi_s5_powers_off() {
    let Some((r, out)) = run(Asm::default().print(b"bye").poweroff(), 1, false) else {
        return;
    };
    assert_eq!(out, b"bye");
    assert_eq!(r.outcome, Outcome::PowerOff);
}

#[test]
fn uart_line_status_reads_transmitter_empty() {
    // in al, 0x3fd (LSR) and print it: THR empty | transmitter empty = 0x60.
    let code = Asm::default()
        .mov_dx(0x3fd)
        .in_al_dx()
        .print_al()
        .poweroff();
    let Some((_, out)) = run(code, 1, false) else {
        return;
    };
    assert_eq!(out, [0x60]);
}

#[test]
fn unhandled_pio_and_mmio_reads_return_all_ones() {
    let code = Asm::default()
        .mov_dx(0x1234)
        .in_al_dx()
        .print_al()
        .load8(0xd000_0000)
        .print_al()
        .store8(0xd000_0000, 1) // a write to nowhere is dropped
        .poweroff();
    let Some((r, out)) = run(code, 1, false) else {
        return;
    };
    assert_eq!(out, [0xff, 0xff]);
    assert_eq!(r.outcome, Outcome::PowerOff);
}

#[test]
fn boot_timer_measures_the_magic_write() {
    let code = Asm::default().store8(0xc000_0000, 123).poweroff();
    let Some((r, _)) = run(code, 1, true) else {
        return;
    };
    let (wall, cpu) = r.boot_time.expect("boot timer saw the magic byte");
    assert!(wall > std::time::Duration::ZERO && cpu > std::time::Duration::ZERO);
}

#[test]
fn boot_timer_is_absent_without_the_flag() {
    let code = Asm::default().store8(0xc000_0000, 123).poweroff();
    let Some((r, _)) = run(code, 1, false) else {
        return;
    };
    assert_eq!(r.boot_time, None);
}

#[test]
fn triple_fault_resets() {
    // #UD with an empty IDT escalates to a triple fault: KVM_EXIT_SHUTDOWN.
    let Some((r, out)) = run(Asm::default().print(b"x").ud2(), 1, false) else {
        return;
    };
    assert_eq!(out, b"x");
    assert_eq!(r.outcome, Outcome::Reset);
}

#[test]
fn several_vcpus_are_created_and_the_boot_vcpu_runs() {
    let Some((r, out)) = run(Asm::default().print(b"4").poweroff(), 4, false) else {
        return;
    };
    assert_eq!(out, b"4");
    assert_eq!(r.outcome, Outcome::PowerOff);
}

#[test]
fn serial_output_goes_to_the_configured_file() {
    let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("serial-out.txt");
    let _ = std::fs::remove_file(&path);
    let code = Asm::default().print(b"to a file\n").poweroff();
    let Some((r, captured)) = run_with(code, |res| res.serial_out_path = Some(path.clone())) else {
        return;
    };
    assert_eq!(r.outcome, Outcome::PowerOff);
    assert!(captured.is_empty());
    assert_eq!(std::fs::read(&path).unwrap(), b"to a file\n");
}

#[test]
fn console_input_reaches_the_guest_uart() {
    // Echo loop: wait for LSR data-ready, read RBR, write it back, until a newline.
    let code = Asm::default()
        .raw(&[0x66, 0xba, 0xfd, 0x03]) // 0: mov dx, 0x3fd (LSR)
        .raw(&[0xec]) // 4: in al, dx
        .raw(&[0xa8, 0x01]) // 5: test al, 1 (data ready)
        .raw(&[0x74, 0xf7]) // 7: jz 0
        .raw(&[0x66, 0xba, 0xf8, 0x03]) // 9: mov dx, 0x3f8 (RBR/THR)
        .raw(&[0xec, 0xee]) // 13: in al, dx; out dx, al
        .raw(&[0x3c, 0x0a]) // 15: cmp al, '\n'
        .raw(&[0x75, 0xed]) // 17: jne 0
        .poweroff();
    let (rx, tx) = std::io::pipe().expect("pipe");
    let mut tx = std::fs::File::from(std::os::fd::OwnedFd::from(tx));
    // More than the UART's 64-byte FIFO, so the input has to wait for the guest to drain it.
    let text: Vec<u8> = (0..200)
        .map(|i| b'a' + (i % 26) as u8)
        .chain(*b"\n")
        .collect();
    std::io::Write::write_all(&mut tx, &text).unwrap();
    let input = ConsoleInput::File(std::fs::File::from(std::os::fd::OwnedFd::from(rx)));
    let Some((r, out)) = run_with_input(code, |_| {}, input) else {
        return;
    };
    assert_eq!(r.outcome, Outcome::PowerOff);
    assert_eq!(out, text);
}

#[test]
fn cmos_clock_is_readable() {
    // Select the status register A and print it: UIP must be clear (0x26).
    let code = Asm::default()
        .mov_al(0x0a)
        .out_imm_al(0x70)
        .mov_dx(0x71)
        .in_al_dx()
        .print_al()
        .poweroff();
    let Some((_, out)) = run(code, 1, false) else {
        return;
    };
    assert_eq!(out, [0x26]);
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    let Some(hv) = kvm() else { return };
    const DOTS: u32 = 100_000;
    // mov ecx, DOTS; mov dx, 0x3f8; mov al, '.'; 1: out dx, al; loop 1b; poweroff
    let mut code = Asm::default().raw(&[0xb9]).raw(&DOTS.to_le_bytes());
    code = code
        .mov_dx(0x3f8)
        .mov_al(b'.')
        .raw(&[0xee, 0xe2, 0xfd])
        .poweroff();
    let mut res = VmResources::default();
    res.machine_config.mem_size_mib = 16;
    res.machine_config.vcpu_count = 2;
    let console = SharedBuf::default();
    let opts = RunOptions {
        start: Instant::now(),
        console: Some(Box::new(console.clone())),
        console_input: ConsoleInput::None,
    };
    let built = vmm::vm::build(
        &hv,
        &res,
        Payload::Flat32 {
            code: &code.0,
            load_addr: LOAD_ADDR,
        },
        opts,
    )
    .expect("payload VM builds");
    let mut em = vmm::vm::EventLoop::new().unwrap();
    let mut vm = built.start(&mut em).expect("starts");
    let len = || console.contents().len();
    let sleep = |ms| std::thread::sleep(std::time::Duration::from_millis(ms));

    while len() == 0 {
        sleep(1);
    }
    vm.pause().expect("pauses");
    assert!(vm.is_paused());
    let at_pause = len();
    sleep(200);
    assert_eq!(len(), at_pause, "the guest made progress while paused");
    assert!(vm.finished().is_none());
    vm.pause().expect("pausing twice is harmless");

    vm.resume();
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    let report = loop {
        if let Some(r) = vm.finished() {
            break r.expect("clean stop");
        }
        assert!(Instant::now() < deadline, "payload did not finish");
        sleep(5);
    };
    assert!(
        at_pause < DOTS as usize,
        "paused after the guest had finished; nothing tested"
    );
    assert_eq!(report.outcome, Outcome::PowerOff);
    assert_eq!(len(), DOTS as usize, "every dot exactly once");
}

/// The snapshot fixture under tests/fixtures/x86_64: a payload VM with an entropy device and a
/// balloon, snapshotted while it polls the UART for a byte. The state and memory files are
/// committed; every later build must load them and run the VM to its end (or bump the format
/// version and say so: docs/snapshot-format.md).
/// `cargo test --test payload -- --ignored fixture::make` makes them again.
mod fixture {
    use super::*;
    use std::path::PathBuf;

    /// The smallest guest: its memory file is 1 MiB (git stores its zeros in a few KiB).
    const MEM_MIB: u64 = 1;
    /// Low memory, above the boot structures and below the EBDA (arch::x86_64::layout).
    const FIXTURE_LOAD_ADDR: u64 = 0x3_0000;

    fn dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/x86_64")
    }

    /// Prints "before\n", waits for a byte on COM1, prints "after <byte>\n" and powers off.
    fn code() -> Asm {
        Asm::default()
            .print(b"before\n")
            .mov_dx(0x3fd)
            // poll: in al, dx; test al, 1 (data ready); jz poll
            .raw(&[0xec, 0xa8, 0x01, 0x74, 0xfb])
            .mov_dx(0x3f8)
            .in_al_dx()
            .raw(&[0x88, 0xc3]) // mov bl, al
            .print(b"after ")
            .raw(&[0x88, 0xd8]) // mov al, bl
            .print_al()
            .print(b"\n")
            .poweroff()
    }

    fn resources() -> VmResources {
        let mut res = VmResources::default();
        res.machine_config.mem_size_mib = MEM_MIB;
        res.entropy = true;
        res.balloon = Some(vmm::resources::BalloonConfig {
            amount_mib: 0,
            deflate_on_oom: false,
            stats_polling_interval_s: 1,
            free_page_reporting: false,
        });
        res
    }

    /// Makes the fixture again (after a format change).
    #[test]
    #[ignore = "makes the snapshot fixture: cargo test --test payload -- --ignored fixture::make"]
    fn make() {
        let hv = kvm().expect("making the fixture needs KVM");
        let console = SharedBuf::default();
        let opts = RunOptions {
            start: Instant::now(),
            console: Some(Box::new(console.clone())),
            console_input: ConsoleInput::None,
        };
        let code = code();
        let payload = Payload::Flat32 {
            code: &code.0,
            load_addr: FIXTURE_LOAD_ADDR,
        };
        let mut em = vmm::vm::EventLoop::new().unwrap();
        let mut vm = vmm::vm::build(&hv, &resources(), payload, opts)
            .and_then(|b| b.start(&mut em))
            .expect("payload VM starts");
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        while console.contents() != b"before\n" {
            assert!(Instant::now() < deadline, "{:?}", console.contents());
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        vm.pause().expect("pauses");
        std::fs::create_dir_all(dir()).unwrap();
        vm.snapshot(
            vmm::snapshot::SnapshotType::Full,
            &dir().join("payload.state"),
            &dir().join("payload.mem"),
        )
        .expect("snapshot");
        eprintln!("made {}", dir().display());
    }

    /// Wave 2's first snapshot format, loaded by this build: the VM continues where it was
    /// (the UART, the vCPU in its polling loop, the devices' typed state all restored).
    #[test]
    fn an_earlier_builds_snapshot_loads_and_runs_to_its_end() {
        let Some(hv) = kvm() else {
            return;
        };
        let state = vmm::snapshot::load_state(&dir().join("payload.state"))
            .and_then(|s| s.check().map(|()| s))
            .unwrap_or_else(|e| {
                panic!("the committed fixture no longer loads: {e}. If the format changed on purpose, bump FORMAT_VERSION, note it in docs/snapshot-format.md and make the fixture again (cargo test --test payload -- --ignored fixture::make)")
            });
        let kinds: Vec<_> = state
            .virtio
            .iter()
            .map(|v| v.transport.device.kind())
            .collect();
        assert_eq!(kinds, ["virtio-balloon", "virtio-rng"]);
        let res = state.resources(&VmResources::default());
        let (reader, mut writer) = std::io::pipe().unwrap();
        std::io::Write::write_all(&mut writer, b"x").unwrap();
        drop(writer);
        let console = SharedBuf::default();
        let opts = RunOptions {
            start: Instant::now(),
            console: Some(Box::new(console.clone())),
            console_input: ConsoleInput::File(std::fs::File::from(std::os::fd::OwnedFd::from(
                reader,
            ))),
        };
        let mem = dir().join("payload.mem");
        let payload = Payload::Snapshot {
            state: &state,
            memory: vmm::vm::MemBackend::File(&mem),
        };
        let report = vmm::vm::build(&hv, &res, payload, opts)
            .and_then(|vm| vm.run())
            .expect("the restored VM runs");
        // Only what the guest printed after the restore: "before" went out before the snapshot.
        assert_eq!(String::from_utf8_lossy(&console.contents()), "after x\n");
        assert_eq!(report.outcome, Outcome::PowerOff);
    }
}
