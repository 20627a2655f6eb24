//! The [`Algorithm`] trait: what differs between SGD, Adam, RAdam, ... and the per-step
//! arguments its kernels get.

use std::ops::Range;

use crate::arch::SimdLevel;
use crate::error::Result;
use crate::float::Float;
use crate::hyper::Hyperparams;
use crate::kernels::Pass;

/// Most state buffers any algorithm keeps per parameter.
pub const MAX_BUFFERS: usize = 4;

/// Most shaped state buffers ([`Algorithm::aux_buffers`]) any algorithm keeps per parameter.
pub const MAX_AUX_BUFFERS: usize = 4;

/// Per-parameter scalar state besides the step count (ASGD's `eta` and `mu`, NAdam's
/// `mu_product`). `()` for algorithms that have none.
pub trait ParamScalars:
    Copy + Default + PartialEq + std::fmt::Debug + Send + Sync + 'static
{
    /// torch's state keys for the scalars, in order.
    const NAMES: &'static [&'static str];
    /// The values, in [`ParamScalars::NAMES`] order.
    fn values(&self) -> Vec<f64>;
    /// Rebuilds from values in [`ParamScalars::NAMES`] order.
    fn from_values(values: &[f64]) -> Self;
}

impl ParamScalars for () {
    const NAMES: &'static [&'static str] = &[];
    fn values(&self) -> Vec<f64> {
        Vec::new()
    }
    fn from_values(_: &[f64]) -> Self {}
}

/// Arguments of one kernel call, beyond the slices.
#[derive(Debug, Clone, Copy)]
pub struct KernelArgs<C> {
    /// The per-step scalars [`Algorithm::prepare`] computed for this run.
    pub coeffs: C,
    /// True when the run's state buffers were created this step (SGD then sets its momentum
    /// buffer to the gradient, as torch does).
    pub fresh: bool,
    /// Factor every gradient is multiplied by before use: 1 for a plain step, `1/scale` to
    /// unscale, a clip coefficient to clip. Multiplying by 1 is exact, so a plain step matches
    /// torch bit for bit.
    pub grad_scale: f64,
    /// The widest instruction set the kernel may use (the optimizer's
    /// [`crate::Optimizer::set_simd_level`]); every level gives the same bits.
    pub simd: SimdLevel,
}

