//! Averaged SGD, torch's `torch.optim.ASGD`.

use crate::arena::Param;
use crate::error::Result;
use crate::float::Float;
use crate::hyper::{check, hyperparams};
use crate::kernels::asgd::{self as kernel, ASGDCoeffs};
use crate::kernels::Pass;
use crate::optimizer::{Algorithm, KernelArgs, Optimizer, ParamScalars};

hyperparams! {
    /// Hyperparameters of [`ASGD`], with torch's names and defaults.
    pub struct ASGDConfig for "ASGD" {
        /// Learning rate.
        lr: f64 = 1e-2,
        /// Decay term: both the weight shrinkage `1 − λη` and the learning-rate decay.
        lambd: f64 = 1e-4,
        /// Power of the learning-rate decay.
        alpha: f64 = 0.75,
        /// The step after which averaging starts (before it, `ax` follows the parameter).
        t0: f64 = 1e6,
        /// Weight decay (L2 penalty) factor.
        weight_decay: f64 = 0.0,
        /// Maximize the objective instead of minimizing.
        maximize: bool = false,
    }
}

impl ASGDConfig {
    fn check(&self) -> Result<()> {
        // torch's order: lr, lambd, alpha, weight_decay.
        check::lr(self.lr)?;
        check::non_negative("lambd", self.lambd)?;
        check::non_negative("alpha", self.alpha)?;
        check::weight_decay(self.weight_decay)?;
        check::finite("lr", self.lr)?;
        check::finite("lambd", self.lambd)?;
        check::finite("alpha", self.alpha)?;
        check::finite("weight_decay", self.weight_decay)?;
        // torch has no check on t0. An infinite t0 (never average) is meaningful; NaN is not.
        if self.t0.is_nan() {
            return check::finite("t0", self.t0);
        }
        Ok(())
    }
}

/// ASGD's per-parameter scalars: torch keeps `eta` and `mu` as float32 0-dim tensors, so both
/// always hold f32 values here too (widened to f64).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ASGDScalars {
    /// The learning rate of the parameter's next step.
    pub eta: f64,
    /// The averaging weight of the parameter's next step (1 until `t0` steps have passed).
    pub mu: f64,
}

impl ParamScalars for ASGDScalars {
    const NAMES: &'static [&'static str] = &["eta", "mu"];

    fn values(&self) -> Vec<f64> {
        vec![self.eta, self.mu]
    }

    /// Rounds to f32, as loading into torch's float32 state tensors does.
    fn from_values(values: &[f64]) -> Self {
        ASGDScalars {
            eta: f32_value(values.first().copied().unwrap_or(f64::NAN)),
            mu: f32_value(values.get(1).copied().unwrap_or(f64::NAN)),
        }
    }
}

/// `x` rounded to the nearest f32, widened back: a value stored in a float32 tensor.
fn f32_value(x: f64) -> f64 {
    x as f32 as f64
}

/// The ASGD algorithm (see [`ASGD`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct ASGDAlgorithm;

/// Averaged SGD (torch's `ASGD`): SGD with a decaying learning rate that also keeps `ax`, a
/// running (Polyak–Ruppert) average of the iterates. The average, not the last iterate, is the
/// estimate with the optimal convergence rate: read it with [`ASGD::averaged`]. Each
/// parameter's `eta` and `mu` ([`ASGDScalars`]) are read with [`Optimizer::scalars`].
///
/// With `g` the gradient (negated when `maximize`), step `t`, and the parameter's `η` and `μ`
/// (starting at `lr` and 1):
///
/// ```text
/// g ← g + λ_wd θ                           (weight decay, when weight_decay ≠ 0)
/// θ ← θ(1 − λη)
/// θ ← θ − ηg
/// ax ← ax + μ(θ − ax)     if μ ≠ 1,   else ax ← θ
/// η ← lr / (1 + λ·lr·t)^α
/// μ ← 1 / max(1, t − t0)
/// ```
///
/// `η` and `μ` are float32 values, as in torch (its 0-dim state tensors); the step reads
/// `η` through `eta.item()`, so `1 − λη` is computed in f64 from the f32 `η`. Averaging
/// starts once `t > t0 + 1`; with the default `t0 = 1e6`, `ax` equals the parameter for the
/// first million steps, so lower `t0` to average sooner.
///
/// Polyak & Juditsky, "Acceleration of Stochastic Approximation by Averaging" (SIAM J. Control
/// and Optimization, 1992); the schedule follows Bottou, "Large-Scale Machine Learning with
/// Stochastic Gradient Descent" (COMPSTAT 2010). State: `step`, `eta`, `mu`, `ax`.
///
/// ```
/// use optarena::{ArenaBuilder, ASGD, ASGDConfig, ParamGroup};
///
/// let mut b = ArenaBuilder::<f64>::new();
/// let w = b.param("w", &[2], &[1.0, -1.0])?;
/// let mut arena = b.build();
/// let config = ASGDConfig::default().with_lr(0.1).with_t0(10.0);
/// let mut opt = ASGD::new(&arena, [ParamGroup::all()], config)?;
/// assert!(opt.averaged(w).is_none(), "no average before the first step");
/// for _ in 0..100 {
///     // loss = ½‖w‖²: the gradient is w itself.
///     let v = arena.value(w).to_vec();
///     arena.set_grad(w, &v)?;
///     opt.step(&mut arena)?;
/// }
/// // Evaluate with the averaged weights, keep the iterate to continue training.
/// let average = opt.averaged(w).unwrap().to_vec();
/// assert_eq!(average.len(), 2);
/// assert!(average[0].abs() < 1.0);
/// # Ok::<(), optarena::Error>(())
/// ```
pub type ASGD<T> = Optimizer<T, ASGDAlgorithm>;

