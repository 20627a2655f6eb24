//! Flat-vector kernels of L-BFGS: dot products, norms and axpy updates over the whole
//! parameter vector, on SIMD lanes with a scalar tail. Each takes the [`SimdLevel`] cap and
//! goes through the one dispatch of [`crate::arch`]: elementwise maps run on the widest lanes the level
//! allows, reductions on lanes of [`Float::LANES`] elements at every level.
//!
//! Every reduction has one fixed summation order that depends only on the length (not on the
//! instruction set): four vector accumulators of [`Float::LANES`] lanes over blocks of
//! `4 * LANES` elements, then single vectors into the first
//! accumulator, then `(acc0 + acc1) + (acc2 + acc3)`, its lanes summed left to right, then the
//! tail elements one by one. So a result never depends on the thread count or on anything
//! but the inputs. The order is not torch's (BLAS `dot`, cascade `sum`), which is why the
//! parity tolerances of `SCHEMA.md` apply to LBFGS, not bitwise equality.
//!
//! The fused [`axpy_dot`] gives bitwise the same vector and the same dot product as [`axpy`]
//! followed by [`dot`]; it only saves a pass over memory. Every elementwise kernel agrees with
//! its scalar loop bit for bit (the `reference` module), since the same IEEE operations run on
//! the vector body and the tail.

use crate::arch::{Simd, SimdLevel, WithSimd};
use crate::float::{Float, Lane};

/// Widest vector the reductions see (eight f32).
const MAX_WIDTH: usize = 8;

/// Sum of a vector's lanes, left to right.
#[inline(always)]
fn lane_sum<V: Lane>(v: V) -> V::Elem {
    let mut buf = [<V::Elem as Float>::ZERO; MAX_WIDTH];
    v.store(&mut buf[..V::WIDTH]);
    let mut s = buf[0];
    for &x in &buf[1..V::WIDTH] {
        s = s + x;
    }
    s
}

/// The largest lane (NaN if any lane is NaN).
#[inline(always)]
fn lane_max<V: Lane>(v: V) -> V::Elem {
    let mut buf = [<V::Elem as Float>::ZERO; MAX_WIDTH];
    v.store(&mut buf[..V::WIDTH]);
    let mut m = buf[0];
    for &x in &buf[1..V::WIDTH] {
        m = m.maximum(x);
    }
    m
}

/// A per-element term that is summed (or maxed) by a reduction: the same code runs on
/// vectors and on the scalar tail.
trait Term<T: Float> {
    /// The term for element group `i` (a vector or one scalar, as `V` says).
    fn at<V: Lane<Elem = T>>(&mut self, i: usize) -> V;
}

/// `sum_i term(i)` in the module's fixed order.
#[inline(always)]
fn reduce_sum<T: Float, V: Lane<Elem = T>, R: Term<T>>(n: usize, term: &mut R) -> T {
    let w = V::WIDTH;
    let zero = V::splat(T::ZERO);
    let mut acc = [zero; 4];
    let mut i = 0;
    while i + 4 * w <= n {
        acc[0] = acc[0] + term.at::<V>(i);
        acc[1] = acc[1] + term.at::<V>(i + w);
        acc[2] = acc[2] + term.at::<V>(i + 2 * w);
        acc[3] = acc[3] + term.at::<V>(i + 3 * w);
        i += 4 * w;
    }
    while i + w <= n {
        acc[0] = acc[0] + term.at::<V>(i);
        i += w;
    }
    let mut s = lane_sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
    while i < n {
        s = s + term.at::<T>(i);
        i += 1;
    }
    s
}

