//! L-BFGS, torch's `torch.optim.LBFGS`, with its strong Wolfe line search.
//!
//! L-BFGS is not elementwise: it works on the whole parameter vector at once (dot products,
//! a history of past steps). torch builds that vector by concatenating every parameter's
//! values and gradients in group order; here it is the group's runs of the arena (its maximal
//! runs of consecutive parameters) back to back, which for a group registered in one piece is
//! simply its slice of the arena, read and written in place.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use crate::arch::SimdLevel;
use crate::arena::{filled, AlignedBuf, Arena, ParamInfo};
use crate::error::{Error, Result};
use crate::float::Float;
use crate::hyper::{check, hyperparams, GroupHyperparams, HyperField, HyperValue, Hyperparams};
use crate::kernels::lbfgs as k;
use crate::optimizer::{runs_of, ParamGroup};

mod history;
mod line_search;
mod state_dict;

use history::{two_loop, update_history, History, Work};
use line_search::{
    py_min, strong_wolfe, Evaluator,
    Num::{Py, Ten},
};
pub(crate) use state_dict::LBFGSLoad;
pub use state_dict::{LBFGSState, LBFGSStateDict};

/// torch's name of the one line search it offers.
pub const STRONG_WOLFE: &str = "strong_wolfe";

/// L-BFGS's line search (torch's `line_search_fn`): none, or the strong Wolfe search.
///
/// By name (state dicts, [`LBFGSConfig::with`], [`LBFGS::set_hyper`], serde) it is torch's
/// value: `None` or the string `"strong_wolfe"`; any other name is torch's error "only
/// 'strong_wolfe' is supported", raised when it is set (torch raises it at the first step).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LineSearch {
    /// A fixed step of `lr` along the direction (torch's `line_search_fn=None`).
    #[default]
    None,
    /// The strong Wolfe line search (`line_search_fn="strong_wolfe"`): bracketing and zoom
    /// with cubic interpolation, `c1 = 1e-4`, `c2 = 0.9`.
    StrongWolfe,
}

impl LineSearch {
    /// torch's `line_search_fn` value: `None` or `Some("strong_wolfe")`.
    pub fn torch_name(self) -> Option<&'static str> {
        match self {
            LineSearch::None => None,
            LineSearch::StrongWolfe => Some(STRONG_WOLFE),
        }
    }

    /// Reads torch's `line_search_fn` value.
    pub fn from_torch_name(name: Option<&str>) -> Result<Self> {
        match name {
            None => Ok(LineSearch::None),
            Some(STRONG_WOLFE) => Ok(LineSearch::StrongWolfe),
            // torch raises this RuntimeError at the first step; it is checked up front here.
            Some(_) => Err(Error::InvalidHyperparameter(
                "only 'strong_wolfe' is supported".into(),
            )),
        }
    }
}

impl HyperField for LineSearch {
    fn to_value(&self) -> HyperValue {
        match self.torch_name() {
            Some(s) => HyperValue::Str(s.to_string()),
            None => HyperValue::None,
        }
    }
    fn from_value(name: &str, v: &HyperValue) -> Result<Self> {
        match v {
            HyperValue::Str(s) => LineSearch::from_torch_name(Some(s)),
            HyperValue::None => Ok(LineSearch::None),
            other => Err(Error::HyperparameterType {
                name: name.to_string(),
                expected: "a name or None",
                got: other.to_string(),
            }),
        }
    }
}

impl serde::Serialize for LineSearch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.torch_name().serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for LineSearch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = Option::<String>::deserialize(d)?;
        LineSearch::from_torch_name(name.as_deref()).map_err(serde::de::Error::custom)
    }
}

/// Sufficient-decrease constant of the strong Wolfe conditions (torch's `c1`).
const C1: f64 = 1e-4;
/// Curvature constant of the strong Wolfe conditions (torch's `c2`).
const C2: f64 = 0.9;
/// The line search's `tolerance_change`: torch's `LBFGS.step` does not pass the group's
/// `tolerance_change` to `_strong_wolfe`, so its default `1e-9` always applies there.
const LINE_SEARCH_TOLERANCE_CHANGE: f64 = 1e-9;
/// A correction pair is kept only when `y·s` exceeds this (torch's literal `1e-10`).
const MIN_CURVATURE: f64 = 1e-10;

