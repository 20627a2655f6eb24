//! `LambdaLR` and `MultiplicativeLR`: the lr scaled by user functions of the epoch.

use serde::{Deserialize, Serialize};

use super::builders;
use super::{construct, group_lrs, invalid, leaf_scheduler, BaseState, Leaf, LeafState, Values};
use crate::error::{Error, Result};
use crate::hyper::GroupHyperparams;

/// A function of the epoch (torch's `lr_lambda`), called with `last_epoch` (never negative
/// unless an explicit negative epoch is passed to `step_epoch`, which is then an error). Not
/// serialized: a state is loaded into a scheduler built with the same functions.
pub type LrLambda = Box<dyn Fn(usize) -> f64 + Send>;

/// Options of [`LambdaLR`] and [`MultiplicativeLR`] besides the functions.
///
/// Built with [`LambdaLRConfig::new`] and one `with_<field>` builder step per option; the struct is
/// `#[non_exhaustive]`, so a torch option added later is not a breaking change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct LambdaLRConfig {
    /// torch's `last_epoch`: -1 for a fresh schedule, or the number of steps already taken
    /// (see the [module docs](super) for how optarena resumes).
    #[serde(default = "minus_one")]
    pub last_epoch: i64,
}

builders!(LambdaLRConfig { last_epoch: i64 });

fn minus_one() -> i64 {
    -1
}

impl Default for LambdaLRConfig {
    fn default() -> Self {
        LambdaLRConfig { last_epoch: -1 }
    }
}

impl LambdaLRConfig {
    /// torch's defaults (the same as `Default::default()`): every option has one.
    pub fn new() -> Self {
        Self::default()
    }
}

/// The functions, one for all groups or one per group (torch's `lr_lambda` or
/// `[lr_lambda, ...]`).
fn expand(lambdas: Vec<LrLambda>, one: bool, n: usize) -> Result<Vec<LrLambda>> {
    if one {
        return Ok(lambdas);
    }
    if lambdas.len() != n {
        return Err(invalid(format!(
            "Expected {n} lr_lambdas, but got {}",
            lambdas.len()
        )));
    }
    Ok(lambdas)
}

/// Calls the lambda of group `g` (a single lambda serves every group).
fn call(lambdas: &[LrLambda], g: usize, epoch: i64) -> Result<f64> {
    let f = if lambdas.len() == 1 {
        &lambdas[0]
    } else {
        &lambdas[g]
    };
    if epoch < 0 {
        return Err(Error::Scheduler(format!(
            "lr_lambda called with the negative epoch {epoch}"
        )));
    }
    Ok(f(epoch as usize))
}

/// The state of [`LambdaLR`] / [`MultiplicativeLR`]: no options besides the functions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct LambdaState {
    #[serde(flatten)]
    base: BaseState,
}

impl LeafState for LambdaState {
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
        Ok(())
    }
}

/// torch's `LambdaLR`: each group's lr is its initial lr times a function of the epoch.
///
/// ```text
/// lr_g(epoch) = base_lr_g · λ_g(epoch)
/// ```
///
/// The functions are Rust closures of the epoch; they are not serialized (see the
/// [module docs](super)).
pub struct LambdaLR {
    lambdas: Vec<LrLambda>,
    state: LambdaState,
}

impl std::fmt::Debug for LambdaLR {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LambdaLR")
            .field("lambdas", &self.lambdas.len())
            .field("state", &self.state)
            .finish()
    }
}

impl LambdaLR {
    /// torch's `LambdaLR(optimizer, lr_lambda)`: one function for every group.
    pub fn new(
        opt: &mut dyn GroupHyperparams,
        lr_lambda: impl Fn(usize) -> f64 + Send + 'static,
        config: LambdaLRConfig,
    ) -> Result<Self> {
        Self::build(opt, vec![Box::new(lr_lambda)], true, config)
    }

    /// torch's `LambdaLR(optimizer, [lr_lambda, ...])`: one function per group.
    pub fn per_group(
        opt: &mut dyn GroupHyperparams,
        lr_lambdas: Vec<LrLambda>,
        config: LambdaLRConfig,
    ) -> Result<Self> {
        Self::build(opt, lr_lambdas, false, config)
    }

    fn build(
        opt: &mut dyn GroupHyperparams,
        lambdas: Vec<LrLambda>,
        one: bool,
        config: LambdaLRConfig,
    ) -> Result<Self> {
        let lambdas = expand(lambdas, one, opt.num_groups())?;
        construct(opt, config.last_epoch, |base| {
            Ok(LambdaLR {
                lambdas,
                state: LambdaState {
                    base: BaseState::new(base),
                },
            })
        })
    }
}

