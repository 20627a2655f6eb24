//! Adafactor, torch's `torch.optim.Adafactor`.
//!
//! # Why it runs through [`Optimizer`]
//! Adafactor is not elementwise: a parameter's update is scaled by the parameter's RMS and
//! clipped by the update's RMS, and for a parameter with two or more dimensions the second
//! moment is kept factored, as row and column means whose length follows from the shape. It
//! still runs through the same [`Optimizer`] as every other algorithm, through two small
//! additions to the [`Algorithm`] trait (each with a default that leaves the elementwise
//! algorithms as they were): [`Algorithm::PER_PARAMETER`], so that each kernel call gets one
//! whole parameter and its shape, and shaped state ([`Algorithm::aux_buffers`]) for `row_var`,
//! `col_var` and `variance`. A separate optimizer type would have had to copy param groups,
//! hyperparameter access, hooks, the checked, clipped, scaled and accumulated steps and the
//! state-dict checks; this way Adafactor gets all of them, and LR schedulers, [`GradScaler`]
//! and the generic tests, for free.
//!
//! [`GradScaler`]: crate::GradScaler

use crate::error::{Error, Result};
use crate::float::Float;
use crate::hyper::hyperparams;
use crate::kernels::adafactor::{self as kernel, factored_dims, is_factored, AdafactorCoeffs};
use crate::optimizer::{Algorithm, KernelArgs, Optimizer};

hyperparams! {
    /// Hyperparameters of [`Adafactor`], with torch's names and defaults (torch's `foreach`
    /// only picks an implementation and is not kept).
    pub struct AdafactorConfig for "Adafactor" {
        /// Learning rate: the cap of the relative step size `ρ` and the weight decay's scale.
        lr: f64 = 1e-2,
        /// Decay rate of `β₂`: the new squared gradient's weight at step `t` is `t^beta2_decay`.
        beta2_decay: f64 = -0.8,
        /// `(ε₁, ε₂)`: `ε₁` bounds the variance estimate from below (`None`: the dtype's
        /// machine epsilon, `torch.finfo(dtype).eps`); `ε₂` is the smallest parameter RMS the
        /// step is scaled by.
        eps: (Option<f64>, f64) = (None, 1e-3),
        /// Clipping threshold of the update's RMS.
        d: f64 = 1.0,
        /// Decoupled weight decay factor.
        weight_decay: f64 = 0.0,
        /// Maximize the objective instead of minimizing.
        maximize: bool = false,
    }
}

fn invalid(msg: String) -> Result<()> {
    Err(Error::InvalidHyperparameter(msg))
}

impl AdafactorConfig {
    /// torch's checks, in torch's order and with its messages (NaN fails each, as it fails
    /// torch's comparisons); then infinities, which torch lets through, are refused where they
    /// make the step meaningless. `d = inf` is allowed: it turns update clipping off.
    fn check(&self) -> Result<()> {
        let (eps1, eps2) = self.eps;
        if self.lr.is_nan() || self.lr < 0.0 {
            return invalid(format!(
                "Learning rate should be >= 0 but is: {:?}",
                self.lr
            ));
        }
        if self.beta2_decay.is_nan() || self.beta2_decay > 0.0 {
            return invalid(format!(
                "beta2_decay should be <= 0 but is: {:?}",
                self.beta2_decay
            ));
        }
        if let Some(e) = eps1 {
            if e.is_nan() || e < 0.0 {
                return invalid(format!("epsilon1 should be >= 0 but is: {e:?}"));
            }
        }
        if eps2.is_nan() || eps2 < 0.0 {
            return invalid(format!("epsilon2 should be >= 0 but is: {eps2:?}"));
        }
        if self.d.is_nan() || self.d < 1.0 {
            return invalid(format!(
                "Clipping threshold d should be >= 1 but is: {:?}",
                self.d
            ));
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return invalid(format!(
                "weight_decay should be >= 0 but is: {:?}",
                self.weight_decay
            ));
        }
        let finite = [
            ("lr", self.lr),
            ("beta2_decay", self.beta2_decay),
            ("epsilon1", eps1.unwrap_or(0.0)),
            ("epsilon2", eps2),
            ("weight_decay", self.weight_decay),
        ];
        for (name, x) in finite {
            if !x.is_finite() {
                return invalid(format!("Invalid {name} value: {x:?}"));
            }
        }
        Ok(())
    }
}

/// The Adafactor algorithm (see [`Adafactor`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct AdafactorAlgorithm;

