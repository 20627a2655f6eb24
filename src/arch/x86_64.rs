//! The x86-64 tokens and their lanes: AVX2 ([`Avx2`]: [`F32x8`], [`F64x4`]) and AVX-512F
//! ([`Avx512`]: [`F32x16`], [`F64x8`]).
//!
//! # Soundness
//! The lane methods are safe and `#[inline(always)]`, and call intrinsics that are only
//! defined on CPUs with the feature. That is sound because no lane operation can run unless a
//! token of its instruction set was made in this process, which proves the CPU has it:
//! - the lane types are `pub` in this private module and named nowhere in the crate but as
//!   the associated types of [`Avx2`] and [`Avx512`] (`Simd::F32` ...);
//! - the tokens are `pub(crate)`, so no code outside the crate can name them or their
//!   associated types, and a token value is made only by `new()`, after
//!   `is_x86_feature_detected!`, or by the `unsafe` `new_unchecked()`;
//! - the crate names the lanes only as `T::Wide<S>` / `T::Narrow<S>` inside
//!   `WithSimd::with_simd::<S>`, which only `Simd::vectorize` calls, with a token value of
//!   type `S` in hand. Code there may hand the lane type to generic code outside the crate
//!   (an [`crate::kernels::ElementOp`]'s `apply::<V>`), which could even keep a closure over
//!   `V`'s methods for later; by then a token exists, so the CPU has the instructions.
//!
//! `vectorize` runs the kernel inside a `#[target_feature]` function, so the lane methods
//! inline into code compiled for the feature and the whole kernel loop is AVX code.
//! AVX-512F implies AVX2 (and both are enabled there), so [`Avx512`] also offers the AVX2
//! lanes, for reductions whose summation order is fixed to eight f32 / four f64 lanes.

use std::arch::x86_64::*;
use std::ops::{Add, Div, Mul, Neg, Sub};

use super::{Simd, WithSimd};
use crate::float::Lane;

/// Proof that the CPU has AVX2.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx2(());

impl Avx2 {
    /// The token, if the CPU has AVX2.
    #[inline(always)]
    pub(crate) fn new() -> Option<Self> {
        if is_x86_feature_detected!("avx2") {
            // SAFETY: just checked.
            Some(unsafe { Self::new_unchecked() })
        } else {
            None
        }
    }

    /// The token, unchecked.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[inline(always)]
    pub(crate) unsafe fn new_unchecked() -> Self {
        Avx2(())
    }
}

/// Proof that the CPU has AVX-512F (and AVX2).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx512(());

impl Avx512 {
    /// The token, if the CPU has AVX-512F and AVX2.
    #[inline(always)]
    pub(crate) fn new() -> Option<Self> {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx2") {
            // SAFETY: just checked.
            Some(unsafe { Self::new_unchecked() })
        } else {
            None
        }
    }

    /// The token, unchecked.
    ///
    /// # Safety
    /// The CPU must support AVX-512F and AVX2.
    #[inline(always)]
    pub(crate) unsafe fn new_unchecked() -> Self {
        Avx512(())
    }
}

impl Simd for Avx2 {
    type F32 = F32x8;
    type F64 = F64x4;
    type F32x8 = F32x8;
    type F64x4 = F64x4;
    #[inline(always)]
    fn vectorize<K: WithSimd>(self, kernel: K) -> K::Output {
        #[target_feature(enable = "avx2")]
        fn imp<K: WithSimd>(simd: Avx2, kernel: K) -> K::Output {
            kernel.with_simd(simd)
        }
        // SAFETY: `self` is an `Avx2` token, which exists only if the CPU has AVX2.
        unsafe { imp(self, kernel) }
    }
}

impl Simd for Avx512 {
    type F32 = F32x16;
    type F64 = F64x8;
    type F32x8 = F32x8;
    type F64x4 = F64x4;
    #[inline(always)]
    fn vectorize<K: WithSimd>(self, kernel: K) -> K::Output {
        #[target_feature(enable = "avx2,avx512f")]
        fn imp<K: WithSimd>(simd: Avx512, kernel: K) -> K::Output {
            kernel.with_simd(simd)
        }
        // SAFETY: `self` is an `Avx512` token, which exists only if the CPU has AVX-512F and
        // AVX2.
        unsafe { imp(self, kernel) }
    }
}

/// Eight f32 lanes in an AVX register.
#[derive(Clone, Copy)]
pub struct F32x8(__m256);

/// Four f64 lanes in an AVX register.
#[derive(Clone, Copy)]
pub struct F64x4(__m256d);

/// Sixteen f32 lanes in an AVX-512 register.
#[derive(Clone, Copy)]
pub struct F32x16(__m512);

/// Eight f64 lanes in an AVX-512 register.
#[derive(Clone, Copy)]
pub struct F64x8(__m512d);

/// Evaluates AVX / AVX-512 intrinsics.
macro_rules! avx {
    ($e:expr) => {{
        // SAFETY: the CPU has the feature: lane types are reachable only through a token
        // type, inside `WithSimd::with_simd`, which runs only once a token value was made by
        // its CPU-checking constructor (see the module docs).
        #[allow(unused_unsafe)]
        unsafe {
            $e
        }
    }};
}

/// The arithmetic shared by every lane type: one intrinsic per operator.
macro_rules! ops {
    ($name:ident, add = $add:ident, sub = $sub:ident, mul = $mul:ident, div = $div:ident) => {
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
    };
}

