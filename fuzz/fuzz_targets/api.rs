//! cargo-fuzz target `api`: see `optarena_fuzz::api`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| optarena_fuzz::api(data));
