//! The x86-64 tokens and their lanes: AVX2 ([`Avx2`]: [`F32x8`], [`F64x4`]) and AVX-512F
//! ([`Avx512`], and [`Avx512Bf16`] with the BF16 conversion instruction: [`F32x16`],
//! [`F64x8`]), and their bf16/f16 conversions.
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

use super::{ArsKey, Simd, WithSimd};
use crate::float::Lane;

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

/// Proof that the CPU has AVX2.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx2(());

impl Avx2 {
    /// The token, if the CPU has AVX2, F16C, FMA and AES-NI (every AVX2 CPU made has all
    /// three; the mixed-precision passes use F16C for f16, the torch-order bf16 kernels FMA,
    /// and stochastic rounding's generator AES-NI).
    #[inline(always)]
    pub(crate) fn new() -> Option<Self> {
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("aes")
        {
            // SAFETY: just checked.
            Some(unsafe { Self::new_unchecked() })
        } else {
            None
        }
    }

    /// The token, unchecked.
    ///
    /// # Safety
    /// The CPU must support AVX2, F16C, FMA and AES-NI.
    #[inline(always)]
    pub(crate) unsafe fn new_unchecked() -> Self {
        Avx2(())
    }
}

/// Proof that the CPU has AVX-512F and AVX-512BW (and AVX2, F16C, FMA, AES-NI).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx512(());

impl Avx512 {
    /// The token, if the CPU has AVX-512F, AVX-512BW and [`Avx2`]'s features (every AVX-512
    /// CPU but the Xeon Phi has BW; stochastic rounding uses its 16-bit permutes and masks).
    #[inline(always)]
    pub(crate) fn new() -> Option<Self> {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && Avx2::new().is_some()
        {
            // SAFETY: just checked.
            Some(unsafe { Self::new_unchecked() })
        } else {
            None
        }
    }

    /// The token, unchecked.
    ///
    /// # Safety
    /// The CPU must support AVX-512F, AVX-512BW, AVX2, F16C, FMA and AES-NI.
    #[inline(always)]
    pub(crate) unsafe fn new_unchecked() -> Self {
        Avx512(())
    }
}

/// Proof that the CPU has AVX-512 BF16, AVX-512DQ and VAES besides [`Avx512`]'s features: its
/// lanes, with `vcvtneps2bf16` for rounding to bf16 (and DQ's `vfpclassps` to find the lanes it
/// would round differently), and 512-bit AES rounds for stochastic rounding's generator
/// (Sapphire Rapids and Zen 4 have all three; Cooper Lake, with BF16 but no VAES, runs
/// [`Avx512`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx512Bf16(());

impl Avx512Bf16 {
    /// The token, if the CPU has AVX-512 BF16, AVX-512DQ, VAES and [`Avx512`]'s features.
    #[inline(always)]
    pub(crate) fn new() -> Option<Self> {
        if Avx512::new().is_some()
            && is_x86_feature_detected!("avx512bf16")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("vaes")
        {
            // SAFETY: just checked.
            Some(unsafe { Self::new_unchecked() })
        } else {
            None
        }
    }

    /// The token, unchecked.
    ///
    /// # Safety
    /// The CPU must support AVX-512 BF16, AVX-512DQ, VAES, AVX-512F, AVX-512BW, AVX2, F16C,
    /// FMA and AES-NI.
    #[inline(always)]
    pub(crate) unsafe fn new_unchecked() -> Self {
        Avx512Bf16(())
    }
}

/// `x`, or a zero of its sign where a lane is subnormal and the thread reads subnormals as zero
/// (MXCSR.DAZ, set inside a step under `Subnormals::Flush`): `minss(+inf, x)`, which the
/// hardware evaluates under the thread's mode and the compiler cannot fold (x86's `min` returns
/// its second operand when either is NaN, so every other value, NaN included, comes back bit
/// for bit). The integer bf16 roundings below read their input through it, so they give what
/// `vcvtneps2bf16` gives in both modes (see [`Avx512Bf16::bf16_bits`]).
#[inline(always)]
pub(crate) fn as_read_f32(x: f32) -> f32 {
    // SAFETY: SSE is part of x86-64.
    unsafe { _mm_cvtss_f32(_mm_min_ss(_mm_set_ss(f32::INFINITY), _mm_set_ss(x))) }
}

