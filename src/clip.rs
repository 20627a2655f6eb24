//! Gradient clipping, as `torch.nn.utils.clip_grad_norm_` and `clip_grad_value_` compute it,
//! over a whole arena or chosen parameter ranges (for example an optimizer's groups).
//!
//! The 1-, 2- and max-norms are one SIMD pass over the flat gradient buffer, spread over
//! threads in fixed [`CHUNK`]-element pieces whose partial sums (f64) are combined in piece
//! order, so the result is bitwise the same for any thread count and more accurate than torch's
//! f32 accumulation. Other orders `p` follow torch's own sequence (a sequential sum of `|g|^p`
//! in the element type per parameter, then the norm of the per-parameter norms), because their
//! rounding is large enough to matter at torch's tolerance; they run per parameter in parallel,
//! combined in parameter order.
//!
//! Parameters without a gradient (`grad is None`) are left out, as torch leaves them out.
//!
//! To clip inside the optimizer step instead (the gradients are then read twice, norm and
//! update, and never rewritten), see [`crate::StepOptions::clipped`].

use std::ops::Range;

use crate::arch::{Simd, SimdLevel, WithSimd};
use crate::arena::{Arena, Param};
use crate::error::{Error, Result};
use crate::float::{Float, Lane};
use crate::mixed::{widen_on, Storage};
use crate::parallel::{Exec, Parallelism, CHUNK, PARALLEL_THRESHOLD};
use crate::subnormals::Subnormals;

/// The order of a p-norm: torch's `norm_type`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormType {
    /// `max |g|` (torch's `'inf'` / `float('inf')`).
    Inf,
    /// `(Σ |g|^p)^(1/p)` for a finite `p > 0`; `P(2.0)` is the default Euclidean norm.
    P(f64),
}

impl NormType {
    /// From torch's float `norm_type` (`f64::INFINITY` for the max norm).
    pub fn from_f64(p: f64) -> Result<Self> {
        if p == f64::INFINITY {
            Ok(NormType::Inf)
        } else if p.is_finite() && p > 0.0 {
            Ok(NormType::P(p))
        } else {
            Err(Error::InvalidHyperparameter(format!(
                "Invalid norm_type value: {p:?} (expected a positive number or inf)"
            )))
        }
    }

    fn value(self) -> f64 {
        match self {
            NormType::Inf => f64::INFINITY,
            NormType::P(p) => p,
        }
    }
}

/// One piece of a norm reduction: an element range of the gradient buffer.
fn pieces(arena_ranges: impl Iterator<Item = Range<usize>>, out: &mut Vec<Range<usize>>) {
    out.clear();
    for r in arena_ranges {
        let mut at = r.start;
        while at < r.end {
            let end = (at + CHUNK).min(r.end);
            out.push(at..end);
            at = end;
        }
    }
}

/// Elements per block whose lane sums are widened to f64: short enough that the lane
/// accumulation in `T` stays within a few ulp.
const BLOCK: usize = 64;

/// Sums `f(lanes)` over `x` in lanes `V` of [`Float::LANES`] elements (the same order at
/// every [`SimdLevel`]), widening to f64 every [`BLOCK`] elements.
#[inline(always)]
fn lane_sum<T: Float, V: Lane<Elem = T>>(
    x: &[T],
    f: impl Fn(V) -> V,
    g: impl Fn(f64) -> f64,
) -> f64 {
    let mut total = 0.0f64;
    let mut lanes = [T::ZERO; 8];
    let body = x.len() - x.len() % BLOCK;
    for block in x[..body].chunks_exact(BLOCK) {
        let mut acc = V::splat(T::ZERO);
        for c in block.chunks_exact(V::WIDTH) {
            acc = acc + f(V::load(c));
        }
        acc.store(&mut lanes[..V::WIDTH]);
        total += lanes[..V::WIDTH].iter().map(|v| v.to_f64()).sum::<f64>();
    }
    total + x[body..].iter().map(|v| g(v.to_f64())).sum::<f64>()
}

/// The SIMD part of [`partial`] (orders 1, 2 and inf), as a kernel object for
/// [`SimdLevel::dispatch`].
struct LanePartial<'a, T> {
    x: &'a [T],
    norm: NormType,
}

