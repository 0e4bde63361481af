//! cargo-fuzz target `bus_message`: see `notification_server_fuzz::bus_message` (fuzz/src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| notification_server_fuzz::bus_message(data));
