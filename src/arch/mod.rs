//! Run-time choice of instruction set, and the one dispatch every kernel, reduction and norm
//! goes through.
//!
//! `wide` picks its instructions when the crate is compiled, so a plain `cargo build --release`
//! on x86-64 gets SSE2 (four f32 lanes). Like PyTorch's CPU kernels, optarena checks the CPU at
//! run time instead: on x86-64 with AVX-512F the fused kernels run on sixteen-lane f32 /
//! eight-lane f64 vectors, with AVX2 on eight / four lanes (`x86_64.rs`), whatever the build
//! flags; elsewhere, or below a cap the caller sets, on `wide`'s portable lanes.
//!
//! # Layers
//! The dependency points one way: `kernels`, `clip` and `roofline` use this module, and this
//! module never names an algorithm.
//!
//! - A *token* (`Simd` implementor) is the proof that the CPU has an instruction set:
//!   `x86_64::Avx2::new()` (AVX2 + F16C + FMA + AES-NI), `x86_64::Avx512::new()` (those +
//!   AVX-512F + AVX-512BW) and `x86_64::Avx512Bf16::new()` (those + AVX-512 BF16, AVX-512DQ
//!   and VAES) return `None` unless run-time detection finds the features, and the only other
//!   way to get one is an `unsafe fn new_unchecked` whose caller promises it. (memchr's
//!   `arch/x86_64/avx2` searchers and pulp's `V3`/`V4` are built the same way.) Besides its
//!   lanes, a token converts its f32 lanes to and from bf16 and f16 storage
//!   ([`crate::mixed`], stochastic rounding's generator included); the AVX-512 BF16 token
//!   differs from the AVX-512 one only there, and only `SimdLevel::dispatch_half` (the
//!   mixed-precision kernels) uses it, so the f32/f64 kernels are not compiled for it.
//! - The token's associated types are the lane types ([`crate::Lane`] implementors) of that
//!   instruction set. They are private to `x86_64.rs` and reachable only through a token type,
//!   which is private to the crate, so no code outside the crate can name a lane type, let
//!   alone construct one, and inside the crate lanes are only named through the type parameter
//!   `S` of `WithSimd::with_simd` (see below). The compile-fail example below shows that
//!   the old path, `<f32 as Float>::Avx2`, is gone.
//! - A *kernel object* implements `WithSimd`: one generic body, written against
//!   `T::Wide<S>` (the widest lanes of `S` for element type `T`) or `T::Narrow<S>` (lanes of
//!   exactly [`crate::Float::LANES`] elements, for reductions whose summation order is fixed
//!   to that width). `SimdLevel::dispatch` picks the best token within its cap and calls
//!   `Simd::vectorize`, which enters a `#[target_feature]` function monomorphised with the
//!   kernel, so the whole kernel body is compiled (and inlined) for that instruction set.
//! - The level is a value, [`SimdLevel`], carried like [`crate::Parallelism`]: an
//!   [`crate::Optimizer`] holds one ([`crate::Optimizer::set_simd_level`]), passes it to its
//!   kernels in [`crate::KernelArgs::simd`] and to its clipping norm; L-BFGS holds one too.
//!   Its default, [`SimdLevel::Best`], is everything the CPU has. There is no process-wide
//!   setting for tests to race on.
//!
//! ```compile_fail
//! // The AVX2 lane type used to be reachable as an associated type of `Float`; safe code
//! // could then run AVX instructions on any CPU. No path to a lane type exists any more.
//! use optarena::{Float, Lane};
//! let x = <f32 as Float>::Avx2::splat(1.0);
//! ```
//!
//! ```compile_fail
//! // Nor can safe code outside the crate reach the tokens or the lanes behind them.
//! use optarena::Lane;
//! let x = optarena::arch::x86_64::F32x16::splat(1.0);
//! ```
//!
//! # Results do not depend on the instruction set
//! No kernel uses fused multiply-add (except the ones reproducing torch's fused bf16 step, with
//! [`crate::Lane::fma`], which rounds once at every level) or approximate reciprocals: each lane performs the same
//! correctly rounded IEEE operations, in the same order, as the scalar reference kernel. So
//! SSE2, AVX2 and AVX-512 (and NEON builds of `wide`) give bitwise the same parameters and
//! state, and the same as the reference; `tests/kernels.rs` checks this for every level this
//! CPU has. Reductions (L-BFGS dot products, clipping norms, Adafactor's norms) sum in lanes
//! of [`crate::Float::LANES`] elements at every level, so their association order, and their
//! result, is the same too. The price is a few percent of in-cache throughput that FMA would
//! buy; memory-bound sizes do not notice. (Against torch, whose vectorised kernels use FMA in
//! `add(alpha=...)` and `lerp`, results differ by a few ulp per step, well inside SCHEMA.md's
//! tolerances.)

