//! The element types optarena works in, and the SIMD lanes each maps to.
//!
//! [`Float`] is sealed: it is implemented for `f32` (the fast path) and `f64`. Kernels are
//! written once against [`Lane`], which the scalar types, their `wide` vectors and the
//! run-time-dispatched AVX2 / AVX-512 vectors of [`crate::arch`] implement, so the SIMD body
//! and the scalar tail run the same arithmetic.

use std::fmt::{Debug, Display};
use std::ops::{Add, Div, Mul, Neg, Sub};

use wide::{f32x8, f64x4};

/// The crate-private half of [`Float`]: which lanes of an instruction-set token carry the
/// type. A public trait in a private module, so nothing outside the crate can name it or its
/// associated types, nor implement [`Float`].
mod sealed {
    use super::Lane;
    use crate::arch::Simd;

    pub trait Sealed {
        /// The widest lanes of `S` (sixteen f32 under AVX-512), for elementwise kernels.
        type Wide<S: Simd>: Lane<Elem = Self>;
        /// Lanes of `S` holding exactly [`super::Float::LANES`] elements, for reductions
        /// whose summation order is fixed to that width.
        type Narrow<S: Simd>: Lane<Elem = Self>;
    }
    impl Sealed for f32 {
        type Wide<S: Simd> = S::F32;
        type Narrow<S: Simd> = S::F32x8;
    }
    impl Sealed for f64 {
        type Wide<S: Simd> = S::F64;
        type Narrow<S: Simd> = S::F64x4;
    }
}

/// A parameter element type: `f32` or `f64`.
///
/// Sealed; the crate's kernels are written for exactly these two.
pub trait Float:
    sealed::Sealed
    + Lane<Elem = Self>
    + Copy
    + Default
    + PartialOrd
    + Debug
    + Display
    + Send
    + Sync
    + serde::Serialize
    + serde::de::DeserializeOwned
    + bytemuck::Pod
    + 'static
{
    /// The `wide` vector of this type: the fused kernels' lanes at
    /// [`crate::SimdLevel::Portable`].
    type Vector: Lane<Elem = Self>;
    /// Elements per [`Float::Vector`], and the lane count every reduction sums in (at any
    /// [`crate::SimdLevel`], so its result does not depend on the level).
    const LANES: usize;
    /// torch's name for the dtype: `"float32"` or `"float64"`.
    const DTYPE: &'static str;
    /// Zero.
    const ZERO: Self;
    /// One.
    const ONE: Self;
    /// Converts from f64, rounding to nearest (what torch does when a Python float scalar meets
    /// a tensor of this dtype).
    fn from_f64(x: f64) -> Self;
    /// Widens to f64 (exact).
    fn to_f64(self) -> f64;
    /// True for NaN and ±infinity.
    fn is_non_finite(self) -> bool;
    /// `self` raised to `p`, as C's `powf` / `pow`.
    fn powf(self, p: Self) -> Self;
    /// The machine epsilon, `torch.finfo(dtype).eps`: the gap between 1 and the next value.
    const EPSILON: Self;
    /// `self * a + b` with one rounding (a fused multiply-add), as C's `fma`. Only for
    /// emulating torch reductions whose scalar loops the C++ compiler contracts; the f32/f64
    /// kernels never use it (the lanes' [`Lane::fma`] serves the torch-order bf16 kernels).
    fn mul_add(self, a: Self, b: Self) -> Self;
}

impl Float for f32 {
    type Vector = f32x8;
    const LANES: usize = 8;
    const DTYPE: &'static str = "float32";
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const EPSILON: Self = f32::EPSILON;
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn is_non_finite(self) -> bool {
        !self.is_finite()
    }
    #[inline(always)]
    fn powf(self, p: Self) -> Self {
        <Self>::powf(self, p)
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        <Self>::mul_add(self, a, b)
    }
}

impl Float for f64 {
    type Vector = f64x4;
    const LANES: usize = 4;
    const DTYPE: &'static str = "float64";
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const EPSILON: Self = f64::EPSILON;
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn is_non_finite(self) -> bool {
        !self.is_finite()
    }
    #[inline(always)]
    fn powf(self, p: Self) -> Self {
        <Self>::powf(self, p)
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        <Self>::mul_add(self, a, b)
    }
}