/// `max_i term(i)` (terms are non-negative; NaN propagates). 0 for an empty vector.
#[inline(always)]
fn reduce_max<T: Float, V: Lane<Elem = T>, R: Term<T>>(n: usize, term: &mut R) -> T {
    let w = V::WIDTH;
    let zero = V::splat(T::ZERO);
    let mut acc = [zero; 4];
    let mut i = 0;
    while i + 4 * w <= n {
        acc[0] = acc[0].maximum(term.at::<V>(i));
        acc[1] = acc[1].maximum(term.at::<V>(i + w));
        acc[2] = acc[2].maximum(term.at::<V>(i + 2 * w));
        acc[3] = acc[3].maximum(term.at::<V>(i + 3 * w));
        i += 4 * w;
    }
    while i + w <= n {
        acc[0] = acc[0].maximum(term.at::<V>(i));
        i += w;
    }
    let mut m = lane_max(acc[0].maximum(acc[1]).maximum(acc[2].maximum(acc[3])));
    while i < n {
        m = m.maximum(term.at::<T>(i));
        i += 1;
    }
    m
}

/// A reduction as a kernel object: [`reduce_sum`] or [`reduce_max`] on the token's lanes of
/// [`Float::LANES`] elements, so the order is the same at every level.
struct Reduce<'a, T, R> {
    n: usize,
    term: &'a mut R,
    max: bool,
    elem: std::marker::PhantomData<T>,
}

impl<T: Float, R: Term<T>> WithSimd for Reduce<'_, T, R> {
    type Output = T;
    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) -> T {
        if self.max {
            reduce_max::<T, T::Narrow<S>, R>(self.n, self.term)
        } else {
            reduce_sum::<T, T::Narrow<S>, R>(self.n, self.term)
        }
    }
}

/// `sum_i term(i)` at level `simd`.
fn sum<T: Float, R: Term<T>>(simd: SimdLevel, n: usize, term: &mut R) -> T {
    simd.dispatch(Reduce {
        n,
        term,
        max: false,
        elem: std::marker::PhantomData,
    })
}

/// `max_i term(i)` at level `simd`.
fn max<T: Float, R: Term<T>>(simd: SimdLevel, n: usize, term: &mut R) -> T {
    simd.dispatch(Reduce {
        n,
        term,
        max: true,
        elem: std::marker::PhantomData,
    })
}

struct Dot<'a, T> {
    a: &'a [T],
    b: &'a [T],
}

impl<T: Float> Term<T> for Dot<'_, T> {
    #[inline(always)]
    fn at<V: Lane<Elem = T>>(&mut self, i: usize) -> V {
        V::load(&self.a[i..]) * V::load(&self.b[i..])
    }
}

/// `a.dot(b)`.
///
/// # Panics
/// If the lengths differ.
pub fn dot<T: Float>(simd: SimdLevel, a: &[T], b: &[T]) -> T {
    assert_eq!(a.len(), b.len(), "dot of vectors of different lengths");
    sum(simd, a.len(), &mut Dot { a, b })
}

struct AbsSum<'a, T> {
    a: &'a [T],
}

impl<T: Float> Term<T> for AbsSum<'_, T> {
    #[inline(always)]
    fn at<V: Lane<Elem = T>>(&mut self, i: usize) -> V {
        V::load(&self.a[i..]).abs()
    }
}

/// `a.abs().sum()`.
pub fn abs_sum<T: Float>(simd: SimdLevel, a: &[T]) -> T {
    sum(simd, a.len(), &mut AbsSum { a })
}

/// `a.abs().max()`; NaN if any element is NaN, 0 for an empty slice.
pub fn abs_max<T: Float>(simd: SimdLevel, a: &[T]) -> T {
    max(simd, a.len(), &mut AbsSum { a })
}

struct AbsScaled<'a, T> {
    a: &'a [T],
    s: T,
}

impl<T: Float> Term<T> for AbsScaled<'_, T> {
    #[inline(always)]
    fn at<V: Lane<Elem = T>>(&mut self, i: usize) -> V {
        (V::load(&self.a[i..]) * V::splat(self.s)).abs()
    }
}

