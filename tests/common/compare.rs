//! The tolerances of SCHEMA.md: elementwise, Muon's direction, LBFGS's loss, schedulers.

/// The fixture tolerance of SCHEMA.md for elementwise optimizers.
pub fn elementwise_tol(dtype: &str) -> (f64, f64) {
    match dtype {
        "float32" => (1e-5, 1e-6),
        _ => (1e-12, 1e-13),
    }
}

/// SCHEMA.md's Muon tolerance (`MUON_MIN_COS`, `MUON_NORM_RATIO`): with `d = after − init`,
/// `cos(d_crate, d_torch) >= 0.999` and `|d_crate| / |d_torch|` in `[0.98, 1.02]`.
pub const MUON_MIN_COS: f64 = 0.999;
/// See [`MUON_MIN_COS`].
pub const MUON_NORM_RATIO: (f64, f64) = (0.98, 1.02);

/// The cosine and norm ratio of two changes from `init`: `(cos, |got − init| / |want − init|)`.
pub fn direction_stats(init: &[f64], got: &[f64], want: &[f64]) -> (f64, f64) {
    let (mut dot, mut ng, mut nw) = (0.0, 0.0, 0.0);
    for ((i, g), w) in init.iter().zip(got).zip(want) {
        let (dg, dw) = (g - i, w - i);
        dot += dg * dw;
        ng += dg * dg;
        nw += dw * dw;
    }
    if ng == 0.0 && nw == 0.0 {
        return (1.0, 1.0);
    }
    (dot / (ng.sqrt() * nw.sqrt()), ng.sqrt() / nw.sqrt())
}

/// Checks SCHEMA.md's Muon tolerance for one parameter at one step.
pub fn direction_check(init: &[f64], got: &[f64], want: &[f64]) -> Result<(), String> {
    let (cos, ratio) = direction_stats(init, got, want);
    if cos >= MUON_MIN_COS && (MUON_NORM_RATIO.0..=MUON_NORM_RATIO.1).contains(&ratio) {
        Ok(())
    } else {
        Err(format!(
            "cos {cos:.6} (>= {MUON_MIN_COS}), norm ratio {ratio:.6} (in {MUON_NORM_RATIO:?})"
        ))
    }
}

/// SCHEMA.md's LBFGS loss tolerance.
pub fn lbfgs_tol(dtype: &str, v: f64) -> f64 {
    match dtype {
        "float32" => 1e-4 * v.abs() + 1e-6,
        _ => 1e-8 * v.abs() + 1e-12,
    }
}

/// SCHEMA.md's scheduler tolerance: `1e-12` relative.
pub fn sched_close(got: f64, want: f64) -> bool {
    got == want || (got - want).abs() <= 1e-12 * want.abs()
}
