//! How a fused mixed-precision pass keeps the parameters: f32 master weights with a rounded
//! copy (mode 2), or half-precision parameters rounded to nearest even (mode 1, torch's fused
//! bf16 step) or stochastically (mode 3, torchao's `bf16_stochastic_round`). One trait,
//! [`ParamStream`], that [`crate::kernels`]' single mixed lane loop reads and writes the
//! parameters through, so every mode runs every elementwise algorithm's op on the same lanes.

use half::bf16;

use super::sealed::Sealed;
use super::{bits_mut, Storage};
use crate::arch::{bf16_bits_stochastic, ArsKey, Simd};
use crate::error::{Error, Result};
use crate::float::Lane;

/// How a half-precision parameter is rounded after each update
/// ([`crate::Optimizer::step_half`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamRounding {
    /// Round to nearest, ties to even: torch's fused CPU step on bf16 (or f16) parameters
    /// (mode 1). Deterministic; an update smaller than half a unit in the last place of the
    /// parameter is lost.
    Nearest,
    /// Stochastic rounding of bf16 parameters (mode 3, torchao's `bf16_stochastic_round`):
    /// the f32 result `x` becomes the bf16 above or below it with probabilities proportional
    /// to its distance from the other, so the rounded value is `x` on average and small
    /// updates are not lost. The 16 random bits of element `i` (its position in the arena) at
    /// this step are [`stochastic_bits`]`(seed, step, i)`: a counter-based generator (ARS-5),
    /// so the result is the same bits for any thread count, SIMD level and piece split. Pass
    /// a new `step` for every optimizer step (for example the global step count, saved with a
    /// checkpoint so that a resumed run rounds as the uninterrupted one would): the same
    /// `(seed, step)` twice reuses the same random bits.
    Stochastic {
        /// The run's seed.
        seed: u64,
        /// The step's number (any value; a new one each step).
        step: u64,
    },
}