impl<T: Float> Optimizer<T, ASGDAlgorithm> {
    /// The averaged value of `param` (torch's `optimizer.state[p]["ax"]`): the reason to use
    /// ASGD. `None` before the parameter's first step (or if it is not in this optimizer).
    ///
    /// Until `t0` steps have passed the average is a copy of the parameter; after that it is
    /// the running mean of the iterates since then.
    pub fn averaged(&self, param: Param<T>) -> Option<&[T]> {
        self.buffer(param, "ax")
    }
}

impl Algorithm for ASGDAlgorithm {
    const NAME: &'static str = "ASGD";
    type Config = ASGDConfig;
    type Scalars = ASGDScalars;
    type Coeffs = ASGDCoeffs;

    fn buffers(_: &ASGDConfig) -> &'static [&'static str] {
        &["ax"]
    }

    /// torch: `eta = torch.as_tensor(lr, dtype=float32)`, `mu = torch.ones(())`.
    fn init_scalars(c: &ASGDConfig) -> ASGDScalars {
        ASGDScalars {
            eta: f32_value(c.lr),
            mu: 1.0,
        }
    }

    /// The step uses the `eta` and `mu` left by the previous step; then both advance from the
    /// new step count, in f64 Python arithmetic, stored as f32.
    fn prepare(c: &ASGDConfig, step: u64, s: &mut ASGDScalars) -> ASGDCoeffs {
        let coeffs = ASGDCoeffs {
            eta: s.eta,
            decay: 1.0 - c.lambd * s.eta,
            mu: s.mu,
            weight_decay: c.weight_decay,
            maximize: c.maximize,
        };
        let t = step as f64;
        // new_eta = lr / ((1 + lambd * lr * step) ** alpha)
        s.eta = f32_value(c.lr / (1.0 + c.lambd * c.lr * t).powf(c.alpha));
        // new_mu = 1 / max(1, step - t0)   (Python's max keeps 1 unless step - t0 > 1)
        let d = t - c.t0;
        s.mu = f32_value(1.0 / if d > 1.0 { d } else { 1.0 });
        coeffs
    }

    fn fused<T: Float>(a: &KernelArgs<ASGDCoeffs>, p: &mut [T], g: &[T], b: &mut [&mut [T]]) {
        kernel::fused(a.simd, &a.coeffs, a.grad_scale, p, g, b)
    }

    const MIXED_PRECISION: bool = true;

    fn fused_pass<T: Float, P: Pass<T>>(a: &KernelArgs<ASGDCoeffs>, pass: P) {
        kernel::run(&a.coeffs, a.grad_scale, pass)
    }

    fn reference<T: Float>(a: &KernelArgs<ASGDCoeffs>, p: &mut [T], g: &[T], b: &mut [&mut [T]]) {
        kernel::reference(&a.coeffs, a.grad_scale, p, g, b)
    }
}

crate::renamed! {
    #[deprecated(since = "0.2.0", note = "renamed to `ASGD`, torch's spelling")]
    Asgd<T> => ASGD;
    #[deprecated(since = "0.2.0", note = "renamed to `ASGDConfig`, torch's spelling")]
    AsgdConfig => ASGDConfig;
    #[deprecated(since = "0.2.0", note = "renamed to `ASGDAlgorithm`, torch's spelling")]
    AsgdAlgorithm => ASGDAlgorithm;
    #[deprecated(since = "0.2.0", note = "renamed to `ASGDScalars`, torch's spelling")]
    AsgdScalars => ASGDScalars;
}
