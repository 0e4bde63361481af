//! cargo-fuzz target `token_raw`: see `notification_server_fuzz::token_raw` (fuzz/src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| notification_server_fuzz::token_raw(data));