/// SplitMix64's finaliser (Steele, Lea & Flood, "Fast splittable pseudorandom number
/// generators", OOPSLA 2014), as in SCHEMA.md's `hashed`.
#[inline(always)]
const fn splitmix64(x: u64) -> u64 {
    let x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let z = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The per-step key of stochastic rounding: ARS-5's round keys for
/// `(k, splitmix64(k))` with `k = splitmix64(seed ^ splitmix64(step))`.
fn step_key(seed: u64, step: u64) -> ArsKey {
    let k = splitmix64(seed ^ splitmix64(step));
    ArsKey::new([k, splitmix64(k)])
}

/// The 16 random bits stochastic rounding adds below the bf16 mantissa of arena element
/// `index` at step `step` of a run seeded `seed`:
///
/// ```text
/// k      = splitmix64(seed ^ splitmix64(step))     (SplitMix64, as SCHEMA.md's hashed)
/// key    = (k, splitmix64(k))                       (128 bits, low word first)
/// c      = index >> 3
/// block  = ARS5(key, counter = (c, c))              (128 bits: eight 16-bit words)
/// bits   = word (index & 7) of block                (little-endian words)
/// ```
///
/// with ARS-5 the AES-based counter-based generator of Salmon et al. (SC 2011) that Intel MKL
/// ships as `VSL_BRNG_ARS5`: the counter exclusive-ored with the key, four AES rounds and a
/// last round (`aesenc` ×4, `aesenclast`) under the keys `key + r·W`,
/// `W = (0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B)` added in 64-bit lanes. One 128-bit block
/// feeds eight neighbouring elements, so a 512-bit VAES round serves 32 elements. A pure
/// function of its arguments: which thread or SIMD lane rounds an element does not matter.
/// (Until 2026-12 the bits came from a `lowbias32` integer hash of pairs of elements; runs
/// resumed across that change round differently from then on, as with a new seed.)
pub fn stochastic_bits(seed: u64, step: u64, index: u64) -> u16 {
    step_key(seed, step).block(index >> 3)[(index & 7) as usize]
}

/// Stochastic rounding of `x` to bf16 bits with the 16 random bits `r` (below 2^16), as
/// torchao's `_bf16_stochastic_round`: add `r` to the f32 bits and truncate, so `x` rounds
/// away from zero with probability (its 16 discarded bits) / 2^16. Infinities stay (their
/// low bits are zero); the largest finite values may round to infinity, as in torchao; a NaN
/// becomes torch's quiet `0x7FC0`, as in round-to-nearest (torchao's truncation could turn a
/// NaN with only low payload bits into an infinity).
#[inline(always)]
pub fn bf16_stochastic_round(x: f32, r: u16) -> bf16 {
    bf16::from_bits(bf16_bits_stochastic(x, r as u32))
}

/// Where a fused mixed-precision pass reads the parameters and how it writes them back: the
/// parameter side of [`crate::kernels`]' one mixed lane loop. Indices are positions in the
/// piece; `load`/`store` cover the `S::F32::WIDTH` elements from `i`.
pub(crate) trait ParamStream: Send {
    /// Whether the lane loop may compute four lane groups per iteration when the op asks for
    /// it ([`crate::kernels::ElementOp::GROUPS_PER_ITERATION`]): 4 to allow, 2 not to. A
    /// stream whose stores hold many registers (stochastic rounding's generator) keeps 2.
    const GROUPS_PER_ITERATION: usize = 2;
    /// Elements in the piece.
    fn len(&self) -> usize;
    /// The f32 values of the lane group at `i` (widened exactly).
    fn load<S: Simd>(&self, simd: S, i: usize) -> S::F32;
    /// Writes the updated lane group at `i`.
    fn store<S: Simd>(&mut self, simd: S, i: usize, v: S::F32);
    /// Writes the updated lane groups at `i` (`lo`) and `i + S::F32::WIDTH` (`hi`): the same
    /// bits as two calls of `store`.
    #[inline(always)]
    fn store_pair<S: Simd>(&mut self, simd: S, i: usize, lo: S::F32, hi: S::F32) {
        self.store(simd, i, lo);
        self.store(simd, i + <S::F32 as Lane>::WIDTH, hi);
    }
    /// The f32 value of element `i` (the scalar tail).
    fn load_one(&self, i: usize) -> f32;
    /// Writes the updated element `i` (the scalar tail): the same bits `store` writes for it.
    fn store_one(&mut self, i: usize, v: f32);
    /// Hints the cache to fetch element `i` (which is in bounds).
    fn prefetch(&self, i: usize);
    /// How many leading elements the loop runs as scalars before its first vector of `width`
    /// lanes: 0, or up to the first vector-aligned element of a streamed copy (streaming
    /// stores need aligned addresses). The scalars give the same bits as the vectors.
    #[inline(always)]
    fn vector_start(&self, width: usize) -> usize {
        let _ = width;
        0
    }
    /// Called once after the vectors: fences streamed (weakly ordered) stores before the pool
    /// hands the piece back to other threads.
    #[inline(always)]
    fn finish<S: Simd>(&mut self, simd: S) {
        let _ = simd;
    }
}

#[inline(always)]
fn prefetch<E>(s: &[E], i: usize) {
    #[cfg(target_arch = "x86_64")]
    if i < s.len() {
        // SAFETY: `_mm_prefetch` only hints the cache and never faults; `i` is in bounds.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(s.as_ptr().add(i) as *const i8);
        }
    }
}

fn check_len(what: &str, a: usize, b: usize) -> Result<()> {
    if a != b {
        return Err(Error::MixedPrecision(format!(
            "{what}: {a} parameters but {b} elements"
        )));
    }
    Ok(())
}

