//! The optimizer machinery shared by every elementwise algorithm: param groups, lazy state,
//! the fused parallel step, and `state_dict` / `load_state_dict`.
//!
//! An algorithm (SGD, Adam, ...) implements [`Algorithm`]: its config, the names of its state
//! buffers, the per-step scalars it computes once per group in f64, and two kernels over
//! contiguous slices, a fused SIMD one and a scalar reference. [`Optimizer`] does the rest.
//!
//! # How a step runs
//! 1. Every group's hyperparameters are checked; on an error nothing has changed.
//! 2. Parameters with a gradient get their state on first use, exactly as torch's lazy state
//!    init does. Parameters without one (`grad is None`) are skipped: no state, no step count,
//!    no weight decay.
//! 3. Parameters of a group that are consecutive in the arena and whose state agrees (same
//!    step count, same scalars) form a run. A group may hold any set of parameters (torch's
//!    decay / no-decay recipe interleaves two groups); it is laid out as its maximal runs of
//!    consecutive parameters, its state buffers holding them back to back, so a group
//!    registered in one piece has exactly the arena's layout. The algorithm's per-step scalars
//!    are computed once per run in f64.
//! 4. Runs are cut into [`CHUNK`]-element pieces and the fused kernel runs on each, on the
//!    [`Parallelism`] the optimizer was given. The piece length never depends on the thread
//!    count, so the result is bitwise the same on any number of threads; the kernels are
//!    elementwise, so a parameter's result does not depend on how its group is fragmented
//!    either.
//!
//! Once state exists a step allocates nothing: the work list is kept between steps.
//!
//! # Per-parameter algorithms
//! Most algorithms are elementwise, and the steps above cut runs anywhere. An algorithm whose
//! update needs reductions over each parameter (Adafactor's RMS scaling and its factored second
//! moments) sets [`Algorithm::PER_PARAMETER`]: then runs never merge parameters and are never
//! cut, so each kernel call gets exactly one whole parameter, and it gets the parameter's shape
//! too ([`Algorithm::fused_param`]). Such an algorithm may also keep *shaped* state
//! ([`Algorithm::aux_buffers`]): buffers whose length follows from the parameter's shape
//! instead of equalling it (Adafactor's `row_var` of shape `[..., m, 1]`). They live in one
//! more per-group buffer, each parameter's back to back, are created (zeroed) with the
//! parameter's state, and are saved and loaded by name beside the elementwise buffers.
//! Parameters then run in parallel with each other, each on one thread, and a kernel's
//! reductions run in a fixed order, so the result is still bitwise the same on any number of
//! threads. The elementwise algorithms are untouched by all of this: every addition has a
//! default that keeps their behaviour.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::arch::SimdLevel;
use crate::arena::{filled, AlignedBuf, Arena, Param, ParamInfo};
use crate::buffer::Role;
pub use crate::clip::ClipNorm;
use crate::clip::NormScratch;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::hyper::{GroupHyperparams, HyperValue, Hyperparams};
use crate::kernels::Pass;
use crate::mixed::StatePrecision;
use crate::parallel::{Exec, Parallelism, CHUNK, PARALLEL_THRESHOLD};
use crate::state::{GroupDict, MatchBy, ParamRef, ParamStateDict, StateDict, STATE_DICT_FORMAT};
use crate::subnormals::Subnormals;

mod checkpoint_access;
mod mixed_step;
pub(crate) use checkpoint_access::{SavedState, Staged, StateRef};

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
    /// [`Optimizer::set_simd_level`]); every level gives the same bits.
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
    /// [`Subnormals::Preserve`], whatever [`Optimizer::set_subnormals`] says.
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
    /// mixed precision ([`Optimizer::step_mixed`]): every elementwise algorithm, not the
    /// per-parameter ones (Adafactor, Muon) nor L-BFGS.
    const MIXED_PRECISION: bool = false;

    /// The fused update of [`Algorithm::fused`] over any [`Pass`]: the same op over
    /// half-precision streams ([`crate::mixed::MixedPass`]). Only called when
    /// [`Algorithm::MIXED_PRECISION`] is set; the default is never called.
    fn fused_pass<T: Float, P: Pass<T>>(args: &KernelArgs<Self::Coeffs>, pass: P) {
        let _ = (args, pass);
        unreachable!("{} has no mixed-precision kernel", Self::NAME)
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
fn aux_ranges<A: Algorithm>(
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

/// The parameters of one param group and the hyperparameters it overrides.
///
/// ```
/// use optarena::{ArenaBuilder, ParamGroup};
/// let mut b = ArenaBuilder::<f32>::new();
/// let w = b.zeros("w", &[4]).unwrap();
/// let bias = b.zeros("b", &[1]).unwrap();
/// let group = ParamGroup::new([w, bias]).with("lr", 0.01).with("weight_decay", 0.0);
/// # let _ = group;
/// ```
#[derive(Debug, Clone)]
pub struct ParamGroup<T> {
    params: Selection<T>,
    overrides: Vec<(String, HyperValue)>,
}

#[derive(Debug, Clone)]
enum Selection<T> {
    Handles(Vec<Param<T>>),
    Names(Vec<String>),
    All,
}

impl<T: Float> ParamGroup<T> {
    /// A group of the given parameters, in any order and any layout: they need not be
    /// registered one after another (torch's weight-decay recipe puts every weight in one group
    /// and every bias in another, interleaved in the arena). The group is stepped as the
    /// maximal runs of consecutive parameters it holds; parameters registered one after
    /// another form one run, updated by one fused pass exactly as a single slice.
    pub fn new(params: impl IntoIterator<Item = Param<T>>) -> Self {
        ParamGroup {
            params: Selection::Handles(params.into_iter().collect()),
            overrides: Vec::new(),
        }
    }

    /// A group of the parameters with these names.
    pub fn named<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        ParamGroup {
            params: Selection::Names(names.into_iter().map(Into::into).collect()),
            overrides: Vec::new(),
        }
    }

    /// A group of every parameter in the arena.
    pub fn all() -> Self {
        ParamGroup {
            params: Selection::All,
            overrides: Vec::new(),
        }
    }

    /// Overrides one hyperparameter for this group (torch's per-group dict entries).
    pub fn with(mut self, name: &str, value: impl Into<HyperValue>) -> Self {
        self.overrides.push((name.to_string(), value.into()));
        self
    }

    /// The hyperparameters this group overrides, in the order given.
    pub(crate) fn overrides(&self) -> &[(String, HyperValue)] {
        &self.overrides
    }

    /// Resolves to arena positions in ascending (arena) order, checking emptiness and
    /// duplicates. Any set of parameters is accepted, in any layout.
    pub(crate) fn resolve(&self, arena: &Arena<T>) -> Result<Vec<usize>> {
        let mut idx: Vec<usize> = match &self.params {
            Selection::All => (0..arena.num_params()).collect(),
            Selection::Handles(h) => {
                let mut v = Vec::with_capacity(h.len());
                for p in h {
                    if arena.param_at(p.index()) != Some(*p) {
                        return Err(Error::ArenaMismatch(
                            "a parameter handle in this group belongs to another arena".into(),
                        ));
                    }
                    v.push(p.index());
                }
                v
            }
            Selection::Names(names) => names
                .iter()
                .map(|n| arena.find(n).map(|p| p.index()))
                .collect::<Result<_>>()?,
        };
        if idx.is_empty() {
            return Err(Error::EmptyParamList);
        }
        idx.sort_unstable();
        let infos = arena.infos();
        for w in idx.windows(2) {
            if w[0] == w[1] {
                return Err(Error::DuplicateParamInGroup {
                    name: infos[w[0]].name.clone(),
                });
            }
        }
        Ok(idx)
    }
}

/// The maximal runs of consecutive arena positions in `params` (ascending, no duplicates):
/// the layout of a group. A group whose parameters were registered one after another is one
/// run.
pub(crate) fn runs_of(params: &[usize]) -> Vec<Range<usize>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    for &i in params {
        match runs.last_mut() {
            Some(r) if r.end == i => r.end = i + 1,
            _ => runs.push(i..i + 1),
        }
    }
    runs
}

