//! How a fused mixed-precision pass keeps the parameters: f32 master weights with a rounded
//! copy (mode 2), or half-precision parameters rounded to nearest even (mode 1, torch's fused
//! bf16 step) or stochastically (mode 3, torchao's `bf16_stochastic_round`). One trait,
//! [`ParamStream`], that [`crate::kernels`]' single mixed lane loop reads and writes the
//! parameters through, so every mode runs every elementwise algorithm's op on the same lanes.

use half::bf16;

use super::sealed::Sealed;
use super::{bits_mut, Storage};
use crate::arch::{bf16_bits_stochastic, lowbias32, PairHash, Simd};
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
    /// this step are [`stochastic_bits`]`(seed, step, i)`: a counter-based hash, so the result
    /// is the same bits for any thread count, SIMD level and piece split. Pass a new `step`
    /// for every optimizer step (for example the global step count, saved with a checkpoint
    /// so that a resumed run rounds as the uninterrupted one would): the same `(seed, step)`
    /// twice reuses the same random bits.
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

/// The per-step key of stochastic rounding: two 32-bit words from `(seed, step)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SrKey {
    k0: u32,
    k1: u32,
}

impl SrKey {
    /// The key of step `step` of a run seeded `seed`: `splitmix64(seed ^ splitmix64(step))`,
    /// low and high words.
    pub(crate) const fn new(seed: u64, step: u64) -> Self {
        let k = splitmix64(seed ^ splitmix64(step));
        SrKey {
            k0: k as u32,
            k1: (k >> 32) as u32,
        }
    }

    /// The 16 random bits of arena element `index`: one half of its pair's 32-bit hash.
    #[inline(always)]
    pub(crate) fn bits(self, index: u64) -> u32 {
        let h = self.pair_bits(index >> 1);
        if index & 1 == 0 {
            h & 0xFFFF
        } else {
            h >> 16
        }
    }

    /// The 32 random bits of pair `pair` (arena elements `2·pair` and `2·pair + 1`).
    #[inline(always)]
    fn pair_bits(self, pair: u64) -> u32 {
        self.with_high_word((pair >> 32) as u32)
            .pair_bits_lo(pair as u32)
    }

    /// The key for pairs whose high 32 bits are `hi` (hashed into `k0`; `lowbias32(0) = 0`,
    /// so below 2^32 pairs the key is unchanged).
    #[inline(always)]
    fn with_high_word(self, hi: u32) -> Self {
        SrKey {
            k0: self.k0 ^ lowbias32(hi),
            k1: self.k1,
        }
    }

    /// The 32 random bits of the pair with low word `lo` (the high word is in the key).
    #[inline(always)]
    fn pair_bits_lo(self, lo: u32) -> u32 {
        self.pair_hash(lo).hash(0)
    }

    /// The hashes of the pairs from low word `lo` on, for a token's vector rounding.
    #[inline(always)]
    fn pair_hash(self, lo: u32) -> PairHash {
        PairHash {
            first: lo,
            k0: self.k0,
            k1: self.k1,
        }
    }
}

/// The 16 random bits stochastic rounding adds below the bf16 mantissa of arena element
/// `index` at step `step` of a run seeded `seed`:
///
/// ```text
/// k        = splitmix64(seed ^ splitmix64(step))         (SplitMix64, as SCHEMA.md's hashed)
/// k0, k1   = low and high 32 bits of k
/// pair     = index >> 1                                   (elements 2j and 2j + 1 share a hash)
/// h        = lowbias32(pair_lo ^ k0 ^ lowbias32(pair_hi)) ^ k1
/// bits     = h & 0xFFFF for an even index, h >> 16 for an odd one
/// ```
///
/// with `lowbias32(x)`: `x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b;
/// x ^= x >> 16` (wrapping `u32`), `pair_lo`/`pair_hi` the low and high 32 bits of the pair's
/// number. One round of a hash with near-ideal avalanche feeds two elements (both halves of
/// its output are well mixed), so the vector loop hashes half as many lanes, a quarter of the
/// multiplies of the two rounds per element this generator had before (which had taken a
/// quarter of mode 3's step on the AVX-512 Xeon of BENCHMARKS.md). Pairs `2^32` apart may
/// share bits, harmless for rounding. A pure function of its arguments: which thread or
/// SIMD lane rounds an element does not matter.
pub fn stochastic_bits(seed: u64, step: u64, index: u64) -> u16 {
    SrKey::new(seed, step).bits(index) as u16
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
    key: SrKey,
    /// Arena position of the piece's first element.
    base: u64,
}