#[cfg(target_arch = "x86_64")]
mod x86_64;

/// The widest instruction set the kernels may use: a cap, resolved against the CPU when a
/// kernel runs. Every level gives bitwise the same results; capping is for benchmarks and
/// tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum SimdLevel {
    /// `wide`'s lanes as compiled (SSE2 on a default x86-64 build).
    Portable,
    /// AVX2: eight-lane f32 / four-lane f64 vectors, when the CPU has AVX2 (with F16C, FMA
    /// and AES-NI, which every AVX2 CPU made has).
    Avx2,
    /// AVX-512: sixteen-lane f32 / eight-lane f64 vectors, when the CPU has AVX-512F and
    /// AVX-512BW (every AVX-512 CPU but the Xeon Phi).
    Avx512,
    /// AVX-512 plus the AVX-512 BF16, AVX-512DQ and VAES extensions (Sapphire Rapids, Zen 4):
    /// the f32 kernels are [`SimdLevel::Avx512`]'s; mixed-precision passes ([`crate::mixed`])
    /// round f32 to bf16 with `vcvtneps2bf16` instead of integer arithmetic (DQ's
    /// `vfpclassps` finds the lanes it would round differently), and stochastic rounding
    /// draws its bits with 512-bit AES rounds. Same bits either way.
    Avx512Bf16,
    /// The best the CPU has (the default).
    #[default]
    Best,
}

impl SimdLevel {
    /// The levels below [`SimdLevel::Best`], narrowest first.
    pub const ALL: [SimdLevel; 4] = [
        SimdLevel::Portable,
        SimdLevel::Avx2,
        SimdLevel::Avx512,
        SimdLevel::Avx512Bf16,
    ];

