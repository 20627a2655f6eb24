//! SparseAdam: torch's `torch.optim.SparseAdam`, Adam for gradients that touch only some rows
//! of a parameter (an embedding table's lookups).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::arch::SimdLevel;
use crate::arena::{AlignedBuf, Arena, Param, ParamInfo};
use crate::buffer::Role;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::hyper::{unknown, GroupHyperparams, HyperField, HyperValue, Hyperparams};
use crate::kernels::sparse_adam::{row_fused, row_reference, SparseAdamCoeffs};
use crate::optimizer::load::{
    check_buffer_len, check_header, check_kind, match_groups, saved_step, stage_once, state_target,
    with_saved_states,
};
use crate::optimizer::SavedState;
use crate::state::{GroupDict, MatchBy, ParamRef, ParamStateDict, StateDict, STATE_DICT_FORMAT};

/// SparseAdam's state buffers, torch's keys, in saved order.
pub(crate) const BUFFERS: [&str; 2] = ["exp_avg", "exp_avg_sq"];
use crate::subnormals::Subnormals;

fn default_lr() -> f64 {
    1e-3
}
fn default_betas() -> (f64, f64) {
    (0.9, 0.999)
}
fn default_eps() -> f64 {
    1e-8
}

/// Options of [`SparseAdam`], with torch's names and defaults.
///
/// Build it from torch's defaults with the `with_*` builders; the struct is
/// `#[non_exhaustive]`, so a torch option added later is not a breaking change:
///
/// ```
/// let config = optarena::SparseAdamConfig::new().with_lr(0.01).with_betas((0.8, 0.99));
/// assert_eq!(config.eps, 1e-8);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct SparseAdamConfig {
    /// Learning rate (`> 0`).
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Running-average coefficients of the gradient and its square (each in `[0, 1)`).
    #[serde(default = "default_betas")]
    pub betas: (f64, f64),
    /// Term added to the denominator (`> 0`).
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Maximize instead of minimize.
    #[serde(default)]
    pub maximize: bool,
}

impl Default for SparseAdamConfig {
    fn default() -> Self {
        SparseAdamConfig {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            maximize: false,
        }
    }
}

impl SparseAdamConfig {
    /// torch's defaults (the same as `Default::default()`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `lr`, as a builder step.
    #[must_use]
    pub fn with_lr(mut self, lr: f64) -> Self {
        self.lr = lr;
        self
    }

    /// Sets `betas`, as a builder step.
    #[must_use]
    pub fn with_betas(mut self, betas: (f64, f64)) -> Self {
        self.betas = betas;
        self
    }

    /// Sets `eps`, as a builder step.
    #[must_use]
    pub fn with_eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    /// Sets `maximize`, as a builder step.
    #[must_use]
    pub fn with_maximize(mut self, maximize: bool) -> Self {
        self.maximize = maximize;
        self
    }

    /// torch's constructor checks, in torch's order and words (NaN is rejected too).
    pub fn check(&self) -> Result<()> {
        if self.lr.is_nan() || self.lr <= 0.0 || self.lr.is_infinite() {
            return Err(Error::InvalidHyperparameter(format!(
                "Invalid learning rate: {:?}",
                self.lr
            )));
        }
        self.check_group()
    }

