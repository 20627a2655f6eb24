//! Adam and AdamW (coupled or decoupled weight decay, AMSGrad): fused kernel and reference.
//!
//! Update rule (Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015;
//! AdamW: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019), per
//! element, with torch's order of operations:
//!
//! ```text
//! m ← lerp(m, g, 1 − β₁)            v ← β₂·v + (1 − β₂)·g²
//! p ← p − (lr / (1 − β₁ᵗ)) · m / (√v · (1 / √(1 − β₂ᵗ)) + ε)
//! ```
//!
//! One deliberate difference from torch's literal sequence: torch divides `√v` by
//! `√(1 − β₂ᵗ)`; both kernels here multiply by its reciprocal, computed once per step in f64.
//! That removes one of the two divisions per element (the divider is the in-cache bottleneck:
//! see BENCHMARKS.md) and moves each result by at most about one ulp, far inside the parity
//! tolerances.

use super::moments::Moments;
use super::{passes, ElementOp, Pass, Slices};
use crate::arch::SimdLevel;
use crate::float::{Float, Lane};

/// Per-step scalars of Adam, computed once per run in f64 as torch does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamCoeffs {
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
    /// Decoupled (AdamW) instead of L2 weight decay.
    pub decoupled: bool,
    /// Ascend instead of descend.
    pub maximize: bool,
    /// `lr / (1 - beta1^step)`.
    pub step_size: f64,
    /// `sqrt(1 - beta2^step)`.
    pub bias_correction2_sqrt: f64,
}

impl AdamCoeffs {
    /// The scalars of step number `step` (1-based).
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
        AdamCoeffs {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            decoupled,
            maximize,
            step_size: lr / bias_correction1,
            bias_correction2_sqrt: bias_correction2.powf(0.5),
        }
    }

    /// `1 / sqrt(1 - beta2^step)`, in f64 and rounded once: the kernels multiply by it where
    /// torch divides by `sqrt(1 - beta2^step)`.
    pub fn inv_bias_correction2_sqrt(&self) -> f64 {
        1.0 / self.bias_correction2_sqrt
    }
}

struct Op<T> {
    moments: Moments<T>,
    inv_bc2_sqrt: T,
    eps: T,
    neg_step_size: T,
}

impl<T: Float> Op<T> {
    #[inline(always)]
    fn finish<V: Lane<Elem = T>>(&self, p: V, m: V, second: V) -> V {
        let denom = second.sqrt() * V::splat(self.inv_bc2_sqrt) + V::splat(self.eps);
        p + V::splat(self.neg_step_size) * m / denom
    }
}

impl<T: Float> ElementOp<T, 2> for Op<T> {
    #[inline(always)]
    fn apply<V: Lane<Elem = T>>(&self, p: V, g: V, s: &mut [V; 2]) -> V {
        let [m, v] = s;
        let (p, _) = self.moments.apply(p, g, m, v);
        self.finish(p, *m, *v)
    }
}

impl<T: Float> ElementOp<T, 3> for Op<T> {
    #[inline(always)]
    fn apply<V: Lane<Elem = T>>(&self, p: V, g: V, s: &mut [V; 3]) -> V {
        let [m, v, vmax] = s;
        let (p, _) = self.moments.apply(p, g, m, v);
        *vmax = vmax.maximum(*v);
        self.finish(p, *m, *vmax)
    }
}

fn op<T: Float>(c: &AdamCoeffs, grad_scale: f64) -> Op<T> {
    Op {
        moments: c.moments(grad_scale),
        inv_bc2_sqrt: T::from_f64(c.inv_bias_correction2_sqrt()),
        eps: T::from_f64(c.eps),
        neg_step_size: T::from_f64(-c.step_size),
    }
}

/// Fused Adam over one piece: `bufs` is `[exp_avg, exp_avg_sq]` or, with AMSGrad,
/// `[exp_avg, exp_avg_sq, max_exp_avg_sq]`.
pub fn fused<T: Float>(
    simd: SimdLevel,
    c: &AdamCoeffs,
    grad_scale: f64,
    p: &mut [T],
    g: &[T],
    bufs: &mut [&mut [T]],
) {
    run(c, grad_scale, Slices::new(simd, p, g, bufs))
}

/// The fused kernel of [`fused`] over any [`Pass`]: the f32/f64 slices of a plain step, or
/// the half-precision streams of a mixed-precision one ([`crate::mixed`]).
pub fn run<T: Float, P: Pass<T>>(c: &AdamCoeffs, grad_scale: f64, pass: P) {
    let op = op::<T>(c, grad_scale);
    match pass.buffers() {
        2 => pass.run::<2, _>(&op),
        3 => pass.run::<3, _>(&op),
        _ => unreachable!("Adam keeps two or three buffers"),
    }
}

/// torch's `_single_tensor_adam`, one pass per tensor operation (with the reciprocal
/// multiply described in the module docs).
pub fn reference<T: Float>(
    c: &AdamCoeffs,
    grad_scale: f64,
    p: &mut [T],
    g: &[T],
    bufs: &mut [&mut [T]],
) {
    let moments = c.moments::<T>(grad_scale);
    let (m, rest) = bufs.split_first_mut().expect("exp_avg");
    let (v, rest) = rest.split_first_mut().expect("exp_avg_sq");
    moments.reference(p, g, m, v);
    let second: &[T] = match rest {
        [vmax] => {
            for (x, &y) in vmax.iter_mut().zip(v.iter()) {
                *x = x.maximum(y);
            }
            vmax
        }
        _ => v,
    };
    let inv_bc2 = T::from_f64(c.inv_bias_correction2_sqrt());
    let eps = T::from_f64(c.eps);
    let denom: Vec<T> = second
        .iter()
        .map(|&x| x.sqrt() * inv_bc2)
        .map(|x| x + eps)
        .collect();
    passes::addcdiv(p, m, &denom, T::from_f64(-c.step_size));
}