/// The first parameter position two ascending position lists share, if any.
fn first_common(a: &[usize], b: &[usize]) -> Option<usize> {
    let (mut x, mut y) = (0, 0);
    while x < a.len() && y < b.len() {
        match a[x].cmp(&b[y]) {
            std::cmp::Ordering::Less => x += 1,
            std::cmp::Ordering::Greater => y += 1,
            std::cmp::Ordering::Equal => return Some(a[x]),
        }
    }
    None
}

/// One parameter's state inside the optimizer.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ParamState<S> {
    step: u64,
    scalars: S,
    /// How many of the algorithm's buffers hold live state for this parameter.
    live_buffers: u8,
}

/// Consecutive parameters of a group whose state agrees, being collected into one run.
struct OpenRun<S> {
    /// First and last parameter (positions in the group).
    first: usize,
    last: usize,
    /// One past the run's last arena element.
    end: usize,
    /// The state every parameter of the run shares.
    state: ParamState<S>,
    /// Whether the run's buffers were created this step.
    fresh: bool,
}

/// A param group inside the optimizer.
///
/// Its parameters are any set of arena positions, kept in ascending order; `runs` are their
/// maximal runs of consecutive positions. The state buffers hold the runs' elements back to
/// back, so a group of one run has exactly the arena's layout over its slice, and parameter
/// `j`'s state starts at `locals[j]` in every buffer.
struct Group<T, A: Algorithm> {
    config: A::Config,
    /// Arena positions of the group's parameters, ascending.
    params: Vec<usize>,
    /// The maximal runs of consecutive positions in `params`, ascending.
    runs: Vec<Range<usize>>,
    /// Where each parameter's elements start in the state buffers.
    locals: Vec<usize>,
    /// Elements in the group: the length of each state buffer.
    len: usize,
    /// One entry per parameter; `None` until it first has a gradient.
    state: Vec<Option<ParamState<A::Scalars>>>,
    /// State buffers, each `len` long, named by `A::buffers(config)`. Empty under
    /// [`StatePrecision::Bf16`], which keeps them in `half_buffers` instead.
    buffers: Vec<AlignedBuf<T>>,
    /// The state buffers under [`StatePrecision::Bf16`] (else empty).
    half_buffers: Vec<AlignedBuf<half::bf16>>,
    /// Where each parameter's shaped state ([`Algorithm::aux_buffers`]) starts in `aux`, one
    /// entry per parameter and one for the end. All zero for algorithms without shaped state.
    aux_offsets: Vec<usize>,
    /// Every parameter's shaped state, back to back; empty until the first state exists.
    aux: AlignedBuf<T>,
}

impl<T: Float, A: Algorithm> Clone for Group<T, A> {
    fn clone(&self) -> Self {
        Group {
            config: self.config.clone(),
            params: self.params.clone(),
            runs: self.runs.clone(),
            locals: self.locals.clone(),
            len: self.len,
            state: self.state.clone(),
            buffers: self.buffers.clone(),
            half_buffers: self.half_buffers.clone(),
            aux_offsets: self.aux_offsets.clone(),
            aux: self.aux.clone(),
        }
    }
}

impl<T: Float, A: Algorithm> Group<T, A> {
    /// Position of arena parameter `i` in the group, if the group holds it.
    fn position(&self, i: usize) -> Option<usize> {
        self.params.binary_search(&i).ok()
    }

    /// Elements `range` of state buffer `k`, in `T` (bf16 state widened exactly).
    fn buffer_values(&self, k: usize, range: Range<usize>) -> Vec<T> {
        if self.half_buffers.is_empty() {
            self.buffers[k][range].to_vec()
        } else {
            self.half_buffers[k][range]
                .iter()
                .map(|x| T::from_f64(x.to_f64()))
                .collect()
        }
    }

    /// Allocates the shaped state buffer (zeroed) if the algorithm keeps shaped state and it
    /// is not allocated yet.
    fn ensure_aux(&mut self) {
        let total = self.aux_offsets.last().copied().unwrap_or(0);
        if self.aux.len() != total {
            self.aux = filled(total, T::ZERO);
        }
    }

    /// Re-lays the state buffers out by name after the config changed from `old` to one that
    /// keeps other buffers (RMSprop's `momentum` or `centered`, Adam's `amsgrad`), so each
    /// buffer keeps its meaning: a buffer both configs keep moves to its new position with its
    /// values; one the new config drops is freed; one it adds before a kept one starts at its
    /// initial value. Buffers it adds at the end are left to the next step, which initialises
    /// them as on first use (so SGD's new momentum buffer still starts at the gradient).
    fn relayout_buffers(&mut self, old: &A::Config) {
        let old_names = A::buffers(old);
        let new_names = A::buffers(&self.config);
        if old_names == new_names {
            return;
        }
        let mut old_buffers: Vec<Option<AlignedBuf<T>>> = std::mem::take(&mut self.buffers)
            .into_iter()
            .map(Some)
            .collect();
        // Where each new buffer was: its old index, when it was allocated.
        let source: Vec<Option<usize>> = new_names
            .iter()
            .map(|name| {
                old_names
                    .iter()
                    .position(|n| n == name)
                    .filter(|&j| j < old_buffers.len())
            })
            .collect();
        if !old_buffers.is_empty() {
            let gl = self.len;
            for (k, src) in source.iter().enumerate() {
                let moved = src.and_then(|j| old_buffers[j].take());
                self.buffers.push(moved.unwrap_or_else(|| {
                    AlignedBuf::filled(
                        Role::State(k),
                        gl,
                        T::from_f64(A::buffer_init(&self.config, k)),
                    )
                }));
            }
        }
        for st in self.state.iter_mut().flatten() {
            // Valid for this parameter: a kept buffer it had, or a new one (holding its
            // initial value). New buffers at the end are left to the next step.
            let valid = source
                .iter()
                .take_while(|src| src.is_none_or(|j| j < st.live_buffers as usize))
                .count();
            let live = source[..valid]
                .iter()
                .rposition(Option::is_some)
                .map_or(0, |k| k + 1);
            st.live_buffers = live as u8;
        }
    }
}

/// Where a mixed-precision step's streams are: the half gradients' presence flags and first
/// byte, and the parameter copy's first byte, each with its element size.
struct MixedStreams<'a> {
    has_grad: &'a [bool],
    grads: *const u8,
    grad_size: usize,
    copy: *mut u8,
    copy_size: usize,
}

/// A state buffer's initial value in bf16 (rounded to nearest even, as torch's `.to(bfloat16)`).
fn bf16_init(init: f64) -> half::bf16 {
    <half::bf16 as crate::mixed::Storage>::from_f32(init as f32)
}

/// One piece of a step: raw pointers into disjoint ranges of the arena and the state buffers.
struct WorkItem<T, C> {
    params: *mut T,
    /// The piece's first gradient: a `T`, or a half-precision element in a mixed step.
    grads: *const u8,
    /// Each state buffer's first element: a `T`, or a bf16 under [`StatePrecision::Bf16`].
    buffers: [*mut u8; MAX_BUFFERS],
    /// A mixed step's parameter copy (null otherwise).
    copy: *mut u8,
    n_buffers: usize,
    len: usize,
    args: KernelArgs<C>,
    /// Arena position of the piece's (first) parameter: the parameter whose shape a
    /// per-parameter kernel gets.
    param: usize,
    /// Shaped state of that parameter (per-parameter algorithms only) and each one's length.
    aux: [*mut T; MAX_AUX_BUFFERS],
    aux_lens: [usize; MAX_AUX_BUFFERS],
    n_aux: usize,
}

