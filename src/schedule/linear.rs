//! `ConstantLR` and `LinearLR`: a warm-up factor held, or moved linearly, for `total_iters`
//! epochs.

use serde::{Deserialize, Serialize};

use super::builders;
use super::{construct, div, group_lrs, invalid, leaf_scheduler, BaseState, Leaf, Values};
use crate::error::Result;
use crate::hyper::GroupHyperparams;

fn minus_one() -> i64 {
    -1
}
fn one_third() -> f64 {
    1.0 / 3.0
}
fn one() -> f64 {
    1.0
}
fn five() -> i64 {
    5
}

/// Options of [`ConstantLR`], with torch's names and defaults.
///
/// Built with [`ConstantLRConfig::new`] and one `with_<field>` builder step per option; the struct
/// is `#[non_exhaustive]`, so a torch option added later is not a breaking change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ConstantLRConfig {
    /// The factor the lr is multiplied by until `total_iters` (in `[0, 1]`).
    #[serde(default = "one_third")]
    pub factor: f64,
    /// Number of epochs the factor applies.
    #[serde(default = "five")]
    pub total_iters: i64,
    /// -1 for a fresh schedule, or the number of steps already taken (see the
    /// [module docs](super)).
    #[serde(default = "minus_one")]
    pub last_epoch: i64,
}

builders!(ConstantLRConfig {
    factor: f64,
    total_iters: i64,
    last_epoch: i64,
});

impl Default for ConstantLRConfig {
    fn default() -> Self {
        ConstantLRConfig {
            factor: 1.0 / 3.0,
            total_iters: 5,
            last_epoch: -1,
        }
    }
}

impl ConstantLRConfig {
    /// torch's defaults (the same as `Default::default()`): every option has one.
    pub fn new() -> Self {
        Self::default()
    }
}

impl ConstantLRConfig {
    fn check(&self) -> Result<()> {
        // `!(0 <= f <= 1)` also rejects NaN, which torch's `f > 1 or f < 0` lets through.
        if !(0.0..=1.0).contains(&self.factor) {
            return Err(invalid(
                "Constant multiplicative factor expected to be between 0 and 1.",
            ));
        }
        Ok(())
    }
}

options_state!(ConstantState, ConstantLRConfig);

/// torch's `ConstantLR`: the lr is multiplied by `factor` until epoch `total_iters`, then
/// restored.
///
/// ```text
/// epoch 0:            lr ← lr · factor
/// epoch total_iters:  lr ← lr · (1 / factor)
/// closed form:        lr = base_lr · (factor + [epoch ≥ total_iters] · (1 − factor))
/// ```
#[derive(Debug)]
pub struct ConstantLR {
    state: ConstantState,
}

impl ConstantLR {
    /// torch's `ConstantLR(optimizer, factor=1/3, total_iters=5, last_epoch=-1)`.
    pub fn new(opt: &mut dyn GroupHyperparams, config: ConstantLRConfig) -> Result<Self> {
        config.check()?;
        let last_epoch = config.last_epoch;
        construct(opt, last_epoch, |base| {
            Ok(ConstantLR {
                state: ConstantState {
                    config,
                    base: BaseState::new(base),
                },
            })
        })
    }

    /// The options.
    pub fn config(&self) -> &ConstantLRConfig {
        &self.state.config
    }
}

impl Leaf for ConstantLR {
    fn check_loaded(&self, _state: &Self::State) -> Result<()> {
        // Everything it runs on is in the state.
        Ok(())
    }
    const NAME: &'static str = "ConstantLR";
    type State = ConstantState;
    fn state(&self) -> &ConstantState {
        &self.state
    }
    fn state_mut(&mut self) -> &mut ConstantState {
        &mut self.state
    }
    fn get_lr(&mut self, opt: &dyn GroupHyperparams, _initial: bool) -> Result<Values> {
        super::check_follows(opt, self.state.base.base_lrs.len())?;
        let c = &self.state.config;
        let e = self.state.base.last_epoch;
        let lrs = group_lrs(opt)?;
        if e == 0 {
            return Ok(Values::lrs(lrs.iter().map(|lr| lr * c.factor).collect()));
        }
        if e != c.total_iters {
            return Ok(Values::lrs(lrs));
        }
        let f = div(1.0, c.factor)?;
        Ok(Values::lrs(lrs.iter().map(|lr| lr * f).collect()))
    }
    fn closed_form(&self) -> Option<Result<Vec<f64>>> {
        let c = &self.state.config;
        let b = &self.state.base;
        let on = if b.last_epoch >= c.total_iters {
            1.0 - c.factor
        } else {
            0.0
        };
        Some(Ok(b
            .base_lrs
            .iter()
            .map(|base| base * (c.factor + on))
            .collect()))
    }
}

leaf_scheduler!(ConstantLR);