/// Mode 2: f32 master parameters, and a copy of each updated value rounded (to nearest even)
/// to `H`.
pub(crate) struct MasterCopy<'a, H> {
    params: &'a mut [f32],
    copy: &'a mut [H],
    /// Whether the copy is written with streaming (non-temporal) stores
    /// ([`crate::mixed::STREAM_COPY_MIN_ELEMS`]).
    stream: bool,
}

impl<'a, H: Storage> MasterCopy<'a, H> {
    /// The master parameters and their copy, as long.
    pub(crate) fn new(params: &'a mut [f32], copy: &'a mut [H]) -> Result<Self> {
        check_len("a parameter copy", params.len(), copy.len())?;
        Ok(MasterCopy {
            params,
            copy,
            stream: false,
        })
    }

    /// Writes the copy with streaming stores when `stream` is true: no read for ownership of
    /// its lines, no eviction of the lines the pass still reads. The same bits either way.
    pub(crate) fn streamed(mut self, stream: bool) -> Self {
        self.stream = stream;
        self
    }
}

impl<H: Storage> ParamStream for MasterCopy<'_, H> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.params.len()
    }
    #[inline(always)]
    fn load<S: Simd>(&self, _: S, i: usize) -> S::F32 {
        <S::F32 as Lane>::load(&self.params[i..i + <S::F32 as Lane>::WIDTH])
    }
    #[inline(always)]
    fn store<S: Simd>(&mut self, simd: S, i: usize, v: S::F32) {
        let w = <S::F32 as Lane>::WIDTH;
        v.store(&mut self.params[i..i + w]);
        if self.stream {
            H::stream(simd, v, &mut self.copy[i..i + w]);
        } else {
            H::store(simd, v, &mut self.copy[i..i + w]);
        }
    }
    #[inline(always)]
    fn load_one(&self, i: usize) -> f32 {
        self.params[i]
    }
    #[inline(always)]
    fn store_one(&mut self, i: usize, v: f32) {
        self.params[i] = v;
        self.copy[i] = H::from_f32(v);
    }
    #[inline(always)]
    fn prefetch(&self, i: usize) {
        prefetch(self.params, i);
        // A streamed copy's lines must not be brought into the cache.
        if !self.stream {
            prefetch(self.copy, i);
        }
    }
    #[inline(always)]
    fn vector_start(&self, width: usize) -> usize {
        if self.stream {
            let n = self.copy.len();
            self.copy
                .as_ptr()
                .align_offset(width * std::mem::size_of::<H>())
                .min(n)
        } else {
            0
        }
    }
    #[inline(always)]
    fn finish<S: Simd>(&mut self, simd: S) {
        if self.stream {
            simd.store_fence();
        }
    }
}

/// Mode 1: parameters stored in `P`, rounded to nearest even after each update (torch's
/// fused step on bf16 / f16 parameters).
pub(crate) struct Nearest<'a, P> {
    params: &'a mut [P],
}

impl<'a, P: Storage> Nearest<'a, P> {
    /// The parameters.
    pub(crate) fn new(params: &'a mut [P]) -> Self {
        Nearest { params }
    }
}

impl<P: Storage> ParamStream for Nearest<'_, P> {
    const GROUPS_PER_ITERATION: usize = 4;
    #[inline(always)]
    fn len(&self) -> usize {
        self.params.len()
    }
    #[inline(always)]
    fn load<S: Simd>(&self, simd: S, i: usize) -> S::F32 {
        P::load(simd, &self.params[i..i + <S::F32 as Lane>::WIDTH])
    }
    #[inline(always)]
    fn store<S: Simd>(&mut self, simd: S, i: usize, v: S::F32) {
        P::store(simd, v, &mut self.params[i..i + <S::F32 as Lane>::WIDTH]);
    }
    #[inline(always)]
    fn store_pair<S: Simd>(&mut self, simd: S, i: usize, lo: S::F32, hi: S::F32) {
        P::store_pair(
            simd,
            lo,
            hi,
            &mut self.params[i..i + 2 * <S::F32 as Lane>::WIDTH],
        );
    }
    #[inline(always)]
    fn load_one(&self, i: usize) -> f32 {
        self.params[i].to_f32()
    }
    #[inline(always)]
    fn store_one(&mut self, i: usize, v: f32) {
        self.params[i] = P::from_f32(v);
    }
    #[inline(always)]
    fn prefetch(&self, i: usize) {
        prefetch(self.params, i);
    }
}

