//! `StepLR` and `MultiStepLR`: the lr decayed by `gamma` every `step_size` epochs or at
//! milestones.

use serde::{Deserialize, Serialize};

use super::builders;
use super::{
    bisect_right, construct, finite, group_lrs, invalid, leaf_scheduler, py_floordiv, py_mod,
    py_pow, BaseState, Leaf, Values,
};
use crate::error::Result;
use crate::hyper::GroupHyperparams;

fn minus_one() -> i64 {
    -1
}

fn gamma_default() -> f64 {
    0.1
}

/// Options of [`StepLR`], with torch's names and defaults.
///
/// Built with [`StepLRConfig::new`] and one `with_<field>` builder step per option; the struct is
/// `#[non_exhaustive]`, so a torch option added later is not a breaking change.
///
/// ```
/// use optarena::schedule::StepLRConfig;
///
/// // torch: StepLR(optimizer, step_size=30, gamma=0.5)
/// let config = StepLRConfig::new(30).with_gamma(0.5);
/// assert_eq!((config.step_size, config.gamma, config.last_epoch), (30, 0.5, -1));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct StepLRConfig {
    /// Period of the decay, in epochs (required; must be positive).
    pub step_size: i64,
    /// Multiplicative factor of the decay.
    #[serde(default = "gamma_default")]
    pub gamma: f64,
    /// -1 for a fresh schedule, or the number of steps already taken (see the
    /// [module docs](super)).
    #[serde(default = "minus_one")]
    pub last_epoch: i64,
}

builders!(StepLRConfig {
    step_size: i64,
    gamma: f64,
    last_epoch: i64,
});

impl StepLRConfig {
    /// torch's defaults with the required `step_size`.
    pub fn new(step_size: i64) -> Self {
        StepLRConfig {
            step_size,
            gamma: 0.1,
            last_epoch: -1,
        }
    }

    fn check(&self) -> Result<()> {
        if self.step_size <= 0 {
            // torch accepts it and fails with ZeroDivisionError (0) or decays oddly (< 0).
            return Err(invalid(format!(
                "step_size must be a positive integer, but got {}",
                self.step_size
            )));
        }
        finite("gamma", self.gamma)
    }
}

options_state!(StepState, StepLRConfig);

/// torch's `StepLR`: every `step_size` epochs the lr is multiplied by `gamma`.
///
/// ```text
/// lr ← lr · γ      when epoch > 0 and epoch mod step_size = 0      (chainable form)
/// lr = base_lr · γ^⌊epoch / step_size⌋                             (closed form)
/// ```
#[derive(Debug)]
pub struct StepLR {
    state: StepState,
}

impl StepLR {
    /// torch's `StepLR(optimizer, step_size, gamma=0.1, last_epoch=-1)`.
    pub fn new(opt: &mut dyn GroupHyperparams, config: StepLRConfig) -> Result<Self> {
        config.check()?;
        let last_epoch = config.last_epoch;
        construct(opt, last_epoch, |base| {
            Ok(StepLR {
                state: StepState {
                    config,
                    base: BaseState::new(base),
                },
            })
        })
    }

    /// The options.
    pub fn config(&self) -> &StepLRConfig {
        &self.state.config
    }
}

impl Leaf for StepLR {
    fn check_loaded(&self, _state: &Self::State) -> Result<()> {
        // Everything it runs on is in the state.
        Ok(())
    }
    const NAME: &'static str = "StepLR";
    type State = StepState;
    fn state(&self) -> &StepState {
        &self.state
    }
    fn state_mut(&mut self) -> &mut StepState {
        &mut self.state
    }
    fn get_lr(&mut self, opt: &dyn GroupHyperparams, _initial: bool) -> Result<Values> {
        super::check_follows(opt, self.state.base.base_lrs.len())?;
        let c = &self.state.config;
        let e = self.state.base.last_epoch;
        let lrs = group_lrs(opt)?;
        if e == 0 || py_mod(e, c.step_size)? != 0 {
            return Ok(Values::lrs(lrs));
        }
        Ok(Values::lrs(lrs.iter().map(|lr| lr * c.gamma).collect()))
    }
    fn closed_form(&self) -> Option<Result<Vec<f64>>> {
        let c = &self.state.config;
        let b = &self.state.base;
        Some((|| {
            let k = py_floordiv(b.last_epoch, c.step_size)?;
            let f = py_pow(c.gamma, k as f64)?;
            Ok(b.base_lrs.iter().map(|base| base * f).collect())
        })())
    }
}

