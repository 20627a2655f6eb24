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
//!
//! Large buffers are also backed by *transparent huge pages* where the kernel offers them
//! (Linux, `madvise(MADV_HUGEPAGE)` before the first touch): a pass streaming through seven
//! arrays of 4 KiB pages spends part of its time on TLB misses and page walks. Measured on
//! the 2-core Intel Xeon (AVX-512), 32M elements, 2 threads: Adam f32 18.0 -> 16.1 ms, the
//! bf16 roofline 8.7 -> 7.6 ms (BENCHMARKS.md). PyTorch does the same only when
//! `THP_MEM_ALLOC_ENABLE=1` is set.

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
    /// A half-precision copy of the parameters written by a mixed-precision step.
    Copy,
    /// Anything else (not staggered).
    Other,
}

impl Role {
    fn slot(self) -> usize {
        match self {
            Role::Params | Role::Other => 0,
            Role::Grads => 1,
            Role::State(k) => (2 + k) % STAGGER_SLOTS,
            Role::Copy => STAGGER_SLOTS - 1,
        }
    }
}

/// A 64-byte-aligned, fixed-length buffer of `T`, staggered by its [`Role`] when large.
pub(crate) struct AlignedBuf<T> {
    raw: AVec<T, ConstAlign<ALIGN>>,
    start: usize,
}

impl<T: Copy> AlignedBuf<T> {
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
        let mut raw = Self::allocate(start + len);
        raw.resize(start + len, value);
        AlignedBuf { raw, start }
    }

    /// Room for `len` elements, advised onto huge pages when large.
    fn allocate(len: usize) -> AVec<T, ConstAlign<ALIGN>> {
        let mut raw: AVec<T, ConstAlign<ALIGN>> = AVec::with_capacity(ALIGN, len);
        let bytes = len.saturating_mul(std::mem::size_of::<T>());
        if bytes >= STAGGER_MIN_BYTES {
            advise_huge_pages(raw.as_mut_ptr().cast(), bytes);
        }
        raw
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

/// Asks the kernel to back the untouched allocation of `bytes` at `ptr` with transparent huge
/// pages (the whole 4 KiB pages inside it). Advice only: where the kernel has them disabled,
/// or outside Linux, the buffer keeps ordinary pages.
#[cfg(target_os = "linux")]
fn advise_huge_pages(ptr: *mut u8, bytes: usize) {
    const PAGE: usize = 4096;
    let first = (ptr as usize).div_ceil(PAGE) * PAGE;
    let end = (ptr as usize + bytes) / PAGE * PAGE;
    if end > first {
        // SAFETY: [first, end) lies inside one live allocation of ours; MADV_HUGEPAGE changes
        // only how the kernel backs those pages, never what they hold. A failure (no THP
        // support) leaves ordinary pages, so its result is ignored.
        unsafe {
            libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_ptr: *mut u8, _bytes: usize) {}

impl<T: Float> AlignedBuf<T> {
    /// A copy of `values`.
    pub(crate) fn from_slice(role: Role, values: &[T]) -> Self {
        let mut buf = Self::filled(role, values.len(), T::ZERO);
        buf.copy_from_slice(values);
        buf
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
        let mut raw = Self::allocate(self.raw.len());
        raw.extend_from_slice(&self.raw);
        AlignedBuf {
            raw,
            start: self.start,
        }
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for AlignedBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_buffer_is_aligned_and_large_ones_are_staggered_by_role() {
        let n = STAGGER_MIN_BYTES / 4;
        let roles = [Role::Params, Role::Grads, Role::State(0), Role::State(1)];
        let bufs: Vec<AlignedBuf<f32>> = roles
            .iter()
            .map(|&r| AlignedBuf::filled(r, n, 1.5))
            .collect();
        for (b, role) in bufs.iter().zip(roles) {
            assert_eq!(b.len(), n);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0, "{role:?}");
            assert!(b.iter().all(|&x| x == 1.5));
            assert_eq!(b.start * 4, role.slot() * STAGGER_BYTES, "{role:?}");
        }
        // f64 and clones keep the layout.
        let d = AlignedBuf::<f64>::filled(Role::State(3), STAGGER_MIN_BYTES / 8, 0.0);
        assert_eq!(d.start * 8, 5 * STAGGER_BYTES);
        let c = d.clone();
        assert_eq!((c.start, c.len()), (d.start, d.len()));
        assert_eq!(c.as_ptr() as usize % ALIGN, 0);
    }

    /// The `VmFlags` of the mapping holding `addr`, from `/proc/self/smaps`.
    #[cfg(target_os = "linux")]
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let head = line.split_whitespace().next().unwrap_or("");
            if let Some((lo, hi)) = head.split_once('-') {
                if let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                {
                    inside = (lo..hi).contains(&addr);
                    continue;
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.to_string();
                }
            }
        }
        panic!("no mapping holds {addr:#x}")
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn large_buffers_and_their_clones_are_advised_onto_huge_pages() {
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            // A kernel built without THP refuses the advice; the buffers work as before.
            eprintln!("this kernel has no transparent huge pages: nothing to check");
            return;
        }
        let advised = |b: &AlignedBuf<f32>| {
            let middle = b.as_ptr() as usize + b.len() * 2;
            vm_flags(middle).split_whitespace().any(|f| f == "hg")
        };
        let big = AlignedBuf::filled(Role::Grads, 4 * STAGGER_MIN_BYTES / 4, 0.5f32);
        assert!(advised(&big), "{}", vm_flags(big.as_ptr() as usize));
        assert!(advised(&big.clone()));
        assert!(big.iter().all(|&x| x == 0.5));
    }

    #[test]
    fn small_buffers_are_not_padded() {
        let b = AlignedBuf::filled(Role::State(2), 1000, 0.0f32);
        assert_eq!((b.start, b.len()), (0, 1000));
        let s = AlignedBuf::from_slice(Role::Grads, &[1.0f64, 2.0, 3.0]);
        assert_eq!(&s[..], &[1.0, 2.0, 3.0]);
        assert!(AlignedBuf::<f32>::empty().is_empty());
    }
}
