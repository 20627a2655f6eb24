//! cargo-fuzz target `kernels`: see `optarena_fuzz::kernels`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| optarena_fuzz::kernels(data));