impl<'a> Stochastic<'a> {
    /// The parameters of a piece starting at arena element `base`, rounded with the bits of
    /// step `step` of a run seeded `seed`.
    pub(crate) fn new(params: &'a mut [bf16], seed: u64, step: u64, base: u64) -> Self {
        Stochastic {
            params,
            key: SrKey::new(seed, step),
            base,
        }
    }

    /// The lane group `v` at piece position `i`, element by element with the scalar
    /// generator.
    #[inline(always)]
    fn store_scalars<V: Lane<Elem = f32>>(&mut self, i: usize, v: V) {
        let w = V::WIDTH;
        let mut lanes = [0.0f32; MAX_WIDTH];
        v.store(&mut lanes[..w]);
        let out = &mut bits_mut(&mut self.params[i..i + w])[..w];
        for (k, (o, &x)) in out.iter_mut().zip(&lanes[..w]).enumerate() {
            *o = bf16_bits_stochastic(x, self.key.bits(self.base + (i + k) as u64));
        }
    }

    /// The pair hash of the `pairs` pairs from piece position `i` when the token can compute
    /// it in integer vectors: `i` is on an even arena position (`vector_start` makes every
    /// lane group start one, so groups cover whole pairs) and the pairs share the high word
    /// of their numbers (cross no multiple of 2^32), which then folds into the key.
    /// Elsewhere each element takes the scalar generator, which gives the same bits.
    #[inline(always)]
    fn vector_hash(&self, i: usize, pairs: usize) -> Option<PairHash> {
        let at = self.base + i as u64;
        let pair = at >> 1;
        let first = pair as u32;
        (at & 1 == 0 && first.checked_add(pairs as u32 - 1).is_some()).then(|| {
            self.key
                .with_high_word((pair >> 32) as u32)
                .pair_hash(first)
        })
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
        match self.vector_hash(i, w / 2) {
            Some(hash) => {
                let mut hashes = [0u32; MAX_WIDTH];
                simd.pair_hashes(hash, &mut hashes);
                let out = &mut bits_mut(&mut self.params[i..i + w])[..w];
                simd.store_bf16_stochastic_hashed(v, &hashes[..w / 2], out);
            }
            None => self.store_scalars(i, v),
        }
    }
    /// One vector of pair hashes for both groups (the lane loop's usual store).
    #[inline(always)]
    fn store_pair<S: Simd>(&mut self, simd: S, i: usize, lo: S::F32, hi: S::F32) {
        let w = <S::F32 as Lane>::WIDTH;
        match self.vector_hash(i, w) {
            Some(hash) => {
                let out = &mut bits_mut(&mut self.params[i..i + 2 * w])[..2 * w];
                simd.store_bf16_stochastic_pair(lo, hi, hash, out);
            }
            None => {
                self.store(simd, i, lo);
                self.store(simd, i + w, hi);
            }
        }
    }
    /// One scalar first when the piece starts at an odd arena position, so that every lane
    /// group starts a pair of elements (the two share one hash).
    #[inline(always)]
    fn vector_start(&self, width: usize) -> usize {
        let _ = width;
        (self.base & 1) as usize
    }
    #[inline(always)]
    fn load_one(&self, i: usize) -> f32 {
        self.params[i].to_f32()
    }
    #[inline(always)]
    fn store_one(&mut self, i: usize, v: f32) {
        self.params[i] =
            bf16::from_bits(bf16_bits_stochastic(v, self.key.bits(self.base + i as u64)));
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
    }

    impl WithSimd for RoundAll<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: Simd>(self, simd: S) {
            let w = <S::F32 as Lane>::WIDTH;
            let n = self.values.len();
            let mut stream = Stochastic::new(self.out, self.seed, self.step, self.base);
            let head = stream.vector_start(w).min(n);
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
    /// even and odd bases and for groups whose pair numbers cross a multiple of 2^32.
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
        let crossing = (1u64 << 33) - 70;
        for base in [0u64, 1, 2, 17, crossing, crossing + 1, u64::MAX - 500] {
            for level in SimdLevel::ALL.into_iter().filter(|l| l.is_available()) {
                let mut out = vec![bf16::ZERO; values.len()];
                level.dispatch_half(RoundAll {
                    values: &values,
                    out: &mut out,
                    seed: 7,
                    step: 11,
                    base,
                });
                for (k, (&x, o)) in values.iter().zip(&out).enumerate() {
                    let want = bf16_stochastic_round(x, stochastic_bits(7, 11, base + k as u64));
                    assert_eq!(
                        o.to_bits(),
                        want.to_bits(),
                        "{level:?} base {base} element {k}"
                    );
                }
            }
        }
    }
}
