//! The optimizer machinery shared by every elementwise algorithm: param groups, lazy state,
//! the fused parallel step, and `state_dict` / `load_state_dict`.
//!
//! An algorithm (SGD, Adam, ...) implements [`Algorithm`]: its config, the names of its state
//! buffers, the per-step scalars it computes once per group in f64, and two kernels over
//! contiguous slices, a fused SIMD one and a scalar reference. [`Optimizer`] does the rest.
//!
//! # How a step runs
//! 1. Every group's hyperparameters are checked; on an error nothing has changed.
//! 2. Parameters with a gradient get their state on first use, exactly as torch's lazy state
//!    init does. Parameters without one (`grad is None`) are skipped: no state, no step count,
//!    no weight decay.
//! 3. Parameters of a group that are consecutive in the arena and whose state agrees (same
//!    step count, same scalars) form a run. A group may hold any set of parameters (torch's
//!    decay / no-decay recipe interleaves two groups); it is laid out as its maximal runs of
//!    consecutive parameters, its state buffers holding them back to back, so a group
//!    registered in one piece has exactly the arena's layout. The algorithm's per-step scalars
//!    are computed once per run in f64.
//! 4. Runs are cut into pieces of [`CHUNK`](crate::parallel::CHUNK) elements (a multiple of
//!    it, up to 256K elements, for runs of 1M and more) and the fused kernel runs on each, on
//!    the [`Parallelism`] the optimizer was given. The piece length never depends on the thread
//!    count, so the result is bitwise the same on any number of threads; the kernels are
//!    elementwise, so a parameter's result does not depend on how its group is fragmented
//!    either.
//!
//! Once state exists a step allocates nothing: the work list is kept between steps.
//!
//! # Per-parameter algorithms
//! Most algorithms are elementwise, and the steps above cut runs anywhere. An algorithm whose
//! update needs reductions over each parameter (Adafactor's RMS scaling and its factored second
//! moments) sets [`Algorithm::PER_PARAMETER`]: then runs never merge parameters and are never
//! cut, so each kernel call gets exactly one whole parameter, and it gets the parameter's shape
//! too ([`Algorithm::fused_param`]). Such an algorithm may also keep *shaped* state
//! ([`Algorithm::aux_buffers`]): buffers whose length follows from the parameter's shape
//! instead of equalling it (Adafactor's `row_var` of shape `[..., m, 1]`). They live in one
//! more per-group buffer, each parameter's back to back, are created (zeroed) with the
//! parameter's state, and are saved and loaded by name beside the elementwise buffers.
//! Parameters then run in parallel with each other, each on one thread, and a kernel's
//! reductions run in a fixed order, so the result is still bitwise the same on any number of
//! threads. The elementwise algorithms are untouched by all of this: every addition has a
//! default that keeps their behaviour.

use std::ops::Range;

use crate::arch::SimdLevel;
use crate::arena::{AlignedBuf, Arena, Param, ParamInfo};
pub use crate::clip::ClipNorm;
use crate::clip::NormScratch;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::hyper::{GroupHyperparams, HyperValue, Hyperparams};
use crate::mixed::StatePrecision;
use crate::parallel::{Parallelism, PARALLEL_THRESHOLD};
use crate::subnormals::Subnormals;

mod algorithm;
mod checkpoint_access;
mod group;
mod half_step;
mod hooks;
pub(crate) mod load;
mod mixed_step;
mod param_group;
mod plan;
mod state_dict;
mod step;

pub(crate) use algorithm::aux_ranges;
pub use algorithm::{Algorithm, KernelArgs, ParamScalars, MAX_AUX_BUFFERS, MAX_BUFFERS};
pub(crate) use checkpoint_access::{SavedState, Staged, StateRef};
use group::{Group, ParamState};
pub use hooks::{HookHandle, StepHook};
use param_group::first_common;
pub(crate) use param_group::runs_of;
pub(crate) use param_group::Override;
pub use param_group::{ParamGroup, Untyped};
use plan::{MixedStreams, WorkItem};
pub use step::{StepOptions, StepOutcome, StepReport};

