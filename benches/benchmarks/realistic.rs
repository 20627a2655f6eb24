//! What a training loop does to an optimizer step that back-to-back benchmarks on synthetic
//! gradients do not: gradients with a long tail of tiny values, and a calling thread that is
//! busy with forward and backward between two steps while the thread pool idles.
//!
//! Shared by the criterion suite and `examples/bench_step.rs` (which includes this file with
//! `#[path]`); `scripts/bench_vs_torch.py` draws the same gradients (`realistic_grads`) for
//! torch.

use std::hint::black_box;
use std::time::{Duration, Instant};

/// Seed of the realistic gradients in every benchmark (the Python script uses the same).
pub const GRADIENT_SEED: u64 = 0;

/// `n` gradients drawn from the "realistic" distribution, deterministic in `seed`:
///
/// `g = z · 10^(−1 − 29·u)`, with `z` standard normal and `u` uniform on [0, 1), independent:
/// a normal value times a log-uniform scale spanning 1e-1 down to 1e-30, rounded to `f32` by
/// the caller. In `f32`, 39% of the squares `g²` fall below the smallest normal number
/// 1.2e-38: 12% are subnormal and 27% round to zero. Adam's `exp_avg_sq`, which accumulates
/// `(1 − β₂)·g²`, holds about 12% subnormal numbers, and on Intel cores every arithmetic
/// instruction that reads or produces one takes a slow microcode assist (unless the step
/// flushes them to zero).
///
/// The random numbers are the SplitMix64 stream seeded with `seed` (output `k` is
/// `mix(seed + (k + 1)·0x9E3779B97F4A7C15)`, the standard SplitMix64), three per element:
/// for element `i`, outputs `3i`, `3i + 1`, `3i + 2`, each turned into `v = (x >> 11) · 2⁻⁵³`
/// in [0, 1). `z = √(−2 ln(1 − v₀)) · cos(2π v₁)` (Box-Muller) and `u = v₂`, all in `f64`.
pub fn gradients(n: usize, seed: u64) -> impl Iterator<Item = f64> {
    let uniform = move |k: u64| {
        let mut z = seed.wrapping_add((k + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    };
    (0..n as u64).map(move |i| {
        let normal = (-2.0 * (1.0 - uniform(3 * i)).ln()).sqrt()
            * (2.0 * std::f64::consts::PI * uniform(3 * i + 1)).cos();
        normal * 10f64.powf(-1.0 - 29.0 * uniform(3 * i + 2))
    })
}

/// Keeps the calling thread busy for `duration` (a spin on integer arithmetic the compiler
/// cannot remove, never a sleep), as forward and backward keep a training loop's thread busy
/// between two optimizer steps. Meanwhile the rayon workers find no work and fall asleep.
pub fn busy_work(duration: Duration) {
    let start = Instant::now();
    let mut x = 1u64;
    while start.elapsed() < duration {
        for _ in 0..64 {
            x = black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
        }
    }
    black_box(x);
}