    /// The checks of a group changed after construction (by an LR scheduler,
    /// [`SparseAdam::set_lr`], a loaded state): [`check`](Self::check)'s, except that the
    /// learning rate may be 0. torch checks `0 < lr` only in the constructor, and its
    /// schedulers then set any value; a schedule that ends at 0 (cosine annealing to
    /// `eta_min = 0`) must be able to reach it here too. Negative, NaN and infinite rates are
    /// still refused.
    pub fn check_group(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidHyperparameter(m));
        if self.lr.is_nan() || self.lr < 0.0 || self.lr.is_infinite() {
            return bad(format!("Invalid learning rate: {:?}", self.lr));
        }
        if self.eps.is_nan() || self.eps <= 0.0 || self.eps.is_infinite() {
            return bad(format!("Invalid epsilon value: {:?}", self.eps));
        }
        if !(0.0..1.0).contains(&self.betas.0) {
            return bad(format!(
                "Invalid beta parameter at index 0: {:?}",
                self.betas.0
            ));
        }
        if !(0.0..1.0).contains(&self.betas.1) {
            return bad(format!(
                "Invalid beta parameter at index 1: {:?}",
                self.betas.1
            ));
        }
        Ok(())
    }

    fn hyperparams(&self) -> BTreeMap<String, HyperValue> {
        BTreeMap::from([
            ("lr".to_string(), HyperValue::Number(self.lr)),
            (
                "betas".to_string(),
                HyperValue::Pair(self.betas.0, self.betas.1),
            ),
            ("eps".to_string(), HyperValue::Number(self.eps)),
            ("maximize".to_string(), HyperValue::Bool(self.maximize)),
        ])
    }

    pub(crate) fn from_hyperparams(h: &BTreeMap<String, HyperValue>) -> Result<Self> {
        let bad = |k: &str| {
            Error::StateDict(format!(
                "SparseAdam: hyperparameter `{k}` is missing or not of its kind"
            ))
        };
        let num = |k: &str| match h.get(k) {
            Some(HyperValue::Number(x)) => Ok(*x),
            _ => Err(bad(k)),
        };
        let betas = match h.get("betas") {
            Some(HyperValue::Pair(a, b)) => (*a, *b),
            _ => return Err(bad("betas")),
        };
        let maximize = match h.get("maximize") {
            Some(HyperValue::Bool(b)) => *b,
            _ => return Err(bad("maximize")),
        };
        if h.len() != 4 {
            return Err(Error::StateDict(format!(
                "SparseAdam: a group has hyperparameters {:?}; SparseAdam has lr, betas, eps, \
                 maximize",
                h.keys().collect::<Vec<_>>()
            )));
        }
        let c = SparseAdamConfig::default()
            .with_lr(num("lr")?)
            .with_betas(betas)
            .with_eps(num("eps")?)
            .with_maximize(maximize);
        c.check_group()
            .map_err(|e| Error::StateDict(format!("SparseAdam: {e}")))?;
        Ok(c)
    }
}

/// By torch's names, as every optimizer's config: what [`SparseAdam`]'s
/// [`GroupHyperparams`] (LR schedulers) reads and writes.
impl Hyperparams for SparseAdamConfig {
    const OPTIMIZER: &'static str = "SparseAdam";
    const NAMES: &'static [&'static str] = &["lr", "betas", "eps", "maximize"];
    fn get(&self, name: &str) -> Result<HyperValue> {
        match name {
            "lr" => Ok(self.lr.to_value()),
            "betas" => Ok(self.betas.to_value()),
            "eps" => Ok(self.eps.to_value()),
            "maximize" => Ok(self.maximize.to_value()),
            _ => Err(unknown::<Self>(name)),
        }
    }
    fn set(&mut self, name: &str, value: &HyperValue) -> Result<()> {
        match name {
            "lr" => self.lr = f64::from_value(name, value)?,
            "betas" => self.betas = <(f64, f64)>::from_value(name, value)?,
            "eps" => self.eps = f64::from_value(name, value)?,
            "maximize" => self.maximize = bool::from_value(name, value)?,
            _ => return Err(unknown::<Self>(name)),
        }
        Ok(())
    }
    /// [`SparseAdamConfig::check_group`]: a value set after construction.
    fn validate(&self) -> Result<()> {
        self.check_group()
    }
}

/// One parameter's sparse gradient: the rows it touches (indices into the parameter's first
/// dimension, in any order, repeats allowed) and their values, `rows.len() × cols` of them,
/// row after row (`cols` is the product of the parameter's other dimensions). torch's
/// `torch.sparse_coo_tensor(rows[None], values.view(len(rows), cols), param.shape)`.
#[derive(Debug, Clone, Copy)]
pub struct SparseGrad<'a, T> {
    /// The parameter.
    pub param: Param<T>,
    /// Row indices (torch's `grad._indices()[0]`).
    pub rows: &'a [usize],
    /// Row values (torch's `grad._values()`), row-major.
    pub values: &'a [T],
}

impl<'a, T> SparseGrad<'a, T> {
    /// The gradient of `param` on `rows`.
    pub fn new(param: Param<T>, rows: &'a [usize], values: &'a [T]) -> Self {
        SparseGrad {
            param,
            rows,
            values,
        }
    }
}

struct Group {
    params: Vec<usize>,
    config: SparseAdamConfig,
}

