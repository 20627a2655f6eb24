//! Mixed precision: bf16 and f16 storage beside f32 master weights (the ZeRO-Offload pattern,
//! DeepSpeed's `DeepSpeedCPUAdam` with half-precision gradients and parameter copy), and bf16
//! parameters with no master weights (torch's fused bf16 step; stochastic rounding).
//!
//! # Storage formats
//! [`Storage`] is a sealed trait for the element formats a fused pass can stream: `f32`,
//! [`half::bf16`] and [`half::f16`]. Every kernel computes in f32 lanes; a half-precision
//! stream is widened on load (exact) and rounded on store:
//! - **bf16** is the top half of an f32, so widening is a 16-bit shift and rounding is
//!   round-to-nearest-even in integer arithmetic, `(bits + 0x7FFF + lsb) >> 16`, as torch's
//!   `c10::BFloat16` (`round_to_nearest_even`) and `half::bf16::from_f32` compute it:
//!   overflow rounds to ±infinity, infinities stay, subnormals round like any other value.
//!   A NaN becomes torch's scalar quiet NaN `0x7FC0` (`half` keeps the sign and payload
//!   instead, and torch's own vectorised kernels write `0xFFFF`: every one is a NaN). On CPUs
//!   with AVX-512 BF16 ([`SimdLevel::Avx512Bf16`]) the rounding is the `vcvtneps2bf16`
//!   instruction, with vectors holding a NaN (whose payload it keeps) or a subnormal (which it
//!   flushes) sent down the integer path, one `vfpclassps` deciding, so the bits are the same
//!   at every level.
//! - **Subnormals in a flushed step.** Inside a step under [`Subnormals::Flush`] (the default)
//!   on x86-64, the thread reads subnormal f32 values as zero (MXCSR.DAZ), and the bf16
//!   rounding to nearest reads its input the same way at every level: a subnormal becomes a
//!   zero of its sign. The step's arithmetic never produces one there (FTZ), so this touches
//!   only a subnormal a step passes through unchanged (the previous gradient Rprop keeps);
//!   it is what lets `vcvtneps2bf16`, which always flushes, round every vector without a
//!   subnormal test. Stochastic rounding adds its bits to the value as stored (parameters are
//!   always results of the step's arithmetic, so never subnormal there). Outside a flushed
//!   step, and under [`Subnormals::Preserve`], subnormals round like any other value.
//! - **f16** uses F16C's `vcvtph2ps` / `vcvtps2ph` (round to nearest even) under AVX2 and
//!   AVX-512, and `half`'s software conversion on the portable level: the same bits, the
//!   same as `half::f16::from_f32` (NaN keeps its sign and top payload bits, quietened).
//!
//! `tests/mixed.rs` checks every level against `half` on all 2^16 half values (widening)
//! and on edge and random f32 values (rounding), with and without subnormal flushing.
//!
//! # Mode 2: f32 master weights, half gradients in, half copy out
//! The arena keeps the f32 parameters and the optimizer its f32 state, as always. A
//! half-precision backward writes its gradients into a [`HalfBuffer`] laid out like the arena
//! (`HalfBuffer::<bf16>::gradients(&arena)`), and [`crate::Optimizer::step_mixed`] runs the
//! algorithm's fused kernel once over memory: it reads the half gradients, updates the f32
//! parameters and state, and writes each updated parameter, rounded, to a second
//! [`HalfBuffer`] (`HalfBuffer::copy_of(&arena)`) for the next half-precision forward. The
//! result equals, bit for bit, the f32 step on the widened gradients followed by rounding the
//! parameters (`tests/mixed.rs`), for every elementwise algorithm, every SIMD level and
//! thread count. [`crate::StepOptions`] applies as in f32: `grad_scale` (a GradScaler's
//! unscale, for f16), `skip_non_finite` (checked on the half gradients, the step skipped
//! whole) and `clip` (the norm computed on the half gradients, as the f32 norm of their
//! widened values).
//!
//! With [`crate::Optimizer::set_state_precision`]`(`[`StatePrecision::Bf16`]`)` the state
//! buffers are bf16 too (DeepSpeed's `fp32_optimizer_states=False`): each element's state is
//! widened, updated in f32 and rounded back in the same pass.
//!
//! # Modes 1 and 3: bf16 parameters, no master copy
//! [`crate::Optimizer::step_half`] steps parameters that exist only in half precision: a
//! [`HalfBuffer`] of parameters (`HalfBuffer::<bf16>::copy_of(&arena)`) and one of gradients.
//! The f32 [`Arena`] registers the parameters and builds the optimizer and the two buffers;
//! it can be dropped before the first step (the optimizer keeps only the layout), so no f32
//! copy of the parameters stays in memory. Each element is widened, updated in f32 and stored
//! back through a [`ParamRounding`]:
//! - **Mode 1**, [`ParamRounding::Nearest`] with [`StatePrecision::Bf16`]: torch's `fused=True`
//!   CPU step on bf16 parameters (`FusedSGDKernel.cpp`, `FusedAdamKernel.cpp`,
//!   `FusedAdagradKernel.cpp`), parameters and state rounded to nearest even. SGD, Adam,
//!   AdamW and Adagrad run in the order of torch's compiled kernels, with the multiply-adds
//!   they fuse ([`crate::kernels::torch_fused`], [`crate::Algorithm::torch_fused_pass`]), and
//!   land on torch's bits (`tests/bf16_fused.rs` against `tests/fixtures/bf16.json`, written
//!   by `scripts/gen_fixtures.py --only bf16`). The other elementwise algorithms, which torch
//!   has no fused kernel for, run their [`crate::Optimizer::step`] op in f32.
//! - **Mode 3**, [`ParamRounding::Stochastic`] (torchao's `bf16_stochastic_round`, bf16
//!   parameters only): the f32 result plus 16 random bits below the bf16 mantissa, truncated
//!   ([`bf16_stochastic_round`]), so `E[round(x)] = x` and updates much smaller than a bf16
//!   unit are not lost. The bits of element `i` (its position in the arena) at step `step` of
//!   a run seeded `seed` are [`stochastic_bits`]`(seed, step, i)`: SplitMix64 of
//!   `(seed, step)` keys the counter-based generator ARS-5 (five AES rounds; Intel MKL's
//!   `VSL_BRNG_ARS5`), whose 128-bit block `i >> 3` gives eight neighbours their 16 bits each
//!   (the formula is on [`stochastic_bits`]). A pure function of the position,
//!   not of the thread or lane that rounds it: results are bitwise the same for every thread
//!   count and SIMD level. The caller numbers the steps (a global step count, saved with a
//!   checkpoint, resumes the same sequence); state is bf16 ([`StatePrecision::Bf16`], rounded
//!   to nearest, torchao's default of state in the parameters' dtype) or f32
//!   ([`StatePrecision::Full`]).
//!
//! Both run through the one mixed pass of mode 2: a `ParamStream` is where the lane loop reads
//! the parameters and how it writes them back (f32 plus a rounded copy, rounded to nearest, or
//! rounded stochastically).