/// `a.mul(s).abs().max()`, without the temporary.
pub fn abs_max_scaled<T: Float>(simd: SimdLevel, a: &[T], s: T) -> T {
    max(simd, a.len(), &mut AbsScaled { a, s })
}

struct AxpyDot<'a, T> {
    y: &'a mut [T],
    x: &'a [T],
    other: &'a [T],
    alpha: T,
}

impl<T: Float> Term<T> for AxpyDot<'_, T> {
    #[inline(always)]
    fn at<V: Lane<Elem = T>>(&mut self, i: usize) -> V {
        let y = V::load(&self.y[i..]) + V::splat(self.alpha) * V::load(&self.x[i..]);
        y.store(&mut self.y[i..]);
        V::load(&self.other[i..]) * y
    }
}

/// `y.add_(x, alpha=alpha)` and then `other.dot(y)`, in one pass. Bitwise the same as
/// [`axpy`] followed by [`dot`]`(other, y)`.
///
/// # Panics
/// If the lengths differ.
pub fn axpy_dot<T: Float>(simd: SimdLevel, y: &mut [T], alpha: T, x: &[T], other: &[T]) -> T {
    let n = y.len();
    assert!(
        x.len() == n && other.len() == n,
        "axpy_dot of vectors of different lengths"
    );
    sum(simd, n, &mut AxpyDot { y, x, other, alpha })
}

/// An elementwise map `dst[i] = f(a[i], b[i])`, written once for vectors and scalars.
trait Map<T: Float> {
    fn f<V: Lane<Elem = T>>(&self, a: V, b: V) -> V;
}

/// `dst = f(a, b)` over every element, where a missing `a` or `b` reads `dst` itself (so
/// `dst = f(dst, x)` is in place): a kernel object on the token's widest lanes.
struct MapKernel<'a, T, M> {
    dst: &'a mut [T],
    a: Option<&'a [T]>,
    b: Option<&'a [T]>,
    m: &'a M,
}

impl<T: Float, M: Map<T>> WithSimd for MapKernel<'_, T, M> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        let MapKernel { dst, a, b, m } = self;
        let n = dst.len();
        assert!(
            a.is_none_or(|a| a.len() == n) && b.is_none_or(|b| b.len() == n),
            "elementwise op on vectors of different lengths"
        );
        #[inline(always)]
        fn at<V: Lane>(src: Option<&[V::Elem]>, dst: &[V::Elem], i: usize) -> V {
            V::load(&src.unwrap_or(dst)[i..])
        }
        let w = T::Wide::<S>::WIDTH;
        let mut i = 0;
        while i + w <= n {
            let v: T::Wide<S> = m.f(at(a, dst, i), at(b, dst, i));
            v.store(&mut dst[i..]);
            i += w;
        }
        while i < n {
            dst[i] = m.f::<T>(at(a, dst, i), at(b, dst, i));
            i += 1;
        }
    }
}

/// Runs `m` over every element at level `simd` (see [`MapKernel`]).
fn map<T: Float, M: Map<T>>(
    simd: SimdLevel,
    dst: &mut [T],
    a: Option<&[T]>,
    b: Option<&[T]>,
    m: &M,
) {
    simd.dispatch(MapKernel { dst, a, b, m })
}

struct Axpy<T>(T);
impl<T: Float> Map<T> for Axpy<T> {
    #[inline(always)]
    fn f<V: Lane<Elem = T>>(&self, a: V, b: V) -> V {
        a + V::splat(self.0) * b
    }
}

struct Sub;
impl<T: Float> Map<T> for Sub {
    #[inline(always)]
    fn f<V: Lane<Elem = T>>(&self, a: V, b: V) -> V {
        a - b
    }
}

struct Scale<T>(T);
impl<T: Float> Map<T> for Scale<T> {
    #[inline(always)]
    fn f<V: Lane<Elem = T>>(&self, a: V, _: V) -> V {
        a * V::splat(self.0)
    }
}

