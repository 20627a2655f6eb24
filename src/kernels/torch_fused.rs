//! The updates of torch's fused CPU kernels (`fused=True`; ATen's `native/cpu/FusedSGDKernel.cpp`,
//! `FusedAdamKernel.cpp`, `FusedAdagradKernel.cpp`) in their own order of operations, for
//! [`crate::Optimizer::step_half`] on bf16 / f16 parameters (mode 1 of [`crate::mixed`]).
//!
//! On reduced-precision parameters torch widens every element to f32, updates it there and
//! rounds back; its compiled vector body rounds fewer times than its single-tensor path (the
//! one [`super::sgd`], [`super::adam`] and [`super::adagrad`] follow): `vec::fmadd` calls, and
//! multiply-adds the compiler contracted. Which ones was measured against torch 2.15 on bf16
//! parameters (1.28M elements, 10-12 steps: the sequences below agree with torch's bits on
//! every element, the unfused ones differ on 40-460), and they are written here with
//! [`Lane::fma`], which rounds once at every SIMD level, so every level still gives the
//! same bits. torch's scalar tail (the last `n % 32` elements of each tensor on AVX-512) does
//! not fuse; these kernels fuse everywhere, so they agree with the body.
//!
//! Per element (`fma(a, b, c)` = `a·b + c` rounded once; constants in f32):
//! ```text
//! every one:  g ← g·scale, −g when maximizing;  g ← fma(p, λ, g) (L2 weight decay)
//! SGD:        b ← g (first step) or fma(1 − dampening, g, b·μ);  d ← fma(b, μ, g) (Nesterov) or b
//!             p ← fma(d, −lr, p)
//! Adam(W):    p ← p·(1 − lr·λ) (decoupled);  m ← fma(w, g − m, m) if |w| < ½ else fma(w − 1, g − m, g),
//!             w = 1 − β₁;  v ← fma((1 − β₂)·g, g, v·β₂);  v̂ ← max(v̂, v) (AMSGrad)
//!             p ← p + (−lr/(1 − β₁ᵗ))·m / (√v / √(1 − β₂ᵗ) + ε)
//!             (`√v / √(1 − β₂ᵗ)` without a divide instruction but with its bits: [`RootDivisor`])
//! Adagrad:    s ← fma(g, g, s);  p ← p − (clr·g) / (√s + ε)
//! ```

use super::adagrad::AdagradCoeffs;
use super::adam::AdamCoeffs;
use super::sgd::SGDCoeffs;
use super::{ElementOp, Pass};
use crate::float::Lane;

/// The effective gradient: scaled, negated when maximizing, plus L2 weight decay (fused).
#[derive(Debug, Clone, Copy)]
struct Grad {
    scale: f32,
    maximize: bool,
    /// L2 weight decay into the gradient (`None`: none, or decoupled).
    l2: Option<f32>,
}

impl Grad {
    #[inline(always)]
    fn apply<V: Lane<Elem = f32>>(&self, p: V, g: V) -> V {
        let g = g * V::splat(self.scale);
        let g = if self.maximize { -g } else { g };
        match self.l2 {
            Some(wd) => p.fma(V::splat(wd), g),
            None => g,
        }
    }
}

struct SGDOp {
    grad: Grad,
    neg_lr: f32,
    momentum: f32,
    one_minus_dampening: f32,
    nesterov: bool,
    fresh: bool,
}

impl ElementOp<f32, 0> for SGDOp {
    #[inline(always)]
    fn apply<V: Lane<Elem = f32>>(&self, p: V, g: V, _: &mut [V; 0]) -> V {
        let g = self.grad.apply(p, g);
        g.fma(V::splat(self.neg_lr), p)
    }
}

impl ElementOp<f32, 1> for SGDOp {
    #[inline(always)]
    fn apply<V: Lane<Elem = f32>>(&self, p: V, g: V, s: &mut [V; 1]) -> V {
        let g = self.grad.apply(p, g);
        let buf = if self.fresh {
            g
        } else {
            V::splat(self.one_minus_dampening).fma(g, s[0] * V::splat(self.momentum))
        };
        s[0] = buf;
        let d = if self.nesterov {
            buf.fma(V::splat(self.momentum), g)
        } else {
            buf
        };
        d.fma(V::splat(self.neg_lr), p)
    }
}

