//! cargo-fuzz target `decode`: see `optarena_fuzz::decode`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| optarena_fuzz::decode(data));
