//! Replicated data parallelism (torch's `DistributedDataParallel`): every rank holds the
//! whole model and optimizer, gradients are averaged over ranks, and every rank applies the
//! same update.

use std::hash::{Hash, Hasher};

use super::comm::{check_same_everywhere, CommElem, Communicator, Reduction};
use super::shard::ShardPlan;
use crate::arena::Arena;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::hyper::Hyperparams;
use std::ops::Range;

use crate::arch::SimdLevel;
use crate::clip::{combine_raw_norms, raw_norm_part};
use crate::optimizer::{Algorithm, Optimizer, StepOptions, StepOutcome, StepReport};
use crate::scaler::StepWithOptions;

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
/// L-BFGS (`LBFGS`, not an [`Optimizer`]) cannot be wrapped: its line search re-evaluates the
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
    norm_scratch: Vec<Range<usize>>,
    flags: StepFlags,
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
    for g in 0..opt.num_groups() {
        for p in opt.group_handles(g)? {
            p.index().hash(&mut h);
        }
        let config = opt.group_config(g)?;
        for &name in <A::Config as Hyperparams>::NAMES {
            name.hash(&mut h);
            format!("{:?}", config.get(name)?).hash(&mut h);
        }
        u64::MAX.hash(&mut h);
    }
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
            norm_scratch: Vec::new(),
            flags: StepFlags::new(comm.size()),
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
        if n == 1 {
            return 0;
        }
        (others + mine * (n - 1)) * std::mem::size_of::<T>() + self.presence.len() * 8
    }

    /// Replaces every rank's gradients by their average over ranks. Every rank must call it.
    pub fn average_gradients(&mut self, arena: &mut Arena<T>) -> Result<()> {
        if arena.len() != self.plan.len() || arena.num_params() != self.presence.len() {
            return Err(Error::ArenaMismatch(
                "DataParallel was built for another arena".into(),
            ));
        }
        if self.comm.size() == 1 {
            // A world of one: the gradients are their own average.
            return Ok(());
        }
        agree_presence(
            &self.comm,
            arena,
            &mut self.presence,
            &mut self.presence_sum,
        )?;
        average_into(
            &self.comm,
            self.reduction,
            arena.grads(),
            &self.counts,
            &mut self.pieces,
            &mut self.shard,
        )?;
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

    /// A step with [`StepOptions::skipping_non_finite`](crate::StepOptions::skipping_non_finite) over the ranks: averages, then skips the step on every
    /// rank when the average holds a NaN or an infinity (so when any rank's gradients did).
    pub fn step_checked<A: Algorithm>(
        &mut self,
        opt: &mut Optimizer<T, A>,
        arena: &mut Arena<T>,
    ) -> Result<StepOutcome> {
        let options = StepOptions {
            skip_non_finite: true,
            ..StepOptions::default()
        };
        Ok(self.step_with_options(opt, arena, options)?.outcome)
    }

    /// Averages the gradients over ranks, then runs `opt`'s step with `options` (clipping,
    /// skipping non-finite gradients, a gradient scale); the outcome is the same on every
    /// rank.
    ///
    /// The clip norm and the non-finite check are taken as [`super::ShardedOptimizer`] takes
    /// them, from each rank's shard of the averaged gradients combined in rank order (one
    /// all-gather of two numbers), so the two modes give the same bits. The norm can differ
    /// in its last bits from the one a single-process optimizer's own clip computes.
    pub fn step_with_options<A: Algorithm>(
        &mut self,
        opt: &mut Optimizer<T, A>,
        arena: &mut Arena<T>,
        options: StepOptions,
    ) -> Result<StepReport> {
        options.validate()?;
        self.average_gradients(arena)?;
        if options.clip.is_none() && !options.skip_non_finite {
            return opt.step_with_options(arena, options);
        }
        let shard = self.plan.shard(self.comm.rank());
        let in_groups = opt.grouped_positions();
        let flags = arena.grad_flags();
        let ranges = arena
            .infos()
            .iter()
            .enumerate()
            .filter(|&(i, _)| in_groups[i] && flags[i])
            .filter_map(|(_, info)| {
                let lo = info.offset.max(shard.start);
                let hi = (info.offset + info.len).min(shard.end);
                (lo < hi).then(|| lo - shard.start..hi - shard.start)
            });
        // In a world of one the averaging was skipped: the shard is the arena's gradients.
        let averaged: &[T] = if self.comm.size() == 1 {
            arena.grads()
        } else {
            &self.shard
        };
        let decision = self.flags.decide(
            &self.comm,
            averaged,
            ranges,
            options,
            opt.simd_level(),
            &mut self.norm_scratch,
        )?;
        let Some(grad_factor) = decision.grad_factor else {
            return Ok(decision.report());
        };
        opt.step_with_options(
            arena,
            StepOptions {
                grad_scale: grad_factor,
                skip_non_finite: false,
                clip: None,
            },
        )?;
        Ok(decision.report())
    }
}

