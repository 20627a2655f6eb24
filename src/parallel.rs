//! How parallel a step may be: on the calling thread, on rayon's global pool, or on a pool
//! the caller owns.
//!
//! Work is cut into chunks of [`CHUNK`] elements whatever the thread count, and every kernel is
//! elementwise, so results are bitwise the same for 1 thread or many. Reductions (norms) combine
//! per-chunk partials in chunk order for the same reason.

use std::sync::Arc;

use rayon::prelude::*;

use crate::subnormals::Subnormals;

/// Elements per unit of parallel work. Fixed, so results never depend on the thread count.
pub const CHUNK: usize = 16 * 1024;

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