/// [`as_read_f32`] on eight lanes.
#[inline(always)]
fn as_read_256(v: __m256) -> __m256 {
    avx!(_mm256_min_ps(_mm256_set1_ps(f32::INFINITY), v))
}

/// [`as_read_f32`] on sixteen lanes.
#[inline(always)]
fn as_read_512(v: __m512) -> __m512 {
    avx!(_mm512_min_ps(_mm512_set1_ps(f32::INFINITY), v))
}

/// bf16 rounding of eight f32 lanes with integer AVX2 arithmetic (torch's `cvtfp32_bf16`):
/// `(bits + 0x7FFF + lsb) >> 16`, NaN replaced by `0x7FC0`, of the lanes as the thread reads
/// them ([`as_read_256`]).
#[inline(always)]
fn bf16_round_avx2(v: __m256) -> __m128i {
    avx!({
        let v = as_read_256(v);
        let b = _mm256_castps_si256(v);
        let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
        let bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
        let r = _mm256_srli_epi32::<16>(_mm256_add_epi32(b, bias));
        let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        let r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
        // Every lane is <= 0xFFFF, so the saturating pack is exact; it packs within 128-bit
        // halves, and the permute gathers the two halves' low quadwords.
        let packed = _mm256_packus_epi32(r, r);
        _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b1000>(packed))
    })
}

/// bf16 rounding of sixteen f32 lanes with integer AVX-512F arithmetic, as
/// [`bf16_round_avx2`].
#[inline(always)]
fn bf16_round_avx512(v: __m512) -> __m256i {
    avx!({
        let v = as_read_512(v);
        let b = _mm512_castps_si512(v);
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
        let bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF));
        let r = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, bias));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        let r = _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7FC0));
        _mm512_cvtepi32_epi16(r)
    })
}

/// Round key `r` of `key` ([`ArsKey::round_key`]) in a register.
#[inline(always)]
fn ars_round_key(key: &ArsKey, r: usize) -> __m128i {
    // SAFETY: a round key is 16 readable bytes; unaligned loads are fine (SSE2).
    unsafe { _mm_loadu_si128(key.round_key(r).as_ptr() as *const __m128i) }
}

/// [`ArsKey::block`]`(counter)` with AES-NI: the eight words in one register.
#[inline(always)]
fn ars_128(key: &ArsKey, counter: u64) -> __m128i {
    avx!({
        let mut x = _mm_xor_si128(_mm_set1_epi64x(counter as i64), ars_round_key(key, 0));
        for r in 1..ArsKey::ROUNDS {
            x = _mm_aesenc_si128(x, ars_round_key(key, r));
        }
        _mm_aesenclast_si128(x, ars_round_key(key, ArsKey::ROUNDS))
    })
}

/// The blocks of counters `counter..counter + 4` ([`ars_128`]), in order, in one register.
#[inline(always)]
fn ars_512_aes_ni(key: &ArsKey, counter: u64) -> __m512i {
    avx!({
        let x = _mm512_castsi128_si512(ars_128(key, counter));
        let x = _mm512_inserti32x4::<1>(x, ars_128(key, counter.wrapping_add(1)));
        let x = _mm512_inserti32x4::<2>(x, ars_128(key, counter.wrapping_add(2)));
        _mm512_inserti32x4::<3>(x, ars_128(key, counter.wrapping_add(3)))
    })
}

/// [`ars_512_aes_ni`] with VAES: each round is one instruction on all four blocks.
#[inline(always)]
fn ars_512_vaes(key: &ArsKey, counter: u64) -> __m512i {
    avx!({
        // Each block's counter in both of its 64-bit halves.
        let counters = _mm512_add_epi64(
            _mm512_set1_epi64(counter as i64),
            _mm512_setr_epi64(0, 0, 1, 1, 2, 2, 3, 3),
        );
        let mut x = _mm512_xor_si512(counters, _mm512_broadcast_i32x4(ars_round_key(key, 0)));
        for r in 1..ArsKey::ROUNDS {
            x = _mm512_aesenc_epi128(x, _mm512_broadcast_i32x4(ars_round_key(key, r)));
        }
        let last = _mm512_broadcast_i32x4(ars_round_key(key, ArsKey::ROUNDS));
        _mm512_aesenclast_epi128(x, last)
    })
}

