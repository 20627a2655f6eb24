//! Rectified Adam, torch's `torch.optim.RAdam`.

use crate::error::Result;
use crate::float::Float;
use crate::hyper::{check, hyperparams};
use crate::kernels::radam::{self as kernel, RAdamCoeffs};
use crate::kernels::Pass;
use crate::optimizer::{Algorithm, KernelArgs, Optimizer};

hyperparams! {
    /// Hyperparameters of [`RAdam`], with torch's names and defaults.
    pub struct RAdamConfig for "RAdam" {
        /// Learning rate.
        lr: f64 = 1e-3,
        /// Decay rates of the first and second moment averages.
        betas: (f64, f64) = (0.9, 0.999),
        /// Added to the denominator.
        eps: f64 = 1e-8,
        /// Weight decay factor.
        weight_decay: f64 = 0.0,
        /// Decoupled (AdamW-style) weight decay instead of an L2 term in the gradient.
        decoupled_weight_decay: bool = false,
        /// Maximize the objective instead of minimizing.
        maximize: bool = false,
    }
}

impl RAdamConfig {
    fn check(&self) -> Result<()> {
        check::lr(self.lr)?;
        check::eps(self.eps)?;
        check::betas(self.betas)?;
        check::weight_decay(self.weight_decay)?;
        check::finite("lr", self.lr)?;
        check::finite("eps", self.eps)?;
        check::finite("weight_decay", self.weight_decay)
    }
}

/// The RAdam algorithm (see [`RAdam`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct RAdamAlgorithm;

/// Rectified Adam (torch's `RAdam`).
///
/// Adam's moments, with the adaptive step used only once the variance of the adaptive learning
/// rate is tractable. With `ρ∞ = 2/(1−β₂) − 1` and
/// `ρ_t = ρ∞ − 2tβ₂ᵗ/(1−β₂ᵗ)`:
///
/// ```text
/// m ← β₁m + (1−β₁)g,   v ← β₂v + (1−β₂)g²,   m̂ = m/(1−β₁ᵗ)
/// if ρ_t > 5:  r = sqrt((ρ_t−4)(ρ_t−2)ρ∞ / ((ρ∞−4)(ρ∞−2)ρ_t))
///              θ ← θ − γ m̂ · sqrt(1−β₂ᵗ)/(sqrt(v)+ε) · r
/// else:        θ ← θ − γ m̂
/// ```
///
/// Weight decay is added to the gradient, or with `decoupled_weight_decay` applied as
/// `θ ← θ(1 − γλ)` first. Liu et al., "On the Variance of the Adaptive Learning Rate and
/// Beyond" (ICLR 2020). State: `step`, `exp_avg`, `exp_avg_sq`.
pub type RAdam<T> = Optimizer<T, RAdamAlgorithm>;

impl Algorithm for RAdamAlgorithm {
    const NAME: &'static str = "RAdam";
    type Config = RAdamConfig;
    type Scalars = ();
    type Coeffs = RAdamCoeffs;

    fn buffers(_: &RAdamConfig) -> &'static [&'static str] {
        &["exp_avg", "exp_avg_sq"]
    }

    fn prepare(c: &RAdamConfig, step: u64, _: &mut ()) -> RAdamCoeffs {
        RAdamCoeffs::new(
            c.lr,
            c.betas,
            c.eps,
            c.weight_decay,
            c.decoupled_weight_decay,
            c.maximize,
            step,
        )
    }

    fn fused<T: Float>(a: &KernelArgs<RAdamCoeffs>, p: &mut [T], g: &[T], b: &mut [&mut [T]]) {
        kernel::fused(a.simd, &a.coeffs, a.grad_scale, p, g, b)
    }

    const MIXED_PRECISION: bool = true;

    fn fused_pass<T: Float, P: Pass<T>>(a: &KernelArgs<RAdamCoeffs>, pass: P) {
        kernel::run(&a.coeffs, a.grad_scale, pass)
    }

    fn reference<T: Float>(a: &KernelArgs<RAdamCoeffs>, p: &mut [T], g: &[T], b: &mut [&mut [T]]) {
        kernel::reference(&a.coeffs, a.grad_scale, p, g, b)
    }
}
