//! cargo-fuzz target `conn_ws`: see `notification_server_fuzz::conn_ws` (fuzz/src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| notification_server_fuzz::conn_ws(data));
