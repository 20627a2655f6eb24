//! Adagrad (dense gradients): fused kernel and reference.

use super::prologue::Prologue;
use super::{passes, ElementOp, Pass, Slices};
use crate::arch::SimdLevel;
use crate::float::{Float, Lane};

/// Per-step scalars of Adagrad, computed once per run in f64 as torch does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdagradCoeffs {
    /// `eps`.
    pub eps: f64,
    /// L2 penalty.
    pub weight_decay: f64,
    /// Ascend instead of descend.
    pub maximize: bool,
    /// `clr = lr / (1 + (step - 1) * lr_decay)`.
    pub clr: f64,
}

impl AdagradCoeffs {
    /// The scalars of step number `step` (1-based).
    pub fn new(
        lr: f64,
        lr_decay: f64,
        eps: f64,
        weight_decay: f64,
        maximize: bool,
        step: u64,
    ) -> Self {
        let step = step as f64;
        AdagradCoeffs {
            eps,
            weight_decay,
            maximize,
            clr: lr / (1.0 + (step - 1.0) * lr_decay),
        }
    }
}

struct Op<T> {
    prologue: Prologue<T>,
    eps: T,
    neg_clr: T,
}

impl<T: Float> ElementOp<T, 1> for Op<T> {
    #[inline(always)]
    fn apply<V: Lane<Elem = T>>(&self, p: V, g: V, s: &mut [V; 1]) -> V {
        let [sum] = s;
        let g = self.prologue.grad(p, g);
        // torch: state_sum.addcmul_(grad, grad, value=1); `1 * g` is exact.
        *sum = *sum + g * g;
        let std = sum.sqrt() + V::splat(self.eps);
        p + V::splat(self.neg_clr) * g / std
    }
}

/// Fused Adagrad over one piece: `bufs` is `[sum]`.
pub fn fused<T: Float>(
    simd: SimdLevel,
    c: &AdagradCoeffs,
    grad_scale: f64,
    p: &mut [T],
    g: &[T],
    bufs: &mut [&mut [T]],
) {
    run(c, grad_scale, Slices::new(simd, p, g, bufs))
}

/// The fused kernel of [`fused`] over any [`Pass`]: the f32/f64 slices of a plain step, or
/// the half-precision streams of a mixed-precision one ([`crate::mixed`]).
pub fn run<T: Float, P: Pass<T>>(c: &AdagradCoeffs, grad_scale: f64, pass: P) {
    let op = Op {
        prologue: Prologue::new(grad_scale, c.maximize, c.weight_decay),
        eps: T::from_f64(c.eps),
        neg_clr: T::from_f64(-c.clr),
    };
    match pass.buffers() {
        1 => pass.run::<1, _>(&op),
        _ => unreachable!("Adagrad keeps one buffer"),
    }
}

/// torch's `_single_tensor_adagrad` for dense gradients, one pass per tensor operation.
pub fn reference<T: Float>(
    c: &AdagradCoeffs,
    grad_scale: f64,
    p: &mut [T],
    g: &[T],
    bufs: &mut [&mut [T]],
) {
    let grad = Prologue::new(grad_scale, c.maximize, c.weight_decay).reference(p, g);
    let [sum] = bufs else {
        unreachable!("Adagrad keeps one buffer")
    };
    passes::addcmul(sum, &grad, &grad, T::ONE);
    let eps = T::from_f64(c.eps);
    let std: Vec<T> = sum.iter().map(|&x| x.sqrt()).map(|x| x + eps).collect();
    passes::addcdiv(p, &grad, &std, T::from_f64(-c.clr));
}