hyperparams! {
    /// Hyperparameters of [`LBFGS`], with torch's names and defaults.
    pub struct LBFGSConfig for "LBFGS" {
        /// Learning rate: the step length tried first (the whole step without a line search).
        lr: f64 = 1.0,
        /// Most iterations per [`LBFGS::step`] call.
        max_iter: usize = 20,
        /// Most closure evaluations per [`LBFGS::step`] call. `None` means
        /// `max_iter * 5 // 4`, which [`LBFGS::new`] fills in, as torch's constructor does.
        max_eval: Option<usize> = None,
        /// Stop when the largest gradient magnitude is at most this (first-order optimality).
        tolerance_grad: f64 = 1e-7,
        /// Stop when the loss or the parameters change by less than this.
        tolerance_change: f64 = 1e-9,
        /// Number of correction pairs `(y, s)` kept.
        history_size: usize = 100,
        /// [`LineSearch::None`] (fixed step `lr`) or [`LineSearch::StrongWolfe`]; by name,
        /// torch's `None` or `"strong_wolfe"`.
        line_search_fn: LineSearch = LineSearch::None,
        /// Maximize the objective: the loss and gradients the closure reports are negated
        /// before L-BFGS sees them (torch's keyword-only `maximize`).
        maximize: bool = false,
    }
}

fn invalid(msg: String) -> Result<()> {
    Err(Error::InvalidHyperparameter(msg))
}

impl LBFGSConfig {
    fn check(&self) -> Result<()> {
        check::lr(self.lr)?;
        check::finite("lr", self.lr)?;
        for (name, x) in [
            ("tolerance_grad", self.tolerance_grad),
            ("tolerance_change", self.tolerance_change),
        ] {
            if x.is_nan() {
                return invalid(format!("Invalid {name} value: {x:?}"));
            }
        }
        if self.history_size == 0 {
            // torch accepts it and then fails with `IndexError: pop from empty list` at the
            // first correction pair.
            return invalid("Invalid history_size value: 0 (LBFGS keeps at least one pair)".into());
        }
        // torch fails inside the line search (`bracket` unbound) when it may not evaluate at
        // all.
        if self.line_search_fn == LineSearch::StrongWolfe
            && self.max_eval == Some(0)
            && self.max_iter > 0
        {
            return invalid(
                "Invalid max_eval value: 0 (the strong Wolfe line search needs at least one \
                 evaluation)"
                    .into(),
            );
        }
        Ok(())
    }

    /// The evaluation budget in effect: `max_eval`, or torch's default `max_iter * 5 // 4`.
    pub fn effective_max_eval(&self) -> usize {
        self.max_eval
            .unwrap_or_else(|| default_max_eval(self.max_iter))
    }

    fn strong_wolfe(&self) -> bool {
        self.line_search_fn == LineSearch::StrongWolfe
    }
}

/// `max_iter * 5 // 4` without overflow.
fn default_max_eval(max_iter: usize) -> usize {
    usize::try_from(max_iter as u128 * 5 / 4).unwrap_or(usize::MAX)
}

/// Counters and scalars of torch's state (the cheap part, copied by snapshots).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Scalars {
    /// torch's `state` is non-empty (a step has run).
    present: bool,
    func_evals: u64,
    n_iter: u64,
    /// An iteration has run: `d`, `t`, `H_diag`, `prev_flat_grad`, `prev_loss` and the
    /// history exist.
    started: bool,
    t: f64,
    h_diag: f64,
    prev_loss: f64,
}

impl Scalars {
    const EMPTY: Scalars = Scalars {
        present: false,
        func_evals: 0,
        n_iter: 0,
        started: false,
        t: 0.0,
        h_diag: 1.0,
        prev_loss: 0.0,
    };
}

/// What a transactional step restores if its closure fails.
struct Snapshot<T> {
    scalars: Scalars,
    params: AlignedBuf<T>,
    d: AlignedBuf<T>,
    prev_flat_grad: AlignedBuf<T>,
    order: VecDeque<usize>,
    ro: VecDeque<T>,
    al: Option<Vec<Option<T>>>,
}