// SAFETY: a work item is only a set of pointers to ranges no other work item touches (groups
// hold disjoint sets of parameters, pieces are disjoint sub-ranges of a group's runs, and a
// group's runs occupy disjoint ranges of its state buffers); the step holds the
// `&mut` borrows those pointers came from until every item has run.
unsafe impl<T: Send, C: Send> Send for WorkItem<T, C> {}
// SAFETY: as above; an item is executed by exactly one thread.
unsafe impl<T: Send, C: Sync> Sync for WorkItem<T, C> {}

impl<T: Float, C: Copy> WorkItem<T, C> {
    /// Runs `A`'s fused kernel (or its reference, when `reference`) on the item's slices;
    /// for a per-parameter algorithm, with the parameter's shape from `layout` and its shaped
    /// state.
    ///
    /// # Safety
    /// The pointers must be valid for `len` elements (each shaped state pointer for its
    /// length) and not aliased by any other live reference or concurrently running item.
    unsafe fn run<A: Algorithm<Coeffs = C>>(&self, layout: &[ParamInfo], reference: bool) {
        // SAFETY: guaranteed by the caller (see above).
        let params = unsafe { std::slice::from_raw_parts_mut(self.params, self.len) };
        // SAFETY: as above; grads are only read, and a plain step's point to `T`s.
        let grads = unsafe { std::slice::from_raw_parts(self.grads as *const T, self.len) };
        let mut bufs: [&mut [T]; MAX_BUFFERS] = Default::default();
        for (slot, &ptr) in bufs.iter_mut().zip(&self.buffers[..self.n_buffers]) {
            // SAFETY: as above; each buffer pointer covers `len` elements of its own buffer,
            // of type `T` in a plain step.
            *slot = unsafe { std::slice::from_raw_parts_mut(ptr as *mut T, self.len) };
        }
        let bufs = &mut bufs[..self.n_buffers];
        if !A::PER_PARAMETER {
            if reference {
                A::reference::<T>(&self.args, params, grads, bufs);
            } else {
                A::fused::<T>(&self.args, params, grads, bufs);
            }
            return;
        }
        let mut aux: [&mut [T]; MAX_AUX_BUFFERS] = Default::default();
        for ((slot, &ptr), &len) in aux.iter_mut().zip(&self.aux).zip(&self.aux_lens) {
            if !ptr.is_null() {
                // SAFETY: as above; each shaped state pointer covers its length, in a region
                // of the group's shaped state no other item touches.
                *slot = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
            }
        }
        let aux = &mut aux[..self.n_aux];
        let shape = &layout[self.param].shape;
        if reference {
            A::reference_param::<T>(&self.args, shape, params, grads, bufs, aux);
        } else {
            A::fused_param::<T>(&self.args, shape, params, grads, bufs, aux);
        }
    }
}

/// What a checked step found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    /// The update was applied.
    Applied,
    /// A gradient was NaN or infinite; nothing changed (parameters, state, step counts).
    SkippedNonFinite,
}

/// Options of one step beyond the plain update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOptions {
    /// Every gradient is multiplied by this inside the fused update (an unscale factor
    /// `1/scale`, or `1/k` for k accumulated micro-batches). Multiplying by 1 is exact.
    pub grad_scale: f64,
    /// Check every gradient for NaN and infinity first, and skip the whole step if one is
    /// found (torch's fused `found_inf`, and what a plain torch step lacks: one bad batch then
    /// poisons the weights).
    pub skip_non_finite: bool,
    /// Clip by total norm inside the step: the norm of the (scaled) gradients is computed
    /// first, then the clip coefficient is folded into the fused update. The gradients are
    /// read twice (norm, update) and never rewritten.
    pub clip: Option<ClipNorm>,
}

impl StepOptions {
    /// Checks the options as a step does: a finite `grad_scale` and a `max_norm` that is not
    /// NaN.
    pub fn validate(&self) -> Result<()> {
        self.check_grad_scale()?;
        self.check_max_norm()
    }

    /// A finite `grad_scale` (checked first by every step).
    pub(crate) fn check_grad_scale(&self) -> Result<()> {
        if !self.grad_scale.is_finite() {
            return Err(Error::InvalidHyperparameter(format!(
                "Invalid grad_scale value: {:?}",
                self.grad_scale
            )));
        }
        Ok(())
    }

    /// A clip's `max_norm` that is not NaN (checked by a step after its non-finite guard).
    pub(crate) fn check_max_norm(&self) -> Result<()> {
        if let Some(clip) = self.clip {
            if clip.max_norm.is_nan() {
                return Err(Error::InvalidHyperparameter(
                    "Invalid max_norm value: NaN".to_string(),
                ));
            }
        }
        Ok(())
    }
}

impl Default for StepOptions {
    fn default() -> Self {
        StepOptions {
            grad_scale: 1.0,
            skip_non_finite: false,
            clip: None,
        }
    }
}

/// What a step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Applied, or skipped for a non-finite gradient.
    pub outcome: StepOutcome,
    /// The total gradient norm (of the scaled gradients), when the step clipped.
    pub total_norm: Option<f64>,
    /// The factor the gradients were multiplied by in the update (scale times clip
    /// coefficient).
    pub grad_factor: f64,
}

/// A step hook: gets the optimizer's groups, e.g. to log or change hyperparameters.
pub type StepHook = Box<dyn FnMut(&mut dyn GroupHyperparams) + Send>;

/// Identifies a registered hook, for [`Optimizer::remove_hook`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HookHandle(u64);

/// An optimizer: an [`Algorithm`] applied to param groups of one [`Arena`].
pub struct Optimizer<T: Float, A: Algorithm> {
    arena_id: u64,
    layout: Vec<ParamInfo>,
    defaults: A::Config,
    groups: Vec<Group<T, A>>,
    parallelism: Parallelism,
    subnormals: Subnormals,
    parallel_threshold: usize,
    /// From this many elements `step_mixed` streams the half copy (`mixed_step.rs`).
    stream_copy_threshold: usize,
    simd: SimdLevel,
    work: Vec<WorkItem<T, A::Coeffs>>,
    pre_hooks: Vec<(HookHandle, StepHook)>,
    post_hooks: Vec<(HookHandle, StepHook)>,
    next_hook: u64,
    /// Reused by clipped steps: the groups' runs and the norm's partial sums.
    norm_ranges: Vec<Range<usize>>,
    norm_scratch: NormScratch,
    /// torch's `group["initial_lr"]` per group, set by LR schedulers (`crate::schedule`).
    initial_lrs: Vec<Option<f64>>,
    /// The precision of the state buffers.
    state_precision: StatePrecision,
}

impl<T: Float, A: Algorithm> std::fmt::Debug for Optimizer<T, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct(A::NAME);
        d.field("dtype", &T::DTYPE)
            .field("defaults", &self.defaults);
        for (i, g) in self.groups.iter().enumerate() {
            d.field(&format!("group{i}"), &g.config);
        }
        d.finish()
    }
}

impl<T: Float, A: Algorithm> Optimizer<T, A> {
    /// Builds an optimizer over `groups` of `arena`, with `defaults` for every hyperparameter a
    /// group does not override (torch's constructor).
    ///
    /// Errors, as torch raises them: an empty list, a parameter in two groups or twice in one,
    /// an unknown hyperparameter name, an invalid value. A group may hold any set of the
    /// arena's parameters, in any layout (see [`ParamGroup::new`]).
    pub fn new(
        arena: &Arena<T>,
        groups: impl IntoIterator<Item = ParamGroup<T>>,
        defaults: A::Config,
    ) -> Result<Self> {
        let mut opt = Self::without_groups(arena, defaults)?;
        let mut any = false;
        for g in groups {
            opt.add_param_group(arena, g)?;
            any = true;
        }
        if !any {
            return Err(Error::EmptyParamList);
        }
        Ok(opt)
    }