/// torch's fused SGD over `pass`.
pub fn sgd<P: Pass<f32>>(c: &SGDCoeffs, fresh: bool, grad_scale: f64, pass: P) {
    let op = SGDOp {
        grad: Grad {
            scale: grad_scale as f32,
            maximize: c.maximize,
            l2: (c.weight_decay != 0.0).then_some(c.weight_decay as f32),
        },
        neg_lr: -c.lr as f32,
        momentum: c.momentum as f32,
        one_minus_dampening: (1.0 - c.dampening) as f32,
        nesterov: c.nesterov,
        fresh,
    };
    match pass.buffers() {
        0 => pass.run::<0, _>(&op),
        1 => pass.run::<1, _>(&op),
        _ => unreachable!("SGD keeps at most one buffer"),
    }
}

/// Division of a square root by a constant, `√v / c` for any f32 `v` and any `c` of torch's
/// Adam (`c = √(1 − β₂ᵗ)` with `0 ≤ β₂ < 1`, so `2⁻²⁷ < c ≤ 1`), correctly rounded: the bits
/// of the division, from a multiply, two multiply-adds and a select instead of a divide.
///
/// The loops of the bf16 steps wait on the divider (a square root and two divisions per
/// element, against a pipelined multiply-add every cycle), so taking one division off it
/// pays: measured on the 2-core Xeon (AVX-512), mode 1 AdamW 36.6-37.1 -> 34.0-35.2 µs per
/// 64K elements in cache (one thread), 10.7-10.9 -> 10.0-10.3 ms at 32M (two threads).
/// Mode 3, whose loop is bound by its other work, did not change.
///
/// Markstein's theorem (P. Markstein, *Computation of elementary functions on the IBM RISC
/// System/6000 processor*, IBM J. Res. Dev. 34(1), 1990; Muller et al., *Handbook of
/// Floating-Point Arithmetic*, 2018, §4.9): with `y = RN(1/c)` and `q₀ = RN(a·y)`, the
/// remainder `r = a − q₀·c` is exact in one fused multiply-add and `RN(q₀ + r·y) = RN(a/c)`,
/// unless something underflows or overflows. Nothing does here: `a = √v` is at most `2⁶⁴`,
/// and at least `2⁻⁷⁵` when not zero, so `q₀ ≤ 2⁹²`, and a remainder that is not zero is a
/// multiple of `ulp(q₀)·ulp(c) ≈ 2⁻⁴⁶·a ≥ 2⁻¹²¹`, a normal number even where subnormals are
/// flushed. The signs of zeros come out as the division's (`r` is formed as `q₀·c − a`, so
/// that `−0` stays `−0`), and `+∞` and NaN lanes, where `r` would be NaN, take `a` itself,
/// which is what `a / c` is for them. The tests check every mantissa against `/`, at every
/// SIMD level, flushed and not.
#[derive(Debug, Clone, Copy)]
struct RootDivisor {
    c: f32,
    /// `RN(1/c)`.
    inv: f32,
}

impl RootDivisor {
    fn new(c: f32) -> Self {
        RootDivisor { c, inv: 1.0 / c }
    }

    /// `a / c` for `a = √v` (see the type).
    #[inline(always)]
    fn divide<V: Lane<Elem = f32>>(&self, a: V) -> V {
        let q0 = a * V::splat(self.inv);
        let neg_r = q0.fma(V::splat(self.c), -a);
        let q = neg_r.fma(V::splat(-self.inv), q0);
        a.lt_select(V::splat(f32::INFINITY), q, a)
    }
}

