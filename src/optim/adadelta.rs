//! Adadelta, torch's `torch.optim.Adadelta`.

use crate::error::{Error, Result};
use crate::float::Float;
use crate::hyper::{check, hyperparams};
use crate::kernels::adadelta::{self as kernel, AdadeltaCoeffs};
use crate::kernels::Pass;
use crate::optimizer::{Algorithm, KernelArgs, Optimizer};

hyperparams! {
    /// Hyperparameters of [`Adadelta`], with torch's names and defaults.
    pub struct AdadeltaConfig for "Adadelta" {
        /// Coefficient that scales the computed delta before it is applied.
        lr: f64 = 1.0,
        /// Decay rate of the running averages of squared gradients and squared deltas.
        rho: f64 = 0.9,
        /// Added inside both square roots.
        eps: f64 = 1e-6,
        /// Weight decay (L2 penalty).
        weight_decay: f64 = 0.0,
        /// Maximize the objective instead of minimizing.
        maximize: bool = false,
    }
}

impl AdadeltaConfig {
    fn check(&self) -> Result<()> {
        check::lr(self.lr)?;
        if !(0.0..=1.0).contains(&self.rho) {
            return Err(Error::InvalidHyperparameter(format!(
                "Invalid rho value: {:?}",
                self.rho
            )));
        }
        check::eps(self.eps)?;
        check::weight_decay(self.weight_decay)?;
        check::finite("lr", self.lr)?;
        check::finite("eps", self.eps)?;
        check::finite("weight_decay", self.weight_decay)
    }
}

/// The Adadelta algorithm (see [`Adadelta`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct AdadeltaAlgorithm;

/// Adadelta (torch's `Adadelta`).
///
/// With `g` the gradient (negated when `maximize`), `ρ` the decay rate, `γ` the learning rate:
///
/// ```text
/// g ← g + λθ                        (if λ ≠ 0)
/// v ← ρv + (1−ρ)g²                  (square_avg)
/// Δ = sqrt(u + ε) / sqrt(v + ε) · g
/// u ← ρu + (1−ρ)Δ²                  (acc_delta)
/// θ ← θ − γΔ
/// ```
///
/// Zeiler, "ADADELTA: An Adaptive Learning Rate Method" (arXiv:1212.5701, 2012).
/// State: `step` (counted, as torch does, though the update does not use it), `square_avg`,
/// `acc_delta`.
pub type Adadelta<T> = Optimizer<T, AdadeltaAlgorithm>;

impl Algorithm for AdadeltaAlgorithm {
    const NAME: &'static str = "Adadelta";
    type Config = AdadeltaConfig;
    type Scalars = ();
    type Coeffs = AdadeltaCoeffs;

    fn buffers(_: &AdadeltaConfig) -> &'static [&'static str] {
        &["square_avg", "acc_delta"]
    }

    fn prepare(c: &AdadeltaConfig, _step: u64, _: &mut ()) -> AdadeltaCoeffs {
        AdadeltaCoeffs {
            lr: c.lr,
            rho: c.rho,
            eps: c.eps,
            weight_decay: c.weight_decay,
            maximize: c.maximize,
        }
    }

    fn fused<T: Float>(a: &KernelArgs<AdadeltaCoeffs>, p: &mut [T], g: &[T], b: &mut [&mut [T]]) {
        kernel::fused(a.simd, &a.coeffs, a.grad_scale, p, g, b)
    }

    const MIXED_PRECISION: bool = true;

    fn fused_pass<T: Float, P: Pass<T>>(a: &KernelArgs<AdadeltaCoeffs>, pass: P) {
        kernel::run(&a.coeffs, a.grad_scale, pass)
    }

    fn reference<T: Float>(
        a: &KernelArgs<AdadeltaCoeffs>,
        p: &mut [T],
        g: &[T],
        b: &mut [&mut [T]],
    ) {
        kernel::reference(&a.coeffs, a.grad_scale, p, g, b)
    }
}
