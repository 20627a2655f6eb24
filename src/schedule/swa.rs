//! `SWALR`: torch's `torch.optim.swa_utils.SWALR`, the learning rate of Stochastic Weight
//! Averaging (Izmailov et al., "Averaging Weights Leads to Wider Optima and Better
//! Generalization", UAI 2018, <https://arxiv.org/abs/1803.05407>). Pair it with
//! [`AveragedModel`](crate::AveragedModel).

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};

use super::builders;
use super::{
    construct, group_lrs, invalid, leaf_scheduler, BaseState, Leaf, LeafState, PerGroup, Values,
};
use crate::error::{Error, Result};
use crate::hyper::GroupHyperparams;

fn minus_one() -> i64 {
    -1
}
fn ten() -> i64 {
    10
}

/// How [`SWALR`] moves from the group's lr to `swa_lr` (torch's `anneal_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum AnnealStrategy {
    /// `"cos"`: `alpha(t) = (1 − cos(π t)) / 2` (torch's default).
    #[default]
    Cos,
    /// `"linear"`: `alpha(t) = t`.
    Linear,
}

impl TryFrom<String> for AnnealStrategy {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl std::str::FromStr for AnnealStrategy {
    type Err = Error;
    /// `"cos"` or `"linear"`, with torch's message for anything else.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cos" => Ok(AnnealStrategy::Cos),
            "linear" => Ok(AnnealStrategy::Linear),
            other => Err(invalid(format!(
                "anneal_strategy must be one of 'cos' or 'linear', instead got {other}"
            ))),
        }
    }
}

impl From<AnnealStrategy> for String {
    fn from(s: AnnealStrategy) -> String {
        match s {
            AnnealStrategy::Cos => "cos".into(),
            AnnealStrategy::Linear => "linear".into(),
        }
    }
}

impl AnnealStrategy {
    /// torch's `_cosine_anneal` / `_linear_anneal`.
    fn alpha(self, t: f64) -> f64 {
        match self {
            AnnealStrategy::Cos => (1.0 - (PI * t).cos()) / 2.0,
            AnnealStrategy::Linear => t,
        }
    }
}

/// Options of [`SWALR`], with torch's names and defaults.
///
/// Built with [`SWALRConfig::new`] and one `with_<field>` builder step per option; the struct is
/// `#[non_exhaustive]`, so a torch option added later is not a breaking change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct SWALRConfig {
    /// The lr the schedule anneals to: one for every group, or one per group (required).
    pub swa_lr: PerGroup,
    /// Number of epochs of the annealing phase (`>= 0`; torch's default 10).
    #[serde(default = "ten")]
    pub anneal_epochs: i64,
    /// `"cos"` (default) or `"linear"`.
    #[serde(default)]
    pub anneal_strategy: AnnealStrategy,
    /// -1 for a fresh schedule, or the number of steps already taken (see the
    /// [module docs](super)).
    #[serde(default = "minus_one")]
    pub last_epoch: i64,
}

builders!(SWALRConfig {
    swa_lr: impl Into<PerGroup>,
    anneal_epochs: i64,
    anneal_strategy: AnnealStrategy,
    last_epoch: i64,
});

impl SWALRConfig {
    /// torch's defaults with the required `swa_lr`.
    pub fn new(swa_lr: impl Into<PerGroup>) -> Self {
        SWALRConfig {
            swa_lr: swa_lr.into(),
            anneal_epochs: 10,
            anneal_strategy: AnnealStrategy::Cos,
            last_epoch: -1,
        }
    }

    fn check(&self) -> Result<()> {
        if self.anneal_epochs < 0 {
            return Err(invalid(format!(
                "anneal_epochs must be equal or greater than 0, got {}",
                self.anneal_epochs
            )));
        }
        Ok(())
    }
}

/// [`SWALR`]'s state: the options, the per-group `swa_lr` (torch keeps it in
/// `group["swa_lr"]`; optarena keeps it here, so it is saved with the scheduler) and the
/// [`BaseState`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SwaState {
    config: SWALRConfig,
    swa_lrs: Vec<f64>,
    #[serde(flatten)]
    base: BaseState,
}

impl LeafState for SwaState {
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
        let n = self.base.base_lrs.len();
        let formatted = self.config.swa_lr.format("swa_lr", n)?;
        if self.swa_lrs != formatted {
            return Err(invalid(format!(
                "swa_lrs {:?} do not match swa_lr {:?} over {n} groups",
                self.swa_lrs, self.config.swa_lr
            )));
        }
        Ok(())
    }
}

