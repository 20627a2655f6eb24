//! [`AveragedModel`]: torch's `torch.optim.swa_utils.AveragedModel` over an [`Arena`]: a
//! running average of the model's parameters (Stochastic Weight Averaging, or an exponential
//! moving average), kept in a second arena-shaped buffer.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::arch::SimdLevel;
use crate::arena::{AlignedBuf, Arena, Param, ParamInfo};
use crate::buffer::Role;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::kernels::average;
use crate::optimizer::load::match_model;
use crate::parallel::{piece_len, Parallelism, PARALLEL_THRESHOLD};
use crate::subnormals::Subnormals;

/// Version of the [`AveragedModel`] state layout, saved as `"format"`.
pub const AVERAGED_STATE_FORMAT: u32 = 1;

/// How [`AveragedModel::update_parameters`] averages.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "avg", rename_all = "lowercase")]
pub enum AverageFn {
    /// torch's default (`avg_fn=None`): the equal running mean of every model averaged,
    /// `averaged ← averaged + (param − averaged) / (n_averaged + 1)`.
    Swa,
    /// torch's `get_ema_multi_avg_fn(decay)`:
    /// `averaged ← averaged.lerp(param, 1 − decay)`
    /// `= decay · averaged + (1 − decay) · param`.
    Ema {
        /// The weight of the old average, in `[0, 1]` (torch's default 0.999).
        decay: f64,
    },
}

impl AverageFn {
    /// torch's `get_ema_multi_avg_fn(decay)`, with its check and message.
    pub fn ema(decay: f64) -> Result<Self> {
        // `!(0 <= d <= 1)` also rejects NaN, which torch's `d < 0.0 or d > 1.0` lets through.
        if !(0.0..=1.0).contains(&decay) {
            return Err(Error::InvalidHyperparameter(format!(
                "Invalid decay value {decay:?} provided. Please provide a value in [0,1] range."
            )));
        }
        Ok(AverageFn::Ema { decay })
    }

    fn check(self) -> Result<()> {
        match self {
            AverageFn::Swa => Ok(()),
            AverageFn::Ema { decay } => Self::ema(decay).map(|_| ()),
        }
    }
}