/// AVX2 lanes: comparisons give a lane mask, selects are `blendv`.
macro_rules! avx_lane {
    (
        $name:ident, $t:ty, $n:literal, $reg:ty,
        set1 = $set1:ident, loadu = $loadu:ident, storeu = $storeu:ident,
        add = $add:ident, sub = $sub:ident, mul = $mul:ident, div = $div:ident,
        sqrt = $sqrt:ident, xor = $xor:ident, andnot = $andnot:ident,
        max = $max:ident, min = $min:ident, cmp = $cmp:ident, blendv = $blendv:ident
    ) => {
        ops!($name, add = $add, sub = $sub, mul = $mul, div = $div);
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

/// AVX-512F lanes: comparisons give a bit mask, selects are mask blends
/// (`_mm512_mask_blend_*(k, a, b)` takes `b` where `k` is set).
macro_rules! avx512_lane {
    (
        $name:ident, $t:ty, $n:literal,
        set1 = $set1:ident, loadu = $loadu:ident, storeu = $storeu:ident,
        add = $add:ident, sub = $sub:ident, mul = $mul:ident, div = $div:ident,
        sqrt = $sqrt:ident, abs = $abs:ident, xor = $xor:ident,
        to_int = $to_int:ident, from_int = $from_int:ident,
        max = $max:ident, min = $min:ident, cmp = $cmp:ident, blend = $blend:ident
    ) => {
        ops!($name, add = $add, sub = $sub, mul = $mul, div = $div);
        impl Neg for $name {
            type Output = Self;
            #[inline(always)]
            fn neg(self) -> Self {
                // Flip the sign bit (AVX-512F has no float xor; the integer one is the same).
                $name(avx!($from_int($xor($to_int(self.0), $to_int($set1(-0.0))))))
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
                // SAFETY: `s` holds `$n` elements (checked above); unaligned loads are fine,
                // and AVX-512F is available (see `avx!`).
                $name(avx!($loadu(s.as_ptr())))
            }
            #[inline(always)]
            fn store(self, s: &mut [$t]) {
                let s = &mut s[..$n];
                // SAFETY: `s` holds `$n` writable elements (checked above), and AVX-512F is
                // available (see `avx!`).
                unsafe { $storeu(s.as_mut_ptr(), self.0) }
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                $name(avx!($sqrt(self.0)))
            }
            #[inline(always)]
            fn abs(self) -> Self {
                $name(avx!($abs(self.0)))
            }
            #[inline(always)]
            fn maximum(self, o: Self) -> Self {
                // torch.maximum: NaN if either is NaN. `vmaxps` returns its second operand
                // for NaN or equal inputs (so `max(-0.0, 0.0)` is `0.0`), as AVX2 and the
                // scalar lane do.
                let nan = avx!($cmp::<_CMP_UNORD_Q>(self.0, o.0));
                $name(avx!($blend(nan, $max(self.0, o.0), $add(self.0, o.0))))
            }
            #[inline(always)]
            fn minimum(self, o: Self) -> Self {
                let nan = avx!($cmp::<_CMP_UNORD_Q>(self.0, o.0));
                $name(avx!($blend(nan, $min(self.0, o.0), $add(self.0, o.0))))
            }
            #[inline(always)]
            fn gt_select(self, o: Self, a: Self, b: Self) -> Self {
                $name(avx!($blend($cmp::<_CMP_GT_OQ>(self.0, o.0), b.0, a.0)))
            }
            #[inline(always)]
            fn lt_select(self, o: Self, a: Self, b: Self) -> Self {
                $name(avx!($blend($cmp::<_CMP_LT_OQ>(self.0, o.0), b.0, a.0)))
            }
            #[inline(always)]
            fn eq_select(self, o: Self, a: Self, b: Self) -> Self {
                $name(avx!($blend($cmp::<_CMP_EQ_OQ>(self.0, o.0), b.0, a.0)))
            }
        }
    };
}

avx512_lane!(
    F32x16,
    f32,
    16,
    set1 = _mm512_set1_ps,
    loadu = _mm512_loadu_ps,
    storeu = _mm512_storeu_ps,
    add = _mm512_add_ps,
    sub = _mm512_sub_ps,
    mul = _mm512_mul_ps,
    div = _mm512_div_ps,
    sqrt = _mm512_sqrt_ps,
    abs = _mm512_abs_ps,
    xor = _mm512_xor_si512,
    to_int = _mm512_castps_si512,
    from_int = _mm512_castsi512_ps,
    max = _mm512_max_ps,
    min = _mm512_min_ps,
    cmp = _mm512_cmp_ps_mask,
    blend = _mm512_mask_blend_ps
);
avx512_lane!(
    F64x8,
    f64,
    8,
    set1 = _mm512_set1_pd,
    loadu = _mm512_loadu_pd,
    storeu = _mm512_storeu_pd,
    add = _mm512_add_pd,
    sub = _mm512_sub_pd,
    mul = _mm512_mul_pd,
    div = _mm512_div_pd,
    sqrt = _mm512_sqrt_pd,
    abs = _mm512_abs_pd,
    xor = _mm512_xor_si512,
    to_int = _mm512_castpd_si512,
    from_int = _mm512_castsi512_pd,
    max = _mm512_max_pd,
    min = _mm512_min_pd,
    cmp = _mm512_cmp_pd_mask,
    blend = _mm512_mask_blend_pd
);
