//! Run-time choice of instruction set for the fused kernels.
//!
//! `wide` picks its instructions when the crate is compiled, so a plain `cargo build --release`
//! on x86-64 gets SSE2 (four f32 lanes). Like PyTorch's CPU kernels, optarena checks the CPU
//! once at run time instead: on x86-64 with AVX2 every fused kernel runs on eight-lane AVX2
//! vectors (`x86_64.rs`), whatever the build flags; elsewhere, and when AVX2 is missing or
//! switched off with [`set_simd_level`], it runs on `wide`'s portable lanes.
//!
//! # Results do not depend on the instruction set
//! No kernel uses fused multiply-add or approximate reciprocals: each lane performs the same
//! correctly rounded IEEE operations, in the same order, as the scalar reference kernel. So
//! SSE2, AVX2 (and AVX-512 or NEON builds of `wide`) give bitwise the same parameters and
//! state, and the same as the reference; `tests/kernels.rs` checks this for every level this
//! CPU has. The price is a few percent of in-cache throughput that FMA would buy; memory-bound
//! sizes do not notice. (Against torch, whose vectorised kernels use FMA in `add(alpha=...)`
//! and `lerp`, results differ by a few ulp per step, well inside SCHEMA.md's tolerances.)

use std::sync::atomic::{AtomicU8, Ordering};

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_64;

/// The widest instruction set the fused kernels may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// `wide`'s lanes as compiled (SSE2 on a default x86-64 build).
    Portable = 0,
    /// AVX2 eight-lane f32 / four-lane f64 vectors, chosen at run time.
    Avx2 = 1,
}

static MAX_LEVEL: AtomicU8 = AtomicU8::new(SimdLevel::Avx2 as u8);

/// Caps the instruction set the kernels may use (for benchmarks and tests; results are the
/// same at every level). The default allows everything the CPU has.
pub fn set_simd_level(max: SimdLevel) {
    MAX_LEVEL.store(max as u8, Ordering::Relaxed);
}

/// The instruction set the kernels use now: the best the CPU has, within
/// [`set_simd_level`]'s cap.
pub fn simd_level() -> SimdLevel {
    let cap = MAX_LEVEL.load(Ordering::Relaxed);
    #[cfg(target_arch = "x86_64")]
    if cap >= SimdLevel::Avx2 as u8 && std::arch::is_x86_feature_detected!("avx2") {
        return SimdLevel::Avx2;
    }
    let _ = cap;
    SimdLevel::Portable
}