/// A [`DataParallel`] and the optimizer it averages gradients for, as one stepper (for a
/// [`crate::GradScaler`]): see [`DataParallel::over`].
pub struct Synced<'a, C: Communicator, T: Float + CommElem, A: Algorithm> {
    dp: &'a mut DataParallel<C, T>,
    opt: &'a mut Optimizer<T, A>,
}

impl<C: Communicator, T: Float + CommElem, A: Algorithm> StepWithOptions<T>
    for Synced<'_, C, T, A>
{
    fn step_with_options(
        &mut self,
        arena: &mut Arena<T>,
        options: StepOptions,
    ) -> Result<StepReport> {
        self.dp.step_with_options(self.opt, arena, options)
    }
}

impl<C: Communicator, T: Float + CommElem> DataParallel<C, T> {
    /// This wrapper and `opt` as one stepper: `scaler.step(&mut dp.over(&mut opt), &mut
    /// arena)` averages, checks `found_inf` on the average (the same on every rank) and steps.
    pub fn over<'a, A: Algorithm>(
        &'a mut self,
        opt: &'a mut Optimizer<T, A>,
    ) -> Synced<'a, C, T, A> {
        Synced { dp: self, opt }
    }
}

/// Which parameters have a gradient on some rank: `presence_sum[i]` becomes the number of
/// ranks that gave parameter `i` one (one all-reduce), and a parameter that only other ranks
/// gave one gets a zero gradient here, so it counts as zeros in the sum.
pub(crate) fn agree_presence<C: Communicator, T: Float>(
    comm: &C,
    arena: &mut Arena<T>,
    presence: &mut [u64],
    presence_sum: &mut [u64],
) -> Result<()> {
    for (p, &has) in presence.iter_mut().zip(arena.grad_flags()) {
        *p = has as u64;
    }
    comm.all_reduce_sum(presence, presence_sum)?;
    for (i, (&local, &anywhere)) in presence.iter().zip(presence_sum.iter()).enumerate() {
        if local == 0 && anywhere > 0 {
            let handle = arena.param_at(i).expect("position in range");
            arena.grad_mut(handle);
        }
    }
    Ok(())
}

/// Sums `grads` over ranks into `shard` (this rank's block of `counts`) and divides by the
/// world size: rank order through `pieces` ([`Reduction::RankOrdered`]) or MPI's
/// reduce-scatter.
pub(crate) fn average_into<C: Communicator, T: Float + CommElem>(
    comm: &C,
    reduction: Reduction,
    grads: &[T],
    counts: &[usize],
    pieces: &mut Vec<T>,
    shard: &mut [T],
) -> Result<()> {
    let n = comm.size();
    let mine = counts[comm.rank()];
    match reduction {
        Reduction::RankOrdered => {
            pieces.resize(n * mine, T::ZERO);
            comm.all_to_all(grads, pieces, counts)?;
            shard.copy_from_slice(&pieces[..mine]);
            for r in 1..n {
                for (acc, &x) in shard.iter_mut().zip(&pieces[r * mine..]) {
                    *acc = *acc + x;
                }
            }
        }
        Reduction::Mpi => comm.reduce_scatter_sum(grads, shard, counts)?,
    }
    if n > 1 {
        let world = T::from_f64(n as f64);
        for x in shard.iter_mut() {
            *x = *x / world;
        }
    }
    Ok(())
}

