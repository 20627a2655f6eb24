//! Learning-rate schedulers: torch's `torch.optim.lr_scheduler`, acting on any optimizer
//! through [`GroupHyperparams`].
//!
//! | torch | optarena | file |
//! |---|---|---|
//! | `LambdaLR`, `MultiplicativeLR` | [`LambdaLR`], [`MultiplicativeLR`] | `lambda.rs` |
//! | `StepLR`, `MultiStepLR` | [`StepLR`], [`MultiStepLR`] | `step.rs` |
//! | `ConstantLR`, `LinearLR` | [`ConstantLR`], [`LinearLR`] | `linear.rs` |
//! | `ExponentialLR`, `PolynomialLR` | [`ExponentialLR`], [`PolynomialLR`] | `decay.rs` |
//! | `CosineAnnealingLR`, `CosineAnnealingWarmRestarts` | [`CosineAnnealingLR`], [`CosineAnnealingWarmRestarts`] | `cosine.rs` |
//! | `CyclicLR` | [`CyclicLR`] | `cyclic.rs` |
//! | `OneCycleLR` | [`OneCycleLR`] | `one_cycle.rs` |
//! | `SequentialLR`, `ChainedScheduler` | [`SequentialLR`], [`ChainedScheduler`] | `composite.rs` |
//! | `ReduceLROnPlateau` | [`ReduceLROnPlateau`] | `plateau.rs` |
//! | `swa_utils.SWALR` | [`SWALR`] | `swa.rs` |
//!
//! ```
//! use optarena::schedule::{LrScheduler, StepLR, StepLRConfig};
//! use optarena::{ArenaBuilder, GroupHyperparams, ParamGroup, Sgd, SgdConfig};
//!
//! let mut b = ArenaBuilder::<f32>::new();
//! b.zeros("w", &[4])?;
//! let arena = b.build();
//! let mut opt = Sgd::new(&arena, [ParamGroup::all()], SgdConfig { lr: 0.1, ..Default::default() })?;
//! // torch: StepLR(optimizer, step_size=2, gamma=0.5)
//! let mut sched = StepLR::new(&mut opt, StepLRConfig { gamma: 0.5, ..StepLRConfig::new(2) })?;
//! let mut lrs = Vec::new();
//! for _epoch in 0..5 {
//!     lrs.push(opt.group_lr(0)?);
//!     // ... opt.step(&mut arena)? ...
//!     sched.step(&mut opt)?;
//! }
//! assert_eq!(lrs, [0.1, 0.1, 0.05, 0.05, 0.025]);
//! assert_eq!(sched.get_last_lr(), [0.025]);
//! # Ok::<(), optarena::Error>(())
//! ```
//!
//! # How they follow torch
//! - A scheduler is built on an optimizer (`X::new(&mut opt, config)`) and stepped with it
//!   (`sched.step(&mut opt)`), so the optimizer stays free to step in between. It reaches the
//!   groups only through [`GroupHyperparams`]: `lr`, and `momentum` or `betas.0` for the
//!   schedulers that cycle momentum.
//! - Construction is torch's: with `last_epoch = -1` each group's `initial_lr` is set to its
//!   `lr` unless a scheduler attached earlier set it already (torch's `setdefault`, kept by
//!   [`GroupHyperparams::set_group_initial_lr`]), `base_lrs` are the `initial_lr`s, and the
//!   constructor performs the first step (`last_epoch` becomes 0), with torch's `_is_initial`
//!   rules: chainable schedulers leave the lr as it is there.
//! - Every number is computed by the formula torch's `get_lr` uses, in the same order, in
//!   f64: the chainable (recursive) forms step by step, the closed forms
//!   (`_get_closed_form_lr`) only where torch uses them (an explicit epoch passed to
//!   [`LrScheduler::step_epoch`], and `SequentialLR` at a milestone). Powers use `powf` like
//!   Python's `**`, so the numbers are torch's to the last bit or within an ulp.
//! - Options, defaults and `ValueError` messages are torch's. Invalid configurations return
//!   [`Error::InvalidHyperparameter`]; nothing panics. Beyond torch, NaN and infinite options
//!   are rejected, and configurations torch accepts but then fails on at the first step with
//!   a `ZeroDivisionError` (`StepLR(step_size=0)`, `CosineAnnealingLR(T_max=0)`) are rejected
//!   at construction. Runtime failures (stepping `OneCycleLR` past `total_steps`, a
//!   division by zero torch would raise) return [`Error::Scheduler`] with torch's message.
//! - A failed call changes nothing: neither the scheduler nor the optimizer (torch has already
//!   advanced `last_epoch` when `OneCycleLR` raises "Tried to step ...").
//! - The new lr must be a valid learning rate for the optimizer (torch lets a lambda set a
//!   negative lr; optarena's groups refuse it and the step returns the error).
//! - torch's warnings (stepping before `optimizer.step()`, the deprecated epoch argument) are
//!   not reproduced.
//!
//! # A group added after the scheduler (`add_param_group`)
//! As in torch, a scheduler keeps the `base_lrs` (and lambdas, cycle bounds, `swa_lr`s) of the
//! groups it was built on, and the new group gets no `initial_lr`. The chainable steps compute
//! each group's next lr from its current one, so they carry on over the new group (`StepLR`,
//! `MultiStepLR`, `ConstantLR`, `LinearLR`, `ExponentialLR`, `PolynomialLR`,
//! `CosineAnnealingLR` between restarts, `ReduceLROnPlateau` with one `min_lr`, and the
//! composites of those), and a scheduler state saved after the add has a `_last_lr` for every
//! group. Where torch raises because a step needs a per-group value the new group lacks (every
//! closed form, i.e. `step(epoch)` and a `SequentialLR` milestone; `LambdaLR`,
//! `MultiplicativeLR`, `CyclicLR`, `OneCycleLR`, `CosineAnnealingWarmRestarts`, `SWALR` at
//! their next step; `CosineAnnealingLR`'s restart step; `ReduceLROnPlateau` with a list of
//! `min_lr` at its next reduction), the step returns [`Error::Scheduler`] naming the scheduler
//! and torch's exception, and changes nothing. `tests/schedulers.rs` replays torch's recording
//! of every kind (`scripts/gen_scheduler_extra.py --only add_group`).
//!
//! # State: `state_dict` / `load_state_dict`
//! [`LrScheduler::state_dict`] returns the scheduler's whole state as JSON (serde): the
//! scheduler's name, its configuration (torch's keyword names), `base_lrs`, `last_epoch`,
//! `_step_count`, `_last_lr` and whatever else the schedule runs on (`T_cur`, `best`,
//! the cycled momentum ...); [`SequentialLR`] and [`ChainedScheduler`] nest their children's
//! states under `_schedulers`. [`LrScheduler::load_state_dict`] checks the scheduler name and
//! every value, and a resumed run continues on the very same schedule, bit for bit.
//!
//! Closures are not serialized (torch saves plain functions as `None` too): the closures of
//! the instance a state is loaded into ([`LambdaLR`], [`MultiplicativeLR`], a custom
//! [`CyclicLR`] scale function) are used, so build it with the same closures. Loading a
//! `CyclicLR` state saved with a custom scale function into one without (or the reverse) is an
//! error, not a silent change of schedule.
//!
//! # Resuming: where optarena differs from torch, on purpose
//! torch gets resuming wrong in three ways; optarena does the following instead (each has a
//! test in `tests/schedulers.rs`).
//!
//! 1. **Loading a state also restores the optimizer's lr** (pytorch/pytorch#29697). torch's
//!    chainable schedulers compute the next lr from the group's *current* lr, but
//!    `load_state_dict` restores only the scheduler: if the optimizer's lr is not restored too
//!    (the optimizer's state not loaded, or loaded before the scheduler was built, whose first
//!    step then changed it: `ConstantLR`, `LinearLR`, `LambdaLR`, `CyclicLR`, `OneCycleLR`),
//!    every later lr is wrong, silently. optarena's [`LrScheduler::load_state_dict`] writes the saved
//!    `_last_lr` into the optimizer's groups, the cycled momentum (`momentum` or `betas.0`) of
//!    [`CyclicLR`] / [`OneCycleLR`] too, and the saved `base_lrs` into the groups'
//!    `initial_lr`. Optimizer and scheduler states may be loaded in either order, before or
//!    after the scheduler is built. A composite writes its children's values in order, then
//!    the values of the child that stepped last ([`SequentialLR`]) and its own `_last_lr`.
//! 2. **A `last_epoch` given to a constructor means "steps already taken"**
//!    (pytorch/pytorch#60265). In torch, building a scheduler with `last_epoch = k` performs
//!    one more step on the optimizer's current (already scheduled) lr: `last_epoch` becomes
//!    `k + 1`; `StepLR`, `MultiStepLR` and `ConstantLR` apply the change due at epoch `k + 1`
//!    at once (the resumed run is an epoch ahead), the others keep the lr but count one epoch
//!    more than they stepped, so their later lrs miss one epoch's change (`LinearLR`,
//!    `PolynomialLR`, `CosineAnnealingLR`), and
//!    `CosineAnnealingWarmRestarts` sets `T_cur = k + 1`, wrapped at most once. optarena builds
//!    the scheduler fresh from the groups' `initial_lr` (which must be set, as torch
//!    requires; [`CyclicLR`] and [`OneCycleLR`] take their bases from their own options and
//!    need none) and replays `k` steps: the result, scheduler and optimizer, is exactly that of
//!    a fresh scheduler stepped `k` times (`last_epoch == k`). `last_epoch < -1` is an error.
//!    This costs `k` steps; [`LrScheduler::load_state_dict`] is the cheaper way to resume.
//! 3. **`SequentialLR` resumes on the right child** (pytorch/pytorch#162591). torch's
//!    `SequentialLR(..., last_epoch=k)` always initializes the first scheduler, whatever
//!    milestone `k` has passed. optarena replays the `k` steps, milestones included, so the
//!    child that is active at `k` drives the lr; and [`SequentialLR`] / [`ChainedScheduler`]
//!    states carry every child's full state, so `load_state_dict` restores each child, not
//!    only the composite's counters.
//!
//! Two more consequences of keeping the schedule in the scheduler: [`OneCycleLR`] keeps its
//! `initial_lr`, `max_lr`, `min_lr`, `max_momentum`, `base_momentum` per group in its own
//! state (torch keeps them in the optimizer's groups, so a resumed `OneCycleLR` built with
//! other options runs a mix of both), and [`CyclicLR`] restores its lr and momentum on load
//! (torch leaves the constructor's `base_lr` and `max_momentum` in place until the next step).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::hyper::{GroupHyperparams, HyperField, HyperValue};