/// Where the group's flat vector lies in the arena.
#[derive(Debug)]
struct Flat {
    /// Arena positions of the group's parameters, ascending (torch's group order).
    params: Vec<usize>,
    /// Where each parameter starts in the flat vector.
    starts: Vec<usize>,
    /// The group's maximal runs of consecutive arena positions.
    runs: Vec<Range<usize>>,
    /// Each run's arena element range and where it starts in the flat vector.
    segs: Vec<(Range<usize>, usize)>,
    /// Length of the flat vector.
    len: usize,
}

impl Flat {
    fn new(arena: &Arena<impl Float>, params: Vec<usize>) -> Self {
        let infos = arena.infos();
        let mut starts = Vec::with_capacity(params.len());
        let mut len = 0;
        for &i in &params {
            starts.push(len);
            len += infos[i].len;
        }
        let runs = runs_of(&params);
        let mut segs = Vec::with_capacity(runs.len());
        let mut at = 0;
        for r in &runs {
            let e = arena.elem_range(r.clone());
            let n = e.len();
            segs.push((e, at));
            at += n;
        }
        Flat {
            params,
            starts,
            runs,
            segs,
            len,
        }
    }

    /// Copies the group's values from the arena's `values` into the flat `out`.
    fn read<T: Float>(&self, values: &[T], out: &mut [T]) {
        for (e, at) in &self.segs {
            out[*at..*at + e.len()].copy_from_slice(&values[e.clone()]);
        }
    }

    /// Copies the flat `src` into the group's places in the arena's `values`.
    fn write<T: Float>(&self, values: &mut [T], src: &[T]) {
        for (e, at) in &self.segs {
            values[e.clone()].copy_from_slice(&src[*at..*at + e.len()]);
        }
    }
}