use std::fmt::Debug;

use half::slice::HalfFloatSliceExt;
pub use half::{bf16, f16};

use crate::arch::{Simd, SimdLevel, WithSimd};
use crate::arena::{AlignedBuf, Arena, Param, ParamInfo};
use crate::buffer::Role;
use crate::checkpoint::dtype::{Values, ValuesMut};
use crate::error::{Error, Result};
use crate::float::Lane;
use crate::kernels::{buffer_array, mixed_lane_loop, ElementOp, Pass};
use crate::subnormals::Subnormals;

mod params;
pub use params::{bf16_stochastic_round, stochastic_bits, ParamRounding};
pub(crate) use params::{MasterCopy, Nearest, ParamStream, Stochastic};

/// bf16 bits of `x`, rounded to nearest with ties to even: torch's
/// `c10::detail::round_to_nearest_even` (NaN becomes `0x7FC0`). Equals
/// `half::bf16::from_f32(x).to_bits()` for every non-NaN `x`.
#[inline(always)]
pub fn bf16_bits_from_f32(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7FC0;
    }
    let b = x.to_bits();
    let lsb = (b >> 16) & 1;
    (b.wrapping_add(0x7FFF + lsb) >> 16) as u16
}

/// [`bf16_bits_from_f32`] of `x` as the running thread reads it: inside a step under
/// [`Subnormals::Flush`] on x86-64 (MXCSR.DAZ) a subnormal `x` rounds as a zero of its sign, as
/// the step's arithmetic reads it and as `vcvtneps2bf16` always does, so every SIMD level
/// stores the same bits in both modes. Elsewhere, and outside a flushed step, exactly
/// [`bf16_bits_from_f32`].
#[inline(always)]
pub(crate) fn bf16_bits_as_read(x: f32) -> u16 {
    #[cfg(target_arch = "x86_64")]
    let x = crate::arch::as_read_f32(x);
    bf16_bits_from_f32(x)
}