/// Two groups of sixteen f32 lanes rounded stochastically to 32 bf16 values, `lo` first, with
/// the 32 random words of `r` in order: the sums of [`bf16_stochastic_bits_avx512`], whose
/// high halves one word permute gathers, and NaN lanes (if any) set to `0x7FC0`.
#[inline(always)]
fn bf16_stochastic_pair_avx512(lo: __m512, hi: __m512, r: __m512i) -> __m512i {
    avx!({
        let r_lo = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(r));
        let r_hi = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64::<1>(r));
        let sum_lo = _mm512_add_epi32(_mm512_castps_si512(lo), r_lo);
        let sum_hi = _mm512_add_epi32(_mm512_castps_si512(hi), r_hi);
        // Word 2j + 1 of the concatenation `sum_hi:sum_lo` (indices 32.. select `sum_hi`).
        let odd_words = _mm512_setr_epi32(
            0x0003_0001,
            0x0007_0005,
            0x000B_0009,
            0x000F_000D,
            0x0013_0011,
            0x0017_0015,
            0x001B_0019,
            0x001F_001D,
            0x0023_0021,
            0x0027_0025,
            0x002B_0029,
            0x002F_002D,
            0x0033_0031,
            0x0037_0035,
            0x003B_0039,
            0x003F_003D,
        );
        let rounded = _mm512_permutex2var_epi16(sum_lo, odd_words, sum_hi);
        // One compare finds whether either group has a NaN (rare): lane j is unordered when
        // `lo_j` or `hi_j` is a NaN.
        if _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(lo, hi) == 0 {
            rounded
        } else {
            let nan = _mm512_kunpackw(
                _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(hi, hi) as u32,
                _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(lo, lo) as u32,
            );
            _mm512_mask_mov_epi16(rounded, nan, _mm512_set1_epi16(0x7FC0))
        }
    })
}

/// Eight f32 lanes rounded to bf16 bits stochastically with the eight random words of `h`, in
/// order (x86 is little-endian: widening the words gives word `j` to lane `j`).
#[inline(always)]
fn bf16_stochastic_bits_avx2(v: __m256, h: __m128i) -> __m128i {
    avx!({
        let r = _mm256_cvtepu16_epi32(h);
        let b = _mm256_srli_epi32::<16>(_mm256_add_epi32(_mm256_castps_si256(v), r));
        let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        let b = _mm256_blendv_epi8(b, _mm256_set1_epi32(0x7FC0), nan);
        let packed = _mm256_packus_epi32(b, b);
        _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b1000>(packed))
    })
}

/// Sixteen f32 lanes rounded to bf16 bits stochastically with the sixteen random words of `h`.
#[inline(always)]
fn bf16_stochastic_bits_avx512(v: __m512, h: __m256i) -> __m256i {
    avx!({
        let r = _mm512_cvtepu16_epi32(h);
        let b = _mm512_srli_epi32::<16>(_mm512_add_epi32(_mm512_castps_si512(v), r));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, b, _mm512_set1_epi32(0x7FC0)))
    })
}

/// Writes `r` to the first 16 bytes of `s`: non-temporal when `stream` and `s` is 16-byte
/// aligned (as `movntdq` requires), else an ordinary store.
#[inline(always)]
fn put_128(r: __m128i, s: &mut [u16], stream: bool) {
    let ptr = s[..8].as_mut_ptr() as *mut __m128i;
    if stream && ptr.is_aligned() {
        // SAFETY: `s` holds eight writable elements (16 bytes), aligned to 16 (checked).
        unsafe { _mm_stream_si128(ptr, r) }
    } else {
        // SAFETY: `s` holds eight writable elements (16 bytes); unaligned stores are fine.
        unsafe { _mm_storeu_si128(ptr, r) }
    }
}