/// torch's `SWALR`: anneals each group's lr to a fixed `swa_lr` over `anneal_epochs` epochs,
/// then holds it (Izmailov et al., UAI 2018).
///
/// It is chainable: each step starts from the group's *current* lr, so it takes over from
/// whatever scheduler ran before (torch's SWA recipe: a warm-up or cosine schedule until
/// `swa_start`, then `SWALR`). With `s = _step_count − 1` (0 right after construction; `s ≥ 1`
/// when `anneal_epochs == 0`), `A = anneal_epochs`:
///
/// ```text
/// t(s)       = clamp(s / max(1, A), 0, 1)
/// alpha(t)   = (1 − cos(π t)) / 2   ("cos")   or   t   ("linear")
/// a_prev     = alpha(t(s − 1)),  a = alpha(t(s))
/// lr_prev    = swa_lr                                   if a_prev == 1
///            = (lr − a_prev · swa_lr) / (1 − a_prev)    otherwise
/// lr         ← swa_lr · a + lr_prev · (1 − a)
/// ```
///
/// Like torch, it counts its own `step()` calls (`_step_count`), not `last_epoch`.
///
/// ```
/// use optarena::schedule::{LinearLR, LinearLRConfig, LrScheduler, SWALR, SWALRConfig};
/// use optarena::{ArenaBuilder, ParamGroup, SGD, SGDConfig};
///
/// let mut b = ArenaBuilder::<f32>::new();
/// b.zeros("w", &[4])?;
/// let arena = b.build();
/// let mut opt = SGD::new(&arena, [ParamGroup::all()], SGDConfig::default().with_lr(0.1))?;
/// // torch's recipe: both built up front, the warm-up stepped until swa_start, then SWALR.
/// let mut warmup = LinearLR::new(&mut opt, LinearLRConfig::new().with_total_iters(2))?;
/// let mut swa = SWALR::new(&mut opt, SWALRConfig::new(0.05).with_anneal_epochs(2))?;
/// for _ in 0..3 {
///     warmup.step(&mut opt)?;
/// }
/// assert!((opt.lr(0)? - 0.1).abs() < 1e-12);
/// for _ in 0..3 {
///     swa.step(&mut opt)?;
/// }
/// assert!((opt.lr(0)? - 0.05).abs() < 1e-12);
/// # Ok::<(), optarena::Error>(())
/// ```
#[derive(Debug)]
pub struct SWALR {
    state: SwaState,
}

impl SWALR {
    /// torch's `SWALR(optimizer, swa_lr, anneal_epochs=10, anneal_strategy="cos",
    /// last_epoch=-1)`, with torch's checks in torch's order (`swa_lr`'s length, then
    /// `anneal_strategy`, which the type enforces, then `anneal_epochs`).
    pub fn new(opt: &mut dyn GroupHyperparams, config: SWALRConfig) -> Result<Self> {
        let swa_lrs = config.swa_lr.format("swa_lr", opt.num_groups())?;
        config.check()?;
        let last_epoch = config.last_epoch;
        construct(opt, last_epoch, |base| {
            Ok(SWALR {
                state: SwaState {
                    config,
                    swa_lrs,
                    base: BaseState::new(base),
                },
            })
        })
    }

    /// The options.
    pub fn config(&self) -> &SWALRConfig {
        &self.state.config
    }

    /// The per-group `swa_lr` (torch's `group["swa_lr"]`).
    pub fn swa_lrs(&self) -> &[f64] {
        &self.state.swa_lrs
    }
}

/// Python's `max(0, min(1, x))`.
fn clamp01(x: f64) -> f64 {
    let m = if x < 1.0 { x } else { 1.0 };
    if m > 0.0 {
        m
    } else {
        0.0
    }
}

impl Leaf for SWALR {
    fn closed_form(&self) -> Option<Result<Vec<f64>>> {
        // torch's class has no `_get_closed_form_lr`: `step(epoch)` uses `get_lr`.
        None
    }
    fn check_loaded(&self, _state: &Self::State) -> Result<()> {
        // Everything it runs on is in the state.
        Ok(())
    }
    const NAME: &'static str = "SWALR";
    const LATE_GROUP_TORCH: &'static str = "KeyError: 'swa_lr'";
    type State = SwaState;
    fn state(&self) -> &SwaState {
        &self.state
    }
    fn state_mut(&mut self) -> &mut SwaState {
        &mut self.state
    }
    fn get_lr(&mut self, opt: &dyn GroupHyperparams, _initial: bool) -> Result<Values> {
        super::check_follows(opt, self.state.base.base_lrs.len())?;
        let c = &self.state.config;
        let mut step = self.state.base.step_count as i64 - 1;
        if c.anneal_epochs == 0 {
            step = step.max(1);
        }
        let denom = c.anneal_epochs.max(1) as f64;
        let prev_alpha = c.anneal_strategy.alpha(clamp01((step - 1) as f64 / denom));
        let alpha = c.anneal_strategy.alpha(clamp01(step as f64 / denom));
        let lrs = group_lrs(opt)?;
        let out = lrs
            .iter()
            .zip(&self.state.swa_lrs)
            .map(|(&lr, &swa)| {
                let prev = if prev_alpha == 1.0 {
                    swa
                } else {
                    (lr - prev_alpha * swa) / (1.0 - prev_alpha)
                };
                swa * alpha + prev * (1.0 - alpha)
            })
            .collect();
        Ok(Values::lrs(out))
    }
}

leaf_scheduler!(SWALR);