/// A running average of an [`Arena`]'s parameters: torch's `AveragedModel` for Stochastic
/// Weight Averaging (Izmailov, Podoprikhin, Garipov, Vetrov & Wilson, "Averaging Weights Leads
/// to Wider Optima and Better Generalization", UAI 2018, <https://arxiv.org/abs/1803.05407>)
/// and for exponential moving averages of the weights (Polyak averaging with exponential
/// weights).
///
/// The averaged copy is a second buffer shaped like the arena (aligned like it). Each
/// [`update_parameters`](Self::update_parameters) is one fused SIMD pass over it and the
/// arena's parameters, cut into pieces as a step cuts a run of the arena's length (16K
/// elements, longer for 1M and more; never depending on the thread count) and spread over the
/// [`Parallelism`], so the result is bitwise the same for any thread count:
///
/// ```text
/// n_averaged == 0:  averaged ← param                          (torch copies on the first call)
/// SWA:              averaged ← averaged + (param − averaged) / (n_averaged + 1)
/// EMA(decay):       averaged ← averaged.lerp(param, 1 − decay)
/// then              n_averaged ← n_averaged + 1
/// ```
///
/// Like torch's, the averaged copy starts as a copy of the model (`deepcopy`), and
/// `n_averaged` is part of its state ([`state_dict`](Self::state_dict) as JSON, or a binary
/// checkpoint with torch's `module.<name>` and `n_averaged` keys:
/// [`save_checkpoint`](Self::save_checkpoint), see [`crate::checkpoint::averaged`]).
///
/// # Evaluating with the averaged weights
/// [`swap_into`](Self::swap_into) exchanges the arena's parameter values with the averaged
/// copy (O(1): the buffers trade places); run the forward pass, then call it again to swap the
/// training weights back. While swapped, [`update_parameters`](Self::update_parameters) and
/// [`state_dict`](Self::state_dict) refuse (they would average or save the training weights).
/// [`copy_into`](Self::copy_into) instead overwrites the arena with the averaged weights for
/// good (the end of training).
///
/// # `update_bn`
/// torch's `update_bn(loader, model)` recomputes batch-norm running statistics for the
/// averaged weights, which were never used in a forward pass. It is model code, not optimizer
/// code, so optarena has none; with a model whose batch-norm buffers live outside the arena:
/// 1. `swa.swap_into(&mut arena)?` (or `copy_into` at the end of training);
/// 2. reset every batch-norm layer's `running_mean` to 0 and `running_var` to 1, and set its
///    momentum to "cumulative average" (torch sets `momentum = None`: the running statistics
///    become the plain mean over all batches seen);
/// 3. run the model's forward pass in training mode over the training data once, no
///    gradients, no optimizer step;
/// 4. restore the momenta, and `swa.swap_into(&mut arena)?` again if training continues.
///
/// ```
/// use optarena::{AveragedModel, ArenaBuilder, ParamGroup, SGD, SGDConfig};
///
/// let mut b = ArenaBuilder::<f32>::new();
/// let w = b.param("w", &[2], &[1.0, 2.0])?;
/// let mut arena = b.build();
/// let mut opt = SGD::new(&arena, [ParamGroup::all()], SGDConfig::default().with_lr(0.5))?;
/// let mut swa = AveragedModel::new(&arena);                  // torch: AveragedModel(model)
/// for epoch in 0..4 {
///     arena.grad_mut(w).copy_from_slice(&[1.0, -1.0]);
///     opt.step(&mut arena)?;
///     if epoch >= 2 {
///         swa.update_parameters(&arena)?;                    // the mean of epochs 2 and 3
///     }
/// }
/// assert_eq!(swa.n_averaged(), 2);
/// assert_eq!(swa.value(&arena, w)?, [-0.75, 3.75]);
/// swa.swap_into(&mut arena)?;                                // evaluate the averaged weights
/// assert_eq!(arena.value(w), [-0.75, 3.75]);
/// swa.swap_into(&mut arena)?;                                // and back to training
/// assert_eq!(arena.value(w), [-1.0, 4.0]);
/// # Ok::<(), optarena::Error>(())
/// ```
pub struct AveragedModel<T: Float> {
    averaged: AlignedBuf<T>,
    /// The averaged buffer cut into pieces as a step cuts a run of its length, the units of
    /// parallel work.
    chunks: Vec<Range<usize>>,
    layout: Vec<ParamInfo>,
    avg: AverageFn,
    n_averaged: u64,
    swapped: bool,
    parallelism: Parallelism,
    parallel_threshold: usize,
    simd: SimdLevel,
}

/// The averaged buffer's base pointer, shared by the threads of one update (each writes only
/// its own chunk).
#[derive(Clone, Copy)]
struct SharedBuf<T>(*mut T);
impl<T> SharedBuf<T> {
    /// The element at `offset` (a method, so closures capture the whole `Sync` wrapper).
    fn at(self, offset: usize) -> *mut T {
        self.0.wrapping_add(offset)
    }
}
// SAFETY: only used inside `run_update`, where every thread writes a disjoint chunk.
unsafe impl<T: Send> Send for SharedBuf<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SharedBuf<T> {}

impl<T: Float> std::fmt::Debug for AveragedModel<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AveragedModel")
            .field("avg", &self.avg)
            .field("n_averaged", &self.n_averaged)
            .field("len", &self.averaged.len())
            .field("swapped", &self.swapped)
            .finish()
    }
}

/// A saved [`AveragedModel`]: what [`AveragedModel::state_dict`] returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AveragedState<T> {
    /// [`AVERAGED_STATE_FORMAT`] at the time of saving.
    pub format: u32,
    /// Always `"AveragedModel"`.
    pub kind: String,
    /// `"float32"` or `"float64"`.
    pub dtype: String,
    /// The averaging function.
    #[serde(flatten)]
    pub avg: AverageFn,
    /// Models averaged so far (torch's `n_averaged` buffer).
    pub n_averaged: u64,
    /// The averaged values of every parameter, by name, row-major (non-finite values as the
    /// strings `"NaN"`, `"Infinity"`, `"-Infinity"`).
    #[serde(
        serialize_with = "crate::state::non_finite::serialize",
        deserialize_with = "crate::state::non_finite::deserialize",
        bound(serialize = "T: Float", deserialize = "T: Float")
    )]
    pub averaged: BTreeMap<String, Vec<T>>,
}

