//! Any bytes as a `--config-file`: parsing must return a value or an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = api::config::parse_config(std::path::Path::new("fuzz.json"), text);
    }
});
