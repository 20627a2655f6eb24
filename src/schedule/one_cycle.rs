//! `OneCycleLR`: the 1cycle policy.

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};

use super::builders;
use super::cyclic::no_momentum;
use super::sealed::Protocol;
use super::{
    attach, div, finite, invalid, leaf_scheduler, momentum_kind, replay, set_momentum, transaction,
    BaseState, Leaf, LeafState, PerGroup, Values,
};
use crate::error::{Error, Result};
use crate::hyper::GroupHyperparams;

fn minus_one() -> i64 {
    -1
}
fn d_pct_start() -> f64 {
    0.3
}
fn d_anneal() -> String {
    "cos".into()
}
fn d_true() -> bool {
    true
}
fn d_base_momentum() -> PerGroup {
    PerGroup::All(0.85)
}
fn d_max_momentum() -> PerGroup {
    PerGroup::All(0.95)
}
fn d_div_factor() -> f64 {
    25.0
}
fn d_final_div_factor() -> f64 {
    1e4
}

/// Options of [`OneCycleLR`], with torch's names and defaults.
///
/// Built with [`OneCycleLRConfig::new`] (or [`OneCycleLRConfig::from_epochs`]) and one
/// `with_<field>` builder step per option; the struct is `#[non_exhaustive]`, so a torch option
/// added later is not a breaking change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct OneCycleLRConfig {
    /// Peak lr, for all groups or per group (required).
    pub max_lr: PerGroup,
    /// Steps in the cycle; or give `epochs` and `steps_per_epoch`.
    #[serde(default)]
    pub total_steps: Option<i64>,
    /// Epochs, with `steps_per_epoch`, when `total_steps` is not given.
    #[serde(default)]
    pub epochs: Option<i64>,
    /// Steps per epoch, with `epochs`, when `total_steps` is not given.
    #[serde(default)]
    pub steps_per_epoch: Option<i64>,
    /// Fraction of the cycle spent increasing the lr.
    #[serde(default = "d_pct_start")]
    pub pct_start: f64,
    /// `"cos"` or `"linear"`.
    #[serde(default = "d_anneal")]
    pub anneal_strategy: String,
    /// Cycle the momentum (or `betas.0`) inversely to the lr.
    #[serde(default = "d_true")]
    pub cycle_momentum: bool,
    /// Lower momentum boundary (at the lr's peak).
    #[serde(default = "d_base_momentum")]
    pub base_momentum: PerGroup,
    /// Upper momentum boundary (at the start and end).
    #[serde(default = "d_max_momentum")]
    pub max_momentum: PerGroup,
    /// `initial_lr = max_lr / div_factor`.
    #[serde(default = "d_div_factor")]
    pub div_factor: f64,
    /// `min_lr = initial_lr / final_div_factor`.
    #[serde(default = "d_final_div_factor")]
    pub final_div_factor: f64,
    /// Three phases (up, down to `initial_lr`, down to `min_lr`) instead of fastai's two.
    #[serde(default)]
    pub three_phase: bool,
    /// -1 for a fresh schedule, or the number of steps already taken (see the
    /// [module docs](super)).
    #[serde(default = "minus_one")]
    pub last_epoch: i64,
}

builders!(OneCycleLRConfig {
    max_lr: impl Into<PerGroup>,
    total_steps: Option<i64>,
    epochs: Option<i64>,
    steps_per_epoch: Option<i64>,
    pct_start: f64,
    anneal_strategy: impl Into<String>,
    cycle_momentum: bool,
    base_momentum: impl Into<PerGroup>,
    max_momentum: impl Into<PerGroup>,
    div_factor: f64,
    final_div_factor: f64,
    three_phase: bool,
    last_epoch: i64,
});

impl OneCycleLRConfig {
    /// torch's defaults with the required `max_lr` and `total_steps`.
    pub fn new(max_lr: impl Into<PerGroup>, total_steps: i64) -> Self {
        OneCycleLRConfig {
            max_lr: max_lr.into(),
            total_steps: Some(total_steps),
            epochs: None,
            steps_per_epoch: None,
            pct_start: 0.3,
            anneal_strategy: d_anneal(),
            cycle_momentum: true,
            base_momentum: d_base_momentum(),
            max_momentum: d_max_momentum(),
            div_factor: 25.0,
            final_div_factor: 1e4,
            three_phase: false,
            last_epoch: -1,
        }
    }

