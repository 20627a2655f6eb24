//! ZeRO stage 1 (Rajbhandari et al., *ZeRO: Memory Optimizations Toward Training Trillion
//! Parameter Models*, SC 2020; torch's `ZeroRedundancyOptimizer`): every rank keeps optimizer
//! state for its own contiguous shard of the arena only, and updates only that shard.

use std::ops::Range;

use std::path::Path;

use super::checkpoint::{
    assemble, check_compatible, collectively, group_positions, piece_arena, piece_optimizer,
    save_shards, shard_file, single_file_manifest, Manifest, ShardEntry, MANIFEST_FORMAT,
    MANIFEST_VERSION,
};
use super::comm::{check_same_everywhere, CommElem, Communicator, Reduction};
use super::replicated::{agree_presence, average_into, fingerprint, StepFlags};
use super::shard::ShardPlan;
use crate::arch::SimdLevel;
use crate::arena::{Arena, ParamInfo};
use crate::error::{Error, Result};
use crate::float::Float;
use crate::hyper::{GroupHyperparams, HyperValue};
use crate::optimizer::{
    Algorithm, Optimizer, Override, ParamGroup, StepOptions, StepOutcome, StepReport,
};
use crate::parallel::Parallelism;
use crate::scaler::StepWithOptions;
use crate::state::MatchBy;
use crate::subnormals::Subnormals;

/// An optimizer whose state is sharded over the ranks of a [`Communicator`] (ZeRO-1).
///
/// Each step moves the same bytes as a ring all-reduce, `2 (N - 1) / N` times the arena per
/// rank: one reduce-scatter of the gradients (each rank receives the sum of its shard, then
/// divides by the world size), the update of the rank's shard only, and one all-gather of the
/// updated parameters into every rank's arena. Optimizer state (Adam's two moments, ...)
/// exists for the rank's shard only: `1 / N` of it per rank.
///
/// Shards are [`ShardPlan::balanced`] (cache-line aligned, cutting parameters anywhere) for
/// elementwise algorithms; algorithms whose update needs a whole parameter (Adafactor, Muon)
/// shard at parameter boundaries. Every rank keeps every param group, also where its shard
/// holds none of the group's parameters, so group indices, `set_lr` and LR schedulers (it
/// implements [`GroupHyperparams`]) behave on every rank alike.
///
/// With [`Reduction::RankOrdered`] the parameters are bitwise those of [`super::DataParallel`]
/// at the same world size, clipping and non-finite skipping included: both compute the
/// global norm from each rank's part of its shard, combined in rank order (one all-gather of
/// two numbers per rank, which is also how every rank agrees to skip a step with a non-finite
/// gradient). That norm can differ in the last bits from the single-process optimizer's own
/// clip, which sums the same partial norms in another order.
///
/// L-BFGS is refused at compile time: it is not an elementwise [`Algorithm`] (its line search
/// re-evaluates the loss, which would need collectives of its own):
///
/// ```compile_fail
/// use optarena::distributed::{ShardedOptimizer, SingleProcess};
/// let _ = ShardedOptimizer::<SingleProcess, f32, optarena::LBFGS<f32>>::new;
/// ```
///
/// The arena's gradients are read, not rewritten (a parameter that only other ranks gave a
/// gradient gets a zero one here): the averaged gradients live in the shard only.
pub struct ShardedOptimizer<C: Communicator, T: Float + CommElem, A: Algorithm> {
    comm: C,
    reduction: Reduction,
    arena_id: u64,
    layout: Vec<ParamInfo>,
    plan: ShardPlan,
    counts: Vec<usize>,
    /// The full arena's parameter behind each parameter (piece) of `shard_arena`.
    piece_param: Vec<usize>,
    /// Each piece's arena position and element range (arena coordinates).
    pieces_elems: Vec<(usize, Range<usize>)>,
    /// Each group's parameters (arena positions).
    group_members: Vec<Vec<usize>>,
    /// Per piece: whether its parameter is in a group (the groups are fixed at construction).
    in_groups: Vec<bool>,
    defaults: A::Config,
    /// This rank's shard: the pieces of the parameters it covers, laid out as in the arena.
    shard_arena: Arena<T>,
    inner: Optimizer<T, A>,
    /// Every rank's piece of this rank's shard ([`Reduction::RankOrdered`]).
    pieces: Vec<T>,
    presence: Vec<u64>,
    presence_sum: Vec<u64>,
    norm_scratch: Vec<Range<usize>>,
    flags: StepFlags,
}

