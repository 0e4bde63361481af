//! cargo-fuzz target `http_split`: see `notification_server_fuzz::http_split` (fuzz/src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| notification_server_fuzz::http_split(data));
