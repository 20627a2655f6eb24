//! Update kernels: for each algorithm, a fused one-pass SIMD kernel and a scalar reference
//! written as torch's sequence of tensor operations.
//!
//! A fused kernel is an [`ElementOp`]: the update of one lane group, written once against
//! [`Lane`] and run by [`for_each_lane`] over SIMD vectors for the body (the widest the
//! [`SimdLevel`] allows) and scalars for the tail. Both use the same IEEE operations in the
//! same order (no fused multiply-add), so the two parts agree bit for bit and the reference
//! kernel can be compared exactly.
//!
//! torch's vectorised CPU kernels do use FMA in places (`add` with `alpha`, `lerp`), so against
//! torch itself the results agree to within a few ulp per step, well inside the parity
//! tolerances of `SCHEMA.md`.
//!
//! [`torch_fused`] is the exception: the updates of torch's fused CPU kernels (`fused=True`)
//! for SGD, Adam, AdamW and Adagrad in their own order, with the multiply-adds torch's compiled
//! kernels fuse ([`Lane::fma`], one rounding at every level). The half-precision steps of
//! [`crate::Optimizer::step_half`] use them, to land on torch's bits on bf16 parameters.
//!
//! The reference kernels follow torch's sequence with one kind of exception, made where it
//! measured faster: a division by a per-step constant becomes a multiplication by its
//! reciprocal, computed once in f64 (Adam/AdamW's `√(1 − β₂ᵗ)`, NAdam's `1 − β₂ᵗ`, RAdam's
//! folded step size), and NAdam divides once by its denominator instead of twice. Each module
//! says what it changes. The divider is what bounds these kernels in cache: on the Zen 3
//! development machine a bare AVX2 loop over 16K f32 takes 3.2 µs for a square root alone,
//! 5.4 µs with one division more and 7.7 µs with two, and the AdamW adapter step went from
//! 7.8 to 6.0 µs with the change. Results move by about one ulp: the parity tests still pass at
//! a tenth of SCHEMA.md's f32 tolerance and a hundredth of its f64 one.

pub mod adadelta;
pub mod adafactor;
pub mod adagrad;
pub mod adam;
pub mod adamax;
pub mod asgd;
pub mod average;
pub mod lbfgs;
mod moments;
pub mod muon;
pub mod nadam;
mod prologue;
pub mod radam;
pub mod rmsprop;
pub mod rprop;
pub mod sgd;
pub mod sparse_adam;
pub mod torch_fused;

use crate::arch::{Simd, SimdLevel, WithSimd};
use crate::float::{Float, Lane};
use crate::mixed::{ParamStream, Storage};

/// The per-element update of a fused kernel with `B` state buffers.
pub trait ElementOp<T: Float, const B: usize> {
    /// Lane groups the half-precision loop (`mixed_lane_loop`) computes per iteration before
    /// storing them in pairs: 2 or 4 (four only where the parameter stream allows it too).
    /// Four give the out-of-order core more independent work beside an op's divisions, but
    /// hold twice the vector registers: measured on the AVX-512 Xeon of BENCHMARKS.md, torch's
    /// fused bf16 Adam / AdamW rounding to nearest (mode 1) ran 10% faster with four, the same
    /// op under stochastic rounding (mode 3) 5% slower, so an op and a stream opt in.
    const GROUPS_PER_ITERATION: usize = 2;
    /// Updates one lane group: returns the new parameter value and updates `state` in place.
    fn apply<V: Lane<Elem = T>>(&self, param: V, grad: V, state: &mut [V; B]) -> V;
}

/// Runs `op` over every element: the widest SIMD vectors `simd` allows on this CPU for the body
/// (AVX-512, AVX2 or `wide`'s lanes; see [`crate::arch`]), scalars for the tail. Every level
/// gives the same bits.
///
/// # Panics
/// If the slices differ in length (the step driver never passes such slices).
#[inline(always)]
pub fn for_each_lane<T: Float, const B: usize, O: ElementOp<T, B>>(
    simd: SimdLevel,
    op: &O,
    params: &mut [T],
    grads: &[T],
    state: [&mut [T]; B],
) {
    for_each_lane_ahead::<T, B, O, PREFETCH_AHEAD>(simd, op, params, grads, state)
}

/// How far ahead, in elements, the fused loops prefetch every array (see `lane_loop`).
pub const PREFETCH_AHEAD: usize = 1024;