impl<T: Float> AveragedModel<T> {
    /// torch's `AveragedModel(model)`: SWA's equal running mean; the averaged copy starts as a
    /// copy of the arena's parameters and `n_averaged` at 0.
    pub fn new(arena: &Arena<T>) -> Self {
        AveragedModel {
            averaged: AlignedBuf::from_slice(Role::Params, arena.params()),
            chunks: {
                let n = arena.params().len();
                let piece = piece_len(n);
                (0..n)
                    .step_by(piece)
                    .map(|start| start..(start + piece).min(n))
                    .collect()
            },
            layout: arena.infos().to_vec(),
            avg: AverageFn::Swa,
            n_averaged: 0,
            swapped: false,
            parallelism: Parallelism::default(),
            parallel_threshold: PARALLEL_THRESHOLD,
            simd: SimdLevel::default(),
        }
    }

    /// torch's `AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))`; an error
    /// with torch's message when `decay` is outside `[0, 1]`.
    pub fn ema(arena: &Arena<T>, decay: f64) -> Result<Self> {
        Self::with_avg_fn(arena, AverageFn::ema(decay)?)
    }

    /// An averaged model with the given averaging function.
    pub fn with_avg_fn(arena: &Arena<T>, avg: AverageFn) -> Result<Self> {
        avg.check()?;
        let mut m = Self::new(arena);
        m.avg = avg;
        Ok(m)
    }

    /// Where the update runs (default: the global pool above [`PARALLEL_THRESHOLD`]
    /// elements; the result is the same bits either way).
    pub fn with_parallelism(mut self, parallelism: Parallelism) -> Self {
        self.parallelism = parallelism;
        self
    }

    /// Elements below which the update runs on the calling thread (see
    /// [`crate::Optimizer::set_parallel_threshold`]).
    pub fn set_parallel_threshold(&mut self, elems: usize) {
        self.parallel_threshold = elems;
    }

    /// Caps the instruction set of the update pass (default [`SimdLevel::Best`]); every level
    /// gives the same bits.
    pub fn set_simd_level(&mut self, simd: SimdLevel) {
        self.simd = simd;
    }

    /// The averaging function.
    pub fn avg_fn(&self) -> AverageFn {
        self.avg
    }

    /// Models averaged so far (torch's `n_averaged`).
    pub fn n_averaged(&self) -> u64 {
        self.n_averaged
    }

    /// Whether [`swap_into`](Self::swap_into) has put the averaged weights into the arena.
    pub fn is_swapped(&self) -> bool {
        self.swapped
    }

    /// The averaged copy of every parameter, laid out as the arena (its
    /// [`Arena::params`]). While swapped it holds the training weights instead.
    pub fn averaged(&self) -> &[T] {
        &self.averaged
    }

    /// The averaged values of `p` (a handle of `arena`, which must have this model's layout).
    pub fn value(&self, arena: &Arena<T>, p: Param<T>) -> Result<&[T]> {
        self.check_layout(arena)?;
        self.check_not_swapped("read the averaged values")?;
        if arena.param_at(p.index()) != Some(p) {
            return Err(Error::ArenaMismatch(format!(
                "AveragedModel: parameter handle {p:?} is not one of this arena's"
            )));
        }
        Ok(&self.averaged[arena.info(p).range()])
    }

    /// The averaged values of the parameter named `name`.
    pub fn value_by_name(&self, name: &str) -> Result<&[T]> {
        self.check_not_swapped("read the averaged values")?;
        let info = self
            .layout
            .iter()
            .find(|i| i.name == name)
            .ok_or_else(|| Error::UnknownParam(name.to_string()))?;
        Ok(&self.averaged[info.range()])
    }

    fn check_layout(&self, arena: &Arena<T>) -> Result<()> {
        if arena.len() != self.averaged.len() || arena.num_params() != self.layout.len() {
            return Err(Error::ArenaMismatch(format!(
                "AveragedModel: this averaged model has {} parameters ({} elements), the arena \
                 has {} ({} elements)",
                self.layout.len(),
                self.averaged.len(),
                arena.num_params(),
                arena.len()
            )));
        }
        if let Some((mine, theirs)) = self.layout.iter().zip(arena.infos()).find(|(a, b)| a != b) {
            return Err(Error::ArenaMismatch(format!(
                "AveragedModel: parameter `{}` (shape {:?} at offset {}) of this averaged model \
                 is `{}` (shape {:?} at offset {}) in the arena",
                mine.name, mine.shape, mine.offset, theirs.name, theirs.shape, theirs.offset
            )));
        }
        Ok(())
    }