impl<T: Float> WithSimd for LanePartial<'_, T> {
    type Output = f64;
    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) -> f64 {
        let x = self.x;
        match self.norm {
            NormType::Inf => {
                let mut m = T::Narrow::<S>::splat(T::ZERO);
                let body = x.len() - x.len() % T::LANES;
                for c in x[..body].chunks_exact(T::LANES) {
                    m = m.maximum(T::Narrow::<S>::load(c).abs());
                }
                let mut lanes = [T::ZERO; 8];
                m.store(&mut lanes[..T::LANES]);
                lanes[..T::LANES]
                    .iter()
                    .chain(&x[body..])
                    .map(|v| v.to_f64().abs())
                    .fold(0.0f64, nan_max)
            }
            NormType::P(1.0) => lane_sum::<T, T::Narrow<S>>(x, |v| v.abs(), f64::abs),
            _ => lane_sum::<T, T::Narrow<S>>(x, |v| v * v, |v| v * v),
        }
    }
}

/// Σ|x|^p (or max |x|) of one piece, in f64; for orders other than 1, 2 and inf, the
/// piece is a whole parameter and the result is its p-norm.
fn partial<T: Float>(x: &[T], norm: NormType, simd: SimdLevel) -> f64 {
    match norm {
        NormType::Inf | NormType::P(1.0) | NormType::P(2.0) => {
            simd.dispatch(LanePartial { x, norm })
        }
        NormType::P(p) => {
            // Other orders: torch's own sequence, so the numbers match its (less accurate)
            // result: a sequential sum of |x|^p in the element type per parameter, then the
            // 1/p power, then the same over the per-parameter norms.
            let p = T::from_f64(p);
            let mut acc = T::ZERO;
            for v in x {
                acc = acc + v.abs().powf(p);
            }
            acc.powf(T::ONE / p).to_f64()
        }
    }
}

/// [`partial`] of half-precision elements: exactly `partial` of their f32 widening (the same
/// lanes, summation order and f64 widening), without writing the widened values to memory.
pub(crate) fn partial_half<H: Storage>(x: &[H], norm: NormType, simd: SimdLevel) -> f64 {
    match norm {
        NormType::Inf | NormType::P(1.0) | NormType::P(2.0) => {
            simd.dispatch_half(HalfLanePartial { x, norm })
        }
        NormType::P(p) => {
            let p = p as f32;
            let mut acc = 0.0f32;
            for v in x {
                acc += v.to_f32().abs().powf(p);
            }
            acc.powf(1.0 / p) as f64
        }
    }
}

/// [`LanePartial`] of half-precision elements, widened a [`BLOCK`] at a time.
struct HalfLanePartial<'a, H> {
    x: &'a [H],
    norm: NormType,
}

impl<H: Storage> WithSimd for HalfLanePartial<'_, H> {
    type Output = f64;
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> f64 {
        let x = self.x;
        let mut buf = [0.0f32; BLOCK];
        let mut lanes = [0.0f32; 8];
        match self.norm {
            NormType::Inf => {
                let body = x.len() - x.len() % 8;
                let mut m = S::F32x8::splat(0.0);
                let mut start = 0;
                while start < body {
                    let end = (start + BLOCK).min(body);
                    let buf = &mut buf[..end - start];
                    widen_on(simd, &x[start..end], buf);
                    for c in buf.chunks_exact(8) {
                        m = m.maximum(S::F32x8::load(c).abs());
                    }
                    start = end;
                }
                m.store(&mut lanes);
                lanes
                    .iter()
                    .copied()
                    .chain(x[body..].iter().map(|v| v.to_f32()))
                    .map(|v| v.to_f64().abs())
                    .fold(0.0f64, nan_max)
            }
            norm => {
                let l1 = norm == NormType::P(1.0);
                let mut total = 0.0f64;
                let body = x.len() - x.len() % BLOCK;
                for block in x[..body].chunks_exact(BLOCK) {
                    widen_on(simd, block, &mut buf);
                    let mut acc = S::F32x8::splat(0.0);
                    for c in buf.chunks_exact(8) {
                        let v = S::F32x8::load(c);
                        acc = acc + if l1 { v.abs() } else { v * v };
                    }
                    acc.store(&mut lanes);
                    total += lanes.iter().map(|v| v.to_f64()).sum::<f64>();
                }
                let g = |v: f64| if l1 { v.abs() } else { v * v };
                total
                    + x[body..]
                        .iter()
                        .map(|v| g(v.to_f32().to_f64()))
                        .sum::<f64>()
            }
        }
    }
}

/// `max` that propagates NaN, as torch's norms do.
fn nan_max(m: f64, v: f64) -> f64 {
    if m.is_nan() || v.is_nan() {
        f64::NAN
    } else {
        m.max(v)
    }
}

