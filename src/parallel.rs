//! How parallel a step may be: on the calling thread, on rayon's global pool, or on a pool
//! the caller owns.
//!
//! Work is cut into pieces whose length depends on the run being cut and never on the thread
//! count ([`CHUNK`] elements, or a multiple of it, up to 256K, for runs of 1M elements and
//! more), and every kernel is elementwise, so results are bitwise the same for 1 thread or
//! many. Reductions (norms) combine per-chunk partials of exactly [`CHUNK`] elements in chunk
//! order for the same reason.

use std::sync::Arc;

use rayon::prelude::*;

use crate::subnormals::Subnormals;

/// Elements per unit of parallel work: the pieces of runs below 1M elements (longer runs are
/// cut into multiples of it), and the partial sums of norms. Fixed, so results never depend on
/// the thread count.
pub const CHUNK: usize = 16 * 1024;

/// The length of the pieces a step cuts a run of `run` elements into: [`CHUNK`], or for runs of
/// 1M elements and more a multiple of it (at least 32 pieces per run, at most 256K elements
/// each).
///
/// Why: a piece starts with its software prefetch 4 KiB behind (the kernels fetch 1024 elements
/// ahead in every array, from the piece's start), and per-piece setup (the loop's entry,
/// stochastic rounding's key) is paid again. On 32M f32 elements, 2 threads, the Intel Xeon of
/// BENCHMARKS.md, paired with the roofline (`examples/roofline_ratio`), 16K-element pieces held
/// Adam at 95-96% of the roofline and 256K-element ones at 99%; the bf16 modes gained 7-10%
/// (mode 3 10.2 -> 9.1 ms). Pieces of 1M elements measured the same as 256K; 32 pieces per run
/// keep work for the pool to balance. The kernels are elementwise, so the cut never changes a
/// bit.
#[inline]
pub(crate) fn piece_len(run: usize) -> usize {
    CHUNK * (run / (CHUNK * 32)).clamp(1, 16)
}

/// Below this many elements (summed over an optimizer's groups) a step runs on the calling
/// thread, whatever the [`Parallelism`]: handing it to the pool costs more than the other
/// threads save.
///
/// How it was chosen: in a training loop the forward and backward pass run between two steps,
/// long enough for rayon's workers to fall asleep, so a step handed to the pool first waits for
/// them to wake (tens to hundreds of µs on the 2-core KVM machines this crate is developed on,
/// even for a one-thread pool). `examples/grain_size` times a clipped Adam and SGD-momentum
/// step inline, on a hot pool and on a pool idled by 1 ms of busy work between steps, from
/// 16K to 4M f32 elements; the idle pool overtakes inline between 512K and 1M elements there
/// (BENCHMARKS.md has the table). torch's CPU kernels use a grain of 32K elements, but their
/// OpenMP threads spin between parallel regions instead of sleeping. Results are bitwise the
/// same on either side of the threshold, and [`crate::Optimizer::set_parallel_threshold`]
/// moves it.
pub const PARALLEL_THRESHOLD: usize = 512 * 1024;

/// Where a step's work runs.
#[derive(Clone, Debug, Default)]
pub enum Parallelism {
    /// On the calling thread only. Never touches a rayon pool.
    Sequential,
    /// On rayon's global pool (the default).
    #[default]
    Global,
    /// On a pool the caller built.
    Pool(Arc<rayon::ThreadPool>),
}

impl Parallelism {
    /// Runs `body`, one step's work, either all on the calling thread (under `subnormals`) or
    /// as *one* hand-off to the pool, inside which every parallel part of the step (the clip
    /// norm, the update) runs on the workers that are already awake. The pool is used when
    /// `total_elems` reaches `threshold` (by default [`PARALLEL_THRESHOLD`]) and it has more
    /// than one thread: a one-thread pool only adds the hand-off.
    pub(crate) fn run<R: Send>(
        &self,
        total_elems: usize,
        threshold: usize,
        subnormals: Subnormals,
        body: impl FnOnce(Exec) -> R + Send,
    ) -> R {
        let inline = Exec {
            parallel: false,
            subnormals,
        };
        let pooled = Exec {
            parallel: true,
            subnormals,
        };
        if total_elems < threshold {
            return subnormals.run(|| body(inline));
        }
        match self {
            Parallelism::Global if rayon::current_num_threads() > 1 => {
                // `scope` runs its closure on a worker of the global pool (in place when the
                // caller already is one): the step's single hand-off.
                rayon::scope(|_| body(pooled))
            }
            Parallelism::Pool(pool) if pool.current_num_threads() > 1 => {
                pool.install(|| body(pooled))
            }
            _ => subnormals.run(|| body(inline)),
        }
    }
}

/// How the parts of one step run, decided once per step by [`Parallelism::run`]: on the
/// calling thread, or over the pool the step has entered.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Exec {
    parallel: bool,
    subnormals: Subnormals,
}

impl Exec {
    /// Runs `f` on every item. On the pool each item runs under the step's subnormal mode on
    /// whichever worker takes it; inline, [`Parallelism::run`] has already set the mode.
    pub(crate) fn for_each<W: Sync>(self, items: &[W], f: impl Fn(&W) + Sync + Send) {
        if self.parallel && items.len() > 1 {
            let mode = self.subnormals;
            items.par_iter().for_each(|w| mode.run(|| f(w)));
        } else if self.parallel {
            self.subnormals.run(|| items.iter().for_each(f));
        } else {
            items.iter().for_each(f);
        }
    }

    /// Maps every item to a value, written to `out` in item order whatever thread computed it.
    pub(crate) fn map_into<W: Sync, R: Send>(
        self,
        items: &[W],
        out: &mut Vec<R>,
        f: impl Fn(&W) -> R + Sync + Send,
    ) {
        if self.parallel && items.len() > 1 {
            let mode = self.subnormals;
            items
                .par_iter()
                .map(|w| mode.run(|| f(w)))
                .collect_into_vec(out);
        } else {
            out.clear();
            if self.parallel {
                self.subnormals.run(|| out.extend(items.iter().map(f)));
            } else {
                out.extend(items.iter().map(f));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_grow_with_the_run_only() {
        assert_eq!(piece_len(1), CHUNK);
        assert_eq!(piece_len(1024 * 1024 - 1), CHUNK);
        assert_eq!(piece_len(1_200_004), 2 * CHUNK);
        assert_eq!(piece_len(32 << 20), 16 * CHUNK);
        assert_eq!(piece_len(124_439_808), 16 * CHUNK);
    }
}