/// Writes `r` to the first 32 bytes of `s`: non-temporal when `stream` and `s` is 32-byte
/// aligned (as `vmovntdq ymm` requires), else an ordinary store.
#[inline(always)]
fn put_256(r: __m256i, s: &mut [u16], stream: bool) {
    let ptr = s[..16].as_mut_ptr() as *mut __m256i;
    if stream && ptr.is_aligned() {
        // SAFETY: `s` holds sixteen writable elements (32 bytes), aligned to 32 (checked);
        // AVX is available (every token that calls this has it, see `avx!`).
        unsafe { _mm256_stream_si256(ptr, r) }
    } else {
        // SAFETY: `s` holds sixteen writable elements (32 bytes); AVX is available.
        unsafe { _mm256_storeu_si256(ptr, r) }
    }
}

/// The AVX2 half-precision conversions (F16C for f16), shared by the tokens that have them.
macro_rules! avx2_half {
    () => {
        #[inline(always)]
        fn load_bf16(self, s: &[u16]) -> F32x8 {
            let s = &s[..8];
            // SAFETY: `s` holds eight elements (16 bytes); unaligned loads are fine.
            let h = avx!(_mm_loadu_si128(s.as_ptr() as *const __m128i));
            F32x8(avx!(_mm256_castsi256_ps(_mm256_slli_epi32::<16>(
                _mm256_cvtepu16_epi32(h)
            ))))
        }
        #[inline(always)]
        fn store_bf16(self, v: F32x8, s: &mut [u16]) {
            put_128(bf16_round_avx2(v.0), s, false)
        }
        #[inline(always)]
        fn stream_bf16(self, v: F32x8, s: &mut [u16]) {
            put_128(bf16_round_avx2(v.0), s, true)
        }
        #[inline(always)]
        fn ars_block(self, key: &ArsKey, counter: u64) -> [u16; 8] {
            // SAFETY: `__m128i` and `[u16; 8]` are both 16 bytes of plain data.
            unsafe { std::mem::transmute::<__m128i, [u16; 8]>(ars_128(key, counter)) }
        }
        #[inline(always)]
        fn store_bf16_stochastic(self, v: F32x8, key: &ArsKey, block: u64, s: &mut [u16]) {
            put_128(
                bf16_stochastic_bits_avx2(v.0, ars_128(key, block)),
                s,
                false,
            )
        }
        #[inline(always)]
        fn load_f16(self, s: &[u16]) -> F32x8 {
            let s = &s[..8];
            // SAFETY: `s` holds eight elements (16 bytes); the token proves F16C.
            F32x8(avx!(_mm256_cvtph_ps(_mm_loadu_si128(
                s.as_ptr() as *const __m128i
            ))))
        }
        #[inline(always)]
        fn store_f16(self, v: F32x8, s: &mut [u16]) {
            put_128(
                avx!(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v.0)),
                s,
                false,
            )
        }
        #[inline(always)]
        fn stream_f16(self, v: F32x8, s: &mut [u16]) {
            put_128(
                avx!(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v.0)),
                s,
                true,
            )
        }
        #[inline(always)]
        fn store_fence(self) {
            // SAFETY: `sfence` (SSE) only orders stores.
            unsafe { _mm_sfence() }
        }
    };
}