/// L-BFGS (torch's `LBFGS`), optionally with a strong Wolfe line search.
///
/// Each [`LBFGS::step`] runs up to `max_iter` iterations and calls the closure (which computes
/// the loss and writes the gradients) as often as it needs, up to `max_eval` times. With
/// `g` the flat gradient, `(y_i, s_i)` the stored pairs (oldest first, at most
/// `history_size`) and `ρ_i = 1 / (y_i·s_i)`:
///
/// ```text
/// first iteration ever:  d = -g,  H_diag = 1,  t = min(1, 1/‖g‖₁) · lr
/// later iterations:      y = g - g_prev,  s = t·d
///                        if y·s > 1e-10: store (y, s) (dropping the oldest), H_diag = y·s / y·y
///                        q = -g
///                        for i = newest..oldest:  α_i = ρ_i s_i·q,  q -= α_i y_i
///                        d = H_diag q
///                        for i = oldest..newest:  β_i = ρ_i y_i·d,  d += (α_i - β_i) s_i
///                        t = lr
/// stop if g·d > -tolerance_change
/// line search:           t from the strong Wolfe search (c1 = 1e-4, c2 = 0.9) or fixed
/// update:                x += t·d, then re-evaluate loss and g
/// stop if: max_iter reached, max_eval reached, max|g| ≤ tolerance_grad,
///          max|t·d| ≤ tolerance_change, or |loss - prev_loss| < tolerance_change
/// ```
///
/// The arithmetic is torch's, operation for operation: vectors, dot products, `ρ`, `α`, `β`
/// and `H_diag` are in the parameter dtype, losses are f64 (Python floats), and the line
/// search mixes Python floats and 0-dim tensors exactly as torch's Python does (promotion to
/// the tensor dtype, `float / tensor` as `reciprocal() * float`, comparisons in the tensor
/// dtype, and its `tolerance_change` fixed at 1e-9 because `LBFGS.step` does not pass the
/// group's). The counters (`func_evals`, `n_iter`) and the state (`d`, `t`, `old_dirs`,
/// `old_stps`, `ro`, `H_diag`, `prev_flat_grad`, `prev_loss`, `al`) evolve as in torch and
/// are saved by [`LBFGS::state_dict`].
///
/// Dot products and norms run on SIMD lanes in one fixed order, so a run is deterministic.
/// Against torch, only MKL's own rounding remains: BLAS `dot` adds in another order (for more
/// than 3 elements in f32, 2 in f64), `sum` is a cascade, `sqrt` is MKL VML's (not always
/// correctly rounded), and torch's AVX kernels fuse `add_(x, alpha=t)` into FMA. Where those
/// cannot differ (1 to 3 elements, torch on its default CPU kernels, an IEEE `sqrt`) every loss, parameter
/// and counter equals torch's bit for bit (`tests/lbfgs.rs`); otherwise results agree within
/// the parity tolerances.
///
/// Papers: J. Nocedal, "Updating quasi-Newton matrices with limited storage", Mathematics of
/// Computation 35 (1980); D. C. Liu and J. Nocedal, "On the limited memory BFGS method for
/// large scale optimization", Mathematical Programming 45 (1989). The line search is
/// Algorithms 3.5 and 3.6 (bracketing and zoom) of J. Nocedal and S. J. Wright, *Numerical
/// Optimization*, 2nd ed., Springer 2006, as ported by torch from minFunc / `lswolfe.lua`.
///
/// # One group
/// L-BFGS takes exactly one param group (torch: "LBFGS doesn't support per-parameter options
/// (parameter groups)"), of any parameters in any layout. Its flat vector is the group's
/// parameters in arena order, as torch concatenates a group's parameters in its order.
///
/// # Maximize
/// With `maximize = true` the loss and the gradients the closure reports are negated before
/// L-BFGS sees them, so it minimizes `-f`: the parameters follow exactly the path of
/// minimizing `-f`. [`LBFGS::step`] still returns the closure's own (un-negated) first loss.
/// torch 2.15 has the same keyword with the same meaning.
///
/// # Where it differs from torch, on purpose
/// - A `line_search_fn` name other than `"strong_wolfe"`, `history_size = 0`, and `max_eval = 0`
///   with the line search are rejected when the config is set; torch fails at the first step.
/// - Shrinking `history_size` below the number of stored pairs drops the oldest pairs at the
///   next update (torch compares with `==` and never trims again); growing it extends `al`
///   (torch raises `IndexError`).
/// - Where Python would raise `ZeroDivisionError` (cubic interpolation between two equal
///   Python-float steps), the line search continues with IEEE arithmetic.
/// - A closure error in [`LBFGS::try_step`] undoes the whole step (see there).
///
/// ```
/// use optarena::{ArenaBuilder, LBFGS, LBFGSConfig, LineSearch, ParamGroup};
///
/// // Minimize the Rosenbrock function from (-1.2, 1).
/// let mut b = ArenaBuilder::<f64>::new();
/// let x = b.param("x", &[2], &[-1.2, 1.0])?;
/// let mut arena = b.build();
/// let config = LBFGSConfig::default().with_line_search_fn(LineSearch::StrongWolfe);
/// let mut opt = LBFGS::new(&arena, [ParamGroup::all()], config)?;
/// for _ in 0..10 {
///     opt.step(&mut arena, |a| {
///         let (x0, x1) = (a.value(x)[0], a.value(x)[1]);
///         let g = a.grad_mut(x);
///         g[0] = -400.0 * x0 * (x1 - x0 * x0) - 2.0 * (1.0 - x0);
///         g[1] = 200.0 * (x1 - x0 * x0);
///         100.0 * (x1 - x0 * x0).powi(2) + (1.0 - x0).powi(2)
///     })?;
/// }
/// // torch 2.15 ends at the same point, x ≈ (0.99998, 0.99996), with the same evaluations.
/// assert!((arena.value(x)[0] - 1.0).abs() < 1e-4);
/// assert_eq!(opt.func_evals(), 52);
/// # Ok::<(), optarena::Error>(())
/// ```
pub struct LBFGS<T: Float> {
    arena_id: u64,
    layout: Vec<ParamInfo>,
    /// Where the group's parameters, the flat vector, lie in the arena.
    flat: Arc<Flat>,
    config: LBFGSConfig,
    scalars: Scalars,
    /// torch's `d`, the search direction (length `n` once started).
    d: AlignedBuf<T>,
    /// torch's `prev_flat_grad`.
    prev_flat_grad: AlignedBuf<T>,
    history: History<T>,
    /// torch's `al`: scratch of the two-loop recursion, `history_size` long, kept in state.
    al: Option<Vec<Option<T>>>,
    work: Work<T>,
    snapshot: Option<Snapshot<T>>,
    /// The instruction-set cap of the flat-vector kernels.
    simd: SimdLevel,
    /// torch's `group["initial_lr"]` of the one group, set by LR schedulers.
    initial_lr: Option<f64>,
}