    fn check_not_swapped(&self, what: &str) -> Result<()> {
        if self.swapped {
            return Err(Error::ArenaMismatch(format!(
                "AveragedModel: cannot {what} while the averaged weights are swapped into the \
                 arena; call swap_into again first"
            )));
        }
        Ok(())
    }

    /// torch's `update_parameters(model)`: one fused pass over the averaged copy and the
    /// arena's parameters (a copy on the first call), then `n_averaged += 1`. An arena of
    /// another layout is an error, and nothing changes.
    pub fn update_parameters(&mut self, arena: &Arena<T>) -> Result<()> {
        self.check_layout(arena)?;
        self.check_not_swapped("update the average")?;
        self.run_update(arena.params(), false);
        self.n_averaged = self.n_averaged.saturating_add(1);
        Ok(())
    }

    /// The scalar reference of [`update_parameters`](Self::update_parameters) (torch's tensor
    /// operations, one pass each, on one thread): the oracle the fused pass is tested against.
    pub fn update_parameters_reference(&mut self, arena: &Arena<T>) -> Result<()> {
        self.check_layout(arena)?;
        self.check_not_swapped("update the average")?;
        self.run_update(arena.params(), true);
        self.n_averaged = self.n_averaged.saturating_add(1);
        Ok(())
    }

    fn run_update(&mut self, params: &[T], reference: bool) {
        let (n, avg, simd) = (self.n_averaged, self.avg, self.simd);
        let one = move |a: &mut [T], p: &[T]| match (avg, reference) {
            (AverageFn::Swa, false) => average::swa_fused(simd, a, p, n),
            (AverageFn::Swa, true) => average::swa_reference(a, p, n),
            (AverageFn::Ema { decay }, false) => average::ema_fused(simd, a, p, n, decay),
            (AverageFn::Ema { decay }, true) => average::ema_reference(a, p, n, decay),
        };
        if reference {
            return one(&mut self.averaged, params);
        }
        // One item per fixed chunk, whose ranges are computed once at construction: no
        // allocation and no lock per update.
        let averaged = SharedBuf(self.averaged.as_mut_ptr());
        let chunks = &self.chunks;
        // Averaging keeps torch's gradual underflow: it is one cheap pass, and flushing would
        // change averaged weights that are legitimately tiny.
        self.parallelism.run(
            params.len(),
            self.parallel_threshold,
            Subnormals::Preserve,
            |exec| {
                exec.for_each(chunks, |r| {
                    // SAFETY: the chunks are disjoint ranges of the averaged buffer (length
                    // `params.len()`, checked by `check_layout`), each run by exactly one
                    // thread, and `self.averaged` stays mutably borrowed until all have run.
                    let a =
                        unsafe { std::slice::from_raw_parts_mut(averaged.at(r.start), r.len()) };
                    one(a, &params[r.clone()]);
                })
            },
        );
    }

    /// Exchanges the arena's parameter values with the averaged copy (O(1)): call it to
    /// evaluate with the averaged weights, and again to swap the training weights back.
    /// Gradients and optimizer state are untouched.
    pub fn swap_into(&mut self, arena: &mut Arena<T>) -> Result<()> {
        self.check_layout(arena)?;
        arena.swap_params(&mut self.averaged);
        self.swapped = !self.swapped;
        Ok(())
    }

    /// Writes the averaged weights into the arena's parameters (the end of training: torch's
    /// "use `swa_model` from now on"). The averaged copy is kept.
    pub fn copy_into(&self, arena: &mut Arena<T>) -> Result<()> {
        self.check_layout(arena)?;
        self.check_not_swapped("copy the averaged weights")?;
        arena.params_mut().copy_from_slice(&self.averaged);
        Ok(())
    }

    /// The whole state: the averaging function, `n_averaged` and every parameter's averaged
    /// values by name. Refused while swapped.
    pub fn state_dict(&self) -> Result<AveragedState<T>> {
        self.check_not_swapped("save the average")?;
        Ok(AveragedState {
            format: AVERAGED_STATE_FORMAT,
            kind: "AveragedModel".into(),
            dtype: T::DTYPE.into(),
            avg: self.avg,
            n_averaged: self.n_averaged,
            averaged: self
                .layout
                .iter()
                .map(|i| (i.name.clone(), self.averaged[i.range()].to_vec()))
                .collect(),
        })
    }

