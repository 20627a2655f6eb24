//! RMSprop, torch's `torch.optim.RMSprop`.

use crate::error::Result;
use crate::float::Float;
use crate::hyper::{check, hyperparams};
use crate::kernels::rmsprop::{self as kernel, RMSpropCoeffs};
use crate::kernels::Pass;
use crate::optimizer::{Algorithm, KernelArgs, Optimizer};

hyperparams! {
    /// Hyperparameters of [`RMSprop`], with torch's names and defaults.
    pub struct RMSpropConfig for "RMSprop" {
        /// Learning rate.
        lr: f64 = 1e-2,
        /// Smoothing constant of the running average of squared gradients.
        alpha: f64 = 0.99,
        /// Added to the denominator for numerical stability.
        eps: f64 = 1e-8,
        /// Weight decay (L2 penalty) factor.
        weight_decay: f64 = 0.0,
        /// Momentum factor (0 keeps no momentum buffer).
        momentum: f64 = 0.0,
        /// Normalise the gradient by an estimate of its variance instead of its second moment.
        centered: bool = false,
        /// Maximize the objective instead of minimizing.
        maximize: bool = false,
    }
}

impl RMSpropConfig {
    fn check(&self) -> Result<()> {
        // torch's order: lr, eps, momentum, weight_decay, alpha.
        check::lr(self.lr)?;
        check::eps(self.eps)?;
        check::momentum(self.momentum)?;
        check::weight_decay(self.weight_decay)?;
        check::non_negative("alpha", self.alpha)?;
        check::finite("lr", self.lr)?;
        check::finite("eps", self.eps)?;
        check::finite("momentum", self.momentum)?;
        check::finite("weight_decay", self.weight_decay)?;
        check::finite("alpha", self.alpha)
    }
}

/// The RMSprop algorithm (see [`RMSprop`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct RMSpropAlgorithm;

/// RMSprop (torch's `RMSprop`).
///
/// With `g` the gradient (negated when `maximize`), learning rate `γ`, smoothing constant `α`,
/// momentum `μ`:
///
/// ```text
/// g ← g + λθ                                  (weight decay, when λ ≠ 0)
/// v ← αv + (1−α)g²                            (square_avg)
/// if centered:  ḡ ← ḡ + (1−α)(g − ḡ)          (grad_avg; torch: ḡ.lerp_(g, 1−α))
///               d = sqrt(v − ḡ²) + ε
/// else:         d = sqrt(v) + ε
/// if μ > 0:     b ← μb + g/d,  θ ← θ − γb      (momentum_buffer)
/// else:         θ ← θ − γg/d
/// ```
///
/// Tieleman & Hinton, "Lecture 6.5 — RMSProp: Divide the gradient by a running average of its
/// recent magnitude" (COURSERA: Neural Networks for Machine Learning, 2012); the centered
/// version from Graves, "Generating Sequences With Recurrent Neural Networks"
/// (arXiv:1308.0850, 2013). State: `step`, `square_avg`, `momentum_buffer` when
/// `momentum > 0`, `grad_avg` when centered.
///
/// Switching `momentum` to 0 or `centered` off mid-training drops that buffer and keeps the
/// others, as torch (which stops reading it) does. Switching one on later starts the new
/// buffer at zero and keeps the others; torch raises a `KeyError` there.
pub type RMSprop<T> = Optimizer<T, RMSpropAlgorithm>;

impl Algorithm for RMSpropAlgorithm {
    const NAME: &'static str = "RMSprop";
    type Config = RMSpropConfig;
    type Scalars = ();
    type Coeffs = RMSpropCoeffs;

    fn buffers(c: &RMSpropConfig) -> &'static [&'static str] {
        match (c.momentum > 0.0, c.centered) {
            (false, false) => &["square_avg"],
            (true, false) => &["square_avg", "momentum_buffer"],
            (false, true) => &["square_avg", "grad_avg"],
            (true, true) => &["square_avg", "momentum_buffer", "grad_avg"],
        }
    }

    fn prepare(c: &RMSpropConfig, _step: u64, _: &mut ()) -> RMSpropCoeffs {
        RMSpropCoeffs {
            lr: c.lr,
            alpha: c.alpha,
            eps: c.eps,
            weight_decay: c.weight_decay,
            momentum: c.momentum,
            centered: c.centered,
            maximize: c.maximize,
        }
    }

    fn fused<T: Float>(a: &KernelArgs<RMSpropCoeffs>, p: &mut [T], g: &[T], b: &mut [&mut [T]]) {
        kernel::fused(a.simd, &a.coeffs, a.grad_scale, p, g, b)
    }

    const MIXED_PRECISION: bool = true;

    fn fused_pass<T: Float, P: Pass<T>>(a: &KernelArgs<RMSpropCoeffs>, pass: P) {
        kernel::run(&a.coeffs, a.grad_scale, pass)
    }

    fn reference<T: Float>(
        a: &KernelArgs<RMSpropCoeffs>,
        p: &mut [T],
        g: &[T],
        b: &mut [&mut [T]],
    ) {
        kernel::reference(&a.coeffs, a.grad_scale, p, g, b)
    }
}