/// Adafactor (torch's `Adafactor`): Adam-like steps whose second moment of an `m × n` matrix
/// is kept as `m + n` numbers, and whose step size is relative to the parameter's scale.
///
/// With `G` the gradient (negated when `maximize`), step `t`, learning rate `γ`, and
/// `β̂₂ = 1 − t^τ` (`τ = beta2_decay`):
///
/// ```text
/// ρ ← min(γ, 1/√t)
/// α ← max(ε₂, RMS(θ)) · ρ                        (RMS(x) = ‖x‖₂ / √numel, before decay)
/// θ ← θ(1 − γλ)                                  (weight decay, when λ ≠ 0)
/// dim(G) ≥ 2 (factored over the last two dims, batched over the leading ones):
///     R ← β̂₂R + (1−β̂₂) · mean_j(G²)             (row_var, shape [..., m, 1])
///     C ← β̂₂C + (1−β̂₂) · mean_i(G²)             (col_var, shape [..., 1, n])
///     V̂ ← R C / max(mean_i(R), ε₁)
/// otherwise (vectors and scalars):
///     V̂ ← β̂₂V̂ + (1−β̂₂) G²                       (variance)
/// U ← G / sqrt(max(V̂, ε₁²))
/// θ ← θ − α · U / max(1, RMS(U)/d)
/// ```
///
/// Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost" (ICML
/// 2018). torch's version changes the paper in three ways, kept here: `lr` caps the relative
/// step size (`ρ = min(lr, 1/√t)`; the paper's cap is 0.01, the default `lr`) and scales a
/// decoupled weight decay (the paper has none); `ε₁` is applied to the variance estimate
/// (`max(mean(R), ε₁)`, `max(V̂, ε₁²)`) instead of being added to the squared gradient; and
/// the row and column factors are means instead of sums. The `lerp` weight `t^τ` is the paper's
/// `1 − β̂₂ₜ` schedule with `τ = −0.8`. No first moment is kept (the paper's `β₁ = 0`).
///
/// State: `step`; for a parameter with two or more dimensions `row_var` (its shape with the
/// last dimension 1) and `col_var` (the second-to-last dimension 1), for one with fewer
/// `variance` (the parameter's shape). Read them with [`Optimizer::buffer`]. `ε₁ = None` is
/// `torch.finfo(dtype).eps` of the parameter's dtype (`f32::EPSILON` or `f64::EPSILON`).
///
/// Each parameter is updated whole by one thread, parameters in parallel with each other; the
/// reductions follow torch's CPU order (see [`crate::kernels::adafactor`]), so the result is
/// the same on any number of threads. An empty parameter is left as it is (torch raises
/// `ZeroDivisionError`).
///
/// ```
/// use optarena::{Adafactor, AdafactorConfig, ArenaBuilder, ParamGroup};
///
/// let mut b = ArenaBuilder::<f32>::new();
/// let w = b.param("w", &[2, 3], &[0.5, -0.5, 1.0, 0.25, -1.0, 0.75])?;
/// let bias = b.zeros("b", &[3])?;
/// let mut arena = b.build();
/// let mut opt = Adafactor::new(&arena, [ParamGroup::all()], AdafactorConfig::default())?;
/// arena.set_grad(w, &[0.1, -0.2, 0.3, 0.1, 0.0, -0.1])?;
/// arena.set_grad(bias, &[0.5, -0.5, 0.1])?;
/// opt.step(&mut arena)?;
/// // A 2×3 matrix keeps 2 row and 3 column factors; a vector keeps one value per element.
/// assert_eq!(opt.buffer(w, "row_var").unwrap().len(), 2);
/// assert_eq!(opt.buffer(w, "col_var").unwrap().len(), 3);
/// assert_eq!(opt.buffer(bias, "variance").unwrap().len(), 3);
/// # Ok::<(), optarena::Error>(())
/// ```
pub type Adafactor<T> = Optimizer<T, AdafactorAlgorithm>;

impl Algorithm for AdafactorAlgorithm {
    const NAME: &'static str = "Adafactor";
    const PER_PARAMETER: bool = true;
    type Config = AdafactorConfig;
    type Scalars = ();
    type Coeffs = AdafactorCoeffs;

    /// None: all of Adafactor's state is shaped ([`Algorithm::aux_buffers`]).
    fn buffers(_: &AdafactorConfig) -> &'static [&'static str] {
        &[]
    }

    fn aux_buffers(shape: &[usize]) -> &'static [&'static str] {
        if is_factored(shape) {
            &["row_var", "col_var"]
        } else {
            &["variance"]
        }
    }

    /// torch's shapes: `row_var` is the parameter's shape with the last dimension 1, `col_var`
    /// with the second-to-last 1, `variance` the parameter's own.
    fn aux_shape(shape: &[usize], index: usize) -> Vec<usize> {
        let mut s = shape.to_vec();
        if is_factored(shape) {
            let d = if index == 0 { s.len() - 1 } else { s.len() - 2 };
            s[d] = 1;
        }
        s
    }

    fn aux_len(shape: &[usize], index: usize) -> usize {
        if is_factored(shape) {
            let (b, m, n) = factored_dims(shape);
            if index == 0 {
                b * m
            } else {
                b * n
            }
        } else {
            shape.iter().product()
        }
    }

    fn prepare(c: &AdafactorConfig, step: u64, _: &mut ()) -> AdafactorCoeffs {
        AdafactorCoeffs::new(
            c.lr,
            c.beta2_decay,
            c.eps,
            c.d,
            c.weight_decay,
            c.maximize,
            step,
        )
    }

    /// The update of one whole vector parameter, `buffers` being `[variance]` (the optimizer
    /// calls [`Algorithm::fused_param`] instead).
    fn fused<T: Float>(a: &KernelArgs<AdafactorCoeffs>, p: &mut [T], g: &[T], b: &mut [&mut [T]]) {
        kernel::fused(a.simd, &a.coeffs, a.grad_scale, &[p.len()], p, g, b)
    }

    /// The reference of [`AdafactorAlgorithm::fused`].
    fn reference<T: Float>(
        a: &KernelArgs<AdafactorCoeffs>,
        p: &mut [T],
        g: &[T],
        b: &mut [&mut [T]],
    ) {
        kernel::reference(&a.coeffs, a.grad_scale, &[p.len()], p, g, b)
    }

    fn fused_param<T: Float>(
        a: &KernelArgs<AdafactorCoeffs>,
        shape: &[usize],
        p: &mut [T],
        g: &[T],
        _: &mut [&mut [T]],
        aux: &mut [&mut [T]],
    ) {
        kernel::fused(a.simd, &a.coeffs, a.grad_scale, shape, p, g, aux)
    }

    fn reference_param<T: Float>(
        a: &KernelArgs<AdafactorCoeffs>,
        shape: &[usize],
        p: &mut [T],
        g: &[T],
        _: &mut [&mut [T]],
        aux: &mut [&mut [T]],
    ) {
        kernel::reference(&a.coeffs, a.grad_scale, shape, p, g, aux)
    }
}
