//! vCPU threads: run guest code, dispatch PIO/MMIO exits to the buses, report stops.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::Killable;

use devices::Bus;
use devices::exit::GuestExit;

use crate::exit::{ExitChannel, VmStop};
use crate::hypervisor::{Vcpu, VcpuExit};

/// The buses a vCPU dispatches to.
#[derive(Clone)]
pub struct Buses {
    /// Port I/O (x86).
    pub pio: Arc<Bus>,
    /// Memory-mapped I/O.
    pub mmio: Arc<Bus>,
}

/// What the run loop does after one exit.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Run the vCPU again.
    Continue,
    /// Stop this vCPU thread.
    Stop,
}

/// Handles one exit: device accesses go to the buses (reads from nowhere return all ones,
/// writes to nowhere are dropped), stop conditions are posted to `exit`.
pub fn handle_exit(index: u8, exit: VcpuExit<'_>, buses: &Buses, stop: &ExitChannel) -> Next {
    let m = &metrics::METRICS.vcpu;
    match &exit {
        VcpuExit::IoIn(..) => m.exit_io_in.inc(),
        VcpuExit::IoOut(..) => m.exit_io_out.inc(),
        VcpuExit::MmioRead(..) => m.exit_mmio_read.inc(),
        VcpuExit::MmioWrite(..) => m.exit_mmio_write.inc(),
        VcpuExit::Unhandled(_) => m.failures.inc(),
        _ => {}
    }
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !buses.pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            if !buses.pio.write(u64::from(port), data) {
                log::trace!("vcpu{index}: unhandled out {port:#x} {data:?}");
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            if !buses.mmio.read(addr, data) {
                log::debug!("vcpu{index}: unhandled MMIO read at {addr:#x}");
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !buses.mmio.write(addr, data) {
                log::debug!("vcpu{index}: unhandled MMIO write at {addr:#x}");
            }
        }
        VcpuExit::Interrupted => {}
        VcpuExit::Shutdown => {
            log::warn!("vcpu{index}: triple fault (KVM_EXIT_SHUTDOWN): the guest resets");
            stop.post(VmStop::Guest(GuestExit::Reset));
            return Next::Stop;
        }
        VcpuExit::Hlt | VcpuExit::SystemOff => {
            stop.post(VmStop::Guest(GuestExit::PowerOff));
            return Next::Stop;
        }
        VcpuExit::SystemReset => {
            stop.post(VmStop::Guest(GuestExit::Reset));
            return Next::Stop;
        }
        VcpuExit::Unhandled(what) => {
            stop.post(VmStop::VcpuFailed {
                index,
                reason: what,
            });
            return Next::Stop;
        }
    }
    Next::Continue
}

/// The signal that kicks a vCPU thread out of `KVM_RUN` (its handler does nothing; the
/// interrupted `KVM_RUN` returns `EINTR`).
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> std::io::Result<()> {
    static INSTALLED: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
                .map_err(|e| e.errno())
        })
        .map_err(std::io::Error::from_raw_os_error)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    Running,
    PauseRequested,
    Paused,
}

/// Work for a paused vCPU thread, which owns the vCPU (reading or writing its state for a
/// snapshot).
type Job = Box<dyn FnOnce(&mut dyn crate::hypervisor::Vcpu) + Send>;

/// What the VMM thread and one vCPU thread share to pause and resume it.
pub struct VcpuControl {
    state: Mutex<RunState>,
    changed: Condvar,
    job: Mutex<Option<Job>>,
}