    /// An optimizer over `arena` with no group yet (groups follow through
    /// [`Optimizer::add_resolved_group`]).
    pub(crate) fn without_groups(arena: &Arena<T>, defaults: A::Config) -> Result<Self> {
        defaults.validate()?;
        Ok(Optimizer {
            arena_id: arena.id(),
            layout: arena.infos().to_vec(),
            defaults,
            groups: Vec::new(),
            parallelism: Parallelism::default(),
            subnormals: Subnormals::default(),
            parallel_threshold: PARALLEL_THRESHOLD,
            stream_copy_threshold: crate::mixed::STREAM_COPY_MIN_ELEMS,
            simd: SimdLevel::default(),
            work: Vec::new(),
            pre_hooks: Vec::new(),
            post_hooks: Vec::new(),
            next_hook: 0,
            norm_ranges: Vec::new(),
            norm_scratch: NormScratch::default(),
            initial_lrs: Vec::new(),
            state_precision: StatePrecision::Full,
        })
    }

    /// Adds a param group, for example to unfreeze layers mid-training. Its hyperparameters are
    /// the optimizer's defaults with the group's overrides on top.
    pub fn add_param_group(&mut self, arena: &Arena<T>, group: ParamGroup<T>) -> Result<()> {
        self.check_arena(arena)?;
        let params = group.resolve(arena)?;
        self.add_resolved_group(params, &group.overrides)
    }

    /// Adds a group of the parameters at arena positions `params` (ascending, no duplicates),
    /// which may be empty: a sharded optimizer keeps every group on every rank, also where
    /// the rank's shard holds none of its parameters, so that group indices (and schedulers)
    /// agree across ranks.
    pub(crate) fn add_resolved_group(
        &mut self,
        params: Vec<usize>,
        overrides: &[(String, HyperValue)],
    ) -> Result<()> {
        for g in &self.groups {
            if let Some(i) = first_common(&params, &g.params) {
                return Err(Error::ParamInTwoGroups {
                    name: self.layout[i].name.clone(),
                });
            }
        }
        let mut config = self.defaults.clone();
        for (name, value) in overrides {
            config.set(name, value)?;
        }
        config.validate()?;
        for &i in &params {
            A::check_param(&self.layout[i].shape)?;
        }
        let runs = runs_of(&params);
        let mut locals = Vec::with_capacity(params.len());
        let mut len = 0;
        for &i in &params {
            locals.push(len);
            len += self.layout[i].len;
        }
        let mut aux_offsets = Vec::with_capacity(params.len() + 1);
        let mut at = 0;
        aux_offsets.push(at);
        for &i in &params {
            at += aux_ranges::<A>(&self.layout[i].shape, 0)
                .map(|r| r.len())
                .sum::<usize>();
            aux_offsets.push(at);
        }
        self.groups.push(Group {
            config,
            state: vec![None; params.len()],
            params,
            runs,
            locals,
            len,
            buffers: Vec::new(),
            half_buffers: Vec::new(),
            aux_offsets,
            aux: AlignedBuf::empty(),
        });
        Ok(())
    }

    /// Chooses where steps run (default: rayon's global pool).
    pub fn set_parallelism(&mut self, parallelism: Parallelism) {
        self.parallelism = parallelism;
    }

    /// Builder form of [`Optimizer::set_parallelism`].
    pub fn with_parallelism(mut self, parallelism: Parallelism) -> Self {
        self.parallelism = parallelism;
        self
    }

    /// Steps over fewer elements than this (summed over the groups) run on the calling thread;
    /// larger ones go to the [`Parallelism`]'s pool, in one hand-off. The default,
    /// [`PARALLEL_THRESHOLD`], is where the pool starts to pay in a training loop, whose pool
    /// falls asleep between steps; `0` always uses the pool, `usize::MAX` never does. Results
    /// are bitwise the same either way.
    pub fn set_parallel_threshold(&mut self, elems: usize) {
        self.parallel_threshold = elems;
    }

    /// Chooses what steps do with subnormal numbers (default: [`Subnormals::Flush`], flushed
    /// to zero inside the step's kernels; [`Subnormals::Preserve`] for bit-exact torch parity
    /// in subnormal ranges). See [`crate::subnormals`] for why flushing is harmless.
    pub fn set_subnormals(&mut self, subnormals: Subnormals) {
        self.subnormals = subnormals;
    }

    /// Builder form of [`Optimizer::set_subnormals`].
    pub fn with_subnormals(mut self, subnormals: Subnormals) -> Self {
        self.subnormals = subnormals;
        self
    }

    /// What steps do with subnormal numbers: the mode set, or [`Subnormals::Preserve`] for an
    /// algorithm whose update needs them ([`Algorithm::NEEDS_SUBNORMALS`]: Rprop).
    pub fn subnormals(&self) -> Subnormals {
        if A::NEEDS_SUBNORMALS {
            Subnormals::Preserve
        } else {
            self.subnormals
        }
    }

    /// Caps the instruction set the kernels and the clipping norm use (default
    /// [`SimdLevel::Best`]: everything the CPU has). Results are bitwise the same at every
    /// level; the cap is for benchmarks and tests.
    pub fn set_simd_level(&mut self, simd: SimdLevel) {
        self.simd = simd;
    }

    /// Builder form of [`Optimizer::set_simd_level`].
    pub fn with_simd_level(mut self, simd: SimdLevel) -> Self {
        self.simd = simd;
        self
    }

    /// The instruction-set cap (see [`Optimizer::set_simd_level`]).
    pub fn simd_level(&self) -> SimdLevel {
        self.simd
    }

    /// Bytes of optimizer state held: every group's state buffers and shaped state (zero
    /// before the first step creates them).
    pub fn state_bytes(&self) -> usize {
        self.groups
            .iter()
            .map(|g| g.buffers.iter().map(|b| b.len()).sum::<usize>() + g.aux.len())
            .sum::<usize>()
            * std::mem::size_of::<T>()
    }

    /// `out[i]` is true when the parameter at arena position `i` belongs to a group.
    pub(crate) fn grouped_positions(&self) -> Vec<bool> {
        let mut out = vec![false; self.layout.len()];
        for g in &self.groups {
            for &i in &g.params {
                out[i] = true;
            }
        }
        out
    }

    /// The constructor defaults.
    pub fn defaults(&self) -> &A::Config {
        &self.defaults
    }

    /// Number of param groups.
    pub fn num_groups(&self) -> usize {
        self.groups.len()
    }

    fn group_ref(&self, index: usize) -> Result<&Group<T, A>> {
        self.groups.get(index).ok_or(Error::NoSuchGroup {
            index,
            count: self.groups.len(),
        })
    }

    /// The hyperparameters of group `index`.
    pub fn group_config(&self, index: usize) -> Result<&A::Config> {
        Ok(&self.group_ref(index)?.config)
    }

    /// Replaces the hyperparameters of group `index`, after checking them.
    pub fn set_group_config(&mut self, index: usize, config: A::Config) -> Result<()> {
        self.group_ref(index)?;
        config.validate()?;
        let g = &self.groups[index];
        if !g.half_buffers.is_empty() && A::buffers(&g.config) != A::buffers(&config) {
            return Err(Error::MixedPrecision(format!(
                "{} keeps bf16 state; a config that changes its buffers ({:?} -> {:?}) is not \
                 supported with bf16 state yet",
                A::NAME,
                A::buffers(&g.config),
                A::buffers(&config)
            )));
        }
        let old = std::mem::replace(&mut self.groups[index].config, config);
        self.groups[index].relayout_buffers(&old);
        Ok(())
    }

    /// The layout of group `index`: the maximal runs of consecutive arena positions its
    /// parameters fill, ascending. A group whose parameters were registered one after another
    /// is one run; torch's weight-decay recipe over a model registered in its natural order
    /// gives many. The slice fits the clipping functions of [`crate::clip`] as it is.
    pub fn group_params(&self, index: usize) -> Result<&[Range<usize>]> {
        Ok(&self.group_ref(index)?.runs)
    }

