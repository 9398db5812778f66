//! Any bytes as a virtio-balloon queue (see common.rs): inflate, deflate, statistics or free
//! page reporting, whichever the first byte picks.
#![no_main]

mod common;

use devices::virtio::balloon::{Balloon, BalloonOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let opts = BalloonOptions {
        amount_mib: 1,
        deflate_on_oom: true,
        stats_polling_interval_s: 1,
        free_page_reporting: true,
    };
    if let Ok(b) = Balloon::new(opts) {
        common::run(Box::new(b), data);
    }
});