    /// [`state_dict`](Self::state_dict) as JSON.
    pub fn state_dict_json(&self) -> Result<String> {
        Ok(serde_json::to_string(&self.state_dict()?)?)
    }

    /// Loads a saved state (the averaging function too: it is part of the state, as the
    /// saved values were made by it). Every parameter of this model must be in it, by name,
    /// with its length, and nothing else; on any error nothing changes.
    pub fn load_state_dict(&mut self, state: &AveragedState<T>) -> Result<()> {
        self.check_not_swapped("load a state")?;
        let bad = |m: String| Error::StateDict(format!("AveragedModel: {m}"));
        if state.format != AVERAGED_STATE_FORMAT {
            return Err(bad(format!(
                "state format {} is not supported (this build reads {AVERAGED_STATE_FORMAT})",
                state.format
            )));
        }
        if state.kind != "AveragedModel" {
            return Err(bad(format!(
                "it was saved by {:?}, this is AveragedModel",
                state.kind
            )));
        }
        if state.dtype != T::DTYPE {
            return Err(bad(format!(
                "saved as {}, this model is {}",
                state.dtype,
                T::DTYPE
            )));
        }
        state.avg.check().map_err(|e| bad(e.to_string()))?;
        // Every parameter of this model by name, once, and nothing else (the load pipeline's
        // rule for a whole model's values); then each one's length.
        let saved = state.averaged.keys().map(|k| (k.as_str(), None));
        let matched =
            match_model(&self.layout, saved, "the state", "this model").map_err(|e| match e {
                Error::StateDict(m) => bad(m),
                e => e,
            })?;
        for (values, &i) in state.averaged.values().zip(&matched) {
            let info = &self.layout[i];
            if values.len() != info.len {
                return Err(bad(format!(
                    "parameter `{}` has shape {:?} ({} values), the state has {} values",
                    info.name,
                    info.shape,
                    info.len,
                    values.len()
                )));
            }
        }
        // Everything checked: copy in place (no staged copy of the whole model).
        for (values, i) in state.averaged.values().zip(matched) {
            self.averaged[self.layout[i].range()].copy_from_slice(values);
        }
        self.avg = state.avg;
        self.n_averaged = state.n_averaged;
        Ok(())
    }

    /// The parameters this model averages (the arena's layout when it was built).
    pub(crate) fn layout(&self) -> &[ParamInfo] {
        &self.layout
    }

    /// Puts a checkpoint's staged values in place (checked by the caller; O(1)).
    pub(crate) fn commit_loaded(&mut self, averaged: AlignedBuf<T>, n_averaged: u64) {
        debug_assert_eq!(averaged.len(), self.averaged.len());
        self.averaged = averaged;
        self.n_averaged = n_averaged;
    }

    /// Saves a binary checkpoint (safetensors: torch's `AveragedModel.state_dict()` keys
    /// `module.<name>` and `n_averaged`, with the averaging function in the metadata) to
    /// `path`, atomically. Refused while swapped. See [`crate::checkpoint::averaged`].
    pub fn save_checkpoint(&self, path: impl AsRef<std::path::Path>) -> Result<u64> {
        crate::checkpoint::averaged::save(path, self)
    }

    /// Loads a binary checkpoint written by [`save_checkpoint`](Self::save_checkpoint),
    /// matching parameters by name (any registration order), casting f32 and f64 both ways. A
    /// checkpoint made with another averaging function is refused. On any error nothing has
    /// changed. See [`crate::checkpoint::averaged`].
    pub fn load_checkpoint(&mut self, path: impl AsRef<std::path::Path>) -> Result<u64> {
        crate::checkpoint::averaged::load(path, self)
    }

    /// [`load_state_dict`](Self::load_state_dict) from JSON.
    pub fn load_state_dict_json(&mut self, json: &str) -> Result<()> {
        let state: AveragedState<T> = serde_json::from_str(json)
            .map_err(|e| Error::StateDict(format!("AveragedModel: {e}")))?;
        self.load_state_dict(&state)
    }
}
