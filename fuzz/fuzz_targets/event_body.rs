//! cargo-fuzz target `event_body`: see `notification_server_fuzz::event_body` (fuzz/src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| notification_server_fuzz::event_body(data));
