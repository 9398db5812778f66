//! Any bytes as a virtio-blk queue (see common.rs), on a 64 KiB scratch image, with one to
//! four request queues.
#![no_main]

mod common;

use devices::virtio::block::{Block, BlockConfig, IoEngine};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("tern-fuzz-blk-{}.img", std::process::id()));
    if std::fs::File::create(&path)
        .and_then(|f| f.set_len(64 * 1024))
        .is_err()
    {
        return;
    }
    let cfg = BlockConfig {
        id: "fuzz".into(),
        path: path.clone(),
        read_only: data.first().is_some_and(|b| b & 0x80 != 0),
        rate_limiter: None,
        // The second byte picks the engine.
        engine: if data.get(1).is_some_and(|b| b & 1 != 0) {
            IoEngine::Uring
        } else {
            IoEngine::Sync
        },
        // Bits 1-2 of the second byte pick one to four request queues (the selector in
        // common.rs then picks which of them gets the descriptors).
        num_queues: 1 + u16::from(data.get(1).map_or(0, |b| (b >> 1) & 3)),
    };
    if let Ok(blk) = Block::new(&cfg) {
        common::run(Box::new(blk), data);
    }
});