mod sealed {
    use crate::arch::Simd;
    use crate::checkpoint::dtype::{Values, ValuesMut};

    /// The crate-private half of [`super::Storage`]: SIMD loads and stores of `S`'s f32 lanes.
    pub trait Sealed: Sized {
        /// Widens `S::F32::WIDTH` elements from the front of `s`.
        fn load<S: Simd>(simd: S, s: &[Self]) -> S::F32;
        /// Rounds `v` into the front of `s`.
        fn store<S: Simd>(simd: S, v: S::F32, s: &mut [Self]);
        /// `s` as a checkpoint tensor's values.
        fn values(s: &[Self]) -> Values<'_>;
        /// `s` as a checkpoint tensor's destination.
        fn values_mut(s: &mut [Self]) -> ValuesMut<'_>;
        /// [`Sealed::store`] with a non-temporal store where the token has one and `s` is
        /// aligned to the vector's size (`Simd::stream_bf16`); a `Simd::store_fence` must
        /// follow. f32 storage stores ordinarily.
        #[inline(always)]
        fn stream<S: Simd>(simd: S, v: S::F32, s: &mut [Self]) {
            Self::store(simd, v, s)
        }
        /// [`Sealed::store`] of two lane groups, `lo` then `hi`: the same bits as two calls.
        #[inline(always)]
        fn store_pair<S: Simd>(simd: S, lo: S::F32, hi: S::F32, s: &mut [Self]) {
            let w = <S::F32 as crate::float::Lane>::WIDTH;
            Self::store(simd, lo, &mut s[..w]);
            Self::store(simd, hi, &mut s[w..2 * w]);
        }
    }
}

/// An element storage format of a fused pass: `f32`, [`bf16`] or [`struct@f16`]. Sealed.
pub trait Storage:
    sealed::Sealed + Copy + Default + PartialEq + Debug + Send + Sync + 'static
{
    /// torch's dtype name: `"float32"`, `"bfloat16"`, `"float16"`.
    const DTYPE: &'static str;
    /// Widens to f32 (exact).
    fn to_f32(self) -> f32;
    /// Rounds an f32 to this format, to nearest with ties to even (see the module docs for
    /// NaN, and for subnormals inside a flushed step).
    fn from_f32(x: f32) -> Self;
    /// True when any element is NaN or infinite.
    fn any_non_finite(x: &[Self]) -> bool;
}

impl sealed::Sealed for f32 {
    fn values(s: &[f32]) -> Values<'_> {
        Values::F32(s)
    }
    fn values_mut(s: &mut [f32]) -> ValuesMut<'_> {
        ValuesMut::F32(s)
    }
    #[inline(always)]
    fn load<S: Simd>(_: S, s: &[f32]) -> S::F32 {
        <S::F32 as Lane>::load(s)
    }
    #[inline(always)]
    fn store<S: Simd>(_: S, v: S::F32, s: &mut [f32]) {
        v.store(s)
    }
}

