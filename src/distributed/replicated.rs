//! Replicated data parallelism (torch's `DistributedDataParallel`): every rank holds the
//! whole model and optimizer, gradients are averaged over ranks, and every rank applies the
//! same update.

use std::hash::{Hash, Hasher};

use super::comm::{check_same_everywhere, CommElem, Communicator, Reduction};
use super::shard::ShardPlan;
use crate::arena::Arena;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::optimizer::{Algorithm, Optimizer, StepOptions, StepReport};

/// Averages gradients over the ranks of a [`Communicator`] before each step of a plain
/// [`Optimizer`], as torch's `DistributedDataParallel` does.
///
/// Per step it moves the gradient buffer once each way: a reduce-scatter of the flat
/// gradients over the arena's [`ShardPlan::balanced`] shards, then an all-gather of the
/// averaged shards into every rank's gradient buffer, which is what a ring all-reduce sends,
/// `2 (N - 1) / N` times the gradient bytes per rank. Then every rank holds the same averaged
/// gradients and runs the same step, so everything the optimizer does stays consistent across
/// ranks with no further communication: param groups, schedulers and `set_lr` (driven on every
/// rank alike), clipping by the global norm (every rank computes the same norm),
/// [`StepOptions::skip_non_finite`] (a NaN or infinity on any rank reaches the average on
/// every rank, so all skip together), the GradScaler's `found_inf`, and gradient accumulation
/// (accumulate locally, average once at the step).
///
/// The average is the rank sum divided by the world size. torch's default DDP hook divides
/// each rank's gradient first and then sums; the two give the same bits when the world size
/// is a power of two and may differ by an ulp otherwise.
///
/// A parameter has a gradient after the average when any rank gave it one (the others count
/// as zeros); one that no rank gave a gradient keeps none and the step skips it, as torch's
/// does. The presence flags cost one small all-reduce per step.
///
/// L-BFGS (`Lbfgs`, not an [`Optimizer`]) cannot be wrapped: its line search re-evaluates the
/// loss, which needs a collective of its own per evaluation.
pub struct DataParallel<C: Communicator, T: Float + CommElem> {
    comm: C,
    reduction: Reduction,
    plan: ShardPlan,
    counts: Vec<usize>,
    /// This rank's averaged shard.
    shard: Vec<T>,
    /// Every rank's piece of this rank's shard ([`Reduction::RankOrdered`]).
    pieces: Vec<T>,
    /// Per parameter: 1 when this rank has a gradient, then the number of ranks that do.
    presence: Vec<u64>,
    presence_sum: Vec<u64>,
}

impl<C: Communicator, T: Float + CommElem> std::fmt::Debug for DataParallel<C, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallel")
            .field("rank", &self.comm.rank())
            .field("size", &self.comm.size())
            .field("reduction", &self.reduction)
            .finish()
    }
}

/// A fingerprint of the arena's layout and the optimizer's groups (their parameters and
/// hyperparameters), equal on ranks that built the same model and optimizer.
pub(crate) fn fingerprint<T: Float, A: Algorithm>(
    arena: &Arena<T>,
    opt: &Optimizer<T, A>,
) -> Result<u64> {
    // `DefaultHasher::new()` has fixed keys: the same bytes hash alike in every process of
    // the same binary, which is what every rank runs.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    T::DTYPE.hash(&mut h);
    A::NAME.hash(&mut h);
    for info in arena.infos() {
        info.name.hash(&mut h);
        info.shape.hash(&mut h);
        info.offset.hash(&mut h);
    }
    let groups = serde_json::to_string(&opt.state_dict().param_groups)
        .map_err(|e| Error::Serde(e.to_string()))?;
    groups.hash(&mut h);
    Ok(h.finish())
}

impl<C: Communicator, T: Float + CommElem> DataParallel<C, T> {
    /// Wraps `comm` for `opt` over `arena`, after checking that every rank built the same
    /// arena layout and param groups (one fingerprint exchanged across ranks): a mismatch is
    /// the same clear error on every rank, never a hang. Every rank must call it.
    pub fn new<A: Algorithm>(comm: C, arena: &Arena<T>, opt: &Optimizer<T, A>) -> Result<Self> {
        check_same_everywhere(&comm, fingerprint(arena, opt)?, "arena layout or optimizer")?;
        let plan = ShardPlan::balanced(arena.len(), comm.size(), std::mem::size_of::<T>());
        let counts = plan.counts();
        let mine = counts[comm.rank()];
        Ok(DataParallel {
            reduction: Reduction::default(),
            shard: vec![T::ZERO; mine],
            pieces: Vec::new(),
            presence: vec![0; arena.num_params()],
            presence_sum: vec![0; arena.num_params()],
            plan,
            counts,
            comm,
        })
    }