impl<T: Float> std::fmt::Debug for LBFGS<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LBFGS")
            .field("dtype", &T::DTYPE)
            .field("config", &self.config)
            .field("n", &self.flat.len)
            .field("func_evals", &self.scalars.func_evals)
            .field("n_iter", &self.scalars.n_iter)
            .field("history", &self.history.order.len())
            .finish()
    }
}

impl<T: Float> LBFGS<T> {
    /// Builds L-BFGS over one param group of `arena` (torch's constructor).
    ///
    /// `max_eval = None` becomes `max_iter * 5 // 4` of `defaults` before the group's
    /// overrides apply, as torch computes it. Errors: an invalid value (torch's messages), an
    /// empty list, and more than one group ("LBFGS doesn't support per-parameter options
    /// (parameter groups)").
    pub fn new(
        arena: &Arena<T>,
        groups: impl IntoIterator<Item = impl Into<ParamGroup<T, LBFGSConfig>>>,
        mut defaults: LBFGSConfig,
    ) -> Result<Self> {
        defaults.validate()?;
        if defaults.max_eval.is_none() {
            defaults.max_eval = Some(default_max_eval(defaults.max_iter));
        }
        let groups: Vec<ParamGroup<T, LBFGSConfig>> = groups.into_iter().map(Into::into).collect();
        if groups.is_empty() {
            return Err(Error::EmptyParamList);
        }
        let mut resolved = Vec::with_capacity(groups.len());
        for g in &groups {
            resolved.push(g.resolve(arena)?);
        }
        if groups.len() != 1 {
            return Err(Error::InvalidHyperparameter(
                "LBFGS doesn't support per-parameter options (parameter groups)".into(),
            ));
        }
        let mut config = defaults;
        for o in groups[0].overrides() {
            o.apply(&mut config)?;
        }
        config.validate()?;
        let flat = Arc::new(Flat::new(arena, resolved.remove(0)));
        Ok(LBFGS {
            arena_id: arena.id(),
            layout: arena.infos().to_vec(),
            flat,
            config,
            scalars: Scalars::EMPTY,
            d: filled(0, T::ZERO),
            prev_flat_grad: filled(0, T::ZERO),
            history: History::new(),
            al: None,
            work: Work {
                grads: Vec::new(),
                x_init: filled(0, T::ZERO),
            },
            snapshot: None,
            simd: SimdLevel::default(),
            initial_lr: None,
        })
    }

    /// Caps the instruction set of the flat-vector kernels (default [`SimdLevel::Best`]).
    /// Results are bitwise the same at every level; the cap is for benchmarks and tests.
    pub fn set_simd_level(&mut self, simd: SimdLevel) {
        self.simd = simd;
    }

    /// Builder form of [`LBFGS::set_simd_level`].
    pub fn with_simd_level(mut self, simd: SimdLevel) -> Self {
        self.simd = simd;
        self
    }

    /// The group's hyperparameters.
    pub fn config(&self) -> &LBFGSConfig {
        &self.config
    }

    /// Replaces the hyperparameters, after checking them.
    pub fn set_config(&mut self, config: LBFGSConfig) -> Result<()> {
        config.validate()?;
        self.config = config;
        Ok(())
    }

    /// One hyperparameter by torch's name.
    pub fn hyper(&self, name: &str) -> Result<HyperValue> {
        self.config.get(name)
    }

    /// Sets one hyperparameter by torch's name; an unknown name or invalid value changes
    /// nothing.
    pub fn set_hyper(&mut self, name: &str, value: impl Into<HyperValue>) -> Result<()> {
        let mut c = self.config.clone();
        c.set(name, &value.into())?;
        c.validate()?;
        self.config = c;
        Ok(())
    }

    /// The learning rate.
    pub fn lr(&self) -> f64 {
        self.config.lr
    }