/// torch's `SparseAdam`: Adam restricted to the rows a sparse gradient touches (Kingma & Ba,
/// "Adam: A Method for Stochastic Optimization", ICLR 2015, masked as torch does).
///
/// For each parameter with a gradient in a step, `step ← step + 1` (also when the gradient
/// has no rows, as in torch); the gradient is negated if `maximize`, its duplicate row indices
/// are summed (torch's `coalesce`), and on the touched rows only:
///
/// ```text
/// m ← m + (g − m) · (1 − β₁)
/// v ← v + (g² − v) · (1 − β₂)
/// θ ← θ + (m / (√v + ε)) · (−lr · √(1 − β₂ᵗ) / (1 − β₁ᵗ))
/// ```
///
/// Every other row's values and state stay as they are. `exp_avg` and `exp_avg_sq` are
/// arena-shaped buffers, but a step reads and writes only the touched rows: its cost is
/// proportional to the rows touched, not to the table. Each touched row is one fused SIMD pass
/// (with a scalar reference kernel beside it); steps run on the calling thread.
///
/// Parameters are seen as `[rows, cols]`: `rows` is the first dimension, `cols` the product of
/// the others (1 for a 1-D parameter).
///
/// Param groups are torch's: each has its own options, read and written by torch's names
/// ([`hyper`](Self::hyper), [`set_lr`](Self::set_lr)), so every LR scheduler of
/// [`crate::schedule`] drives them through [`GroupHyperparams`] (`lr`; `betas.0` for the
/// schedulers that cycle momentum). The state saves as JSON ([`state_dict_json`](
/// Self::state_dict_json)) or as a binary checkpoint ([`save_checkpoint`](Self::save_checkpoint),
/// see [`crate::checkpoint::sparse_adam`]).
///
/// ```
/// use optarena::{ArenaBuilder, SparseAdam, SparseAdamConfig, SparseGrad};
///
/// let mut b = ArenaBuilder::<f32>::new();
/// let emb = b.zeros("embedding.weight", &[1000, 4])?;
/// let mut arena = b.build();
/// let mut opt = SparseAdam::all(&arena, SparseAdamConfig::default().with_lr(0.1))?;
/// // Rows 7 and 42 were looked up (row 7 twice: its gradients are summed).
/// let rows = [7, 42, 7];
/// let values = [1.0f32, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0];
/// opt.step_sparse(&mut arena, &[SparseGrad::new(emb, &rows, &values)])?;
/// assert!(arena.value(emb)[7 * 4] < 0.0 && arena.value(emb)[42 * 4] > 0.0);
/// assert_eq!(arena.value(emb)[0], 0.0);
/// // A dense gradient is refused, as in torch.
/// arena.grad_mut(emb)[0] = 1.0;
/// assert_eq!(
///     opt.step(&mut arena).unwrap_err().to_string(),
///     "SparseAdam does not support dense gradients, please consider Adam instead"
/// );
/// # Ok::<(), optarena::Error>(())
/// ```
pub struct SparseAdam<T: Float> {
    arena_id: u64,
    layout: Vec<ParamInfo>,
    groups: Vec<Group>,
    /// Group of each arena parameter, if it is this optimizer's.
    group_of: Vec<Option<usize>>,
    /// torch's `state["step"]`; `None` until the parameter's first gradient.
    steps: Vec<Option<u64>>,
    exp_avg: AlignedBuf<T>,
    exp_avg_sq: AlignedBuf<T>,
    subnormals: Subnormals,
    simd: SimdLevel,
    /// torch's `group["initial_lr"]` per group, set by LR schedulers (`crate::schedule`).
    initial_lrs: Vec<Option<f64>>,
    /// Scratch: (row, position) pairs to coalesce, and coalesced values.
    order: Vec<(usize, usize)>,
    coalesced_rows: Vec<usize>,
    coalesced: Vec<T>,
    seen: Vec<bool>,
}

impl<T: Float> std::fmt::Debug for SparseAdam<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseAdam")
            .field("groups", &self.groups.len())
            .field("steps", &self.steps)
            .finish()
    }
}

impl<T: Float> SparseAdam<T> {
    /// Every parameter of the arena in one group.
    pub fn all(arena: &Arena<T>, config: SparseAdamConfig) -> Result<Self> {
        Self::new(arena, [(arena.handles().collect(), config)])
    }