impl VcpuControl {
    fn new() -> Self {
        Self {
            state: Mutex::new(RunState::Running),
            changed: Condvar::new(),
            job: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by the vCPU thread between runs: parks it while a pause is requested, doing the
    /// jobs [`run_on_paused`] hands it meanwhile.
    fn checkpoint(&self, vcpu: &mut dyn crate::hypervisor::Vcpu) {
        let mut st = self.lock();
        if *st == RunState::PauseRequested {
            *st = RunState::Paused;
            self.changed.notify_all();
            while *st == RunState::Paused {
                let job = self.job.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(job) = job {
                    drop(st);
                    job(vcpu);
                    st = self.lock();
                    continue;
                }
                st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        }
    }
}

/// The VMM thread's handle on a running vCPU thread.
pub struct VcpuHandle {
    index: u8,
    thread: JoinHandle<()>,
    control: Arc<VcpuControl>,
}

/// Errors pausing vCPUs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PauseError {
    /// A vCPU did not stop in time.
    #[error("vCPU {0} did not pause within {1:?}")]
    Timeout(u8, Duration),
}

/// Pauses every vCPU: each finishes its current exit and parks. Signals kick the ones inside
/// `KVM_RUN`; the kick is repeated until all have parked, which closes the window where a
/// signal lands just before a thread re-enters `KVM_RUN`.
pub fn pause_all(vcpus: &[VcpuHandle], timeout: Duration) -> Result<(), PauseError> {
    for v in vcpus {
        let mut st = v.control.lock();
        if *st == RunState::Running {
            *st = RunState::PauseRequested;
        }
    }
    let deadline = Instant::now() + timeout;
    loop {
        let mut waiting = None;
        for v in vcpus {
            if *v.control.lock() != RunState::Paused {
                waiting = Some(v.index);
                if let Err(e) = v.thread.kill(kick_signal()) {
                    log::debug!("vcpu{}: kick: {e}", v.index);
                }
            }
        }
        let Some(index) = waiting else { return Ok(()) };
        if v_finished(vcpus, index) {
            // A thread that already ended (the VM is stopping) counts as paused.
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(PauseError::Timeout(index, timeout));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn v_finished(vcpus: &[VcpuHandle], index: u8) -> bool {
    vcpus
        .iter()
        .any(|v| v.index == index && v.thread.is_finished())
}

/// Runs `f` on a paused vCPU's own thread (which owns the vCPU) and returns its result; an
/// error when the vCPU is not paused or does not answer within `timeout`.
pub fn run_on_paused<R: Send + 'static>(
    v: &VcpuHandle,
    timeout: Duration,
    f: impl FnOnce(&mut dyn crate::hypervisor::Vcpu) -> R + Send + 'static,
) -> Result<R, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let mut st = v.control.lock();
        // A vCPU started paused parks at its first checkpoint: wait for it to get there.
        let deadline = Instant::now() + timeout;
        while *st == RunState::PauseRequested && !v.thread.is_finished() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = v
                .control
                .changed
                .wait_timeout(st, left.min(Duration::from_millis(10)))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        if *st != RunState::Paused || v.thread.is_finished() {
            return Err(format!("vCPU {} is not paused", v.index));
        }
        *v.control.job.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(move |vcpu| {
            let _ = tx.send(f(vcpu));
        }));
        v.control.changed.notify_all();
    }
    rx.recv_timeout(timeout)
        .map_err(|e| format!("vCPU {} did not answer: {e}", v.index))
}

/// Lets every paused vCPU run again.
pub fn resume_all(vcpus: &[VcpuHandle]) {
    for v in vcpus {
        let mut st = v.control.lock();
        *st = RunState::Running;
        v.control.changed.notify_all();
    }
}

/// Starts vCPU `index` on its own thread.
pub fn spawn(
    index: u8,
    mut vcpu: Box<dyn Vcpu>,
    buses: Buses,
    stop: Arc<ExitChannel>,
    paused: bool,
) -> std::io::Result<VcpuHandle> {
    install_kick_handler()?;
    let control = Arc::new(VcpuControl::new());
    if paused {
        // It parks at its first checkpoint, before ever entering KVM_RUN.
        *control.lock() = RunState::PauseRequested;
    }
    let ctl = control.clone();
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || {
            loop {
                ctl.checkpoint(vcpu.as_mut());
                let next = match vcpu.run() {
                    Ok(exit) => handle_exit(index, exit, &buses, &stop),
                    Err(e) => {
                        stop.post(VmStop::VcpuFailed {
                            index,
                            reason: e.to_string(),
                        });
                        Next::Stop
                    }
                };
                if next == Next::Stop || stop.is_stopping() {
                    break;
                }
            }
        })?;
    Ok(VcpuHandle {
        index,
        thread,
        control,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::BusDevice;
    use std::sync::Mutex;

    struct Const(u8);
    impl BusDevice for Const {
        fn read(&mut self, _o: u64, d: &mut [u8]) {
            d.fill(self.0);
        }
        fn write(&mut self, _o: u64, d: &[u8]) {
            self.0 = d[0];
        }
    }

    fn buses() -> Buses {
        let mut pio = Bus::new();
        pio.insert(Arc::new(Mutex::new(Const(0x42))), 0x80, 1)
            .unwrap();
        Buses {
            pio: Arc::new(pio),
            mmio: Arc::new(Bus::new()),
        }
    }

    #[test]
    fn pio_dispatch_and_unhandled_reads() {
        let b = buses();
        let c = ExitChannel::new().unwrap();
        let mut d = [0u8; 1];
        assert_eq!(
            handle_exit(0, VcpuExit::IoIn(0x80, &mut d), &b, &c),
            Next::Continue
        );
        assert_eq!(d[0], 0x42);
        assert_eq!(
            handle_exit(0, VcpuExit::IoOut(0x80, &[7]), &b, &c),
            Next::Continue
        );
        handle_exit(0, VcpuExit::IoIn(0x80, &mut d), &b, &c);
        assert_eq!(d[0], 7);
        let mut w = [0u8; 4];
        handle_exit(0, VcpuExit::MmioRead(0x1000, &mut w), &b, &c);
        assert_eq!(w, [0xff; 4]);
        assert_eq!(c.reason(), None);
    }

    #[test]
    fn stops_are_posted() {
        let b = buses();
        let c = ExitChannel::new().unwrap();
        assert_eq!(handle_exit(1, VcpuExit::Shutdown, &b, &c), Next::Stop);
        assert_eq!(c.reason(), Some(VmStop::Guest(GuestExit::Reset)));
        let c = ExitChannel::new().unwrap();
        handle_exit(2, VcpuExit::Unhandled("boom".into()), &b, &c);
        assert_eq!(
            c.reason(),
            Some(VmStop::VcpuFailed {
                index: 2,
                reason: "boom".into()
            })
        );
    }
}
