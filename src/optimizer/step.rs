//! The f32/f64 steps: [`Optimizer::step`], its options entry point and the scalar reference step.

use super::{Algorithm, ClipNorm, Optimizer};
use crate::arena::Arena;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::hyper::Hyperparams;
use crate::parallel::Exec;

/// What a checked step found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    /// The update was applied.
    Applied,
    /// A gradient was NaN or infinite; nothing changed (parameters, state, step counts).
    SkippedNonFinite,
}

/// Options of one step beyond the plain update, given to [`Optimizer::step_with_options`]:
/// gradient scaling (an unscale factor, micro-batch averaging), the non-finite guard and a
/// clip by total norm, all folded into the one fused pass. They compose as values:
///
/// ```
/// use optarena::{Adam, AdamConfig, ArenaBuilder, ClipNorm, ParamGroup, StepOptions};
/// let mut b = ArenaBuilder::<f32>::new();
/// let w = b.param("w", &[2], &[1.0, -1.0])?;
/// let mut arena = b.build();
/// let mut opt = Adam::new(&arena, [ParamGroup::all()], AdamConfig::default())?;
/// // Four accumulated micro-batches, averaged, clipped to norm 1, skipped if not finite.
/// let options = StepOptions::new()
///     .accumulated(4)?
///     .clipped(ClipNorm::l2(1.0))
///     .skipping_non_finite();
/// arena.grad_mut(w).copy_from_slice(&[4.0, 8.0]);
/// let report = opt.step_with_options(&mut arena, options)?;
/// // The norm of the averaged gradients (1, 2).
/// assert!((report.total_norm.unwrap() - 5f64.sqrt()).abs() < 1e-6);
/// # Ok::<(), optarena::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOptions {
    /// Every gradient is multiplied by this inside the fused update (an unscale factor
    /// `1/scale`, or `1/k` for k accumulated micro-batches). Multiplying by 1 is exact.
    pub grad_scale: f64,
    /// Check every gradient for NaN and infinity first, and skip the whole step if one is
    /// found (torch's fused `found_inf`, and what a plain torch step lacks: one bad batch then
    /// poisons the weights).
    pub skip_non_finite: bool,
    /// Clip by total norm inside the step: the norm of the (scaled) gradients is computed
    /// first, then the clip coefficient is folded into the fused update. The gradients are
    /// read twice (norm, update) and never rewritten.
    pub clip: Option<ClipNorm>,
}

impl StepOptions {
    /// A plain step: gradients as they are, no guard, no clip (the same as `Default`).
    pub const fn new() -> Self {
        StepOptions {
            grad_scale: 1.0,
            skip_non_finite: false,
            clip: None,
        }
    }

    /// Also multiplies every gradient by `factor` inside the update (for example an unscale
    /// factor `1/scale`); factors compose by multiplication.
    pub fn scaled(mut self, factor: f64) -> Self {
        self.grad_scale *= factor;
        self
    }

    /// The gradients hold the sum of `k` micro-batch gradients (written with
    /// [`Arena::grad_mut`] without zeroing in between): the `1/k` averaging is folded into the
    /// update, as dividing each micro-batch's loss by `k` would. An error for `k = 0`.
    pub fn accumulated(self, k: usize) -> Result<Self> {
        if k == 0 {
            return Err(Error::InvalidMicroBatchCount { count: k });
        }
        Ok(self.scaled(1.0 / k as f64))
    }

    /// Skips the whole step, changing nothing (parameters, state, step counts), when any
    /// gradient holds NaN or infinity ([`StepOutcome::SkippedNonFinite`]).
    pub fn skipping_non_finite(mut self) -> Self {
        self.skip_non_finite = true;
        self
    }

    /// `clip_grad_norm_(params, max_norm, norm_type)` fused into the step: the norm of the
    /// (scaled) gradients is computed in one pass and the clip coefficient folded into the
    /// update, so the gradients are read twice and never rewritten; the report's
    /// `total_norm` is the norm before clipping. The numbers equal clip followed by step, bit
    /// for bit.
    pub fn clipped(mut self, clip: ClipNorm) -> Self {
        self.clip = Some(clip);
        self
    }

    /// Checks the options as a step does: a finite `grad_scale` and a `max_norm` that is not
    /// NaN.
    pub fn validate(&self) -> Result<()> {
        self.check_grad_scale()?;
        self.check_max_norm()
    }

    /// A finite `grad_scale` (checked first by every step).
    pub(crate) fn check_grad_scale(&self) -> Result<()> {
        if !self.grad_scale.is_finite() {
            return Err(Error::InvalidHyperparameter(format!(
                "Invalid grad_scale value: {:?}",
                self.grad_scale
            )));
        }
        Ok(())
    }