/// An optimizer: an [`Algorithm`] applied to param groups of one [`Arena`].
pub struct Optimizer<T: Float, A: Algorithm> {
    arena_id: u64,
    layout: Vec<ParamInfo>,
    defaults: A::Config,
    groups: Vec<Group<T, A>>,
    parallelism: Parallelism,
    subnormals: Subnormals,
    parallel_threshold: usize,
    /// From this many elements `step_mixed` streams the half copy (`mixed_step.rs`).
    stream_copy_threshold: usize,
    simd: SimdLevel,
    work: Vec<WorkItem<T, A::Coeffs>>,
    pre_hooks: Vec<(HookHandle, StepHook)>,
    post_hooks: Vec<(HookHandle, StepHook)>,
    next_hook: u64,
    /// Reused by clipped steps: the groups' runs and the norm's partial sums.
    norm_ranges: Vec<Range<usize>>,
    norm_scratch: NormScratch,
    /// torch's `group["initial_lr"]` per group, set by LR schedulers (`crate::schedule`).
    initial_lrs: Vec<Option<f64>>,
    /// The precision of the state buffers.
    state_precision: StatePrecision,
}

impl<T: Float, A: Algorithm> std::fmt::Debug for Optimizer<T, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct(A::NAME);
        d.field("dtype", &T::DTYPE)
            .field("defaults", &self.defaults);
        for (i, g) in self.groups.iter().enumerate() {
            d.field(&format!("group{i}"), &g.config);
        }
        d.finish()
    }
}

impl<T: Float, A: Algorithm> Optimizer<T, A> {
    /// Builds an optimizer over `groups` of `arena`, with `defaults` for every hyperparameter a
    /// group does not override (torch's constructor).
    ///
    /// Errors, as torch raises them: an empty list, a parameter in two groups or twice in one,
    /// an unknown hyperparameter name, an invalid value. A group may hold any set of the
    /// arena's parameters, in any layout (see [`ParamGroup::new`]).
    pub fn new(
        arena: &Arena<T>,
        groups: impl IntoIterator<Item = impl Into<ParamGroup<T, A::Config>>>,
        defaults: A::Config,
    ) -> Result<Self> {
        let mut opt = Self::without_groups(arena, defaults)?;
        let mut any = false;
        for g in groups {
            opt.add_param_group(arena, g.into())?;
            any = true;
        }
        if !any {
            return Err(Error::EmptyParamList);
        }
        Ok(opt)
    }

    /// An optimizer over `arena` with no group yet (groups follow through
    /// [`Optimizer::add_resolved_group`]).
    pub(crate) fn without_groups(arena: &Arena<T>, defaults: A::Config) -> Result<Self> {
        defaults.validate()?;
        Ok(Optimizer {
            arena_id: arena.id(),
            layout: arena.infos().to_vec(),
            defaults,
            groups: Vec::new(),
            parallelism: Parallelism::default(),
            subnormals: Subnormals::default(),
            parallel_threshold: PARALLEL_THRESHOLD,
            stream_copy_threshold: crate::mixed::STREAM_COPY_MIN_ELEMS,
            simd: SimdLevel::default(),
            work: Vec::new(),
            pre_hooks: Vec::new(),
            post_hooks: Vec::new(),
            next_hook: 0,
            norm_ranges: Vec::new(),
            norm_scratch: NormScratch::default(),
            initial_lrs: Vec::new(),
            state_precision: StatePrecision::Full,
        })
    }

    /// Adds a param group, for example to unfreeze layers mid-training. Its hyperparameters are
    /// the optimizer's defaults with the group's overrides on top.
    pub fn add_param_group(
        &mut self,
        arena: &Arena<T>,
        group: impl Into<ParamGroup<T, A::Config>>,
    ) -> Result<()> {
        let group = group.into();
        self.check_arena(arena)?;
        let params = group.resolve(arena)?;
        self.add_resolved_group(params, group.overrides())
    }

