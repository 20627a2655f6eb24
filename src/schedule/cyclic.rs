//! `CyclicLR`: the cyclical learning-rate policy (CLR).

use serde::{Deserialize, Serialize};

use super::builders;
use super::sealed::Protocol;
use super::{
    attach, div, finite, invalid, leaf_scheduler, momentum_kind, py_pow, replay, set_momentum,
    transaction, BaseState, Leaf, LeafState, PerGroup, Values,
};
use crate::error::{Error, Result};
use crate::hyper::GroupHyperparams;

/// A custom scaling policy (torch's `scale_fn`), called with the cycle number or the
/// iteration; should stay in `[0, 1]`. Not serialized.
pub type ScaleFn = Box<dyn Fn(f64) -> f64 + Send>;

fn minus_one() -> i64 {
    -1
}
fn d_step_size_up() -> f64 {
    2000.0
}
fn d_mode() -> String {
    "triangular".into()
}
fn d_gamma() -> f64 {
    1.0
}
fn d_scale_mode() -> String {
    "cycle".into()
}
fn d_true() -> bool {
    true
}
fn d_base_momentum() -> PerGroup {
    PerGroup::All(0.8)
}
fn d_max_momentum() -> PerGroup {
    PerGroup::All(0.9)
}

/// Options of [`CyclicLR`], with torch's names and defaults.
///
/// Built with [`CyclicLRConfig::new`] and one `with_<field>` builder step per option; the struct is
/// `#[non_exhaustive]`, so a torch option added later is not a breaking change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CyclicLRConfig {
    /// Lower lr boundary of the cycle, for all groups or per group (required).
    pub base_lr: PerGroup,
    /// Upper lr boundary of the cycle, for all groups or per group (required).
    pub max_lr: PerGroup,
    /// Iterations in the increasing half of a cycle.
    #[serde(default = "d_step_size_up")]
    pub step_size_up: f64,
    /// Iterations in the decreasing half; `None` means `step_size_up`.
    #[serde(default)]
    pub step_size_down: Option<f64>,
    /// `"triangular"`, `"triangular2"` or `"exp_range"`; ignored with a custom scale
    /// function.
    #[serde(default = "d_mode")]
    pub mode: String,
    /// Constant of `exp_range`: `gamma^iterations`.
    #[serde(default = "d_gamma")]
    pub gamma: f64,
    /// With a custom scale function: evaluate it on the cycle number (`"cycle"`) or the
    /// iteration (`"iterations"`). The built-in modes set their own.
    #[serde(default = "d_scale_mode")]
    pub scale_mode: String,
    /// Cycle the momentum (or `betas.0`) inversely to the lr.
    #[serde(default = "d_true")]
    pub cycle_momentum: bool,
    /// Lower momentum boundary (the momentum at the lr's peak).
    #[serde(default = "d_base_momentum")]
    pub base_momentum: PerGroup,
    /// Upper momentum boundary (the momentum at the cycle's start).
    #[serde(default = "d_max_momentum")]
    pub max_momentum: PerGroup,
    /// -1 for a fresh schedule, or the number of steps already taken (see the
    /// [module docs](super)).
    #[serde(default = "minus_one")]
    pub last_epoch: i64,
}

builders!(CyclicLRConfig {
    base_lr: impl Into<PerGroup>,
    max_lr: impl Into<PerGroup>,
    step_size_up: f64,
    step_size_down: Option<f64>,
    mode: impl Into<String>,
    gamma: f64,
    scale_mode: impl Into<String>,
    cycle_momentum: bool,
    base_momentum: impl Into<PerGroup>,
    max_momentum: impl Into<PerGroup>,
    last_epoch: i64,
});

impl CyclicLRConfig {
    /// torch's defaults with the required `base_lr` and `max_lr`.
    pub fn new(base_lr: impl Into<PerGroup>, max_lr: impl Into<PerGroup>) -> Self {
        CyclicLRConfig {
            base_lr: base_lr.into(),
            max_lr: max_lr.into(),
            step_size_up: 2000.0,
            step_size_down: None,
            mode: d_mode(),
            gamma: 1.0,
            scale_mode: d_scale_mode(),
            cycle_momentum: true,
            base_momentum: d_base_momentum(),
            max_momentum: d_max_momentum(),
            last_epoch: -1,
        }
    }

    /// The scale mode in use: the built-in modes fix theirs (torch's `_init_scale_fn`).
    fn effective_scale_mode(&self, custom: bool) -> String {
        match (custom, self.mode.as_str()) {
            (true, _) => self.scale_mode.clone(),
            (false, "exp_range") => "iterations".into(),
            _ => "cycle".into(),
        }
    }

