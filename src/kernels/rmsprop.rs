//! RMSprop (plain or centered, with or without momentum): fused kernel and reference.

use super::prologue::Prologue;
use super::{lerp, passes, ElementOp, LerpWeight, Pass, Slices};
use crate::arch::SimdLevel;
use crate::float::{Float, Lane};

/// Per-step scalars of RMSprop (f64, as torch's Python floats). RMSprop's update does not
/// depend on the step number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RMSpropCoeffs {
    /// Learning rate.
    pub lr: f64,
    /// Smoothing constant of the square (and gradient) averages.
    pub alpha: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// L2 penalty.
    pub weight_decay: f64,
    /// Momentum factor; the `momentum_buffer` exists when it is positive.
    pub momentum: f64,
    /// Centered: normalise by the estimated variance; the `grad_avg` buffer exists.
    pub centered: bool,
    /// Ascend instead of descend.
    pub maximize: bool,
}

impl RMSpropCoeffs {
    /// Whether the `momentum_buffer` is kept and used (torch: `momentum > 0`).
    pub fn uses_momentum(&self) -> bool {
        self.momentum > 0.0
    }
}

struct Op<T> {
    prologue: Prologue<T>,
    alpha: T,
    one_minus_alpha: T,
    /// `1 - alpha` as lerp's weight, and `1 - weight` as ATen's lerp computes it.
    w: LerpWeight<T>,
    eps: T,
    momentum: T,
    neg_lr: T,
}

impl<T: Float> Op<T> {
    /// The gradient after `maximize` and weight decay, and the updated `square_avg`.
    #[inline(always)]
    fn grad_and_square<V: Lane<Elem = T>>(&self, p: V, g: V, sq: &mut V) -> V {
        let g = self.prologue.grad(p, g);
        *sq = *sq * V::splat(self.alpha) + V::splat(self.one_minus_alpha) * g * g;
        g
    }

    /// `grad_avg.lerp_(grad, 1 - alpha)`, then `sqrt(square_avg - grad_avg²) + eps`.
    #[inline(always)]
    fn centered_avg<V: Lane<Elem = T>>(&self, g: V, sq: V, ga: &mut V) -> V {
        *ga = lerp(*ga, g, &self.w);
        (sq + V::splat(-T::ONE) * *ga * *ga).sqrt() + V::splat(self.eps)
    }

    /// `sqrt(square_avg) + eps`.
    #[inline(always)]
    fn plain_avg<V: Lane<Elem = T>>(&self, sq: V) -> V {
        sq.sqrt() + V::splat(self.eps)
    }

    /// `param.addcdiv_(grad, avg, value=-lr)`.
    #[inline(always)]
    fn direct<V: Lane<Elem = T>>(&self, p: V, g: V, avg: V) -> V {
        p + V::splat(self.neg_lr) * g / avg
    }

    /// `buf.mul_(momentum).addcdiv_(grad, avg)`, then `param.add_(buf, alpha=-lr)`.
    #[inline(always)]
    fn with_momentum<V: Lane<Elem = T>>(&self, p: V, g: V, avg: V, buf: &mut V) -> V {
        *buf = *buf * V::splat(self.momentum) + V::splat(T::ONE) * g / avg;
        p + V::splat(self.neg_lr) * *buf
    }
}

/// `[square_avg]`.
struct Plain<T>(Op<T>);
/// `[square_avg, momentum_buffer]`.
struct Momentum<T>(Op<T>);
/// `[square_avg, grad_avg]`.
struct Centered<T>(Op<T>);
/// `[square_avg, momentum_buffer, grad_avg]`.
struct CenteredMomentum<T>(Op<T>);

impl<T: Float> ElementOp<T, 1> for Plain<T> {
    #[inline(always)]
    fn apply<V: Lane<Elem = T>>(&self, p: V, g: V, s: &mut [V; 1]) -> V {
        let [sq] = s;
        let g = self.0.grad_and_square(p, g, sq);
        let avg = self.0.plain_avg(*sq);
        self.0.direct(p, g, avg)
    }
}

impl<T: Float> ElementOp<T, 2> for Momentum<T> {
    #[inline(always)]
    fn apply<V: Lane<Elem = T>>(&self, p: V, g: V, s: &mut [V; 2]) -> V {
        let [sq, buf] = s;
        let g = self.0.grad_and_square(p, g, sq);
        let avg = self.0.plain_avg(*sq);
        self.0.with_momentum(p, g, avg, buf)
    }
}

impl<T: Float> ElementOp<T, 2> for Centered<T> {
    #[inline(always)]
    fn apply<V: Lane<Elem = T>>(&self, p: V, g: V, s: &mut [V; 2]) -> V {
        let [sq, ga] = s;
        let g = self.0.grad_and_square(p, g, sq);
        let avg = self.0.centered_avg(g, *sq, ga);
        self.0.direct(p, g, avg)
    }
}