/// An elementwise optimization algorithm: what differs between SGD, Adam, RAdam, ...
pub trait Algorithm: Send + Sync + 'static {
    /// torch's class name (`"Adam"`).
    const NAME: &'static str;
    /// Whether torch keeps `state["step"]` for it (SGD does not).
    const TRACKS_STEP: bool = true;
    /// Whether the update depends on subnormal values beyond their size, so that flushing
    /// them could change it by more than their magnitude (Rprop's sign of `grad · prev`, which
    /// is zero when the product flushes). Such an algorithm always steps with
    /// [`crate::Subnormals::Preserve`], whatever [`crate::Optimizer::set_subnormals`] says.
    const NEEDS_SUBNORMALS: bool = false;
    /// The hyperparameters of one group.
    type Config: Hyperparams + serde::Serialize + serde::de::DeserializeOwned;
    /// Per-parameter scalar state besides `step`.
    type Scalars: ParamScalars;
    /// Per-step scalars computed once per run in f64.
    type Coeffs: Copy + Send + Sync + std::fmt::Debug;

    /// torch's names of the state buffers this config needs, in order. Each is as long as the
    /// parameter.
    fn buffers(config: &Self::Config) -> &'static [&'static str];

    /// The value buffer `index` starts at (Adagrad's `initial_accumulator_value`, Rprop's `lr`).
    fn buffer_init(_config: &Self::Config, _index: usize) -> f64 {
        0.0
    }

    /// The value buffer `index` of a group with config `config` starts at, in an optimizer
    /// built with `defaults`. [`Algorithm::buffer_init`] of the group's config unless the
    /// algorithm overrides it: torch's Adagrad fills `sum` with the constructor's
    /// `initial_accumulator_value` whatever a group says.
    fn buffer_init_in(config: &Self::Config, _defaults: &Self::Config, index: usize) -> f64 {
        Self::buffer_init(config, index)
    }

    /// Per-parameter scalars of a new state.
    fn init_scalars(_config: &Self::Config) -> Self::Scalars {
        Self::Scalars::default()
    }

    /// Computes the run's per-step scalars for step number `step` (already incremented), and
    /// advances `scalars` as torch does after the update.
    fn prepare(config: &Self::Config, step: u64, scalars: &mut Self::Scalars) -> Self::Coeffs;

    /// The fused SIMD update over one contiguous piece: `params`, `grads` and every buffer have
    /// the same length.
    fn fused<T: Float>(
        args: &KernelArgs<Self::Coeffs>,
        params: &mut [T],
        grads: &[T],
        buffers: &mut [&mut [T]],
    );

    /// Whether [`Algorithm::fused_pass`] is implemented, so that the optimizer can step in
    /// mixed precision ([`crate::Optimizer::step_mixed`]): every elementwise algorithm, not the
    /// per-parameter ones (Adafactor, Muon) nor L-BFGS.
    const MIXED_PRECISION: bool = false;

    /// The fused update of [`Algorithm::fused`] over any [`Pass`]: the same op over
    /// half-precision streams (`crate::mixed::MixedPass`). Only called when
    /// [`Algorithm::MIXED_PRECISION`] is set; the default is never called.
    fn fused_pass<T: Float, P: Pass<T>>(args: &KernelArgs<Self::Coeffs>, pass: P) {
        let _ = (args, pass);
        unreachable!("{} has no mixed-precision kernel", Self::NAME)
    }

    /// The fused update over f32 lanes in the order of torch's compiled fused CPU kernel
    /// (`fused=True`), where that differs from [`Algorithm::fused_pass`]: SGD, Adam, AdamW
    /// and Adagrad, whose ATen kernels fuse multiply-adds ([`crate::kernels::torch_fused`]).
    /// [`crate::Optimizer::step_half`] steps half-precision parameters with it, as torch steps bf16
    /// parameters. The default is [`Algorithm::fused_pass`].
    fn torch_fused_pass<P: Pass<f32>>(args: &KernelArgs<Self::Coeffs>, pass: P) {
        Self::fused_pass::<f32, P>(args, pass)
    }

    /// The scalar reference: the same update written as torch's sequence of tensor operations,
    /// one pass per operation. The oracle the fused kernel is tested against.
    fn reference<T: Float>(
        args: &KernelArgs<Self::Coeffs>,
        params: &mut [T],
        grads: &[T],
        buffers: &mut [&mut [T]],
    );

    /// Checks that a parameter of shape `shape` can be optimized at all, when a group holding it
    /// is added (torch's constructor checks: Muon takes only 2-D parameters). The default
    /// accepts every shape.
    fn check_param(_shape: &[usize]) -> Result<()> {
        Ok(())
    }

    /// Whether every kernel call gets exactly one whole parameter and its shape (through
    /// [`Algorithm::fused_param`] and [`Algorithm::reference_param`]) instead of a piece of a
    /// run that may span parameters. For updates that need reductions over each parameter.
    /// Parameters then run in parallel with each other, each on one thread.
    const PER_PARAMETER: bool = false;

    /// torch's names of the shaped state of a parameter of shape `shape`: buffers whose length
    /// follows from the shape instead of equalling the parameter's (Adafactor's `row_var` and
    /// `col_var`), at most [`MAX_AUX_BUFFERS`], none sharing a name with
    /// [`Algorithm::buffers`]. They depend on the shape only, never on the config; each starts
    /// at zero when the parameter's state is created. Only a [`Algorithm::PER_PARAMETER`]
    /// algorithm's kernels receive them.
    fn aux_buffers(_shape: &[usize]) -> &'static [&'static str] {
        &[]
    }

    /// The length of shaped buffer `index` (of [`Algorithm::aux_buffers`]) of a parameter of
    /// shape `shape`.
    fn aux_len(_shape: &[usize], _index: usize) -> usize {
        0
    }

    /// The tensor shape shaped buffer `index` is saved with in a binary checkpoint (torch's
    /// shape for it); its product is [`Algorithm::aux_len`]. The default is flat.
    fn aux_shape(shape: &[usize], index: usize) -> Vec<usize> {
        vec![Self::aux_len(shape, index)]
    }

    /// The fused update of one whole parameter of shape `shape`, called instead of
    /// [`Algorithm::fused`] when [`Algorithm::PER_PARAMETER`] is set: `buffers` as for
    /// `fused`, `aux` the shaped buffers of [`Algorithm::aux_buffers`] (each as long as
    /// [`Algorithm::aux_len`] says). The default ignores the shape and runs `fused`.
    fn fused_param<T: Float>(
        args: &KernelArgs<Self::Coeffs>,
        shape: &[usize],
        params: &mut [T],
        grads: &[T],
        buffers: &mut [&mut [T]],
        aux: &mut [&mut [T]],
    ) {
        let _ = (shape, aux);
        Self::fused(args, params, grads, buffers)
    }

    /// The scalar reference of [`Algorithm::fused_param`]. The default runs
    /// [`Algorithm::reference`].
    fn reference_param<T: Float>(
        args: &KernelArgs<Self::Coeffs>,
        shape: &[usize],
        params: &mut [T],
        grads: &[T],
        buffers: &mut [&mut [T]],
        aux: &mut [&mut [T]],
    ) {
        let _ = (shape, aux);
        Self::reference(args, params, grads, buffers)
    }
}

/// Element ranges of the shaped state buffers of a parameter of shape `shape` whose shaped
/// state starts at `start`, in [`Algorithm::aux_buffers`] order.
pub(crate) fn aux_ranges<A: Algorithm>(
    shape: &[usize],
    start: usize,
) -> impl Iterator<Item = Range<usize>> + '_ {
    let mut at = start;
    (0..A::aux_buffers(shape).len()).map(move |k| {
        let r = at..at + A::aux_len(shape, k);
        at = r.end;
        r
    })
}