struct AdamOp {
    grad: Grad,
    /// `1 − lr·λ` for decoupled weight decay.
    decay: Option<f32>,
    /// The lerp weight `1 − β₁`, and the coefficient ATen uses for it: `w` when `|w| < ½`,
    /// else `w − 1` (from `g`).
    lerp_coeff: f32,
    lerp_from_start: bool,
    beta2: f32,
    one_minus_beta2: f32,
    /// Division by `√(1 − β₂ᵗ)`.
    bc2_sqrt: RootDivisor,
    eps: f32,
    neg_step_size: f32,
}

impl AdamOp {
    #[inline(always)]
    fn moments<V: Lane<Elem = f32>>(&self, p: V, g: V, m: &mut V, v: &mut V) -> V {
        let g = self.grad.apply(p, g);
        let p = match self.decay {
            Some(f) => p * V::splat(f),
            None => p,
        };
        let base = if self.lerp_from_start { *m } else { g };
        *m = V::splat(self.lerp_coeff).fma(g - *m, base);
        *v = (V::splat(self.one_minus_beta2) * g).fma(g, *v * V::splat(self.beta2));
        p
    }

    #[inline(always)]
    fn finish<V: Lane<Elem = f32>>(&self, p: V, m: V, second: V) -> V {
        let denom = self.bc2_sqrt.divide(second.sqrt()) + V::splat(self.eps);
        p + V::splat(self.neg_step_size) * m / denom
    }
}

impl ElementOp<f32, 2> for AdamOp {
    const GROUPS_PER_ITERATION: usize = 4;
    #[inline(always)]
    fn apply<V: Lane<Elem = f32>>(&self, p: V, g: V, s: &mut [V; 2]) -> V {
        let [m, v] = s;
        let p = self.moments(p, g, m, v);
        self.finish(p, *m, *v)
    }
}

impl ElementOp<f32, 3> for AdamOp {
    const GROUPS_PER_ITERATION: usize = 4;
    #[inline(always)]
    fn apply<V: Lane<Elem = f32>>(&self, p: V, g: V, s: &mut [V; 3]) -> V {
        let [m, v, vmax] = s;
        let p = self.moments(p, g, m, v);
        *vmax = vmax.maximum(*v);
        self.finish(p, *m, *vmax)
    }
}

/// torch's fused Adam / AdamW over `pass` (`c.decoupled` picks AdamW's weight decay).
pub fn adam<P: Pass<f32>>(c: &AdamCoeffs, grad_scale: f64, pass: P) {
    let w = (1.0 - c.beta1) as f32;
    let from_start = w.abs() < 0.5;
    let decay = c.weight_decay != 0.0;
    let op = AdamOp {
        grad: Grad {
            scale: grad_scale as f32,
            maximize: c.maximize,
            l2: (decay && !c.decoupled).then_some(c.weight_decay as f32),
        },
        decay: (decay && c.decoupled).then_some((1.0 - c.lr * c.weight_decay) as f32),
        lerp_coeff: if from_start { w } else { w - 1.0 },
        lerp_from_start: from_start,
        beta2: c.beta2 as f32,
        one_minus_beta2: (1.0 - c.beta2) as f32,
        bc2_sqrt: RootDivisor::new(c.bias_correction2_sqrt as f32),
        eps: c.eps as f32,
        neg_step_size: -c.step_size as f32,
    };
    match pass.buffers() {
        2 => pass.run::<2, _>(&op),
        3 => pass.run::<3, _>(&op),
        _ => unreachable!("Adam keeps two or three buffers"),
    }
}

struct AdagradOp {
    grad: Grad,
    eps: f32,
    clr: f32,
}

impl ElementOp<f32, 1> for AdagradOp {
    #[inline(always)]
    fn apply<V: Lane<Elem = f32>>(&self, p: V, g: V, s: &mut [V; 1]) -> V {
        let g = self.grad.apply(p, g);
        s[0] = g.fma(g, s[0]);
        let std = s[0].sqrt() + V::splat(self.eps);
        p - V::splat(self.clr) * g / std
    }
}