/// [`for_each_lane`] prefetching `AHEAD` elements ahead in every array, or not at all with
/// `AHEAD = 0` (the roofline tries both: [`crate::roofline::Strategy`]).
#[inline(always)]
pub(crate) fn for_each_lane_ahead<
    T: Float,
    const B: usize,
    O: ElementOp<T, B>,
    const AHEAD: usize,
>(
    simd: SimdLevel,
    op: &O,
    params: &mut [T],
    grads: &[T],
    state: [&mut [T]; B],
) {
    simd.dispatch(LaneLoop::<T, B, O, AHEAD> {
        op,
        params,
        grads,
        state,
    })
}

/// [`lane_loop`] as a kernel object: on the widest lanes of the token it is given.
struct LaneLoop<'a, T, const B: usize, O, const AHEAD: usize> {
    op: &'a O,
    params: &'a mut [T],
    grads: &'a [T],
    state: [&'a mut [T]; B],
}

impl<T: Float, const B: usize, O: ElementOp<T, B>, const AHEAD: usize> WithSimd
    for LaneLoop<'_, T, B, O, AHEAD>
{
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        lane_loop::<T, T::Wide<S>, B, O, AHEAD>(self.op, self.params, self.grads, self.state)
    }
}

/// The fused loop over vectors of type `V`, then scalars for the tail; prefetching `AHEAD`
/// elements ahead in every array (none for 0).
#[inline(always)]
fn lane_loop<
    T: Float,
    V: Lane<Elem = T>,
    const B: usize,
    O: ElementOp<T, B>,
    const AHEAD: usize,
>(
    op: &O,
    params: &mut [T],
    grads: &[T],
    state: [&mut [T]; B],
) {
    let n = params.len();
    assert!(grads.len() == n && state.iter().all(|s| s.len() == n));
    let w = V::WIDTH;
    let body = n - n % w;
    // Split every slice at `body` so the vector loop's bounds are provably in range and the
    // checks vanish.
    let (p_body, p_tail) = params.split_at_mut(body);
    let (g_body, g_tail) = grads.split_at(body);
    let parts = state.map(|s| s.split_at_mut(body));
    let mut i = 0;
    // `w <= body - i` rather than `i + w <= body`: the subtraction cannot wrap (i <= body),
    // so the compiler can prove `i..i + w` in range and drop the per-vector bounds check (it
    // does in every AVX2 loop but SGD's, where one predicted compare remains).
    // Software prefetch, `PREFETCH_AHEAD` = 1024 elements (4 KiB of f32) ahead in every array:
    // measured on the Intel Xeon guest, Adam at 32M on 2 threads went from 21.5 to 18.9 ms
    // (89% -> 98% of the roofline, which got faster itself, 19.4 -> 18.5 ms), with the
    // in-cache adapter step unchanged (6.2 µs). The hardware prefetcher alone does not keep
    // five streams of a divider-bound loop fed. A loop with trivial arithmetic does not need
    // it (on one thread it runs 2-6% faster without), so the roofline tries both.
    while w <= body - i {
        #[cfg(target_arch = "x86_64")]
        if AHEAD > 0 && AHEAD < body - i {
            // SAFETY: `_mm_prefetch` only hints the cache and never faults; `i + AHEAD < body`,
            // so every address is inside its slice (`add` stays in bounds).
            unsafe {
                use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                _mm_prefetch::<_MM_HINT_T0>(p_body.as_ptr().add(i + AHEAD) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(g_body.as_ptr().add(i + AHEAD) as *const i8);
                for part in &parts {
                    _mm_prefetch::<_MM_HINT_T0>(part.0.as_ptr().add(i + AHEAD) as *const i8);
                }
            }
        }
        let p = V::load(&p_body[i..i + w]);
        let g = V::load(&g_body[i..i + w]);
        let mut s: [V; B] = std::array::from_fn(|k| V::load(&parts[k].0[i..i + w]));
        let p = op.apply(p, g, &mut s);
        p.store(&mut p_body[i..i + w]);
        for (k, v) in s.iter().enumerate() {
            v.store(&mut parts[k].0[i..i + w]);
        }
        i += w;
    }
    for (j, (p, g)) in p_tail.iter_mut().zip(g_tail).enumerate() {
        let mut s: [T; B] = std::array::from_fn(|k| parts[k].1[j]);
        *p = op.apply(*p, *g, &mut s);
        for (k, v) in s.iter().enumerate() {
            parts[k].1[j] = *v;
        }
    }
}

/// The memory one fused kernel call streams through: where parameters, gradients and state
/// buffers live and in which storage formats. A kernel ([`adam::run`], ...) builds its
/// [`ElementOp`] once and hands it to [`Pass::run`] with its buffer count, so the same op runs
/// over plain `T` slices ([`Slices`], the f32/f64 step) or over half-precision streams
/// ([`crate::mixed`]'s passes, f32 lanes), each monomorphised: the f32/f64 loop is unchanged.
pub trait Pass<T: Float> {
    /// The number of state buffers given (the kernel picks its op variant by it).
    fn buffers(&self) -> usize;
    /// Runs `op` over every element. `B` must equal [`Pass::buffers`].
    fn run<const B: usize, O: ElementOp<T, B>>(self, op: &O);
}

/// A plain step's piece: parameters, gradients and state buffers, all of type `T`.
pub struct Slices<'a, 'b, T> {
    simd: SimdLevel,
    params: &'a mut [T],
    grads: &'a [T],
    bufs: &'a mut [&'b mut [T]],
}

