//! AVX2 lanes for the fused kernels, used when the CPU has AVX2 (checked at run time).
//!
//! [`F32x8`] and [`F64x4`] implement [`Lane`] with AVX intrinsics. Their methods are
//! `#[inline(always)]` and contain `unsafe` intrinsic calls; they are only ever executed inside
//! [`run_avx2`] or [`adafactor_avx2`], `#[target_feature(enable = "avx2")]` functions that the
//! dispatchers call after `is_x86_feature_detected!("avx2")`, so every instruction they compile
//! to exists.
//! Outside it no value of these types is created (their fields are private and nothing else
//! constructs them).

use std::arch::x86_64::*;
use std::ops::{Add, Div, Mul, Neg, Sub};

use crate::float::{Float, Lane};
use crate::kernels::ElementOp;

/// Eight f32 lanes in an AVX register.
#[derive(Clone, Copy)]
pub struct F32x8(__m256);

/// Four f64 lanes in an AVX register.
#[derive(Clone, Copy)]
pub struct F64x4(__m256d);

/// Evaluates AVX intrinsics.
macro_rules! avx {
    ($e:expr) => {{
        // SAFETY: AVX is available: values of the lane types below only exist inside
        // `run_avx2` / `adafactor_avx2`, entered after the run-time AVX2 check.
        #[allow(unused_unsafe)]
        unsafe {
            $e
        }
    }};
}

macro_rules! avx_lane {
    (
        $name:ident, $t:ty, $n:literal, $reg:ty,
        set1 = $set1:ident, loadu = $loadu:ident, storeu = $storeu:ident,
        add = $add:ident, sub = $sub:ident, mul = $mul:ident, div = $div:ident,
        sqrt = $sqrt:ident, xor = $xor:ident, andnot = $andnot:ident,
        max = $max:ident, min = $min:ident, cmp = $cmp:ident, blendv = $blendv:ident
    ) => {
        impl Add for $name {
            type Output = Self;
            #[inline(always)]
            fn add(self, o: Self) -> Self {
                $name(avx!($add(self.0, o.0)))
            }
        }
        impl Sub for $name {
            type Output = Self;
            #[inline(always)]
            fn sub(self, o: Self) -> Self {
                $name(avx!($sub(self.0, o.0)))
            }
        }
        impl Mul for $name {
            type Output = Self;
            #[inline(always)]
            fn mul(self, o: Self) -> Self {
                $name(avx!($mul(self.0, o.0)))
            }
        }
        impl Div for $name {
            type Output = Self;
            #[inline(always)]
            fn div(self, o: Self) -> Self {
                $name(avx!($div(self.0, o.0)))
            }
        }
        impl Neg for $name {
            type Output = Self;
            #[inline(always)]
            fn neg(self) -> Self {
                $name(avx!($xor(self.0, $set1(-0.0))))
            }
        }
        impl Lane for $name {
            type Elem = $t;
            const WIDTH: usize = $n;
            #[inline(always)]
            fn splat(x: $t) -> Self {
                $name(avx!($set1(x)))
            }
            #[inline(always)]
            fn load(s: &[$t]) -> Self {
                let s = &s[..$n];
                // SAFETY: `s` holds `$n` elements (checked above); unaligned loads are fine.
                $name(avx!($loadu(s.as_ptr())))
            }
            #[inline(always)]
            fn store(self, s: &mut [$t]) {
                let s = &mut s[..$n];
                // SAFETY: `s` holds `$n` writable elements (checked above), and AVX is
                // available (see `avx!`).
                unsafe { $storeu(s.as_mut_ptr(), self.0) }
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                $name(avx!($sqrt(self.0)))
            }
            #[inline(always)]
            fn abs(self) -> Self {
                $name(avx!($andnot($set1(-0.0), self.0)))
            }
            #[inline(always)]
            fn maximum(self, o: Self) -> Self {
                // torch.maximum: NaN if either is NaN.
                let nan = avx!($cmp::<_CMP_UNORD_Q>(self.0, o.0));
                $name(avx!($blendv($max(self.0, o.0), $add(self.0, o.0), nan)))
            }
            #[inline(always)]
            fn minimum(self, o: Self) -> Self {
                let nan = avx!($cmp::<_CMP_UNORD_Q>(self.0, o.0));
                $name(avx!($blendv($min(self.0, o.0), $add(self.0, o.0), nan)))
            }
            #[inline(always)]
            fn gt_select(self, o: Self, a: Self, b: Self) -> Self {
                $name(avx!($blendv(b.0, a.0, $cmp::<_CMP_GT_OQ>(self.0, o.0))))
            }
            #[inline(always)]
            fn lt_select(self, o: Self, a: Self, b: Self) -> Self {
                $name(avx!($blendv(b.0, a.0, $cmp::<_CMP_LT_OQ>(self.0, o.0))))
            }
            #[inline(always)]
            fn eq_select(self, o: Self, a: Self, b: Self) -> Self {
                $name(avx!($blendv(b.0, a.0, $cmp::<_CMP_EQ_OQ>(self.0, o.0))))
            }
        }
    };
}

avx_lane!(
    F32x8,
    f32,
    8,
    __m256,
    set1 = _mm256_set1_ps,
    loadu = _mm256_loadu_ps,
    storeu = _mm256_storeu_ps,
    add = _mm256_add_ps,
    sub = _mm256_sub_ps,
    mul = _mm256_mul_ps,
    div = _mm256_div_ps,
    sqrt = _mm256_sqrt_ps,
    xor = _mm256_xor_ps,
    andnot = _mm256_andnot_ps,
    max = _mm256_max_ps,
    min = _mm256_min_ps,
    cmp = _mm256_cmp_ps,
    blendv = _mm256_blendv_ps
);
avx_lane!(
    F64x4,
    f64,
    4,
    __m256d,
    set1 = _mm256_set1_pd,
    loadu = _mm256_loadu_pd,
    storeu = _mm256_storeu_pd,
    add = _mm256_add_pd,
    sub = _mm256_sub_pd,
    mul = _mm256_mul_pd,
    div = _mm256_div_pd,
    sqrt = _mm256_sqrt_pd,
    xor = _mm256_xor_pd,
    andnot = _mm256_andnot_pd,
    max = _mm256_max_pd,
    min = _mm256_min_pd,
    cmp = _mm256_cmp_pd,
    blendv = _mm256_blendv_pd
);

/// Runs the generic lane loop with AVX2 lanes.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn run_avx2<T: Float, const B: usize, O: ElementOp<T, B>>(
    op: &O,
    params: &mut [T],
    grads: &[T],
    state: [&mut [T]; B],
) {
    crate::kernels::lane_loop::<T, T::Avx2, B, O>(op, params, grads, state)
}

/// Runs the fused Adafactor kernel with AVX2 lanes.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn adafactor_avx2<T: Float>(
    c: &crate::kernels::adafactor::AdafactorCoeffs,
    grad_scale: f64,
    shape: &[usize],
    p: &mut [T],
    g: &[T],
    aux: &mut [&mut [T]],
) {
    crate::kernels::adafactor::fused_with::<T, T::Avx2>(c, grad_scale, shape, p, g, aux)
}
