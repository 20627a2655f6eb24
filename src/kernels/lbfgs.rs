//! Flat-vector kernels of L-BFGS: dot products, norms and axpy updates over the whole
//! parameter vector, on `wide` lanes with a scalar tail.
//!
//! Every reduction has one fixed summation order that depends only on the length: four
//! vector accumulators over blocks of `4 * LANES` elements, then single vectors into the first
//! accumulator, then `(acc0 + acc1) + (acc2 + acc3)`, its lanes summed left to right, then the
//! tail elements one by one. So a result never depends on the thread count or on anything
//! but the inputs. The order is not torch's (BLAS `dot`, cascade `sum`), which is why the
//! parity tolerances of `SCHEMA.md` apply to LBFGS, not bitwise equality.
//!
//! The fused [`axpy_dot`] gives bitwise the same vector and the same dot product as [`axpy`]
//! followed by [`dot`]; it only saves a pass over memory. Every elementwise kernel agrees with
//! its scalar loop bit for bit (the `reference` module), since the same IEEE operations run on
//! the vector body and the tail.

use crate::float::{Float, Lane};

/// Widest vector the kernels see (f32x8).
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
fn reduce_sum<T: Float, R: Term<T>>(n: usize, term: &mut R) -> T {
    let w = T::LANES;
    let zero = T::Vector::splat(T::ZERO);
    let mut acc = [zero; 4];
    let mut i = 0;
    while i + 4 * w <= n {
        acc[0] = acc[0] + term.at::<T::Vector>(i);
        acc[1] = acc[1] + term.at::<T::Vector>(i + w);
        acc[2] = acc[2] + term.at::<T::Vector>(i + 2 * w);
        acc[3] = acc[3] + term.at::<T::Vector>(i + 3 * w);
        i += 4 * w;
    }
    while i + w <= n {
        acc[0] = acc[0] + term.at::<T::Vector>(i);
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
fn reduce_max<T: Float, R: Term<T>>(n: usize, term: &mut R) -> T {
    let w = T::LANES;
    let zero = T::Vector::splat(T::ZERO);
    let mut acc = [zero; 4];
    let mut i = 0;
    while i + 4 * w <= n {
        acc[0] = acc[0].maximum(term.at::<T::Vector>(i));
        acc[1] = acc[1].maximum(term.at::<T::Vector>(i + w));
        acc[2] = acc[2].maximum(term.at::<T::Vector>(i + 2 * w));
        acc[3] = acc[3].maximum(term.at::<T::Vector>(i + 3 * w));
        i += 4 * w;
    }
    while i + w <= n {
        acc[0] = acc[0].maximum(term.at::<T::Vector>(i));
        i += w;
    }
    let mut m = lane_max(acc[0].maximum(acc[1]).maximum(acc[2].maximum(acc[3])));
    while i < n {
        m = m.maximum(term.at::<T>(i));
        i += 1;
    }
    m
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
pub fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    assert_eq!(a.len(), b.len(), "dot of vectors of different lengths");
    reduce_sum(a.len(), &mut Dot { a, b })
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
pub fn abs_sum<T: Float>(a: &[T]) -> T {
    reduce_sum(a.len(), &mut AbsSum { a })
}

/// `a.abs().max()`; NaN if any element is NaN, 0 for an empty slice.
pub fn abs_max<T: Float>(a: &[T]) -> T {
    reduce_max(a.len(), &mut AbsSum { a })
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
pub fn abs_max_scaled<T: Float>(a: &[T], s: T) -> T {
    reduce_max(a.len(), &mut AbsScaled { a, s })
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
pub fn axpy_dot<T: Float>(y: &mut [T], alpha: T, x: &[T], other: &[T]) -> T {
    let n = y.len();
    assert!(
        x.len() == n && other.len() == n,
        "axpy_dot of vectors of different lengths"
    );
    reduce_sum(n, &mut AxpyDot { y, x, other, alpha })
}

/// An elementwise map `dst[i] = f(a[i], b[i])`, written once for vectors and scalars.
trait Map<T: Float> {
    fn f<V: Lane<Elem = T>>(&self, a: V, b: V) -> V;
}

/// `dst = f(dst, x)` over every element.
#[inline(always)]
fn map_in_place<T: Float, M: Map<T>>(dst: &mut [T], x: &[T], m: &M) {
    let n = dst.len();
    assert_eq!(x.len(), n, "elementwise op on vectors of different lengths");
    let w = T::LANES;
    let mut i = 0;
    while i + w <= n {
        let v = m.f(T::Vector::load(&dst[i..]), T::Vector::load(&x[i..]));
        v.store(&mut dst[i..]);
        i += w;
    }
    while i < n {
        dst[i] = m.f(dst[i], x[i]);
        i += 1;
    }
}

/// `dst = f(a, b)` over every element.
#[inline(always)]
fn map_into<T: Float, M: Map<T>>(dst: &mut [T], a: &[T], b: &[T], m: &M) {
    let n = dst.len();
    assert!(
        a.len() == n && b.len() == n,
        "elementwise op on vectors of different lengths"
    );
    let w = T::LANES;
    let mut i = 0;
    while i + w <= n {
        let v = m.f(T::Vector::load(&a[i..]), T::Vector::load(&b[i..]));
        v.store(&mut dst[i..]);
        i += w;
    }
    while i < n {
        dst[i] = m.f(a[i], b[i]);
        i += 1;
    }
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
pub fn axpy<T: Float>(y: &mut [T], alpha: T, x: &[T]) {
    map_in_place(y, x, &Axpy(alpha));
}

/// `dst = base + alpha * x` (torch's `p.add_(x, alpha=alpha)` on a `p` equal to `base`).
pub fn axpy_into<T: Float>(dst: &mut [T], base: &[T], alpha: T, x: &[T]) {
    map_into(dst, base, x, &Axpy(alpha));
}

/// `dst = a - b` (`a.sub(b)`).
pub fn sub_into<T: Float>(dst: &mut [T], a: &[T], b: &[T]) {
    map_into(dst, a, b, &Sub);
}

/// `dst = a * s` (`a.mul(s)`).
pub fn scale_into<T: Float>(dst: &mut [T], a: &[T], s: T) {
    map_into(dst, a, a, &Scale(s));
}

/// `x = x * s` (`x.mul_(s)`).
pub fn scale<T: Float>(x: &mut [T], s: T) {
    let n = x.len();
    let w = T::LANES;
    let mut i = 0;
    while i + w <= n {
        let v = T::Vector::load(&x[i..]) * T::Vector::splat(s);
        v.store(&mut x[i..]);
        i += w;
    }
    while i < n {
        x[i] = x[i] * s;
        i += 1;
    }
}

/// `dst = -a` (`a.neg()`).
pub fn neg_into<T: Float>(dst: &mut [T], a: &[T]) {
    map_into(dst, a, a, &Neg);
}

/// `x = -x` (`x.neg_()`).
pub fn neg<T: Float>(x: &mut [T]) {
    let n = x.len();
    let w = T::LANES;
    let mut i = 0;
    while i + w <= n {
        let v = -T::Vector::load(&x[i..]);
        v.store(&mut x[i..]);
        i += w;
    }
    while i < n {
        x[i] = -x[i];
        i += 1;
    }
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