    /// Adds a group of the parameters at arena positions `params` (ascending, no duplicates),
    /// which may be empty: a sharded optimizer keeps every group on every rank, also where
    /// the rank's shard holds none of its parameters, so that group indices (and schedulers)
    /// agree across ranks.
    pub(crate) fn add_resolved_group(
        &mut self,
        params: Vec<usize>,
        overrides: &[Override<A::Config>],
    ) -> Result<()> {
        for g in &self.groups {
            if let Some(i) = first_common(&params, &g.params) {
                return Err(Error::ParamInTwoGroups {
                    name: self.layout[i].name.clone(),
                });
            }
        }
        let mut config = self.defaults.clone();
        for o in overrides {
            o.apply(&mut config)?;
        }
        config.validate()?;
        for &i in &params {
            A::check_param(&self.layout[i].shape)?;
        }
        let runs = runs_of(&params);
        let mut locals = Vec::with_capacity(params.len());
        let mut len = 0;
        for &i in &params {
            locals.push(len);
            len += self.layout[i].len;
        }
        let mut aux_offsets = Vec::with_capacity(params.len() + 1);
        let mut at = 0;
        aux_offsets.push(at);
        for &i in &params {
            at += aux_ranges::<A>(&self.layout[i].shape, 0)
                .map(|r| r.len())
                .sum::<usize>();
            aux_offsets.push(at);
        }
        self.groups.push(Group {
            config,
            state: vec![None; params.len()],
            params,
            runs,
            locals,
            len,
            buffers: Vec::new(),
            half_buffers: Vec::new(),
            aux_offsets,
            aux: AlignedBuf::empty(),
        });
        Ok(())
    }

    /// Chooses where steps run (default: rayon's global pool).
    pub fn set_parallelism(&mut self, parallelism: Parallelism) {
        self.parallelism = parallelism;
    }

    /// Builder form of [`Optimizer::set_parallelism`].
    pub fn with_parallelism(mut self, parallelism: Parallelism) -> Self {
        self.parallelism = parallelism;
        self
    }

    /// Steps over fewer elements than this (summed over the groups) run on the calling thread;
    /// larger ones go to the [`Parallelism`]'s pool, in one hand-off. The default,
    /// [`PARALLEL_THRESHOLD`], is where the pool starts to pay in a training loop, whose pool
    /// falls asleep between steps; `0` always uses the pool, `usize::MAX` never does. Results
    /// are bitwise the same either way.
    pub fn set_parallel_threshold(&mut self, elems: usize) {
        self.parallel_threshold = elems;
    }

    /// Chooses what steps do with subnormal numbers (default: [`Subnormals::Flush`], flushed
    /// to zero inside the step's kernels; [`Subnormals::Preserve`] for bit-exact torch parity
    /// in subnormal ranges). See [`crate::subnormals`] for why flushing is harmless.
    pub fn set_subnormals(&mut self, subnormals: Subnormals) {
        self.subnormals = subnormals;
    }

    /// Builder form of [`Optimizer::set_subnormals`].
    pub fn with_subnormals(mut self, subnormals: Subnormals) -> Self {
        self.subnormals = subnormals;
        self
    }

    /// What steps do with subnormal numbers: the mode set, or [`Subnormals::Preserve`] for an
    /// algorithm whose update needs them ([`Algorithm::NEEDS_SUBNORMALS`]: Rprop).
    pub fn subnormals(&self) -> Subnormals {
        if A::NEEDS_SUBNORMALS {
            Subnormals::Preserve
        } else {
            self.subnormals
        }
    }

    /// Caps the instruction set the kernels and the clipping norm use (default
    /// [`SimdLevel::Best`]: everything the CPU has). Results are bitwise the same at every
    /// level; the cap is for benchmarks and tests.
    pub fn set_simd_level(&mut self, simd: SimdLevel) {
        self.simd = simd;
    }

    /// Builder form of [`Optimizer::set_simd_level`].
    pub fn with_simd_level(mut self, simd: SimdLevel) -> Self {
        self.simd = simd;
        self
    }

