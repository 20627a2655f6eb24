//! `CosineAnnealingLR` and `CosineAnnealingWarmRestarts` (SGDR).

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};

use super::builders;
use super::{
    apply, construct, div, finite, group_lrs, invalid, leaf_scheduler, BaseState, Leaf, LeafState,
    Values,
};
use crate::error::{Error, Result};
use crate::hyper::GroupHyperparams;

fn minus_one() -> i64 {
    -1
}
fn one() -> i64 {
    1
}

/// Options of [`CosineAnnealingLR`], with torch's names and defaults.
///
/// Built with [`CosineAnnealingLRConfig::new`] and one `with_<field>` builder step per option; the
/// struct is `#[non_exhaustive]`, so a torch option added later is not a breaking change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CosineAnnealingLRConfig {
    /// Half period of the cosine, in epochs (required; must be positive).
    #[serde(rename = "T_max")]
    pub t_max: i64,
    /// The lr at the bottom of the cosine.
    #[serde(default)]
    pub eta_min: f64,
    /// -1 for a fresh schedule, or the number of steps already taken (see the
    /// [module docs](super)).
    #[serde(default = "minus_one")]
    pub last_epoch: i64,
}

builders!(CosineAnnealingLRConfig {
    t_max: i64,
    eta_min: f64,
    last_epoch: i64,
});

impl CosineAnnealingLRConfig {
    /// torch's defaults with the required `T_max`.
    pub fn new(t_max: i64) -> Self {
        CosineAnnealingLRConfig {
            t_max,
            eta_min: 0.0,
            last_epoch: -1,
        }
    }

    fn check(&self) -> Result<()> {
        if self.t_max <= 0 {
            // torch accepts it and fails with ZeroDivisionError at the first step (0).
            return Err(invalid(format!(
                "T_max must be a positive integer, but got {}",
                self.t_max
            )));
        }
        finite("eta_min", self.eta_min)
    }
}

options_state!(CosineState, CosineAnnealingLRConfig);

/// torch's `CosineAnnealingLR`, in torch's recursive (chainable) form, so the numbers are
/// torch's: the lr follows half a cosine from `base_lr` down to `eta_min` over `T_max`
/// epochs, then back up (no restart).
///
/// ```text
/// (epoch − 1 − T) mod 2T = 0:  lr ← lr + (base_lr − η_min) · (1 − cos(π/T)) / 2
/// otherwise:                   lr ← (1 + cos(π·epoch/T)) / (1 + cos(π·(epoch − 1)/T))
///                                    · (lr − η_min) + η_min
/// closed form:                 lr = η_min + (base_lr − η_min) · (1 + cos(π·epoch/T)) / 2
/// ```
///
/// Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts" (ICLR 2017).
#[derive(Debug)]
pub struct CosineAnnealingLR {
    state: CosineState,
}

impl CosineAnnealingLR {
    /// torch's `CosineAnnealingLR(optimizer, T_max, eta_min=0.0, last_epoch=-1)`.
    pub fn new(opt: &mut dyn GroupHyperparams, config: CosineAnnealingLRConfig) -> Result<Self> {
        config.check()?;
        let last_epoch = config.last_epoch;
        construct(opt, last_epoch, |base| {
            Ok(CosineAnnealingLR {
                state: CosineState {
                    config,
                    base: BaseState::new(base),
                },
            })
        })
    }

    /// The options.
    pub fn config(&self) -> &CosineAnnealingLRConfig {
        &self.state.config
    }
}

impl Leaf for CosineAnnealingLR {
    fn check_loaded(&self, _state: &Self::State) -> Result<()> {
        // Everything it runs on is in the state.
        Ok(())
    }
    const NAME: &'static str = "CosineAnnealingLR";
    type State = CosineState;
    fn state(&self) -> &CosineState {
        &self.state
    }
    fn state_mut(&mut self) -> &mut CosineState {
        &mut self.state
    }
    fn get_lr(&mut self, opt: &dyn GroupHyperparams, initial: bool) -> Result<Values> {
        super::check_follows(opt, self.state.base.base_lrs.len())?;
        let c = &self.state.config;
        let b = &self.state.base;
        let (e, t, eta) = (b.last_epoch, c.t_max, c.eta_min);
        let lrs = group_lrs(opt)?;
        if initial {
            return Ok(Values::lrs(lrs));
        }
        let tf = t as f64;
        let restart = super::py_mod(e - 1 - t, 2 * t)? == 0;
        if (b.step_count == 1 && e > 0) || restart {
            // torch zips base_lrs with param_groups (strict) in these two branches only.
            if lrs.len() > b.base_lrs.len() {
                return Err(super::late_group_error(
                    Self::NAME,
                    b.base_lrs.len(),
                    lrs.len(),
                    super::ZIP_LONGER,
                ));
            }
        }
        if b.step_count == 1 && e > 0 {
            let cos = (e as f64 * PI / tf).cos();
            return Ok(Values::lrs(
                b.base_lrs
                    .iter()
                    .map(|base| eta + (base - eta) * (1.0 + cos) / 2.0)
                    .collect(),
            ));
        }
        if restart {
            let k = 1.0 - (PI / tf).cos();
            return Ok(Values::lrs(
                lrs.iter()
                    .zip(&b.base_lrs)
                    .map(|(lr, base)| lr + (base - eta) * k / 2.0)
                    .collect(),
            ));
        }
        let ratio = div(
            1.0 + (PI * e as f64 / tf).cos(),
            1.0 + (PI * (e - 1) as f64 / tf).cos(),
        )?;
        Ok(Values::lrs(
            lrs.iter().map(|lr| ratio * (lr - eta) + eta).collect(),
        ))
    }
    fn closed_form(&self) -> Option<Result<Vec<f64>>> {
        let c = &self.state.config;
        let b = &self.state.base;
        let cos = (PI * b.last_epoch as f64 / c.t_max as f64).cos();
        Some(Ok(b
            .base_lrs
            .iter()
            .map(|base| c.eta_min + (base - c.eta_min) * (1.0 + cos) / 2.0)
            .collect()))
    }
}

