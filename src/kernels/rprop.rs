//! Rprop (resilient backpropagation): fused branch-free kernel and reference.

use super::prologue::Prologue;
use super::{passes, ElementOp, Pass, Slices};
use crate::arch::SimdLevel;
use crate::float::{Float, Lane};

/// Per-step scalars of Rprop (f64, as torch's Python floats). Rprop's update does not depend on
/// the step number or the learning rate (which only seeds `step_size`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RpropCoeffs {
    /// Multiplicative decrease factor, `etas[0]`.
    pub etaminus: f64,
    /// Multiplicative increase factor, `etas[1]`.
    pub etaplus: f64,
    /// Smallest step size, `step_sizes[0]`.
    pub step_size_min: f64,
    /// Largest step size, `step_sizes[1]`.
    pub step_size_max: f64,
    /// Ascend instead of descend.
    pub maximize: bool,
}

struct Op<T> {
    prologue: Prologue<T>,
    etaminus: T,
    etaplus: T,
    min: T,
    max: T,
}

/// `torch.sign`: 1, -1, or 0 for zeros and NaN.
#[inline(always)]
fn sign<V: Lane>(x: V) -> V {
    let zero = V::splat(<V::Elem as Float>::ZERO);
    let one = V::splat(<V::Elem as Float>::ONE);
    x.gt_select(zero, one, x.lt_select(zero, -one, zero))
}

impl<T: Float> ElementOp<T, 2> for Op<T> {
    #[inline(always)]
    fn apply<V: Lane<Elem = T>>(&self, p: V, g: V, s: &mut [V; 2]) -> V {
        let [prev, step_size] = s;
        let zero = V::splat(T::ZERO);
        let one = V::splat(T::ONE);
        let etaminus = V::splat(self.etaminus);
        let g = self.prologue.grad(p, g);
        // sign = grad.mul(prev).sign(); then torch's three masked assignments, in order.
        let f = sign(g * *prev);
        let f = f.gt_select(zero, V::splat(self.etaplus), f);
        let f = f.lt_select(zero, etaminus, f);
        let f = f.eq_select(zero, one, f);
        // step_size.mul_(sign).clamp_(min, max)
        *step_size = (*step_size * f)
            .maximum(V::splat(self.min))
            .minimum(V::splat(self.max));
        // grad[sign.eq(etaminus)] = 0
        let g = f.eq_select(etaminus, zero, g);
        // param.addcmul_(grad.sign(), step_size, value=-1); prev.copy_(grad)
        *prev = g;
        p + V::splat(-T::ONE) * sign(g) * *step_size
    }
}

/// Fused Rprop over one piece: `bufs` is `[prev, step_size]`.
pub fn fused<T: Float>(
    simd: SimdLevel,
    c: &RpropCoeffs,
    grad_scale: f64,
    p: &mut [T],
    g: &[T],
    bufs: &mut [&mut [T]],
) {
    run(c, grad_scale, Slices::new(simd, p, g, bufs))
}

/// The fused kernel of [`fused`] over any [`Pass`]: the f32/f64 slices of a plain step, or
/// the half-precision streams of a mixed-precision one ([`crate::mixed`]).
pub fn run<T: Float, P: Pass<T>>(c: &RpropCoeffs, grad_scale: f64, pass: P) {
    let op = Op {
        prologue: Prologue::new(grad_scale, c.maximize, 0.0),
        etaminus: T::from_f64(c.etaminus),
        etaplus: T::from_f64(c.etaplus),
        min: T::from_f64(c.step_size_min),
        max: T::from_f64(c.step_size_max),
    };
    match pass.buffers() {
        2 => pass.run::<2, _>(&op),
        _ => unreachable!("Rprop keeps two buffers"),
    }
}

/// torch's `_single_tensor_rprop`, one pass per tensor operation.
pub fn reference<T: Float>(
    c: &RpropCoeffs,
    grad_scale: f64,
    p: &mut [T],
    g: &[T],
    bufs: &mut [&mut [T]],
) {
    let [prev, step_size] = bufs else {
        unreachable!("Rprop keeps two buffers")
    };
    let mut grad = Prologue::new(grad_scale, c.maximize, 0.0).reference(p, g);
    let torch_sign = |x: T| {
        if x > T::ZERO {
            T::ONE
        } else if x < T::ZERO {
            -T::ONE
        } else {
            T::ZERO
        }
    };
    // sign = grad.mul(prev).sign()
    let mut sign: Vec<T> = grad
        .iter()
        .zip(prev.iter())
        .map(|(&a, &b)| torch_sign(a * b))
        .collect();
    let (etaplus, etaminus) = (T::from_f64(c.etaplus), T::from_f64(c.etaminus));
    // sign[sign.gt(0)] = etaplus; sign[sign.lt(0)] = etaminus; sign[sign.eq(0)] = 1
    sign.iter_mut()
        .filter(|s| **s > T::ZERO)
        .for_each(|s| *s = etaplus);
    sign.iter_mut()
        .filter(|s| **s < T::ZERO)
        .for_each(|s| *s = etaminus);
    sign.iter_mut()
        .filter(|s| **s == T::ZERO)
        .for_each(|s| *s = T::ONE);
    // step_size.mul_(sign).clamp_(step_size_min, step_size_max)
    let (min, max) = (T::from_f64(c.step_size_min), T::from_f64(c.step_size_max));
    for (st, &s) in step_size.iter_mut().zip(&sign) {
        *st = (*st * s).maximum(min).minimum(max);
    }
    // grad[sign.eq(etaminus)] = 0
    for (g, &s) in grad.iter_mut().zip(&sign) {
        if s == etaminus {
            *g = T::ZERO;
        }
    }
    // param.addcmul_(grad.sign(), step_size, value=-1)
    let grad_sign: Vec<T> = grad.iter().map(|&x| torch_sign(x)).collect();
    passes::addcmul(p, &grad_sign, step_size, -T::ONE);
    // prev.copy_(grad)
    prev.copy_from_slice(&grad);
}