    fn check_mode(&self, custom: bool) -> Result<()> {
        if !["triangular", "triangular2", "exp_range"].contains(&self.mode.as_str()) && !custom {
            return Err(invalid("mode is invalid and scale_fn is None"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct CyclicState {
    config: CyclicLRConfig,
    #[serde(flatten)]
    base: BaseState,
    max_lrs: Vec<f64>,
    total_size: f64,
    step_ratio: f64,
    scale_mode: String,
    /// Whether the schedule was built with a custom scale function (not serialized itself).
    custom_scale_fn: bool,
    use_beta1: bool,
    base_momentums: Vec<f64>,
    max_momentums: Vec<f64>,
    /// The momentum (or `betas.0`) values set last, restored by `load_state_dict`.
    #[serde(rename = "_last_momentum")]
    last_momentum: Vec<f64>,
}

impl LeafState for CyclicState {
    fn base(&self) -> &BaseState {
        &self.base
    }
    fn base_mut(&mut self) -> &mut BaseState {
        &mut self.base
    }
    fn validate(&self) -> Result<()> {
        self.config.check_mode(self.custom_scale_fn)?;
        finite("gamma", self.config.gamma)?;
        let n = self.base.base_lrs.len();
        let mut lens = vec![self.max_lrs.len()];
        if self.config.cycle_momentum {
            lens.extend([
                self.base_momentums.len(),
                self.max_momentums.len(),
                self.last_momentum.len(),
            ]);
        }
        if lens.iter().any(|&l| l != n) {
            return Err(invalid("per-group lists of different lengths"));
        }
        if !(self.total_size.is_finite() && self.step_ratio.is_finite()) {
            return Err(invalid("total_size and step_ratio must be finite"));
        }
        Ok(())
    }
    fn last_momentum(&self) -> Option<(&[f64], bool)> {
        self.config
            .cycle_momentum
            .then_some((self.last_momentum.as_slice(), self.use_beta1))
    }
}

/// torch's `CyclicLR`: the lr cycles between `base_lr` and `max_lr` (and the momentum
/// inversely between `max_momentum` and `base_momentum`), stepped after every batch.
///
/// ```text
/// cycle = ⌊1 + t / (up + down)⌋,   x = 1 + t / (up + down) − cycle
/// s     = x / r                 if x ≤ r = up / (up + down)
///       = (x − 1) / (r − 1)     otherwise
/// lr    = base_lr + (max_lr − base_lr) · s · scale(cycle or t)
/// m     = max_m − (max_m − base_m) · s · scale(cycle or t)
/// scale: triangular 1, triangular2 1 / 2^(cycle − 1), exp_range γ^t, or a custom function
/// ```
///
/// The momentum is `momentum`, or `betas.0` when the optimizer has `betas` (Adam), as in
/// torch. Smith, "Cyclical Learning Rates for Training Neural Networks" (WACV 2017).
pub struct CyclicLR {
    scale_fn: Option<ScaleFn>,
    state: CyclicState,
}

impl std::fmt::Debug for CyclicLR {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CyclicLR")
            .field("custom_scale_fn", &self.scale_fn.is_some())
            .field("state", &self.state)
            .finish()
    }
}

impl CyclicLR {
    /// torch's `CyclicLR(optimizer, base_lr, max_lr, ...)`.
    pub fn new(opt: &mut dyn GroupHyperparams, config: CyclicLRConfig) -> Result<Self> {
        Self::build(opt, config, None)
    }

    /// torch's `CyclicLR(..., scale_fn=f, scale_mode=...)`: a custom scaling policy (`mode`
    /// is then ignored).
    pub fn with_scale_fn(
        opt: &mut dyn GroupHyperparams,
        config: CyclicLRConfig,
        scale_fn: impl Fn(f64) -> f64 + Send + 'static,
    ) -> Result<Self> {
        Self::build(opt, config, Some(Box::new(scale_fn)))
    }

    fn build(
        opt: &mut dyn GroupHyperparams,
        config: CyclicLRConfig,
        scale_fn: Option<ScaleFn>,
    ) -> Result<Self> {
        super::check_last_epoch(config.last_epoch)?;
        transaction(opt, move |opt| {
            let n = opt.num_groups();
            let base_lrs = config.base_lr.format("base_lr", n)?;
            // optarena always builds fresh and replays `last_epoch` steps (module docs).
            for (g, &lr) in base_lrs.iter().enumerate() {
                opt.set_lr(g, lr)?;
            }
            let max_lrs = config.max_lr.format("max_lr", n)?;
            finite("step_size_up", config.step_size_up)?;
            let up = config.step_size_up;
            let down = config.step_size_down.unwrap_or(up);
            finite("step_size_down", down)?;
            let total_size = up + down;
            let step_ratio = div(up, total_size)?;
            let custom = scale_fn.is_some();
            config.check_mode(custom)?;
            finite("gamma", config.gamma)?;
            let scale_mode = config.effective_scale_mode(custom);
            let (mut use_beta1, mut base_m, mut max_m) = (false, Vec::new(), Vec::new());
            if config.cycle_momentum {
                use_beta1 = momentum_kind(opt).ok_or_else(no_momentum)?;
                base_m = config.base_momentum.format("base_momentum", n)?;
                max_m = config.max_momentum.format("max_momentum", n)?;
                for (g, &m) in max_m.iter().enumerate() {
                    set_momentum(opt, g, m, use_beta1)?;
                }
            }
            // LRScheduler.__init__: initial_lr via setdefault, base_lrs = initial_lr for the
            // initial step (torch assigns the base_lr list only after it).
            let initial = attach(opt, -1)?;
            let last_epoch = config.last_epoch;
            let mut s = CyclicLR {
                scale_fn,
                state: CyclicState {
                    config,
                    base: BaseState::new(initial),
                    max_lrs,
                    total_size,
                    step_ratio,
                    scale_mode,
                    custom_scale_fn: custom,
                    use_beta1,
                    last_momentum: max_m.clone(),
                    base_momentums: base_m,
                    max_momentums: max_m,
                },
            };
            s.raw_initial_step(opt)?;
            s.state.base.base_lrs = base_lrs;
            replay(&mut s, opt, last_epoch)?;
            Ok(s)
        })
    }

    /// The options.
    pub fn config(&self) -> &CyclicLRConfig {
        &self.state.config
    }

    /// torch's `scale_fn(x)`.
    fn scale(&self, x: f64) -> Result<f64> {
        if let Some(f) = &self.scale_fn {
            return Ok(f(x));
        }
        match self.state.config.mode.as_str() {
            "triangular" => Ok(1.0),
            "triangular2" => Ok(div(1.0, py_pow(2.0, x - 1.0)?)?),
            _ => py_pow(self.state.config.gamma, x),
        }
    }
}

pub(crate) fn no_momentum() -> Error {
    invalid("optimizer must support momentum or beta1 with `cycle_momentum` option enabled")
}

impl Leaf for CyclicLR {
    fn closed_form(&self) -> Option<Result<Vec<f64>>> {
        // torch's class has no `_get_closed_form_lr`: `step(epoch)` uses `get_lr`.
        None
    }
    const NAME: &'static str = "CyclicLR";
    type State = CyclicState;
    fn state(&self) -> &CyclicState {
        &self.state
    }
    fn state_mut(&mut self) -> &mut CyclicState {
        &mut self.state
    }
    fn get_lr(&mut self, opt: &dyn GroupHyperparams, _initial: bool) -> Result<Values> {
        super::check_follows(opt, self.state.base.base_lrs.len())?;
        let s = &self.state;
        let e = s.base.last_epoch as f64;
        let q = div(e, s.total_size)?;
        let cycle = (1.0 + q).floor();
        let x = 1.0 + q - cycle;
        let scale_factor = if x <= s.step_ratio {
            div(x, s.step_ratio)?
        } else {
            div(x - 1.0, s.step_ratio - 1.0)?
        };
        let arg = if s.scale_mode == "cycle" { cycle } else { e };
        let k = self.scale(arg)?;
        let lrs = s
            .base
            .base_lrs
            .iter()
            .zip(&s.max_lrs)
            .map(|(base, max)| base + (max - base) * scale_factor * k)
            .collect();
        let momentum = s.config.cycle_momentum.then(|| {
            s.base_momentums
                .iter()
                .zip(&s.max_momentums)
                .map(|(base, max)| max - (max - base) * scale_factor * k)
                .collect::<Vec<f64>>()
        });
        if let Some(m) = &momentum {
            self.state.last_momentum.clone_from(m);
        }
        Ok(Values { lrs, momentum })
    }
    fn check_loaded(&self, st: &CyclicState) -> Result<()> {
        self.check_custom(st)
    }
}

leaf_scheduler!(CyclicLR);

impl CyclicLR {
    /// Checks, on load, that the saved schedule used a custom scale function exactly when this
    /// one has one.
    fn check_custom(&self, st: &CyclicState) -> Result<()> {
        if st.custom_scale_fn != self.scale_fn.is_some() {
            return Err(Error::StateDict(format!(
                "CyclicLR: the state was saved {} a custom scale_fn and this scheduler has {}",
                if st.custom_scale_fn {
                    "with"
                } else {
                    "without"
                },
                if self.scale_fn.is_some() {
                    "one"
                } else {
                    "none"
                }
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn effective_scale_mode_follows_torch() {
        let c = super::CyclicLRConfig::new(0.1, 1.0);
        assert_eq!(c.effective_scale_mode(false), "cycle");
        let c = c.with_mode("exp_range");
        assert_eq!(c.effective_scale_mode(false), "iterations");
        assert_eq!(c.effective_scale_mode(true), "cycle");
    }
}