    /// Chooses how gradients are summed (see [`Reduction`]); every rank must choose alike.
    pub fn with_reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }

    /// The communicator.
    pub fn comm(&self) -> &C {
        &self.comm
    }

    /// The shards the gradient exchange cuts the arena into.
    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    /// Bytes this rank sends per [`DataParallel::average_gradients`], counting the data of
    /// the two collectives as a ring (or pairwise) algorithm sends it: every other rank's shard
    /// once in the reduce-scatter, and its own shard to every other rank in the all-gather,
    /// over `N - 1` ring steps. With balanced shards, `2 (N - 1) / N` times the gradient bytes.
    pub fn bytes_sent_per_step(&self) -> usize {
        let n = self.comm.size();
        let mine = self.counts[self.comm.rank()];
        let others = self.plan.len() - mine;
        // Reduce-scatter: this rank's pieces of every other shard; all-gather: its own shard
        // forwarded N - 1 times around the ring (each rank forwards one shard per step).
        (others + mine * (n - 1)) * std::mem::size_of::<T>() + self.presence.len() * 8
    }

    /// Replaces every rank's gradients by their average over ranks. Every rank must call it.
    pub fn average_gradients(&mut self, arena: &mut Arena<T>) -> Result<()> {
        if arena.len() != self.plan.len() || arena.num_params() != self.presence.len() {
            return Err(Error::ArenaMismatch(
                "DataParallel was built for another arena".into(),
            ));
        }
        let n = self.comm.size();
        // Which parameters have a gradient somewhere.
        for (p, &has) in self.presence.iter_mut().zip(arena.grad_flags()) {
            *p = has as u64;
        }
        self.comm
            .all_reduce_sum(&self.presence, &mut self.presence_sum)?;
        for (i, (&local, &anywhere)) in self.presence.iter().zip(&self.presence_sum).enumerate() {
            if local == 0 && anywhere > 0 {
                // Counts as zeros here.
                let handle = arena.param_at(i).expect("position in range");
                arena.grad_mut(handle);
            }
        }
        let rank = self.comm.rank();
        let mine = self.counts[rank];
        match self.reduction {
            Reduction::RankOrdered => {
                self.pieces.resize(n * mine, T::ZERO);
                self.comm
                    .all_to_all(arena.grads(), &mut self.pieces, &self.counts)?;
                self.shard.copy_from_slice(&self.pieces[..mine]);
                for r in 1..n {
                    for (acc, &x) in self.shard.iter_mut().zip(&self.pieces[r * mine..]) {
                        *acc = *acc + x;
                    }
                }
            }
            Reduction::Mpi => {
                self.comm
                    .reduce_scatter_sum(arena.grads(), &mut self.shard, &self.counts)?;
            }
        }
        if n > 1 {
            let world = T::from_f64(n as f64);
            for x in &mut self.shard {
                *x = *x / world;
            }
        }
        let len = arena.len();
        self.comm
            .all_gather(&self.shard, arena.grads_raw_mut(0..len), &self.counts)?;
        for (i, &anywhere) in self.presence_sum.iter().enumerate() {
            if anywhere == 0 {
                let handle = arena.param_at(i).expect("position in range");
                arena.clear_grad(handle);
            }
        }
        Ok(())
    }

    /// Averages the gradients over ranks, then runs `opt`'s step on them.
    pub fn step<A: Algorithm>(
        &mut self,
        opt: &mut Optimizer<T, A>,
        arena: &mut Arena<T>,
    ) -> Result<()> {
        self.step_with_options(opt, arena, StepOptions::default())
            .map(|_| ())
    }

    /// Averages the gradients over ranks, then runs `opt`'s step with `options` (clipping,
    /// skipping non-finite gradients, a gradient scale); the outcome is the same on every
    /// rank.
    pub fn step_with_options<A: Algorithm>(
        &mut self,
        opt: &mut Optimizer<T, A>,
        arena: &mut Arena<T>,
        options: StepOptions,
    ) -> Result<StepReport> {
        self.average_gradients(arena)?;
        opt.step_with_options(arena, options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributed::threads::ThreadComm;
    use crate::optim::{AdamW, AdamWConfig};
    use crate::{ArenaBuilder, ParamGroup};

    fn model(seed: u64) -> Arena<f32> {
        let mut b = ArenaBuilder::<f32>::new();
        let w: Vec<f32> = (0..300).map(|i| ((i as f32) * 0.37).sin()).collect();
        b.param("w", &[20, 15], &w).unwrap();
        b.param("b", &[20], &w[..20]).unwrap();
        b.param("frozen", &[7], &w[..7]).unwrap();
        let _ = seed;
        b.build()
    }

    fn grads(rank: usize, step: usize, arena: &mut Arena<f32>) {
        for name in ["w", "b"] {
            let g = arena.grad_by_name_mut(name).unwrap();
            for (i, x) in g.iter_mut().enumerate() {
                *x = ((i * 7 + rank * 13 + step * 3) as f32 * 0.11).cos();
            }
        }
    }

    /// Every rank of a thread world ends with the parameters a single process gets from the
    /// rank-order average of the same gradients.
    #[test]
    fn data_parallel_matches_a_single_process_fed_the_average() {
        for size in 1..=3 {
            let comms = ThreadComm::world(size);
            let results: Vec<Vec<f32>> = std::thread::scope(|s| {
                let handles: Vec<_> = comms
                    .into_iter()
                    .map(|comm| {
                        s.spawn(move || {
                            let mut arena = model(0);
                            let rank = comm.rank();
                            let mut opt = AdamW::<f32>::new(
                                &arena,
                                [ParamGroup::all()],
                                AdamWConfig::default(),
                            )
                            .unwrap();
                            let mut dp = DataParallel::new(comm, &arena, &opt).unwrap();
                            for step in 0..4 {
                                arena.zero_grad(true);
                                grads(rank, step, &mut arena);
                                dp.step(&mut opt, &mut arena).unwrap();
                                assert!(!arena.has_grad(arena.find("frozen").unwrap()));
                            }
                            arena.params().to_vec()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            // The single-process run on the averaged gradients.
            let mut arena = model(0);
            let mut opt =
                AdamW::<f32>::new(&arena, [ParamGroup::all()], AdamWConfig::default()).unwrap();
            let mut scratch = model(0);
            for step in 0..4 {
                arena.zero_grad(true);
                for name in ["w", "b"] {
                    let len = arena.value_by_name(name).unwrap().len();
                    let mut sum = vec![0f32; len];
                    for rank in 0..size {
                        scratch.zero_grad(true);
                        grads(rank, step, &mut scratch);
                        let g = scratch.grad_by_name(name).unwrap().unwrap();
                        for (a, &x) in sum.iter_mut().zip(g) {
                            *a += x;
                        }
                    }
                    let avg: Vec<f32> = if size > 1 {
                        sum.iter().map(|x| x / size as f32).collect()
                    } else {
                        sum
                    };
                    let p = arena.find(name).unwrap();
                    arena.set_grad(p, &avg).unwrap();
                }
                opt.step(&mut arena).unwrap();
            }
            for (rank, params) in results.iter().enumerate() {
                assert_eq!(
                    params.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    arena
                        .params()
                        .iter()
                        .map(|x| x.to_bits())
                        .collect::<Vec<_>>(),
                    "world {size}, rank {rank}"
                );
            }
        }
    }

    #[test]
    fn a_layout_mismatch_is_an_error_on_every_rank() {
        let comms = ThreadComm::world(2);
        let errors: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    s.spawn(move || {
                        let mut b = ArenaBuilder::<f32>::new();
                        // Rank 1 registers a different shape.
                        b.zeros("w", &[4, 3 + comm.rank()]).unwrap();
                        let arena = b.build();
                        let opt =
                            AdamW::<f32>::new(&arena, [ParamGroup::all()], AdamWConfig::default())
                                .unwrap();
                        DataParallel::new(comm, &arena, &opt)
                            .unwrap_err()
                            .to_string()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for e in errors {
            assert!(
                e.contains("differs between ranks") && e.contains("[1]"),
                "{e}"
            );
        }
    }
}