/// The state of a scheduler that keeps nothing but its options and the [`BaseState`] every
/// scheduler has: the struct (serialised flat, with torch's names) and its [`LeafState`], whose
/// `validate` is the options' own `check`.
macro_rules! options_state {
    ($state:ident, $config:ty) => {
        #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
        pub(crate) struct $state {
            config: $config,
            #[serde(flatten)]
            base: $crate::schedule::BaseState,
        }

        impl $crate::schedule::LeafState for $state {
            fn base(&self) -> &$crate::schedule::BaseState {
                &self.base
            }
            fn base_mut(&mut self) -> &mut $crate::schedule::BaseState {
                &mut self.base
            }
            fn validate(&self) -> $crate::error::Result<()> {
                self.config.check()
            }
            fn last_momentum(&self) -> Option<(&[f64], bool)> {
                None
            }
        }
    };
}

pub mod composite;
pub mod cosine;
pub mod cyclic;
pub mod decay;
pub mod lambda;
pub mod linear;
pub mod one_cycle;
pub mod plateau;
pub mod step;
pub mod swa;

pub use composite::{ChainedScheduler, SequentialLR, SequentialLRConfig};
pub use cosine::{
    CosineAnnealingLR, CosineAnnealingLRConfig, CosineAnnealingWarmRestarts,
    CosineAnnealingWarmRestartsConfig,
};
pub use cyclic::{CyclicLR, CyclicLRConfig, ScaleFn};
pub use decay::{ExponentialLR, ExponentialLRConfig, PolynomialLR, PolynomialLRConfig};
pub use lambda::{LambdaLR, LambdaLRConfig, LrLambda, MultiplicativeLR};
pub use linear::{ConstantLR, ConstantLRConfig, LinearLR, LinearLRConfig};
pub use one_cycle::{OneCycleLR, OneCycleLRConfig};
pub use plateau::{ReduceLROnPlateau, ReduceLROnPlateauConfig};
pub use step::{MultiStepLR, MultiStepLRConfig, StepLR, StepLRConfig};
pub use swa::{AnnealStrategy, SWALRConfig, SWALR};