leaf_scheduler!(StepLR);

/// Options of [`MultiStepLR`], with torch's names and defaults.
///
/// Built with [`MultiStepLRConfig::new`] and one `with_<field>` builder step per option; the struct
/// is `#[non_exhaustive]`, so a torch option added later is not a breaking change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct MultiStepLRConfig {
    /// Epochs at which the lr is decayed (required). A milestone listed `n` times decays by
    /// `gamma^n` (torch keeps a `Counter`).
    pub milestones: Vec<i64>,
    /// Multiplicative factor of the decay.
    #[serde(default = "gamma_default")]
    pub gamma: f64,
    /// -1 for a fresh schedule, or the number of steps already taken (see the
    /// [module docs](super)).
    #[serde(default = "minus_one")]
    pub last_epoch: i64,
}

builders!(MultiStepLRConfig {
    milestones: Vec<i64>,
    gamma: f64,
    last_epoch: i64,
});

impl MultiStepLRConfig {
    /// torch's defaults with the required `milestones`.
    pub fn new(milestones: Vec<i64>) -> Self {
        MultiStepLRConfig {
            milestones,
            gamma: 0.1,
            last_epoch: -1,
        }
    }

    fn check(&self) -> Result<()> {
        finite("gamma", self.gamma)
    }
}

options_state!(MultiStepState, MultiStepLRConfig);

/// torch's `MultiStepLR`: the lr is multiplied by `gamma` at each milestone.
///
/// ```text
/// lr ← lr · γ^count(epoch)      when epoch is a milestone (listed count times)
/// lr = base_lr · γ^bisect_right(sorted milestones, epoch)      (closed form)
/// ```
#[derive(Debug)]
pub struct MultiStepLR {
    state: MultiStepState,
}

impl MultiStepLR {
    /// torch's `MultiStepLR(optimizer, milestones, gamma=0.1, last_epoch=-1)`.
    pub fn new(opt: &mut dyn GroupHyperparams, config: MultiStepLRConfig) -> Result<Self> {
        config.check()?;
        let last_epoch = config.last_epoch;
        construct(opt, last_epoch, |base| {
            Ok(MultiStepLR {
                state: MultiStepState {
                    config,
                    base: BaseState::new(base),
                },
            })
        })
    }

    /// The options.
    pub fn config(&self) -> &MultiStepLRConfig {
        &self.state.config
    }
}

impl Leaf for MultiStepLR {
    fn check_loaded(&self, _state: &Self::State) -> Result<()> {
        // Everything it runs on is in the state.
        Ok(())
    }
    const NAME: &'static str = "MultiStepLR";
    type State = MultiStepState;
    fn state(&self) -> &MultiStepState {
        &self.state
    }
    fn state_mut(&mut self) -> &mut MultiStepState {
        &mut self.state
    }
    fn get_lr(&mut self, opt: &dyn GroupHyperparams, _initial: bool) -> Result<Values> {
        super::check_follows(opt, self.state.base.base_lrs.len())?;
        let c = &self.state.config;
        let e = self.state.base.last_epoch;
        let lrs = group_lrs(opt)?;
        let count = c.milestones.iter().filter(|&&m| m == e).count();
        if count == 0 {
            return Ok(Values::lrs(lrs));
        }
        let f = py_pow(c.gamma, count as f64)?;
        Ok(Values::lrs(lrs.iter().map(|lr| lr * f).collect()))
    }
    fn closed_form(&self) -> Option<Result<Vec<f64>>> {
        let c = &self.state.config;
        let b = &self.state.base;
        let mut sorted = c.milestones.clone();
        sorted.sort_unstable();
        let k = bisect_right(&sorted, b.last_epoch);
        Some(py_pow(c.gamma, k as f64).map(|f| b.base_lrs.iter().map(|base| base * f).collect()))
    }
}

leaf_scheduler!(MultiStepLR);
