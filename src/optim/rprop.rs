//! Rprop, torch's `torch.optim.Rprop`.

use crate::error::{Error, Result};
use crate::float::Float;
use crate::hyper::{check, hyperparams};
use crate::kernels::rprop::{self as kernel, RpropCoeffs};
use crate::kernels::Pass;
use crate::optimizer::{Algorithm, KernelArgs, Optimizer};

hyperparams! {
    /// Hyperparameters of [`Rprop`], with torch's names and defaults.
    pub struct RpropConfig for "Rprop" {
        /// Learning rate: the initial step size of every element.
        lr: f64 = 1e-2,
        /// `(etaminus, etaplus)`: the factors a step size is multiplied by when the gradient's
        /// sign flips, and when it keeps its sign.
        etas: (f64, f64) = (0.5, 1.2),
        /// `(min, max)`: the bounds every step size is clamped to.
        step_sizes: (f64, f64) = (1e-6, 50.0),
        /// Maximize the objective instead of minimizing.
        maximize: bool = false,
    }
}

impl RpropConfig {
    fn check(&self) -> Result<()> {
        check::lr(self.lr)?;
        let (etaminus, etaplus) = self.etas;
        // torch: `if not 0.0 < etas[0] < 1.0 < etas[1]` (NaN fails it too).
        if !(0.0 < etaminus && etaminus < 1.0 && 1.0 < etaplus) {
            return Err(Error::InvalidHyperparameter(format!(
                "Invalid eta values: {etaminus:?}, {etaplus:?}"
            )));
        }
        check::finite("lr", self.lr)?;
        // torch has no check; NaN bounds would make every step size NaN. Infinite ones are
        // meaningful (no bound).
        let (min, max) = self.step_sizes;
        if min.is_nan() || max.is_nan() {
            return Err(Error::InvalidHyperparameter(format!(
                "Invalid step_sizes value: ({min:?}, {max:?})"
            )));
        }
        Ok(())
    }
}

/// The Rprop algorithm (see [`Rprop`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct RpropAlgorithm;

/// Rprop (torch's `Rprop`): every element has its own step size, adapted from the sign of
/// successive gradients only; the gradient's magnitude is never used.
///
/// With `g` the gradient (negated when `maximize`), `g′` the previous step's (stored, zeroed
/// where its sign flipped), `η⁻, η⁺ = etas` and step sizes `Δ` (starting at `lr`):
///
/// ```text
/// s = sign(g · g′)
/// Δ ← clamp(Δ · (η⁺ if s > 0, η⁻ if s < 0, 1 if s = 0), step_sizes.0, step_sizes.1)
/// g ← 0 where s < 0                       (the sign flipped: skip this element's step)
/// θ ← θ − sign(g) · Δ
/// g′ ← g                                  (prev)
/// ```
///
/// Riedmiller & Braun, "A Direct Adaptive Method for Faster Backpropagation Learning: The RPROP
/// Algorithm" (IEEE ICNN 1993). Meant for full-batch training: mini-batch noise flips signs.
/// State: `step`, `prev`, `step_size`.
pub type Rprop<T> = Optimizer<T, RpropAlgorithm>;

impl Algorithm for RpropAlgorithm {
    const NAME: &'static str = "Rprop";
    /// The update follows the sign of `grad · prev`; for gradients below about 1e-19 (f32)
    /// that product is subnormal, and flushing it would zero the sign and skip the step-size
    /// change torch makes.
    const NEEDS_SUBNORMALS: bool = true;
    type Config = RpropConfig;
    type Scalars = ();
    type Coeffs = RpropCoeffs;

    fn buffers(_: &RpropConfig) -> &'static [&'static str] {
        &["prev", "step_size"]
    }

    /// `prev` starts at zero, `step_size` at the group's `lr` (torch's
    /// `torch.full_like(grad, lr)`).
    fn buffer_init(c: &RpropConfig, index: usize) -> f64 {
        if index == 1 {
            c.lr
        } else {
            0.0
        }
    }

    fn prepare(c: &RpropConfig, _step: u64, _: &mut ()) -> RpropCoeffs {
        RpropCoeffs {
            etaminus: c.etas.0,
            etaplus: c.etas.1,
            step_size_min: c.step_sizes.0,
            step_size_max: c.step_sizes.1,
            maximize: c.maximize,
        }
    }

    fn fused<T: Float>(a: &KernelArgs<RpropCoeffs>, p: &mut [T], g: &[T], b: &mut [&mut [T]]) {
        kernel::fused(a.simd, &a.coeffs, a.grad_scale, p, g, b)
    }

    const MIXED_PRECISION: bool = true;

    fn fused_pass<T: Float, P: Pass<T>>(a: &KernelArgs<RpropCoeffs>, pass: P) {
        kernel::run(&a.coeffs, a.grad_scale, pass)
    }

    fn reference<T: Float>(a: &KernelArgs<RpropCoeffs>, p: &mut [T], g: &[T], b: &mut [&mut [T]]) {
        kernel::reference(&a.coeffs, a.grad_scale, p, g, b)
    }
}
