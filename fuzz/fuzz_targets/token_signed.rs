//! cargo-fuzz target `token_signed`: see `notification_server_fuzz::token_signed` (fuzz/src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| notification_server_fuzz::token_signed(data));
