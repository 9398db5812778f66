//! Output that never blocks the thread that writes it: log lines, metrics lines and the serial
//! console's file. A writer hands its bytes to a bounded in-memory queue and returns; one thread
//! per sink writes the queue out. What does not fit in the queue (the reader stalled, or is
//! missing) is dropped and counted, never waited for.
//!
//! Paths are opened so that the open cannot block either: a FIFO is opened read-write
//! non-blocking (a FIFO with no reader would block a plain write-only open), and anything that
//! is neither a regular file nor a FIFO nor a character device (a terminal, `/dev/null`) is
//! refused.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Bytes a sink holds while its reader catches up; more are dropped.
pub const QUEUE_BYTES: usize = 256 << 10;

/// How long [`Sink::flush`] waits for the queue to be written out.
pub const FLUSH_WAIT: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Queue {
    /// Bytes not yet handed to the writer thread.
    pending: Vec<u8>,
    /// The writer thread is writing a batch it took.
    busy: bool,
    /// Every handle is gone: the writer thread ends once the queue is empty.
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when bytes arrive, when a batch is done, and on close.
    changed: Condvar,
    /// Writes refused because the queue was full.
    dropped: AtomicU64,
    /// Writes the destination failed.
    failed: AtomicU64,
}

/// A non-blocking writer; clones share one queue and one writer thread.
#[derive(Clone)]
pub struct Sink {
    shared: Arc<Shared>,
    /// Dropped with the last handle: closes the queue.
    _closer: Arc<Closer>,
}

struct Closer(Arc<Shared>);

impl Drop for Closer {
    fn drop(&mut self) {
        if let Ok(mut q) = self.0.queue.lock() {
            q.closed = true;
        }
        self.0.changed.notify_all();
    }
}

/// Opens `path` for appending without blocking on it: created if absent. A FIFO that has no
/// reader yet (a write-only open of it fails with ENXIO when non-blocking) is opened read-write,
/// so that the open returns at once. The returned file is in blocking mode again (only the
/// sink's own thread writes it).
pub fn open_append(path: &Path) -> std::io::Result<File> {
    if let Ok(meta) = std::fs::metadata(path) {
        let t = meta.file_type();
        if !(t.is_file() || t.is_fifo() || t.is_char_device()) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file, FIFO or character device",
            ));
        }
    }
    let open = |read| {
        OpenOptions::new()
            .read(read)
            .append(true)
            .create(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
    };
    let file = match open(false) {
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => open(true)?,
        other => other?,
    };
    devices::os::set_blocking(&file)?;
    Ok(file)
}

impl Sink {
    /// A sink writing to `path` (see [`open_append`]); `name` names its thread.
    pub fn open(path: &Path, name: &str) -> std::io::Result<Self> {
        Self::new(Box::new(open_append(path)?), name)
    }

    /// A sink writing to `out` from a thread of its own named `name`.
    pub fn new(out: Box<dyn Write + Send>, name: &str) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        });
        let worker = shared.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || write_out(&worker, out))?;
        Ok(Self {
            _closer: Arc::new(Closer(shared.clone())),
            shared,
        })
    }

    /// Queues `bytes` whole, or drops them whole (counted) when the queue has no room for
    /// them. Never blocks on the destination.
    pub fn push(&self, bytes: &[u8]) -> bool {
        let Ok(mut q) = self.shared.queue.lock() else {
            return false;
        };
        if q.pending.len() + bytes.len() > QUEUE_BYTES {
            drop(q);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        q.pending.extend_from_slice(bytes);
        drop(q);
        self.shared.changed.notify_all();
        true
    }

    /// Writes refused so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Writes the destination failed so far.
    pub fn failed(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// Waits until what was queued before the call is written, for at most `limit`; true if
    /// it was.
    pub fn drain(&self, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let Ok(mut q) = self.shared.queue.lock() else {
            return false;
        };
        while !q.pending.is_empty() || q.busy {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            q = match self.shared.changed.wait_timeout(q, left) {
                Ok((q, _)) => q,
                Err(_) => return false,
            };
        }
        true
    }
}

impl Write for Sink {
    /// Accepts the whole buffer, queued or dropped: a stalled reader never makes the writer
    /// wait or retry.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.push(buf);
        Ok(buf.len())
    }

    /// Waits (at most [`FLUSH_WAIT`]) for the queue to be written out.
    fn flush(&mut self) -> std::io::Result<()> {
        self.drain(FLUSH_WAIT);
        Ok(())
    }
}

/// The writer thread: takes what is queued, writes it, until the last handle is gone.
fn write_out(shared: &Shared, mut out: Box<dyn Write + Send>) {
    loop {
        let batch = {
            let Ok(mut q) = shared.queue.lock() else {
                return;
            };
            q.busy = false;
            shared.changed.notify_all();
            while q.pending.is_empty() && !q.closed {
                q = match shared.changed.wait(q) {
                    Ok(q) => q,
                    Err(_) => return,
                };
            }
            if q.pending.is_empty() {
                return;
            }
            q.busy = true;
            std::mem::take(&mut q.pending)
        };
        if out.write_all(&batch).and_then(|()| out.flush()).is_err() {
            shared.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn fifo(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("tern-sink-{}-{name}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let p = dir.join("fifo");
        let _ = std::fs::remove_file(&p);
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path only.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        p
    }

    #[test]
    fn a_fifo_without_reader_opens_and_writes_without_blocking() {
        let p = fifo("noreader");
        let sink = Sink::open(&p, "test-sink").unwrap();
        // Far more than a pipe (64 KiB) and the queue (1 MiB) hold: the excess is dropped.
        let line = [b'x'; 4096];
        for _ in 0..1024 {
            sink.push(&line);
        }
        assert!(sink.dropped() > 0, "nothing was dropped");
        // Draining cannot finish (nobody reads), and says so within its limit.
        assert!(!sink.drain(Duration::from_millis(50)));
    }

    #[test]
    fn a_reader_gets_every_byte_in_order() {
        let p = fifo("reader");
        let sink = Sink::open(&p, "test-sink").unwrap();
        // The reader opens before anything is written: the sink holds the FIFO read-write
        // (it had no reader), and once the sink's descriptor is closed a FIFO no one holds
        // loses its contents and a later reader's open waits for a writer for good.
        let (opened, is_open) = std::sync::mpsc::channel();
        let reader = std::thread::spawn({
            let p = p.clone();
            move || {
                let mut f = File::open(&p).unwrap();
                opened.send(()).unwrap();
                let mut s = String::new();
                f.read_to_string(&mut s).unwrap();
                s
            }
        });
        is_open.recv_timeout(Duration::from_secs(30)).unwrap();
        let mut want = String::new();
        for i in 0..2000 {
            let l = format!("line {i}\n");
            assert!(sink.push(l.as_bytes()));
            want.push_str(&l);
        }
        assert!(sink.drain(Duration::from_secs(30)));
        assert_eq!(sink.dropped(), 0);
        drop(sink);
        // The reader sees EOF once the sink's thread has closed its descriptor, after the
        // last handle went.
        let got = reader.join().unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn a_directory_is_refused() {
        let e = open_append(&std::env::temp_dir()).err().unwrap();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    }
}