/// Version of the scheduler state layout, saved as `"format"`.
pub const SCHEDULER_STATE_FORMAT: u32 = 1;

/// A learning-rate scheduler: torch's `LRScheduler` interface, object-safe so that
/// [`SequentialLR`] and [`ChainedScheduler`] can hold any of them as `Box<dyn LrScheduler>`.
///
/// The methods marked hidden are the pieces of torch's protocol the composites drive
/// (`_initial_step`, `_update_lr`, `recursive_undo`); they are not meant to be called
/// directly.
pub trait LrScheduler: Send {
    /// torch's class name (`"StepLR"`).
    fn name(&self) -> &'static str;

    /// The learning rates this scheduler set last, one per group (torch's `get_last_lr()`).
    fn get_last_lr(&self) -> &[f64];

    /// torch's `last_epoch`: steps taken since construction (0 right after it). `None` for
    /// [`ChainedScheduler`], which has none in torch either.
    fn last_epoch(&self) -> Option<i64>;

    /// The groups' base learning rates (torch's `base_lrs`), where the scheduler has them.
    fn base_lrs(&self) -> Option<&[f64]>;

    /// One step (torch's `scheduler.step()`), after `optimizer.step()`. On an error nothing
    /// has changed.
    fn step(&mut self, opt: &mut dyn GroupHyperparams) -> Result<()> {
        guarded(self, opt, |s, o| s.raw_step(o, None))
    }

    /// torch's `scheduler.step(epoch)`: with `Some(epoch)` the scheduler jumps to that epoch,
    /// computing the lr in closed form where torch has one (deprecated in torch, kept for
    /// [`CosineAnnealingWarmRestarts`], whose `step(epoch + i / iters)` takes fractional
    /// epochs; the others need a whole number). `None` is [`LrScheduler::step`].
    fn step_epoch(&mut self, opt: &mut dyn GroupHyperparams, epoch: Option<f64>) -> Result<()> {
        guarded(self, opt, |s, o| s.raw_step(o, epoch))
    }

    /// [`ReduceLROnPlateau`]'s `step(metrics)`. Every other scheduler returns an error.
    fn step_metric(&mut self, opt: &mut dyn GroupHyperparams, metric: f64) -> Result<()> {
        let _ = (opt, metric);
        Err(Error::Scheduler(format!(
            "{}.step() takes no metric (only ReduceLROnPlateau does)",
            self.name()
        )))
    }

    /// The whole state, as JSON (see the [module docs](self)). Closures are not included.
    fn state_dict(&self) -> Result<Value>;

    /// Loads a state written by [`LrScheduler::state_dict`] and writes the saved lr (and
    /// cycled momentum, and `initial_lr`) into the optimizer's groups, so the run continues on
    /// the saved schedule whatever the optimizer held (see the [module docs](self)). On an
    /// error nothing changes.
    fn load_state_dict(&mut self, opt: &mut dyn GroupHyperparams, state: &Value) -> Result<()> {
        guarded(self, opt, |s, o| {
            s.raw_load(state)?;
            s.raw_apply(o)
        })
    }

    /// [`LrScheduler::state_dict`] as a JSON string.
    fn state_dict_json(&self) -> Result<String> {
        Ok(serde_json::to_string(&self.state_dict()?)?)
    }

    /// [`LrScheduler::load_state_dict`] from a JSON string.
    fn load_state_dict_json(&mut self, opt: &mut dyn GroupHyperparams, json: &str) -> Result<()> {
        let v: Value = serde_json::from_str(json)?;
        self.load_state_dict(opt, &v)
    }

