//! `ReduceLROnPlateau`: the lr reduced when a metric stops improving.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::builders;
use super::sealed::{Protocol, Snapshot};
use super::{
    apply, check_saved, finite, float_or_inf, group_lrs, guarded, invalid, py_max, LrScheduler,
    PerGroup, SCHEDULER_STATE_FORMAT,
};
use crate::error::{Error, Result};
use crate::hyper::GroupHyperparams;

fn d_min() -> String {
    "min".into()
}
fn d_factor() -> f64 {
    0.1
}
fn d_patience() -> i64 {
    10
}
fn d_threshold() -> f64 {
    1e-4
}
fn d_rel() -> String {
    "rel".into()
}
fn d_min_lr() -> PerGroup {
    PerGroup::All(0.0)
}
fn d_eps() -> f64 {
    1e-8
}

/// Options of [`ReduceLROnPlateau`], with torch's names and defaults.
///
/// Built with [`ReduceLROnPlateauConfig::new`] and one `with_<field>` builder step per option; the
/// struct is `#[non_exhaustive]`, so a torch option added later is not a breaking change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ReduceLROnPlateauConfig {
    /// `"min"`: reduce when the metric stops decreasing; `"max"`: stops increasing.
    #[serde(default = "d_min")]
    pub mode: String,
    /// `new_lr = lr * factor` (must be `< 1`).
    #[serde(default = "d_factor")]
    pub factor: f64,
    /// Epochs without improvement tolerated before the lr is reduced.
    #[serde(default = "d_patience")]
    pub patience: i64,
    /// How much better than the best a metric must be to count as an improvement.
    #[serde(default = "d_threshold")]
    pub threshold: f64,
    /// `"rel"`: `best · (1 ∓ threshold)`; `"abs"`: `best ∓ threshold`.
    #[serde(default = "d_rel")]
    pub threshold_mode: String,
    /// Epochs to wait after a reduction before counting bad epochs again.
    #[serde(default)]
    pub cooldown: i64,
    /// Lower bound of the lr, for all groups or per group.
    #[serde(default = "d_min_lr")]
    pub min_lr: PerGroup,
    /// A reduction smaller than this is skipped.
    #[serde(default = "d_eps")]
    pub eps: f64,
}

builders!(ReduceLROnPlateauConfig {
    mode: impl Into<String>,
    factor: f64,
    patience: i64,
    threshold: f64,
    threshold_mode: impl Into<String>,
    cooldown: i64,
    min_lr: impl Into<PerGroup>,
    eps: f64,
});

impl Default for ReduceLROnPlateauConfig {
    fn default() -> Self {
        ReduceLROnPlateauConfig {
            mode: d_min(),
            factor: 0.1,
            patience: 10,
            threshold: 1e-4,
            threshold_mode: d_rel(),
            cooldown: 0,
            min_lr: d_min_lr(),
            eps: 1e-8,
        }
    }
}

impl ReduceLROnPlateauConfig {
    /// torch's defaults (the same as `Default::default()`): every option has one.
    pub fn new() -> Self {
        Self::default()
    }
}

impl ReduceLROnPlateauConfig {
    /// torch's checks, in torch's order; returns `min_lrs` and `default_min_lr`.
    fn check(&self, n: usize) -> Result<(Vec<f64>, Option<f64>)> {
        // `!(f < 1)` also rejects NaN, which torch's `f >= 1.0` lets through.
        if self.factor.is_nan() || self.factor >= 1.0 {
            return Err(invalid("Factor should be < 1.0."));
        }
        let (min_lrs, default) = match &self.min_lr {
            PerGroup::Each(v) => {
                if v.len() != n {
                    return Err(invalid(format!("expected {n} min_lrs, got {}", v.len())));
                }
                (v.clone(), None)
            }
            PerGroup::All(x) => (vec![*x; n], Some(*x)),
        };
        for &m in &min_lrs {
            finite("min_lr", m)?;
        }
        self.check_modes()?;
        finite("factor", self.factor)?;
        finite("threshold", self.threshold)?;
        finite("eps", self.eps)?;
        Ok((min_lrs, default))
    }