/// The AVX-512 half-precision loads and the f16 store, shared by the two AVX-512 tokens.
macro_rules! avx512_half_common {
    () => {
        #[inline(always)]
        fn load_bf16(self, s: &[u16]) -> F32x16 {
            let s = &s[..16];
            // SAFETY: `s` holds sixteen elements (32 bytes); unaligned loads are fine.
            let h = avx!(_mm256_loadu_si256(s.as_ptr() as *const __m256i));
            F32x16(avx!(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(
                _mm512_cvtepu16_epi32(h)
            ))))
        }
        #[inline(always)]
        fn load_f16(self, s: &[u16]) -> F32x16 {
            let s = &s[..16];
            // SAFETY: `s` holds sixteen elements (32 bytes); AVX-512F has `vcvtph2ps zmm`.
            F32x16(avx!(_mm512_cvtph_ps(_mm256_loadu_si256(
                s.as_ptr() as *const __m256i
            ))))
        }
        #[inline(always)]
        fn store_f16(self, v: F32x16, s: &mut [u16]) {
            put_256(
                avx!(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v.0)),
                s,
                false,
            )
        }
        #[inline(always)]
        fn stream_f16(self, v: F32x16, s: &mut [u16]) {
            put_256(
                avx!(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v.0)),
                s,
                true,
            )
        }
        #[inline(always)]
        fn stream_bf16(self, v: F32x16, s: &mut [u16]) {
            put_256(self.bf16_bits(v), s, true)
        }
        #[inline(always)]
        fn store_bf16(self, v: F32x16, s: &mut [u16]) {
            put_256(self.bf16_bits(v), s, false)
        }
        #[inline(always)]
        fn ars_block(self, key: &ArsKey, counter: u64) -> [u16; 8] {
            // SAFETY: `__m128i` and `[u16; 8]` are both 16 bytes of plain data.
            unsafe { std::mem::transmute::<__m128i, [u16; 8]>(ars_128(key, counter)) }
        }
        #[inline(always)]
        fn store_bf16_stochastic(self, v: F32x16, key: &ArsKey, block: u64, s: &mut [u16]) {
            // Four blocks for two: a lone group is at most one per piece.
            let r = self.ars_512(key, block);
            put_256(
                bf16_stochastic_bits_avx512(v.0, avx!(_mm512_castsi512_si256(r))),
                s,
                false,
            )
        }
        #[inline(always)]
        fn store_bf16_stochastic_pair(
            self,
            lo: F32x16,
            hi: F32x16,
            key: &ArsKey,
            block: u64,
            s: &mut [u16],
        ) {
            let s = &mut s[..32];
            let r = bf16_stochastic_pair_avx512(lo.0, hi.0, self.ars_512(key, block));
            // SAFETY: `s` holds 32 writable elements (64 bytes); unaligned stores are fine,
            // and AVX-512F is available (see `avx!`).
            unsafe { _mm512_storeu_si512(s.as_mut_ptr() as *mut __m512i, r) }
        }
        #[inline(always)]
        fn store_fence(self) {
            // SAFETY: `sfence` (SSE) only orders stores.
            unsafe { _mm_sfence() }
        }
    };
}

impl Simd for Avx2 {
    type F32 = F32x8;
    type F64 = F64x4;
    type F32x8 = F32x8;
    type F64x4 = F64x4;
    #[inline(always)]
    fn vectorize<K: WithSimd>(self, kernel: K) -> K::Output {
        #[target_feature(enable = "avx2,f16c,fma,aes")]
        fn imp<K: WithSimd>(simd: Avx2, kernel: K) -> K::Output {
            kernel.with_simd(simd)
        }
        // SAFETY: `self` is an `Avx2` token, which exists only if the CPU has AVX2, F16C, FMA
        // and AES-NI.
        unsafe { imp(self, kernel) }
    }
    avx2_half!();
}

impl Simd for Avx512 {
    type F32 = F32x16;
    type F64 = F64x8;
    type F32x8 = F32x8;
    type F64x4 = F64x4;
    #[inline(always)]
    fn vectorize<K: WithSimd>(self, kernel: K) -> K::Output {
        #[target_feature(enable = "avx2,f16c,fma,aes,avx512f,avx512bw")]
        fn imp<K: WithSimd>(simd: Avx512, kernel: K) -> K::Output {
            kernel.with_simd(simd)
        }
        // SAFETY: `self` is an `Avx512` token, which exists only if the CPU has AVX-512F,
        // AVX-512BW, AVX2, F16C, FMA and AES-NI.
        unsafe { imp(self, kernel) }
    }
    avx512_half_common!();
}

impl Avx512 {
    /// Sixteen lanes rounded to bf16 bits (integer arithmetic).
    #[inline(always)]
    fn bf16_bits(self, v: F32x16) -> __m256i {
        bf16_round_avx512(v.0)
    }

    /// The ARS-5 blocks of counters `counter..counter + 4`, with 128-bit AES-NI.
    #[inline(always)]
    fn ars_512(self, key: &ArsKey, counter: u64) -> __m512i {
        ars_512_aes_ni(key, counter)
    }
}

