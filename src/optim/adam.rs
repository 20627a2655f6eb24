//! Adam and AdamW, torch's `torch.optim.Adam` and `torch.optim.AdamW`.

use crate::error::Result;
use crate::float::Float;
use crate::hyper::{check, hyperparams};
use crate::kernels::adam::{self as kernel, AdamCoeffs};
use crate::kernels::Pass;
use crate::optimizer::{Algorithm, KernelArgs, Optimizer};

hyperparams! {
    /// Hyperparameters of [`Adam`], with torch's names and defaults.
    pub struct AdamConfig for "Adam" {
        /// Learning rate.
        lr: f64 = 1e-3,
        /// Decay rates of the first and second moment averages.
        betas: (f64, f64) = (0.9, 0.999),
        /// Added to the denominator for numerical stability.
        eps: f64 = 1e-8,
        /// Weight decay factor (an L2 term unless `decoupled_weight_decay`).
        weight_decay: f64 = 0.0,
        /// Use the maximum of past second moments (AMSGrad).
        amsgrad: bool = false,
        /// Maximize the objective instead of minimizing.
        maximize: bool = false,
        /// Decay the weights directly, as AdamW does.
        decoupled_weight_decay: bool = false,
    }
}

hyperparams! {
    /// Hyperparameters of [`AdamW`]: Adam's, with `weight_decay = 1e-2` and decoupled decay.
    pub struct AdamWConfig for "AdamW" {
        /// Learning rate.
        lr: f64 = 1e-3,
        /// Decay rates of the first and second moment averages.
        betas: (f64, f64) = (0.9, 0.999),
        /// Added to the denominator for numerical stability.
        eps: f64 = 1e-8,
        /// Decoupled weight decay factor.
        weight_decay: f64 = 1e-2,
        /// Use the maximum of past second moments (AMSGrad).
        amsgrad: bool = false,
        /// Maximize the objective instead of minimizing.
        maximize: bool = false,
        /// Always true for AdamW (kept in the group, as torch does, for state-dict parity).
        decoupled_weight_decay: bool = true,
    }
}

fn check_adam(lr: f64, eps: f64, betas: (f64, f64), weight_decay: f64) -> Result<()> {
    check::lr(lr)?;
    check::eps(eps)?;
    check::betas(betas)?;
    check::weight_decay(weight_decay)?;
    check::finite("lr", lr)?;
    check::finite("eps", eps)?;
    check::finite("weight_decay", weight_decay)
}

impl AdamConfig {
    fn check(&self) -> Result<()> {
        check_adam(self.lr, self.eps, self.betas, self.weight_decay)
    }
}

impl AdamWConfig {
    fn check(&self) -> Result<()> {
        AdamConfig::from(self).check()
    }
}

/// AdamW's options as Adam's: AdamW is Adam with `decoupled_weight_decay` (torch 2.x makes
/// `AdamW` a subclass of `Adam` the same way), so [`AdamWAlgorithm`] is [`AdamAlgorithm`] on
/// this config.
impl From<&AdamWConfig> for AdamConfig {
    fn from(c: &AdamWConfig) -> Self {
        AdamConfig {
            lr: c.lr,
            betas: c.betas,
            eps: c.eps,
            weight_decay: c.weight_decay,
            amsgrad: c.amsgrad,
            maximize: c.maximize,
            decoupled_weight_decay: c.decoupled_weight_decay,
        }
    }
}

/// The Adam algorithm (see [`Adam`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct AdamAlgorithm;

/// The AdamW algorithm (see [`AdamW`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct AdamWAlgorithm;

/// Adam (torch's `Adam`).
///
/// With `g` the gradient (negated when `maximize`), step `t`, learning rate `γ`:
///
/// ```text
/// g ← g + λθ                  (weight decay, coupled)   or   θ ← θ(1 − γλ)  (decoupled)
/// m ← β₁m + (1−β₁)g           (torch: m.lerp_(g, 1−β₁))
/// v ← β₂v + (1−β₂)g²
/// v̂ ← max(v̂, v)              (AMSGrad only; the denominator then uses v̂)
/// θ ← θ − γ/(1−β₁ᵗ) · m / (sqrt(v)/sqrt(1−β₂ᵗ) + ε)
/// ```
///
/// Kingma & Ba, "Adam: A Method for Stochastic Optimization" (ICLR 2015); AMSGrad from
/// Reddi et al., "On the Convergence of Adam and Beyond" (ICLR 2018). State: `step`,
/// `exp_avg`, `exp_avg_sq`, and `max_exp_avg_sq` with AMSGrad.
pub type Adam<T> = Optimizer<T, AdamAlgorithm>;