    /// torch's `SparseAdam([{"params": ..., **options}, ...])`: each group is its parameters
    /// and its options (torch's defaults with the group's overrides on top). Errors: an invalid
    /// option (torch's messages), an empty parameter list, a parameter in two groups or twice
    /// in one, a handle of another arena, a 0-D parameter.
    pub fn new(
        arena: &Arena<T>,
        groups: impl IntoIterator<Item = (Vec<Param<T>>, SparseAdamConfig)>,
    ) -> Result<Self> {
        let n = arena.num_params();
        let mut group_of = vec![None; n];
        let mut out = Vec::new();
        for (gi, (params, config)) in groups.into_iter().enumerate() {
            config.check()?;
            if params.is_empty() {
                return Err(Error::EmptyParamList);
            }
            let mut idx = Vec::with_capacity(params.len());
            for p in params {
                let i = p.index();
                if arena.param_at(i) != Some(p) {
                    return Err(Error::ArenaMismatch(format!(
                        "SparseAdam: parameter handle {p:?} is not one of this arena's"
                    )));
                }
                let info = &arena.infos()[i];
                if info.shape.is_empty() {
                    return Err(Error::InvalidHyperparameter(format!(
                        "SparseAdam: parameter `{}` is 0-dimensional; sparse gradients index \
                         the first dimension",
                        info.name
                    )));
                }
                match group_of[i] {
                    Some(g) if g == gi => {
                        return Err(Error::DuplicateParamInGroup {
                            name: info.name.clone(),
                        })
                    }
                    Some(_) => {
                        return Err(Error::ParamInTwoGroups {
                            name: info.name.clone(),
                        })
                    }
                    None => group_of[i] = Some(gi),
                }
                idx.push(i);
            }
            out.push(Group {
                params: idx,
                config,
            });
        }
        if out.is_empty() {
            return Err(Error::EmptyParamList);
        }
        Ok(SparseAdam {
            arena_id: arena.id(),
            layout: arena.infos().to_vec(),
            groups: out,
            group_of,
            steps: vec![None; n],
            exp_avg: AlignedBuf::filled(Role::State(0), arena.len(), T::ZERO),
            exp_avg_sq: AlignedBuf::filled(Role::State(1), arena.len(), T::ZERO),
            subnormals: Subnormals::default(),
            simd: SimdLevel::default(),
            initial_lrs: Vec::new(),
            order: Vec::new(),
            coalesced_rows: Vec::new(),
            coalesced: Vec::new(),
            seen: vec![false; n],
        })
    }

    /// What the kernels do with subnormal numbers (as [`crate::Optimizer::set_subnormals`]).
    pub fn set_subnormals(&mut self, mode: Subnormals) {
        self.subnormals = mode;
    }

    /// Caps the instruction set of the row kernel (default [`SimdLevel::Best`]); every level
    /// gives the same bits.
    pub fn set_simd_level(&mut self, simd: SimdLevel) {
        self.simd = simd;
    }

    /// Number of param groups.
    pub fn num_groups(&self) -> usize {
        self.groups.len()
    }

    /// Group `g`'s options.
    pub fn group_config(&self, g: usize) -> Result<SparseAdamConfig> {
        self.groups
            .get(g)
            .map(|x| x.config)
            .ok_or(Error::NoSuchGroup {
                index: g,
                count: self.groups.len(),
            })
    }

    /// Sets group `g`'s options, checked by [`SparseAdamConfig::check_group`] (as at
    /// construction, except that the learning rate may be 0, as torch's schedulers may set
    /// it); on error nothing changes.
    pub fn set_group_config(&mut self, g: usize, config: SparseAdamConfig) -> Result<()> {
        config.check_group()?;
        let count = self.groups.len();
        let group = self
            .groups
            .get_mut(g)
            .ok_or(Error::NoSuchGroup { index: g, count })?;
        group.config = config;
        Ok(())
    }

    /// One option of group `g`, by torch's name (`lr`, `betas`, `eps`, `maximize`).
    pub fn hyper(&self, g: usize, name: &str) -> Result<HyperValue> {
        self.group_config(g)?.get(name)
    }