impl Simd for Avx512Bf16 {
    type F32 = F32x16;
    type F64 = F64x8;
    type F32x8 = F32x8;
    type F64x4 = F64x4;
    #[inline(always)]
    fn vectorize<K: WithSimd>(self, kernel: K) -> K::Output {
        #[target_feature(enable = "avx2,f16c,fma,aes,avx512f,avx512bw,avx512dq,avx512bf16,vaes")]
        fn imp<K: WithSimd>(simd: Avx512Bf16, kernel: K) -> K::Output {
            kernel.with_simd(simd)
        }
        // SAFETY: `self` is an `Avx512Bf16` token, which exists only if the CPU has
        // AVX-512F, AVX-512BW, AVX-512DQ, AVX-512 BF16, VAES, AVX2, F16C, FMA and AES-NI.
        unsafe { imp(self, kernel) }
    }
    avx512_half_common!();
    #[inline(always)]
    fn store_bf16_pair(self, lo: F32x16, hi: F32x16, s: &mut [u16]) {
        let s = &mut s[..32];
        // One `vcvtne2ps2bf16` rounds both groups (the low half of its result is its second
        // operand's), unless either holds a lane it rounds differently from the integer path.
        if Self::special_lanes(lo.0) | Self::special_lanes(hi.0) == 0 {
            // SAFETY: `__m512bh` and `__m512i` are both 512 bits of plain data.
            let r = avx!(unsafe {
                std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi.0, lo.0))
            });
            // SAFETY: `s` holds 32 writable elements (64 bytes); unaligned stores are fine,
            // and AVX-512F is available (see `avx!`).
            unsafe { _mm512_storeu_si512(s.as_mut_ptr() as *mut __m512i, r) }
        } else {
            put_256(bf16_round_avx512(lo.0), &mut s[..16], false);
            put_256(bf16_round_avx512(hi.0), &mut s[16..], false);
        }
    }
}

impl Avx512Bf16 {
    /// The ARS-5 blocks of counters `counter..counter + 4`, with VAES.
    #[inline(always)]
    fn ars_512(self, key: &ArsKey, counter: u64) -> __m512i {
        ars_512_vaes(key, counter)
    }

    /// The lanes of `v` that `vcvtneps2bf16` rounds differently from the integer path
    /// (see [`Avx512Bf16::bf16_bits`]).
    #[inline(always)]
    fn special_lanes(v: __m512) -> __mmask16 {
        // `vfpclassps` with categories QNaN (0x01), denormal (0x20) and SNaN (0x80): one
        // instruction. It classifies its operand as the thread reads it: under MXCSR.DAZ a
        // subnormal is a zero to it as to `vcvtneps2bf16` and to the integer path's
        // `as_read_512`, so only NaN lanes are special then.
        avx!(_mm512_fpclass_ps_mask::<0xA1>(v))
    }

    /// Sixteen lanes rounded to bf16 bits, with `vcvtneps2bf16` where that gives the same
    /// bits as the integer path.
    #[inline(always)]
    fn bf16_bits(self, v: F32x16) -> __m256i {
        // `vcvtneps2bf16` rounds to nearest even like the integer path, but always reads
        // subnormal inputs as zero (the integer path does so only under DAZ, as the thread's
        // arithmetic does) and keeps a NaN's sign and payload (quietened). Lanes holding
        // either are rare (none inside a flushed step but NaN), so a vector with any of them
        // takes the integer path whole; the others keep the one-instruction conversion.
        if Self::special_lanes(v.0) == 0 {
            // SAFETY: `__m256bh` and `__m256i` are both 256 bits of plain data.
            avx!(unsafe { std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v.0)) })
        } else {
            bf16_round_avx512(v.0)
        }
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
        max = $max:ident, min = $min:ident, cmp = $cmp:ident, blendv = $blendv:ident,
        fmadd = $fmadd:ident
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
            #[inline(always)]
            fn fma(self, a: Self, b: Self) -> Self {
                // FMA: every token that reaches these lanes checked the CPU for it.
                $name(avx!($fmadd(self.0, a.0, b.0)))
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
    blendv = _mm256_blendv_ps,
    fmadd = _mm256_fmadd_ps
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
    blendv = _mm256_blendv_pd,
    fmadd = _mm256_fmadd_pd
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
        max = $max:ident, min = $min:ident, cmp = $cmp:ident, blend = $blend:ident,
        fmadd = $fmadd:ident
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
            #[inline(always)]
            fn fma(self, a: Self, b: Self) -> Self {
                $name(avx!($fmadd(self.0, a.0, b.0)))
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
    blend = _mm512_mask_blend_ps,
    fmadd = _mm512_fmadd_ps
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
    blend = _mm512_mask_blend_pd,
    fmadd = _mm512_fmadd_pd
);
