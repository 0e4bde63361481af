//! cargo-fuzz target `config_text`: see `notification_server_fuzz::config_text` (fuzz/src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| notification_server_fuzz::config_text(data));