/// Mode 3: bf16 parameters, rounded stochastically with the counter-based bits of
/// [`stochastic_bits`] (see [`ParamRounding::Stochastic`]).
pub(crate) struct Stochastic<'a> {
    params: &'a mut [bf16],
    key: ArsKey,
    /// Arena position of the piece's first element.
    base: u64,
    /// The last block the scalar path computed, with its counter: the head and tail elements
    /// of a piece share at most three blocks.
    last_block: Option<(u64, [u16; 8])>,
}

impl<'a> Stochastic<'a> {
    /// The parameters of a piece starting at arena element `base`, rounded with the bits of
    /// step `step` of a run seeded `seed`.
    pub(crate) fn new(params: &'a mut [bf16], seed: u64, step: u64, base: u64) -> Self {
        Stochastic {
            params,
            key: step_key(seed, step),
            base,
            last_block: None,
        }
    }

    /// The random bits of arena element `at` (the scalar path).
    #[inline(always)]
    fn bits(&mut self, at: u64) -> u32 {
        let counter = at >> 3;
        let words = match self.last_block {
            Some((c, words)) if c == counter => words,
            _ => {
                let words = self.key.block(counter);
                self.last_block = Some((counter, words));
                words
            }
        };
        words[(at & 7) as usize] as u32
    }

    /// The lane group `v` at piece position `i`, element by element, with the blocks from
    /// the token (no call inside the lane loop, whose vector registers a call would spill).
    #[inline(always)]
    fn store_scalars<S: Simd>(&mut self, simd: S, i: usize, v: S::F32) {
        let w = <S::F32 as Lane>::WIDTH;
        let mut lanes = [0.0f32; MAX_WIDTH];
        v.store(&mut lanes[..w]);
        for (k, &x) in lanes[..w].iter().enumerate() {
            let at = self.base + (i + k) as u64;
            let r = simd.ars_block(&self.key, at >> 3)[(at & 7) as usize];
            self.params[i + k] = bf16::from_bits(bf16_bits_stochastic(x, r as u32));
        }
    }

    /// The counter of the block that starts at piece position `i`, if one does: the vector
    /// stores need their groups on whole blocks (`vector_start` puts every group there).
    #[inline(always)]
    fn block_at(&self, i: usize) -> Option<u64> {
        let at = self.base + i as u64;
        (at & 7 == 0).then_some(at >> 3)
    }
}

/// The widest f32 lane group of any level (AVX-512's sixteen).
const MAX_WIDTH: usize = 16;

