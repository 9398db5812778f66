//! The host side of the serial console: output to stdout or a file, input from stdin when it is
//! a terminal (in raw mode, restored on exit).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::terminal::Terminal;

use crate::sink::Sink;

/// Opens where console output goes: `path` (created or appended, a FIFO included) or stdout.
/// A path's output goes through a [`Sink`]: the guest never waits for its reader, and bytes
/// that do not fit are dropped and counted in `uart.missed_write_count`. stdout is written
/// directly, as Firecracker does.
pub fn output(path: Option<&Path>) -> std::io::Result<Box<dyn Write + Send>> {
    Ok(match path {
        Some(p) => Box::new(FileOutput(Sink::open(p, "serial-out")?)),
        None => Box::new(std::io::stdout()),
    })
}

/// Console output to a file, counting what its full queue refused.
struct FileOutput(Sink);

impl Write for FileOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.0.push(buf) {
            metrics::METRICS.uart.missed_write_count.inc();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // The UART flushes after every write; waiting here would make the guest wait.
        Ok(())
    }
}

impl Drop for FileOutput {
    /// The console's last bytes reach the file before tern exits (bounded wait).
    fn drop(&mut self) {
        self.0.drain(crate::sink::FLUSH_WAIT);
    }
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

/// Where console input comes from.
pub enum ConsoleInput {
    /// No input.
    None,
    /// tern's stdin, if it is a terminal (put in raw mode while the VM runs).
    TerminalStdin,
    /// Any readable file descriptor (a pipe, a socket, a pty).
    File(File),
}

impl ConsoleInput {
    /// A second handle on the same input (a duplicated descriptor), so that a VM that fails
    /// to build does not take the console input with it.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(match self {
            Self::None => Self::None,
            Self::TerminalStdin => Self::TerminalStdin,
            Self::File(f) => Self::File(f.try_clone()?),
        })
    }
}

/// Feeds a file descriptor's bytes to the guest's UART, as fast as the guest drains its FIFO:
/// when the FIFO is full the source is taken out of the event loop until the UART signals
/// `room` (the guest emptied the FIFO).
pub struct SerialInput {
    serial: Arc<Mutex<crate::platform::Uart>>,
    source: File,
    room: EventFd,
    paused: bool,
}

impl SerialInput {
    /// Input from `source` for `serial`, resumed by `room`.
    pub fn new(serial: Arc<Mutex<crate::platform::Uart>>, source: File, room: EventFd) -> Self {
        Self {
            serial,
            source,
            room,
            paused: false,
        }
    }

    /// tern's stdin as a `File` (a duplicate of descriptor 0).
    pub fn stdin_file() -> std::io::Result<File> {
        Ok(File::from(std::io::stdin().as_fd().try_clone_to_owned()?))
    }

    fn pump(&mut self, ops: &mut EventOps) {
        let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let room = serial.input_room().min(64);
        if room == 0 {
            if ops.remove(Events::new(&self.source, EventSet::IN)).is_ok() {
                self.paused = true;
            }
            return;
        }
        let mut buf = [0u8; 64];
        match self.source.read(&mut buf[..room]) {
            Ok(0) => {
                let _ = ops.remove(Events::new(&self.source, EventSet::IN));
            }
            Ok(n) => {
                serial.enqueue_input(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn!("console input: {e}");
                let _ = ops.remove(Events::new(&self.source, EventSet::IN));
            }
        }
    }
}

impl MutEventSubscriber for SerialInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops
            .add(Events::new(&self.source, EventSet::IN))
            .and_then(|()| ops.add(Events::new(&self.room, EventSet::IN)))
        {
            log::warn!("console input disabled: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.room.as_raw_fd() {
            let _ = self.room.read();
            if self.paused && ops.add(Events::new(&self.source, EventSet::IN)).is_ok() {
                self.paused = false;
            }
            return;
        }
        if events.event_set().intersects(EventSet::ERROR) {
            let _ = ops.remove(Events::new(&self.source, EventSet::IN));
            return;
        }
        self.pump(ops);
    }
}