/// The element ranges of the parameters at positions `params` that have a gradient.
fn grad_ranges<'a, T: Float>(
    arena: &'a Arena<T>,
    params: &'a [Range<usize>],
) -> impl Iterator<Item = Range<usize>> + 'a {
    let flags = arena.grad_flags();
    params
        .iter()
        .flat_map(|r| r.clone())
        .filter(move |&i| flags[i])
        .map(move |i| arena.infos()[i].range())
}

/// The total `norm_type` norm of the gradients of the parameters at positions `params` (e.g.
/// `[0..arena.num_params()]`, or an optimizer's `group_params`), as torch's
/// `get_total_norm` computes it. Returns 0 when no parameter has a gradient.
pub fn total_norm<T: Float>(
    arena: &Arena<T>,
    params: &[Range<usize>],
    norm: NormType,
    parallelism: &Parallelism,
) -> f64 {
    total_norm_with(
        arena,
        params,
        norm,
        parallelism,
        SimdLevel::Best,
        &mut NormScratch::default(),
    )
}

/// Buffers a norm computation reuses, so a clipped step allocates nothing once they have
/// grown to the arena's piece count.
#[derive(Debug, Default)]
pub struct NormScratch {
    pieces: Vec<Range<usize>>,
    partials: Vec<f64>,
}

/// [`total_norm`] with reusable buffers, on SIMD lanes up to `simd`.
pub fn total_norm_with<T: Float>(
    arena: &Arena<T>,
    params: &[Range<usize>],
    norm: NormType,
    parallelism: &Parallelism,
    simd: SimdLevel,
    scratch: &mut NormScratch,
) -> f64 {
    let total = scratch.plan(arena, params, norm);
    parallelism.run(total, PARALLEL_THRESHOLD, Subnormals::Preserve, |exec| {
        scratch.reduce(arena, norm, simd, exec)
    })
}

impl NormScratch {
    /// Cuts the gradients of `params` into the pieces the norm reduces; returns their total
    /// element count.
    pub(crate) fn plan<T: Float>(
        &mut self,
        arena: &Arena<T>,
        params: &[Range<usize>],
        norm: NormType,
    ) -> usize {
        self.plan_ranges(grad_ranges(arena, params), norm)
    }

    /// [`NormScratch::plan`] over the element ranges of the parameters to include.
    pub(crate) fn plan_ranges(
        &mut self,
        ranges: impl Iterator<Item = Range<usize>>,
        norm: NormType,
    ) -> usize {
        match norm {
            NormType::P(p) if p != 1.0 && p != 2.0 => {
                self.pieces.clear();
                self.pieces.extend(ranges);
            }
            _ => pieces(ranges, &mut self.pieces),
        }
        self.pieces.iter().map(|r| r.len()).sum()
    }

    /// The norm over the pieces [`NormScratch::plan`] cut, their partial norms computed as
    /// `exec` runs them and combined in piece order: the same result for any thread count.
    pub(crate) fn reduce<T: Float>(
        &mut self,
        arena: &Arena<T>,
        norm: NormType,
        simd: SimdLevel,
        exec: Exec,
    ) -> f64 {
        let grads = arena.grads();
        self.reduce_with::<T>(norm, exec, |r| partial(&grads[r], norm, simd))
    }

    /// [`NormScratch::reduce`] with `partial` giving each piece's partial norm (of elements in
    /// `T`, or widened to it).
    pub(crate) fn reduce_with<T: Float>(
        &mut self,
        norm: NormType,
        exec: Exec,
        partial: impl Fn(Range<usize>) -> f64 + Sync + Send,
    ) -> f64 {
        exec.map_into(&self.pieces, &mut self.partials, |r| partial(r.clone()));
        let partials = &self.partials;
        match norm {
            NormType::Inf => partials.iter().copied().fold(0.0f64, nan_max),
            NormType::P(2.0) => partials.iter().sum::<f64>().sqrt(),
            NormType::P(1.0) => partials.iter().sum(),
            NormType::P(p) => {
                let p = T::from_f64(p);
                let mut acc = T::ZERO;
                for &n in partials {
                    acc = acc + T::from_f64(n).powf(p);
                }
                acc.powf(T::ONE / p).to_f64()
            }
        }
    }
}

/// torch's clip coefficient: `min(max_norm / (total + 1e-6), 1)`.
pub fn clip_coefficient(max_norm: f64, total: f64) -> f64 {
    let c = max_norm / (total + 1e-6);
    if c > 1.0 {
        1.0
    } else {
        c
    }
}