    /// torch's defaults with the required `max_lr`, and the cycle's length given as `epochs`
    /// and `steps_per_epoch` instead of `total_steps` (torch's other way to give it:
    /// `OneCycleLR(opt, max_lr, epochs=e, steps_per_epoch=s)` runs `e * s` steps).
    pub fn from_epochs(max_lr: impl Into<PerGroup>, epochs: i64, steps_per_epoch: i64) -> Self {
        OneCycleLRConfig {
            total_steps: None,
            epochs: Some(epochs),
            steps_per_epoch: Some(steps_per_epoch),
            ..Self::new(max_lr, 0)
        }
    }

    /// torch's checks, in torch's order; returns `total_steps`.
    fn check(&self) -> Result<i64> {
        let total = match (self.total_steps, self.epochs, self.steps_per_epoch) {
            (Some(t), _, _) => {
                if t <= 0 {
                    return Err(invalid(format!(
                        "Expected positive integer total_steps, but got {t}"
                    )));
                }
                t
            }
            (None, Some(e), Some(s)) => {
                if e <= 0 {
                    return Err(invalid(format!(
                        "Expected positive integer epochs, but got {e}"
                    )));
                }
                if s <= 0 {
                    return Err(invalid(format!(
                        "Expected positive integer steps_per_epoch, but got {s}"
                    )));
                }
                e.checked_mul(s)
                    .ok_or_else(|| invalid("epochs * steps_per_epoch overflows"))?
            }
            _ => {
                return Err(invalid(
                    "You must define either total_steps OR (epochs AND steps_per_epoch)",
                ))
            }
        };
        // `!(0 <= p <= 1)` also rejects NaN, which torch lets through.
        if !(0.0..=1.0).contains(&self.pct_start) {
            return Err(invalid(format!(
                "Expected float between 0 and 1 pct_start, but got {:?}",
                self.pct_start
            )));
        }
        if !["cos", "linear"].contains(&self.anneal_strategy.as_str()) {
            return Err(invalid(format!(
                "anneal_strategy must be one of 'cos' or 'linear', instead got {}",
                self.anneal_strategy
            )));
        }
        finite("div_factor", self.div_factor)?;
        finite("final_div_factor", self.final_div_factor)?;
        Ok(total)
    }

    /// torch's `_schedule_phases`.
    fn phases(&self, total: i64) -> Vec<Phase> {
        let t = total as f64;
        let p = self.pct_start;
        let phase = |end_step, lr: [Key; 2], m: [Key; 2]| Phase {
            end_step,
            start_lr: lr[0],
            end_lr: lr[1],
            start_momentum: m[0],
            end_momentum: m[1],
        };
        use Key::*;
        if self.three_phase {
            vec![
                phase(p * t - 1.0, [InitialLr, MaxLr], [MaxMomentum, BaseMomentum]),
                phase(
                    2.0 * p * t - 2.0,
                    [MaxLr, InitialLr],
                    [BaseMomentum, MaxMomentum],
                ),
                phase(t - 1.0, [InitialLr, MinLr], [MaxMomentum, MaxMomentum]),
            ]
        } else {
            vec![
                phase(p * t - 1.0, [InitialLr, MaxLr], [MaxMomentum, BaseMomentum]),
                phase(t - 1.0, [MaxLr, MinLr], [BaseMomentum, MaxMomentum]),
            ]
        }
    }
}

/// The per-group values a phase runs between (torch's group keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Key {
    #[serde(rename = "initial_lr")]
    InitialLr,
    #[serde(rename = "max_lr")]
    MaxLr,
    #[serde(rename = "min_lr")]
    MinLr,
    #[serde(rename = "max_momentum")]
    MaxMomentum,
    #[serde(rename = "base_momentum")]
    BaseMomentum,
}

/// One of torch's `_schedule_phases`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Phase {
    end_step: f64,
    start_lr: Key,
    end_lr: Key,
    start_momentum: Key,
    end_momentum: Key,
}

/// One group's values, kept by torch in the optimizer's param group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct GroupValues {
    initial_lr: f64,
    max_lr: f64,
    min_lr: f64,
    #[serde(default)]
    max_momentum: f64,
    #[serde(default)]
    base_momentum: f64,
}