/// Options of [`LinearLR`], with torch's names and defaults.
///
/// Built with [`LinearLRConfig::new`] and one `with_<field>` builder step per option; the struct is
/// `#[non_exhaustive]`, so a torch option added later is not a breaking change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct LinearLRConfig {
    /// The factor at epoch 0 (in `(0, 1]`).
    #[serde(default = "one_third")]
    pub start_factor: f64,
    /// The factor from epoch `total_iters` on (in `[0, 1]`).
    #[serde(default = "one")]
    pub end_factor: f64,
    /// Number of epochs over which the factor moves.
    #[serde(default = "five")]
    pub total_iters: i64,
    /// -1 for a fresh schedule, or the number of steps already taken (see the
    /// [module docs](super)).
    #[serde(default = "minus_one")]
    pub last_epoch: i64,
}

builders!(LinearLRConfig {
    start_factor: f64,
    end_factor: f64,
    total_iters: i64,
    last_epoch: i64,
});

impl Default for LinearLRConfig {
    fn default() -> Self {
        LinearLRConfig {
            start_factor: 1.0 / 3.0,
            end_factor: 1.0,
            total_iters: 5,
            last_epoch: -1,
        }
    }
}

impl LinearLRConfig {
    /// torch's defaults (the same as `Default::default()`): every option has one.
    pub fn new() -> Self {
        Self::default()
    }
}

impl LinearLRConfig {
    fn check(&self) -> Result<()> {
        if !(self.start_factor > 0.0 && self.start_factor <= 1.0) {
            return Err(invalid(
                "Starting multiplicative factor expected to be greater than 0 and less or equal \
                 to 1.",
            ));
        }
        if !(0.0..=1.0).contains(&self.end_factor) {
            return Err(invalid(
                "Ending multiplicative factor expected to be between 0 and 1.",
            ));
        }
        Ok(())
    }
}

options_state!(LinearState, LinearLRConfig);

/// torch's `LinearLR`: the lr's factor moves linearly from `start_factor` to `end_factor`
/// over `total_iters` epochs.
///
/// ```text
/// epoch 0:                  lr ← lr · s
/// 0 < epoch ≤ total_iters:  lr ← lr · (1 + (e − s) / (total_iters · s + (epoch − 1) · (e − s)))
/// closed form:              lr = base_lr · (s + (e − s) · min(total_iters, epoch) / total_iters)
/// ```
#[derive(Debug)]
pub struct LinearLR {
    state: LinearState,
}

impl LinearLR {
    /// torch's `LinearLR(optimizer, start_factor=1/3, end_factor=1.0, total_iters=5,
    /// last_epoch=-1)`.
    pub fn new(opt: &mut dyn GroupHyperparams, config: LinearLRConfig) -> Result<Self> {
        config.check()?;
        let last_epoch = config.last_epoch;
        construct(opt, last_epoch, |base| {
            Ok(LinearLR {
                state: LinearState {
                    config,
                    base: BaseState::new(base),
                },
            })
        })
    }

    /// The options.
    pub fn config(&self) -> &LinearLRConfig {
        &self.state.config
    }
}

impl Leaf for LinearLR {
    fn check_loaded(&self, _state: &Self::State) -> Result<()> {
        // Everything it runs on is in the state.
        Ok(())
    }
    const NAME: &'static str = "LinearLR";
    type State = LinearState;
    fn state(&self) -> &LinearState {
        &self.state
    }
    fn state_mut(&mut self) -> &mut LinearState {
        &mut self.state
    }
    fn get_lr(&mut self, opt: &dyn GroupHyperparams, initial: bool) -> Result<Values> {
        super::check_follows(opt, self.state.base.base_lrs.len())?;
        let c = &self.state.config;
        let e = self.state.base.last_epoch;
        let lrs = group_lrs(opt)?;
        if e == 0 {
            return Ok(Values::lrs(
                lrs.iter().map(|lr| lr * c.start_factor).collect(),
            ));
        }
        if initial || e > c.total_iters {
            return Ok(Values::lrs(lrs));
        }
        let d = c.end_factor - c.start_factor;
        let f = 1.0
            + div(
                d,
                c.total_iters as f64 * c.start_factor + (e - 1) as f64 * d,
            )?;
        Ok(Values::lrs(lrs.iter().map(|lr| lr * f).collect()))
    }
    fn closed_form(&self) -> Option<Result<Vec<f64>>> {
        let c = &self.state.config;
        let b = &self.state.base;
        let m = c.total_iters.min(b.last_epoch) as f64;
        Some(
            div((c.end_factor - c.start_factor) * m, c.total_iters as f64).map(|t| {
                b.base_lrs
                    .iter()
                    .map(|base| base * (c.start_factor + t))
                    .collect()
            }),
        )
    }
}

leaf_scheduler!(LinearLR);