impl Storage for f32 {
    const DTYPE: &'static str = "float32";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    fn any_non_finite(x: &[f32]) -> bool {
        crate::kernels::any_non_finite(x)
    }
}

/// The raw bits of a half-precision slice (`half`'s safe reinterpretation: both types are
/// `repr(transparent)` over `u16`).
#[inline(always)]
fn bits<H>(s: &[H]) -> &[u16]
where
    [H]: HalfFloatSliceExt,
{
    s.reinterpret_cast()
}

#[inline(always)]
pub(crate) fn bits_mut<H>(s: &mut [H]) -> &mut [u16]
where
    [H]: HalfFloatSliceExt,
{
    s.reinterpret_cast_mut()
}

/// True when any of `x` has all exponent bits set under `mask` (NaN or infinity).
fn any_exponent_full(x: &[u16], mask: u16) -> bool {
    x.chunks(1024)
        .any(|c| c.iter().fold(false, |acc, &b| acc | (b & mask == mask)))
}

impl sealed::Sealed for bf16 {
    fn values(s: &[bf16]) -> Values<'_> {
        Values::Bf16(s)
    }
    fn values_mut(s: &mut [bf16]) -> ValuesMut<'_> {
        ValuesMut::Bf16(s)
    }
    #[inline(always)]
    fn load<S: Simd>(simd: S, s: &[bf16]) -> S::F32 {
        simd.load_bf16(bits(s))
    }
    #[inline(always)]
    fn store<S: Simd>(simd: S, v: S::F32, s: &mut [bf16]) {
        simd.store_bf16(v, bits_mut(s))
    }
    #[inline(always)]
    fn stream<S: Simd>(simd: S, v: S::F32, s: &mut [bf16]) {
        simd.stream_bf16(v, bits_mut(s))
    }
    #[inline(always)]
    fn store_pair<S: Simd>(simd: S, lo: S::F32, hi: S::F32, s: &mut [bf16]) {
        simd.store_bf16_pair(lo, hi, bits_mut(s))
    }
}

impl Storage for bf16 {
    const DTYPE: &'static str = "bfloat16";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_bits(bf16_bits_as_read(x))
    }
    fn any_non_finite(x: &[bf16]) -> bool {
        any_exponent_full(bits(x), 0x7F80)
    }
}

impl sealed::Sealed for f16 {
    fn values(s: &[f16]) -> Values<'_> {
        Values::F16(s)
    }
    fn values_mut(s: &mut [f16]) -> ValuesMut<'_> {
        ValuesMut::F16(s)
    }
    #[inline(always)]
    fn load<S: Simd>(simd: S, s: &[f16]) -> S::F32 {
        simd.load_f16(bits(s))
    }
    #[inline(always)]
    fn store<S: Simd>(simd: S, v: S::F32, s: &mut [f16]) {
        simd.store_f16(v, bits_mut(s))
    }
    #[inline(always)]
    fn stream<S: Simd>(simd: S, v: S::F32, s: &mut [f16]) {
        simd.stream_f16(v, bits_mut(s))
    }
}

impl Storage for f16 {
    const DTYPE: &'static str = "float16";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn any_non_finite(x: &[f16]) -> bool {
        any_exponent_full(bits(x), 0x7C00)
    }
}

/// The precision an optimizer keeps its state buffers in (see
/// [`crate::Optimizer::set_state_precision`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StatePrecision {
    /// The arena's element type (the default).
    #[default]
    Full,
    /// bf16, rounded to nearest even after every update (DeepSpeed's
    /// `fp32_optimizer_states=False`); only [`crate::Optimizer::step_mixed`] and
    /// [`crate::Optimizer::step_half`] can step it.
    Bf16,
}

/// Widening of a slice, as a kernel object.
struct Widen<'a, H> {
    src: &'a [H],
    dst: &'a mut [f32],
}

impl<H: Storage> WithSimd for Widen<'_, H> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        widen_on(simd, self.src, self.dst)
    }
}

