//! Adagrad, torch's `torch.optim.Adagrad`.

use crate::error::Result;
use crate::float::Float;
use crate::hyper::{check, hyperparams};
use crate::kernels::adagrad::{self as kernel, AdagradCoeffs};
use crate::kernels::Pass;
use crate::optimizer::{Algorithm, KernelArgs, Optimizer};

hyperparams! {
    /// Hyperparameters of [`Adagrad`], with torch's names and defaults.
    pub struct AdagradConfig for "Adagrad" {
        /// Learning rate.
        lr: f64 = 1e-2,
        /// Learning rate decay: step `t` uses `lr / (1 + (t − 1)·lr_decay)`.
        lr_decay: f64 = 0.0,
        /// Weight decay (L2 penalty).
        weight_decay: f64 = 0.0,
        /// Starting value of the accumulator `sum`. As in torch, only the optimizer's
        /// constructor value counts: a group's own value is kept but not used (see [`Adagrad`]).
        initial_accumulator_value: f64 = 0.0,
        /// Added to the denominator for numerical stability.
        eps: f64 = 1e-10,
        /// Maximize the objective instead of minimizing.
        maximize: bool = false,
    }
}

impl AdagradConfig {
    fn check(&self) -> Result<()> {
        check::lr(self.lr)?;
        check::non_negative("lr_decay", self.lr_decay)?;
        check::weight_decay(self.weight_decay)?;
        check::non_negative("initial_accumulator_value", self.initial_accumulator_value)?;
        check::eps(self.eps)?;
        check::finite("lr", self.lr)?;
        check::finite("lr_decay", self.lr_decay)?;
        check::finite("weight_decay", self.weight_decay)?;
        check::finite("initial_accumulator_value", self.initial_accumulator_value)?;
        check::finite("eps", self.eps)
    }
}

/// The Adagrad algorithm (see [`Adagrad`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct AdagradAlgorithm;

/// Adagrad (torch's `Adagrad`), for dense gradients.
///
/// With `g` the gradient (negated when `maximize`), step `t`, learning rate `γ`, decay `η`:
///
/// ```text
/// g ← g + λθ                        (if λ ≠ 0)
/// γ_t = γ / (1 + (t − 1)η)
/// s ← s + g²                        (sum, starting at initial_accumulator_value)
/// θ ← θ − γ_t · g / (sqrt(s) + ε)
/// ```
///
/// Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and Stochastic
/// Optimization" (JMLR 12, 2011). State: `step`, `sum`.
///
/// # State creation, and how it differs from torch's
/// torch's `Adagrad.__init__` creates every parameter's state at construction, `step = 0` and
/// `sum` filled with the constructor's `initial_accumulator_value`; parameters of groups added
/// later get the same state lazily, on their first gradient. optarena creates it lazily for
/// every parameter, as the other optimizers do. The numbers are the same: a state created on
/// the first gradient is exactly the `step = 0` state torch made earlier. What differs is the
/// state dict of a parameter that has never had a gradient: torch lists it with `step: 0` and
/// its initial `sum`, optarena leaves it out (and [`Optimizer::step_count`] is `None`). A state
/// dict that lists such `step: 0` entries loads and continues as torch would.
///
/// Both in the constructor and in its lazy path torch fills `sum` with the *constructor's*
/// `initial_accumulator_value` (`self.defaults[...]`), so a group's own value is stored in
/// its param group but never used. optarena does the same, to stay on torch's numbers.
pub type Adagrad<T> = Optimizer<T, AdagradAlgorithm>;

impl Algorithm for AdagradAlgorithm {
    const NAME: &'static str = "Adagrad";
    type Config = AdagradConfig;
    type Scalars = ();
    type Coeffs = AdagradCoeffs;

    fn buffers(_: &AdagradConfig) -> &'static [&'static str] {
        &["sum"]
    }

    fn buffer_init(c: &AdagradConfig, _index: usize) -> f64 {
        c.initial_accumulator_value
    }

    fn buffer_init_in(_group: &AdagradConfig, defaults: &AdagradConfig, _index: usize) -> f64 {
        defaults.initial_accumulator_value
    }

    fn prepare(c: &AdagradConfig, step: u64, _: &mut ()) -> AdagradCoeffs {
        AdagradCoeffs::new(c.lr, c.lr_decay, c.eps, c.weight_decay, c.maximize, step)
    }

    fn fused<T: Float>(a: &KernelArgs<AdagradCoeffs>, p: &mut [T], g: &[T], b: &mut [&mut [T]]) {
        kernel::fused(a.simd, &a.coeffs, a.grad_scale, p, g, b)
    }

    const MIXED_PRECISION: bool = true;

    fn fused_pass<T: Float, P: Pass<T>>(a: &KernelArgs<AdagradCoeffs>, pass: P) {
        kernel::run(&a.coeffs, a.grad_scale, pass)
    }

    fn torch_fused_pass<P: Pass<f32>>(a: &KernelArgs<AdagradCoeffs>, pass: P) {
        crate::kernels::torch_fused::adagrad(&a.coeffs, a.grad_scale, pass)
    }

    fn reference<T: Float>(
        a: &KernelArgs<AdagradCoeffs>,
        p: &mut [T],
        g: &[T],
        b: &mut [&mut [T]],
    ) {
        kernel::reference(&a.coeffs, a.grad_scale, p, g, b)
    }
}