    /// A clip's `max_norm` that is not NaN (checked by a step after its non-finite guard).
    pub(crate) fn check_max_norm(&self) -> Result<()> {
        if let Some(clip) = self.clip {
            if clip.max_norm.is_nan() {
                return Err(Error::InvalidHyperparameter(
                    "Invalid max_norm value: NaN".to_string(),
                ));
            }
        }
        Ok(())
    }
}

impl Default for StepOptions {
    fn default() -> Self {
        StepOptions::new()
    }
}

/// What a step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Applied, or skipped for a non-finite gradient.
    pub outcome: StepOutcome,
    /// The total gradient norm (of the scaled gradients), when the step clipped.
    pub total_norm: Option<f64>,
    /// The factor the gradients were multiplied by in the update (scale times clip
    /// coefficient).
    pub grad_factor: f64,
}

impl<T: Float, A: Algorithm> Optimizer<T, A> {
    /// One optimization step over every group, as `optimizer.step()`.
    pub fn step(&mut self, arena: &mut Arena<T>) -> Result<()> {
        self.step_with_options(arena, StepOptions::default())
            .map(|_| ())
    }

    /// `optimizer.step(closure)`: calls `closure` (which recomputes the loss and writes the
    /// gradients), then steps, and returns the loss.
    #[deprecated(note = "call the closure, then `step`")]
    pub fn step_with<L>(
        &mut self,
        arena: &mut Arena<T>,
        closure: impl FnOnce(&mut Arena<T>) -> L,
    ) -> Result<L> {
        self.check_arena(arena)?;
        let loss = closure(arena);
        self.step(arena)?;
        Ok(loss)
    }

    /// A step that refuses NaN and infinite gradients: if any parameter's gradient holds one,
    /// nothing changes (parameters, state, step counts) and
    /// [`StepOutcome::SkippedNonFinite`] is returned.
    #[deprecated(note = "use `step_with_options(arena, StepOptions::new().skipping_non_finite())`")]
    pub fn step_checked(&mut self, arena: &mut Arena<T>) -> Result<StepOutcome> {
        let options = StepOptions::new().skipping_non_finite();
        Ok(self.step_with_options(arena, options)?.outcome)
    }

    /// `clip_grad_norm_(params, max_norm, norm_type)` then `step()`, fused: the norm over this
    /// optimizer's parameters is computed in one pass and the clip coefficient is folded into
    /// the update, so the gradients are read twice and never rewritten. Returns the total norm
    /// before clipping. The numbers equal clip followed by step, bit for bit.
    #[deprecated(note = "use `step_with_options(arena, StepOptions::new().clipped(clip))`")]
    pub fn step_clipped(&mut self, arena: &mut Arena<T>, clip: ClipNorm) -> Result<f64> {
        let options = StepOptions::new().clipped(clip);
        let report = self.step_with_options(arena, options)?;
        Ok(report.total_norm.unwrap_or(0.0))
    }

    /// A step after `k` accumulated micro-batches: the gradients hold the sum of `k`
    /// micro-batch gradients (write them with [`Arena::grad_mut`] without zeroing in between)
    /// and the `1/k` averaging is folded into the update.
    #[deprecated(note = "use `step_with_options(arena, StepOptions::new().accumulated(k)?)`")]
    pub fn step_accumulated(&mut self, arena: &mut Arena<T>, k: usize) -> Result<()> {
        let options = StepOptions::new().accumulated(k)?;
        self.step_with_options(arena, options).map(|_| ())
    }

    /// A step with gradient scaling, clipping and the non-finite guard folded into the fused
    /// update (see [`StepOptions`], whose builder methods compose them): the one entry point
    /// beside [`Optimizer::step`]. On an error nothing has changed.
    pub fn step_with_options(
        &mut self,
        arena: &mut Arena<T>,
        options: StepOptions,
    ) -> Result<StepReport> {
        self.check_arena(arena)?;
        self.check_full_state("step")?;
        self.drive_step(
            options,
            options.skip_non_finite && self.has_non_finite_grad(arena),
            |opt, exec| opt.run_step(arena, options, exec),
        )
    }

