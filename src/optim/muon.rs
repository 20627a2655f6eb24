//! Muon, torch's `torch.optim.Muon`.
//!
//! Like Adafactor, Muon needs each parameter whole and its shape (the Newton–Schulz iteration
//! is a function of the whole matrix), so it sets [`Algorithm::PER_PARAMETER`] and runs through
//! the same [`Optimizer`] as every other algorithm: param groups, hyperparameters by name, LR
//! schedulers, hooks, the clipped, scaled and accumulated steps, state dicts and binary
//! checkpoints all come with it.

use crate::error::{Error, Result};
use crate::float::Float;
use crate::hyper::{hyperparams, HyperField, HyperValue};
use crate::kernels::muon::{self as kernel, AdjustLr, MuonCoeffs};
use crate::optimizer::{Algorithm, KernelArgs, Optimizer};

pub use crate::kernels::muon::NsPrecision;

impl HyperField for NsPrecision {
    fn to_value(&self) -> HyperValue {
        HyperValue::Str(self.name().to_string())
    }
    fn from_value(name: &str, v: &HyperValue) -> Result<Self> {
        match v {
            HyperValue::Str(s) if s == "bf16" => Ok(NsPrecision::Bf16),
            HyperValue::Str(s) if s == "full" => Ok(NsPrecision::Full),
            other => Err(Error::HyperparameterType {
                name: name.to_string(),
                expected: "\"bf16\" or \"full\"",
                got: other.to_string(),
            }),
        }
    }
}

hyperparams! {
    /// Hyperparameters of [`Muon`], with torch's names and defaults, plus `ns_precision`
    /// (optarena's: torch always iterates in bf16).
    pub struct MuonConfig for "Muon" {
        /// Learning rate `γ`, before the shape adjustment (`adjust_lr_fn`).
        lr: f64 = 1e-3,
        /// Decoupled weight decay `λ`: parameters are multiplied by `1 − γλ` each step.
        weight_decay: f64 = 0.1,
        /// Momentum factor `μ`.
        momentum: f64 = 0.95,
        /// Nesterov momentum: orthogonalise `g + μ(B − g)` instead of `B`.
        nesterov: bool = true,
        /// `(a, b, c)` of the quintic Newton–Schulz iteration `X ← aX + (bA + cA²)X`,
        /// `A = XXᵀ` (Keller Jordan's, chosen to maximise the slope at zero).
        ns_coefficients: (f64, f64, f64) = (3.4445, -4.7750, 2.0315),
        /// The matrix is divided by `max(‖X‖_F, eps)` before the iteration.
        eps: f64 = 1e-7,
        /// Newton–Schulz iterations (torch requires fewer than 100).
        ns_steps: usize = 5,
        /// How the learning rate is scaled by the shape `[A, B]`: `None` or `"original"`
        /// (`√max(1, A/B)`), `"match_rms_adamw"` (`0.2·√max(A, B)`), `"spectral_unclamped"`
        /// (`√(A/B)`).
        adjust_lr_fn: Option<String> = None,
        /// Precision of the Newton–Schulz iteration: [`NsPrecision::Bf16`] (torch's, the
        /// default) or [`NsPrecision::Full`] (the parameter's type, no rounding). Saved as
        /// `"bf16"` / `"full"`.
        ns_precision: NsPrecision = NsPrecision::Bf16,
    }
}

fn invalid(msg: String) -> Result<()> {
    Err(Error::InvalidHyperparameter(msg))
}

impl MuonConfig {
    /// torch's checks, in torch's order and with its messages (NaN fails each, as it fails
    /// torch's comparisons). torch checks `ns_steps` only when it steps; here it is checked
    /// with the rest. A NaN `eps` is refused too (torch has no check).
    fn check(&self) -> Result<()> {
        if self.lr.is_nan() || self.lr < 0.0 {
            return invalid(format!(
                "Learning rate should be >= 0 but is: {:?}",
                self.lr
            ));
        }
        if self.momentum.is_nan() || self.momentum < 0.0 {
            return invalid(format!(
                "momentum should be >= 0 but is: {:?}",
                self.momentum
            ));
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return invalid(format!(
                "weight decay should be >= 0 but is: {:?}",
                self.weight_decay
            ));
        }
        if AdjustLr::from_name(self.adjust_lr_fn.as_deref()).is_none() {
            return invalid(format!(
                "Adjust learning rate function {} is not supported",
                self.adjust_lr_fn.as_deref().unwrap_or("None")
            ));
        }
        if self.ns_steps >= 100 {
            return invalid(
                "Number of steps must be less than 100 for computational efficiency".to_string(),
            );
        }
        if self.eps.is_nan() {
            return invalid(format!("Invalid eps value: {:?}", self.eps));
        }
        let (a, b, c) = self.ns_coefficients;
        for x in [a, b, c] {
            if x.is_nan() {
                return invalid(format!("Invalid ns_coefficients value: {x:?}"));
            }
        }
        Ok(())
    }
}

/// The Muon algorithm (see [`Muon`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct MuonAlgorithm;