/// torch's fused Adagrad over `pass`.
pub fn adagrad<P: Pass<f32>>(c: &AdagradCoeffs, grad_scale: f64, pass: P) {
    let op = AdagradOp {
        grad: Grad {
            scale: grad_scale as f32,
            maximize: c.maximize,
            l2: (c.weight_decay != 0.0).then_some(c.weight_decay as f32),
        },
        eps: c.eps as f32,
        clr: c.clr as f32,
    };
    match pass.buffers() {
        1 => pass.run::<1, _>(&op),
        _ => unreachable!("Adagrad keeps one buffer"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::{Simd, SimdLevel, WithSimd};
    use crate::subnormals::Subnormals;

    /// `RootDivisor::divide(√v)` for every `v` of `values`, on the lanes of the token it is
    /// given (and the scalar lane for the tail), into `out`.
    struct DivideRoots<'a> {
        divisor: RootDivisor,
        values: &'a [f32],
        out: &'a mut [f32],
    }

    impl WithSimd for DivideRoots<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: Simd>(self, _: S) {
            let w = <S::F32 as Lane>::WIDTH;
            let body = self.values.len() / w * w;
            for i in (0..body).step_by(w) {
                let a = <S::F32 as Lane>::load(&self.values[i..i + w]).sqrt();
                self.divisor.divide(a).store(&mut self.out[i..i + w]);
            }
            for i in body..self.values.len() {
                self.out[i] = self.divisor.divide(self.values[i].sqrt());
            }
        }
    }

    /// Every f32 with one of the biased exponent fields `exponents`, each mantissa once.
    fn every_mantissa(exponents: &[u32]) -> Vec<f32> {
        exponents
            .iter()
            .flat_map(|&e| (0..1u32 << 23).map(move |m| f32::from_bits(e << 23 | m)))
            .collect()
    }

    #[test]
    fn root_divisor_gives_the_bits_of_the_division_for_every_mantissa() {
        // √v for v in [1, 4) takes every mantissa of the quotient's numerator; the subnormal
        // and largest binades, where the sequence could underflow or overflow, every 7th.
        let mut values = every_mantissa(&[127, 128]);
        values.extend(every_mantissa(&[0, 1, 254]).into_iter().step_by(7));
        values.extend([
            f32::INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7FC0_1234),
            -0.0,
            -1.0,
            f32::NEG_INFINITY,
            f32::MAX,
        ]);
        // The divisor √(1 − β₂ᵗ) as Adam's coefficients round it, over β₂ and t.
        let divisors: Vec<f32> = [
            (0.999, 1),
            (0.999, 2),
            (0.999, 1000),
            (0.99, 7),
            (0.95, 3),
            (0.5, 1),
            (0.0, 1),
            (1.0 - f64::EPSILON / 2.0, 1),
            (0.9999, 123_456),
        ]
        .iter()
        .map(|&(beta2, t): &(f64, i32)| (1.0 - beta2.powi(t)).sqrt() as f32)
        .collect();
        for &c in &divisors {
            let divisor = RootDivisor::new(c);
            for subnormals in [Subnormals::Preserve, Subnormals::Flush] {
                subnormals.run(|| {
                    let want: Vec<u32> = values
                        .iter()
                        .map(|&v| (std::hint::black_box(v).sqrt() / c).to_bits())
                        .collect();
                    let mut out = vec![0.0f32; values.len()];
                    for level in SimdLevel::ALL.into_iter().filter(|l| l.is_available()) {
                        // The portable lanes use a software `fma` in a default build: every
                        // 61st value there keeps the test short.
                        let stride = if level == SimdLevel::Portable { 61 } else { 1 };
                        let sample: Vec<f32> = values.iter().step_by(stride).copied().collect();
                        level.dispatch(DivideRoots {
                            divisor,
                            values: &sample,
                            out: &mut out[..sample.len()],
                        });
                        let want = want.iter().step_by(stride);
                        for ((&v, q), &want) in sample.iter().zip(&out).zip(want) {
                            assert_eq!(
                                q.to_bits(),
                                want,
                                "√{v:e} / {c:e} at {level:?}, {subnormals:?}: {q:e} vs {:e}",
                                f32::from_bits(want)
                            );
                        }
                    }
                });
            }
        }
    }
}
