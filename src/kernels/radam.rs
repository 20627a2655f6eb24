//! RAdam (rectified Adam): fused kernel and reference.
//!
//! Update rule (Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR
//! 2020), per element, with `ρ∞ = 2/(1 − β₂) − 1` and `ρₜ = ρ∞ − 2t·β₂ᵗ/(1 − β₂ᵗ)`:
//!
//! ```text
//! m ← lerp(m, g, 1 − β₁)            v ← β₂·v + (1 − β₂)·g²
//! ρₜ > 5:  p ← p − m · s / (√v + ε)    s = lr/(1 − β₁ᵗ) · √(1 − β₂ᵗ) · r
//! else:    p ← p − m · lr/(1 − β₁ᵗ)
//! ```
//!
//! where `r = √((ρₜ−4)(ρₜ−2)ρ∞ / ((ρ∞−4)(ρ∞−2)ρₜ))`. torch evaluates the update as
//! `m / (1 − β₁ᵗ) · lr · (1/(√v + ε) · √(1 − β₂ᵗ)) · r`, element by element; here every
//! per-step scalar is folded into the one factor `s` (computed in f64, rounded once), which
//! leaves one division per element instead of two plus four multiplies. Results move by a few
//! ulp at most, far inside the parity tolerances; the fused and reference kernels share the
//! order, so they agree bit for bit.

use super::moments::Moments;
use super::{passes, ElementOp, Pass, Slices};
use crate::arch::SimdLevel;
use crate::float::{Float, Lane};

/// Per-step scalars of RAdam, computed once per run in f64 as torch does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RAdamCoeffs {
    /// Learning rate.
    pub lr: f64,
    /// `beta1`.
    pub beta1: f64,
    /// `beta2`.
    pub beta2: f64,
    /// `eps`.
    pub eps: f64,
    /// Weight decay factor.
    pub weight_decay: f64,
    /// Decoupled (AdamW-style) weight decay.
    pub decoupled: bool,
    /// Ascend instead of descend.
    pub maximize: bool,
    /// `1 - beta1^step`.
    pub bias_correction1: f64,
    /// `sqrt(1 - beta2^step)`.
    pub bias_correction2_sqrt: f64,
    /// The variance rectification term, when `rho_t > 5`; `None` means the un-adapted update.
    pub rect: Option<f64>,
}

impl RAdamCoeffs {
    /// The scalars of step number `step` (1-based), with torch's formulas.
    pub fn new(
        lr: f64,
        (beta1, beta2): (f64, f64),
        eps: f64,
        weight_decay: f64,
        decoupled: bool,
        maximize: bool,
        step: u64,
    ) -> Self {
        let step = step as f64;
        let bias_correction1 = 1.0 - beta1.powf(step);
        let bias_correction2 = 1.0 - beta2.powf(step);
        let rho_inf = 2.0 / (1.0 - beta2) - 1.0;
        let rho_t = rho_inf - 2.0 * step * beta2.powf(step) / bias_correction2;
        let rect = (rho_t > 5.0).then(|| {
            ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
                .powf(0.5)
        });
        RAdamCoeffs {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            decoupled,
            maximize,
            bias_correction1,
            bias_correction2_sqrt: bias_correction2.powf(0.5),
            rect,
        }
    }

    /// The factor of `m` in the update, computed once per step in f64: `lr / (1 − β₁ᵗ)`, times
    /// `√(1 − β₂ᵗ) · rect` when the variance is rectified.
    pub fn step_size(&self) -> f64 {
        let plain = self.lr / self.bias_correction1;
        match self.rect {
            Some(rect) => plain * self.bias_correction2_sqrt * rect,
            None => plain,
        }
    }
}

struct Op<T> {
    moments: Moments<T>,
    eps: T,
    /// `lr / (1 − β₁ᵗ)`, times `√(1 − β₂ᵗ) · rect` when rectified.
    step_size: T,
    rectified: bool,
}

impl<T: Float> ElementOp<T, 2> for Op<T> {
    #[inline(always)]
    fn apply<V: Lane<Elem = T>>(&self, p: V, g: V, s: &mut [V; 2]) -> V {
        let [m, v] = s;
        let (p, _) = self.moments.apply(p, g, m, v);
        let update = *m * V::splat(self.step_size);
        if self.rectified {
            p - update / (v.sqrt() + V::splat(self.eps))
        } else {
            p - update
        }
    }
}

/// Fused RAdam over one piece: `bufs` is `[exp_avg, exp_avg_sq]`.
pub fn fused<T: Float>(
    simd: SimdLevel,
    c: &RAdamCoeffs,
    grad_scale: f64,
    p: &mut [T],
    g: &[T],
    bufs: &mut [&mut [T]],
) {
    run(c, grad_scale, Slices::new(simd, p, g, bufs))
}

/// The fused kernel of [`fused`] over any [`Pass`]: the f32/f64 slices of a plain step, or
/// the half-precision streams of a mixed-precision one ([`crate::mixed`]).
pub fn run<T: Float, P: Pass<T>>(c: &RAdamCoeffs, grad_scale: f64, pass: P) {
    let op = Op {
        moments: c.moments(grad_scale),
        eps: T::from_f64(c.eps),
        step_size: T::from_f64(c.step_size()),
        rectified: c.rect.is_some(),
    };
    match pass.buffers() {
        2 => pass.run::<2, _>(&op),
        _ => unreachable!("RAdam keeps two buffers"),
    }
}

/// torch's `_single_tensor_radam`, one pass per tensor operation, with the per-step scalars
/// folded into one factor (see the module docs).
pub fn reference<T: Float>(
    c: &RAdamCoeffs,
    grad_scale: f64,
    p: &mut [T],
    g: &[T],
    bufs: &mut [&mut [T]],
) {
    let moments = c.moments::<T>(grad_scale);
    let [m, v] = bufs else {
        unreachable!("RAdam keeps two buffers")
    };
    moments.reference(p, g, m, v);
    let mut update: Vec<T> = m.to_vec();
    passes::mul(&mut update, T::from_f64(c.step_size()));
    if c.rect.is_some() {
        let eps = T::from_f64(c.eps);
        let denom: Vec<T> = v.iter().map(|&x| x.sqrt() + eps).collect();
        for (u, d) in update.iter_mut().zip(denom) {
            *u = *u / d;
        }
    }
    passes::add_scaled(p, &update, -T::ONE);
}

crate::renamed! {
    #[deprecated(since = "0.2.0", note = "renamed to `RAdamCoeffs`, torch's spelling")]
    RadamCoeffs => RAdamCoeffs;
}
