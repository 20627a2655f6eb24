//! `SequentialLR` and `ChainedScheduler`: schedulers made of schedulers.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::builders;
use super::sealed::{Protocol, Snapshot};
use super::{
    apply, bisect_right, check_groups, check_last_epoch, check_saved, group_lrs, invalid,
    transaction, LrScheduler, SCHEDULER_STATE_FORMAT,
};
use crate::error::{Error, Result};
use crate::hyper::GroupHyperparams;

fn minus_one() -> i64 {
    -1
}

/// torch's checks on the children of a composite, with its messages.
fn check_children(
    cls: &str,
    opt: &dyn GroupHyperparams,
    children: &[Box<dyn LrScheduler>],
    empty: &str,
) -> Result<()> {
    if children.is_empty() {
        return Err(invalid(format!("{cls} {empty}, but got no scheduler.")));
    }
    for (i, s) in children.iter().enumerate() {
        if s.raw_needs_metric() {
            return Err(invalid(format!(
                "{cls} does not support `ReduceLROnPlateau` scheduler as it requires additional \
                 kwargs to be specified when calling `step`, but got one at index {i} in the \
                 given schedulers sequence."
            )));
        }
        // optarena cannot compare optimizers by identity; it checks the number of groups.
        if s.raw_num_groups() != opt.num_groups() {
            return Err(invalid(format!(
                "{cls} expects all schedulers to belong to the same optimizer, but got scheduler \
                 {} at index {i} has {} param groups, which is different from the optimizer's {}.",
                s.name(),
                s.raw_num_groups(),
                opt.num_groups()
            )));
        }
    }
    Ok(())
}

/// Writes a child's saved values into the groups it has stepped: a child that last stepped
/// before a group was added (`add_param_group`; a `SequentialLR` child whose milestone has
/// passed) has values for the first groups only, and the composite's own `_last_lr`, written
/// after it, covers them all.
fn apply_child(child: &dyn LrScheduler, opt: &mut dyn GroupHyperparams) -> Result<()> {
    let n = child.raw_num_groups();
    if n > opt.num_groups() {
        return check_groups(opt, n);
    }
    child.raw_apply(&mut FirstGroups { opt, n })
}

/// The first `n` groups of an optimizer.
struct FirstGroups<'a> {
    opt: &'a mut dyn GroupHyperparams,
    n: usize,
}

impl FirstGroups<'_> {
    fn check(&self, group: usize) -> Result<()> {
        if group >= self.n {
            return Err(Error::NoSuchGroup {
                index: group,
                count: self.n,
            });
        }
        Ok(())
    }
}

impl GroupHyperparams for FirstGroups<'_> {
    fn num_groups(&self) -> usize {
        self.n
    }
    fn group_hyper(&self, group: usize, name: &str) -> Result<crate::hyper::HyperValue> {
        self.check(group)?;
        self.opt.group_hyper(group, name)
    }
    fn set_group_hyper(
        &mut self,
        group: usize,
        name: &str,
        value: crate::hyper::HyperValue,
    ) -> Result<()> {
        self.check(group)?;
        self.opt.set_group_hyper(group, name, value)
    }
    fn group_initial_lr(&self, group: usize) -> Result<Option<f64>> {
        self.check(group)?;
        self.opt.group_initial_lr(group)
    }
    fn set_group_initial_lr(&mut self, group: usize, initial_lr: Option<f64>) -> Result<()> {
        self.check(group)?;
        self.opt.set_group_initial_lr(group, initial_lr)
    }
}

fn no_epoch(cls: &str) -> Error {
    Error::Scheduler(format!("{cls}.step() takes no epoch"))
}

fn no_get_lr(cls: &str) -> Error {
    Error::Scheduler(format!(
        "{cls} has no get_lr: it cannot be restarted at a SequentialLR milestone (torch raises \
         NotImplementedError)"
    ))
}