    /// The frame every step entry point shares (`step_with_options`, `step_mixed`,
    /// `step_half`): the grad-scale check, the non-finite skip (`skip`: the options ask for it
    /// and a present gradient is NaN or infinite), the pre-step hooks, the configs' and the max norm's
    /// validation, one [`Parallelism::run`] region for the numeric part `run` (which returns
    /// the factor the gradients were multiplied by and the total norm, if clipped), and the
    /// post-step hooks.
    pub(super) fn drive_step(
        &mut self,
        options: StepOptions,
        skip: bool,
        run: impl FnOnce(&mut Self, Exec) -> Result<(f64, Option<f64>)> + Send,
    ) -> Result<StepReport> {
        options.check_grad_scale()?;
        if skip {
            return Ok(StepReport {
                outcome: StepOutcome::SkippedNonFinite,
                total_norm: None,
                grad_factor: 0.0,
            });
        }
        self.run_hooks(true);
        for g in &self.groups {
            g.config.validate()?;
        }
        options.check_max_norm()?;
        // One decision and at most one pool hand-off for the whole step: the clip norm and the
        // update run inside it.
        let elems: usize = self.groups.iter().map(|g| g.len).sum();
        let parallelism = self.parallelism.clone();
        let subnormals = self.subnormals();
        let (grad_factor, total) =
            parallelism.run(elems, self.parallel_threshold, subnormals, |exec| {
                run(self, exec)
            })?;
        self.run_hooks(false);
        Ok(StepReport {
            outcome: StepOutcome::Applied,
            total_norm: total,
            grad_factor,
        })
    }

    /// The numeric part of a step, run by [`Parallelism::run`]: the folded clip's norm, then
    /// the plan and the fused update of every piece. Returns the factor the gradients were
    /// multiplied by and the total norm, if clipped.
    fn run_step(
        &mut self,
        arena: &mut Arena<T>,
        options: StepOptions,
        exec: Exec,
    ) -> Result<(f64, Option<f64>)> {
        let mut grad_factor = options.grad_scale;
        let mut total = None;
        if let Some(clip) = options.clip {
            self.norm_ranges.clear();
            self.norm_ranges
                .extend(self.groups.iter().flat_map(|g| g.runs.iter().cloned()));
            self.norm_scratch
                .plan(arena, &self.norm_ranges, clip.norm_type);
            let norm = self
                .norm_scratch
                .reduce(arena, clip.norm_type, self.simd, exec)
                * options.grad_scale.abs();
            grad_factor *= clip.coefficient_for(norm)?;
            total = Some(norm);
        }
        self.plan(arena, grad_factor);
        let work = std::mem::take(&mut self.work);
        let layout = &self.layout;
        exec.for_each(&work, |item| {
            // SAFETY: `plan` built every item from disjoint ranges of the arena and the state
            // buffers, and `arena` and `self.groups` stay mutably borrowed here until all
            // items have run.
            unsafe { item.run::<A>(layout, false) }
        });
        self.work = work;
        self.work.clear();
        Ok((grad_factor, total))
    }

    /// True when any parameter of any group has a gradient holding NaN or infinity.
    pub(super) fn has_non_finite_grad(&self, arena: &Arena<T>) -> bool {
        let flags = arena.grad_flags();
        let grads = arena.grads();
        self.groups.iter().any(|g| {
            g.params.iter().any(|&i| {
                flags[i] && crate::kernels::any_non_finite(&grads[self.layout[i].range()])
            })
        })
    }

    /// The first parameter of any group with a non-finite gradient, if any.
    pub fn find_non_finite_grad(&self, arena: &Arena<T>) -> Option<&str> {
        let flags = arena.grad_flags();
        let grads = arena.grads();
        self.groups
            .iter()
            .flat_map(|g| g.params.iter().copied())
            .find(|&i| flags[i] && crate::kernels::any_non_finite(&grads[self.layout[i].range()]))
            .map(|i| self.layout[i].name.as_str())
    }

    /// Runs the scalar reference kernels instead of the fused ones for one step. For tests:
    /// the result must equal [`Optimizer::step`]'s bit for bit.
    #[doc(hidden)]
    pub fn step_reference(&mut self, arena: &mut Arena<T>) -> Result<()> {
        self.check_arena(arena)?;
        self.check_full_state("step_reference")?;
        for g in &self.groups {
            g.config.validate()?;
        }
        self.plan(arena, 1.0);
        let work = std::mem::take(&mut self.work);
        let layout = &self.layout;
        // The same subnormal mode as the fused step, so the two agree bit for bit.
        self.subnormals().run(|| {
            for item in &work {
                // SAFETY: as in `step_with_options`; run sequentially here.
                unsafe { item.run::<A>(layout, true) }
            }
        });
        self.work = work;
        self.work.clear();
        Ok(())
    }
}
