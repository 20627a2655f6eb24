//! Adamax (Adam with the infinity norm): fused kernel and reference.

use super::prologue::Prologue;
use super::{lerp, passes, ElementOp, LerpWeight, Pass, Slices};
use crate::arch::SimdLevel;
use crate::float::{Float, Lane};

/// Per-step scalars of Adamax, computed once per run in f64 as torch does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamaxCoeffs {
    /// `beta1`.
    pub beta1: f64,
    /// `beta2`.
    pub beta2: f64,
    /// `eps`.
    pub eps: f64,
    /// L2 penalty.
    pub weight_decay: f64,
    /// Ascend instead of descend.
    pub maximize: bool,
    /// `clr = lr / (1 - beta1^step)`.
    pub clr: f64,
}

impl AdamaxCoeffs {
    /// The scalars of step number `step` (1-based).
    pub fn new(
        lr: f64,
        (beta1, beta2): (f64, f64),
        eps: f64,
        weight_decay: f64,
        maximize: bool,
        step: u64,
    ) -> Self {
        let bias_correction = 1.0 - beta1.powf(step as f64);
        AdamaxCoeffs {
            beta1,
            beta2,
            eps,
            weight_decay,
            maximize,
            clr: lr / bias_correction,
        }
    }
}

struct Op<T> {
    prologue: Prologue<T>,
    w1: LerpWeight<T>,
    beta2: T,
    eps: T,
    neg_clr: T,
}

impl<T: Float> ElementOp<T, 2> for Op<T> {
    #[inline(always)]
    fn apply<V: Lane<Elem = T>>(&self, p: V, g: V, s: &mut [V; 2]) -> V {
        let [m, u] = s;
        let g = self.prologue.grad(p, g);
        *m = lerp(*m, g, &self.w1);
        *u = (*u * V::splat(self.beta2)).maximum(g.abs() + V::splat(self.eps));
        p + V::splat(self.neg_clr) * *m / *u
    }
}

/// Fused Adamax over one piece: `bufs` is `[exp_avg, exp_inf]`.
pub fn fused<T: Float>(
    simd: SimdLevel,
    c: &AdamaxCoeffs,
    grad_scale: f64,
    p: &mut [T],
    g: &[T],
    bufs: &mut [&mut [T]],
) {
    run(c, grad_scale, Slices::new(simd, p, g, bufs))
}

/// The fused kernel of [`fused`] over any [`Pass`]: the f32/f64 slices of a plain step, or
/// the half-precision streams of a mixed-precision one ([`crate::mixed`]).
pub fn run<T: Float, P: Pass<T>>(c: &AdamaxCoeffs, grad_scale: f64, pass: P) {
    let op = Op {
        prologue: Prologue::new(grad_scale, c.maximize, c.weight_decay),
        w1: LerpWeight::new(T::from_f64(1.0 - c.beta1)),
        beta2: T::from_f64(c.beta2),
        eps: T::from_f64(c.eps),
        neg_clr: T::from_f64(-c.clr),
    };
    match pass.buffers() {
        2 => pass.run::<2, _>(&op),
        _ => unreachable!("Adamax keeps two buffers"),
    }
}

/// torch's `_single_tensor_adamax` (the non-differentiable branch), one pass per tensor
/// operation.
pub fn reference<T: Float>(
    c: &AdamaxCoeffs,
    grad_scale: f64,
    p: &mut [T],
    g: &[T],
    bufs: &mut [&mut [T]],
) {
    let grad = Prologue::new(grad_scale, c.maximize, c.weight_decay).reference(p, g);
    let [m, u] = bufs else {
        unreachable!("Adamax keeps two buffers")
    };
    passes::lerp(m, &grad, T::from_f64(1.0 - c.beta1));
    // torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)
    passes::mul(u, T::from_f64(c.beta2));
    let eps = T::from_f64(c.eps);
    let norm: Vec<T> = grad.iter().map(|&x| x.abs()).map(|x| x + eps).collect();
    for (x, &y) in u.iter_mut().zip(&norm) {
        *x = x.maximum(y);
    }
    passes::addcdiv(p, m, u, T::from_f64(-c.clr));
}