/// The children's states.
fn children_state(children: &[Box<dyn LrScheduler>]) -> Result<Vec<Value>> {
    children.iter().map(|c| c.state_dict()).collect()
}

/// The children's snapshots (their undo).
fn children_snapshot(children: &[Box<dyn LrScheduler>]) -> Vec<Snapshot> {
    children.iter().map(|c| c.raw_snapshot()).collect()
}

/// Puts back the children's snapshots.
fn children_restore(children: &mut [Box<dyn LrScheduler>], saved: Vec<Snapshot>) {
    for (c, snap) in children.iter_mut().zip(saved) {
        c.raw_restore(snap);
    }
}

/// What [`SequentialLR`] set aside for its undo.
struct SequentialSnapshot {
    milestones: Vec<i64>,
    last_epoch: i64,
    last_lr: Vec<f64>,
    children: Vec<Snapshot>,
}

/// What [`ChainedScheduler`] set aside for its undo.
struct ChainedSnapshot {
    last_lr: Vec<f64>,
    children: Vec<Snapshot>,
}

/// Loads the children's states (same number, each checks its own kind).
fn load_children(cls: &str, children: &mut [Box<dyn LrScheduler>], saved: &[Value]) -> Result<()> {
    if saved.len() != children.len() {
        return Err(Error::StateDict(format!(
            "{cls}: the state has {} schedulers, this one has {}",
            saved.len(),
            children.len()
        )));
    }
    for (i, (c, s)) in children.iter_mut().zip(saved).enumerate() {
        c.raw_load(s)
            .map_err(|e| Error::StateDict(format!("{cls}: scheduler {i}: {e}")))?;
    }
    Ok(())
}

/// Options of [`SequentialLR`], with torch's names.
///
/// Built with [`SequentialLRConfig::new`] and one `with_<field>` builder step per option; the
/// struct is `#[non_exhaustive]`, so a torch option added later is not a breaking change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct SequentialLRConfig {
    /// The epochs at which the next scheduler takes over (one fewer than the schedulers).
    pub milestones: Vec<i64>,
    /// -1 for a fresh schedule, or the number of steps already taken: optarena replays them,
    /// milestones included (see the [module docs](super), pytorch/pytorch#162591).
    #[serde(default = "minus_one")]
    pub last_epoch: i64,
}

builders!(SequentialLRConfig {
    milestones: Vec<i64>,
    last_epoch: i64,
});