impl ClipNorm {
    /// The factor a clip folded into a step multiplies the gradients by, given their total
    /// norm: torch's clip coefficient, or its error for a non-finite norm under
    /// `error_if_nonfinite`. Shared by every step that clips (f32, mixed, distributed).
    pub(crate) fn coefficient_for(&self, total: f64) -> Result<f64> {
        check_total(total, self.norm_type, self.error_if_nonfinite)?;
        Ok(clip_coefficient(self.max_norm, total))
    }
}

fn check_total(total: f64, norm: NormType, error_if_nonfinite: bool) -> Result<()> {
    if error_if_nonfinite && !total.is_finite() {
        return Err(Error::NonFiniteTotalNorm {
            order: norm.value(),
        });
    }
    Ok(())
}

/// `clip_grad_norm_`'s options, torch's defaults included: one value describes a clip
/// everywhere, for [`clip_grad_norm`], [`clip_grad_norm_all`] and a clip folded into the step
/// ([`crate::StepOptions::clipped`]).
///
/// ```
/// use optarena::{ClipNorm, NormType};
/// // torch: clip_grad_norm_(params, max_norm=1.0)  (norm_type=2.0, error_if_nonfinite=False)
/// let clip = ClipNorm::new(1.0);
/// assert_eq!(clip, ClipNorm::l2(1.0));
/// // torch: clip_grad_norm_(params, 1.0, norm_type="inf", error_if_nonfinite=True)
/// let strict = ClipNorm::new(1.0).norm_type(NormType::Inf).error_if_nonfinite(true);
/// assert_eq!(strict.norm_type, NormType::Inf);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipNorm {
    /// The largest total norm allowed (torch's `max_norm`, required).
    pub max_norm: f64,
    /// The norm's order (torch's `norm_type`, default 2.0).
    pub norm_type: NormType,
    /// Make a NaN or infinite total norm an error (nothing is changed) instead of scaling the
    /// gradients by it (torch's `error_if_nonfinite`, default false).
    pub error_if_nonfinite: bool,
}

impl ClipNorm {
    /// `clip_grad_norm_(params, max_norm)` with torch's defaults: the Euclidean norm, a
    /// non-finite total scales the gradients (no error). torch's `foreach` has no meaning here.
    pub fn new(max_norm: f64) -> Self {
        ClipNorm {
            max_norm,
            norm_type: NormType::P(2.0),
            error_if_nonfinite: false,
        }
    }

    /// [`ClipNorm::new`]: clip to `max_norm` in the Euclidean norm.
    pub fn l2(max_norm: f64) -> Self {
        ClipNorm::new(max_norm)
    }

    /// Sets `norm_type`.
    pub fn norm_type(mut self, norm_type: NormType) -> Self {
        self.norm_type = norm_type;
        self
    }

    /// Sets `error_if_nonfinite`.
    pub fn error_if_nonfinite(mut self, error_if_nonfinite: bool) -> Self {
        self.error_if_nonfinite = error_if_nonfinite;
        self
    }
}

/// The positions of `params` (handles of `arena`) as ranges, checked.
fn positions<T: Float>(arena: &Arena<T>, params: &[Param<T>]) -> Result<Vec<Range<usize>>> {
    params
        .iter()
        .map(|&p| arena.position(p).map(|i| i..i + 1))
        .collect()
}

/// `torch.nn.utils.clip_grad_norm_(params, ...)`: scales the gradients of `params` by
/// `min(max_norm / (total + 1e-6), 1)` and returns the total norm (before clipping), on
/// rayon's global pool. With `error_if_nonfinite`, a NaN or infinite total is an error and
/// nothing is changed. A handle of another arena is an error; a parameter given twice counts
/// twice in the norm, as in torch.
pub fn clip_grad_norm<T: Float>(
    arena: &mut Arena<T>,
    params: &[Param<T>],
    clip: ClipNorm,
) -> Result<f64> {
    clip_grad_norm_with(arena, params, clip, &Parallelism::Global)
}

/// [`clip_grad_norm`] with a choice of threads.
pub fn clip_grad_norm_with<T: Float>(
    arena: &mut Arena<T>,
    params: &[Param<T>],
    clip: ClipNorm,
    parallelism: &Parallelism,
) -> Result<f64> {
    let ranges = positions(arena, params)?;
    clip_ranges(arena, &ranges, clip, parallelism)
}