    /// Sets one option of group `g` by torch's name, checked by
    /// [`SparseAdamConfig::check_group`]; an unknown name, a value of the wrong kind or an
    /// invalid value is an error and changes nothing.
    pub fn set_hyper(&mut self, g: usize, name: &str, value: impl Into<HyperValue>) -> Result<()> {
        let mut config = self.group_config(g)?;
        config.set(name, &value.into())?;
        self.set_group_config(g, config)
    }

    /// The learning rate of group `g`.
    pub fn lr(&self, g: usize) -> Result<f64> {
        Ok(self.group_config(g)?.lr)
    }

    /// Sets the learning rate of group `g` (0 or more: see
    /// [`SparseAdamConfig::check_group`]), as [`Optimizer::set_lr`](crate::Optimizer::set_lr)
    /// and, for code generic over optimizers, [`GroupHyperparams::set_lr`].
    pub fn set_lr(&mut self, g: usize, lr: f64) -> Result<()> {
        self.set_hyper(g, "lr", lr)
    }

    /// torch's `state[p]["step"]` (`None` before the parameter's first gradient).
    pub fn step_count(&self, p: Param<T>) -> Option<u64> {
        self.steps.get(p.index()).copied().flatten()
    }

    /// `exp_avg` and `exp_avg_sq` of `p` (zeros before its first gradient).
    pub fn state(&self, arena: &Arena<T>, p: Param<T>) -> Result<(&[T], &[T])> {
        self.check_arena(arena)?;
        if arena.param_at(p.index()) != Some(p) {
            return Err(Error::ArenaMismatch(format!(
                "SparseAdam: parameter handle {p:?} is not one of this arena's"
            )));
        }
        let r = self.layout[p.index()].range();
        Ok((&self.exp_avg[r.clone()], &self.exp_avg_sq[r]))
    }

    fn check_arena(&self, arena: &Arena<T>) -> Result<()> {
        if arena.id() != self.arena_id {
            return Err(Error::ArenaMismatch(
                "this SparseAdam optimizer was built for another arena".into(),
            ));
        }
        Ok(())
    }

    /// torch's `step()` with the gradients in the arena: SparseAdam has no dense step, so any
    /// of its parameters with a (dense) gradient is torch's error; with none it does nothing,
    /// as torch does when every `grad` is `None`.
    pub fn step(&mut self, arena: &mut Arena<T>) -> Result<()> {
        self.check_arena(arena)?;
        for g in &self.groups {
            for &i in &g.params {
                if let Some(p) = arena.param_at(i) {
                    if arena.has_grad(p) {
                        return Err(dense_error());
                    }
                }
            }
        }
        Ok(())
    }

