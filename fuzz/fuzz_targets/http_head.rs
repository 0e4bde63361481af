//! cargo-fuzz target `http_head`: see `notification_server_fuzz::http_head` (fuzz/src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| notification_server_fuzz::http_head(data));
