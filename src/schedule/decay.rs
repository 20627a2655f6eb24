//! `ExponentialLR` and `PolynomialLR`: smooth decays of the lr.

use serde::{Deserialize, Serialize};

use super::builders;
use super::{construct, div, finite, group_lrs, leaf_scheduler, py_pow, BaseState, Leaf, Values};
use crate::error::Result;
use crate::hyper::GroupHyperparams;

fn minus_one() -> i64 {
    -1
}
fn five() -> i64 {
    5
}
fn one() -> f64 {
    1.0
}

/// Options of [`ExponentialLR`], with torch's names.
///
/// Built with [`ExponentialLRConfig::new`] and one `with_<field>` builder step per option; the
/// struct is `#[non_exhaustive]`, so a torch option added later is not a breaking change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ExponentialLRConfig {
    /// Multiplicative factor of the decay, every epoch (required).
    pub gamma: f64,
    /// -1 for a fresh schedule, or the number of steps already taken (see the
    /// [module docs](super)).
    #[serde(default = "minus_one")]
    pub last_epoch: i64,
}

builders!(ExponentialLRConfig {
    gamma: f64,
    last_epoch: i64,
});

impl ExponentialLRConfig {
    /// torch's defaults with the required `gamma`.
    pub fn new(gamma: f64) -> Self {
        ExponentialLRConfig {
            gamma,
            last_epoch: -1,
        }
    }

    fn check(&self) -> Result<()> {
        finite("gamma", self.gamma)
    }
}

options_state!(ExponentialState, ExponentialLRConfig);

/// torch's `ExponentialLR`: every epoch the lr is multiplied by `gamma`.
///
/// ```text
/// lr ← lr · γ                   (each step after the initial one)
/// lr = base_lr · γ^epoch        (closed form)
/// ```
#[derive(Debug)]
pub struct ExponentialLR {
    state: ExponentialState,
}

impl ExponentialLR {
    /// torch's `ExponentialLR(optimizer, gamma, last_epoch=-1)`.
    pub fn new(opt: &mut dyn GroupHyperparams, config: ExponentialLRConfig) -> Result<Self> {
        config.check()?;
        let last_epoch = config.last_epoch;
        construct(opt, last_epoch, |base| {
            Ok(ExponentialLR {
                state: ExponentialState {
                    config,
                    base: BaseState::new(base),
                },
            })
        })
    }

    /// The options.
    pub fn config(&self) -> &ExponentialLRConfig {
        &self.state.config
    }
}

impl Leaf for ExponentialLR {
    fn check_loaded(&self, _state: &Self::State) -> Result<()> {
        // Everything it runs on is in the state.
        Ok(())
    }
    const NAME: &'static str = "ExponentialLR";
    type State = ExponentialState;
    fn state(&self) -> &ExponentialState {
        &self.state
    }
    fn state_mut(&mut self) -> &mut ExponentialState {
        &mut self.state
    }
    fn get_lr(&mut self, opt: &dyn GroupHyperparams, initial: bool) -> Result<Values> {
        super::check_follows(opt, self.state.base.base_lrs.len())?;
        let lrs = group_lrs(opt)?;
        if initial {
            return Ok(Values::lrs(lrs));
        }
        let g = self.state.config.gamma;
        Ok(Values::lrs(lrs.iter().map(|lr| lr * g).collect()))
    }
    fn closed_form(&self) -> Option<Result<Vec<f64>>> {
        let b = &self.state.base;
        Some(
            py_pow(self.state.config.gamma, b.last_epoch as f64)
                .map(|f| b.base_lrs.iter().map(|base| base * f).collect()),
        )
    }
}

leaf_scheduler!(ExponentialLR);

/// Options of [`PolynomialLR`], with torch's names and defaults.
///
/// Built with [`PolynomialLRConfig::new`] and one `with_<field>` builder step per option; the
/// struct is `#[non_exhaustive]`, so a torch option added later is not a breaking change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct PolynomialLRConfig {
    /// Number of epochs over which the lr decays to 0.
    #[serde(default = "five")]
    pub total_iters: i64,
    /// The power of the polynomial.
    #[serde(default = "one")]
    pub power: f64,
    /// -1 for a fresh schedule, or the number of steps already taken (see the
    /// [module docs](super)).
    #[serde(default = "minus_one")]
    pub last_epoch: i64,
}

builders!(PolynomialLRConfig {
    total_iters: i64,
    power: f64,
    last_epoch: i64,
});

impl Default for PolynomialLRConfig {
    fn default() -> Self {
        PolynomialLRConfig {
            total_iters: 5,
            power: 1.0,
            last_epoch: -1,
        }
    }
}

impl PolynomialLRConfig {
    /// torch's defaults (the same as `Default::default()`): every option has one.
    pub fn new() -> Self {
        Self::default()
    }
}

impl PolynomialLRConfig {
    fn check(&self) -> Result<()> {
        finite("power", self.power)
    }
}

options_state!(PolynomialState, PolynomialLRConfig);

/// torch's `PolynomialLR`: the lr decays to 0 over `total_iters` epochs as a polynomial.
///
/// ```text
/// 0 < epoch ≤ T:  lr ← lr · ((1 − epoch/T) / (1 − (epoch − 1)/T))^power
/// closed form:    lr = base_lr · (1 − min(T, epoch)/T)^power
/// ```
#[derive(Debug)]
pub struct PolynomialLR {
    state: PolynomialState,
}

impl PolynomialLR {
    /// torch's `PolynomialLR(optimizer, total_iters=5, power=1.0, last_epoch=-1)`.
    pub fn new(opt: &mut dyn GroupHyperparams, config: PolynomialLRConfig) -> Result<Self> {
        config.check()?;
        let last_epoch = config.last_epoch;
        construct(opt, last_epoch, |base| {
            Ok(PolynomialLR {
                state: PolynomialState {
                    config,
                    base: BaseState::new(base),
                },
            })
        })
    }

    /// The options.
    pub fn config(&self) -> &PolynomialLRConfig {
        &self.state.config
    }
}

impl Leaf for PolynomialLR {
    fn check_loaded(&self, _state: &Self::State) -> Result<()> {
        // Everything it runs on is in the state.
        Ok(())
    }
    const NAME: &'static str = "PolynomialLR";
    type State = PolynomialState;
    fn state(&self) -> &PolynomialState {
        &self.state
    }
    fn state_mut(&mut self) -> &mut PolynomialState {
        &mut self.state
    }
    fn get_lr(&mut self, opt: &dyn GroupHyperparams, initial: bool) -> Result<Values> {
        super::check_follows(opt, self.state.base.base_lrs.len())?;
        let c = &self.state.config;
        let e = self.state.base.last_epoch;
        let lrs = group_lrs(opt)?;
        if initial || e > c.total_iters {
            return Ok(Values::lrs(lrs));
        }
        let t = c.total_iters as f64;
        let num = 1.0 - div(e as f64, t)?;
        let den = 1.0 - div((e - 1) as f64, t)?;
        let f = py_pow(div(num, den)?, c.power)?;
        Ok(Values::lrs(lrs.iter().map(|lr| lr * f).collect()))
    }
    fn closed_form(&self) -> Option<Result<Vec<f64>>> {
        let c = &self.state.config;
        let b = &self.state.base;
        Some((|| {
            let m = c.total_iters.min(b.last_epoch) as f64;
            let f = py_pow(1.0 - div(m, c.total_iters as f64)?, c.power)?;
            Ok(b.base_lrs.iter().map(|base| base * f).collect())
        })())
    }
}

leaf_scheduler!(PolynomialLR);