    /// The instruction-set cap (see [`Optimizer::set_simd_level`]).
    pub fn simd_level(&self) -> SimdLevel {
        self.simd
    }

    /// Bytes of optimizer state held: every group's state buffers and shaped state (zero
    /// before the first step creates them).
    pub fn state_bytes(&self) -> usize {
        self.groups
            .iter()
            .map(|g| g.buffers.iter().map(|b| b.len()).sum::<usize>() + g.aux.len())
            .sum::<usize>()
            * std::mem::size_of::<T>()
    }

    /// `out[i]` is true when the parameter at arena position `i` belongs to a group.
    pub(crate) fn grouped_positions(&self) -> Vec<bool> {
        let mut out = vec![false; self.layout.len()];
        for g in &self.groups {
            for &i in &g.params {
                out[i] = true;
            }
        }
        out
    }

    /// The constructor defaults.
    pub fn defaults(&self) -> &A::Config {
        &self.defaults
    }

    /// Number of param groups.
    pub fn num_groups(&self) -> usize {
        self.groups.len()
    }

    fn group_ref(&self, index: usize) -> Result<&Group<T, A>> {
        self.groups.get(index).ok_or(Error::NoSuchGroup {
            index,
            count: self.groups.len(),
        })
    }

    /// The hyperparameters of group `index`.
    pub fn group_config(&self, index: usize) -> Result<&A::Config> {
        Ok(&self.group_ref(index)?.config)
    }

    /// Replaces the hyperparameters of group `index`, after checking them.
    pub fn set_group_config(&mut self, index: usize, config: A::Config) -> Result<()> {
        self.group_ref(index)?;
        config.validate()?;
        let g = &self.groups[index];
        if !g.half_buffers.is_empty() && A::buffers(&g.config) != A::buffers(&config) {
            return Err(Error::MixedPrecision(format!(
                "{} keeps bf16 state; a config that changes its buffers ({:?} -> {:?}) is not \
                 supported with bf16 state yet",
                A::NAME,
                A::buffers(&g.config),
                A::buffers(&config)
            )));
        }
        let old = std::mem::replace(&mut self.groups[index].config, config);
        self.groups[index].relayout_buffers(&old);
        Ok(())
    }

    /// Changes the hyperparameters of group `index` by a closure over its config (checked by
    /// the compiler, as [`ParamGroup::configure`]), then validates them; an invalid result is
    /// an error and leaves the group as it was.
    ///
    /// ```
    /// use optarena::{Adam, AdamConfig, ArenaBuilder, ParamGroup};
    /// let mut b = ArenaBuilder::<f32>::new();
    /// b.zeros("w", &[4])?;
    /// let arena = b.build();
    /// let mut opt = Adam::new(&arena, [ParamGroup::all()], AdamConfig::default())?;
    /// opt.configure_group(0, |c| c.betas = (0.95, 0.999))?;
    /// assert!(opt.configure_group(0, |c| c.eps = -1.0).is_err());
    /// assert_eq!(opt.group_config(0)?.betas, (0.95, 0.999));
    /// # Ok::<(), optarena::Error>(())
    /// ```
    pub fn configure_group(&mut self, index: usize, f: impl FnOnce(&mut A::Config)) -> Result<()> {
        let mut config = self.group_ref(index)?.config.clone();
        f(&mut config);
        self.set_group_config(index, config)
    }

    /// The layout of group `index`: the maximal runs of consecutive arena positions its
    /// parameters fill, ascending. A group whose parameters were registered one after another
    /// is one run; torch's weight-decay recipe over a model registered in its natural order
    /// gives many. The slice fits the clipping functions of [`crate::clip`] as it is.
    pub fn group_params(&self, index: usize) -> Result<&[Range<usize>]> {
        Ok(&self.group_ref(index)?.runs)
    }