impl<'a, 'b, T> Slices<'a, 'b, T> {
    /// The piece `params` / `grads` / `bufs`, run on lanes up to `simd`.
    pub fn new(
        simd: SimdLevel,
        params: &'a mut [T],
        grads: &'a [T],
        bufs: &'a mut [&'b mut [T]],
    ) -> Self {
        Slices {
            simd,
            params,
            grads,
            bufs,
        }
    }
}

/// The first `B` buffers of `bufs` as an array.
///
/// # Panics
/// If `bufs` does not hold exactly `B` buffers (a kernel's match on [`Pass::buffers`] rules it
/// out).
pub(crate) fn buffer_array<'a, E, const B: usize>(bufs: &'a mut [&mut [E]]) -> [&'a mut [E]; B] {
    assert_eq!(bufs.len(), B, "buffer count");
    let mut it = bufs.iter_mut();
    std::array::from_fn(|_| &mut **it.next().expect("B buffers"))
}

impl<T: Float> Pass<T> for Slices<'_, '_, T> {
    fn buffers(&self) -> usize {
        self.bufs.len()
    }
    #[inline(always)]
    fn run<const B: usize, O: ElementOp<T, B>>(self, op: &O) {
        for_each_lane::<T, B, O>(
            self.simd,
            op,
            self.params,
            self.grads,
            buffer_array(self.bufs),
        )
    }
}

