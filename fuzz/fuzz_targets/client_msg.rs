//! cargo-fuzz target `client_msg`: see `notification_server_fuzz::client_msg` (fuzz/src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| notification_server_fuzz::client_msg(data));