    /// torch's `step(epoch)` without the all-or-nothing guard.
    #[doc(hidden)]
    fn raw_step(&mut self, opt: &mut dyn GroupHyperparams, epoch: Option<f64>) -> Result<()>;

    /// torch's `_initial_step()`: `_step_count = 0`, then one step in "initial" mode.
    #[doc(hidden)]
    fn raw_initial_step(&mut self, opt: &mut dyn GroupHyperparams) -> Result<()>;

    /// torch's `_update_lr(epoch)` with an explicit epoch (what `SequentialLR` calls at a
    /// milestone): `last_epoch = epoch`, closed form if there is one, no `_step_count` change.
    #[doc(hidden)]
    fn raw_update_lr(&mut self, opt: &mut dyn GroupHyperparams, epoch: i64) -> Result<()>;

    /// torch's `SequentialLR.recursive_undo`: `last_epoch -= 1`, recursing into composites.
    #[doc(hidden)]
    fn raw_undo(&mut self);

    /// Replaces the state from a saved one, touching no optimizer.
    #[doc(hidden)]
    fn raw_load(&mut self, state: &Value) -> Result<()>;

    /// Writes the state's current values (lr, cycled momentum, `initial_lr`) into the groups.
    #[doc(hidden)]
    fn raw_apply(&self, opt: &mut dyn GroupHyperparams) -> Result<()>;

    /// Number of param groups the scheduler was built for.
    #[doc(hidden)]
    fn raw_num_groups(&self) -> usize;

    /// Whether a step may change `momentum` / `betas` as well as `lr`.
    #[doc(hidden)]
    fn raw_touches_momentum(&self) -> bool;

    /// Whether this is `ReduceLROnPlateau` (composites refuse it, as torch does).
    #[doc(hidden)]
    fn raw_needs_metric(&self) -> bool;
}

/// Runs `f` so that on an error both the scheduler and the optimizer are as they were.
pub(crate) fn guarded<S: LrScheduler + ?Sized>(
    s: &mut S,
    opt: &mut dyn GroupHyperparams,
    f: impl FnOnce(&mut S, &mut dyn GroupHyperparams) -> Result<()>,
) -> Result<()> {
    let saved = s.state_dict()?;
    let snap = OptSnapshot::take(opt, true)?;
    match f(s, opt) {
        Ok(()) => Ok(()),
        Err(e) => {
            // The saved state was written by this scheduler: it loads back.
            let _ = s.raw_load(&saved);
            snap.restore(opt);
            Err(e)
        }
    }
}

/// Runs `f`, restoring the optimizer's scheduled values if it fails (constructors).
pub(crate) fn transaction<R>(
    opt: &mut dyn GroupHyperparams,
    f: impl FnOnce(&mut dyn GroupHyperparams) -> Result<R>,
) -> Result<R> {
    let snap = OptSnapshot::take(opt, true)?;
    let r = f(opt);
    if r.is_err() {
        snap.restore(opt);
    }
    r
}

/// What a scheduler may change in a group: `lr`, `initial_lr`, `momentum`, `betas`.
struct OptSnapshot {
    lrs: Vec<f64>,
    initial: Vec<Option<f64>>,
    momentum: Vec<Option<HyperValue>>,
    betas: Vec<Option<HyperValue>>,
}

impl OptSnapshot {
    fn take(opt: &dyn GroupHyperparams, momentum: bool) -> Result<Self> {
        let n = opt.num_groups();
        let mut s = OptSnapshot {
            lrs: Vec::with_capacity(n),
            initial: Vec::with_capacity(n),
            momentum: Vec::new(),
            betas: Vec::new(),
        };
        for g in 0..n {
            s.lrs.push(opt.group_lr(g)?);
            s.initial.push(opt.group_initial_lr(g)?);
            if momentum {
                s.momentum.push(opt.group_hyper(g, "momentum").ok());
                s.betas.push(opt.group_hyper(g, "betas").ok());
            }
        }
        Ok(s)
    }

    fn restore(&self, opt: &mut dyn GroupHyperparams) {
        for g in 0..self.lrs.len().min(opt.num_groups()) {
            // These values were valid in this optimizer a moment ago: they set back.
            let _ = opt.set_group_lr(g, self.lrs[g]);
            let _ = opt.set_group_initial_lr(g, self.initial[g]);
            if let Some(Some(m)) = self.momentum.get(g) {
                let _ = opt.set_group_hyper(g, "momentum", m.clone());
            }
            if let Some(Some(b)) = self.betas.get(g) {
                let _ = opt.set_group_hyper(g, "betas", b.clone());
            }
        }
    }
}

/// The fields every torch `LRScheduler` has, with torch's state-dict names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct BaseState {
    /// torch's `base_lrs`: the groups' `initial_lr` when the scheduler was attached.
    pub base_lrs: Vec<f64>,
    /// torch's `last_epoch`.
    pub last_epoch: i64,
    /// torch's `_step_count`.
    #[serde(rename = "_step_count")]
    pub step_count: u64,
    /// torch's `_last_lr`.
    #[serde(rename = "_last_lr")]
    pub last_lr: Vec<f64>,
}

impl BaseState {
    /// A scheduler before its initial step (`last_epoch = -1`).
    pub fn new(base_lrs: Vec<f64>) -> Self {
        BaseState {
            last_lr: base_lrs.clone(),
            base_lrs,
            last_epoch: -1,
            step_count: 0,
        }
    }

