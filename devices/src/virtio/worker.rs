//! The thread that runs one virtio device: waits on the transport's epoll set (queue
//! ioeventfds and the device's back-end descriptors) and handles each event under the
//! device-side lock (not the lock the vCPUs take for the transport's registers). Block I/O, TAP and socket traffic happen here, never on a vCPU thread or
//! in the VMM's event loop.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::os::Ready;

use super::device_side::{DeviceSide, IDLE_CHECK_MS};

/// Starts the worker thread `name` for a transport's device side
/// ([`super::mmio::MmioTransport::device_side`]). It runs until the process exits.
pub fn spawn(transport: Arc<Mutex<DeviceSide>>, name: String) -> std::io::Result<JoinHandle<()>> {
    let poller = transport
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .poller()?;
    std::thread::Builder::new().name(name).spawn(move || {
        let mut events = [Ready::default(); 32];
        loop {
            let n = match poller.wait(IDLE_CHECK_MS, &mut events) {
                Ok(n) => n,
                Err(e) => {
                    log::error!("virtio worker: epoll_wait: {e}; the device stops");
                    return;
                }
            };
            let mut t = transport.lock().unwrap_or_else(|p| p.into_inner());
            if n == 0 {
                t.idle_check();
            }
            for ev in &events[..n] {
                t.handle_event(ev.data(), ev.event_set());
            }
        }
    })
}