impl SequentialLRConfig {
    /// torch's defaults with the required `milestones`.
    pub fn new(milestones: Vec<i64>) -> Self {
        SequentialLRConfig {
            milestones,
            last_epoch: -1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SequentialState {
    #[serde(rename = "_milestones")]
    milestones: Vec<i64>,
    last_epoch: i64,
    #[serde(rename = "_last_lr")]
    last_lr: Vec<f64>,
    #[serde(rename = "_schedulers")]
    schedulers: Vec<Value>,
}

/// torch's `SequentialLR`: the schedulers take turns, switching at the milestones. At a
/// milestone the next scheduler restarts from epoch 0 (its closed form where it has one).
///
/// Build the children first on the same optimizer, in order, as in torch (each performs its
/// initial step and the first one attached sets `initial_lr`); `SequentialLR::new` resets the
/// lr to `initial_lr`, undoes the children's initial steps and redoes the first one's.
pub struct SequentialLR {
    children: Vec<Box<dyn LrScheduler>>,
    milestones: Vec<i64>,
    last_epoch: i64,
    last_lr: Vec<f64>,
}

impl std::fmt::Debug for SequentialLR {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SequentialLR")
            .field(
                "schedulers",
                &self.children.iter().map(|c| c.name()).collect::<Vec<_>>(),
            )
            .field("milestones", &self.milestones)
            .field("last_epoch", &self.last_epoch)
            .field("last_lr", &self.last_lr)
            .finish()
    }
}

impl SequentialLR {
    /// torch's `SequentialLR(optimizer, schedulers, milestones, last_epoch=-1)`.
    pub fn new(
        opt: &mut dyn GroupHyperparams,
        schedulers: Vec<Box<dyn LrScheduler>>,
        config: SequentialLRConfig,
    ) -> Result<Self> {
        let cls = "SequentialLR";
        check_children(cls, opt, &schedulers, "expects at least one scheduler")?;
        if config.milestones.len() != schedulers.len() - 1 {
            return Err(invalid(format!(
                "Sequential Schedulers expects number of schedulers provided to be one more than \
                 the number of milestone points, but got number of schedulers {} and the number \
                 of milestones to be equal to {}",
                schedulers.len(),
                config.milestones.len()
            )));
        }
        check_last_epoch(config.last_epoch)?;
        let mut s = SequentialLR {
            children: schedulers,
            milestones: config.milestones,
            last_epoch: 0,
            last_lr: Vec::new(),
        };
        // The children are restored too if construction fails.
        let saved = children_snapshot(&s.children);
        let r = transaction(opt, |opt| {
            // Reset learning rates back to initial values.
            for g in 0..opt.num_groups() {
                let initial = match opt.group_initial_lr(g)? {
                    Some(x) => x,
                    // An optimizer that keeps no `initial_lr`: the first child's base.
                    None => s.children[0]
                        .base_lrs()
                        .and_then(|b| b.get(g).copied())
                        .ok_or_else(|| {
                            Error::Scheduler(format!(
                                "param_groups[{g}] has no 'initial_lr' (KeyError in torch)"
                            ))
                        })?,
                };
                opt.set_lr(g, initial)?;
            }
            // "Undo" the step performed by other schedulers.
            s.raw_undo();
            // Perform the initial step for only the scheduler meant to run at step 0.
            let idx = bisect_right(&s.milestones, 0);
            s.children[idx].raw_initial_step(opt)?;
            s.last_lr = s.children[idx].get_last_lr().to_vec();
            for _ in 0..config.last_epoch.max(0) {
                s.raw_step(opt, None)?;
            }
            Ok(())
        });
        match r {
            Ok(()) => Ok(s),
            Err(e) => {
                children_restore(&mut s.children, saved);
                Err(e)
            }
        }
    }

    /// The children.
    pub fn schedulers(&self) -> &[Box<dyn LrScheduler>] {
        &self.children
    }

    /// The milestones.
    pub fn milestones(&self) -> &[i64] {
        &self.milestones
    }

    fn active(&self) -> usize {
        bisect_right(&self.milestones, self.last_epoch)
    }
}

impl LrScheduler for SequentialLR {
    fn name(&self) -> &'static str {
        "SequentialLR"
    }
    fn get_last_lr(&self) -> &[f64] {
        &self.last_lr
    }
    fn last_epoch(&self) -> Option<i64> {
        Some(self.last_epoch)
    }
    fn base_lrs(&self) -> Option<&[f64]> {
        None
    }
    fn state_dict(&self) -> Result<Value> {
        let st = SequentialState {
            milestones: self.milestones.clone(),
            last_epoch: self.last_epoch,
            last_lr: self.last_lr.clone(),
            schedulers: children_state(&self.children)?,
        };
        let mut v = serde_json::to_value(st)?;
        if let Value::Object(m) = &mut v {
            m.insert("scheduler".into(), Value::String(self.name().into()));
            m.insert("format".into(), Value::from(SCHEDULER_STATE_FORMAT));
        }
        Ok(v)
    }
}

impl Protocol for SequentialLR {
    fn raw_step(&mut self, opt: &mut dyn GroupHyperparams, epoch: Option<f64>) -> Result<()> {
        if epoch.is_some() {
            return Err(no_epoch(self.name()));
        }
        self.last_epoch += 1;
        let idx = self.active();
        if idx > 0 && self.milestones[idx - 1] == self.last_epoch {
            self.children[idx].raw_update_lr(opt, 0)?;
        } else {
            self.children[idx].raw_step(opt, None)?;
        }
        self.last_lr = self.children[idx].get_last_lr().to_vec();
        Ok(())
    }
    fn raw_initial_step(&mut self, opt: &mut dyn GroupHyperparams) -> Result<()> {
        self.raw_step(opt, None)
    }
    fn raw_update_lr(&mut self, _opt: &mut dyn GroupHyperparams, _epoch: i64) -> Result<()> {
        Err(no_get_lr(self.name()))
    }
    fn raw_undo(&mut self) {
        for c in &mut self.children {
            c.raw_undo();
        }
    }
    fn raw_load(&mut self, state: &Value) -> Result<()> {
        check_saved(self.name(), state)?;
        let st: SequentialState = serde_json::from_value(state.clone())
            .map_err(|e| Error::StateDict(format!("SequentialLR: {e}")))?;
        if st.milestones.len() + 1 != self.children.len()
            || st.last_lr.iter().any(|x| !x.is_finite())
        {
            return Err(Error::StateDict(format!(
                "SequentialLR: {} milestones and _last_lr {:?} do not fit {} schedulers",
                st.milestones.len(),
                st.last_lr,
                self.children.len()
            )));
        }
        load_children("SequentialLR", &mut self.children, &st.schedulers)?;
        self.milestones = st.milestones;
        self.last_epoch = st.last_epoch;
        self.last_lr = st.last_lr;
        Ok(())
    }
    fn raw_apply(&self, opt: &mut dyn GroupHyperparams) -> Result<()> {
        for c in &self.children {
            apply_child(&**c, opt)?;
        }
        // The child that stepped last wins (its cycled momentum), then the lr saved.
        apply_child(&*self.children[self.active()], opt)?;
        apply(opt, &self.last_lr, None)
    }
    fn raw_num_groups(&self) -> usize {
        self.children[0].raw_num_groups()
    }
    fn raw_touches_momentum(&self) -> bool {
        self.children.iter().any(|c| c.raw_touches_momentum())
    }
    fn raw_needs_metric(&self) -> bool {
        false
    }
    fn raw_snapshot(&self) -> Snapshot {
        Snapshot(Box::new(SequentialSnapshot {
            milestones: self.milestones.clone(),
            last_epoch: self.last_epoch,
            last_lr: self.last_lr.clone(),
            children: children_snapshot(&self.children),
        }))
    }
    fn raw_restore(&mut self, snapshot: Snapshot) {
        match snapshot.into_state::<SequentialSnapshot>() {
            Some(st) => {
                self.milestones = st.milestones;
                self.last_epoch = st.last_epoch;
                self.last_lr = st.last_lr;
                children_restore(&mut self.children, st.children);
            }
            None => debug_assert!(false, "a snapshot of another scheduler"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ChainedState {
    #[serde(rename = "_last_lr")]
    last_lr: Vec<f64>,
    #[serde(rename = "_schedulers")]
    schedulers: Vec<Value>,
}

/// torch's `ChainedScheduler`: every step steps each scheduler in turn, so their
/// (chainable) effects multiply.
pub struct ChainedScheduler {
    children: Vec<Box<dyn LrScheduler>>,
    last_lr: Vec<f64>,
}

impl std::fmt::Debug for ChainedScheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainedScheduler")
            .field(
                "schedulers",
                &self.children.iter().map(|c| c.name()).collect::<Vec<_>>(),
            )
            .field("last_lr", &self.last_lr)
            .finish()
    }
}

impl ChainedScheduler {
    /// torch's `ChainedScheduler(schedulers, optimizer)`. Build the children first, on the
    /// same optimizer.
    pub fn new(
        opt: &mut dyn GroupHyperparams,
        schedulers: Vec<Box<dyn LrScheduler>>,
    ) -> Result<Self> {
        check_children(
            "ChainedScheduler",
            opt,
            &schedulers,
            "expects at least one scheduler to be chained",
        )?;
        Ok(ChainedScheduler {
            children: schedulers,
            last_lr: group_lrs(opt)?,
        })
    }

    /// The children.
    pub fn schedulers(&self) -> &[Box<dyn LrScheduler>] {
        &self.children
    }
}

impl LrScheduler for ChainedScheduler {
    fn name(&self) -> &'static str {
        "ChainedScheduler"
    }
    fn get_last_lr(&self) -> &[f64] {
        &self.last_lr
    }
    fn last_epoch(&self) -> Option<i64> {
        None
    }
    fn base_lrs(&self) -> Option<&[f64]> {
        None
    }
    fn state_dict(&self) -> Result<Value> {
        let st = ChainedState {
            last_lr: self.last_lr.clone(),
            schedulers: children_state(&self.children)?,
        };
        let mut v = serde_json::to_value(st)?;
        if let Value::Object(m) = &mut v {
            m.insert("scheduler".into(), Value::String(self.name().into()));
            m.insert("format".into(), Value::from(SCHEDULER_STATE_FORMAT));
        }
        Ok(v)
    }
}

impl Protocol for ChainedScheduler {
    fn raw_step(&mut self, opt: &mut dyn GroupHyperparams, epoch: Option<f64>) -> Result<()> {
        if epoch.is_some() {
            return Err(no_epoch(self.name()));
        }
        for c in &mut self.children {
            c.raw_step(opt, None)?;
        }
        self.last_lr = group_lrs(opt)?;
        Ok(())
    }
    fn raw_initial_step(&mut self, opt: &mut dyn GroupHyperparams) -> Result<()> {
        self.raw_step(opt, None)
    }
    fn raw_update_lr(&mut self, _opt: &mut dyn GroupHyperparams, _epoch: i64) -> Result<()> {
        Err(no_get_lr(self.name()))
    }
    fn raw_undo(&mut self) {
        for c in &mut self.children {
            c.raw_undo();
        }
    }
    fn raw_load(&mut self, state: &Value) -> Result<()> {
        check_saved(self.name(), state)?;
        let st: ChainedState = serde_json::from_value(state.clone())
            .map_err(|e| Error::StateDict(format!("ChainedScheduler: {e}")))?;
        if st.last_lr.iter().any(|x| !x.is_finite()) {
            return Err(Error::StateDict(format!(
                "ChainedScheduler: _last_lr holds {:?}",
                st.last_lr
            )));
        }
        load_children("ChainedScheduler", &mut self.children, &st.schedulers)?;
        self.last_lr = st.last_lr;
        Ok(())
    }
    fn raw_apply(&self, opt: &mut dyn GroupHyperparams) -> Result<()> {
        for c in &self.children {
            apply_child(&**c, opt)?;
        }
        check_groups(opt, self.last_lr.len())?;
        apply(opt, &self.last_lr, None)
    }
    fn raw_num_groups(&self) -> usize {
        self.children[0].raw_num_groups()
    }
    fn raw_touches_momentum(&self) -> bool {
        self.children.iter().any(|c| c.raw_touches_momentum())
    }
    fn raw_needs_metric(&self) -> bool {
        false
    }
    fn raw_snapshot(&self) -> Snapshot {
        Snapshot(Box::new(ChainedSnapshot {
            last_lr: self.last_lr.clone(),
            children: children_snapshot(&self.children),
        }))
    }
    fn raw_restore(&mut self, snapshot: Snapshot) {
        match snapshot.into_state::<ChainedSnapshot>() {
            Some(st) => {
                self.last_lr = st.last_lr;
                children_restore(&mut self.children, st.children);
            }
            None => debug_assert!(false, "a snapshot of another scheduler"),
        }
    }
}