    fn check(&self, name: &str) -> Result<()> {
        // `_last_lr` has a value for every group the scheduler stepped; groups added after it
        // was built have none in `base_lrs` (torch's lists have those lengths too).
        if self.base_lrs.len() > self.last_lr.len() {
            return Err(Error::StateDict(format!(
                "{name}: base_lrs has {} values and _last_lr only {}",
                self.base_lrs.len(),
                self.last_lr.len()
            )));
        }
        for (what, v) in [("base_lrs", &self.base_lrs), ("_last_lr", &self.last_lr)] {
            if v.iter().any(|x| !x.is_finite()) {
                return Err(Error::StateDict(format!("{name}: {what} holds {v:?}")));
            }
        }
        Ok(())
    }
}

/// The new values of one step: an lr per group, and the cycled momentum if any.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Values {
    pub lrs: Vec<f64>,
    pub momentum: Option<Vec<f64>>,
}

impl Values {
    pub fn lrs(lrs: Vec<f64>) -> Self {
        Values {
            lrs,
            momentum: None,
        }
    }
}

/// Every group's `lr`.
pub(crate) fn group_lrs(opt: &dyn GroupHyperparams) -> Result<Vec<f64>> {
    (0..opt.num_groups()).map(|g| opt.group_lr(g)).collect()
}

/// Sets every group's `lr`, and `momentum` (or `betas.0` when `use_beta1`) if given.
pub(crate) fn apply(
    opt: &mut dyn GroupHyperparams,
    lrs: &[f64],
    momentum: Option<(&[f64], bool)>,
) -> Result<()> {
    check_groups(opt, lrs.len())?;
    for (g, &lr) in lrs.iter().enumerate() {
        opt.set_group_lr(g, lr)?;
        if let Some((m, use_beta1)) = momentum {
            set_momentum(opt, g, m[g], use_beta1)?;
        }
    }
    Ok(())
}

/// Sets `momentum`, or the first of `betas`, of group `g` (torch's
/// `group["betas"] = (m, *group["betas"][1:])`).
pub(crate) fn set_momentum(
    opt: &mut dyn GroupHyperparams,
    g: usize,
    m: f64,
    use_beta1: bool,
) -> Result<()> {
    if use_beta1 {
        let (_, b2) = <(f64, f64)>::from_value("betas", &opt.group_hyper(g, "betas")?)?;
        opt.set_group_hyper(g, "betas", HyperValue::Pair(m, b2))
    } else {
        opt.set_group_hyper(g, "momentum", HyperValue::Number(m))
    }
}

/// Whether the optimizer's groups have `momentum` / `betas` (torch looks at
/// `optimizer.defaults`; every group has the same keys). Returns `use_beta1`, or `None` when
/// it has neither.
pub(crate) fn momentum_kind(opt: &dyn GroupHyperparams) -> Option<bool> {
    if opt.group_hyper(0, "betas").is_ok() {
        Some(true)
    } else if opt.group_hyper(0, "momentum").is_ok() {
        Some(false)
    } else {
        None
    }
}

/// torch's `_update_lr` when `get_lr` returned fewer values than the optimizer has groups
/// (`zip(param_groups, values, strict=True)`).
pub(crate) const ZIP_SHORTER: &str = "ValueError: zip() argument 2 is shorter than argument 1";
/// torch's `zip(per_group_values, param_groups, strict=True)` with a group added since.
pub(crate) const ZIP_LONGER: &str = "ValueError: zip() argument 2 is longer than argument 1";

/// A scheduler follows groups added to the optimizer after it was built (torch's
/// `add_param_group`), never fewer groups than it was built for.
pub(crate) fn check_follows(opt: &dyn GroupHyperparams, n: usize) -> Result<()> {
    if opt.num_groups() < n {
        return Err(Error::Scheduler(format!(
            "the scheduler was built for {n} param groups but the optimizer has {} (another \
             optimizer was passed)",
            opt.num_groups()
        )));
    }
    Ok(())
}

/// The error of a step that needs a per-group value (`base_lrs`, a lambda, `swa_lr`, ...) of a
/// group added by `add_param_group` after the scheduler was built: torch raises there too
/// (`torch_error`); the chainable steps before and after it go on with the group's own lr.
pub(crate) fn late_group_error(
    name: &str,
    known: usize,
    groups: usize,
    torch_error: &str,
) -> Error {
    let which = if groups - known == 1 {
        format!("param group {known} was")
    } else {
        format!("param groups {known}..{groups} were")
    };
    Error::Scheduler(format!(
        "{name}: {which} added to the optimizer after the scheduler was built and this step \
         needs a value the scheduler keeps per group (its base_lr, or what it was built \
         with); torch raises here too ({torch_error}). Build the scheduler after adding the \
         group"
    ))
}

/// [`late_group_error`] if a step computed values for fewer groups than the optimizer has.
pub(crate) fn check_late_groups(
    name: &str,
    computed: usize,
    opt: &dyn GroupHyperparams,
    torch_error: &str,
) -> Result<()> {
    if computed < opt.num_groups() {
        return Err(late_group_error(
            name,
            computed,
            opt.num_groups(),
            torch_error,
        ));
    }
    Ok(())
}

/// The scheduler and the optimizer must have the same number of groups.
pub(crate) fn check_groups(opt: &dyn GroupHyperparams, n: usize) -> Result<()> {
    if opt.num_groups() != n {
        return Err(Error::Scheduler(format!(
            "the scheduler has values for {n} param groups but the optimizer has {} \
             (a group was added or another optimizer was passed)",
            opt.num_groups()
        )));
    }
    Ok(())
}

