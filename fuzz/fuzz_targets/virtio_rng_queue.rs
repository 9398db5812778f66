//! Any bytes as a virtio-rng queue (see common.rs). The device must never panic or hang,
//! whatever the descriptors say (loops, wild addresses, huge lengths, bad indices).
#![no_main]

mod common;

use devices::virtio::rng::Rng;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    common::run(Box::new(Rng::new()), data);
});
