//! How parallel a step may be: on the calling thread, on rayon's global pool, or on a pool
//! the caller owns.
//!
//! Work is cut into chunks of [`CHUNK`] elements whatever the thread count, and every kernel is
//! elementwise, so results are bitwise the same for 1 thread or many. Reductions (norms) combine
//! per-chunk partials in chunk order for the same reason.

use std::sync::Arc;

use rayon::prelude::*;

/// Elements per unit of parallel work. Fixed, so results never depend on the thread count.
pub const CHUNK: usize = 16 * 1024;

/// Below this many elements a step stays on the calling thread: waking the pool costs more
/// than it saves.
pub const PARALLEL_THRESHOLD: usize = 64 * 1024;

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
    /// Runs `f` on every item, in parallel when `total_elems` makes it worth it.
    pub(crate) fn for_each<W: Sync>(
        &self,
        items: &[W],
        total_elems: usize,
        f: impl Fn(&W) + Sync + Send,
    ) {
        let parallel = items.len() > 1 && total_elems >= PARALLEL_THRESHOLD;
        match self {
            Parallelism::Global if parallel => items.par_iter().for_each(f),
            Parallelism::Pool(pool) if parallel => pool.install(|| items.par_iter().for_each(f)),
            _ => items.iter().for_each(f),
        }
    }

    /// Maps every item to a value and writes the values to `out` in item order, so a
    /// reduction over them is the same for any thread count. Reuses `out`'s allocation.
    pub(crate) fn map_into<W: Sync, R: Send>(
        &self,
        items: &[W],
        total_elems: usize,
        out: &mut Vec<R>,
        f: impl Fn(&W) -> R + Sync + Send,
    ) {
        let parallel = items.len() > 1 && total_elems >= PARALLEL_THRESHOLD;
        match self {
            Parallelism::Global if parallel => items.par_iter().map(f).collect_into_vec(out),
            Parallelism::Pool(pool) if parallel => {
                pool.install(|| items.par_iter().map(f).collect_into_vec(out))
            }
            _ => {
                out.clear();
                out.extend(items.iter().map(f));
            }
        }
    }
}
