//! Aligned, fixed-length buffers for the arena and the optimizer state, placed so that the
//! arrays one fused pass streams through do not collide in the memory system.
//!
//! Every buffer starts on a 64-byte boundary (one cache line, one AVX-512 register). Large
//! buffers are also *staggered*: each array of a fused pass (parameters, gradients, state
//! buffer k) starts [`STAGGER_BYTES`] times its slot number past its allocation's aligned
//! start. Without that, the allocator hands out same-sized large buffers at a fixed spacing
//! (the size plus one page), so element `i` of every array sits at the same offset within
//! its page and often the same DRAM bank, and a pass over seven such arrays slowed down by
//! up to a third. Measured on the 2-core AMD EPYC development machine, Adam at 32M f32
//! elements: 46 ms unstaggered vs 29 ms staggered on one thread, 28 vs 22 ms on two (see
//! BENCHMARKS.md). Small buffers are not staggered: they live in cache, where the padding
//! would only cost space.

use std::ops::{Deref, DerefMut};

use aligned_vec::{AVec, ConstAlign};

use crate::float::Float;

/// Alignment of every arena and state buffer, in bytes: one cache line, and a full AVX-512
/// register.
pub const ALIGN: usize = 64;

/// The offset between the starts of consecutive slots: 32 KiB plus one cache line, so the
/// arrays also fall on different cache sets.
pub const STAGGER_BYTES: usize = 32 * 1024 + ALIGN;

/// Buffers smaller than this are not staggered.
pub const STAGGER_MIN_BYTES: usize = 4 << 20;

/// Slots cycle after this many (so the padding stays below 8 x 32 KiB).
const STAGGER_SLOTS: usize = 8;

/// Which array of a fused pass a buffer holds; decides its stagger slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The arena's parameter values.
    Params,
    /// The arena's gradients.
    Grads,
    /// Optimizer state buffer number `k` of a param group.
    State(usize),
    /// Anything else (not staggered).
    Other,
}

impl Role {
    fn slot(self) -> usize {
        match self {
            Role::Params | Role::Other => 0,
            Role::Grads => 1,
            Role::State(k) => (2 + k) % STAGGER_SLOTS,
        }
    }
}

/// A 64-byte-aligned, fixed-length buffer of `T`, staggered by its [`Role`] when large.
pub(crate) struct AlignedBuf<T> {
    raw: AVec<T, ConstAlign<ALIGN>>,
    start: usize,
}

impl<T: Float> AlignedBuf<T> {
    /// An empty buffer.
    pub(crate) fn empty() -> Self {
        AlignedBuf {
            raw: AVec::new(ALIGN),
            start: 0,
        }
    }

    /// `len` copies of `value`.
    pub(crate) fn filled(role: Role, len: usize, value: T) -> Self {
        let start = Self::pad(role, len);
        AlignedBuf {
            raw: AVec::from_iter(ALIGN, std::iter::repeat_n(value, start + len)),
            start,
        }
    }

    /// A copy of `values`.
    pub(crate) fn from_slice(role: Role, values: &[T]) -> Self {
        let mut buf = Self::filled(role, values.len(), T::ZERO);
        buf.copy_from_slice(values);
        buf
    }

    /// Padding elements in front of a buffer of `len` elements in `role`.
    fn pad(role: Role, len: usize) -> usize {
        let size = std::mem::size_of::<T>();
        if len.saturating_mul(size) < STAGGER_MIN_BYTES {
            return 0;
        }
        role.slot() * STAGGER_BYTES / size
    }
}

impl<T> Deref for AlignedBuf<T> {
    type Target = [T];
    #[inline]
    fn deref(&self) -> &[T] {
        &self.raw[self.start..]
    }
}

impl<T> DerefMut for AlignedBuf<T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.raw[self.start..]
    }
}

impl<T: Copy> Clone for AlignedBuf<T> {
    fn clone(&self) -> Self {
        AlignedBuf {
            raw: self.raw.clone(),
            start: self.start,
        }
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for AlignedBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}