/// AdamW (torch's `AdamW`): Adam with decoupled weight decay, `θ ← θ(1 − γλ)` before the
/// Adam update, and `weight_decay = 1e-2` by default.
///
/// Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (ICLR 2019).
pub type AdamW<T> = Optimizer<T, AdamWAlgorithm>;

fn adam_buffers(amsgrad: bool) -> &'static [&'static str] {
    if amsgrad {
        &["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    } else {
        &["exp_avg", "exp_avg_sq"]
    }
}

impl Algorithm for AdamAlgorithm {
    const NAME: &'static str = "Adam";
    type Config = AdamConfig;
    type Scalars = ();
    type Coeffs = AdamCoeffs;

    fn buffers(c: &AdamConfig) -> &'static [&'static str] {
        adam_buffers(c.amsgrad)
    }

    fn prepare(c: &AdamConfig, step: u64, _: &mut ()) -> AdamCoeffs {
        AdamCoeffs::new(
            c.lr,
            c.betas,
            c.eps,
            c.weight_decay,
            c.decoupled_weight_decay,
            c.maximize,
            step,
        )
    }

    fn fused<T: Float>(a: &KernelArgs<AdamCoeffs>, p: &mut [T], g: &[T], b: &mut [&mut [T]]) {
        kernel::fused(a.simd, &a.coeffs, a.grad_scale, p, g, b)
    }

    const MIXED_PRECISION: bool = true;

    fn fused_pass<T: Float, P: Pass<T>>(a: &KernelArgs<AdamCoeffs>, pass: P) {
        kernel::run(&a.coeffs, a.grad_scale, pass)
    }

    fn torch_fused_pass<P: Pass<f32>>(a: &KernelArgs<AdamCoeffs>, pass: P) {
        crate::kernels::torch_fused::adam(&a.coeffs, a.grad_scale, pass)
    }

    fn reference<T: Float>(a: &KernelArgs<AdamCoeffs>, p: &mut [T], g: &[T], b: &mut [&mut [T]]) {
        kernel::reference(&a.coeffs, a.grad_scale, p, g, b)
    }
}

/// Adam's algorithm on [`AdamConfig::from`] the AdamW config: the same buffers, per-step
/// scalars and kernels.
impl Algorithm for AdamWAlgorithm {
    const NAME: &'static str = "AdamW";
    type Config = AdamWConfig;
    type Scalars = ();
    type Coeffs = AdamCoeffs;

    fn buffers(c: &AdamWConfig) -> &'static [&'static str] {
        AdamAlgorithm::buffers(&c.into())
    }

    fn prepare(c: &AdamWConfig, step: u64, scalars: &mut ()) -> AdamCoeffs {
        AdamAlgorithm::prepare(&c.into(), step, scalars)
    }

    fn fused<T: Float>(a: &KernelArgs<AdamCoeffs>, p: &mut [T], g: &[T], b: &mut [&mut [T]]) {
        AdamAlgorithm::fused(a, p, g, b)
    }

    const MIXED_PRECISION: bool = AdamAlgorithm::MIXED_PRECISION;

    fn fused_pass<T: Float, P: Pass<T>>(a: &KernelArgs<AdamCoeffs>, pass: P) {
        AdamAlgorithm::fused_pass(a, pass)
    }

    fn torch_fused_pass<P: Pass<f32>>(a: &KernelArgs<AdamCoeffs>, pass: P) {
        crate::kernels::torch_fused::adam(&a.coeffs, a.grad_scale, pass)
    }

    fn reference<T: Float>(a: &KernelArgs<AdamCoeffs>, p: &mut [T], g: &[T], b: &mut [&mut [T]]) {
        AdamAlgorithm::reference(a, p, g, b)
    }
}