    /// Sets the learning rate, checking it; on error nothing changes.
    ///
    /// It takes no group index, unlike [`Optimizer::set_lr`](crate::Optimizer::set_lr)`(group,
    /// lr)`: LBFGS has exactly one param group, as torch's (whose constructor raises
    /// "LBFGS doesn't support per-parameter options (parameter groups)"), so an index could
    /// only be 0. Schedulers and other code generic over optimizers reach it as group 0
    /// through [`GroupHyperparams::set_lr`], which must be called by path here
    /// (`GroupHyperparams::set_lr(&mut opt, 0, lr)`) because this method shadows it.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        self.set_hyper("lr", lr)
    }

    /// The group's layout: the maximal runs of consecutive arena positions its parameters
    /// fill, ascending (one run for a group registered one after another).
    pub fn params(&self) -> &[Range<usize>] {
        &self.flat.runs
    }

    /// torch's `state["func_evals"]`: closure evaluations over all steps.
    pub fn func_evals(&self) -> u64 {
        self.scalars.func_evals
    }

    /// torch's `state["n_iter"]`: iterations over all steps.
    pub fn n_iter(&self) -> u64 {
        self.scalars.n_iter
    }

    /// Number of stored correction pairs (`len(old_dirs)`).
    pub fn history_len(&self) -> usize {
        self.history.order.len()
    }

    /// The last search direction `d`, once an iteration has run.
    pub fn direction(&self) -> Option<&[T]> {
        self.scalars.started.then_some(&self.d[..])
    }

    /// Zeroes (`set_to_none = false`) or removes (`true`) the group's gradients.
    pub fn zero_grad(&self, arena: &mut Arena<T>, set_to_none: bool) -> Result<()> {
        self.check_arena(arena)?;
        for r in &self.flat.runs {
            arena.zero_grad_range(r.clone(), set_to_none);
        }
        Ok(())
    }

    fn check_arena(&self, arena: &Arena<T>) -> Result<()> {
        if arena.id() != self.arena_id {
            return Err(Error::ArenaMismatch(
                "this LBFGS optimizer was built for another arena".into(),
            ));
        }
        Ok(())
    }

    /// `optimizer.step(closure)`: up to `max_iter` L-BFGS iterations. `closure` gets the
    /// arena, computes the loss at the current parameters, writes the gradients (a parameter
    /// left without one counts as zero) and returns the loss; it may be called up to
    /// `max_eval` times. Returns the loss of the first call, as torch does.
    ///
    /// Errors before anything changes for a wrong arena or invalid hyperparameters. If the
    /// closure replaces the arena it was given (`std::mem::swap`), the step stops with
    /// [`Error::ArenaMismatch`] and the optimizer's state is cleared, since the step cannot
    /// be completed.
    pub fn step(
        &mut self,
        arena: &mut Arena<T>,
        mut closure: impl FnMut(&mut Arena<T>) -> T,
    ) -> Result<T> {
        self.run(arena, |a: &mut Arena<T>| Ok(closure(a)), false)
    }

    /// [`LBFGS::step`] with a closure that can fail. On a closure error the step returns
    /// [`Error::Closure`] with its message, and everything is as before the step: the
    /// parameters get their values back and the optimizer's state (counters, history,
    /// direction) is restored. Gradients stay as the closure left them.
    ///
    /// To undo, the step keeps a copy of the parameters, `d` and `prev_flat_grad`, and keeps
    /// the correction pairs it evicts until it succeeds: at most one extra pair per
    /// iteration in memory.
    pub fn try_step<E: std::fmt::Display>(
        &mut self,
        arena: &mut Arena<T>,
        mut closure: impl FnMut(&mut Arena<T>) -> std::result::Result<T, E>,
    ) -> Result<T> {
        self.run(
            arena,
            |a: &mut Arena<T>| closure(a).map_err(|e| Error::Closure(e.to_string())),
            true,
        )
    }

    fn run<F: FnMut(&mut Arena<T>) -> Result<T>>(
        &mut self,
        arena: &mut Arena<T>,
        closure: F,
        transactional: bool,
    ) -> Result<T> {
        self.check_arena(arena)?;
        self.config.validate()?;
        let mut ev = Evaluator {
            arena,
            closure,
            arena_id: self.arena_id,
            flat: Arc::clone(&self.flat),
            maximize: self.config.maximize,
            simd: self.simd,
        };
        if self.flat.len == 0 {
            // Nothing to optimize (torch returns `closure()` for an empty parameter list).
            return ev.call();
        }
        if transactional {
            self.save_snapshot(ev.arena);
        }
        match self.iterate(&mut ev, transactional) {
            Ok(loss) => {
                if transactional {
                    self.history.commit();
                }
                Ok(loss)
            }
            Err(e) => {
                if transactional {
                    self.restore_snapshot(ev.arena);
                } else {
                    self.reset();
                }
                Err(e)
            }
        }
    }

    /// Forgets all state, as a freshly built optimizer (buffers are kept for reuse).
    fn reset(&mut self) {
        self.scalars = Scalars::EMPTY;
        self.history.clear(false);
        self.history.retired.clear();
        self.history.rebuild_free();
        self.al = None;
    }

    fn save_snapshot(&mut self, arena: &Arena<T>) {
        let n = self.flat.len;
        let s = self.snapshot.get_or_insert_with(|| Snapshot {
            scalars: Scalars::EMPTY,
            params: filled(n, T::ZERO),
            d: filled(n, T::ZERO),
            prev_flat_grad: filled(n, T::ZERO),
            order: VecDeque::new(),
            ro: VecDeque::new(),
            al: None,
        });
        s.scalars = self.scalars;
        self.flat.read(arena.params(), &mut s.params);
        if self.scalars.started {
            s.d.copy_from_slice(&self.d);
            s.prev_flat_grad.copy_from_slice(&self.prev_flat_grad);
        }
        s.order.clone_from(&self.history.order);
        s.ro.clone_from(&self.history.ro);
        s.al.clone_from(&self.al);
    }

    fn restore_snapshot(&mut self, arena: &mut Arena<T>) {
        let Some(s) = &self.snapshot else { return };
        self.scalars = s.scalars;
        if arena.id() == self.arena_id {
            self.flat.write(arena.params_mut(), &s.params);
        }
        if s.scalars.started {
            self.d.copy_from_slice(&s.d);
            self.prev_flat_grad.copy_from_slice(&s.prev_flat_grad);
        }
        self.history.order.clone_from(&s.order);
        self.history.ro.clone_from(&s.ro);
        self.history.rebuild_free();
        self.al.clone_from(&s.al);
    }

    /// torch's `LBFGS.step` body.
    fn iterate<F: FnMut(&mut Arena<T>) -> Result<T>>(
        &mut self,
        ev: &mut Evaluator<'_, T, F>,
        transactional: bool,
    ) -> Result<T> {
        let n = self.flat.len;
        let lr = self.config.lr;
        let max_iter = self.config.max_iter;
        let max_eval = self.config.effective_max_eval();
        let tolerance_grad = T::from_f64(self.config.tolerance_grad);
        let tolerance_change = self.config.tolerance_change;
        let history_size = self.config.history_size;
        let line_search = self.config.strong_wolfe();

        self.scalars.present = true;

        // evaluate initial f(x) and df/dx
        let orig_loss = ev.call()?;
        let mut loss = ev.seen(orig_loss);
        let mut current_evals: usize = 1;
        self.scalars.func_evals += 1;

        let mut flat = self.work.slot(n, &[]);
        ev.gather(&mut self.work.grads[flat]);
        let mut opt_cond = k::abs_max(self.simd, &self.work.grads[flat]) <= tolerance_grad;
        // optimal condition
        if opt_cond {
            return Ok(orig_loss);
        }
        if self.d.len() != n {
            self.d = filled(n, T::ZERO);
            self.prev_flat_grad = filled(n, T::ZERO);
        }

        let mut n_iter = 0;
        while n_iter < max_iter {
            n_iter += 1;
            self.scalars.n_iter += 1;

            // compute gradient descent direction
            let g = &self.work.grads[flat][..];
            if self.scalars.n_iter == 1 {
                k::neg_into(self.simd, &mut self.d, g);
                self.history.clear(transactional);
                self.scalars.h_diag = 1.0;
            } else {
                update_history(
                    self.simd,
                    &mut self.history,
                    &mut self.scalars,
                    &self.d,
                    &self.prev_flat_grad,
                    g,
                    history_size,
                    transactional,
                );
                two_loop(
                    self.simd,
                    &self.history,
                    &mut self.al,
                    &mut self.d,
                    self.scalars.h_diag,
                    g,
                    history_size,
                );
            }
            self.prev_flat_grad.copy_from_slice(g);
            self.scalars.prev_loss = loss;
            self.scalars.started = true;

            // compute step length: reset initial guess for step size
            let mut t = if self.scalars.n_iter == 1 {
                // min(1.0, 1.0 / flat_grad.abs().sum()) * lr
                let inv = Ten(T::ONE / k::abs_sum(self.simd, g));
                py_min(Py(1.0), inv).mul(Py(lr))
            } else {
                Py(lr)
            };
            self.scalars.t = t.value();

            // directional derivative
            let gtd = k::dot(self.simd, g, &self.d);
            // directional derivative is below tolerance
            if gtd > T::from_f64(-tolerance_change) {
                break;
            }

            let mut ls_func_evals = 0;
            if line_search {
                if self.work.x_init.len() != n {
                    self.work.x_init = filled(n, T::ZERO);
                }
                self.flat.read(ev.arena.params(), &mut self.work.x_init);
                let found = strong_wolfe(
                    ev,
                    &mut self.work,
                    &self.d,
                    t,
                    loss,
                    flat,
                    gtd,
                    LINE_SEARCH_TOLERANCE_CHANGE,
                    max_eval as i64 - current_evals as i64,
                )?;
                loss = found.loss;
                flat = found.grad;
                t = found.t;
                ls_func_evals = found.evals;
                ev.add_to_params(t.el(), &self.d);
                opt_cond = k::abs_max(self.simd, &self.work.grads[flat]) <= tolerance_grad;
            } else {
                // no line search, simply move with fixed-step
                ev.add_to_params(t.el(), &self.d);
                if n_iter != max_iter {
                    // re-evaluate function only if not in last iteration
                    let l = ev.call()?;
                    loss = ev.seen(l);
                    ev.gather(&mut self.work.grads[flat]);
                    opt_cond = k::abs_max(self.simd, &self.work.grads[flat]) <= tolerance_grad;
                    ls_func_evals = 1;
                }
            }
            self.scalars.t = t.value();

            // update func eval
            current_evals += ls_func_evals as usize;
            self.scalars.func_evals += ls_func_evals;

            // check conditions
            if n_iter == max_iter || current_evals >= max_eval || opt_cond {
                break;
            }
            // lack of progress
            if k::abs_max_scaled(self.simd, &self.d, t.el()) <= T::from_f64(tolerance_change) {
                break;
            }
            if (loss - self.scalars.prev_loss).abs() < tolerance_change {
                break;
            }
        }
        Ok(orig_loss)
    }
}

