//! Stochastic gradient descent with momentum, torch's `torch.optim.SGD`.

use crate::error::{Error, Result};
use crate::float::Float;
use crate::hyper::{check, hyperparams};
use crate::kernels::sgd::{self as kernel, SGDCoeffs};
use crate::kernels::Pass;
use crate::optimizer::{Algorithm, KernelArgs, Optimizer};

hyperparams! {
    /// Hyperparameters of [`SGD`], with torch's names and defaults.
    pub struct SGDConfig for "SGD" {
        /// Learning rate (torch's default since 2.x: `1e-3`).
        lr: f64 = 1e-3,
        /// Momentum factor.
        momentum: f64 = 0.0,
        /// Dampening for momentum.
        dampening: f64 = 0.0,
        /// L2 penalty.
        weight_decay: f64 = 0.0,
        /// Nesterov momentum.
        nesterov: bool = false,
        /// Maximize the objective instead of minimizing.
        maximize: bool = false,
    }
}

impl SGDConfig {
    fn check(&self) -> Result<()> {
        check::lr(self.lr)?;
        check::momentum(self.momentum)?;
        check::weight_decay(self.weight_decay)?;
        check::finite("dampening", self.dampening)?;
        check::finite("lr", self.lr)?;
        check::finite("momentum", self.momentum)?;
        check::finite("weight_decay", self.weight_decay)?;
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(Error::InvalidHyperparameter(
                "Nesterov momentum requires a momentum and zero dampening".into(),
            ));
        }
        Ok(())
    }
}

/// The SGD algorithm (see [`SGD`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct SGDAlgorithm;

/// Stochastic gradient descent, optionally with momentum (torch's `SGD`).
///
/// With `g` the gradient (negated when `maximize`), `λ` the weight decay, `μ` the momentum,
/// `τ` the dampening and `γ` the learning rate:
///
/// ```text
/// g ← g + λθ                       (if λ ≠ 0)
/// b ← g                            (first step)
/// b ← μb + (1 − τ)g                (later steps)
/// g ← g + μb  (Nesterov)  or  g ← b
/// θ ← θ − γg
/// ```
///
/// Momentum as in Sutskever et al., "On the importance of initialization and momentum in deep
/// learning" (ICML 2013); Nesterov's variant from Nesterov (1983). State: `momentum_buffer`
/// when `momentum ≠ 0`; SGD keeps no step count.
pub type SGD<T> = Optimizer<T, SGDAlgorithm>;

impl Algorithm for SGDAlgorithm {
    const NAME: &'static str = "SGD";
    const TRACKS_STEP: bool = false;
    type Config = SGDConfig;
    type Scalars = ();
    type Coeffs = SGDCoeffs;

    fn buffers(config: &SGDConfig) -> &'static [&'static str] {
        if config.momentum != 0.0 {
            &["momentum_buffer"]
        } else {
            &[]
        }
    }

    fn prepare(c: &SGDConfig, _step: u64, _: &mut ()) -> SGDCoeffs {
        SGDCoeffs {
            lr: c.lr,
            momentum: c.momentum,
            dampening: c.dampening,
            weight_decay: c.weight_decay,
            nesterov: c.nesterov,
            maximize: c.maximize,
        }
    }

    fn fused<T: Float>(a: &KernelArgs<SGDCoeffs>, p: &mut [T], g: &[T], b: &mut [&mut [T]]) {
        kernel::fused(a.simd, &a.coeffs, a.fresh, a.grad_scale, p, g, b)
    }

    const MIXED_PRECISION: bool = true;

    fn fused_pass<T: Float, P: Pass<T>>(a: &KernelArgs<SGDCoeffs>, pass: P) {
        kernel::run(&a.coeffs, a.fresh, a.grad_scale, pass)
    }

    fn torch_fused_pass<P: Pass<f32>>(a: &KernelArgs<SGDCoeffs>, pass: P) {
        crate::kernels::torch_fused::sgd(&a.coeffs, a.fresh, a.grad_scale, pass)
    }

    fn reference<T: Float>(a: &KernelArgs<SGDCoeffs>, p: &mut [T], g: &[T], b: &mut [&mut [T]]) {
        kernel::reference(&a.coeffs, a.fresh, a.grad_scale, p, g, b)
    }
}

crate::renamed! {
    #[deprecated(since = "0.2.0", note = "renamed to `SGD`, torch's spelling")]
    Sgd<T> => SGD;
    #[deprecated(since = "0.2.0", note = "renamed to `SGDConfig`, torch's spelling")]
    SgdConfig => SGDConfig;
    #[deprecated(since = "0.2.0", note = "renamed to `SGDAlgorithm`, torch's spelling")]
    SgdAlgorithm => SGDAlgorithm;
}
