//! Adam with Nesterov momentum, torch's `torch.optim.NAdam`.

use crate::error::Result;
use crate::float::Float;
use crate::hyper::{check, hyperparams};
use crate::kernels::nadam::{self as kernel, NAdamCoeffs};
use crate::kernels::Pass;
use crate::optimizer::{Algorithm, KernelArgs, Optimizer, ParamScalars};

hyperparams! {
    /// Hyperparameters of [`NAdam`], with torch's names and defaults.
    pub struct NAdamConfig for "NAdam" {
        /// Learning rate.
        lr: f64 = 2e-3,
        /// Decay rates of the first and second moment averages.
        betas: (f64, f64) = (0.9, 0.999),
        /// Added to the denominator for numerical stability.
        eps: f64 = 1e-8,
        /// Weight decay factor (an L2 term unless `decoupled_weight_decay`).
        weight_decay: f64 = 0.0,
        /// Momentum decay `ψ` of the momentum schedule `μ_t`.
        momentum_decay: f64 = 4e-3,
        /// Decay the weights directly, as AdamW does (torch's NAdamW).
        decoupled_weight_decay: bool = false,
        /// Maximize the objective instead of minimizing.
        maximize: bool = false,
    }
}

impl NAdamConfig {
    fn check(&self) -> Result<()> {
        check::lr(self.lr)?;
        check::eps(self.eps)?;
        check::betas(self.betas)?;
        check::weight_decay(self.weight_decay)?;
        check::non_negative("momentum_decay", self.momentum_decay)?;
        check::finite("lr", self.lr)?;
        check::finite("eps", self.eps)?;
        check::finite("weight_decay", self.weight_decay)?;
        check::finite("momentum_decay", self.momentum_decay)
    }
}

/// NAdam's per-parameter scalar state: torch's `state["mu_product"]`, the product of every
/// momentum coefficient `μ_1 ⋯ μ_t` so far.
///
/// torch keeps it in a 0-dim tensor of its scalar dtype (float32 unless the default dtype is
/// float64), and multiplies it in place by the Python float `μ_t` each step, which rounds the
/// product to f32 every time. optarena keeps exactly those f32 values, for f32 and f64
/// parameters alike, so long runs stay on torch's trajectory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NAdamScalars {
    /// `μ_1 ⋯ μ_t`, rounded to f32 after every multiplication as torch does.
    pub mu_product: f32,
}

impl Default for NAdamScalars {
    /// torch's initial `mu_product`: 1.
    fn default() -> Self {
        NAdamScalars { mu_product: 1.0 }
    }
}

impl ParamScalars for NAdamScalars {
    const NAMES: &'static [&'static str] = &["mu_product"];
    fn values(&self) -> Vec<f64> {
        vec![self.mu_product as f64]
    }
    /// A saved value is rounded to f32, as torch's `__setstate__` does when it wraps a plain
    /// number in a float32 tensor.
    fn from_values(values: &[f64]) -> Self {
        NAdamScalars {
            mu_product: values.first().map_or(1.0, |&v| v as f32),
        }
    }
}

/// The NAdam algorithm (see [`NAdam`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct NAdamAlgorithm;

/// NAdam: Adam with Nesterov momentum (torch's `NAdam`).
///
/// With `g` the gradient (negated when `maximize`), step `t`, learning rate `γ`, momentum
/// decay `ψ`:
///
/// ```text
/// g ← g + λθ                  (weight decay, coupled)   or   θ ← θ(1 − γλ)  (decoupled)
/// μ_t = β₁(1 − ½·0.96^(tψ)),   μ_{t+1} = β₁(1 − ½·0.96^((t+1)ψ))
/// Π ← Π·μ_t                   (mu_product, a float32 value as in torch; Π starts at 1)
/// m ← β₁m + (1−β₁)g           (torch: m.lerp_(g, 1−β₁))
/// v ← β₂v + (1−β₂)g²
/// d = sqrt(v / (1−β₂ᵗ)) + ε
/// θ ← θ − γ(1−μ_t)/(1−Π) · g/d − γμ_{t+1}/(1−Π·μ_{t+1}) · m/d
/// ```
///
/// `Π·μ_{t+1}` is computed in f64 from the f32 `Π`, as torch's `_get_value(mu_product) *
/// mu_next` does. Dozat, "Incorporating Nesterov Momentum into Adam" (ICLR 2016 workshop);
/// decoupled weight decay from Loshchilov & Hutter, "Decoupled Weight Decay Regularization"
/// (ICLR 2019). State: `step`, `mu_product`, `exp_avg`, `exp_avg_sq`.
pub type NAdam<T> = Optimizer<T, NAdamAlgorithm>;

impl Algorithm for NAdamAlgorithm {
    const NAME: &'static str = "NAdam";
    type Config = NAdamConfig;
    type Scalars = NAdamScalars;
    type Coeffs = NAdamCoeffs;

    fn buffers(_: &NAdamConfig) -> &'static [&'static str] {
        &["exp_avg", "exp_avg_sq"]
    }

    fn prepare(c: &NAdamConfig, step: u64, s: &mut NAdamScalars) -> NAdamCoeffs {
        // torch: `mu_product *= mu` on a float32 0-dim tensor: the Python float `mu` is
        // rounded to f32 and the product rounded to f32.
        let mu = NAdamCoeffs::mu(c.betas.0, c.momentum_decay, step as f64);
        s.mu_product *= mu as f32;
        NAdamCoeffs::new(
            c.lr,
            c.betas,
            c.eps,
            c.weight_decay,
            c.momentum_decay,
            c.decoupled_weight_decay,
            c.maximize,
            step,
            s.mu_product,
        )
    }

    fn fused<T: Float>(a: &KernelArgs<NAdamCoeffs>, p: &mut [T], g: &[T], b: &mut [&mut [T]]) {
        kernel::fused(a.simd, &a.coeffs, a.grad_scale, p, g, b)
    }

    const MIXED_PRECISION: bool = true;

    fn fused_pass<T: Float, P: Pass<T>>(a: &KernelArgs<NAdamCoeffs>, pass: P) {
        kernel::run(&a.coeffs, a.grad_scale, pass)
    }

    fn reference<T: Float>(a: &KernelArgs<NAdamCoeffs>, p: &mut [T], g: &[T], b: &mut [&mut [T]]) {
        kernel::reference(&a.coeffs, a.grad_scale, p, g, b)
    }
}