/// Widens `src` into `dst` (as long) on the f32 lanes of `S`, scalars for the tail.
#[inline(always)]
pub(crate) fn widen_on<S: Simd, H: Storage>(simd: S, src: &[H], dst: &mut [f32]) {
    let w = <S::F32 as Lane>::WIDTH;
    let body = src.len() - src.len() % w;
    for (s, d) in src[..body]
        .chunks_exact(w)
        .zip(dst[..body].chunks_exact_mut(w))
    {
        H::load(simd, s).store(d);
    }
    for (s, d) in src[body..].iter().zip(&mut dst[body..]) {
        *d = s.to_f32();
    }
}

/// Rounding of a slice, as a kernel object.
struct Narrow<'a, H> {
    src: &'a [f32],
    dst: &'a mut [H],
}

impl<H: Storage> WithSimd for Narrow<'_, H> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let w = <S::F32 as Lane>::WIDTH;
        let pairs = self.src.len() - self.src.len() % (2 * w);
        let body = self.src.len() - self.src.len() % w;
        for (s, d) in self.src[..pairs]
            .chunks_exact(2 * w)
            .zip(self.dst[..pairs].chunks_exact_mut(2 * w))
        {
            let (lo, hi) = s.split_at(w);
            H::store_pair(
                simd,
                <S::F32 as Lane>::load(lo),
                <S::F32 as Lane>::load(hi),
                d,
            );
        }
        if pairs < body {
            H::store(
                simd,
                <S::F32 as Lane>::load(&self.src[pairs..body]),
                &mut self.dst[pairs..body],
            );
        }
        for (s, d) in self.src[body..].iter().zip(&mut self.dst[body..]) {
            *d = H::from_f32(*s);
        }
    }
}

fn check_len(what: &str, a: usize, b: usize) -> Result<()> {
    if a != b {
        return Err(Error::MixedPrecision(format!(
            "{what}: source has {a} elements, destination {b}"
        )));
    }
    Ok(())
}

/// Widens `src` into `dst` (exact) on SIMD lanes up to `simd`.
pub fn widen<H: Storage>(simd: SimdLevel, src: &[H], dst: &mut [f32]) -> Result<()> {
    check_len("widen", src.len(), dst.len())?;
    simd.dispatch_half(Widen { src, dst });
    Ok(())
}

/// Rounds `src` into `dst` (to nearest, ties to even) on SIMD lanes up to `simd`. Every level
/// gives the same bits.
pub fn narrow<H: Storage>(simd: SimdLevel, src: &[f32], dst: &mut [H]) -> Result<()> {
    check_len("narrow", src.len(), dst.len())?;
    simd.dispatch_half(Narrow { src, dst });
    Ok(())
}

/// [`widen`] under subnormal mode `subnormals` (for tests: the conversions must give the same
/// bits inside a flushed step as outside).
#[doc(hidden)]
pub fn widen_in<H: Storage>(
    simd: SimdLevel,
    subnormals: Subnormals,
    src: &[H],
    dst: &mut [f32],
) -> Result<()> {
    subnormals.run(|| widen(simd, src, dst))
}

/// [`narrow`] under subnormal mode `subnormals` (for tests, as [`widen_in`]).
#[doc(hidden)]
pub fn narrow_in<H: Storage>(
    simd: SimdLevel,
    subnormals: Subnormals,
    src: &[f32],
    dst: &mut [H],
) -> Result<()> {
    subnormals.run(|| narrow(simd, src, dst))
}

/// A buffer in a half-precision (or f32) format laid out like an f32 [`Arena`]: the gradients
/// a half-precision backward writes, or the parameter copy a mixed-precision step writes.
/// 64-byte aligned, and staggered like the arena's own buffers.
///
/// Like the arena's gradients, each parameter's slot is *present* or not: only parameters
/// whose gradient is present are stepped by [`crate::Optimizer::step_mixed`].
#[derive(Clone)]
pub struct HalfBuffer<H: Storage> {
    arena_id: u64,
    infos: Vec<ParamInfo>,
    data: AlignedBuf<H>,
    present: Vec<bool>,
}

