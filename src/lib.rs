//! # optarena
//!
//! PyTorch's `torch.optim` on the CPU, without the overhead: every parameter of a model lives in
//! one flat, 64-byte-aligned [`Arena`]; gradients and each optimizer state buffer share its
//! layout; a param group is any set of parameters, updated by one fused SIMD pass over each of
//! its runs of consecutive parameters (one run when they were registered together) that rayon
//! spreads over threads. Results are bitwise the same for any thread count, and the numbers
//! match torch's single-tensor code paths (see `tests/parity.rs`).
//!
//! ```
//! use optarena::{Adam, AdamConfig, ArenaBuilder, MatchBy, ParamGroup};
//!
//! // Register parameters: name, shape, initial values.
//! let mut b = ArenaBuilder::<f32>::new();
//! let w = b.param("linear.weight", &[1, 2], &[0.5, -0.5])?;
//! let bias = b.zeros("linear.bias", &[1])?;
//! let mut arena = b.build();
//!
//! // torch: Adam(model.parameters(), lr=0.05)
//! let mut opt = Adam::new(&arena, [ParamGroup::all()], AdamConfig::default().with_lr(0.05))?;
//!
//! // Fit y = 2x₀ − x₁ + 1 on a few points.
//! let data = [([1.0f32, 0.0], 3.0f32), ([0.0, 1.0], 0.0), ([1.0, 1.0], 2.0), ([2.0, 0.5], 4.5)];
//! let mut loss = 0.0;
//! for _ in 0..500 {
//!     opt.zero_grad(&mut arena, true)?;
//!     loss = 0.0;
//!     let (wv, bv) = (arena.value(w).to_vec(), arena.value(bias)[0]);
//!     for (x, y) in data {
//!         let err = wv[0] * x[0] + wv[1] * x[1] + bv - y;
//!         loss += err * err / data.len() as f32;
//!         let gw = arena.grad_mut(w);
//!         gw[0] += 2.0 * err * x[0] / data.len() as f32;
//!         gw[1] += 2.0 * err * x[1] / data.len() as f32;
//!         arena.grad_mut(bias)[0] += 2.0 * err / data.len() as f32;
//!     }
//!     opt.step(&mut arena)?;
//! }
//! assert!(loss < 1e-3, "loss {loss}");
//!
//! // Save and reload: parameters are named, never matched by pointer.
//! let saved = opt.state_dict_json()?;
//! opt.load_state_dict_json(&saved, MatchBy::Name)?;
//! # Ok::<(), optarena::Error>(())
//! ```
//!
//! ## Where optarena differs from torch, on purpose
//! - `load_state_dict` checks kinds, shapes and lengths and can match parameters by name
//!   ([`MatchBy::Name`]); torch matches by position only and loads mismatches silently.
//! - [`StepOptions::skipping_non_finite`] skips a step whose gradients hold NaN or infinity and leaves
//!   everything as it was; a plain torch step lets one bad batch corrupt the weights and state.
//! - NaN hyperparameters are rejected everywhere (torch's `lr < 0.0` lets NaN through).
//! - A failed call changes nothing.
//! - Subnormal numbers are flushed to zero inside a step's kernels by default (the caller's
//!   floating-point environment is left as it was); [`Subnormals::Preserve`] gives torch's
//!   gradual underflow. [`subnormals`] explains why flushing is harmless and when it is not.
//! - Adagrad's state is created on a parameter's first gradient, as every other optimizer's
//!   is; torch creates it at construction, so its state dict also lists never-stepped
//!   parameters with `step: 0`. The numbers are the same (see [`Adagrad`]).
//!
//! ## Internals
//! The per-algorithm update kernels (`optarena::kernels`: each fused SIMD kernel and its
//! scalar reference) and the roofline kernel the benchmarks measure steps against
//! (`optarena::roofline`) are public so that this crate's benchmarks, examples, fuzz targets
//! and tests can call them, but hidden from the documentation: they are not part of the API
//! and may change in any release. The kernel plumbing that [`optimizer::Algorithm`]'s methods
//! name (`kernels::Pass`) lives there too, so an `Algorithm` written outside the crate depends
//! on internals.

#![deny(missing_docs)]
#![warn(rust_2018_idioms)]

pub mod arch;
pub mod arena;
pub mod averaged;
mod buffer;
pub mod checkpoint;
pub mod clip;
pub mod distributed;
pub mod error;
pub mod float;
pub mod hyper;
// Internals (see "Internals" in the crate docs): public for the benchmarks, examples, fuzz
// targets and tests, hidden from the documentation and outside the semver promise.
#[doc(hidden)]
pub mod kernels;
pub mod mixed;
pub mod optim;
pub mod optimizer;
pub mod parallel;
#[doc(hidden)]
pub mod roofline;
pub mod scaler;
pub mod schedule;
pub mod state;
pub mod subnormals;

pub use arch::SimdLevel;
pub use arena::{Arena, ArenaBuilder, Param, ParamInfo};
pub use averaged::{AverageFn, AveragedModel, AveragedState};
pub use clip::NormType;
pub use error::{Error, Result};
pub use float::{Float, Lane};
pub use hyper::{GroupHyperparams, HyperValue, Hyperparams};
pub use mixed::{HalfBuffer, ParamRounding, StatePrecision, Storage};
pub use optim::*;
pub use optimizer::{
    Algorithm, ClipNorm, HookHandle, KernelArgs, Optimizer, ParamGroup, ParamScalars, StepHook,
    StepOptions, StepOutcome, StepReport, Untyped,
};
pub use parallel::Parallelism;
pub use scaler::{GradScaler, StepWithOptions};
pub use schedule::LrScheduler;
pub use state::{MatchBy, StateDict};
pub use subnormals::Subnormals;

/// The README's code blocks, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The checkpoint documentation's code blocks (`docs/checkpoints.md`), as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../docs/checkpoints.md")]
pub struct CheckpointDocDoctests;

/// A deprecated alias for a type renamed to torch's spelling (README's "Naming"): downstream
/// code that names the old type still builds, with a deprecation warning naming the new one.
/// The aliases are hidden from the documentation.
macro_rules! renamed {
    ($($(#[$attr:meta])* $old:ident $(<$t:ident>)? => $new:ident;)*) => {$(
        $(#[$attr])*
        #[doc(hidden)]
        pub type $old $(<$t>)? = $new $(<$t>)?;
    )*};
}
pub(crate) use renamed;
