//! Dynamic loss scaling, as `torch.amp.GradScaler` does it, with the unscale folded into the
//! fused step.
//!
//! The loop: multiply the loss by [`GradScaler::scale`] before the backward pass (so the
//! gradients in the arena are scaled), then call [`GradScaler::step`]. It checks every gradient
//! for NaN and infinity; if one is found the step is skipped and nothing changes, otherwise the
//! optimizer steps with the gradients multiplied by `1/scale` inside its fused update. Then
//! [`GradScaler::update`] backs the scale off after a skipped step and grows it after
//! `growth_interval` applied steps in a row.

use serde::{Deserialize, Serialize};

use crate::arena::Arena;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::mixed::{HalfBuffer, Storage};
use crate::optimizer::{Algorithm, ClipNorm, Optimizer, StepOptions, StepOutcome, StepReport};

/// Anything that takes a step with [`StepOptions`]: an [`Optimizer`], and the distributed
/// wrappers ([`crate::distributed::ShardedOptimizer`], a
/// [`crate::distributed::DataParallel`] over its optimizer), so one [`GradScaler`] drives
/// them all.
pub trait StepWithOptions<T: Float> {
    /// One step with `options` (see [`Optimizer::step_with_options`]).
    fn step_with_options(
        &mut self,
        arena: &mut Arena<T>,
        options: StepOptions,
    ) -> Result<StepReport>;
}

impl<T: Float, A: Algorithm> StepWithOptions<T> for Optimizer<T, A> {
    fn step_with_options(
        &mut self,
        arena: &mut Arena<T>,
        options: StepOptions,
    ) -> Result<StepReport> {
        Optimizer::step_with_options(self, arena, options)
    }
}

/// torch's `GradScaler` settings and state (serde round-trips both).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GradScaler {
    scale: f64,
    growth_factor: f64,
    backoff_factor: f64,
    growth_interval: u64,
    growth_tracker: u64,
    /// Whether the last `step` found a non-finite gradient (None before any step since the
    /// last update).
    found_inf: Option<bool>,
}

impl Default for GradScaler {
    /// torch's defaults: `init_scale = 2**16`, `growth_factor = 2`, `backoff_factor = 0.5`,
    /// `growth_interval = 2000`.
    fn default() -> Self {
        GradScaler {
            scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            growth_tracker: 0,
            found_inf: None,
        }
    }
}

impl GradScaler {
    /// A scaler with torch's checks: `growth_factor > 1`, `0 < backoff_factor < 1`,
    /// `growth_interval > 0`, a positive finite `init_scale`.
    pub fn new(
        init_scale: f64,
        growth_factor: f64,
        backoff_factor: f64,
        growth_interval: u64,
    ) -> Result<Self> {
        let bad = |m: &str| Err(Error::InvalidHyperparameter(m.to_string()));
        if !(init_scale.is_finite() && init_scale > 0.0) {
            return bad("init_scale must be a positive finite number");
        }
        if growth_factor.is_nan() || growth_factor <= 1.0 {
            return bad("The growth factor must be > 1.0.");
        }
        if backoff_factor.is_nan() || backoff_factor >= 1.0 || backoff_factor <= 0.0 {
            return bad("The backoff factor must be < 1.0.");
        }
        if growth_interval == 0 {
            return bad("growth_interval must be a positive integer");
        }
        Ok(GradScaler {
            scale: init_scale,
            growth_factor,
            backoff_factor,
            growth_interval,
            growth_tracker: 0,
            found_inf: None,
        })
    }

    /// Checks a scaler's values as [`GradScaler::new`] checks its options (a loaded state).
    pub(crate) fn validate(&self) -> Result<()> {
        GradScaler::new(
            self.scale,
            self.growth_factor,
            self.backoff_factor,
            self.growth_interval,
        )?;
        if self.growth_tracker >= self.growth_interval {
            return Err(Error::InvalidHyperparameter(format!(
                "growth tracker {} is not below growth_interval {}",
                self.growth_tracker, self.growth_interval
            )));
        }
        Ok(())
    }

    /// The current scale: multiply the loss (or the gradients) by it.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Steps `opt` with the gradients unscaled inside the update, unless a gradient is
    /// non-finite, in which case nothing changes and the step is reported skipped.
    pub fn step<T: Float, O: StepWithOptions<T> + ?Sized>(
        &mut self,
        opt: &mut O,
        arena: &mut Arena<T>,
    ) -> Result<StepOutcome> {
        Ok(self.step_inner(opt, arena, None)?.outcome)
    }

    /// As [`GradScaler::step`], also clipping the unscaled gradients by total norm (torch's
    /// `scaler.unscale_(opt); clip_grad_norm_(...); scaler.step(opt)`), all in the fused pass.
    /// Returns the report, whose `total_norm` is the unscaled gradients' norm.
    pub fn step_clipped<T: Float, O: StepWithOptions<T> + ?Sized>(
        &mut self,
        opt: &mut O,
        arena: &mut Arena<T>,
        clip: ClipNorm,
    ) -> Result<StepReport> {
        self.step_inner(opt, arena, Some(clip))
    }

    /// [`GradScaler::step`] (with an optional folded clip) for a mixed-precision step
    /// ([`Optimizer::step_mixed`]): `grads` hold the scaled half-precision (typically f16)
    /// gradients; they are checked for NaN and infinity first (the step is skipped whole if one
    /// is found), and unscaled by `1/scale` inside the fused pass that also writes `copy`.
    pub fn step_mixed<A: Algorithm, G: Storage, H: Storage>(
        &mut self,
        opt: &mut Optimizer<f32, A>,
        arena: &mut Arena<f32>,
        grads: &HalfBuffer<G>,
        copy: &mut HalfBuffer<H>,
        clip: Option<ClipNorm>,
    ) -> Result<StepReport> {
        let inv_scale = (1.0 / self.scale) as f32 as f64;
        let report = opt.step_mixed(
            arena,
            grads,
            copy,
            StepOptions {
                grad_scale: inv_scale,
                skip_non_finite: true,
                clip,
            },
        )?;
        self.found_inf = Some(report.outcome == StepOutcome::SkippedNonFinite);
        Ok(report)
    }

    fn step_inner<T: Float, O: StepWithOptions<T> + ?Sized>(
        &mut self,
        opt: &mut O,
        arena: &mut Arena<T>,
        clip: Option<ClipNorm>,
    ) -> Result<StepReport> {
        // torch computes inv_scale in f64 and rounds it to f32.
        let inv_scale = (1.0 / self.scale) as f32 as f64;
        let report = opt.step_with_options(
            arena,
            StepOptions {
                grad_scale: inv_scale,
                skip_non_finite: true,
                clip,
            },
        )?;
        self.found_inf = Some(report.outcome == StepOutcome::SkippedNonFinite);
        Ok(report)
    }

    /// Updates the scale after a step (torch's `update()`): backoff after a skipped step,
    /// growth after `growth_interval` applied steps in a row.
    pub fn update(&mut self) {
        match self.found_inf.take() {
            Some(true) => {
                self.scale *= self.backoff_factor;
                self.growth_tracker = 0;
            }
            Some(false) => {
                self.growth_tracker += 1;
                if self.growth_tracker == self.growth_interval {
                    let grown = self.scale * self.growth_factor;
                    if grown.is_finite() {
                        self.scale = grown;
                    }
                    self.growth_tracker = 0;
                }
            }
            None => {}
        }
    }

    /// Steps since the last backoff or growth.
    pub fn growth_tracker(&self) -> u64 {
        self.growth_tracker
    }
}
