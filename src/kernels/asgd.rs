//! ASGD (averaged SGD): fused kernel and reference.

use super::prologue::Prologue;
use super::{passes, ElementOp, Pass, Slices};
use crate::arch::SimdLevel;
use crate::float::{Float, Lane};

/// Per-step scalars of ASGD, computed once per run from the parameter's `eta` and `mu` before
/// they advance (as torch reads them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ASGDCoeffs {
    /// `eta.item()`: the step's learning rate, an f32 value widened to f64.
    pub eta: f64,
    /// `1 - lambd * eta.item()`, computed in f64 (a Python float).
    pub decay: f64,
    /// `mu`: the averaging weight, an f32 value widened to f64.
    pub mu: f64,
    /// L2 penalty.
    pub weight_decay: f64,
    /// Ascend instead of descend.
    pub maximize: bool,
}

impl ASGDCoeffs {
    /// torch's `mu.item() != 1`: average (`ax += mu (θ − ax)`) instead of copying.
    pub fn averages(&self) -> bool {
        self.mu != 1.0
    }
}

struct Op<T> {
    prologue: Prologue<T>,
    decay: T,
    neg_eta: T,
    average: bool,
    mu: T,
}

impl<T: Float> ElementOp<T, 1> for Op<T> {
    #[inline(always)]
    fn apply<V: Lane<Elem = T>>(&self, p: V, g: V, s: &mut [V; 1]) -> V {
        let [ax] = s;
        let g = self.prologue.grad(p, g);
        // param.mul_(1 - lambd * eta); param.add_(grad, alpha=-eta)
        let p = p * V::splat(self.decay);
        let p = p + V::splat(self.neg_eta) * g;
        // ax.add_(param.sub(ax).mul_(mu)), or ax.copy_(param) while mu is 1
        *ax = if self.average {
            *ax + (p - *ax) * V::splat(self.mu)
        } else {
            p
        };
        p
    }
}

/// Fused ASGD over one piece: `bufs` is `[ax]`.
pub fn fused<T: Float>(
    simd: SimdLevel,
    c: &ASGDCoeffs,
    grad_scale: f64,
    p: &mut [T],
    g: &[T],
    bufs: &mut [&mut [T]],
) {
    run(c, grad_scale, Slices::new(simd, p, g, bufs))
}

/// The fused kernel of [`fused`] over any [`Pass`]: the f32/f64 slices of a plain step, or
/// the half-precision streams of a mixed-precision one ([`crate::mixed`]).
pub fn run<T: Float, P: Pass<T>>(c: &ASGDCoeffs, grad_scale: f64, pass: P) {
    let op = Op {
        prologue: Prologue::new(grad_scale, c.maximize, c.weight_decay),
        decay: T::from_f64(c.decay),
        neg_eta: T::from_f64(-c.eta),
        average: c.averages(),
        mu: T::from_f64(c.mu),
    };
    match pass.buffers() {
        1 => pass.run::<1, _>(&op),
        _ => unreachable!("ASGD keeps one buffer"),
    }
}

/// torch's `_single_tensor_asgd` (not capturable), one pass per tensor operation.
pub fn reference<T: Float>(
    c: &ASGDCoeffs,
    grad_scale: f64,
    p: &mut [T],
    g: &[T],
    bufs: &mut [&mut [T]],
) {
    let [ax] = bufs else {
        unreachable!("ASGD keeps one buffer")
    };
    let grad = Prologue::new(grad_scale, c.maximize, c.weight_decay).reference(p, g);
    passes::mul(p, T::from_f64(c.decay));
    passes::add_scaled(p, &grad, T::from_f64(-c.eta));
    if c.averages() {
        let mut diff: Vec<T> = p.iter().zip(ax.iter()).map(|(&a, &b)| a - b).collect();
        passes::mul(&mut diff, T::from_f64(c.mu));
        for (x, d) in ax.iter_mut().zip(diff) {
            *x = *x + d;
        }
    } else {
        ax.copy_from_slice(p);
    }
}

crate::renamed! {
    #[deprecated(since = "0.2.0", note = "renamed to `ASGDCoeffs`, torch's spelling")]
    AsgdCoeffs => ASGDCoeffs;
}
