//! The scheduler protocol: [`LrScheduler`], torch's `LRScheduler` interface, and the
//! machinery every leaf scheduler is built on (the [`Leaf`] trait and its state, torch's
//! `_update_lr`, construction with attach / initial step / replay, the all-or-nothing guard).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::groups::{apply, check_follows, check_late_groups, group_lrs, ZIP_SHORTER};
use super::pymath::whole_epoch;
use crate::error::{Error, Result};
use crate::hyper::{GroupHyperparams, HyperValue};

/// Version of the scheduler state layout, saved as `"format"`.
pub const SCHEDULER_STATE_FORMAT: u32 = 1;

/// A learning-rate scheduler: torch's `LRScheduler` interface, object-safe so that
/// [`SequentialLR`](super::SequentialLR) and [`ChainedScheduler`](super::ChainedScheduler) can hold any of them as `Box<dyn LrScheduler>`.
///
/// Sealed: it is implemented by the schedulers of this module only. The pieces of torch's
/// protocol that the composites drive (`_initial_step`, `_update_lr`, `recursive_undo`) and
/// the all-or-nothing undo live in a private supertrait, so they are neither callable nor
/// implementable outside the crate:
///
/// ```compile_fail,E0277
/// use optarena::schedule::LrScheduler;
///
/// struct Constant(Vec<f64>);
///
/// // error[E0277]: the private supertrait is not implemented (and cannot be, outside optarena)
/// impl LrScheduler for Constant {
///     fn name(&self) -> &'static str {
///         "Constant"
///     }
///     fn get_last_lr(&self) -> &[f64] {
///         &self.0
///     }
///     fn last_epoch(&self) -> Option<i64> {
///         None
///     }
///     fn base_lrs(&self) -> Option<&[f64]> {
///         None
///     }
///     fn state_dict(&self) -> Result<serde_json::Value, optarena::Error> {
///         Ok(serde_json::Value::Null)
///     }
/// }
/// ```
pub trait LrScheduler: sealed::Protocol {
    /// torch's class name (`"StepLR"`).
    fn name(&self) -> &'static str;

    /// The learning rates this scheduler set last, one per group (torch's `get_last_lr()`).
    fn get_last_lr(&self) -> &[f64];

    /// torch's `last_epoch`: steps taken since construction (0 right after it). `None` for
    /// [`ChainedScheduler`](super::ChainedScheduler), which has none in torch either.
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
    /// [`CosineAnnealingWarmRestarts`](super::CosineAnnealingWarmRestarts), whose `step(epoch + i / iters)` takes fractional
    /// epochs; the others need a whole number). `None` is [`LrScheduler::step`].
    fn step_epoch(&mut self, opt: &mut dyn GroupHyperparams, epoch: Option<f64>) -> Result<()> {
        guarded(self, opt, |s, o| s.raw_step(o, epoch))
    }

    /// [`ReduceLROnPlateau`](super::ReduceLROnPlateau)'s `step(metrics)`. Every other scheduler returns an error.
    fn step_metric(&mut self, opt: &mut dyn GroupHyperparams, metric: f64) -> Result<()> {
        let _ = (opt, metric);
        Err(Error::Scheduler(format!(
            "{}.step() takes no metric (only ReduceLROnPlateau does)",
            self.name()
        )))
    }

    /// The whole state, as JSON (see the [module docs](crate::schedule)). Closures are not included.
    fn state_dict(&self) -> Result<Value>;

    /// Loads a state written by [`LrScheduler::state_dict`] and writes the saved lr (and
    /// cycled momentum, and `initial_lr`) into the optimizer's groups, so the run continues on
    /// the saved schedule whatever the optimizer held (see the [module docs](crate::schedule)). On an
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
}

/// The private half of [`LrScheduler`] (the sealed-trait pattern: a public trait in a private
/// module, so no other crate can name it, implement it, or call its methods).
pub(crate) mod sealed {
    use std::any::Any;

    use serde_json::Value;

    use crate::error::Result;
    use crate::hyper::GroupHyperparams;

    /// A scheduler's whole mutable state, set aside by [`Protocol::raw_snapshot`] and put back
    /// by [`Protocol::raw_restore`] (a clone of the state: no serialisation).
    pub struct Snapshot(pub(crate) Box<dyn Any + Send>);

