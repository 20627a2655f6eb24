//! The first half of every Adam-family update (Adam, AdamW, RAdam, NAdam), fused and as
//! torch's passes: the effective gradient (scaled, negated when maximizing), weight decay
//! (L2 into the gradient, or decoupled `p ← p·(1 − lr·λ)`), and the two moments
//!
//! ```text
//! m ← lerp(m, g, 1 − β₁)            v ← β₂·v + (1 − β₂)·g²
//! ```

use super::{lerp, passes, LerpWeight};
use crate::float::{Float, Lane};

/// The scalars of the shared half, computed once per run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Moments<T> {
    grad_scale: T,
    maximize: bool,
    /// 0 none, 1 L2, 2 decoupled.
    wd: u8,
    weight_decay: T,
    decay_factor: T,
    w1: LerpWeight<T>,
    beta2: T,
    one_minus_beta2: T,
}

impl<T: Float> Moments<T> {
    /// The scalars for `lr`, `betas`, `weight_decay` (decoupled or L2), `maximize` and a
    /// gradient scale.
    pub(crate) fn new(
        lr: f64,
        (beta1, beta2): (f64, f64),
        weight_decay: f64,
        decoupled: bool,
        maximize: bool,
        grad_scale: f64,
    ) -> Self {
        Moments {
            grad_scale: T::from_f64(grad_scale),
            maximize,
            wd: match (weight_decay != 0.0, decoupled) {
                (false, _) => 0,
                (true, false) => 1,
                (true, true) => 2,
            },
            weight_decay: T::from_f64(weight_decay),
            decay_factor: T::from_f64(1.0 - lr * weight_decay),
            w1: LerpWeight::new(T::from_f64(1.0 - beta1)),
            beta2: T::from_f64(beta2),
            one_minus_beta2: T::from_f64(1.0 - beta2),
        }
    }

    /// Updates `m` and `v` in place; returns the parameter after decoupled decay and the
    /// effective gradient.
    #[inline(always)]
    pub(crate) fn apply<V: Lane<Elem = T>>(&self, p: V, g: V, m: &mut V, v: &mut V) -> (V, V) {
        let g = g * V::splat(self.grad_scale);
        let mut g = if self.maximize { -g } else { g };
        let mut p = p;
        match self.wd {
            1 => g = g + V::splat(self.weight_decay) * p,
            2 => p = p * V::splat(self.decay_factor),
            _ => {}
        }
        *m = lerp(*m, g, &self.w1);
        *v = *v * V::splat(self.beta2) + V::splat(self.one_minus_beta2) * g * g;
        (p, g)
    }

    /// The same as torch's sequence of whole-slice operations; returns the effective
    /// gradient.
    pub(crate) fn reference(&self, p: &mut [T], g: &[T], m: &mut [T], v: &mut [T]) -> Vec<T> {
        let mut grad = passes::effective_grad(g, self.maximize, self.grad_scale);
        match self.wd {
            1 => passes::add_scaled(&mut grad, p, self.weight_decay),
            2 => passes::mul(p, self.decay_factor),
            _ => {}
        }
        passes::lerp(m, &grad, self.w1.weight);
        passes::mul(v, self.beta2);
        passes::addcmul(v, &grad, &grad, self.one_minus_beta2);
        grad
    }
}

/// `c.moments(grad_scale)`: the shared scalars of an Adam-family coefficient struct (they all
/// name these fields alike).
macro_rules! moments_of {
    ($($coeffs:ty),*) => {$(
        impl $coeffs {
            pub(crate) fn moments<T: Float>(&self, grad_scale: f64) -> Moments<T> {
                Moments::new(
                    self.lr,
                    (self.beta1, self.beta2),
                    self.weight_decay,
                    self.decoupled,
                    self.maximize,
                    grad_scale,
                )
            }
        }
    )*};
}

moments_of!(
    super::adam::AdamCoeffs,
    super::radam::RAdamCoeffs,
    super::nadam::NAdamCoeffs
);
