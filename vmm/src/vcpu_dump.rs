//! Where each vCPU is in the guest, on request: on SIGUSR2 tern pauses the vCPUs, logs each
//! one's instruction pointer, stack pointer, flags and power state, and lets them run again.
//! For a guest that stopped making progress (the nest's test harness sends the signal before
//! it kills a VMM at its timeout): it tells a guest spinning with interrupts off from one
//! idling in HLT, and where.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::vm::RunningVm;

static REQUESTED: AtomicBool = AtomicBool::new(false);
/// Wakes the VMM thread's event loop when the signal came.
static WAKE: OnceLock<EventFd> = OnceLock::new();

extern "C" fn on_sigusr2(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    REQUESTED.store(true, Ordering::SeqCst);
    if let Some(e) = WAKE.get() {
        // An eventfd write is one write(2), which is async-signal-safe.
        let _ = e.write(1);
    }
}

/// Installs the SIGUSR2 handler (once per process).
pub fn install() {
    if WAKE.get().is_some() {
        return;
    }
    match EventFd::new(libc::EFD_NONBLOCK) {
        Ok(e) => {
            let _ = WAKE.set(e);
        }
        Err(e) => {
            log::warn!("no vCPU dump on SIGUSR2: eventfd: {e}");
            return;
        }
    }
    if let Err(e) = vmm_sys_util::signal::register_signal_handler(libc::SIGUSR2, on_sigusr2) {
        log::warn!("no vCPU dump on SIGUSR2: {e}");
    }
}

/// Whether a dump was asked for since the last call.
pub fn take_request() -> bool {
    REQUESTED.swap(false, Ordering::SeqCst)
}

struct Wake;

impl MutEventSubscriber for Wake {
    fn init(&mut self, ops: &mut EventOps) {
        if let Some(e) = WAKE.get()
            && let Err(err) = ops.add(Events::new(e, EventSet::IN))
        {
            log::warn!("no vCPU dump on SIGUSR2: {err:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        if let Some(e) = WAKE.get() {
            let _ = e.read();
        }
    }
}

/// The event-loop subscriber that wakes the loop for a dump (its owner then calls
/// [`RunningVm::log_vcpus`] when [`take_request`] says so).
pub fn subscriber() -> Arc<Mutex<dyn MutEventSubscriber + Send>> {
    Arc::new(Mutex::new(Wake))
}

/// One vCPU's place in the guest, in a line.
#[cfg(target_arch = "x86_64")]
fn describe(vcpu: &mut dyn crate::hypervisor::Vcpu) -> String {
    match vcpu.save_x86_state() {
        Ok(s) => format!(
            "rip {:#x} rsp {:#x} rflags {:#x} (IF {}) cs {:#x} cr3 {:#x} mp {:?} interrupt {:?}",
            s.regs.rip,
            s.regs.rsp,
            s.regs.rflags,
            (s.regs.rflags >> 9) & 1,
            s.sregs.cs.selector,
            s.sregs.cr3,
            s.mp_state,
            s.events.interrupt
        ),
        Err(e) => format!("registers unreadable: {e}"),
    }
}

/// One vCPU's place in the guest, in a line.
#[cfg(target_arch = "aarch64")]
fn describe(vcpu: &mut dyn crate::hypervisor::Vcpu) -> String {
    use crate::hypervisor::arm_state::ArmReg;
    match vcpu.save_arm_state() {
        Ok(s) => {
            let reg = |want: ArmReg| {
                s.regs
                    .iter()
                    .find(|(r, _)| *r == want)
                    .map(|(_, v)| {
                        let mut b = [0u8; 8];
                        let n = v.len().min(8);
                        b[..n].copy_from_slice(&v[..n]);
                        format!("{:#x}", u64::from_le_bytes(b))
                    })
                    .unwrap_or_else(|| "?".into())
            };
            format!(
                "pc {} sp_el1 {} pstate {} elr_el1 {} power {:?}",
                reg(ArmReg::Pc),
                reg(ArmReg::SpEl1),
                reg(ArmReg::Pstate),
                reg(ArmReg::ElrEl1),
                s.power
            )
        }
        Err(e) => format!("registers unreadable: {e}"),
    }
}

impl RunningVm {
    /// Logs where each vCPU is (pausing them for it, unless they are paused already),
    /// ending with "vCPU dump end".
    pub fn log_vcpus(&mut self) {
        let was_paused = self.is_paused();
        if let Err(e) = self.pause() {
            log::warn!("vCPU dump: {e}");
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            let line = crate::vcpu::run_on_paused(v, crate::vm::PAUSE_TIMEOUT, describe)
                .unwrap_or_else(|e| format!("not reached: {e}"));
            log::warn!("vCPU {i} dump: {line}");
        }
        if !was_paused {
            self.resume();
        }
        log::warn!("vCPU dump end");
    }
}