leaf_scheduler!(CosineAnnealingLR);

/// Options of [`CosineAnnealingWarmRestarts`], with torch's names and defaults.
///
/// Built with [`CosineAnnealingWarmRestartsConfig::new`] and one `with_<field>` builder step per
/// option; the struct is `#[non_exhaustive]`, so a torch option added later is not a breaking
/// change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CosineAnnealingWarmRestartsConfig {
    /// Epochs until the first restart (required, positive).
    #[serde(rename = "T_0")]
    pub t_0: i64,
    /// Factor by which the period grows after each restart (≥ 1).
    #[serde(rename = "T_mult", default = "one")]
    pub t_mult: i64,
    /// The lr at the bottom of the cosine.
    #[serde(default)]
    pub eta_min: f64,
    /// -1 for a fresh schedule, or the number of steps already taken (see the
    /// [module docs](super)).
    #[serde(default = "minus_one")]
    pub last_epoch: i64,
}

builders!(CosineAnnealingWarmRestartsConfig {
    t_0: i64,
    t_mult: i64,
    eta_min: f64,
    last_epoch: i64,
});

impl CosineAnnealingWarmRestartsConfig {
    /// torch's defaults with the required `T_0`.
    pub fn new(t_0: i64) -> Self {
        CosineAnnealingWarmRestartsConfig {
            t_0,
            t_mult: 1,
            eta_min: 0.0,
            last_epoch: -1,
        }
    }

    fn check(&self) -> Result<()> {
        if self.t_0 <= 0 {
            return Err(invalid(format!(
                "Expected positive integer T_0, but got {}",
                self.t_0
            )));
        }
        if self.t_mult < 1 {
            return Err(invalid(format!(
                "Expected integer T_mult >= 1, but got {}",
                self.t_mult
            )));
        }
        finite("eta_min", self.eta_min)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct WarmRestartsState {
    config: CosineAnnealingWarmRestartsConfig,
    #[serde(flatten)]
    base: BaseState,
    /// torch's `T_i`: the current period.
    #[serde(rename = "T_i")]
    t_i: i64,
    /// torch's `T_cur`: epochs since the last restart (fractional after `step(epoch)`).
    #[serde(rename = "T_cur")]
    t_cur: f64,
}

impl LeafState for WarmRestartsState {
    fn last_momentum(&self) -> Option<(&[f64], bool)> {
        // It does not cycle momentum.
        None
    }
    fn base(&self) -> &BaseState {
        &self.base
    }
    fn base_mut(&mut self) -> &mut BaseState {
        &mut self.base
    }
    fn validate(&self) -> Result<()> {
        self.config.check()?;
        if self.t_i <= 0 || !self.t_cur.is_finite() {
            return Err(invalid(format!(
                "T_i = {} and T_cur = {:?} are not a valid position",
                self.t_i, self.t_cur
            )));
        }
        Ok(())
    }
}

/// torch's `CosineAnnealingWarmRestarts` (SGDR): cosine annealing from `base_lr` to
/// `eta_min` over `T_i` epochs, restarting at `base_lr`; `T_0` is the first period and each
/// restart multiplies it by `T_mult`.
///
/// ```text
/// lr = η_min + (base_lr − η_min) · (1 + cos(π · T_cur / T_i)) / 2
/// ```
///
/// [`LrScheduler::step`](super::LrScheduler::step) advances `T_cur` by one;
/// [`LrScheduler::step_epoch`](super::LrScheduler::step_epoch) with `Some(epoch)` jumps to a
/// (possibly fractional) epoch, as torch's `scheduler.step(epoch + i / iters)`.
///
/// Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts" (ICLR 2017).
#[derive(Debug)]
pub struct CosineAnnealingWarmRestarts {
    state: WarmRestartsState,
}

impl CosineAnnealingWarmRestarts {
    /// torch's `CosineAnnealingWarmRestarts(optimizer, T_0, T_mult=1, eta_min=0.0,
    /// last_epoch=-1)`.
    pub fn new(
        opt: &mut dyn GroupHyperparams,
        config: CosineAnnealingWarmRestartsConfig,
    ) -> Result<Self> {
        config.check()?;
        let last_epoch = config.last_epoch;
        construct(opt, last_epoch, |base| {
            Ok(CosineAnnealingWarmRestarts {
                state: WarmRestartsState {
                    t_i: config.t_0,
                    // torch: `self.T_cur = last_epoch`; optarena always starts fresh (-1)
                    // and replays (see the module docs).
                    t_cur: -1.0,
                    config,
                    base: BaseState::new(base),
                },
            })
        })
    }

    /// The options.
    pub fn config(&self) -> &CosineAnnealingWarmRestartsConfig {
        &self.state.config
    }

    /// torch's `T_cur`: epochs since the last restart.
    pub fn t_cur(&self) -> f64 {
        self.state.t_cur
    }

    /// torch's `T_i`: the current period.
    pub fn t_i(&self) -> i64 {
        self.state.t_i
    }
}

fn overflow() -> Error {
    Error::Scheduler("CosineAnnealingWarmRestarts: the period T_i overflows".into())
}

/// An epoch for messages, as Python prints an int or a float.
fn py_num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{}", x as i64)
    } else {
        format!("{x:?}")
    }
}

