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
//! use optarena::{ArenaBuilder, ParamGroup, SGD, SGDConfig};
//!
//! let mut b = ArenaBuilder::<f32>::new();
//! b.zeros("w", &[4])?;
//! let arena = b.build();
//! let mut opt = SGD::new(&arena, [ParamGroup::all()], SGDConfig::default().with_lr(0.1))?;
//! // torch: StepLR(optimizer, step_size=2, gamma=0.5)
//! let mut sched = StepLR::new(&mut opt, StepLRConfig::new(2).with_gamma(0.5))?;
//! let mut lrs = Vec::new();
//! for _epoch in 0..5 {
//!     lrs.push(opt.lr(0)?);
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
//! - Each scheduler's options are a config struct with torch's keyword names (serialised under
//!   them), built from torch's required arguments and defaults (`StepLRConfig::new(step_size)`,
//!   `LinearLRConfig::new()`) and one `with_<field>` builder step per option
//!   (`.with_gamma(0.5)`); the structs are `#[non_exhaustive]`, as the optimizers' configs are.
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

#[cfg(doc)]
use crate::{error::Error, hyper::GroupHyperparams};

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

mod groups;
mod options;
mod protocol;
mod pymath;

pub(crate) use groups::*;
pub use options::PerGroup;
pub(crate) use options::*;
pub(crate) use protocol::*;
pub use protocol::{LrScheduler, SCHEDULER_STATE_FORMAT};
pub(crate) use pymath::*;