    /// The handles of group `index`'s parameters, in arena order (the order
    /// [`Optimizer::state_dict`] numbers them in).
    pub fn group_handles(&self, index: usize) -> Result<impl Iterator<Item = Param<T>> + '_> {
        let arena_id = self.arena_id;
        Ok(self
            .group_ref(index)?
            .params
            .iter()
            .map(move |&i| Param::from_parts(i, arena_id)))
    }

    /// One hyperparameter of group `index`, by torch's name.
    pub fn hyper(&self, index: usize, name: &str) -> Result<HyperValue> {
        self.group_ref(index)?.config.get(name)
    }

    /// Sets one hyperparameter of group `index` by torch's name. An unknown name or an invalid
    /// value is an error and leaves the group as it was.
    pub fn set_hyper(
        &mut self,
        index: usize,
        name: &str,
        value: impl Into<HyperValue>,
    ) -> Result<()> {
        let mut config = self.group_ref(index)?.config.clone();
        config.set(name, &value.into())?;
        config.validate()?;
        let old = std::mem::replace(&mut self.groups[index].config, config);
        self.groups[index].relayout_buffers(&old);
        Ok(())
    }

    /// The learning rate of group `index`.
    pub fn lr(&self, index: usize) -> Result<f64> {
        match self.hyper(index, "lr")? {
            HyperValue::Number(x) => Ok(x),
            other => Err(Error::HyperparameterType {
                name: "lr".into(),
                expected: "a number",
                got: other.to_string(),
            }),
        }
    }

    /// Sets the learning rate of group `index`: the one way to set an lr on an optimizer
    /// ([`Optimizer::set_hyper`] sets any hyperparameter by torch's name;
    /// [`GroupHyperparams::set_lr`], the same name and meaning, serves code generic over
    /// optimizers, such as schedulers and hooks).
    pub fn set_lr(&mut self, index: usize, lr: f64) -> Result<()> {
        self.set_hyper(index, "lr", lr)
    }

    /// Errors unless the state buffers are in full precision: `what` (a plain f32 step) has
    /// no bf16-state version.
    pub(crate) fn check_full_state(&self, what: &str) -> Result<()> {
        if self.state_precision != StatePrecision::Full {
            return Err(Error::MixedPrecision(format!(
                "this {} optimizer keeps bf16 state: {what} is not supported with it (step \
                 with `step_mixed`)",
                A::NAME
            )));
        }
        Ok(())
    }

    fn check_arena(&self, arena: &Arena<T>) -> Result<()> {
        if arena.id() != self.arena_id {
            return Err(Error::ArenaMismatch(format!(
                "this {} optimizer was built for another arena",
                A::NAME
            )));
        }
        Ok(())
    }

    /// Zeroes (`set_to_none = false`) or removes (`true`) the gradients of this optimizer's
    /// parameters, as `torch.optim.Optimizer.zero_grad` does.
    pub fn zero_grad(&self, arena: &mut Arena<T>, set_to_none: bool) -> Result<()> {
        self.check_arena(arena)?;
        for r in self.groups.iter().flat_map(|g| &g.runs) {
            arena.zero_grad_range(r.clone(), set_to_none);
        }
        Ok(())
    }
}

impl<T: Float, A: Algorithm> GroupHyperparams for Optimizer<T, A> {
    fn num_groups(&self) -> usize {
        self.groups.len()
    }
    fn group_hyper(&self, group: usize, name: &str) -> Result<HyperValue> {
        self.hyper(group, name)
    }
    fn set_group_hyper(&mut self, group: usize, name: &str, value: HyperValue) -> Result<()> {
        self.set_hyper(group, name, value)
    }
    fn group_initial_lr(&self, group: usize) -> Result<Option<f64>> {
        self.group_ref(group)?;
        Ok(self.initial_lrs.get(group).copied().flatten())
    }
    fn set_group_initial_lr(&mut self, group: usize, initial_lr: Option<f64>) -> Result<()> {
        self.group_ref(group)?;
        if self.initial_lrs.len() <= group {
            self.initial_lrs.resize(group + 1, None);
        }
        self.initial_lrs[group] = initial_lr;
        Ok(())
    }
}