impl<T: Float> ElementOp<T, 3> for CenteredMomentum<T> {
    #[inline(always)]
    fn apply<V: Lane<Elem = T>>(&self, p: V, g: V, s: &mut [V; 3]) -> V {
        let [sq, buf, ga] = s;
        let g = self.0.grad_and_square(p, g, sq);
        let avg = self.0.centered_avg(g, *sq, ga);
        self.0.with_momentum(p, g, avg, buf)
    }
}

fn op<T: Float>(c: &RMSpropCoeffs, grad_scale: f64) -> Op<T> {
    let w = T::from_f64(1.0 - c.alpha);
    Op {
        prologue: Prologue::new(grad_scale, c.maximize, c.weight_decay),
        alpha: T::from_f64(c.alpha),
        one_minus_alpha: T::from_f64(1.0 - c.alpha),
        w: LerpWeight::new(w),
        eps: T::from_f64(c.eps),
        momentum: T::from_f64(c.momentum),
        neg_lr: T::from_f64(-c.lr),
    }
}

/// Fused RMSprop over one piece. `bufs` is `[square_avg]`, then `momentum_buffer` when
/// `momentum > 0`, then `grad_avg` when centered.
pub fn fused<T: Float>(
    simd: SimdLevel,
    c: &RMSpropCoeffs,
    grad_scale: f64,
    p: &mut [T],
    g: &[T],
    bufs: &mut [&mut [T]],
) {
    run(c, grad_scale, Slices::new(simd, p, g, bufs))
}

/// The fused kernel of [`fused`] over any [`Pass`]: the f32/f64 slices of a plain step, or
/// the half-precision streams of a mixed-precision one ([`crate::mixed`]).
pub fn run<T: Float, P: Pass<T>>(c: &RMSpropCoeffs, grad_scale: f64, pass: P) {
    let op = op::<T>(c, grad_scale);
    match (pass.buffers(), c.uses_momentum(), c.centered) {
        (1, false, false) => pass.run::<1, _>(&Plain(op)),
        (2, true, false) => pass.run::<2, _>(&Momentum(op)),
        (2, false, true) => pass.run::<2, _>(&Centered(op)),
        (3, true, true) => pass.run::<3, _>(&CenteredMomentum(op)),
        _ => unreachable!("RMSprop's buffers follow its momentum and centered settings"),
    }
}

/// torch's `_single_tensor_rmsprop`, one pass per tensor operation.
pub fn reference<T: Float>(
    c: &RMSpropCoeffs,
    grad_scale: f64,
    p: &mut [T],
    g: &[T],
    bufs: &mut [&mut [T]],
) {
    let grad = Prologue::new(grad_scale, c.maximize, c.weight_decay).reference(p, g);
    let (sq, rest) = bufs.split_first_mut().expect("square_avg");
    let (buf, rest) = if c.uses_momentum() {
        let (b, r) = rest.split_first_mut().expect("momentum_buffer");
        (Some(b), r)
    } else {
        (None, rest)
    };
    let ga = if c.centered {
        Some(rest.first_mut().expect("grad_avg"))
    } else {
        None
    };
    // square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
    passes::mul(sq, T::from_f64(c.alpha));
    passes::addcmul(sq, &grad, &grad, T::from_f64(1.0 - c.alpha));
    let mut avg: Vec<T> = match ga {
        Some(ga) => {
            // grad_avg.lerp_(grad, 1 - alpha)
            passes::lerp(ga, &grad, T::from_f64(1.0 - c.alpha));
            // square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
            let mut avg = sq.to_vec();
            passes::addcmul(&mut avg, ga, ga, -T::ONE);
            avg.iter_mut().for_each(|x| *x = x.sqrt());
            avg
        }
        None => sq.iter().map(|&x| x.sqrt()).collect(),
    };
    // avg.add_(eps)
    let eps = T::from_f64(c.eps);
    avg.iter_mut().for_each(|x| *x = *x + eps);
    match buf {
        Some(buf) => {
            // buf.mul_(momentum).addcdiv_(grad, avg); param.add_(buf, alpha=-lr)
            passes::mul(buf, T::from_f64(c.momentum));
            passes::addcdiv(buf, &grad, &avg, T::ONE);
            passes::add_scaled(p, buf, T::from_f64(-c.lr));
        }
        // param.addcdiv_(grad, avg, value=-lr)
        None => passes::addcdiv(p, &grad, &avg, T::from_f64(-c.lr)),
    }
}

crate::renamed! {
    #[deprecated(since = "0.2.0", note = "renamed to `RMSpropCoeffs`, torch's spelling")]
    RmspropCoeffs => RMSpropCoeffs;
}
