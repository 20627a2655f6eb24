//! Adadelta: fused kernel and reference.

use super::prologue::Prologue;
use super::{passes, ElementOp, Pass, Slices};
use crate::arch::SimdLevel;
use crate::float::{Float, Lane};

/// Per-step scalars of Adadelta (f64, as torch's Python floats). Adadelta's update does not
/// depend on the step number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdadeltaCoeffs {
    /// Learning rate (scales the computed delta).
    pub lr: f64,
    /// Decay rate of both running averages.
    pub rho: f64,
    /// Added inside both square roots.
    pub eps: f64,
    /// L2 penalty.
    pub weight_decay: f64,
    /// Ascend instead of descend.
    pub maximize: bool,
}

struct Op<T> {
    prologue: Prologue<T>,
    rho: T,
    one_minus_rho: T,
    eps: T,
    neg_lr: T,
}

impl<T: Float> ElementOp<T, 2> for Op<T> {
    #[inline(always)]
    fn apply<V: Lane<Elem = T>>(&self, p: V, g: V, s: &mut [V; 2]) -> V {
        let [square_avg, acc_delta] = s;
        let g = self.prologue.grad(p, g);
        let rho = V::splat(self.rho);
        let one_minus_rho = V::splat(self.one_minus_rho);
        let eps = V::splat(self.eps);
        *square_avg = *square_avg * rho + one_minus_rho * g * g;
        let std = (*square_avg + eps).sqrt();
        let delta = (*acc_delta + eps).sqrt() / std * g;
        *acc_delta = *acc_delta * rho + one_minus_rho * delta * delta;
        p + V::splat(self.neg_lr) * delta
    }
}

/// Fused Adadelta over one piece: `bufs` is `[square_avg, acc_delta]`.
pub fn fused<T: Float>(
    simd: SimdLevel,
    c: &AdadeltaCoeffs,
    grad_scale: f64,
    p: &mut [T],
    g: &[T],
    bufs: &mut [&mut [T]],
) {
    run(c, grad_scale, Slices::new(simd, p, g, bufs))
}

/// The fused kernel of [`fused`] over any [`Pass`]: the f32/f64 slices of a plain step, or
/// the half-precision streams of a mixed-precision one ([`crate::mixed`]).
pub fn run<T: Float, P: Pass<T>>(c: &AdadeltaCoeffs, grad_scale: f64, pass: P) {
    let op = Op {
        prologue: Prologue::new(grad_scale, c.maximize, c.weight_decay),
        rho: T::from_f64(c.rho),
        one_minus_rho: T::from_f64(1.0 - c.rho),
        eps: T::from_f64(c.eps),
        neg_lr: T::from_f64(-c.lr),
    };
    match pass.buffers() {
        2 => pass.run::<2, _>(&op),
        _ => unreachable!("Adadelta keeps two buffers"),
    }
}

/// torch's `_single_tensor_adadelta`, one pass per tensor operation.
pub fn reference<T: Float>(
    c: &AdadeltaCoeffs,
    grad_scale: f64,
    p: &mut [T],
    g: &[T],
    bufs: &mut [&mut [T]],
) {
    let grad = Prologue::new(grad_scale, c.maximize, c.weight_decay).reference(p, g);
    let [square_avg, acc_delta] = bufs else {
        unreachable!("Adadelta keeps two buffers")
    };
    let rho = T::from_f64(c.rho);
    let one_minus_rho = T::from_f64(1.0 - c.rho);
    let eps = T::from_f64(c.eps);
    passes::mul(square_avg, rho);
    passes::addcmul(square_avg, &grad, &grad, one_minus_rho);
    // std = square_avg.add(eps).sqrt_()
    let std: Vec<T> = square_avg
        .iter()
        .map(|&x| x + eps)
        .map(|x| x.sqrt())
        .collect();
    // delta = acc_delta.add(eps).sqrt_(); delta.div_(std).mul_(grad)
    let mut delta: Vec<T> = acc_delta
        .iter()
        .map(|&x| x + eps)
        .map(|x| x.sqrt())
        .collect();
    for (d, &s) in delta.iter_mut().zip(&std) {
        *d = *d / s;
    }
    for (d, &g) in delta.iter_mut().zip(&grad) {
        *d = *d * g;
    }
    passes::mul(acc_delta, rho);
    passes::addcmul(acc_delta, &delta, &delta, one_minus_rho);
    passes::add_scaled(p, &delta, T::from_f64(-c.lr));
}