/// [`clip_grad_norm`] over every parameter of the arena (torch's
/// `clip_grad_norm_(model.parameters(), ...)`).
pub fn clip_grad_norm_all<T: Float>(arena: &mut Arena<T>, clip: ClipNorm) -> Result<f64> {
    let all = 0..arena.num_params();
    clip_ranges(
        arena,
        std::slice::from_ref(&all),
        clip,
        &Parallelism::Global,
    )
}

/// The clip over registration-position ranges (what an optimizer's groups are).
fn clip_ranges<T: Float>(
    arena: &mut Arena<T>,
    params: &[Range<usize>],
    clip: ClipNorm,
    parallelism: &Parallelism,
) -> Result<f64> {
    if clip.max_norm.is_nan() {
        return Err(Error::InvalidHyperparameter(
            "Invalid max_norm value: NaN".to_string(),
        ));
    }
    let norm = clip.norm_type;
    let total = total_norm(arena, params, norm, parallelism);
    check_total(total, norm, clip.error_if_nonfinite)?;
    let coef = T::from_f64(clip_coefficient(clip.max_norm, total));
    let ranges: Vec<Range<usize>> = grad_ranges(arena, params).collect();
    for r in ranges {
        for g in arena.grads_raw_mut(r) {
            *g = *g * coef;
        }
    }
    Ok(total)
}

/// `torch.nn.utils.clip_grad_value_(params, clip_value)`: clamps every gradient of `params`
/// to `[-clip_value, clip_value]`. A handle of another arena is an error.
pub fn clip_grad_value<T: Float>(
    arena: &mut Arena<T>,
    params: &[Param<T>],
    clip_value: f64,
) -> Result<()> {
    let ranges = positions(arena, params)?;
    clip_value_ranges(arena, &ranges, clip_value)
}

/// [`clip_grad_value`] over every parameter of the arena.
pub fn clip_grad_value_all<T: Float>(arena: &mut Arena<T>, clip_value: f64) -> Result<()> {
    let all = 0..arena.num_params();
    clip_value_ranges(arena, std::slice::from_ref(&all), clip_value)
}

fn clip_value_ranges<T: Float>(
    arena: &mut Arena<T>,
    params: &[Range<usize>],
    clip_value: f64,
) -> Result<()> {
    if clip_value.is_nan() {
        return Err(Error::InvalidHyperparameter(
            "Invalid clip_value value: NaN".to_string(),
        ));
    }
    let (lo, hi) = (T::from_f64(-clip_value), T::from_f64(clip_value));
    let ranges: Vec<Range<usize>> = grad_ranges(arena, params).collect();
    for r in ranges {
        for g in arena.grads_raw_mut(r) {
            // torch's clamp_(min, max): NaN stays NaN.
            if *g < lo {
                *g = lo;
            } else if *g > hi {
                *g = hi;
            }
        }
    }
    Ok(())
}

/// The un-rooted norm of `grads[r]` over `ranges` (Σ|g|^p for orders 1 and 2, max |g| for
/// inf), in the pieces and order [`total_norm`] uses for them: what one rank of a distributed
/// step contributes before the ranks' parts are combined in rank order
/// ([`combine_raw_norms`]). Other orders are refused (their per-parameter form needs whole
/// parameters).
pub(crate) fn raw_norm_part<T: Float>(
    grads: &[T],
    ranges: impl Iterator<Item = Range<usize>>,
    norm: NormType,
    simd: SimdLevel,
    scratch: &mut Vec<Range<usize>>,
) -> Result<f64> {
    if let NormType::P(p) = norm {
        if p != 1.0 && p != 2.0 {
            return Err(Error::Distributed(format!(
                "a distributed clip supports norm orders 1, 2 and inf, not {p}"
            )));
        }
    }
    pieces(ranges, scratch);
    let parts = scratch
        .iter()
        .map(|r| partial(&grads[r.clone()], norm, simd));
    Ok(match norm {
        NormType::Inf => parts.fold(0.0f64, nan_max),
        _ => parts.sum(),
    })
}

/// The norm from every rank's [`raw_norm_part`], combined in rank order.
pub(crate) fn combine_raw_norms(parts: &[f64], norm: NormType) -> f64 {
    match norm {
        NormType::Inf => parts.iter().copied().fold(0.0f64, nan_max),
        NormType::P(2.0) => parts.iter().sum::<f64>().sqrt(),
        _ => parts.iter().sum(),
    }
}