/// The mixed-precision fused loop: `op` on f32 lanes of `S`, with the parameters read and
/// written through `params` (f32 master weights plus a rounded copy, or half-precision
/// parameters rounded to nearest or stochastically: [`crate::mixed`]'s [`ParamStream`]s),
/// gradients read from `G` storage and state buffers held in `M` storage (widened on load,
/// rounded on store), all in the one pass. With f32 parameters and `G = M = f32` it computes
/// exactly what [`lane_loop`] computes on the widened gradients: the same op on the same
/// lanes, so the same bits.
///
/// A streamed copy ([`ParamStream::vector_start`]) is written with non-temporal stores: no
/// read for ownership of its lines (2 of the 22 bytes per element a bf16-state step moves
/// otherwise) and no eviction of the lines the pass still reads. Those stores need the copy
/// aligned to a vector's size, so the elements before its first such boundary (at most one
/// vector's worth) run as scalars, which give the same bits as the vectors.
///
/// # Panics
/// If the slices differ in length (the step driver never passes such slices).
#[inline(always)]
pub(crate) fn mixed_lane_loop<S, PS, G, M, const B: usize, O>(
    simd: S,
    op: &O,
    mut params: PS,
    grads: &[G],
    state: [&mut [M]; B],
) where
    S: Simd,
    PS: ParamStream,
    G: Storage,
    M: Storage,
    O: ElementOp<f32, B>,
{
    let n = params.len();
    assert!(grads.len() == n && state.iter().all(|s| s.len() == n));
    let w = <S::F32 as Lane>::WIDTH;
    // Scalars in [0, head), vectors in [head, end), scalars in [end, n).
    let head = params.vector_start(w).min(n);
    let end = head + (n - head) / w * w;
    let body = end - head;
    let (g_head, g_rest) = grads.split_at(head);
    let (g_body, g_tail) = g_rest.split_at(body);
    let mut parts = state.map(|s| {
        let (h, rest) = s.split_at_mut(head);
        let (b, t) = rest.split_at_mut(body);
        (h, b, t)
    });
    mixed_scalars(
        op,
        &mut params,
        0,
        g_head,
        parts.each_mut().map(|p| &mut *p.0),
    );
    let mut i = 0;
    // As in `lane_loop`: 1024 elements ahead in every array (2 KiB in a half-precision one);
    // the parameter stream leaves out a streamed copy, whose lines must not be cached.
    const AHEAD: usize = PREFETCH_AHEAD;
    // `$n` lane groups at a time, stored in pairs (`store_pair`: one conversion instruction
    // for both where the token has one).
    macro_rules! groups_at_a_time {
        ($n:literal) => {{
            // Each group's lines, as the one-group loop below (an f32 array's group is a
            // line).
            for j in 0..$n {
                prefetch_ahead::<_, _, _, B, AHEAD>(&params, head, g_body, &parts, i + j * w);
            }
            // Plain loops, no closures (see below).
            let mut p = [<S::F32 as Lane>::splat(0.0); $n];
            let mut s = [[<S::F32 as Lane>::splat(0.0); B]; $n];
            for (j, (p, s)) in p.iter_mut().zip(&mut s).enumerate() {
                let at = i + j * w;
                let g = G::load(simd, &g_body[at..at + w]);
                for (k, v) in s.iter_mut().enumerate() {
                    *v = M::load(simd, &parts[k].1[at..at + w]);
                }
                *p = op.apply(params.load(simd, head + at), g, s);
            }
            for j in (0..$n).step_by(2) {
                let at = i + j * w;
                params.store_pair(simd, head + at, p[j], p[j + 1]);
                for (k, part) in parts.iter_mut().enumerate() {
                    M::store_pair(simd, s[j][k], s[j + 1][k], &mut part.1[at..at + 2 * w]);
                }
            }
            i += $n * w;
        }};
    }
    // Four groups at a time where the op and the parameter stream both allow it
    // (`GROUPS_PER_ITERATION`), then two at a time, then at most one group alone.
    if O::GROUPS_PER_ITERATION == 4 && PS::GROUPS_PER_ITERATION == 4 {
        while 4 * w <= body - i {
            groups_at_a_time!(4);
        }
    }
    while 2 * w <= body - i {
        groups_at_a_time!(2);
    }
    while w <= body - i {
        prefetch_ahead::<_, _, _, B, AHEAD>(&params, head, g_body, &parts, i);
        let p = params.load(simd, head + i);
        let g = G::load(simd, &g_body[i..i + w]);
        // A plain loop, not `array::from_fn`: a closure is compiled without the token's target
        // features, so the conversion intrinsics inside it were not inlined (measured: bf16
        // state 30% slower than f32 state).
        let mut s = [<S::F32 as Lane>::splat(0.0); B];
        for (k, v) in s.iter_mut().enumerate() {
            *v = M::load(simd, &parts[k].1[i..i + w]);
        }
        let p = op.apply(p, g, &mut s);
        params.store(simd, head + i, p);
        for (k, v) in s.iter().enumerate() {
            M::store(simd, *v, &mut parts[k].1[i..i + w]);
        }
        i += w;
    }
    params.finish(simd);
    mixed_scalars(
        op,
        &mut params,
        end,
        g_tail,
        parts.each_mut().map(|p| &mut *p.2),
    );
}

