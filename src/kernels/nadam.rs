//! NAdam (Adam with Nesterov momentum, coupled or decoupled weight decay): fused kernel and
//! reference.
//!
//! Update rule (Dozat, "Incorporating Nesterov Momentum into Adam", ICLR 2016 workshop), per
//! element, with torch's momentum schedule `μₜ = β₁(1 − ½·0.96^(t·ψ))`:
//!
//! ```text
//! m ← lerp(m, g, 1 − β₁)            v ← β₂·v + (1 − β₂)·g²
//! d ← √(v · (1 / (1 − β₂ᵗ))) + ε
//! p ← p − lr(1 − μₜ)/(1 − Πμ) · g · (1/d) − lr·μₜ₊₁/(1 − Πμ·μₜ₊₁) · m · (1/d)
//! ```
//!
//! torch divides `v` by `1 − β₂ᵗ` and then divides twice by `d` (two `addcdiv_`); both
//! kernels here multiply by reciprocals instead (of the constant, computed once per step in
//! f64, and of `d`, once per element), which leaves one division per element instead of three.
//! Results move by about one ulp, far inside the parity tolerances.

use super::moments::Moments;
use super::{passes, ElementOp, Pass, Slices};
use crate::arch::SimdLevel;
use crate::float::{Float, Lane};

/// Per-step scalars of NAdam, computed once per run in f64 as torch does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NAdamCoeffs {
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
    /// Decoupled (AdamW-style) instead of L2 weight decay.
    pub decoupled: bool,
    /// Ascend instead of descend.
    pub maximize: bool,
    /// `1 - beta2^step`.
    pub bias_correction2: f64,
    /// `-lr * (1 - mu) / (1 - mu_product)`: the weight of the gradient term.
    pub grad_value: f64,
    /// `(-lr * mu_next) / (1 - mu_product_next)`: the weight of the momentum term.
    pub exp_avg_value: f64,
}

impl NAdamCoeffs {
    /// torch's momentum cache `mu_t = beta1 (1 - 0.5 · 0.96^(t · momentum_decay))` (f64).
    pub fn mu(beta1: f64, momentum_decay: f64, step: f64) -> f64 {
        beta1 * (1.0 - 0.5 * 0.96f64.powf(step * momentum_decay))
    }

    /// The scalars of step number `step` (1-based), given `mu_product` already multiplied by
    /// this step's `mu` (in f32, as torch's 0-dim `mu_product` tensor holds it).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        lr: f64,
        (beta1, beta2): (f64, f64),
        eps: f64,
        weight_decay: f64,
        momentum_decay: f64,
        decoupled: bool,
        maximize: bool,
        step: u64,
        mu_product: f32,
    ) -> Self {
        let step = step as f64;
        let mu = Self::mu(beta1, momentum_decay, step);
        let mu_next = Self::mu(beta1, momentum_decay, step + 1.0);
        // torch: `mu_product_next = _get_value(mu_product) * mu_next`, a Python float.
        let mu_product = mu_product as f64;
        let mu_product_next = mu_product * mu_next;
        NAdamCoeffs {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            decoupled,
            maximize,
            bias_correction2: 1.0 - beta2.powf(step),
            grad_value: -lr * (1.0 - mu) / (1.0 - mu_product),
            exp_avg_value: (-lr * mu_next) / (1.0 - mu_product_next),
        }
    }

    /// `1 / (1 - beta2^step)` in f64, rounded once: the kernels multiply by it where torch
    /// divides by `1 - beta2^step`.
    pub fn inv_bias_correction2(&self) -> f64 {
        1.0 / self.bias_correction2
    }
}

struct Op<T> {
    moments: Moments<T>,
    inv_bc2: T,
    eps: T,
    grad_value: T,
    exp_avg_value: T,
}

impl<T: Float> ElementOp<T, 2> for Op<T> {
    #[inline(always)]
    fn apply<V: Lane<Elem = T>>(&self, p: V, g: V, s: &mut [V; 2]) -> V {
        let [m, v] = s;
        let (p, g) = self.moments.apply(p, g, m, v);
        let denom = (*v * V::splat(self.inv_bc2)).sqrt() + V::splat(self.eps);
        let inv_denom = V::splat(T::ONE) / denom;
        let p = p + V::splat(self.grad_value) * g * inv_denom;
        p + V::splat(self.exp_avg_value) * *m * inv_denom
    }
}

/// Fused NAdam over one piece: `bufs` is `[exp_avg, exp_avg_sq]`.
pub fn fused<T: Float>(
    simd: SimdLevel,
    c: &NAdamCoeffs,
    grad_scale: f64,
    p: &mut [T],
    g: &[T],
    bufs: &mut [&mut [T]],
) {
    run(c, grad_scale, Slices::new(simd, p, g, bufs))
}

/// The fused kernel of [`fused`] over any [`Pass`]: the f32/f64 slices of a plain step, or
/// the half-precision streams of a mixed-precision one ([`crate::mixed`]).
pub fn run<T: Float, P: Pass<T>>(c: &NAdamCoeffs, grad_scale: f64, pass: P) {
    let op = Op {
        moments: c.moments(grad_scale),
        inv_bc2: T::from_f64(c.inv_bias_correction2()),
        eps: T::from_f64(c.eps),
        grad_value: T::from_f64(c.grad_value),
        exp_avg_value: T::from_f64(c.exp_avg_value),
    };
    match pass.buffers() {
        2 => pass.run::<2, _>(&op),
        _ => unreachable!("NAdam keeps two buffers"),
    }
}

/// torch's `_single_tensor_nadam`, one pass per tensor operation (with the reciprocals
/// described in the module docs).
pub fn reference<T: Float>(
    c: &NAdamCoeffs,
    grad_scale: f64,
    p: &mut [T],
    g: &[T],
    bufs: &mut [&mut [T]],
) {
    let moments = c.moments::<T>(grad_scale);
    let [m, v] = bufs else {
        unreachable!("NAdam keeps two buffers")
    };
    let grad = moments.reference(p, g, m, v);
    // torch: denom = exp_avg_sq.div(bias_correction2).sqrt().add_(eps), then two addcdiv_;
    // here the division by the constant is a multiply and `1/denom` is taken once.
    let inv_bc2 = T::from_f64(c.inv_bias_correction2());
    let eps = T::from_f64(c.eps);
    let inv_denom: Vec<T> = v
        .iter()
        .map(|&x| x * inv_bc2)
        .map(|x| x.sqrt())
        .map(|x| T::ONE / (x + eps))
        .collect();
    passes::addcmul(p, &grad, &inv_denom, T::from_f64(c.grad_value));
    passes::addcmul(p, m, &inv_denom, T::from_f64(c.exp_avg_value));
}

crate::renamed! {
    #[deprecated(since = "0.2.0", note = "renamed to `NAdamCoeffs`, torch's spelling")]
    NadamCoeffs => NAdamCoeffs;
}