    /// One step with sparse gradients (see the type's docs): every parameter of `grads` must
    /// be this optimizer's and appear once, every row index must be below its first dimension,
    /// and `values` must hold `rows.len() × cols` numbers. Everything is checked before
    /// anything changes: on an error nothing has. Parameters without an entry take no step.
    pub fn step_sparse(&mut self, arena: &mut Arena<T>, grads: &[SparseGrad<'_, T>]) -> Result<()> {
        self.run(arena, grads, false)
    }

    /// [`step_sparse`](Self::step_sparse) with the scalar reference kernel (the test oracle).
    pub fn step_sparse_reference(
        &mut self,
        arena: &mut Arena<T>,
        grads: &[SparseGrad<'_, T>],
    ) -> Result<()> {
        self.run(arena, grads, true)
    }

    fn validate(&mut self, arena: &Arena<T>, grads: &[SparseGrad<'_, T>]) -> Result<()> {
        self.check_arena(arena)?;
        self.seen.iter_mut().for_each(|s| *s = false);
        let bad = |m: String| Err(Error::SparseGrad(m));
        for sg in grads {
            let i = sg.param.index();
            if arena.param_at(i) != Some(sg.param) {
                return bad(format!(
                    "SparseAdam: parameter handle {:?} is not one of this arena's",
                    sg.param
                ));
            }
            let info = &self.layout[i];
            if self.group_of[i].is_none() {
                return bad(format!(
                    "SparseAdam: parameter `{}` is not in any of this optimizer's groups",
                    info.name
                ));
            }
            if std::mem::replace(&mut self.seen[i], true) {
                return bad(format!(
                    "SparseAdam: parameter `{}` has more than one sparse gradient in this step \
                     (give all its rows in one; repeated rows are summed)",
                    info.name
                ));
            }
            let rows = info.shape[0];
            let cols = info.len.checked_div(rows).unwrap_or(0);
            if sg.rows.len().checked_mul(cols) != Some(sg.values.len()) {
                return bad(format!(
                    "SparseAdam: the gradient of `{}` (shape {:?}) has {} row indices and {} \
                     values; expected {} ({} rows × {cols} columns)",
                    info.name,
                    info.shape,
                    sg.rows.len(),
                    sg.values.len(),
                    sg.rows.len().saturating_mul(cols),
                    sg.rows.len()
                ));
            }
            if let Some(&r) = sg.rows.iter().find(|&&r| r >= rows) {
                return bad(format!(
                    "SparseAdam: row index {r} is out of range for parameter `{}` of shape {:?} \
                     ({rows} rows)",
                    info.name, info.shape
                ));
            }
        }
        Ok(())
    }

    fn run(
        &mut self,
        arena: &mut Arena<T>,
        grads: &[SparseGrad<'_, T>],
        reference: bool,
    ) -> Result<()> {
        self.validate(arena, grads)?;
        let subnormals = self.subnormals;
        subnormals.run(|| {
            for sg in grads {
                self.apply_one(arena, sg, reference);
            }
        });
        Ok(())
    }

    /// One parameter's update (its input already validated).
    fn apply_one(&mut self, arena: &mut Arena<T>, sg: &SparseGrad<'_, T>, reference: bool) {
        let i = sg.param.index();
        let Some(g) = self.group_of[i] else { return };
        let config = self.groups[g].config;
        let step = self.steps[i].unwrap_or(0).saturating_add(1);
        self.steps[i] = Some(step);
        if sg.rows.is_empty() {
            return; // torch: "Skip update for empty grad" (the step still counts)
        }
        let info = &self.layout[i];
        let cols = info.len.checked_div(info.shape[0]).unwrap_or(0);
        if cols == 0 {
            return;
        }
        let c =
            SparseAdamCoeffs::<T>::new(config.lr, config.betas, config.eps, config.maximize, step);
        // Coalesce: unique rows in increasing order, duplicates summed in the order given.
        let (rows, values): (&[usize], &[T]) = if sg.rows.windows(2).all(|w| w[0] < w[1]) {
            (sg.rows, sg.values)
        } else {
            self.order.clear();
            self.order
                .extend(sg.rows.iter().enumerate().map(|(k, &r)| (r, k)));
            self.order.sort_unstable();
            self.coalesced_rows.clear();
            self.coalesced.clear();
            for &(r, k) in &self.order {
                let src = &sg.values[k * cols..(k + 1) * cols];
                if self.coalesced_rows.last() == Some(&r) {
                    let at = self.coalesced.len() - cols;
                    for (d, &s) in self.coalesced[at..].iter_mut().zip(src) {
                        *d = *d + s;
                    }
                } else {
                    self.coalesced_rows.push(r);
                    self.coalesced.extend_from_slice(src);
                }
            }
            (&self.coalesced_rows, &self.coalesced)
        };
        let params = arena.value_mut(sg.param);
        let base = info.offset;
        for (k, &r) in rows.iter().enumerate() {
            let span = r * cols..(r + 1) * cols;
            let p = &mut params[span.clone()];
            let gv = &values[k * cols..(k + 1) * cols];
            let m = &mut self.exp_avg[base + span.start..base + span.end];
            let v = &mut self.exp_avg_sq[base + span.start..base + span.end];
            if reference {
                row_reference(&c, p, gv, m, v);
            } else {
                row_fused(self.simd, &c, p, gv, m, v);
            }
        }
    }

    /// The state as torch's optimizer state dict, in optarena's [`StateDict`] format: each
    /// group's options, and for each parameter that has taken a step its `step`, `exp_avg`
    /// and `exp_avg_sq`.
    pub fn state_dict(&self) -> StateDict<T> {
        let param_groups = self.group_dicts();
        let mut state = Vec::new();
        for g in &self.groups {
            for &i in &g.params {
                if let Some(step) = self.steps[i] {
                    let r = self.layout[i].range();
                    state.push(ParamStateDict {
                        index: i,
                        step: Some(step),
                        scalars: BTreeMap::new(),
                        buffers: BTreeMap::from([
                            ("exp_avg".to_string(), self.exp_avg[r.clone()].to_vec()),
                            ("exp_avg_sq".to_string(), self.exp_avg_sq[r].to_vec()),
                        ]),
                    });
                }
            }
        }
        state.sort_by_key(|s| s.index);
        StateDict {
            format: STATE_DICT_FORMAT,
            optimizer: "SparseAdam".into(),
            dtype: T::DTYPE.into(),
            param_groups,
            state,
        }
    }

    /// Each group's options and parameters (numbered by arena position), as saved.
    pub(crate) fn group_dicts(&self) -> Vec<GroupDict> {
        self.groups
            .iter()
            .map(|g| GroupDict {
                hyperparams: g.config.hyperparams(),
                params: g
                    .params
                    .iter()
                    .map(|&i| {
                        let info = &self.layout[i];
                        ParamRef {
                            index: i,
                            name: info.name.clone(),
                            offset: info.offset,
                            shape: info.shape.clone(),
                        }
                    })
                    .collect(),
            })
            .collect()
    }

    /// What a binary checkpoint reads: the arena's identity and layout, each parameter's
    /// step, and the two state buffers (arena-shaped).
    #[allow(clippy::type_complexity)]
    pub(crate) fn checkpoint_view(&self) -> (u64, &[ParamInfo], &[Option<u64>], &[T], &[T]) {
        (
            self.arena_id,
            &self.layout,
            &self.steps,
            &self.exp_avg,
            &self.exp_avg_sq,
        )
    }

    /// Checks saved groups and states against this optimizer (the [load
    /// pipeline](crate::optimizer::load): kind, group count, each group's options from the
    /// saved ones, parameters paired by name within each group with their shapes, one state
    /// per listed parameter with its step and exactly `exp_avg` and `exp_avg_sq`) and stages
    /// zeroed state buffers for the values. The JSON and the binary load both go through it;
    /// nothing changes until [`commit_staged`](Self::commit_staged).
    pub(crate) fn stage_load(
        &self,
        optimizer: &str,
        saved_groups: &[GroupDict],
        saved_states: &[SavedState<'_>],
    ) -> Result<SparseStaged<T>> {
        check_kind(optimizer, "SparseAdam")?;
        let ours: Vec<(&SparseAdamConfig, &[usize])> = self
            .groups
            .iter()
            .map(|g| (&g.config, g.params.as_slice()))
            .collect();
        // Parameters are always matched by name: the groups hold the same parameters, in any
        // order.
        let (configs, target) = match_groups(
            saved_groups,
            &ours,
            &self.layout,
            MatchBy::Name,
            |_, _, h| SparseAdamConfig::from_hyperparams(h),
        )?;
        let mut steps = vec![None; self.steps.len()];
        let mut slots = BTreeMap::new();
        for ps in saved_states {
            let (gi, j) = state_target(&target, ps.index)?;
            let i = self.groups[gi].params[j];
            let name = &self.layout[i].name;
            let step = saved_step(name, ps.step)?;
            if !ps.scalars.is_empty() {
                return Err(Error::StateDict(format!(
                    "parameter `{name}` has scalars {:?}; SparseAdam keeps none besides step",
                    ps.scalars.keys().collect::<Vec<_>>()
                )));
            }
            if *ps.buffers != BUFFERS {
                return Err(Error::StateDict(format!(
                    "parameter `{name}` has buffers {:?}; expected exp_avg, exp_avg_sq",
                    ps.buffers
                )));
            }
            stage_once(&mut steps[i], name, step)?;
            slots.insert(ps.index, i);
        }
        Ok(SparseStaged {
            arena_id: self.arena_id,
            configs,
            steps,
            exp_avg: AlignedBuf::filled(Role::State(0), self.exp_avg.len(), T::ZERO),
            exp_avg_sq: AlignedBuf::filled(Role::State(1), self.exp_avg_sq.len(), T::ZERO),
            slots,
        })
    }

    /// Puts a staged load in place (O(1) for the buffers). Cannot fail.
    pub(crate) fn commit_staged(&mut self, staged: SparseStaged<T>) {
        assert_eq!(
            staged.arena_id, self.arena_id,
            "a staged load is committed to the optimizer that staged it"
        );
        for (g, c) in self.groups.iter_mut().zip(staged.configs) {
            g.config = c;
        }
        self.steps = staged.steps;
        self.exp_avg = staged.exp_avg;
        self.exp_avg_sq = staged.exp_avg_sq;
    }

    /// [`state_dict`](Self::state_dict) as JSON.
    pub fn state_dict_json(&self) -> Result<String> {
        Ok(serde_json::to_string(&self.state_dict())?)
    }

    /// Loads a state saved by [`state_dict`](Self::state_dict), matching parameters by name
    /// (the groups must hold the same parameters, by name and shape, in any order). Every
    /// value is checked first; on an error nothing changes.
    pub fn load_state_dict(&mut self, sd: &StateDict<T>) -> Result<()> {
        check_header(sd.format, &sd.optimizer, &sd.dtype, "SparseAdam", T::DTYPE)?;
        let mut staged = with_saved_states(&sd.state, |states| {
            self.stage_load(&sd.optimizer, &sd.param_groups, states)
        })?;
        for ps in &sd.state {
            for (name, values) in &ps.buffers {
                staged.fill(&self.layout, ps.index, name, values)?;
            }
        }
        self.commit_staged(staged);
        Ok(())
    }

    /// [`load_state_dict`](Self::load_state_dict) from JSON.
    pub fn load_state_dict_json(&mut self, json: &str) -> Result<()> {
        let sd: StateDict<T> =
            serde_json::from_str(json).map_err(|e| Error::StateDict(format!("SparseAdam: {e}")))?;
        self.load_state_dict(&sd)
    }
}

/// torch's `RuntimeError` for a dense gradient.
fn dense_error() -> Error {
    Error::SparseGrad(
        "SparseAdam does not support dense gradients, please consider Adam instead".into(),
    )
}

/// LR schedulers (and hooks) drive SparseAdam's param groups by torch's names, as any
/// optimizer's: `lr`, `betas` (the schedulers that cycle momentum move `betas.0`), `eps`,
/// `maximize`, and torch's `initial_lr`.
impl<T: Float> GroupHyperparams for SparseAdam<T> {
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
        self.group_config(group)?;
        Ok(self.initial_lrs.get(group).copied().flatten())
    }
    fn set_group_initial_lr(&mut self, group: usize, initial_lr: Option<f64>) -> Result<()> {
        self.group_config(group)?;
        if self.initial_lrs.len() <= group {
            self.initial_lrs.resize(group + 1, None);
        }
        self.initial_lrs[group] = initial_lr;
        Ok(())
    }
}

/// A SparseAdam load being prepared ([`SparseAdam::stage_load`]): new configs and steps, and
/// zeroed state buffers laid out as the optimizer's, waiting for the saved values.
pub(crate) struct SparseStaged<T> {
    arena_id: u64,
    configs: Vec<SparseAdamConfig>,
    steps: Vec<Option<u64>>,
    /// The staged `exp_avg` (arena-shaped).
    pub(crate) exp_avg: AlignedBuf<T>,
    /// The staged `exp_avg_sq` (arena-shaped).
    pub(crate) exp_avg_sq: AlignedBuf<T>,
    /// Saved parameter number -> arena position, for each saved state.
    slots: BTreeMap<usize, usize>,
}

impl<T: Float> SparseStaged<T> {
    /// Every saved state: its parameter number and arena position.
    pub(crate) fn slots(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.slots.iter().map(|(&n, &i)| (n, i))
    }

    /// Copies the saved values of buffer `name` of saved parameter `index` into place, after
    /// checking their number. `layout` is the optimizer's.
    fn fill(&mut self, layout: &[ParamInfo], index: usize, name: &str, values: &[T]) -> Result<()> {
        let (Some(&i), Some(k)) = (
            self.slots.get(&index),
            BUFFERS.iter().position(|b| *b == name),
        ) else {
            return Err(Error::StateDict(format!(
                "buffer `{name}` of parameter number {index} is not one this load expects"
            )));
        };
        let info = &layout[i];
        check_buffer_len(name, &info.name, values.len(), info.len)?;
        let buf = if k == 0 {
            &mut self.exp_avg
        } else {
            &mut self.exp_avg_sq
        };
        buf[info.range()].copy_from_slice(values);
        Ok(())
    }
}