/// Muon (torch's `Muon`): momentum, orthogonalised by a Newton–Schulz iteration, for the 2-D
/// weight matrices of a network's hidden layers. Embeddings, norms, biases and the output
/// layer are left to another optimizer (AdamW), as torch's documentation says.
///
/// With `G` the gradient of an `A × B` parameter `θ`, momentum buffer `M` (starting at zero),
/// learning rate `γ`, weight decay `λ`, momentum `μ` and coefficients `(a, b, c)`:
///
/// ```text
/// M ← M + (1 − μ)(G − M)                     (buf.lerp_(grad, 1 − μ))
/// U ← G + μ(M − G) if nesterov, else M       (grad.lerp(buf, μ))
/// X ← U (transposed if A > B), in bf16
/// X ← X / max(‖X‖_F, ε)
/// repeat ns_steps times:
///     S ← X Xᵀ
///     X ← aX + (bS + cS²) X
/// O ← X (transposed back)
/// θ ← θ(1 − γλ)
/// θ ← θ − adjust(γ, A, B) · O
/// ```
///
/// `adjust` is `γ·√max(1, A/B)` (`adjust_lr_fn` `None`/`"original"`), `γ·0.2·√max(A, B)`
/// (`"match_rms_adamw"`) or `γ·√(A/B)` (`"spectral_unclamped"`).
///
/// Jordan, Jin, Boza, You, Cesista, Newhouse & Bernstein, "Muon: An optimizer for hidden
/// layers in neural networks" (2024, <https://kellerjordan.github.io/posts/muon/>); Liu et al.,
/// "Muon is Scalable for LLM Training" (2025, `match_rms_adamw`); Bernstein, "Deriving Muon"
/// (2025, `spectral_unclamped`). The momentum is written with `lerp` as torch writes it: `M`
/// is an exponential moving average, `(1 − μ)` times the paper's `μM + G`.
///
/// State: `momentum_buffer` (torch's key, the parameter's shape); torch keeps no `step`.
/// Every parameter must be 2-D (torch's error otherwise, when the group is added).
///
/// The iteration runs in bf16 as torch's does ([`NsPrecision::Bf16`], see
/// [`crate::kernels::muon`] for where it rounds), or without rounding
/// (`ns_precision: NsPrecision::Full`). Each parameter is updated whole on one thread, its
/// products single-threaded, so a step is bitwise the same on any number of threads. Unlike
/// the elementwise optimizers a step allocates (the GEMM's packing buffers).
///
/// ```
/// use optarena::{ArenaBuilder, Muon, MuonConfig, ParamGroup};
///
/// let mut b = ArenaBuilder::<f32>::new();
/// let w = b.param_with("fc.weight", &[4, 3], |i| (i as f32 * 0.7).sin())?;
/// let mut arena = b.build();
/// let mut opt = Muon::new(&arena, [ParamGroup::all()], MuonConfig::default().with_lr(0.02))?;
/// arena.set_grad(w, &[0.1, -0.2, 0.3, 0.1, 0.0, -0.1, 0.2, 0.2, -0.3, 0.05, 0.4, -0.2])?;
/// opt.step(&mut arena)?;
/// assert_eq!(opt.buffer(w, "momentum_buffer").unwrap().len(), 12);
/// # Ok::<(), optarena::Error>(())
/// ```
pub type Muon<T> = Optimizer<T, MuonAlgorithm>;

impl Algorithm for MuonAlgorithm {
    const NAME: &'static str = "Muon";
    const TRACKS_STEP: bool = false;
    const PER_PARAMETER: bool = true;
    type Config = MuonConfig;
    type Scalars = ();
    type Coeffs = MuonCoeffs;

    fn buffers(_: &MuonConfig) -> &'static [&'static str] {
        &["momentum_buffer"]
    }

    /// torch's check: `Muon only supports 2D parameters whereas we found a parameter with
    /// size: torch.Size([...])`.
    fn check_param(shape: &[usize]) -> Result<()> {
        if shape.len() == 2 {
            return Ok(());
        }
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        invalid(format!(
            "Muon only supports 2D parameters whereas we found a parameter with size: torch.Size([{}])",
            dims.join(", ")
        ))
    }

    fn prepare(c: &MuonConfig, _step: u64, _: &mut ()) -> MuonCoeffs {
        MuonCoeffs {
            lr: c.lr,
            weight_decay: c.weight_decay,
            momentum: c.momentum,
            nesterov: c.nesterov,
            ns_coefficients: c.ns_coefficients,
            eps: c.eps,
            ns_steps: c.ns_steps,
            // Checked by `validate` before every step.
            adjust_lr: AdjustLr::from_name(c.adjust_lr_fn.as_deref()).unwrap_or(AdjustLr::Original),
            precision: c.ns_precision,
        }
    }

    /// The update of a parameter taken as one row (the optimizer calls
    /// [`Algorithm::fused_param`] with the real shape instead).
    fn fused<T: Float>(a: &KernelArgs<MuonCoeffs>, p: &mut [T], g: &[T], b: &mut [&mut [T]]) {
        kernel::step(&a.coeffs, a.grad_scale, &[1, p.len()], p, g, b[0], false)
    }

    /// The reference of [`MuonAlgorithm::fused`].
    fn reference<T: Float>(a: &KernelArgs<MuonCoeffs>, p: &mut [T], g: &[T], b: &mut [&mut [T]]) {
        kernel::step(&a.coeffs, a.grad_scale, &[1, p.len()], p, g, b[0], true)
    }

    fn fused_param<T: Float>(
        a: &KernelArgs<MuonCoeffs>,
        shape: &[usize],
        p: &mut [T],
        g: &[T],
        b: &mut [&mut [T]],
        _: &mut [&mut [T]],
    ) {
        kernel::step(&a.coeffs, a.grad_scale, shape, p, g, b[0], false)
    }

    fn reference_param<T: Float>(
        a: &KernelArgs<MuonCoeffs>,
        shape: &[usize],
        p: &mut [T],
        g: &[T],
        b: &mut [&mut [T]],
        _: &mut [&mut [T]],
    ) {
        kernel::step(&a.coeffs, a.grad_scale, shape, p, g, b[0], true)
    }
}
