//! The host side of the serial console: output to stdout or a file, input from stdin when it is
//! a terminal (in raw mode, restored on exit).

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use devices::legacy::serial::SerialDevice;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::terminal::Terminal;

/// Opens where console output goes: `path` (created or appended) or stdout.
pub fn output(path: Option<&Path>) -> std::io::Result<Box<dyn Write + Send>> {
    Ok(match path {
        Some(p) => Box::new(OpenOptions::new().create(true).append(true).open(p)?),
        None => Box::new(std::io::stdout()),
    })
}

/// Puts the terminal on stdin in raw mode for the guest console, and back on drop.
pub struct RawTerminal {
    active: bool,
}

impl RawTerminal {
    /// Raw mode when stdin is a terminal; a no-op guard otherwise.
    pub fn enter() -> Self {
        let stdin = std::io::stdin();
        // SAFETY: isatty only inspects the descriptor.
        let is_tty = unsafe { libc::isatty(stdin.as_raw_fd()) } == 1;
        let active = is_tty && stdin.lock().set_raw_mode().is_ok();
        Self { active }
    }

    /// Whether stdin is a terminal in raw mode.
    pub fn active(&self) -> bool {
        self.active
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if self.active {
            let _ = std::io::stdin().lock().set_canon_mode();
        }
    }
}

/// Feeds stdin to the guest's UART.
pub struct StdinInput {
    serial: Arc<Mutex<SerialDevice>>,
}

impl StdinInput {
    /// Input for `serial`.
    pub fn new(serial: Arc<Mutex<SerialDevice>>) -> Self {
        Self { serial }
    }
}

impl MutEventSubscriber for StdinInput {
    fn init(&mut self, ops: &mut EventOps) {
        let stdin = std::io::stdin();
        if let Err(e) = ops.add(Events::new(&stdin, EventSet::IN)) {
            log::warn!("console input disabled: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let stdin = std::io::stdin();
        if events
            .event_set()
            .intersects(EventSet::HANG_UP | EventSet::ERROR)
        {
            let _ = ops.remove(Events::new(&stdin, EventSet::IN));
            return;
        }
        let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let room = serial.input_room().min(64);
        if room == 0 {
            // The guest is not reading; leave the bytes in the terminal until it does.
            return;
        }
        let mut buf = [0u8; 64];
        match stdin.lock().read(&mut buf[..room]) {
            Ok(0) => {
                let _ = ops.remove(Events::new(&stdin, EventSet::IN));
            }
            Ok(n) => {
                serial.enqueue_input(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn!("console input: {e}");
                let _ = ops.remove(Events::new(&stdin, EventSet::IN));
            }
        }
    }
}