impl ParamStream for Stochastic<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.params.len()
    }
    #[inline(always)]
    fn load<S: Simd>(&self, simd: S, i: usize) -> S::F32 {
        bf16::load(simd, &self.params[i..i + <S::F32 as Lane>::WIDTH])
    }
    #[inline(always)]
    fn store<S: Simd>(&mut self, simd: S, i: usize, v: S::F32) {
        let w = <S::F32 as Lane>::WIDTH;
        match self.block_at(i) {
            Some(block) => {
                let out = &mut bits_mut(&mut self.params[i..i + w])[..w];
                simd.store_bf16_stochastic(v, &self.key, block, out);
            }
            None => self.store_scalars(simd, i, v),
        }
    }
    /// Both groups' random bits from one run of the generator (the lane loop's usual store).
    #[inline(always)]
    fn store_pair<S: Simd>(&mut self, simd: S, i: usize, lo: S::F32, hi: S::F32) {
        let w = <S::F32 as Lane>::WIDTH;
        match self.block_at(i) {
            Some(block) => {
                let out = &mut bits_mut(&mut self.params[i..i + 2 * w])[..2 * w];
                simd.store_bf16_stochastic_pair(lo, hi, &self.key, block, out);
            }
            None => {
                self.store(simd, i, lo);
                self.store(simd, i + w, hi);
            }
        }
    }
    /// Scalars first up to the piece's first multiple of eight in the arena, so that every
    /// lane group covers whole blocks of the generator (eight elements each).
    #[inline(always)]
    fn vector_start(&self, width: usize) -> usize {
        let _ = width;
        (self.base.wrapping_neg() & 7) as usize
    }
    #[inline(always)]
    fn load_one(&self, i: usize) -> f32 {
        self.params[i].to_f32()
    }
    #[inline(always)]
    fn store_one(&mut self, i: usize, v: f32) {
        let r = self.bits(self.base + i as u64);
        self.params[i] = bf16::from_bits(bf16_bits_stochastic(v, r));
    }
    #[inline(always)]
    fn prefetch(&self, i: usize) {
        prefetch(self.params, i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::{SimdLevel, WithSimd};

    /// Rounds `values` as the lane loop's vector body does (pairs of lane groups from
    /// `vector_start`, then a group alone), the rest element by element.
    struct RoundAll<'a> {
        values: &'a [f32],
        out: &'a mut [bf16],
        seed: u64,
        step: u64,
        base: u64,
        /// Start the vectors at `vector_start` (as the lane loop does), or at once, so that
        /// groups off a block boundary take the stores' fallback.
        aligned: bool,
    }

    impl WithSimd for RoundAll<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: Simd>(self, simd: S) {
            let w = <S::F32 as Lane>::WIDTH;
            let n = self.values.len();
            let mut stream = Stochastic::new(self.out, self.seed, self.step, self.base);
            let head = if self.aligned {
                stream.vector_start(w).min(n)
            } else {
                0
            };
            for i in 0..head {
                stream.store_one(i, self.values[i]);
            }
            let mut i = head;
            while i + 2 * w <= n {
                let lo = <S::F32 as Lane>::load(&self.values[i..]);
                let hi = <S::F32 as Lane>::load(&self.values[i + w..]);
                stream.store_pair(simd, i, lo, hi);
                i += 2 * w;
            }
            while i + w <= n {
                stream.store(simd, i, <S::F32 as Lane>::load(&self.values[i..]));
                i += w;
            }
            for j in i..n {
                stream.store_one(j, self.values[j]);
            }
        }
    }

    /// Every level's vector store gives each element the bits of [`stochastic_bits`], for
    /// pieces starting anywhere in a block, near the end of the counters, and with groups off
    /// a block boundary.
    #[test]
    fn vector_stochastic_store_matches_the_documented_bits() {
        let values: Vec<f32> = (0..219)
            .map(|k| match k % 7 {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => -1e-40,
                _ => (k as f32 * 0.377).sin() * 1.0e3,
            })
            .collect();
        for base in [0u64, 1, 2, 7, 8, 17, (1u64 << 35) - 70, u64::MAX - 500] {
            for (level, aligned) in SimdLevel::ALL
                .into_iter()
                .filter(|l| l.is_available())
                .flat_map(|l| [(l, true), (l, false)])
            {
                let mut out = vec![bf16::ZERO; values.len()];
                level.dispatch_half(RoundAll {
                    values: &values,
                    out: &mut out,
                    seed: 7,
                    step: 11,
                    base,
                    aligned,
                });
                for (k, (&x, o)) in values.iter().zip(&out).enumerate() {
                    let want = bf16_stochastic_round(x, stochastic_bits(7, 11, base + k as u64));
                    assert_eq!(
                        o.to_bits(),
                        want.to_bits(),
                        "{level:?} base {base} element {k} (aligned: {aligned})"
                    );
                }
            }
        }
    }
}