impl Leaf for CosineAnnealingWarmRestarts {
    fn closed_form(&self) -> Option<Result<Vec<f64>>> {
        // torch's class has no `_get_closed_form_lr`: `step(epoch)` uses `get_lr`.
        None
    }
    fn check_loaded(&self, _state: &Self::State) -> Result<()> {
        // Everything it runs on is in the state.
        Ok(())
    }
    const NAME: &'static str = "CosineAnnealingWarmRestarts";
    type State = WarmRestartsState;
    fn state(&self) -> &WarmRestartsState {
        &self.state
    }
    fn state_mut(&mut self) -> &mut WarmRestartsState {
        &mut self.state
    }
    fn get_lr(&mut self, _opt: &dyn GroupHyperparams, _initial: bool) -> Result<Values> {
        let s = &self.state;
        let eta = s.config.eta_min;
        let cos = (PI * s.t_cur / s.t_i as f64).cos();
        Ok(Values::lrs(
            s.base
                .base_lrs
                .iter()
                .map(|base| eta + (base - eta) * (1.0 + cos) / 2.0)
                .collect(),
        ))
    }

    /// torch's `CosineAnnealingWarmRestarts.step(epoch)`.
    fn leaf_step(
        &mut self,
        opt: &mut dyn GroupHyperparams,
        epoch: Option<f64>,
        _initial: bool,
    ) -> Result<()> {
        super::check_follows(opt, self.state.base.base_lrs.len())?;
        let s = &mut self.state;
        let (t_0, t_mult) = (s.config.t_0, s.config.t_mult);
        let epoch = match epoch {
            None if s.base.last_epoch < 0 => Some(0.0),
            e => e,
        };
        let epoch = match epoch {
            None => {
                let epoch = (s.base.last_epoch + 1) as f64;
                s.t_cur += 1.0;
                if s.t_cur >= s.t_i as f64 {
                    s.t_cur %= s.t_i as f64;
                    s.t_i = s.t_i.checked_mul(t_mult).ok_or_else(overflow)?;
                }
                epoch
            }
            Some(epoch) => {
                if !epoch.is_finite() {
                    return Err(Error::Scheduler(format!(
                        "Expected a finite epoch, but got {epoch:?}"
                    )));
                }
                if epoch < 0.0 {
                    return Err(invalid(format!(
                        "Expected non-negative epoch, but got {}",
                        py_num(epoch)
                    )));
                }
                if epoch >= t_0 as f64 {
                    if t_mult == 1 {
                        s.t_cur = epoch % t_0 as f64;
                    } else {
                        let m = t_mult as f64;
                        let x = epoch / t_0 as f64 * (m - 1.0) + 1.0;
                        // Python's math.log(x, base) is log(x) / log(base); int() truncates.
                        let n = (x.ln() / m.ln()) as u32;
                        let pow = t_mult.checked_pow(n).ok_or_else(overflow)?;
                        let num = t_0.checked_mul(pow - 1).ok_or_else(overflow)?;
                        s.t_cur = epoch - num as f64 / (t_mult - 1) as f64;
                        s.t_i = t_0.checked_mul(pow).ok_or_else(overflow)?;
                    }
                } else {
                    s.t_i = t_0;
                    s.t_cur = epoch;
                }
                epoch
            }
        };
        s.base.last_epoch = epoch.floor() as i64;
        let values = self.get_lr(opt, false)?;
        super::check_late_groups(Self::NAME, values.lrs.len(), opt, Self::LATE_GROUP_TORCH)?;
        apply(opt, &values.lrs, None)?;
        self.state.base.last_lr = group_lrs(opt)?;
        Ok(())
    }
}

leaf_scheduler!(CosineAnnealingWarmRestarts);