/// torch's `LRScheduler.__init__` bookkeeping of `initial_lr`: with `last_epoch == -1`,
/// `group.setdefault("initial_lr", group["lr"])`; otherwise every group must have one, and (the
/// optarena resume, see the module docs) its `lr` is reset to it for the replay. Returns
/// `base_lrs`.
pub(crate) fn attach(opt: &mut dyn GroupHyperparams, last_epoch: i64) -> Result<Vec<f64>> {
    check_last_epoch(last_epoch)?;
    let n = opt.num_groups();
    let mut base = Vec::with_capacity(n);
    for g in 0..n {
        let initial = match (last_epoch, opt.group_initial_lr(g)?) {
            (_, Some(x)) => x,
            (-1, None) => {
                let lr = opt.group_lr(g)?;
                opt.set_group_initial_lr(g, Some(lr))?;
                lr
            }
            (_, None) => return Err(missing_initial_lr(g)),
        };
        if last_epoch >= 0 {
            opt.set_group_lr(g, initial)?;
        }
        base.push(initial);
    }
    Ok(base)
}

pub(crate) fn missing_initial_lr(g: usize) -> Error {
    Error::Scheduler(format!(
        "param 'initial_lr' is not specified in param_groups[{g}] when resuming scheduler with \
         last_epoch >= 0 (set it with GroupHyperparams::set_group_initial_lr, or build the \
         scheduler fresh and load its state_dict)"
    ))
}

pub(crate) fn check_last_epoch(last_epoch: i64) -> Result<()> {
    if last_epoch < -1 {
        return Err(Error::InvalidHyperparameter(format!(
            "last_epoch must be -1 (a fresh schedule) or the number of steps already taken, \
             but got {last_epoch}"
        )));
    }
    Ok(())
}

/// Replays `last_epoch` steps after the initial one (optarena's resume, see the module docs).
pub(crate) fn replay(
    s: &mut dyn LrScheduler,
    opt: &mut dyn GroupHyperparams,
    last_epoch: i64,
) -> Result<()> {
    for _ in 0..last_epoch.max(0) {
        s.raw_step(opt, None)?;
    }
    Ok(())
}

/// Python's `a / b` on floats: `ZeroDivisionError` instead of infinity.
pub(crate) fn div(a: f64, b: f64) -> Result<f64> {
    if b == 0.0 {
        return Err(Error::Scheduler("float division by zero".into()));
    }
    Ok(a / b)
}

/// Python's `a % b` on ints (the sign of `b`).
pub(crate) fn py_mod(a: i64, b: i64) -> Result<i64> {
    if b == 0 {
        return Err(Error::Scheduler("integer modulo by zero".into()));
    }
    let r = a.wrapping_rem(b);
    Ok(if r != 0 && ((r < 0) != (b < 0)) {
        r + b
    } else {
        r
    })
}

/// Python's `a // b` on ints (floor).
pub(crate) fn py_floordiv(a: i64, b: i64) -> Result<i64> {
    if b == 0 {
        return Err(Error::Scheduler(
            "integer division or modulo by zero".into(),
        ));
    }
    let q = a.wrapping_div(b);
    Ok(if a.wrapping_rem(b) != 0 && ((a < 0) != (b < 0)) {
        q - 1
    } else {
        q
    })
}

/// Python's `a ** b` on floats (libm `pow`, as CPython's `float_pow`), with its errors.
pub(crate) fn py_pow(a: f64, b: f64) -> Result<f64> {
    if a == 0.0 && b < 0.0 {
        return Err(Error::Scheduler(
            "0.0 cannot be raised to a negative power".into(),
        ));
    }
    if a < 0.0 && b.is_finite() && b.fract() != 0.0 {
        return Err(Error::Scheduler(format!(
            "{a:?} ** {b:?} is a complex number"
        )));
    }
    Ok(a.powf(b))
}

/// Python's `max(a, b)`: `b` only if `b > a`.
pub(crate) fn py_max(a: f64, b: f64) -> f64 {
    if b > a {
        b
    } else {
        a
    }
}

/// Python's `bisect.bisect_right`, step for step (so unsorted lists behave as in torch).
pub(crate) fn bisect_right(a: &[i64], x: i64) -> usize {
    let (mut lo, mut hi) = (0, a.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        if x < a[mid] {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo
}

/// An epoch passed to `step(epoch)` for a scheduler that counts whole epochs.
pub(crate) fn whole_epoch(name: &str, epoch: f64) -> Result<i64> {
    if !epoch.is_finite() || epoch.fract() != 0.0 || epoch.abs() > 9.0e15 {
        return Err(Error::Scheduler(format!(
            "{name}.step(epoch) needs a whole epoch, got {epoch:?} (only \
             CosineAnnealingWarmRestarts takes fractional epochs)"
        )));
    }
    Ok(epoch as i64)
}

pub(crate) fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidHyperparameter(msg.into())
}

/// A configuration value that must be a real number (optarena rejects NaN and infinity where
/// torch has no check).
pub(crate) fn finite(name: &str, x: f64) -> Result<()> {
    if !x.is_finite() {
        return Err(invalid(format!("Invalid {name} value: {x:?}")));
    }
    Ok(())
}

/// One value for every group, or one per group (torch's `float | list[float]` options).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerGroup {
    /// The same value for every group.
    All(f64),
    /// One value per group, in group order.
    Each(Vec<f64>),
}

