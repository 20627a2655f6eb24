//! ARS-5, the counter-based generator of stochastic rounding's random bits: the scalar
//! definition, which the tokens compute two or four blocks at a time with AES-NI or VAES.
//!
//! ARS ("AES Random Stream", Salmon, Moraes, Dror & Shaw, *Parallel random numbers: as easy as
//! 1, 2, 3*, SC 2011; Random123's `ars`, Intel MKL's `VSL_BRNG_ARS5`) encrypts a counter with
//! five AES rounds under a key schedule of Weyl increments:
//!
//! ```text
//! k₀ = key,  kᵣ = kᵣ₋₁ + W   (two little-endian 64-bit lanes, wrapping;
//!                             W = (0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B))
//! x  = counter ⊕ k₀;  x = AESENC(x, kᵣ) for r = 1..4;  block = AESENCLAST(x, k₅)
//! ```
//!
//! The 128-bit counter of block `c` is `c` in both 64-bit halves: a broadcast and one add make
//! four consecutive counters in a 512-bit register.
//!
//! This is MKL's `VSL_BRNG_ARS5` exactly (Intel documents its construction and its statistical
//! test results); only the key and the counters' meaning are ours ([`crate::mixed`]). It turns
//! 128 bits of counter into 128 random bits with five AES instructions (on 512 bits at once
//! with VAES), where the integer hash it replaced took two 32-bit multiplies and six shifts and
//! exclusive-ors per 32 bits: on the AVX-512 Xeon of BENCHMARKS.md, that hash was most of what
//! stochastic rounding added to a step.

use aes::hazmat::{cipher_round, inv_mix_columns};
use aes::Block;

/// The Weyl increment of the key schedule: the golden ratio and `√3 − 1` in 64-bit fixed point.
const WEYL: [u64; 2] = [0x9E37_79B9_7F4A_7C15, 0xBB67_AE85_84CA_A73B];

/// ARS-5's round keys for one 128-bit key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArsKey {
    /// `k₀`, exclusive-ored into the counter, then `k₁..k₅`, one per round.
    keys: [[u8; 16]; ArsKey::ROUNDS + 1],
}

impl ArsKey {
    /// AES rounds per block.
    pub(crate) const ROUNDS: usize = 5;

    /// The round keys of `key` (low 64-bit word first).
    pub(crate) fn new(key: [u64; 2]) -> Self {
        let mut k = key;
        let mut keys = [[0u8; 16]; Self::ROUNDS + 1];
        for round_key in &mut keys {
            round_key[..8].copy_from_slice(&k[0].to_le_bytes());
            round_key[8..].copy_from_slice(&k[1].to_le_bytes());
            k = [k[0].wrapping_add(WEYL[0]), k[1].wrapping_add(WEYL[1])];
        }
        ArsKey { keys }
    }

    /// Round key `r` (`0` whitens the counter; `1..=5` are the rounds'), as AES-NI reads it
    /// from memory.
    #[inline(always)]
    pub(crate) fn round_key(&self, r: usize) -> &[u8; 16] {
        &self.keys[r]
    }

    /// The block of counter `counter` (the 128-bit counter with `counter` in both halves), as
    /// eight little-endian 16-bit words. The `aes` crate's round functions: AES-NI where the
    /// CPU has it, its constant-time software rounds elsewhere; the same bits either way.
    pub(crate) fn block(&self, counter: u64) -> [u16; 8] {
        let mut x = [0u8; 16];
        x[..8].copy_from_slice(&counter.to_le_bytes());
        x[8..].copy_from_slice(&counter.to_le_bytes());
        for (b, k) in x.iter_mut().zip(&self.keys[0]) {
            *b ^= k;
        }
        let mut x = Block::from(x);
        for r in 1..Self::ROUNDS {
            cipher_round(&mut x, &Block::from(self.keys[r]));
        }
        // AESENCLAST: a round without MixColumns (a round with a zero key, then its
        // MixColumns undone, then the key).
        cipher_round(&mut x, &Block::default());
        inv_mix_columns(&mut x);
        let mut words = [0u16; 8];
        for (j, w) in words.iter_mut().enumerate() {
            *w = u16::from_le_bytes([x[2 * j], x[2 * j + 1]]) ^ self.last_key_word(j);
        }
        words
    }

    /// Word `j` of the last round key.
    #[inline(always)]
    fn last_key_word(&self, j: usize) -> u16 {
        let k = &self.keys[Self::ROUNDS];
        u16::from_le_bytes([k[2 * j], k[2 * j + 1]])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scalar blocks equal AES-NI's `aesenc`/`aesenclast` sequence, where the CPU has it.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn scalar_blocks_match_aes_ni() {
        use std::arch::x86_64::*;
        if !is_x86_feature_detected!("aes") {
            return;
        }
        #[target_feature(enable = "aes")]
        fn hardware(key: &ArsKey, counter: u64) -> [u16; 8] {
            let load = |r: usize| {
                // SAFETY: a round key is 16 readable bytes; unaligned loads are fine.
                unsafe { _mm_loadu_si128(key.round_key(r).as_ptr() as *const __m128i) }
            };
            let mut x = _mm_xor_si128(_mm_set1_epi64x(counter as i64), load(0));
            for r in 1..ArsKey::ROUNDS {
                x = _mm_aesenc_si128(x, load(r));
            }
            x = _mm_aesenclast_si128(x, load(ArsKey::ROUNDS));
            // SAFETY: `__m128i` and `[u16; 8]` are both 16 bytes of plain data.
            unsafe { std::mem::transmute::<__m128i, [u16; 8]>(x) }
        }
        for (i, key) in [[0u64, 0], [1, 2], [u64::MAX, 0x0123_4567_89AB_CDEF]]
            .into_iter()
            .enumerate()
        {
            let key = ArsKey::new(key);
            for counter in [0u64, 1, 2, 255, 256, 1 << 40, u64::MAX] {
                // SAFETY: the CPU has AES-NI (checked above).
                let want = unsafe { hardware(&key, counter) };
                assert_eq!(key.block(counter), want, "key {i}, counter {counter}");
            }
        }
    }
}