/// The per-step decisions every rank must agree on, taken from each rank's part: whether a
/// gradient is non-finite anywhere, and the global clip norm.
pub(crate) struct StepFlags {
    gathered: Vec<f64>,
}

/// What [`StepFlags::decide`] decided.
pub(crate) struct Decision {
    /// The factor the update multiplies the gradients by; `None` to skip the step.
    pub(crate) grad_factor: Option<f64>,
    total_norm: Option<f64>,
}

impl Decision {
    pub(crate) fn report(&self) -> StepReport {
        StepReport {
            outcome: if self.grad_factor.is_some() {
                StepOutcome::Applied
            } else {
                StepOutcome::SkippedNonFinite
            },
            total_norm: self.total_norm,
            grad_factor: self.grad_factor.unwrap_or(0.0),
        }
    }
}

impl StepFlags {
    pub(crate) fn new(size: usize) -> Self {
        StepFlags {
            gathered: vec![0.0; 2 * size],
        }
    }

    /// From this rank's averaged gradients `grads[r]` (`ranges`: the parts of grouped
    /// parameters with a gradient), one all-gather of (non-finite flag, raw partial norm)
    /// per rank, combined in rank order: the same decision on every rank. A non-finite total
    /// norm with `error_if_nonfinite` is the same error on every rank.
    pub(crate) fn decide<C: Communicator, T: Float>(
        &mut self,
        comm: &C,
        grads: &[T],
        ranges: impl Iterator<Item = Range<usize>> + Clone,
        options: StepOptions,
        simd: SimdLevel,
        scratch: &mut Vec<Range<usize>>,
    ) -> Result<Decision> {
        let non_finite = options.skip_non_finite
            && ranges
                .clone()
                .any(|r| crate::kernels::any_non_finite(&grads[r]));
        let part = match options.clip {
            Some(clip) => raw_norm_part(grads, ranges, clip.norm_type, simd, scratch)?,
            None => 0.0,
        };
        let n = comm.size();
        comm.all_gather(
            &[f64::from(u8::from(non_finite)), part],
            &mut self.gathered,
            &vec![2; n],
        )?;
        if self.gathered.iter().step_by(2).any(|&f| f != 0.0) {
            return Ok(Decision {
                grad_factor: None,
                total_norm: None,
            });
        }
        let mut grad_factor = options.grad_scale;
        let mut total_norm = None;
        if let Some(clip) = options.clip {
            let parts: Vec<f64> = self.gathered.iter().skip(1).step_by(2).copied().collect();
            let norm = combine_raw_norms(&parts, clip.norm_type) * options.grad_scale.abs();
            grad_factor *= clip.coefficient_for(norm)?;
            total_norm = Some(norm);
        }
        Ok(Decision {
            grad_factor: Some(grad_factor),
            total_norm,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributed::threads::ThreadComm;
    use crate::optim::{AdamW, AdamWConfig};
    use crate::{ArenaBuilder, ParamGroup};

    fn model() -> Arena<f32> {
        let mut b = ArenaBuilder::<f32>::new();
        let w: Vec<f32> = (0..300).map(|i| ((i as f32) * 0.37).sin()).collect();
        b.param("w", &[20, 15], &w).unwrap();
        b.param("b", &[20], &w[..20]).unwrap();
        b.param("frozen", &[7], &w[..7]).unwrap();
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
                            let mut arena = model();
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
            let mut arena = model();
            let mut opt =
                AdamW::<f32>::new(&arena, [ParamGroup::all()], AdamWConfig::default()).unwrap();
            let mut scratch = model();
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