impl GroupValues {
    fn get(&self, k: Key) -> f64 {
        match k {
            Key::InitialLr => self.initial_lr,
            Key::MaxLr => self.max_lr,
            Key::MinLr => self.min_lr,
            Key::MaxMomentum => self.max_momentum,
            Key::BaseMomentum => self.base_momentum,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct OneCycleState {
    config: OneCycleLRConfig,
    #[serde(flatten)]
    base: BaseState,
    total_steps: i64,
    #[serde(rename = "_schedule_phases")]
    phases: Vec<Phase>,
    /// torch's per-group `initial_lr`, `max_lr`, `min_lr`, `max_momentum`, `base_momentum`.
    groups: Vec<GroupValues>,
    use_beta1: bool,
    /// The momentum (or `betas.0`) values set last, restored by `load_state_dict`.
    #[serde(rename = "_last_momentum")]
    last_momentum: Vec<f64>,
}

impl LeafState for OneCycleState {
    fn base(&self) -> &BaseState {
        &self.base
    }
    fn base_mut(&mut self) -> &mut BaseState {
        &mut self.base
    }
    fn validate(&self) -> Result<()> {
        let total = self.config.check()?;
        if total != self.total_steps || self.phases.is_empty() {
            return Err(invalid(
                "total_steps and the phases do not match the options",
            ));
        }
        let n = self.base.base_lrs.len();
        if self.groups.len() != n || (self.config.cycle_momentum && self.last_momentum.len() != n) {
            return Err(invalid("per-group lists of different lengths"));
        }
        Ok(())
    }
    fn last_momentum(&self) -> Option<(&[f64], bool)> {
        self.config
            .cycle_momentum
            .then_some((self.last_momentum.as_slice(), self.use_beta1))
    }
}

/// torch's `OneCycleLR`: the 1cycle policy, stepped after every batch. The lr rises from
/// `initial_lr = max_lr / div_factor` to `max_lr` over `pct_start` of the cycle, then falls to
/// `min_lr = initial_lr / final_div_factor` (with `three_phase`, first back to `initial_lr`);
/// the momentum (or `betas.0`) moves inversely between `max_momentum` and `base_momentum`.
///
/// ```text
/// phase i covering steps (start_i, end_i]:  pct = (t − start_i) / (end_i − start_i)
/// cos:     v = end + (start − end) / 2 · (cos(π · pct) + 1)
/// linear:  v = (end − start) · pct + start
/// ```
///
/// Stepping past `total_steps` is an error ("Tried to step ..."), and leaves everything as
/// it was. The last allowed step (step number `total_steps`, one past the cycle's end)
/// extrapolates the last phase, as in torch; where the `"linear"` anneal would extrapolate
/// below zero, torch sets that negative lr and optarena sets the phase's end value `min_lr`
/// (optarena's optimizers refuse a negative lr, and a training loop stepping the scheduler
/// after its last batch must not fail). Smith & Topin, "Super-Convergence: Very Fast Training of Neural Networks Using
/// Large Learning Rates" (2017).
#[derive(Debug)]
pub struct OneCycleLR {
    state: OneCycleState,
}

impl OneCycleLR {
    /// torch's `OneCycleLR(optimizer, max_lr, total_steps=None, epochs=None, ...)`.
    pub fn new(opt: &mut dyn GroupHyperparams, config: OneCycleLRConfig) -> Result<Self> {
        super::check_last_epoch(config.last_epoch)?;
        let total = config.check()?;
        if config.last_epoch > total {
            return Err(Error::Scheduler(format!(
                "Tried to step {} times. The specified number of total steps is {total}",
                config.last_epoch
            )));
        }
        transaction(opt, move |opt| {
            let n = opt.num_groups();
            let phases = config.phases(total);
            let max_lrs = config.max_lr.format("max_lr", n)?;
            let mut groups = Vec::with_capacity(n);
            for (g, &max_lr) in max_lrs.iter().enumerate() {
                let initial_lr = div(max_lr, config.div_factor)?;
                let min_lr = div(initial_lr, config.final_div_factor)?;
                // torch overwrites group["initial_lr"] (no setdefault here).
                opt.set_group_initial_lr(g, Some(initial_lr))?;
                groups.push(GroupValues {
                    initial_lr,
                    max_lr,
                    min_lr,
                    max_momentum: 0.0,
                    base_momentum: 0.0,
                });
            }
            let mut use_beta1 = false;
            let mut last_momentum = Vec::new();
            if config.cycle_momentum {
                use_beta1 = momentum_kind(opt).ok_or_else(no_momentum)?;
                let max_m = config.max_momentum.format("max_momentum", n)?;
                let base_m = config.base_momentum.format("base_momentum", n)?;
                for (g, gv) in groups.iter_mut().enumerate() {
                    set_momentum(opt, g, max_m[g], use_beta1)?;
                    gv.max_momentum = max_m[g];
                    gv.base_momentum = base_m[g];
                }
                last_momentum = max_m;
            }
            let base = attach(opt, -1)?;
            let last_epoch = config.last_epoch;
            let mut s = OneCycleLR {
                state: OneCycleState {
                    config,
                    base: BaseState::new(base),
                    total_steps: total,
                    phases,
                    groups,
                    use_beta1,
                    last_momentum,
                },
            };
            s.raw_initial_step(opt)?;
            replay(&mut s, opt, last_epoch)?;
            Ok(s)
        })
    }

    /// The options.
    pub fn config(&self) -> &OneCycleLRConfig {
        &self.state.config
    }

    /// The number of steps in the cycle.
    pub fn total_steps(&self) -> i64 {
        self.state.total_steps
    }

    fn anneal(&self, start: f64, end: f64, pct: f64) -> f64 {
        if self.state.config.anneal_strategy == "linear" {
            (end - start) * pct + start
        } else {
            let cos_out = (PI * pct).cos() + 1.0;
            end + (start - end) / 2.0 * cos_out
        }
    }
}

impl Leaf for OneCycleLR {
    fn closed_form(&self) -> Option<Result<Vec<f64>>> {
        // torch's class has no `_get_closed_form_lr`: `step(epoch)` uses `get_lr`.
        None
    }
    fn check_loaded(&self, _state: &Self::State) -> Result<()> {
        // Everything it runs on is in the state.
        Ok(())
    }
    const NAME: &'static str = "OneCycleLR";
    const LATE_GROUP_TORCH: &'static str = "KeyError: 'initial_lr'";
    type State = OneCycleState;
    fn state(&self) -> &OneCycleState {
        &self.state
    }
    fn state_mut(&mut self) -> &mut OneCycleState {
        &mut self.state
    }
    fn get_lr(&mut self, opt: &dyn GroupHyperparams, _initial: bool) -> Result<Values> {
        super::check_follows(opt, self.state.base.base_lrs.len())?;
        let s = &self.state;
        let step_num = s.base.last_epoch;
        if step_num > s.total_steps {
            return Err(Error::Scheduler(format!(
                "Tried to step {step_num} times. The specified number of total steps is {}",
                s.total_steps
            )));
        }
        let t = step_num as f64;
        let last = s.phases.len() - 1;
        let mut lrs = Vec::with_capacity(s.groups.len());
        let mut momentum = Vec::with_capacity(s.groups.len());
        for gv in &s.groups {
            let mut start_step = 0.0;
            for (i, phase) in s.phases.iter().enumerate() {
                let end_step = phase.end_step;
                if t <= end_step || i == last {
                    let pct = div(t - start_step, end_step - start_step)?;
                    let mut lr = self.anneal(gv.get(phase.start_lr), gv.get(phase.end_lr), pct);
                    if lr < 0.0 && step_num == s.total_steps {
                        // One past the end, the linear anneal extrapolates below zero; torch
                        // sets that negative lr, optarena the phase's end value (module docs).
                        lr = gv.get(phase.end_lr);
                    }
                    lrs.push(lr);
                    if s.config.cycle_momentum {
                        momentum.push(self.anneal(
                            gv.get(phase.start_momentum),
                            gv.get(phase.end_momentum),
                            pct,
                        ));
                    }
                    break;
                }
                start_step = phase.end_step;
            }
        }
        let momentum = s.config.cycle_momentum.then_some(momentum);
        if let Some(m) = &momentum {
            self.state.last_momentum.clone_from(m);
        }
        Ok(Values { lrs, momentum })
    }
}

leaf_scheduler!(OneCycleLR);
