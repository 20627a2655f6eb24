//! Adamax, torch's `torch.optim.Adamax`.

use crate::error::Result;
use crate::float::Float;
use crate::hyper::{check, hyperparams};
use crate::kernels::adamax::{self as kernel, AdamaxCoeffs};
use crate::kernels::Pass;
use crate::optimizer::{Algorithm, KernelArgs, Optimizer};

hyperparams! {
    /// Hyperparameters of [`Adamax`], with torch's names and defaults.
    pub struct AdamaxConfig for "Adamax" {
        /// Learning rate.
        lr: f64 = 2e-3,
        /// Decay rates of the first moment average and of the infinity norm.
        betas: (f64, f64) = (0.9, 0.999),
        /// Added to `|g|` inside the infinity norm.
        eps: f64 = 1e-8,
        /// Weight decay (L2 penalty).
        weight_decay: f64 = 0.0,
        /// Maximize the objective instead of minimizing.
        maximize: bool = false,
    }
}

impl AdamaxConfig {
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

/// The Adamax algorithm (see [`Adamax`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct AdamaxAlgorithm;

/// Adamax: Adam with the infinity norm in place of the second moment (torch's `Adamax`).
///
/// With `g` the gradient (negated when `maximize`), step `t`, learning rate `γ`:
///
/// ```text
/// g ← g + λθ                  (if λ ≠ 0)
/// m ← β₁m + (1−β₁)g           (torch: m.lerp_(g, 1−β₁))
/// u ← max(β₂u, |g| + ε)       (torch.maximum: NaN propagates)
/// θ ← θ − γ/(1−β₁ᵗ) · m/u
/// ```
///
/// Kingma & Ba, "Adam: A Method for Stochastic Optimization" (ICLR 2015), section 7.1.
/// State: `step`, `exp_avg`, `exp_inf`.
pub type Adamax<T> = Optimizer<T, AdamaxAlgorithm>;

impl Algorithm for AdamaxAlgorithm {
    const NAME: &'static str = "Adamax";
    type Config = AdamaxConfig;
    type Scalars = ();
    type Coeffs = AdamaxCoeffs;

    fn buffers(_: &AdamaxConfig) -> &'static [&'static str] {
        &["exp_avg", "exp_inf"]
    }

    fn prepare(c: &AdamaxConfig, step: u64, _: &mut ()) -> AdamaxCoeffs {
        AdamaxCoeffs::new(c.lr, c.betas, c.eps, c.weight_decay, c.maximize, step)
    }

    fn fused<T: Float>(a: &KernelArgs<AdamaxCoeffs>, p: &mut [T], g: &[T], b: &mut [&mut [T]]) {
        kernel::fused(a.simd, &a.coeffs, a.grad_scale, p, g, b)
    }

    const MIXED_PRECISION: bool = true;

    fn fused_pass<T: Float, P: Pass<T>>(a: &KernelArgs<AdamaxCoeffs>, pass: P) {
        kernel::run(&a.coeffs, a.grad_scale, pass)
    }

    fn reference<T: Float>(a: &KernelArgs<AdamaxCoeffs>, p: &mut [T], g: &[T], b: &mut [&mut [T]]) {
        kernel::reference(&a.coeffs, a.grad_scale, p, g, b)
    }
}