struct Neg;
impl<T: Float> Map<T> for Neg {
    #[inline(always)]
    fn f<V: Lane<Elem = T>>(&self, a: V, _: V) -> V {
        -a
    }
}

/// `y.add_(x, alpha=alpha)`: `y = y + alpha * x`.
pub fn axpy<T: Float>(simd: SimdLevel, y: &mut [T], alpha: T, x: &[T]) {
    map(simd, y, None, Some(x), &Axpy(alpha));
}

/// `dst = base + alpha * x` (torch's `p.add_(x, alpha=alpha)` on a `p` equal to `base`).
pub fn axpy_into<T: Float>(simd: SimdLevel, dst: &mut [T], base: &[T], alpha: T, x: &[T]) {
    map(simd, dst, Some(base), Some(x), &Axpy(alpha));
}

/// `dst = a - b` (`a.sub(b)`).
pub fn sub_into<T: Float>(simd: SimdLevel, dst: &mut [T], a: &[T], b: &[T]) {
    map(simd, dst, Some(a), Some(b), &Sub);
}

/// `dst = a * s` (`a.mul(s)`).
pub fn scale_into<T: Float>(simd: SimdLevel, dst: &mut [T], a: &[T], s: T) {
    map(simd, dst, Some(a), Some(a), &Scale(s));
}

/// `x = x * s` (`x.mul_(s)`).
pub fn scale<T: Float>(simd: SimdLevel, x: &mut [T], s: T) {
    map(simd, x, None, None, &Scale(s));
}

/// `dst = -a` (`a.neg()`).
pub fn neg_into<T: Float>(simd: SimdLevel, dst: &mut [T], a: &[T]) {
    map(simd, dst, Some(a), Some(a), &Neg);
}

/// `x = -x` (`x.neg_()`).
pub fn neg<T: Float>(simd: SimdLevel, x: &mut [T]) {
    map(simd, x, None, None, &Neg);
}

/// Plain scalar loops of the elementwise kernels: the oracle the SIMD versions are tested
/// against (bit for bit), and straightforward sequential reductions (tested within rounding).
pub mod reference {
    use crate::float::Float;

    /// Sequential `a.dot(b)`, accumulated in f64.
    pub fn dot_f64<T: Float>(a: &[T], b: &[T]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x.to_f64() * y.to_f64()).sum()
    }

    /// Sequential `a.abs().sum()`, accumulated in f64.
    pub fn abs_sum_f64<T: Float>(a: &[T]) -> f64 {
        a.iter().map(|x| x.to_f64().abs()).sum()
    }

    /// Sequential `a.abs().max()` (NaN propagates).
    pub fn abs_max<T: Float>(a: &[T]) -> T {
        let mut m = T::ZERO;
        for &x in a {
            let x = if x < T::ZERO { -x } else { x };
            if x.to_f64().is_nan() || m.to_f64().is_nan() {
                m = x + m;
            } else if x > m {
                m = x;
            }
        }
        m
    }

    /// `y = y + alpha * x`, one element at a time.
    pub fn axpy<T: Float>(y: &mut [T], alpha: T, x: &[T]) {
        for (a, &b) in y.iter_mut().zip(x) {
            *a = *a + alpha * b;
        }
    }

    /// `dst = a - b`, one element at a time.
    pub fn sub_into<T: Float>(dst: &mut [T], a: &[T], b: &[T]) {
        for ((d, &x), &y) in dst.iter_mut().zip(a).zip(b) {
            *d = x - y;
        }
    }

    /// `dst = a * s`, one element at a time.
    pub fn scale_into<T: Float>(dst: &mut [T], a: &[T], s: T) {
        for (d, &x) in dst.iter_mut().zip(a) {
            *d = x * s;
        }
    }

    /// `dst = -a`, one element at a time.
    pub fn neg_into<T: Float>(dst: &mut [T], a: &[T]) {
        for (d, &x) in dst.iter_mut().zip(a) {
            *d = -x;
        }
    }
}