/// One lane or a vector of lanes: the arithmetic a fused kernel body is written in.
///
/// Implemented for `f32`, `f64`, `wide::f32x8` and `wide::f64x4`, and inside the crate for
/// the AVX2 and AVX-512 vectors of [`crate::arch`] (which no code outside the crate can name).
/// Every operation rounds
/// exactly as IEEE 754 says (no approximate reciprocals; a multiply-add fuses only through
/// [`Lane::fma`], which rounds once everywhere), so a kernel gives bitwise the same result in
/// its SIMD body and its scalar tail.
pub trait Lane:
    Copy
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
{
    /// The scalar element type.
    type Elem: Float;
    /// Elements in one `Self`.
    const WIDTH: usize;
    /// Every lane set to `x`.
    fn splat(x: Self::Elem) -> Self;
    /// Loads `Self::WIDTH` elements from the front of `s`.
    fn load(s: &[Self::Elem]) -> Self;
    /// Stores `Self::WIDTH` elements to the front of `s`.
    fn store(self, s: &mut [Self::Elem]);
    /// Correctly rounded square root.
    fn sqrt(self) -> Self;
    /// Absolute value.
    fn abs(self) -> Self;
    /// `torch.maximum`: the larger, and NaN if either is NaN.
    fn maximum(self, other: Self) -> Self;
    /// `torch.minimum`: the smaller, and NaN if either is NaN.
    fn minimum(self, other: Self) -> Self;
    /// Per lane: `if self > other { a } else { b }`.
    fn gt_select(self, other: Self, a: Self, b: Self) -> Self;
    /// Per lane: `if self < other { a } else { b }`.
    fn lt_select(self, other: Self, a: Self, b: Self) -> Self;
    /// Per lane: `if self == other { a } else { b }` (IEEE equality: NaN equals nothing,
    /// `-0.0 == 0.0`).
    fn eq_select(self, other: Self, a: Self, b: Self) -> Self;
    /// `self * a + b` rounded once (IEEE 754 fusedMultiplyAdd), the same bits at every level:
    /// the FMA instructions under AVX2 and AVX-512, the correctly rounded `mul_add` of the
    /// standard library (a software `fma` where the build has no FMA) on the portable lanes.
    /// Only the kernels that reproduce torch's fused bf16 step use it, where torch's compiled
    /// kernel fuses (see [`crate::mixed`]).
    fn fma(self, a: Self, b: Self) -> Self;
}

macro_rules! scalar_lane {
    ($t:ty) => {
        impl Lane for $t {
            type Elem = $t;
            const WIDTH: usize = 1;
            #[inline(always)]
            fn splat(x: $t) -> Self {
                x
            }
            #[inline(always)]
            fn load(s: &[$t]) -> Self {
                s[0]
            }
            #[inline(always)]
            fn store(self, s: &mut [$t]) {
                s[0] = self;
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline(always)]
            fn maximum(self, other: Self) -> Self {
                if self.is_nan() || other.is_nan() {
                    self + other
                } else if self > other {
                    self
                } else {
                    other
                }
            }
            #[inline(always)]
            fn minimum(self, other: Self) -> Self {
                if self.is_nan() || other.is_nan() {
                    self + other
                } else if self < other {
                    self
                } else {
                    other
                }
            }
            #[inline(always)]
            fn gt_select(self, other: Self, a: Self, b: Self) -> Self {
                if self > other {
                    a
                } else {
                    b
                }
            }
            #[inline(always)]
            fn lt_select(self, other: Self, a: Self, b: Self) -> Self {
                if self < other {
                    a
                } else {
                    b
                }
            }
            #[inline(always)]
            fn eq_select(self, other: Self, a: Self, b: Self) -> Self {
                if self == other {
                    a
                } else {
                    b
                }
            }
            #[inline(always)]
            fn fma(self, a: Self, b: Self) -> Self {
                <$t>::mul_add(self, a, b)
            }
        }
    };
}
scalar_lane!(f32);
scalar_lane!(f64);

macro_rules! vector_lane {
    ($v:ty, $t:ty, $n:literal) => {
        impl Lane for $v {
            type Elem = $t;
            const WIDTH: usize = $n;
            #[inline(always)]
            fn splat(x: $t) -> Self {
                <$v>::splat(x)
            }
            #[inline(always)]
            fn load(s: &[$t]) -> Self {
                let a: [$t; $n] = s[..$n].try_into().expect("slice holds a full vector");
                <$v>::new(a)
            }
            #[inline(always)]
            fn store(self, s: &mut [$t]) {
                s[..$n].copy_from_slice(&self.to_array());
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$v>::sqrt(self)
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$v>::abs(self)
            }
            #[inline(always)]
            fn maximum(self, other: Self) -> Self {
                // wide's `max` ignores NaN; torch.maximum propagates it.
                let nan = self.is_nan() | other.is_nan();
                nan.select(self + other, self.max(other))
            }
            #[inline(always)]
            fn minimum(self, other: Self) -> Self {
                let nan = self.is_nan() | other.is_nan();
                nan.select(self + other, self.min(other))
            }
            #[inline(always)]
            fn gt_select(self, other: Self, a: Self, b: Self) -> Self {
                self.simd_gt(other).select(a, b)
            }
            #[inline(always)]
            fn lt_select(self, other: Self, a: Self, b: Self) -> Self {
                self.simd_lt(other).select(a, b)
            }
            #[inline(always)]
            fn eq_select(self, other: Self, a: Self, b: Self) -> Self {
                self.simd_eq(other).select(a, b)
            }
            #[inline(always)]
            fn fma(self, a: Self, b: Self) -> Self {
                // Per lane with the standard library's correctly rounded `mul_add`: wide's
                // rounds twice unless the build enables FMA.
                let (x, y, z) = (self.to_array(), a.to_array(), b.to_array());
                <$v>::new(std::array::from_fn(|i| x[i].mul_add(y[i], z[i])))
            }
        }
    };
}
vector_lane!(f32x8, f32, 8);
vector_lane!(f64x4, f64, 4);