impl<C: Communicator, T: Float + CommElem, A: Algorithm> std::fmt::Debug
    for ShardedOptimizer<C, T, A>
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedOptimizer")
            .field("algorithm", &A::NAME)
            .field("rank", &self.comm.rank())
            .field("size", &self.comm.size())
            .field("shard", &self.plan.shard(self.comm.rank()))
            .finish()
    }
}

impl<C: Communicator, T: Float + CommElem, A: Algorithm> ShardedOptimizer<C, T, A> {
    /// Builds the optimizer over `groups` of `arena` (torch's constructor and errors), with
    /// state for this rank's shard only, after checking that every rank built the same arena
    /// layout, groups and hyperparameters (a mismatch is the same error on every rank). Every
    /// rank must call it.
    pub fn new(
        comm: C,
        arena: &Arena<T>,
        groups: impl IntoIterator<Item = impl Into<ParamGroup<T, A::Config>>>,
        defaults: A::Config,
    ) -> Result<Self> {
        let groups: Vec<ParamGroup<T, A::Config>> = groups.into_iter().map(Into::into).collect();
        // The whole optimizer validates everything as torch does (its state is allocated
        // lazily, so this costs no buffers) and names the groups for the fingerprint.
        let full = Optimizer::<T, A>::new(arena, groups.iter().cloned(), defaults.clone())?;
        check_same_everywhere(
            &comm,
            fingerprint(arena, &full)?,
            "arena layout or optimizer",
        )?;
        let rank = comm.rank();
        let plan = if A::PER_PARAMETER {
            ShardPlan::at_param_boundaries(arena.infos(), comm.size())
        } else {
            ShardPlan::balanced(arena.len(), comm.size(), std::mem::size_of::<T>())
        };
        let pieces = plan.pieces(arena.infos(), rank);
        let shard_arena = piece_arena(arena.infos(), &pieces, |_, e| arena.params()[e].to_vec())?;
        let group_members = group_positions(&full)?;
        let overrides: Vec<Vec<Override<A::Config>>> =
            groups.iter().map(|g| g.overrides().to_vec()).collect();
        let inner = piece_optimizer::<T, A>(
            &shard_arena,
            &pieces,
            &group_members,
            &overrides,
            defaults.clone(),
        )?;
        let n = comm.size();
        let counts = plan.counts();
        Ok(ShardedOptimizer {
            reduction: Reduction::default(),
            arena_id: arena.id(),
            layout: arena.infos().to_vec(),
            pieces: Vec::with_capacity(n * counts[rank]),
            presence: vec![0; arena.num_params()],
            presence_sum: vec![0; arena.num_params()],
            norm_scratch: Vec::new(),
            flags: StepFlags::new(n),
            plan,
            counts,
            in_groups: inner.grouped_positions(),
            piece_param: pieces.iter().map(|(i, _)| *i).collect(),
            pieces_elems: pieces,
            group_members,
            defaults,
            shard_arena,
            inner,
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

    /// The shards of the arena, one per rank.
    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    /// This rank's shard: its parameters (pieces of the arena's, named as there) and their
    /// averaged gradients after a step.
    pub fn shard_arena(&self) -> &Arena<T> {
        &self.shard_arena
    }

    /// The optimizer over this rank's shard (its state is this rank's part of the state).
    pub fn shard_optimizer(&self) -> &Optimizer<T, A> {
        &self.inner
    }

    /// Bytes of optimizer state this rank holds (its shard's buffers).
    pub fn state_bytes(&self) -> usize {
        self.inner.state_bytes()
    }

    /// Bytes this rank sends per step: its pieces of the other shards (reduce-scatter) and its
    /// updated shard to the `N - 1` others (all-gather), plus the per-parameter gradient
    /// presence and two numbers for the clip norm and the non-finite check.
    pub fn bytes_sent_per_step(&self) -> usize {
        let n = self.comm.size();
        let mine = self.counts[self.comm.rank()];
        let others = self.plan.len() - mine;
        (others + mine * (n - 1)) * std::mem::size_of::<T>() + self.presence.len() * 8 + 16
    }

    /// Where the shard's steps run (as [`Optimizer::set_parallelism`]).
    pub fn set_parallelism(&mut self, parallelism: Parallelism) {
        self.inner.set_parallelism(parallelism);
    }

    /// The subnormal mode of the shard's steps (as [`Optimizer::set_subnormals`]).
    pub fn set_subnormals(&mut self, subnormals: Subnormals) {
        self.inner.set_subnormals(subnormals);
    }

    /// The widest SIMD level the shard's steps use (as [`Optimizer::set_simd_level`]).
    pub fn set_simd_level(&mut self, simd: SimdLevel) {
        self.inner.set_simd_level(simd);
    }

    /// Group `index`'s learning rate.
    pub fn lr(&self, index: usize) -> Result<f64> {
        self.inner.lr(index)
    }

    /// Sets group `index`'s learning rate (on every rank alike), as [`Optimizer::set_lr`] and,
    /// for code generic over optimizers, [`GroupHyperparams::set_lr`].
    pub fn set_lr(&mut self, index: usize, lr: f64) -> Result<()> {
        self.inner.set_lr(index, lr)
    }

    /// One step with torch's defaults: average the gradients, update this rank's shard,
    /// gather the parameters. Every rank must call it.
    pub fn step(&mut self, arena: &mut Arena<T>) -> Result<StepReport> {
        self.step_with_options(arena, StepOptions::default())
    }

    /// A step with [`StepOptions::skipping_non_finite`](crate::StepOptions::skipping_non_finite) over the ranks: skips the step on every rank when any rank's averaged
    /// gradients hold a NaN or an infinity (nothing changes anywhere). Every rank must call it.
    pub fn step_checked(&mut self, arena: &mut Arena<T>) -> Result<StepOutcome> {
        let options = StepOptions {
            skip_non_finite: true,
            ..StepOptions::default()
        };
        Ok(self.step_with_options(arena, options)?.outcome)
    }

    /// One step with `options` (clip by the global norm, skip non-finite gradients, a
    /// gradient scale). The outcome is the same on every rank. Every rank must call it.
    pub fn step_with_options(
        &mut self,
        arena: &mut Arena<T>,
        options: StepOptions,
    ) -> Result<StepReport> {
        if arena.id() != self.arena_id || !arena.same_layout(&self.layout) {
            return Err(Error::ArenaMismatch(format!(
                "this sharded {} optimizer was built for another arena",
                A::NAME
            )));
        }
        options.validate()?;
        let n = self.comm.size();
        agree_presence(
            &self.comm,
            arena,
            &mut self.presence,
            &mut self.presence_sum,
        )?;
        for (piece, &i) in self.piece_param.iter().enumerate() {
            let handle = self.shard_arena.param_at(piece).expect("piece position");
            if self.presence_sum[i] > 0 {
                self.shard_arena.grad_mut(handle);
            } else {
                self.shard_arena.clear_grad(handle);
            }
        }
        let shard_len = self.shard_arena.len();
        average_into(
            &self.comm,
            self.reduction,
            arena.grads(),
            &self.counts,
            &mut self.pieces,
            self.shard_arena.grads_raw_mut(0..shard_len),
        )?;
        // The step's global decisions, from this rank's part of its shard.
        let in_groups = &self.in_groups;
        let flags = self.shard_arena.grad_flags();
        let ranges = (0..self.piece_param.len())
            .filter(|&p| in_groups[p] && flags[p])
            .map(|p| self.shard_arena.infos()[p].range());
        let decision = self.flags.decide(
            &self.comm,
            self.shard_arena.grads(),
            ranges,
            options,
            self.inner.simd_level(),
            &mut self.norm_scratch,
        )?;
        let Some(grad_factor) = decision.grad_factor else {
            return Ok(decision.report());
        };
        self.inner.step_with_options(
            &mut self.shard_arena,
            StepOptions {
                grad_scale: grad_factor,
                skip_non_finite: false,
                clip: None,
            },
        )?;
        if n == 1 {
            arena
                .params_mut()
                .copy_from_slice(self.shard_arena.params());
        } else {
            self.comm
                .all_gather(self.shard_arena.params(), arena.params_mut(), &self.counts)?;
        }
        Ok(decision.report())
    }
}

impl<C: Communicator, T: Float + CommElem, A: Algorithm> ShardedOptimizer<C, T, A> {
    /// The manifest of a checkpoint of this run.
    fn manifest(&self) -> Manifest {
        let n = self.comm.size();
        Manifest {
            format: MANIFEST_FORMAT.into(),
            version: MANIFEST_VERSION,
            optimizer: A::NAME.into(),
            dtype: T::DTYPE.into(),
            world_size: n,
            layout: self.layout.clone(),
            groups: self.group_members.clone(),
            shards: (0..n)
                .map(|r| {
                    let pieces = self.plan.pieces(&self.layout, r);
                    ShardEntry {
                        file: (!pieces.is_empty()).then(|| shard_file(r)),
                        elems: self.plan.shard(r),
                        pieces,
                    }
                })
                .collect(),
        }
    }

    /// Saves a sharded checkpoint into directory `dir`: every rank its shard's state and
    /// parameter values, rank 0 the manifest, committed atomically when all have written (see
    /// [`super::checkpoint`]). Collective: every rank must call it; on an error on any rank,
    /// every rank gets an error and `dir` is as it was.
    pub fn save_sharded(&self, dir: impl AsRef<Path>) -> Result<()> {
        save_shards(
            &self.comm,
            dir.as_ref(),
            &self.manifest(),
            &self.inner,
            &self.shard_arena,
        )
    }

    /// Loads a sharded checkpoint written at any world size (by [`Self::save_sharded`]) into
    /// this run: each rank rebuilds its shard's state and parameters from the files that
    /// overlap it, then the parameters are gathered into every rank's `arena`. Collective; on
    /// an error on any rank, every rank gets an error and nothing has changed.
    pub fn load_sharded(&mut self, dir: impl AsRef<Path>, arena: &mut Arena<T>) -> Result<()> {
        let dir = dir.as_ref();
        self.load_from(arena, |me| {
            let manifest = Manifest::read(dir)?;
            Ok((dir.to_path_buf(), manifest, me))
        })
    }

    /// Loads a single-process binary checkpoint (saved by [`Optimizer::save_checkpoint`] with
    /// the arena) into this sharded run. Collective, all or nothing as
    /// [`Self::load_sharded`].
    pub fn load_single(&mut self, path: impl AsRef<Path>, arena: &mut Arena<T>) -> Result<()> {
        let path = path.as_ref();
        self.load_from(arena, |me| {
            let (dir, manifest) =
                single_file_manifest::<T, A>(path, &me.layout, me.group_members.clone())?;
            Ok((dir, manifest, me))
        })
    }

    fn load_from(
        &mut self,
        arena: &mut Arena<T>,
        find: impl FnOnce(&Self) -> Result<(std::path::PathBuf, Manifest, &Self)>,
    ) -> Result<()> {
        if arena.id() != self.arena_id || !arena.same_layout(&self.layout) {
            return Err(Error::ArenaMismatch(format!(
                "this sharded {} optimizer was built for another arena",
                A::NAME
            )));
        }
        let prepared = collectively(&self.comm, "loading the checkpoint", || {
            let (dir, manifest, me) = find(self)?;
            check_compatible(&manifest, &me.layout, &me.group_members, T::DTYPE)?;
            let (sd, values) =
                assemble::<T, A>(&dir, &manifest, &me.pieces_elems, &me.inner, &me.defaults)?;
            // Staged: a scratch optimizer takes the state first, so a refusal changes nothing.
            let mut staged = piece_optimizer::<T, A>(
                &me.shard_arena,
                &me.pieces_elems,
                &me.group_members,
                &[],
                me.defaults.clone(),
            )?;
            staged.load_state_dict(&sd, MatchBy::Name)?;
            Ok((sd, values))
        })?;
        let (sd, values) = prepared;
        self.inner.load_state_dict(&sd, MatchBy::Name)?;
        self.shard_arena.params_mut().copy_from_slice(&values);
        if self.comm.size() == 1 {
            arena
                .params_mut()
                .copy_from_slice(self.shard_arena.params());
        } else {
            self.comm
                .all_gather(self.shard_arena.params(), arena.params_mut(), &self.counts)?;
        }
        Ok(())
    }
}

impl<C: Communicator, T: Float + CommElem, A: Algorithm> StepWithOptions<T>
    for ShardedOptimizer<C, T, A>
{
    fn step_with_options(
        &mut self,
        arena: &mut Arena<T>,
        options: StepOptions,
    ) -> Result<StepReport> {
        ShardedOptimizer::step_with_options(self, arena, options)
    }
}

impl<C: Communicator, T: Float + CommElem, A: Algorithm> GroupHyperparams
    for ShardedOptimizer<C, T, A>
{
    fn num_groups(&self) -> usize {
        self.inner.num_groups()
    }
    fn group_hyper(&self, group: usize, name: &str) -> Result<HyperValue> {
        self.inner.group_hyper(group, name)
    }
    fn set_group_hyper(&mut self, group: usize, name: &str, value: HyperValue) -> Result<()> {
        self.inner.set_group_hyper(group, name, value)
    }
    fn group_initial_lr(&self, group: usize) -> Result<Option<f64>> {
        self.inner.group_initial_lr(group)
    }
    fn set_group_initial_lr(&mut self, group: usize, initial_lr: Option<f64>) -> Result<()> {
        self.inner.set_group_initial_lr(group, initial_lr)
    }
}