    /// The handles of group `index`'s parameters, in arena order (the order
    /// [`Optimizer::state_dict`] numbers them in).
    pub fn group_handles(&self, index: usize) -> Result<impl Iterator<Item = Param<T>> + '_> {
        let arena_id = self.arena_id;
        Ok(self
            .group_ref(index)?
            .params
            .iter()
            .map(move |&i| Param::from_parts(i, arena_id)))
    }

    /// One hyperparameter of group `index`, by torch's name.
    pub fn hyper(&self, index: usize, name: &str) -> Result<HyperValue> {
        self.group_ref(index)?.config.get(name)
    }

    /// Sets one hyperparameter of group `index` by torch's name. An unknown name or an invalid
    /// value is an error and leaves the group as it was.
    pub fn set_hyper(
        &mut self,
        index: usize,
        name: &str,
        value: impl Into<HyperValue>,
    ) -> Result<()> {
        let mut config = self.group_ref(index)?.config.clone();
        config.set(name, &value.into())?;
        config.validate()?;
        let old = std::mem::replace(&mut self.groups[index].config, config);
        self.groups[index].relayout_buffers(&old);
        Ok(())
    }

    /// The learning rate of group `index`.
    pub fn lr(&self, index: usize) -> Result<f64> {
        match self.hyper(index, "lr")? {
            HyperValue::Number(x) => Ok(x),
            other => Err(Error::HyperparameterType {
                name: "lr".into(),
                expected: "a number",
                got: other.to_string(),
            }),
        }
    }

    /// Sets the learning rate of group `index`.
    pub fn set_lr(&mut self, index: usize, lr: f64) -> Result<()> {
        self.set_hyper(index, "lr", lr)
    }

    /// Errors unless the state buffers are in full precision: `what` (a plain step, a load)
    /// has no bf16-state version yet.
    pub(crate) fn check_full_state(&self, what: &str) -> Result<()> {
        if self.state_precision != StatePrecision::Full {
            return Err(Error::MixedPrecision(format!(
                "this {} optimizer keeps bf16 state: {what} is not supported with it (step \
                 with `step_mixed`; save with `state_dict`, which widens the state to f32)",
                A::NAME
            )));
        }
        Ok(())
    }

    fn check_arena(&self, arena: &Arena<T>) -> Result<()> {
        if arena.id() != self.arena_id {
            return Err(Error::ArenaMismatch(format!(
                "this {} optimizer was built for another arena",
                A::NAME
            )));
        }
        Ok(())
    }

    /// Zeroes (`set_to_none = false`) or removes (`true`) the gradients of this optimizer's
    /// parameters, as `torch.optim.Optimizer.zero_grad` does.
    pub fn zero_grad(&self, arena: &mut Arena<T>, set_to_none: bool) -> Result<()> {
        self.check_arena(arena)?;
        for r in self.groups.iter().flat_map(|g| &g.runs) {
            arena.zero_grad_range(r.clone(), set_to_none);
        }
        Ok(())
    }

    /// One optimization step over every group, as `optimizer.step()`.
    pub fn step(&mut self, arena: &mut Arena<T>) -> Result<()> {
        self.step_with_options(arena, StepOptions::default())
            .map(|_| ())
    }

    /// `optimizer.step(closure)`: calls `closure` (which recomputes the loss and writes the
    /// gradients), then steps, and returns the loss.
    pub fn step_with<L>(
        &mut self,
        arena: &mut Arena<T>,
        closure: impl FnOnce(&mut Arena<T>) -> L,
    ) -> Result<L> {
        self.check_arena(arena)?;
        let loss = closure(arena);
        self.step(arena)?;
        Ok(loss)
    }

    /// A step that refuses NaN and infinite gradients: if any parameter's gradient holds one,
    /// nothing changes (parameters, state, step counts) and
    /// [`StepOutcome::SkippedNonFinite`] is returned.
    pub fn step_checked(&mut self, arena: &mut Arena<T>) -> Result<StepOutcome> {
        let options = StepOptions {
            skip_non_finite: true,
            ..StepOptions::default()
        };
        Ok(self.step_with_options(arena, options)?.outcome)
    }

    /// `clip_grad_norm_(params, max_norm, norm_type)` then `step()`, fused: the norm over this
    /// optimizer's parameters is computed in one pass and the clip coefficient is folded into
    /// the update, so the gradients are read twice and never rewritten. Returns the total norm
    /// before clipping. The numbers equal clip followed by step, bit for bit.
    pub fn step_clipped(&mut self, arena: &mut Arena<T>, clip: ClipNorm) -> Result<f64> {
        let options = StepOptions {
            clip: Some(clip),
            ..StepOptions::default()
        };
        let report = self.step_with_options(arena, options)?;
        Ok(report.total_norm.unwrap_or(0.0))
    }

    /// A step after `k` accumulated micro-batches: the gradients hold the sum of `k`
    /// micro-batch gradients (write them with [`Arena::grad_mut`] without zeroing in between)
    /// and the `1/k` averaging is folded into the update.
    pub fn step_accumulated(&mut self, arena: &mut Arena<T>, k: usize) -> Result<()> {
        if k == 0 {
            return Err(Error::InvalidHyperparameter(
                "Invalid micro-batch count: 0".to_string(),
            ));
        }
        let options = StepOptions {
            grad_scale: 1.0 / k as f64,
            ..StepOptions::default()
        };
        self.step_with_options(arena, options).map(|_| ())
    }

    /// A step with gradient scaling, clipping and the non-finite guard folded into the fused
    /// update (see [`StepOptions`]). On an error nothing has changed.
    pub fn step_with_options(
        &mut self,
        arena: &mut Arena<T>,
        options: StepOptions,
    ) -> Result<StepReport> {
        self.check_arena(arena)?;
        self.check_full_state("step")?;
        options.check_grad_scale()?;
        if options.skip_non_finite && self.has_non_finite_grad(arena) {
            return Ok(StepReport {
                outcome: StepOutcome::SkippedNonFinite,
                total_norm: None,
                grad_factor: 0.0,
            });
        }
        self.run_hooks(true);
        for g in &self.groups {
            g.config.validate()?;
        }
        options.check_max_norm()?;
        // One decision and at most one pool hand-off for the whole step: the clip norm and the
        // update run inside it.
        let elems: usize = self.groups.iter().map(|g| g.len).sum();
        let parallelism = self.parallelism.clone();
        let subnormals = self.subnormals();
        let (grad_factor, total) =
            parallelism.run(elems, self.parallel_threshold, subnormals, |exec| {
                self.run_step(arena, options, exec)
            })?;
        self.run_hooks(false);
        Ok(StepReport {
            outcome: StepOutcome::Applied,
            total_norm: total,
            grad_factor,
        })
    }

    /// The numeric part of a step, run by [`Parallelism::run`]: the folded clip's norm, then
    /// the plan and the fused update of every piece. Returns the factor the gradients were
    /// multiplied by and the total norm, if clipped.
    fn run_step(
        &mut self,
        arena: &mut Arena<T>,
        options: StepOptions,
        exec: Exec,
    ) -> Result<(f64, Option<f64>)> {
        let mut grad_factor = options.grad_scale;
        let mut total = None;
        if let Some(clip) = options.clip {
            self.norm_ranges.clear();
            self.norm_ranges
                .extend(self.groups.iter().flat_map(|g| g.runs.iter().cloned()));
            self.norm_scratch
                .plan(arena, &self.norm_ranges, clip.norm_type);
            let norm = self
                .norm_scratch
                .reduce(arena, clip.norm_type, self.simd, exec)
                * options.grad_scale.abs();
            grad_factor *= clip.coefficient_for(norm)?;
            total = Some(norm);
        }
        self.plan(arena, grad_factor);
        let work = std::mem::take(&mut self.work);
        let layout = &self.layout;
        exec.for_each(&work, |item| {
            // SAFETY: `plan` built every item from disjoint ranges of the arena and the state
            // buffers, and `arena` and `self.groups` stay mutably borrowed here until all
            // items have run.
            unsafe { item.run::<A>(layout, false) }
        });
        self.work = work;
        self.work.clear();
        Ok((grad_factor, total))
    }

    /// Registers a hook called before every step that is applied (torch's
    /// `register_step_pre_hook`). It may read and change hyperparameters.
    pub fn register_step_pre_hook(
        &mut self,
        hook: impl FnMut(&mut dyn GroupHyperparams) + Send + 'static,
    ) -> HookHandle {
        let h = HookHandle(self.next_hook);
        self.next_hook += 1;
        self.pre_hooks.push((h, Box::new(hook)));
        h
    }

    /// Registers a hook called after every applied step (torch's `register_step_post_hook`).
    pub fn register_step_post_hook(
        &mut self,
        hook: impl FnMut(&mut dyn GroupHyperparams) + Send + 'static,
    ) -> HookHandle {
        let h = HookHandle(self.next_hook);
        self.next_hook += 1;
        self.post_hooks.push((h, Box::new(hook)));
        h
    }

    /// Removes a hook; returns false if it was not registered (or already removed).
    pub fn remove_hook(&mut self, handle: HookHandle) -> bool {
        let before = self.pre_hooks.len() + self.post_hooks.len();
        self.pre_hooks.retain(|(h, _)| *h != handle);
        self.post_hooks.retain(|(h, _)| *h != handle);
        before != self.pre_hooks.len() + self.post_hooks.len()
    }

    fn run_hooks(&mut self, pre: bool) {
        let slot = if pre {
            &mut self.pre_hooks
        } else {
            &mut self.post_hooks
        };
        if slot.is_empty() {
            return;
        }
        let mut hooks = std::mem::take(slot);
        for (_, hook) in &mut hooks {
            hook(self);
        }
        let slot = if pre {
            &mut self.pre_hooks
        } else {
            &mut self.post_hooks
        };
        // Hooks registered by a hook go after the existing ones.
        hooks.append(slot);
        *slot = hooks;
    }

    /// True when any parameter of any group has a gradient holding NaN or infinity.
    fn has_non_finite_grad(&self, arena: &Arena<T>) -> bool {
        let flags = arena.grad_flags();
        let grads = arena.grads();
        self.groups.iter().any(|g| {
            g.params.iter().any(|&i| {
                flags[i] && crate::kernels::any_non_finite(&grads[self.layout[i].range()])
            })
        })
    }

    /// The first parameter of any group with a non-finite gradient, if any.
    pub fn find_non_finite_grad(&self, arena: &Arena<T>) -> Option<&str> {
        let flags = arena.grad_flags();
        let grads = arena.grads();
        self.groups
            .iter()
            .flat_map(|g| g.params.iter().copied())
            .find(|&i| flags[i] && crate::kernels::any_non_finite(&grads[self.layout[i].range()]))
            .map(|i| self.layout[i].name.as_str())
    }

    /// Initialises state, advances step counts and fills `self.work`. Returns the number of
    /// elements to update.
    ///
    /// A run of the plan is a set of parameters of one group that are consecutive in the arena
    /// (so never crossing a gap between the group's runs) and whose state agrees; it is cut
    /// into [`CHUNK`]-element pieces from its start. A group of one run is therefore cut
    /// exactly as a single slice is, and a parameter's update never depends on which other
    /// parameters share its group: the kernels are elementwise, so the piece boundaries do not
    /// change a bit.
    fn plan(&mut self, arena: &mut Arena<T>, grad_scale: f64) -> usize {
        self.plan_with(arena, grad_scale, None)
    }

    /// [`Optimizer::plan`], reading which parameters have gradients, and where they are, from
    /// `mixed` when given (a mixed-precision step), and writing the copy's pointers.
    fn plan_with(
        &mut self,
        arena: &mut Arena<T>,
        grad_scale: f64,
        mixed: Option<MixedStreams<'_>>,
    ) -> usize {
        let (params, grads, arena_has_grad) = arena.step_view();
        let params_ptr = params.as_mut_ptr();
        let (has_grad, grads_ptr, grad_size, copy_ptr, copy_size) = match &mixed {
            Some(m) => (m.has_grad, m.grads, m.grad_size, m.copy, m.copy_size),
            None => (
                arena_has_grad,
                grads.as_ptr() as *const u8,
                std::mem::size_of::<T>(),
                std::ptr::null_mut(),
                0,
            ),
        };
        let half_state = self.state_precision == StatePrecision::Bf16;
        let layout = &self.layout;
        let defaults = &self.defaults;
        let simd = self.simd;
        let mut total = 0;
        for group in &mut self.groups {
            let names = A::buffers(&group.config);
            let need = names.len();
            debug_assert!(need <= MAX_BUFFERS);
            let gl = group.len;
            let any_grad = group.params.iter().any(|&i| has_grad[i]);
            if any_grad {
                while !half_state && group.buffers.len() < need {
                    let k = group.buffers.len();
                    let init = T::from_f64(A::buffer_init_in(&group.config, defaults, k));
                    group
                        .buffers
                        .push(AlignedBuf::filled(Role::State(k), gl, init));
                }
                while half_state && group.half_buffers.len() < need {
                    let k = group.half_buffers.len();
                    let init = bf16_init(A::buffer_init_in(&group.config, defaults, k));
                    group
                        .half_buffers
                        .push(AlignedBuf::filled(Role::State(k), gl, init));
                }
                group.ensure_aux();
            }
            let mut run: Option<OpenRun<A::Scalars>> = None;
            let n = group.params.len();
            for j in 0..=n {
                // Decide what param j contributes (None = breaks the run).
                let next = if j < n && has_grad[group.params[j]] {
                    if group.state[j].is_none() {
                        // Shaped state starts at zero with the parameter's state (it may hold
                        // values from before a `load_state_dict` that dropped this state).
                        group.aux[group.aux_offsets[j]..group.aux_offsets[j + 1]].fill(T::ZERO);
                    }
                    let st = group.state[j].get_or_insert(ParamState {
                        step: 0,
                        scalars: A::init_scalars(&group.config),
                        live_buffers: 0,
                    });
                    let info = &layout[group.params[j]];
                    let local = group.locals[j];
                    let mut fresh = false;
                    while (st.live_buffers as usize) < need {
                        let k = st.live_buffers as usize;
                        let init = A::buffer_init_in(&group.config, defaults, k);
                        if half_state {
                            group.half_buffers[k][local..local + info.len].fill(bf16_init(init));
                        } else {
                            group.buffers[k][local..local + info.len].fill(T::from_f64(init));
                        }
                        st.live_buffers += 1;
                        fresh = true;
                    }
                    if A::TRACKS_STEP {
                        st.step += 1;
                    }
                    Some((j, *st, fresh))
                } else {
                    None
                };
                // Extend the current run or close it.
                if let (Some(open), Some((_, st, fresh))) = (&mut run, &next) {
                    // A per-parameter algorithm's runs are single parameters, and a run never
                    // spans a gap between the group's runs in the arena.
                    if !A::PER_PARAMETER
                        && group.params[j] == group.params[open.last] + 1
                        && open.state == *st
                        && open.fresh == *fresh
                    {
                        let info = &layout[group.params[j]];
                        open.last = j;
                        open.end = info.offset + info.len;
                        continue;
                    }
                }
                if let Some(OpenRun {
                    first,
                    last,
                    end,
                    state: mut st,
                    fresh,
                }) = run.take()
                {
                    let coeffs = A::prepare(&group.config, st.step, &mut st.scalars);
                    for s in group.state[first..=last].iter_mut().flatten() {
                        s.scalars = st.scalars;
                    }
                    let param = group.params[first];
                    let start = layout[param].offset;
                    // Where the run's elements start in the state buffers: the parameters of
                    // a run are consecutive in the arena and in the buffers alike.
                    let base = group.locals[first];
                    let args = KernelArgs {
                        coeffs,
                        fresh,
                        grad_scale,
                        simd,
                    };
                    let mut aux = [std::ptr::null_mut(); MAX_AUX_BUFFERS];
                    let mut aux_lens = [0; MAX_AUX_BUFFERS];
                    let mut n_aux = 0;
                    if A::PER_PARAMETER {
                        let shape = &layout[param].shape;
                        let ranges = aux_ranges::<A>(shape, group.aux_offsets[first]);
                        for (k, r) in ranges.enumerate() {
                            aux_lens[k] = r.len();
                            aux[k] = group.aux[r].as_mut_ptr();
                            n_aux = k + 1;
                        }
                    }
                    let mut at = start;
                    while at < end {
                        // A per-parameter kernel gets its parameter whole.
                        let len = if A::PER_PARAMETER {
                            end - at
                        } else {
                            CHUNK.min(end - at)
                        };
                        let local = base + (at - start);
                        let mut buffers = [std::ptr::null_mut(); MAX_BUFFERS];
                        if half_state {
                            for (k, b) in group.half_buffers[..need].iter_mut().enumerate() {
                                buffers[k] = b[local..local + len].as_mut_ptr() as *mut u8;
                            }
                        } else {
                            for (k, b) in group.buffers[..need].iter_mut().enumerate() {
                                buffers[k] = b[local..local + len].as_mut_ptr() as *mut u8;
                            }
                        }
                        self.work.push(WorkItem {
                            // SAFETY: `at..at+len` lies inside the arena (it is part of a
                            // registered parameter's range).
                            params: unsafe { params_ptr.add(at) },
                            // SAFETY: the gradient buffer (the arena's, or a mixed step's half
                            // buffer) has the arena's length in elements of `grad_size` bytes.
                            grads: unsafe { grads_ptr.add(at * grad_size) },
                            // SAFETY: as above for the copy, when there is one.
                            copy: if copy_ptr.is_null() {
                                copy_ptr
                            } else {
                                unsafe { copy_ptr.add(at * copy_size) }
                            },
                            buffers,
                            n_buffers: need,
                            len,
                            args,
                            param,
                            aux,
                            aux_lens,
                            n_aux,
                        });
                        total += len;
                        at += len;
                    }
                }
                if let Some((j, st, fresh)) = next {
                    let info = &layout[group.params[j]];
                    run = Some(OpenRun {
                        first: j,
                        last: j,
                        end: info.offset + info.len,
                        state: st,
                        fresh,
                    });
                }
            }
        }
        total
    }

    /// The group holding arena parameter `i`, and its position there.
    fn locate(&self, i: usize) -> Option<(&Group<T, A>, usize)> {
        self.groups
            .iter()
            .find_map(|g| g.position(i).map(|j| (g, j)))
    }

    /// The state buffer `buffer` (torch's name, e.g. `"exp_avg"`, ASGD's `"ax"`, Adafactor's
    /// shaped `"row_var"`) of parameter `param`, or `None` if it has no state yet. Row-major;
    /// a shaped buffer is as long as [`Algorithm::aux_len`] says. `None` for every buffer of an
    /// optimizer with [`StatePrecision::Bf16`] state: see [`Optimizer::buffer_bf16`].
    pub fn buffer(&self, param: Param<T>, buffer: &str) -> Option<&[T]> {
        let i = param.index();
        let (g, j) = self.locate(i)?;
        let st = g.state[j]?;
        let info = &self.layout[i];
        if let Some(k) = A::buffers(&g.config).iter().position(|&b| b == buffer) {
            if k >= st.live_buffers as usize || !g.half_buffers.is_empty() {
                return None;
            }
            let local = g.locals[j];
            return Some(&g.buffers[k][local..local + info.len]);
        }
        let k = A::aux_buffers(&info.shape)
            .iter()
            .position(|&b| b == buffer)?;
        let r = aux_ranges::<A>(&info.shape, g.aux_offsets[j]).nth(k)?;
        Some(&g.aux[r])
    }

    /// The step count of parameter `param` (torch's `state[p]["step"]`), or `None` before its
    /// first step.
    pub fn step_count(&self, param: Param<T>) -> Option<u64> {
        let i = param.index();
        let (g, j) = self.locate(i)?;
        g.state[j].map(|s| s.step)
    }

    /// The per-parameter scalar state of `param` besides its step count (ASGD's `eta` and
    /// `mu`), or `None` before its first step.
    pub fn scalars(&self, param: Param<T>) -> Option<A::Scalars> {
        let i = param.index();
        let (g, j) = self.locate(i)?;
        g.state[j].map(|s| s.scalars)
    }

    /// A serialisable snapshot of the groups and every parameter's state.
    pub fn state_dict(&self) -> StateDict<T> {
        let mut param_groups = Vec::with_capacity(self.groups.len());
        let mut state = Vec::new();
        let mut number = 0;
        for g in &self.groups {
            let hyperparams = <A::Config as Hyperparams>::NAMES
                .iter()
                .map(|&n| {
                    let v = g.config.get(n).expect("every listed name is gettable");
                    (n.to_string(), v)
                })
                .collect::<BTreeMap<_, _>>();
            let names = A::buffers(&g.config);
            let mut params = Vec::with_capacity(g.params.len());
            for (j, &i) in g.params.iter().enumerate() {
                let info = &self.layout[i];
                params.push(ParamRef {
                    index: number,
                    name: info.name.clone(),
                    offset: info.offset,
                    shape: info.shape.clone(),
                });
                if let Some(st) = g.state[j] {
                    let local = g.locals[j];
                    let mut buffers: BTreeMap<String, Vec<T>> = (0..st.live_buffers as usize)
                        .map(|k| {
                            (
                                names[k].to_string(),
                                g.buffer_values(k, local..local + info.len),
                            )
                        })
                        .collect();
                    let aux = aux_ranges::<A>(&info.shape, g.aux_offsets[j]);
                    for (name, r) in A::aux_buffers(&info.shape).iter().zip(aux) {
                        buffers.insert(name.to_string(), g.aux[r].to_vec());
                    }
                    let scalars: BTreeMap<String, f64> = <A::Scalars as ParamScalars>::NAMES
                        .iter()
                        .map(|n| n.to_string())
                        .zip(st.scalars.values())
                        .collect();
                    if A::TRACKS_STEP || !buffers.is_empty() || !scalars.is_empty() {
                        state.push(ParamStateDict {
                            index: number,
                            step: A::TRACKS_STEP.then_some(st.step),
                            scalars,
                            buffers,
                        });
                    }
                }
                number += 1;
            }
            param_groups.push(GroupDict {
                hyperparams,
                params,
            });
        }
        StateDict {
            format: STATE_DICT_FORMAT,
            optimizer: A::NAME.to_string(),
            dtype: T::DTYPE.to_string(),
            param_groups,
            state,
        }
    }

    /// Loads a snapshot: the saved hyperparameters replace the current ones and every saved
    /// state is restored, as torch's `load_state_dict` does.
    ///
    /// Checks the optimizer kind, the number of groups, each group's parameter count, each
    /// parameter's shape and each buffer's length, and names what does not match. With
    /// [`MatchBy::Name`] saved parameters are paired with the group's parameters by name, so a
    /// model registered in another order loads correctly (torch matches by position only,
    /// pytorch/pytorch#1489). On any error nothing changes.
    ///
    /// A state saved in the other float type is converted, as torch casts state to the
    /// parameter's dtype.
    pub fn load_state_dict<U: Float>(&mut self, saved: &StateDict<U>, by: MatchBy) -> Result<()> {
        self.check_full_state("load_state_dict")?;
        let bad = |m: String| Err(Error::StateDict(m));
        if saved.format != STATE_DICT_FORMAT {
            return bad(format!(
                "format version {} is not supported (this build reads {STATE_DICT_FORMAT})",
                saved.format
            ));
        }
        if saved.optimizer != A::NAME {
            return bad(format!(
                "it was saved by the {} optimizer, this is {}",
                saved.optimizer,
                A::NAME
            ));
        }
        if saved.dtype != U::DTYPE {
            return bad(format!(
                "its dtype field says {} but its values were read as {}",
                saved.dtype,
                U::DTYPE
            ));
        }
        if saved.param_groups.len() != self.groups.len() {
            return bad(format!(
                "it has {} parameter groups, the optimizer has {}",
                saved.param_groups.len(),
                self.groups.len()
            ));
        }
        // Saved parameter number -> (group, position in group).
        let mut target: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
        let mut groups = self.groups.clone();
        for (gi, (sg, g)) in saved.param_groups.iter().zip(groups.iter_mut()).enumerate() {
            if sg.params.len() != g.params.len() {
                return bad(format!(
                    "group {gi} has {} parameters in the saved state and {} in the optimizer",
                    sg.params.len(),
                    g.params.len()
                ));
            }
            let mut config = g.config.clone();
            for (name, value) in &sg.hyperparams {
                config
                    .set(name, value)
                    .map_err(|e| Error::StateDict(format!("group {gi}: {e}")))?;
            }
            config
                .validate()
                .map_err(|e| Error::StateDict(format!("group {gi}: {e}")))?;
            g.config = config;
            let mut used = vec![false; g.params.len()];
            for (pos, pr) in sg.params.iter().enumerate() {
                let j = match by {
                    MatchBy::Position => pos,
                    MatchBy::Name => g
                        .params
                        .iter()
                        .position(|&i| self.layout[i].name == pr.name)
                        .ok_or_else(|| {
                            Error::StateDict(format!(
                                "group {gi} has no parameter named `{}`",
                                pr.name
                            ))
                        })?,
                };
                if used[j] {
                    return bad(format!(
                        "group {gi}: two saved parameters map to `{}`",
                        self.layout[g.params[j]].name
                    ));
                }
                used[j] = true;
                let info = &self.layout[g.params[j]];
                if info.shape != pr.shape {
                    return bad(format!(
                        "parameter `{}` has shape {:?} in the saved state and `{}` has shape {:?}",
                        pr.name, pr.shape, info.name, info.shape
                    ));
                }
                if target.insert(pr.index, (gi, j)).is_some() {
                    return bad(format!("parameter number {} appears twice", pr.index));
                }
            }
            g.state.iter_mut().for_each(|s| *s = None);
        }
        for ps in &saved.state {
            let &(gi, j) = target.get(&ps.index).ok_or_else(|| {
                Error::StateDict(format!(
                    "state for parameter number {} which no group lists",
                    ps.index
                ))
            })?;
            let g = &mut groups[gi];
            let info = &self.layout[g.params[j]];
            let names = A::buffers(&g.config);
            let aux_names = A::aux_buffers(&info.shape);
            // The leading `live` buffers: all of them, or fewer when a setting that adds
            // buffers at the end was switched on after the state was made (the next step
            // creates them). Shaped (auxiliary) buffers must all be there.
            let live = ps.buffers.len().saturating_sub(aux_names.len());
            if ps.buffers.len() < aux_names.len()
                || live > names.len()
                || names[..live]
                    .iter()
                    .chain(aux_names)
                    .any(|n| !ps.buffers.contains_key(*n))
            {
                let saved_names: Vec<&str> = ps.buffers.keys().map(String::as_str).collect();
                let kept: Vec<&str> = names.iter().chain(aux_names).copied().collect();
                return bad(format!(
                    "parameter `{}` has buffers {saved_names:?}; {} with these settings keeps {kept:?}",
                    info.name,
                    A::NAME
                ));
            }
            let step = match (A::TRACKS_STEP, ps.step) {
                (true, Some(s)) => s,
                (false, _) => 0,
                (true, None) => {
                    return bad(format!("parameter `{}` has no step count", info.name));
                }
            };
            let mut scalar_values = Vec::with_capacity(<A::Scalars as ParamScalars>::NAMES.len());
            for n in <A::Scalars as ParamScalars>::NAMES {
                match ps.scalars.get(*n) {
                    Some(v) => scalar_values.push(*v),
                    None => {
                        return bad(format!("parameter `{}` has no `{n}` state", info.name));
                    }
                }
            }
            let local = g.locals[j];
            let gl = g.len;
            while g.buffers.len() < names.len() {
                let k = g.buffers.len();
                g.buffers
                    .push(AlignedBuf::filled(Role::State(k), gl, T::ZERO));
            }
            for (k, name) in names[..live].iter().enumerate() {
                let values = &ps.buffers[*name];
                if values.len() != info.len {
                    return bad(format!(
                        "buffer `{name}` of parameter `{}` has {} values, the parameter has {}",
                        info.name,
                        values.len(),
                        info.len
                    ));
                }
                for (dst, src) in g.buffers[k][local..local + info.len].iter_mut().zip(values) {
                    *dst = T::from_f64(src.to_f64());
                }
            }
            if !aux_names.is_empty() {
                g.ensure_aux();
            }
            let aux = aux_ranges::<A>(&info.shape, g.aux_offsets[j]);
            for (name, r) in aux_names.iter().zip(aux) {
                let values = &ps.buffers[*name];
                if values.len() != r.len() {
                    return bad(format!(
                        "buffer `{name}` of parameter `{}` (shape {:?}) has {} values, {} keeps {}",
                        info.name,
                        info.shape,
                        values.len(),
                        A::NAME,
                        r.len()
                    ));
                }
                for (dst, src) in g.aux[r].iter_mut().zip(values) {
                    *dst = T::from_f64(src.to_f64());
                }
            }
            g.state[j] = Some(ParamState {
                step,
                scalars: A::Scalars::from_values(&scalar_values),
                live_buffers: live as u8,
            });
        }
        self.groups = groups;
        Ok(())
    }

    /// [`Optimizer::state_dict`] as JSON.
    pub fn state_dict_json(&self) -> Result<String> {
        Ok(serde_json::to_string(&self.state_dict())?)
    }

    /// [`Optimizer::load_state_dict`] from JSON written by [`Optimizer::state_dict_json`].
    ///
    /// Values saved in the other float type are read in that type and cast, as torch casts
    /// loaded state to the parameter's dtype (and as [`Optimizer::load_state_dict`] does).
    pub fn load_state_dict_json(&mut self, json: &str, by: MatchBy) -> Result<()> {
        if crate::state::json_dtype(json)? == <f64 as Float>::DTYPE {
            let sd: StateDict<f64> = serde_json::from_str(json)?;
            self.load_state_dict(&sd, by)
        } else {
            let sd: StateDict<f32> = serde_json::from_str(json)?;
            self.load_state_dict(&sd, by)
        }
    }

    /// Runs the scalar reference kernels instead of the fused ones for one step. For tests:
    /// the result must equal [`Optimizer::step`]'s bit for bit.
    #[doc(hidden)]
    pub fn step_reference(&mut self, arena: &mut Arena<T>) -> Result<()> {
        self.check_arena(arena)?;
        self.check_full_state("step_reference")?;
        for g in &self.groups {
            g.config.validate()?;
        }
        self.plan(arena, 1.0);
        let work = std::mem::take(&mut self.work);
        let layout = &self.layout;
        // The same subnormal mode as the fused step, so the two agree bit for bit.
        self.subnormals().run(|| {
            for item in &work {
                // SAFETY: as in `step_with_options`; run sequentially here.
                unsafe { item.run::<A>(layout, true) }
            }
        });
        self.work = work;
        self.work.clear();
        Ok(())
    }
}

impl<T: Float, A: Algorithm> GroupHyperparams for Optimizer<T, A> {
    fn num_groups(&self) -> usize {
        self.groups.len()
    }
    fn group_hyper(&self, group: usize, name: &str) -> Result<HyperValue> {
        self.hyper(group, name)
    }
    fn set_group_hyper(&mut self, group: usize, name: &str, value: HyperValue) -> Result<()> {
        self.set_hyper(group, name, value)
    }
    fn group_initial_lr(&self, group: usize) -> Result<Option<f64>> {
        self.group_ref(group)?;
        Ok(self.initial_lrs.get(group).copied().flatten())
    }
    fn set_group_initial_lr(&mut self, group: usize, initial_lr: Option<f64>) -> Result<()> {
        self.group_ref(group)?;
        if self.initial_lrs.len() <= group {
            self.initial_lrs.resize(group + 1, None);
        }
        self.initial_lrs[group] = initial_lr;
        Ok(())
    }
}