/// Hints the cache to fetch the elements `AHEAD` past position `at` of [`mixed_lane_loop`]'s
/// vector body (of `grads.len()`) in every array: the parameters through their stream (`head`
/// before the body), the gradients, each state buffer (`parts`: head, body, tail of each).
/// Nothing near the end of the body, or off x86-64.
#[inline(always)]
#[allow(clippy::type_complexity)]
fn prefetch_ahead<PS: ParamStream, G, M, const B: usize, const AHEAD: usize>(
    params: &PS,
    head: usize,
    grads: &[G],
    parts: &[(&mut [M], &mut [M], &mut [M]); B],
    at: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if AHEAD < grads.len() - at {
        params.prefetch(head + at + AHEAD);
        // SAFETY: `_mm_prefetch` only hints the cache and never faults; `at + AHEAD` is below
        // the body's length, so every address is inside its slice (`add` stays in bounds).
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(grads.as_ptr().add(at + AHEAD) as *const i8);
            for part in parts {
                _mm_prefetch::<_MM_HINT_T0>(part.1.as_ptr().add(at + AHEAD) as *const i8);
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (params, head, grads, parts, at);
}

/// The scalar form of [`mixed_lane_loop`]'s body, for its head and tail: elements
/// `offset..offset + grads.len()` of `params`, with `grads` and `state` starting at `offset`.
#[inline(always)]
fn mixed_scalars<PS, G, M, const B: usize, O>(
    op: &O,
    params: &mut PS,
    offset: usize,
    grads: &[G],
    state: [&mut [M]; B],
) where
    PS: ParamStream,
    G: Storage,
    M: Storage,
    O: ElementOp<f32, B>,
{
    for (j, g) in grads.iter().enumerate() {
        let mut s: [f32; B] = std::array::from_fn(|k| state[k][j].to_f32());
        let p = op.apply(params.load_one(offset + j), g.to_f32(), &mut s);
        params.store_one(offset + j, p);
        for (k, v) in s.iter().enumerate() {
            state[k][j] = M::from_f32(*v);
        }
    }
}

/// A scalar weight of torch's `lerp`, with the choice between ATen's two formulas made once
/// (per run) rather than per vector.
#[derive(Debug, Clone, Copy)]
pub struct LerpWeight<T> {
    weight: T,
    one_minus_weight: T,
    from_start: bool,
}

impl<T: Float> LerpWeight<T> {
    /// The weight `weight` (its complement is computed in `T`, as ATen does).
    pub fn new(weight: T) -> Self {
        LerpWeight {
            weight,
            one_minus_weight: T::ONE - weight,
            from_start: weight.to_f64().abs() < 0.5,
        }
    }
}

/// torch's `lerp(start, end, weight)` for a scalar weight, as ATen's CPU kernel computes it.
#[inline(always)]
pub fn lerp<V: Lane>(start: V, end: V, w: &LerpWeight<V::Elem>) -> V {
    if w.from_start {
        start + V::splat(w.weight) * (end - start)
    } else {
        end - (end - start) * V::splat(w.one_minus_weight)
    }
}

/// True when any element is NaN or infinite.
pub fn any_non_finite<T: Float>(x: &[T]) -> bool {
    // Sum of `x * 0` is NaN exactly when some element is NaN or infinite; the chunked form
    // vectorises and stops early.
    x.chunks(1024).any(|c| {
        let mut acc = T::ZERO;
        for &v in c {
            acc = acc + v * T::ZERO;
        }
        acc.to_f64().is_nan()
    })
}

/// Scalar helpers shared by the reference kernels: one whole-slice pass per torch operation.
pub mod passes {
    use crate::float::Float;

    /// `grad = -grad` when maximizing, times `scale`, into a fresh vector.
    pub fn effective_grad<T: Float>(g: &[T], maximize: bool, scale: T) -> Vec<T> {
        g.iter()
            .map(|&x| {
                let x = x * scale;
                if maximize {
                    -x
                } else {
                    x
                }
            })
            .collect()
    }

    /// `a.add_(b, alpha=alpha)`: `a + alpha * b`.
    pub fn add_scaled<T: Float>(a: &mut [T], b: &[T], alpha: T) {
        for (x, &y) in a.iter_mut().zip(b) {
            *x = *x + alpha * y;
        }
    }

    /// `a.mul_(s)`.
    pub fn mul<T: Float>(a: &mut [T], s: T) {
        for x in a {
            *x = *x * s;
        }
    }

    /// `a.lerp_(b, w)` with torch's two formulas.
    pub fn lerp<T: Float>(a: &mut [T], b: &[T], w: T) {
        for (x, &y) in a.iter_mut().zip(b) {
            *x = if w.to_f64().abs() < 0.5 {
                *x + w * (y - *x)
            } else {
                y - (y - *x) * (T::ONE - w)
            };
        }
    }

    /// `a.addcmul_(b, c, value=v)`: `a + v * b * c`.
    pub fn addcmul<T: Float>(a: &mut [T], b: &[T], c: &[T], v: T) {
        for ((x, &y), &z) in a.iter_mut().zip(b).zip(c) {
            *x = *x + v * y * z;
        }
    }

    /// `a.addcdiv_(b, c, value=v)`: `a + v * b / c`.
    pub fn addcdiv<T: Float>(a: &mut [T], b: &[T], c: &[T], v: T) {
        for ((x, &y), &z) in a.iter_mut().zip(b).zip(c) {
            *x = *x + v * y / z;
        }
    }
}
