//! cargo-fuzz target `conn`: see `notification_server_fuzz::conn` (fuzz/src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| notification_server_fuzz::conn(data));