    fn check_modes(&self) -> Result<()> {
        if !["min", "max"].contains(&self.mode.as_str()) {
            return Err(invalid(format!("mode {} is unknown!", self.mode)));
        }
        if !["rel", "abs"].contains(&self.threshold_mode.as_str()) {
            return Err(invalid(format!(
                "threshold mode {} is unknown!",
                self.threshold_mode
            )));
        }
        Ok(())
    }

    fn mode_worse(&self) -> f64 {
        if self.mode == "min" {
            f64::INFINITY
        } else {
            f64::NEG_INFINITY
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PlateauState {
    config: ReduceLROnPlateauConfig,
    last_epoch: i64,
    #[serde(rename = "_last_lr")]
    last_lr: Vec<f64>,
    min_lrs: Vec<f64>,
    default_min_lr: Option<f64>,
    #[serde(with = "float_or_inf")]
    best: f64,
    num_bad_epochs: i64,
    cooldown_counter: i64,
}

/// torch's `ReduceLROnPlateau`: when the metric passed to
/// [`LrScheduler::step_metric`] has not improved for more than `patience` epochs, every
/// group's lr is multiplied by `factor` (not below `min_lr`, and only if it moves by more
/// than `eps`), then `cooldown` epochs pass before bad epochs count again.
///
/// ```text
/// better(a):  min/rel a < best·(1 − threshold)    min/abs a < best − threshold
///             max/rel a > best·(1 + threshold)    max/abs a > best + threshold
/// reduce:     lr ← max(lr · factor, min_lr)       if lr − that > eps
/// ```
///
/// It has no initial step and does not touch `initial_lr`, as in torch; [`SequentialLR`]
/// and [`ChainedScheduler`] refuse it.
///
/// [`SequentialLR`]: super::SequentialLR
/// [`ChainedScheduler`]: super::ChainedScheduler
#[derive(Debug)]
pub struct ReduceLROnPlateau {
    state: PlateauState,
}

impl ReduceLROnPlateau {
    /// torch's `ReduceLROnPlateau(optimizer, mode='min', factor=0.1, patience=10, ...)`.
    pub fn new(opt: &mut dyn GroupHyperparams, config: ReduceLROnPlateauConfig) -> Result<Self> {
        let (min_lrs, default_min_lr) = config.check(opt.num_groups())?;
        Ok(ReduceLROnPlateau {
            state: PlateauState {
                last_epoch: 0,
                last_lr: group_lrs(opt)?,
                min_lrs,
                default_min_lr,
                best: config.mode_worse(),
                num_bad_epochs: 0,
                cooldown_counter: 0,
                config,
            },
        })
    }

    /// The options.
    pub fn config(&self) -> &ReduceLROnPlateauConfig {
        &self.state.config
    }

    /// The best metric seen (torch's `best`).
    pub fn best(&self) -> f64 {
        self.state.best
    }

    /// Bad epochs counted since the last improvement or reduction (torch's `num_bad_epochs`).
    pub fn num_bad_epochs(&self) -> i64 {
        self.state.num_bad_epochs
    }

    /// Whether the scheduler is cooling down after a reduction (torch's `in_cooldown`).
    pub fn in_cooldown(&self) -> bool {
        self.state.cooldown_counter > 0
    }

    fn is_better(&self, a: f64, best: f64) -> bool {
        let c = &self.state.config;
        match (c.mode.as_str(), c.threshold_mode.as_str()) {
            ("min", "rel") => a < best * (1.0 - c.threshold),
            ("min", _) => a < best - c.threshold,
            (_, "rel") => a > best * (c.threshold + 1.0),
            _ => a > best + c.threshold,
        }
    }

    /// torch's `step(metrics)`.
    fn raw_metric_step(&mut self, opt: &mut dyn GroupHyperparams, current: f64) -> Result<()> {
        self.state.last_epoch += 1;
        if self.is_better(current, self.state.best) {
            self.state.best = current;
            self.state.num_bad_epochs = 0;
        } else {
            self.state.num_bad_epochs += 1;
        }
        if self.state.cooldown_counter > 0 {
            self.state.cooldown_counter -= 1;
            self.state.num_bad_epochs = 0;
        }
        if self.state.num_bad_epochs > self.state.config.patience {
            self.reduce_lr(opt)?;
            self.state.cooldown_counter = self.state.config.cooldown;
            self.state.num_bad_epochs = 0;
        }
        self.state.last_lr = group_lrs(opt)?;
        Ok(())
    }

    /// torch's `_reduce_lr`.
    fn reduce_lr(&mut self, opt: &mut dyn GroupHyperparams) -> Result<()> {
        let n = opt.num_groups();
        if n != self.state.min_lrs.len() {
            match self.state.default_min_lr {
                None => {
                    return Err(Error::Scheduler(format!(
                        "The number of param groups in the `optimizer` ({n}) differs from when \
                         `ReduceLROnPlateau` was initialized ({}), usually due to a new param \
                         group being added to the optimizer. Please modify the `min_lrs` field \
                         to match the length of the `optimizer` param groups.",
                        self.state.min_lrs.len()
                    )))
                }
                Some(d) => self.state.min_lrs = vec![d; n],
            }
        }
        for g in 0..n {
            let old_lr = opt.lr(g)?;
            let new_lr = py_max(old_lr * self.state.config.factor, self.state.min_lrs[g]);
            if old_lr - new_lr > self.state.config.eps {
                opt.set_lr(g, new_lr)?;
            }
        }
        Ok(())
    }
}

impl LrScheduler for ReduceLROnPlateau {
    fn name(&self) -> &'static str {
        "ReduceLROnPlateau"
    }
    fn get_last_lr(&self) -> &[f64] {
        &self.state.last_lr
    }
    fn last_epoch(&self) -> Option<i64> {
        Some(self.state.last_epoch)
    }
    fn base_lrs(&self) -> Option<&[f64]> {
        None
    }
    fn step_metric(&mut self, opt: &mut dyn GroupHyperparams, metric: f64) -> Result<()> {
        guarded(self, opt, |s, o| s.raw_metric_step(o, metric))
    }
    fn state_dict(&self) -> Result<Value> {
        let mut v = serde_json::to_value(&self.state)?;
        if let Value::Object(m) = &mut v {
            m.insert("scheduler".into(), Value::String(self.name().into()));
            m.insert("format".into(), Value::from(SCHEDULER_STATE_FORMAT));
        }
        Ok(v)
    }
}

impl Protocol for ReduceLROnPlateau {
    fn raw_step(&mut self, _opt: &mut dyn GroupHyperparams, _epoch: Option<f64>) -> Result<()> {
        Err(Error::Scheduler(
            "ReduceLROnPlateau.step() missing 1 required positional argument: 'metrics' (call \
             step_metric(optimizer, metric))"
                .into(),
        ))
    }
    fn raw_initial_step(&mut self, _opt: &mut dyn GroupHyperparams) -> Result<()> {
        Ok(())
    }
    fn raw_update_lr(&mut self, opt: &mut dyn GroupHyperparams, _epoch: i64) -> Result<()> {
        self.raw_step(opt, None)
    }
    fn raw_undo(&mut self) {
        self.state.last_epoch -= 1;
    }
    fn raw_load(&mut self, state: &Value) -> Result<()> {
        check_saved(self.name(), state)?;
        let st: PlateauState = serde_json::from_value(state.clone())
            .map_err(|e| Error::StateDict(format!("ReduceLROnPlateau: {e}")))?;
        let fail = |e: Error| Error::StateDict(format!("ReduceLROnPlateau: {e}"));
        st.config.check(st.min_lrs.len()).map_err(fail)?;
        if st.best.is_nan() || st.last_lr.iter().any(|x| !x.is_finite()) {
            return Err(fail(invalid("best and _last_lr must be numbers")));
        }
        self.state = st;
        Ok(())
    }
    fn raw_apply(&self, opt: &mut dyn GroupHyperparams) -> Result<()> {
        apply(opt, &self.state.last_lr, None)
    }
    fn raw_num_groups(&self) -> usize {
        self.state.last_lr.len()
    }
    fn raw_needs_metric(&self) -> bool {
        true
    }
    fn raw_touches_momentum(&self) -> bool {
        false
    }
    fn raw_snapshot(&self) -> Snapshot {
        Snapshot::of(&self.state)
    }
    fn raw_restore(&mut self, snapshot: Snapshot) {
        match snapshot.into_state::<PlateauState>() {
            Some(st) => self.state = st,
            None => debug_assert!(false, "a snapshot of another scheduler"),
        }
    }
}