impl Leaf for LambdaLR {
    fn closed_form(&self) -> Option<Result<Vec<f64>>> {
        // torch's class has no `_get_closed_form_lr`: `step(epoch)` uses `get_lr`.
        None
    }
    fn check_loaded(&self, _state: &Self::State) -> Result<()> {
        // Its closures are not saved (torch saves none either): the instance's own are used.
        Ok(())
    }
    const NAME: &'static str = "LambdaLR";
    type State = LambdaState;
    fn state(&self) -> &LambdaState {
        &self.state
    }
    fn state_mut(&mut self) -> &mut LambdaState {
        &mut self.state
    }
    fn get_lr(&mut self, _opt: &dyn GroupHyperparams, _initial: bool) -> Result<Values> {
        let b = &self.state.base;
        let lrs = b
            .base_lrs
            .iter()
            .enumerate()
            .map(|(g, &base_lr)| Ok(base_lr * call(&self.lambdas, g, b.last_epoch)?))
            .collect::<Result<_>>()?;
        Ok(Values::lrs(lrs))
    }
}

leaf_scheduler!(LambdaLR);

/// torch's `MultiplicativeLR`: each step multiplies each group's lr by a function of the
/// epoch.
///
/// ```text
/// lr_g(epoch) = lr_g(epoch − 1) · λ_g(epoch)      (epoch ≥ 1; the initial step keeps lr)
/// ```
pub struct MultiplicativeLR {
    lambdas: Vec<LrLambda>,
    state: LambdaState,
}

impl std::fmt::Debug for MultiplicativeLR {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultiplicativeLR")
            .field("lambdas", &self.lambdas.len())
            .field("state", &self.state)
            .finish()
    }
}

impl MultiplicativeLR {
    /// torch's `MultiplicativeLR(optimizer, lr_lambda)`: one function for every group.
    pub fn new(
        opt: &mut dyn GroupHyperparams,
        lr_lambda: impl Fn(usize) -> f64 + Send + 'static,
        config: LambdaLRConfig,
    ) -> Result<Self> {
        Self::build(opt, vec![Box::new(lr_lambda)], true, config)
    }

    /// torch's `MultiplicativeLR(optimizer, [lr_lambda, ...])`: one function per group.
    pub fn per_group(
        opt: &mut dyn GroupHyperparams,
        lr_lambdas: Vec<LrLambda>,
        config: LambdaLRConfig,
    ) -> Result<Self> {
        Self::build(opt, lr_lambdas, false, config)
    }

    fn build(
        opt: &mut dyn GroupHyperparams,
        lambdas: Vec<LrLambda>,
        one: bool,
        config: LambdaLRConfig,
    ) -> Result<Self> {
        let lambdas = expand(lambdas, one, opt.num_groups())?;
        construct(opt, config.last_epoch, |base| {
            Ok(MultiplicativeLR {
                lambdas,
                state: LambdaState {
                    base: BaseState::new(base),
                },
            })
        })
    }
}

impl Leaf for MultiplicativeLR {
    fn closed_form(&self) -> Option<Result<Vec<f64>>> {
        // torch's class has no `_get_closed_form_lr`: `step(epoch)` uses `get_lr`.
        None
    }
    fn check_loaded(&self, _state: &Self::State) -> Result<()> {
        // Its closures are not saved (torch saves none either): the instance's own are used.
        Ok(())
    }
    const NAME: &'static str = "MultiplicativeLR";
    const LATE_GROUP_TORCH: &'static str = super::ZIP_LONGER;
    type State = LambdaState;
    fn state(&self) -> &LambdaState {
        &self.state
    }
    fn state_mut(&mut self) -> &mut LambdaState {
        &mut self.state
    }
    fn get_lr(&mut self, opt: &dyn GroupHyperparams, initial: bool) -> Result<Values> {
        super::check_follows(opt, self.state.base.base_lrs.len())?;
        let current = group_lrs(opt)?;
        if initial {
            return Ok(Values::lrs(current));
        }
        let epoch = self.state.base.last_epoch;
        // One lambda per group the scheduler was built for: a group added later has none
        // (update_lr then raises torch's error).
        let lrs = current
            .iter()
            .take(self.state.base.base_lrs.len())
            .enumerate()
            .map(|(g, &lr)| Ok(lr * call(&self.lambdas, g, epoch)?))
            .collect::<Result<_>>()?;
        Ok(Values::lrs(lrs))
    }
}

leaf_scheduler!(MultiplicativeLR);
