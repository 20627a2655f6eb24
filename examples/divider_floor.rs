//! The arithmetic floor of an in-cache Adam-family step: how long this CPU's divider needs for
//! the square roots and divisions alone, over the 16K-element adapter of the latency benchmark.
//!
//! ```sh
//! cargo run --release --example divider_floor
//! ```
//!
//! Three bare AVX2 loops over 16,448 f32 (the adapter's size), with no other arithmetic and
//! the data in L1/L2: `sqrt` alone; `sqrt` and one division (optarena's AdamW: `m / (√v·c + ε)`);
//! `sqrt` and two divisions (torch's literal AdamW: `m / (√v / c + ε)`). An AdamW step cannot be
//! faster than the second loop without approximate reciprocals. BENCHMARKS.md compares them with
//! the measured step.

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `v[i] = sqrt(v[i])`.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn sqrt_only(v: &mut [f32]) {
        for x in v.chunks_exact_mut(8) {
            // SAFETY: `x` holds 8 f32 (chunks_exact_mut); unaligned loads and stores are fine.
            unsafe { _mm256_storeu_ps(x.as_mut_ptr(), _mm256_sqrt_ps(_mm256_loadu_ps(x.as_ptr()))) }
        }
    }

    /// `v[i] = m[i] / (sqrt(v[i]) ⊙ c + eps)` where `⊙` is `*` (one division) or `/` (two).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn sqrt_div(v: &mut [f32], m: &[f32], two_divisions: bool) {
        let c = _mm256_set1_ps(0.97);
        let eps = _mm256_set1_ps(1e-8);
        for (x, y) in v.chunks_exact_mut(8).zip(m.chunks_exact(8)) {
            // SAFETY: `x` and `y` hold 8 f32 each (chunks_exact); unaligned access is fine.
            unsafe {
                let s = _mm256_sqrt_ps(_mm256_loadu_ps(x.as_ptr()));
                let s = if two_divisions {
                    _mm256_div_ps(s, c)
                } else {
                    _mm256_mul_ps(s, c)
                };
                let d = _mm256_add_ps(s, eps);
                _mm256_storeu_ps(
                    x.as_mut_ptr(),
                    _mm256_div_ps(_mm256_loadu_ps(y.as_ptr()), d),
                );
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn main() {
    use std::time::Instant;
    if !is_x86_feature_detected!("avx2") {
        println!("divider_floor: this CPU has no AVX2; nothing to measure");
        return;
    }
    const N: usize = 16_448;
    let mut v = vec![1.0f32; N];
    let m = vec![0.5f32; N];
    type Loop = fn(&mut [f32], &[f32]);
    let cases: [(&str, Loop); 3] = [
        // SAFETY (all three): AVX2 was detected above.
        ("sqrt only", |v, _| unsafe { avx2::sqrt_only(v) }),
        ("sqrt + 1 division", |v, m| unsafe {
            avx2::sqrt_div(v, m, false)
        }),
        ("sqrt + 2 divisions", |v, m| unsafe {
            avx2::sqrt_div(v, m, true)
        }),
    ];
    for (name, f) in cases {
        let mut times: Vec<f64> = (0..20_000)
            .map(|_| {
                v.fill(1.0);
                let t = Instant::now();
                f(&mut v, &m);
                t.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        println!(
            "{name:>20}: median {:.2} µs, min {:.2} µs over {N} f32",
            times[times.len() / 2] * 1e6,
            times[0] * 1e6
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("divider_floor: x86-64 only");
}