    impl Snapshot {
        /// The snapshot of a state of type `S`.
        pub fn of<S: Clone + Send + 'static>(state: &S) -> Self {
            Snapshot(Box::new(state.clone()))
        }

        /// The state back; `None` if the snapshot was taken of another type (a bug).
        pub fn into_state<S: 'static>(self) -> Option<S> {
            self.0.downcast::<S>().ok().map(|b| *b)
        }
    }

    /// torch's `LRScheduler` protocol as the composites and the all-or-nothing guard drive
    /// it.
    pub trait Protocol: Send {
        /// torch's `step(epoch)` without the all-or-nothing guard.
        fn raw_step(&mut self, opt: &mut dyn GroupHyperparams, epoch: Option<f64>) -> Result<()>;

        /// torch's `_initial_step()`: `_step_count = 0`, then one step in "initial" mode.
        fn raw_initial_step(&mut self, opt: &mut dyn GroupHyperparams) -> Result<()>;

        /// torch's `_update_lr(epoch)` with an explicit epoch (what `SequentialLR` calls at a
        /// milestone): `last_epoch = epoch`, closed form if there is one, no `_step_count` change.
        fn raw_update_lr(&mut self, opt: &mut dyn GroupHyperparams, epoch: i64) -> Result<()>;

        /// torch's `SequentialLR.recursive_undo`: `last_epoch -= 1`, recursing into composites.
        fn raw_undo(&mut self);

        /// Replaces the state from a saved one, touching no optimizer.
        fn raw_load(&mut self, state: &Value) -> Result<()>;

        /// Writes the state's current values (lr, cycled momentum, `initial_lr`) into the groups.
        fn raw_apply(&self, opt: &mut dyn GroupHyperparams) -> Result<()>;

        /// Number of param groups the scheduler was built for.
        fn raw_num_groups(&self) -> usize;

        /// Whether a step may change `momentum` / `betas` as well as `lr`.
        fn raw_touches_momentum(&self) -> bool;

        /// Whether this is `ReduceLROnPlateau` (composites refuse it, as torch does).
        fn raw_needs_metric(&self) -> bool;

        /// A clone of the whole mutable state (the scheduler's undo: [`Protocol::raw_restore`]
        /// puts it back).
        fn raw_snapshot(&self) -> Snapshot;

        /// Puts back a state taken by [`Protocol::raw_snapshot`] of this very scheduler.
        fn raw_restore(&mut self, snapshot: Snapshot);
    }
}

/// Runs `f` so that on an error both the scheduler and the optimizer are as they were: the
/// scheduler's state is cloned before (its undo), the optimizer's scheduled values too.
pub(crate) fn guarded<S: LrScheduler + ?Sized>(
    s: &mut S,
    opt: &mut dyn GroupHyperparams,
    f: impl FnOnce(&mut S, &mut dyn GroupHyperparams) -> Result<()>,
) -> Result<()> {
    let saved = s.raw_snapshot();
    // A scheduler that never sets momentum cannot have changed it.
    let snap = OptSnapshot::take(opt, s.raw_touches_momentum())?;
    match f(s, opt) {
        Ok(()) => Ok(()),
        Err(e) => {
            s.raw_restore(saved);
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
            s.lrs.push(opt.lr(g)?);
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
            let _ = opt.set_lr(g, self.lrs[g]);
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
                let lr = opt.lr(g)?;
                opt.set_group_initial_lr(g, Some(lr))?;
                lr
            }
            (_, None) => return Err(missing_initial_lr(g)),
        };
        if last_epoch >= 0 {
            opt.set_lr(g, initial)?;
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
        }

        impl $crate::schedule::sealed::Protocol for $t {
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
            fn raw_snapshot(&self) -> $crate::schedule::sealed::Snapshot {
                use $crate::schedule::Leaf;
                $crate::schedule::sealed::Snapshot::of(self.state())
            }
            fn raw_restore(&mut self, snapshot: $crate::schedule::sealed::Snapshot) {
                use $crate::schedule::Leaf;
                match snapshot.into_state::<<$t as $crate::schedule::Leaf>::State>() {
                    Some(st) => *self.state_mut() = st,
                    None => debug_assert!(false, "a snapshot of another scheduler"),
                }
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