impl From<f64> for PerGroup {
    fn from(x: f64) -> Self {
        PerGroup::All(x)
    }
}

impl From<Vec<f64>> for PerGroup {
    fn from(v: Vec<f64>) -> Self {
        PerGroup::Each(v)
    }
}

impl PerGroup {
    /// torch's `_format_param(name, optimizer, param)`, with its message.
    pub(crate) fn format(&self, name: &str, n: usize) -> Result<Vec<f64>> {
        let v = match self {
            PerGroup::All(x) => vec![*x; n],
            PerGroup::Each(v) => {
                if v.len() != n {
                    return Err(invalid(format!(
                        "{name} must have the same length as optimizer.param_groups. {name} has \
                         {} values, param_groups has {n}.",
                        v.len()
                    )));
                }
                v.clone()
            }
        };
        for &x in &v {
            finite(name, x)?;
        }
        Ok(v)
    }
}

/// Serde for floats that may be infinite (`ReduceLROnPlateau`'s `best`): JSON has no
/// infinity, so they are written as the strings `"inf"`, `"-inf"`, `"nan"`.
pub(crate) mod float_or_inf {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        if x.is_finite() {
            s.serialize_f64(*x)
        } else if x.is_nan() {
            s.serialize_str("nan")
        } else if *x > 0.0 {
            s.serialize_str("inf")
        } else {
            s.serialize_str("-inf")
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Num(f64),
        Str(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        match Repr::deserialize(d)? {
            Repr::Num(x) => Ok(x),
            Repr::Str(s) => match s.as_str() {
                "inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                "nan" => Ok(f64::NAN),
                other => Err(serde::de::Error::custom(format!(
                    "expected a number, \"inf\", \"-inf\" or \"nan\", got {other:?}"
                ))),
            },
        }
    }
}

/// A serializable leaf-scheduler state: the config, [`BaseState`], and whatever else it runs
/// on.
pub(crate) trait LeafState: Serialize + DeserializeOwned + Clone + Send + 'static {
    fn base(&self) -> &BaseState;
    fn base_mut(&mut self) -> &mut BaseState;
    /// Checks a loaded state as the constructor checks options.
    fn validate(&self) -> Result<()>;
    /// The momentum values the scheduler set last, and `use_beta1`, if it cycles momentum
    /// (`None` if it does not).
    fn last_momentum(&self) -> Option<(&[f64], bool)>;
}

/// A scheduler built on torch's `LRScheduler.step` / `_update_lr` / `get_lr`.
pub(crate) trait Leaf: Send + 'static {
    const NAME: &'static str;
    /// What torch raises when a step of this scheduler needs a value it keeps per group
    /// (`base_lrs`, `lr_lambdas`, ...) for a group added by `add_param_group` after the
    /// scheduler was built (see [`check_late_groups`]).
    const LATE_GROUP_TORCH: &'static str = ZIP_SHORTER;
    type State: LeafState;
    fn state(&self) -> &Self::State;
    fn state_mut(&mut self) -> &mut Self::State;

    /// torch's `get_lr()` at the current `last_epoch`; `initial` is torch's `_is_initial`.
    fn get_lr(&mut self, opt: &dyn GroupHyperparams, initial: bool) -> Result<Values>;

    /// torch's `_get_closed_form_lr()`, for the schedulers that have one (`None` for those
    /// that have none; `step(epoch)` then uses `get_lr`).
    fn closed_form(&self) -> Option<Result<Vec<f64>>>;

    /// Checks a state about to be loaded against what is not in it (closures).
    fn check_loaded(&self, state: &Self::State) -> Result<()>;

    /// torch's `step(epoch)`: `LRScheduler.step` unless overridden
    /// (`CosineAnnealingWarmRestarts`).
    fn leaf_step(
        &mut self,
        opt: &mut dyn GroupHyperparams,
        epoch: Option<f64>,
        initial: bool,
    ) -> Result<()> {
        self.state_mut().base_mut().step_count += 1;
        update_lr(self, opt, epoch, initial)
    }
}

/// torch's `LRScheduler._update_lr(epoch)`.
pub(crate) fn update_lr<L: Leaf + ?Sized>(
    s: &mut L,
    opt: &mut dyn GroupHyperparams,
    epoch: Option<f64>,
    initial: bool,
) -> Result<()> {
    check_follows(opt, s.state().base().base_lrs.len())?;
    let values = match epoch {
        None => {
            s.state_mut().base_mut().last_epoch += 1;
            s.get_lr(opt, initial)?
        }
        Some(e) => {
            s.state_mut().base_mut().last_epoch = whole_epoch(L::NAME, e)?;
            match s.closed_form() {
                Some(lrs) => Values::lrs(lrs?),
                None => s.get_lr(opt, initial)?,
            }
        }
    };
    check_late_groups(L::NAME, values.lrs.len(), opt, L::LATE_GROUP_TORCH)?;
    let use_beta1 = s.state().last_momentum().map(|(_, b)| b);
    let momentum = match (&values.momentum, use_beta1) {
        (Some(m), Some(b)) => Some((m.as_slice(), b)),
        _ => None,
    };
    apply(opt, &values.lrs, momentum)?;
    s.state_mut().base_mut().last_lr = group_lrs(opt)?;
    Ok(())
}

