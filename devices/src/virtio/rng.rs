//! virtio-rng (entropy device, type 4): fills the driver's write-only buffers with bytes from the
//! host's `getrandom(2)`.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::{VIRTIO_F_VERSION_1, VirtioDevice};

/// The virtio device ID of an entropy source.
pub const VIRTIO_ID_RNG: u32 = 4;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes given for one request, whatever the driver asks.
pub const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;

/// The entropy device.
pub struct Rng {
    /// Bytes handed to the guest so far.
    pub bytes_served: u64,
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Rng {
    /// A new device.
    pub fn new() -> Self {
        Self { bytes_served: 0 }
    }
}

fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`, which is valid
        // for writes; getrandom writes at most that many bytes.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            done += n as usize;
        }
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0); // no configuration space
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn save(&self) -> serde_json::Value {
        serde_json::json!({ "bytes_served": self.bytes_served })
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        self.bytes_served = state["bytes_served"].as_u64().ok_or_else(|| {
            format!("virtio-rng state {state}: bytes_served is missing or not a number")
        })?;
        Ok(())
    }

    fn process_queue(&mut self, _index: u16, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut written: u32 = 0;
            // The chain iterator stops at the queue size, so a looped chain ends.
            for desc in chain {
                if !desc.is_write_only() {
                    continue; // a read-only buffer has nothing for us to fill
                }
                let room = MAX_BYTES_PER_REQUEST - written;
                let len = desc.len().min(room);
                if len == 0 {
                    continue;
                }
                let mut bytes = vec![0u8; len as usize];
                if let Err(e) = fill_random(&mut bytes) {
                    log::warn!("virtio-rng: getrandom: {e}");
                    break;
                }
                if let Err(e) = mem.write_slice(&bytes, desc.addr()) {
                    log::debug!("virtio-rng: bad buffer {:#x}+{len}: {e}", desc.addr().0);
                    break;
                }
                written += len;
            }
            if let Err(e) = queue.add_used(mem, head, written) {
                log::warn!("virtio-rng: add_used: {e}");
                break;
            }
            self.bytes_served += u64::from(written);
            used_any = true;
        }
        used_any
    }
}