impl<H: Storage> Debug for HalfBuffer<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HalfBuffer")
            .field("dtype", &H::DTYPE)
            .field("len", &self.data.len())
            .finish()
    }
}

impl<H: Storage> HalfBuffer<H> {
    /// A gradient buffer for `arena`: zeros, no parameter present.
    pub fn gradients(arena: &Arena<f32>) -> Self {
        HalfBuffer {
            arena_id: arena.id(),
            infos: arena.infos().to_vec(),
            data: AlignedBuf::filled(Role::Grads, arena.len(), H::default()),
            present: vec![false; arena.num_params()],
        }
    }

    /// A parameter copy of `arena`: its current values rounded (to nearest even), every
    /// parameter present.
    pub fn copy_of(arena: &Arena<f32>) -> Self {
        let mut data = AlignedBuf::filled(Role::Copy, arena.len(), H::default());
        narrow(SimdLevel::Best, arena.params(), &mut data).expect("same length");
        HalfBuffer {
            arena_id: arena.id(),
            infos: arena.infos().to_vec(),
            data,
            present: vec![true; arena.num_params()],
        }
    }

    /// True when this buffer was made for `arena`.
    pub fn belongs_to(&self, arena: &Arena<f32>) -> bool {
        self.arena_id == arena.id()
    }

    pub(crate) fn arena_id(&self) -> u64 {
        self.arena_id
    }

    /// Elements (the arena's length).
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True for a buffer of an empty arena.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Every element, in arena order.
    pub fn as_slice(&self) -> &[H] {
        &self.data
    }

    /// Every element, in arena order, to write; marks every parameter present.
    pub fn as_mut_slice(&mut self) -> &mut [H] {
        self.present.fill(true);
        &mut self.data
    }

    /// Every element, in arena order, to write, leaving the presence flags as they are (the
    /// parameters of a half step).
    pub(crate) fn values_mut(&mut self) -> &mut [H] {
        &mut self.data
    }

    /// The per-parameter presence flags, in arena order.
    pub fn present(&self) -> &[bool] {
        &self.present
    }

    fn idx(&self, p: Param<f32>) -> usize {
        assert!(
            p.arena_id() == self.arena_id,
            "parameter handle used with a half buffer of another arena"
        );
        p.index()
    }

    /// The values of parameter `p`, present or not.
    ///
    /// # Panics
    /// If `p` belongs to another arena (as [`Arena::value`] does).
    pub fn value(&self, p: Param<f32>) -> &[H] {
        let i = self.idx(p);
        &self.data[self.infos[i].range()]
    }

    /// The values of parameter `p`, to write; marks it present. A slot that was not present
    /// is zeroed first (as [`Arena::grad_mut`] does).
    ///
    /// # Panics
    /// If `p` belongs to another arena.
    pub fn value_mut(&mut self, p: Param<f32>) -> &mut [H] {
        let i = self.idx(p);
        let r = self.infos[i].range();
        if !self.present[i] {
            self.data[r.clone()].fill(H::default());
            self.present[i] = true;
        }
        &mut self.data[r]
    }

    /// True when parameter `p`'s slot is present.
    pub fn is_present(&self, p: Param<f32>) -> bool {
        self.present[self.idx(p)]
    }

    /// Marks parameter `p` absent (torch's `grad = None`): a mixed step skips it.
    pub fn clear(&mut self, p: Param<f32>) {
        let i = self.idx(p);
        self.present[i] = false;
    }

    /// Rounds `values` (f32, `p`'s length) into `p`'s slot and marks it present.
    pub fn set_from_f32(&mut self, p: Param<f32>, values: &[f32]) -> Result<()> {
        let i = self.idx(p);
        let r = self.infos[i].range();
        check_len(&format!("`{}`", self.infos[i].name), values.len(), r.len())?;
        narrow(SimdLevel::Best, values, &mut self.data[r])?;
        self.present[i] = true;
        Ok(())
    }

    /// The arena layout the buffer was made for.
    pub(crate) fn infos(&self) -> &[ParamInfo] {
        &self.infos
    }