impl<T: Float> GroupHyperparams for LBFGS<T> {
    fn num_groups(&self) -> usize {
        1
    }
    fn group_hyper(&self, group: usize, name: &str) -> Result<HyperValue> {
        if group != 0 {
            return Err(Error::NoSuchGroup {
                index: group,
                count: 1,
            });
        }
        self.hyper(name)
    }
    fn set_group_hyper(&mut self, group: usize, name: &str, value: HyperValue) -> Result<()> {
        if group != 0 {
            return Err(Error::NoSuchGroup {
                index: group,
                count: 1,
            });
        }
        self.set_hyper(name, value)
    }
    fn group_initial_lr(&self, group: usize) -> Result<Option<f64>> {
        if group != 0 {
            return Err(Error::NoSuchGroup {
                index: group,
                count: 1,
            });
        }
        Ok(self.initial_lr)
    }
    fn set_group_initial_lr(&mut self, group: usize, initial_lr: Option<f64>) -> Result<()> {
        if group != 0 {
            return Err(Error::NoSuchGroup {
                index: group,
                count: 1,
            });
        }
        self.initial_lr = initial_lr;
        Ok(())
    }
}

crate::renamed! {
    #[deprecated(since = "0.2.0", note = "renamed to `LBFGS`, torch's spelling")]
    Lbfgs<T> => LBFGS;
    #[deprecated(since = "0.2.0", note = "renamed to `LBFGSConfig`, torch's spelling")]
    LbfgsConfig => LBFGSConfig;
    #[deprecated(since = "0.2.0", note = "renamed to `LBFGSState`, torch's spelling")]
    LbfgsState<T> => LBFGSState;
    #[deprecated(since = "0.2.0", note = "renamed to `LBFGSStateDict`, torch's spelling")]
    LbfgsStateDict<T> => LBFGSStateDict;
}