pub(crate) fn leaf_state_dict<L: Leaf + ?Sized>(s: &L) -> Result<Value> {
    let mut v = serde_json::to_value(s.state())?;
    if let Value::Object(m) = &mut v {
        m.insert("scheduler".into(), Value::String(L::NAME.into()));
        m.insert("format".into(), Value::from(SCHEDULER_STATE_FORMAT));
    }
    Ok(v)
}

/// Checks the `"scheduler"` and `"format"` fields of a saved state.
pub(crate) fn check_saved(name: &str, v: &Value) -> Result<()> {
    let saved = v.get("scheduler").and_then(Value::as_str);
    if saved != Some(name) {
        return Err(Error::StateDict(format!(
            "it was saved by {}, this is {name}",
            saved.unwrap_or("something that is not an optarena scheduler")
        )));
    }
    let format = v.get("format").and_then(Value::as_u64);
    if format != Some(SCHEDULER_STATE_FORMAT as u64) {
        return Err(Error::StateDict(format!(
            "{name}: scheduler state format {format:?} is not supported (this build reads \
             {SCHEDULER_STATE_FORMAT})"
        )));
    }
    Ok(())
}

pub(crate) fn leaf_load<L: Leaf + ?Sized>(s: &mut L, v: &Value) -> Result<()> {
    check_saved(L::NAME, v)?;
    let st: L::State = serde_json::from_value(v.clone())
        .map_err(|e| Error::StateDict(format!("{}: {e}", L::NAME)))?;
    st.base().check(L::NAME)?;
    st.validate()
        .map_err(|e| Error::StateDict(format!("{}: {e}", L::NAME)))?;
    s.check_loaded(&st)?;
    *s.state_mut() = st;
    Ok(())
}

pub(crate) fn leaf_apply<L: Leaf + ?Sized>(s: &L, opt: &mut dyn GroupHyperparams) -> Result<()> {
    let st = s.state();
    apply(opt, &st.base().last_lr, st.last_momentum())?;
    for (g, &b) in st.base().base_lrs.iter().enumerate() {
        opt.set_group_initial_lr(g, Some(b))?;
    }
    Ok(())
}

/// Implements [`LrScheduler`] for a [`Leaf`].
macro_rules! leaf_scheduler {
    ($t:ty) => {
        impl $crate::schedule::LrScheduler for $t {
            fn name(&self) -> &'static str {
                <$t as $crate::schedule::Leaf>::NAME
            }
            fn get_last_lr(&self) -> &[f64] {
                use $crate::schedule::{Leaf, LeafState};
                &self.state().base().last_lr
            }
            fn last_epoch(&self) -> Option<i64> {
                use $crate::schedule::{Leaf, LeafState};
                Some(self.state().base().last_epoch)
            }
            fn base_lrs(&self) -> Option<&[f64]> {
                use $crate::schedule::{Leaf, LeafState};
                Some(&self.state().base().base_lrs)
            }
            fn state_dict(&self) -> $crate::error::Result<serde_json::Value> {
                $crate::schedule::leaf_state_dict(self)
            }
            fn raw_step(
                &mut self,
                opt: &mut dyn $crate::hyper::GroupHyperparams,
                epoch: Option<f64>,
            ) -> $crate::error::Result<()> {
                $crate::schedule::Leaf::leaf_step(self, opt, epoch, false)
            }
            fn raw_initial_step(
                &mut self,
                opt: &mut dyn $crate::hyper::GroupHyperparams,
            ) -> $crate::error::Result<()> {
                use $crate::schedule::{Leaf, LeafState};
                self.state_mut().base_mut().step_count = 0;
                self.leaf_step(opt, None, true)
            }
            fn raw_update_lr(
                &mut self,
                opt: &mut dyn $crate::hyper::GroupHyperparams,
                epoch: i64,
            ) -> $crate::error::Result<()> {
                $crate::schedule::update_lr(self, opt, Some(epoch as f64), false)
            }
            fn raw_undo(&mut self) {
                use $crate::schedule::{Leaf, LeafState};
                self.state_mut().base_mut().last_epoch -= 1;
            }
            fn raw_load(&mut self, state: &serde_json::Value) -> $crate::error::Result<()> {
                $crate::schedule::leaf_load(self, state)
            }
            fn raw_apply(
                &self,
                opt: &mut dyn $crate::hyper::GroupHyperparams,
            ) -> $crate::error::Result<()> {
                $crate::schedule::leaf_apply(self, opt)
            }
            fn raw_num_groups(&self) -> usize {
                use $crate::schedule::{Leaf, LeafState};
                self.state().base().last_lr.len()
            }
            fn raw_touches_momentum(&self) -> bool {
                use $crate::schedule::{Leaf, LeafState};
                self.state().last_momentum().is_some()
            }
            fn raw_needs_metric(&self) -> bool {
                false
            }
        }
    };
}
pub(crate) use leaf_scheduler;

/// Builds a leaf scheduler as torch's constructor does (attach, initial step), then replays
/// `last_epoch` steps (optarena's resume); on an error the optimizer is left as it was.
pub(crate) fn construct<S: LrScheduler>(
    opt: &mut dyn GroupHyperparams,
    last_epoch: i64,
    make: impl FnOnce(Vec<f64>) -> Result<S>,
) -> Result<S> {
    transaction(opt, |opt| {
        let base = attach(opt, last_epoch)?;
        let mut s = make(base)?;
        s.raw_initial_step(opt)?;
        replay(&mut s, opt, last_epoch)?;
        Ok(s)
    })
}