    /// Every element as a checkpoint's tensor values.
    pub(crate) fn values(&self) -> Values<'_> {
        H::values(&self.data)
    }

    /// Replaces every element with `values` (a staged load, cast as the file said, already
    /// checked to be as long) and the presence flags with `present`. Cannot fail.
    pub(crate) fn commit_loaded(&mut self, values: Values<'_>, present: Vec<bool>) {
        assert_eq!(present.len(), self.present.len(), "one flag per parameter");
        crate::checkpoint::dtype::cast(values, H::values_mut(&mut self.data))
            .expect("staged with the buffer's length");
        self.present = present;
    }

    /// Every element widened to f32 (exact).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.data.len()];
        widen(SimdLevel::Best, &self.data, &mut out).expect("same length");
        out
    }
}

/// A mixed-precision step's piece: parameters through `PS` (f32 master weights with a rounded
/// copy, or half-precision parameters: [`ParamStream`]), gradients in `G` and state in `M`,
/// streamed in one pass by [`Pass::run`] on f32 lanes up to `simd`.
pub(crate) struct MixedPass<'a, 'b, PS, G, M> {
    simd: SimdLevel,
    params: PS,
    grads: &'a [G],
    bufs: &'a mut [&'b mut [M]],
}

impl<'a, 'b, PS: ParamStream, G: Storage, M: Storage> MixedPass<'a, 'b, PS, G, M> {
    /// The piece; every slice must be as long as `params`.
    pub(crate) fn new(
        simd: SimdLevel,
        params: PS,
        grads: &'a [G],
        bufs: &'a mut [&'b mut [M]],
    ) -> Result<Self> {
        let n = params.len();
        if grads.len() != n || bufs.iter().any(|b| b.len() != n) {
            return Err(Error::MixedPrecision(format!(
                "a pass over {n} parameters got gradients of {} and buffers of {:?} elements",
                grads.len(),
                bufs.iter().map(|b| b.len()).collect::<Vec<_>>()
            )));
        }
        Ok(MixedPass {
            simd,
            params,
            grads,
            bufs,
        })
    }
}

/// The step size (elements over all groups) from which [`crate::Optimizer::step_mixed`]
/// writes the half-precision copy with streaming (non-temporal) stores: they skip the read
/// for ownership of every copy line and leave the cache to the arrays the pass reads. 4M
/// elements, where a bf16-state step moves 88 MB and its copy alone is 8 MB, more than the
/// L2 caches and most of the L3 a core shares; by the next forward pass the copy would have
/// left the caches anyway. Below it the copy stays cached for the forward pass that reads it.
/// On the Intel Xeon of BENCHMARKS.md streaming saved about 9% of a bare bf16-state loop at
/// 32M elements (one thread, CPU time of paired passes); on the real step the gain was within
/// the noise of a loaded machine. Set per optimizer with
/// [`crate::Optimizer::set_stream_copy_threshold`].
pub const STREAM_COPY_MIN_ELEMS: usize = 4 << 20;

/// [`mixed_lane_loop`] as a kernel object.
struct MixedKernel<'a, 'o, PS, G, M, const B: usize, O> {
    op: &'o O,
    params: PS,
    grads: &'a [G],
    state: [&'a mut [M]; B],
}

impl<PS: ParamStream, G: Storage, M: Storage, const B: usize, O: ElementOp<f32, B>> WithSimd
    for MixedKernel<'_, '_, PS, G, M, B, O>
{
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        mixed_lane_loop::<S, PS, G, M, B, O>(simd, self.op, self.params, self.grads, self.state)
    }
}

impl<PS: ParamStream, G: Storage, M: Storage> Pass<f32> for MixedPass<'_, '_, PS, G, M> {
    fn buffers(&self) -> usize {
        self.bufs.len()
    }
    #[inline(always)]
    fn run<const B: usize, O: ElementOp<f32, B>>(self, op: &O) {
        self.simd.dispatch_half(MixedKernel {
            op,
            params: self.params,
            grads: self.grads,
            state: buffer_array(self.bufs),
        })
    }
}