    /// The level kernels run at under this cap on this CPU: the best level the CPU has that
    /// is not above `self` (never [`SimdLevel::Best`]).
    pub fn resolve(self) -> SimdLevel {
        #[cfg(target_arch = "x86_64")]
        {
            if self >= SimdLevel::Avx512Bf16 && x86_64::Avx512Bf16::new().is_some() {
                return SimdLevel::Avx512Bf16;
            }
            if self >= SimdLevel::Avx512 && x86_64::Avx512::new().is_some() {
                return SimdLevel::Avx512;
            }
            if self >= SimdLevel::Avx2 && x86_64::Avx2::new().is_some() {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Portable
    }

    /// True when this CPU can run kernels at exactly this level ([`SimdLevel::Best`] and
    /// [`SimdLevel::Portable`] always can).
    pub fn is_available(self) -> bool {
        self == SimdLevel::Best || self.resolve() == self
    }

    /// Runs `kernel` with the best token allowed by this cap: inside a `#[target_feature]`
    /// function for AVX2 or AVX-512, so the kernel's body is compiled for that instruction set.
    /// Detection is `std`'s cached `is_x86_feature_detected!`: one atomic load per feature.
    #[inline(always)]
    pub(crate) fn dispatch<K: WithSimd>(self, kernel: K) -> K::Output {
        #[cfg(target_arch = "x86_64")]
        {
            if self >= SimdLevel::Avx512 {
                if let Some(simd) = x86_64::Avx512::new() {
                    return simd.vectorize(kernel);
                }
            }
            if self >= SimdLevel::Avx2 {
                if let Some(simd) = x86_64::Avx2::new() {
                    return simd.vectorize(kernel);
                }
            }
        }
        Portable.vectorize(kernel)
    }

    /// [`SimdLevel::dispatch`] for kernels that convert to or from half precision: the same
    /// tokens, plus the AVX-512 BF16 one when the cap allows it and the CPU has it. Kept apart
    /// so the f32 / f64 kernels are not compiled a fourth time.
    #[inline(always)]
    pub(crate) fn dispatch_half<K: WithSimd>(self, kernel: K) -> K::Output {
        #[cfg(target_arch = "x86_64")]
        {
            if self >= SimdLevel::Avx512Bf16 {
                if let Some(simd) = x86_64::Avx512Bf16::new() {
                    return simd.vectorize(kernel);
                }
            }
        }
        self.dispatch(kernel)
    }
}

mod ars;
pub(crate) use ars::ArsKey;
pub(crate) use token::{Simd, WithSimd};
#[cfg(target_arch = "x86_64")]
pub(crate) use x86_64::as_read_f32;

/// Stochastic rounding of `x` to bf16 bits with the random bits `r` (below 2^16): the f32
/// bits plus `r`, truncated (torchao's `_bf16_stochastic_round`); a NaN becomes `0x7FC0`.
#[inline(always)]
pub(crate) fn bf16_bits_stochastic(x: f32, r: u32) -> u16 {
    // `bits + r` cannot wrap: the largest non-NaN pattern is -infinity's 0xFF80_0000.
    let rounded = (x.to_bits().wrapping_add(r) >> 16) as u16;
    if x.is_nan() {
        0x7FC0
    } else {
        rounded
    }
}

/// The traits of the token layer. Public items of a private module: the crate can use them in
/// the sealed part of [`crate::Float`] without exporting them.
mod token {
    use super::ArsKey;
    use crate::float::Lane;

    /// Proof that the CPU has an instruction set, and that set's lane types.
    ///
    /// A value of an implementor exists only where its instructions can run: each token's
    /// constructor checks the CPU (or is `unsafe`). The lane types are only ever named as
    /// `T::Wide<S>` / `T::Narrow<S>` inside [`WithSimd::with_simd`], which
    /// [`Simd::vectorize`] calls with a token value, so every lane operation runs after the
    /// check.
    pub trait Simd: Copy + Send + Sync + 'static {
        /// The widest f32 lanes.
        type F32: Lane<Elem = f32>;
        /// The widest f64 lanes.
        type F64: Lane<Elem = f64>;
        /// Eight f32 lanes: the width reductions sum in, whatever the level.
        type F32x8: Lane<Elem = f32>;
        /// Four f64 lanes: the width reductions sum in, whatever the level.
        type F64x4: Lane<Elem = f64>;
        /// Runs `kernel.with_simd(self)` compiled for this instruction set.
        fn vectorize<K: WithSimd>(self, kernel: K) -> K::Output;
        /// Widens `F32::WIDTH` bf16 values (raw bits) from the front of `s`: exact, a shift.
        fn load_bf16(self, s: &[u16]) -> Self::F32;
        /// Rounds `v` to bf16 (nearest, ties to even; NaN becomes torch's quiet `0x7FC0`) into
        /// the front of `s`: bitwise [`crate::mixed::bf16_bits_from_f32`] on every lane.
        fn store_bf16(self, v: Self::F32, s: &mut [u16]);
        /// [`Simd::store_bf16`] of two lane groups, `lo` then `hi`, into the front of `s`
        /// (`2 · F32::WIDTH` elements): the same bits as two calls.
        #[inline(always)]
        fn store_bf16_pair(self, lo: Self::F32, hi: Self::F32, s: &mut [u16]) {
            let w = <Self::F32 as Lane>::WIDTH;
            self.store_bf16(lo, &mut s[..w]);
            self.store_bf16(hi, &mut s[w..2 * w]);
        }
        /// Widens `F32::WIDTH` f16 values (raw bits) from the front of `s`: exact.
        fn load_f16(self, s: &[u16]) -> Self::F32;
        /// Rounds `v` to f16 (nearest, ties to even, as `half::f16::from_f32` and F16C's
        /// `vcvtps2ph`) into the front of `s`.
        fn store_f16(self, v: Self::F32, s: &mut [u16]);
        /// [`Simd::store_bf16`] with a non-temporal (streaming) store when `s` starts on a
        /// boundary of the vector's size in bytes (an ordinary store otherwise): the line goes
        /// to memory without being read first (no read for ownership) and without displacing
        /// cached data. For arrays a pass only writes. [`Simd::store_fence`] must follow
        /// before the memory is read again (by any thread).
        #[inline(always)]
        fn stream_bf16(self, v: Self::F32, s: &mut [u16]) {
            self.store_bf16(v, s)
        }
        /// [`Simd::store_f16`] with a non-temporal store, as [`Simd::stream_bf16`].
        #[inline(always)]
        fn stream_f16(self, v: Self::F32, s: &mut [u16]) {
            self.store_f16(v, s)
        }
        /// Orders this thread's earlier non-temporal stores before every later store
        /// (`sfence`), so that whoever synchronises with this thread afterwards sees them.
        #[inline(always)]
        fn store_fence(self) {}
        /// [`ArsKey::block`]`(counter)`: the token's AES instructions where it has them (inline,
        /// so a kernel loop that needs a block holds no call), the `aes` crate's rounds
        /// otherwise.
        #[inline(always)]
        fn ars_block(self, key: &ArsKey, counter: u64) -> [u16; 8] {
            key.block(counter)
        }
        /// Rounds `v` to bf16 stochastically into the front of `s` (`F32::WIDTH` elements, the
        /// arena's elements `8·block` on): element `j` becomes
        /// [`bf16_bits_stochastic`]`(v_j, r_j)`, with `r_j` the 16-bit word `j mod 8` of
        /// [`ArsKey::block`]`(block + j / 8)`.
        #[inline(always)]
        fn store_bf16_stochastic(self, v: Self::F32, key: &ArsKey, block: u64, s: &mut [u16]) {
            let w = <Self::F32 as Lane>::WIDTH;
            let mut lanes = [0.0f32; 16];
            v.store(&mut lanes[..w]);
            for (b, (out, x)) in s[..w].chunks_mut(8).zip(lanes[..w].chunks(8)).enumerate() {
                let bits = self.ars_block(key, block + b as u64);
                for ((o, &x), &r) in out.iter_mut().zip(x).zip(&bits) {
                    *o = super::bf16_bits_stochastic(x, r as u32);
                }
            }
        }
        /// [`Simd::store_bf16_stochastic`] of two lane groups, `lo` then `hi`, into the front
        /// of `s` (`2 · F32::WIDTH` elements from the arena's element `8·block`): the same bits
        /// as two calls.
        #[inline(always)]
        fn store_bf16_stochastic_pair(
            self,
            lo: Self::F32,
            hi: Self::F32,
            key: &ArsKey,
            block: u64,
            s: &mut [u16],
        ) {
            let w = <Self::F32 as Lane>::WIDTH;
            self.store_bf16_stochastic(lo, key, block, &mut s[..w]);
            self.store_bf16_stochastic(hi, key, block + (w / 8) as u64, &mut s[w..2 * w]);
        }
    }

    /// A kernel written once for every instruction set (pulp's `WithSimd`).
    pub trait WithSimd {
        /// What the kernel returns.
        type Output;
        /// The kernel body, on the lanes of `S`. Mark it `#[inline(always)]` so that it is
        /// compiled inside [`Simd::vectorize`]'s `#[target_feature]` function.
        fn with_simd<S: Simd>(self, simd: S) -> Self::Output;
    }
}

/// `wide`'s lanes as compiled: no run-time features, so no proof needed.
#[derive(Debug, Clone, Copy)]
struct Portable;

impl Simd for Portable {
    type F32 = wide::f32x8;
    type F64 = wide::f64x4;
    type F32x8 = wide::f32x8;
    type F64x4 = wide::f64x4;
    #[inline(always)]
    fn vectorize<K: WithSimd>(self, kernel: K) -> K::Output {
        kernel.with_simd(self)
    }
    #[inline(always)]
    fn load_bf16(self, s: &[u16]) -> wide::f32x8 {
        let s: &[u16; 8] = s[..8].try_into().expect("eight elements");
        wide::f32x8::new(s.map(|b| f32::from_bits((b as u32) << 16)))
    }
    #[inline(always)]
    fn store_bf16(self, v: wide::f32x8, s: &mut [u16]) {
        let bits = v.to_array().map(crate::mixed::bf16_bits_as_read);
        s[..8].copy_from_slice(&bits);
    }
    #[inline(always)]
    fn load_f16(self, s: &[u16]) -> wide::f32x8 {
        let s: &[u16; 8] = s[..8].try_into().expect("eight elements");
        wide::f32x8::new(s.map(|b| half::f16::from_bits(b).to_f32()))
    }
    #[inline(always)]
    fn store_f16(self, v: wide::f32x8, s: &mut [u16]) {
        let bits = v.to_array().map(|x| half::f16::from_f32(x).to_bits());
        s[..8].copy_from_slice(&bits);
    }
}
