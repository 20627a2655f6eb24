//! SGD with momentum, dampening, Nesterov and weight decay: fused kernel and reference.

use super::prologue::Prologue;
use super::{passes, ElementOp, Pass, Slices};
use crate::arch::SimdLevel;
use crate::float::{Float, Lane};

/// Per-step scalars of SGD (f64, as torch's Python floats).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SGDCoeffs {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor (0 disables the buffer).
    pub momentum: f64,
    /// Dampening of the gradient entering the buffer.
    pub dampening: f64,
    /// L2 penalty.
    pub weight_decay: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Ascend instead of descend.
    pub maximize: bool,
}

struct Op<T> {
    neg_lr: T,
    momentum: T,
    one_minus_dampening: T,
    prologue: Prologue<T>,
    nesterov: bool,
    fresh: bool,
}

impl<T: Float> ElementOp<T, 0> for Op<T> {
    #[inline(always)]
    fn apply<V: Lane<Elem = T>>(&self, p: V, g: V, _: &mut [V; 0]) -> V {
        let g = self.prologue.grad(p, g);
        p + V::splat(self.neg_lr) * g
    }
}

impl<T: Float> ElementOp<T, 1> for Op<T> {
    #[inline(always)]
    fn apply<V: Lane<Elem = T>>(&self, p: V, g: V, s: &mut [V; 1]) -> V {
        let g = self.prologue.grad(p, g);
        let buf = if self.fresh {
            g
        } else {
            s[0] * V::splat(self.momentum) + V::splat(self.one_minus_dampening) * g
        };
        s[0] = buf;
        let d = if self.nesterov {
            g + V::splat(self.momentum) * buf
        } else {
            buf
        };
        p + V::splat(self.neg_lr) * d
    }
}

fn op<T: Float>(c: &SGDCoeffs, fresh: bool, grad_scale: f64) -> Op<T> {
    Op {
        neg_lr: T::from_f64(-c.lr),
        momentum: T::from_f64(c.momentum),
        one_minus_dampening: T::from_f64(1.0 - c.dampening),
        prologue: Prologue::new(grad_scale, c.maximize, c.weight_decay),
        nesterov: c.nesterov,
        fresh,
    }
}

/// Fused SGD over one piece. `bufs` is empty (no momentum) or holds `momentum_buffer`.
pub fn fused<T: Float>(
    simd: SimdLevel,
    c: &SGDCoeffs,
    fresh: bool,
    grad_scale: f64,
    p: &mut [T],
    g: &[T],
    bufs: &mut [&mut [T]],
) {
    run(c, fresh, grad_scale, Slices::new(simd, p, g, bufs))
}

/// The fused kernel of [`fused`] over any [`Pass`]: the f32/f64 slices of a plain step, or
/// the half-precision streams of a mixed-precision one ([`crate::mixed`]).
pub fn run<T: Float, P: Pass<T>>(c: &SGDCoeffs, fresh: bool, grad_scale: f64, pass: P) {
    let op = op::<T>(c, fresh, grad_scale);
    match pass.buffers() {
        0 => pass.run::<0, _>(&op),
        1 => pass.run::<1, _>(&op),
        _ => unreachable!("SGD keeps at most one buffer"),
    }
}

/// torch's `_single_tensor_sgd`, one pass per tensor operation.
pub fn reference<T: Float>(
    c: &SGDCoeffs,
    fresh: bool,
    grad_scale: f64,
    p: &mut [T],
    g: &[T],
    bufs: &mut [&mut [T]],
) {
    let mut grad = Prologue::new(grad_scale, c.maximize, c.weight_decay).reference(p, g);
    if let [buf] = bufs {
        if fresh {
            buf.copy_from_slice(&grad);
        } else {
            passes::mul(buf, T::from_f64(c.momentum));
            passes::add_scaled(buf, &grad, T::from_f64(1.0 - c.dampening));
        }
        if c.nesterov {
            passes::add_scaled(&mut grad, buf, T::from_f64(c.momentum));
        } else {
            grad.copy_from_slice(buf);
        }
    }
    passes::add_scaled(p, &grad, T::from_f64(-c.lr));
}

crate::renamed! {
    #[deprecated(since = "0.2.0", note = "renamed to `SGDCoeffs`, torch's spelling")]
    SgdCoeffs => SGDCoeffs;
}
