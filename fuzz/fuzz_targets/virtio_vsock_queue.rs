//! Any bytes as a virtio-vsock queue (see common.rs): packets with any header, to any port.
#![no_main]

mod common;

use devices::virtio::vsock::Vsock;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("tern-fuzz-vsock-{}.sock", std::process::id()));
    if let Ok(v) = Vsock::new(3, &path) {
        common::run(Box::new(v), data);
    }
    let _ = std::fs::remove_file(&path);
});
