//! L-BFGS, torch's `torch.optim.LBFGS`, with its strong Wolfe line search.
//!
//! L-BFGS is not elementwise: it works on the whole parameter vector at once (dot products,
//! a history of past steps). torch builds that vector by concatenating every parameter's
//! values and gradients in group order; here it is the group's runs of the arena (its maximal
//! runs of consecutive parameters) back to back, which for a group registered in one piece is
//! simply its slice of the arena, read and written in place.

use std::cmp::Ordering;
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::arch::SimdLevel;
use crate::arena::{filled, AlignedBuf, Arena, ParamInfo};
use crate::error::{Error, Result};
use crate::float::{Float, Lane};
use crate::hyper::{check, hyperparams, GroupHyperparams, HyperValue, Hyperparams};
use crate::kernels::lbfgs as k;
use crate::optimizer::{runs_of, ParamGroup};
use crate::state::{GroupDict, MatchBy, ParamRef, STATE_DICT_FORMAT};

/// torch's name of the one line search it offers.
pub const STRONG_WOLFE: &str = "strong_wolfe";

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
    /// Hyperparameters of [`Lbfgs`], with torch's names and defaults.
    pub struct LbfgsConfig for "LBFGS" {
        /// Learning rate: the step length tried first (the whole step without a line search).
        lr: f64 = 1.0,
        /// Most iterations per [`Lbfgs::step`] call.
        max_iter: usize = 20,
        /// Most closure evaluations per [`Lbfgs::step`] call. `None` means
        /// `max_iter * 5 // 4`, which [`Lbfgs::new`] fills in, as torch's constructor does.
        max_eval: Option<usize> = None,
        /// Stop when the largest gradient magnitude is at most this (first-order optimality).
        tolerance_grad: f64 = 1e-7,
        /// Stop when the loss or the parameters change by less than this.
        tolerance_change: f64 = 1e-9,
        /// Number of correction pairs `(y, s)` kept.
        history_size: usize = 100,
        /// `None` (fixed step `lr`) or `"strong_wolfe"`.
        line_search_fn: Option<String> = None,
        /// Maximize the objective: the loss and gradients the closure reports are negated
        /// before L-BFGS sees them (torch's keyword-only `maximize`).
        maximize: bool = false,
    }
}

fn invalid(msg: String) -> Result<()> {
    Err(Error::InvalidHyperparameter(msg))
}

impl LbfgsConfig {
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
        match self.line_search_fn.as_deref() {
            None => {}
            // torch fails inside the line search (`bracket` unbound) when it may not evaluate
            // at all.
            Some(STRONG_WOLFE) if self.max_eval == Some(0) && self.max_iter > 0 => {
                return invalid(
                    "Invalid max_eval value: 0 (the strong Wolfe line search needs at least one \
                     evaluation)"
                        .into(),
                );
            }
            Some(STRONG_WOLFE) => {}
            // torch raises this RuntimeError at the first step; it is checked up front here.
            Some(_) => return invalid("only 'strong_wolfe' is supported".into()),
        }
        Ok(())
    }

    /// The evaluation budget in effect: `max_eval`, or torch's default `max_iter * 5 // 4`.
    pub fn effective_max_eval(&self) -> usize {
        self.max_eval
            .unwrap_or_else(|| default_max_eval(self.max_iter))
    }

    fn strong_wolfe(&self) -> bool {
        self.line_search_fn.as_deref() == Some(STRONG_WOLFE)
    }
}

/// `max_iter * 5 // 4` without overflow.
fn default_max_eval(max_iter: usize) -> usize {
    usize::try_from(max_iter as u128 * 5 / 4).unwrap_or(usize::MAX)
}

/// A scalar as torch's LBFGS code holds it: a Python float (`Py`, f64 arithmetic) or a
/// zero-dimensional tensor of the parameter dtype (`Ten`). Mixed arithmetic follows torch's
/// type promotion: the float is rounded to the tensor's dtype and the operation runs there,
/// and `float / tensor` is `tensor.reciprocal() * float` (`Tensor.__rtruediv__`). Comparisons
/// between the two happen in the tensor dtype. In f32 this decides every rounding of the line
/// search; in f64 the reciprocal still does.
#[derive(Debug, Clone, Copy)]
enum Num<T> {
    Py(f64),
    Ten(T),
}

use Num::{Py, Ten};

impl<T: Float> Num<T> {
    /// The value in the tensor dtype (what `add_(x, alpha=t)` and `mul(t)` use).
    fn el(self) -> T {
        match self {
            Py(x) => T::from_f64(x),
            Ten(x) => x,
        }
    }

    /// The exact value.
    fn value(self) -> f64 {
        match self {
            Py(x) => x,
            Ten(x) => x.to_f64(),
        }
    }

    fn add(self, o: Self) -> Self {
        match (self, o) {
            (Py(a), Py(b)) => Py(a + b),
            (a, b) => Ten(a.el() + b.el()),
        }
    }

    fn sub(self, o: Self) -> Self {
        match (self, o) {
            (Py(a), Py(b)) => Py(a - b),
            (a, b) => Ten(a.el() - b.el()),
        }
    }

    fn mul(self, o: Self) -> Self {
        match (self, o) {
            (Py(a), Py(b)) => Py(a * b),
            (a, b) => Ten(a.el() * b.el()),
        }
    }

    /// Python would raise `ZeroDivisionError` for a float divided by a float zero; this
    /// continues with IEEE infinities instead (the bracket is then degenerate and the line
    /// search ends on its own).
    fn div(self, o: Self) -> Self {
        match (self, o) {
            (Py(a), Py(b)) => Py(a / b),
            (Py(a), Ten(b)) => Ten((T::ONE / b) * T::from_f64(a)),
            (a, b) => Ten(a.el() / b.el()),
        }
    }

    fn abs(self) -> Self {
        match self {
            Py(x) => Py(x.abs()),
            Ten(x) => Ten(Lane::abs(x)),
        }
    }

    fn sqrt(self) -> Self {
        match self {
            Py(x) => Py(x.sqrt()),
            Ten(x) => Ten(Lane::sqrt(x)),
        }
    }

    fn cmp(self, o: Self) -> Option<Ordering> {
        match (self, o) {
            (Py(a), Py(b)) => a.partial_cmp(&b),
            (a, b) => a.el().partial_cmp(&b.el()),
        }
    }

    fn lt(self, o: Self) -> bool {
        self.cmp(o) == Some(Ordering::Less)
    }

    fn gt(self, o: Self) -> bool {
        self.cmp(o) == Some(Ordering::Greater)
    }

    fn le(self, o: Self) -> bool {
        matches!(self.cmp(o), Some(Ordering::Less | Ordering::Equal))
    }

    fn ge(self, o: Self) -> bool {
        matches!(self.cmp(o), Some(Ordering::Greater | Ordering::Equal))
    }
}

/// Python's `min(a, b)`: `b` only if `b < a`.
fn py_min<T: Float>(a: Num<T>, b: Num<T>) -> Num<T> {
    if b.lt(a) {
        b
    } else {
        a
    }
}

/// Python's `max(a, b)`: `b` only if `b > a`.
fn py_max<T: Float>(a: Num<T>, b: Num<T>) -> Num<T> {
    if b.gt(a) {
        b
    } else {
        a
    }
}

/// torch's `_cubic_interpolate`: the minimizer of the cubic through `(x1, f1)` and `(x2, f2)`
/// with slopes `g1`, `g2`, clamped to `bounds` (default: the interval between the points), or
/// the bounds' midpoint when the cubic has no minimizer.
fn cubic_interpolate<T: Float>(
    x1: Num<T>,
    f1: f64,
    g1: Num<T>,
    x2: Num<T>,
    f2: f64,
    g2: Num<T>,
    bounds: Option<(Num<T>, Num<T>)>,
) -> Num<T> {
    let (lo, hi) = bounds.unwrap_or(if x1.le(x2) { (x1, x2) } else { (x2, x1) });
    let (f1, f2) = (Py(f1), Py(f2));
    // d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    let d1 = g1.add(g2).sub(Py(3.0).mul(f1.sub(f2)).div(x1.sub(x2)));
    // d2_square = d1**2 - g1 * g2
    let d2_square = d1.mul(d1).sub(g1.mul(g2));
    if d2_square.ge(Py(0.0)) {
        let d2 = d2_square.sqrt();
        let min_pos = if x1.le(x2) {
            // x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
            x2.sub(
                x2.sub(x1)
                    .mul(g2.add(d2).sub(d1).div(g2.sub(g1).add(Py(2.0).mul(d2)))),
            )
        } else {
            x1.sub(
                x1.sub(x2)
                    .mul(g1.add(d2).sub(d1).div(g1.sub(g2).add(Py(2.0).mul(d2)))),
            )
        };
        py_min(py_max(min_pos, lo), hi)
    } else {
        lo.add(hi).div(Py(2.0))
    }
}

/// The correction pairs: `old_dirs` (`y`) and `old_stps` (`s`) in buffers that are reused,
/// `ro = 1 / (y·s)`.
struct History<T> {
    /// `[y, s]` buffers. A slot is in `order`, in `free`, or retired (evicted during a
    /// transactional step and kept until it commits).
    slots: Vec<[AlignedBuf<T>; 2]>,
    /// Slots of the live pairs, oldest first.
    order: VecDeque<usize>,
    /// `ro[i]` of `order[i]`.
    ro: VecDeque<T>,
    free: Vec<usize>,
    retired: Vec<usize>,
}

impl<T: Float> History<T> {
    fn new() -> Self {
        History {
            slots: Vec::new(),
            order: VecDeque::new(),
            ro: VecDeque::new(),
            free: Vec::new(),
            retired: Vec::new(),
        }
    }

    /// A slot to compute a candidate pair in (allocates only until the history is full).
    fn take(&mut self, n: usize) -> usize {
        match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push([filled(n, T::ZERO), filled(n, T::ZERO)]);
                self.slots.len() - 1
            }
        }
    }

    fn release(&mut self, slot: usize, transactional: bool) {
        if transactional {
            self.retired.push(slot);
        } else {
            self.free.push(slot);
        }
    }

    fn pop_oldest(&mut self, transactional: bool) {
        if let Some(s) = self.order.pop_front() {
            self.ro.pop_front();
            self.release(s, transactional);
        }
    }

    fn clear(&mut self, transactional: bool) {
        while !self.order.is_empty() {
            self.pop_oldest(transactional);
        }
    }

    /// Ends a transactional step that succeeded: retired slots become reusable.
    fn commit(&mut self) {
        self.free.append(&mut self.retired);
    }

    /// After `order` was restored: every slot not in it is free.
    fn rebuild_free(&mut self) {
        self.retired.clear();
        self.free.clear();
        for i in 0..self.slots.len() {
            if !self.order.contains(&i) {
                self.free.push(i);
            }
        }
    }

    fn pair(&self, i: usize) -> (&[T], &[T]) {
        let [y, s] = &self.slots[self.order[i]];
        (y, s)
    }
}

/// Flat-gradient buffers and the line search's copy of the parameters.
struct Work<T> {
    grads: Vec<AlignedBuf<T>>,
    x_init: AlignedBuf<T>,
}

impl<T: Float> Work<T> {
    /// A gradient buffer other than `exclude` (allocated on first need, then reused).
    fn slot(&mut self, n: usize, exclude: &[usize]) -> usize {
        if let Some(i) = (0..self.grads.len()).find(|i| !exclude.contains(i)) {
            return i;
        }
        self.grads.push(filled(n, T::ZERO));
        self.grads.len() - 1
    }
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

/// Calls the closure and reads the flat gradient.
struct Evaluator<'a, T, F> {
    arena: &'a mut Arena<T>,
    closure: F,
    arena_id: u64,
    flat: Arc<Flat>,
    maximize: bool,
    simd: SimdLevel,
}

impl<T: Float, F: FnMut(&mut Arena<T>) -> Result<T>> Evaluator<'_, T, F> {
    fn call(&mut self) -> Result<T> {
        let loss = (self.closure)(&mut *self.arena)?;
        if self.arena.id() != self.arena_id {
            return Err(Error::ArenaMismatch(
                "the LBFGS closure replaced the arena it was given".into(),
            ));
        }
        Ok(loss)
    }

    /// The loss as L-BFGS sees it (`float(loss)`, negated when maximizing).
    fn seen(&self, loss: T) -> f64 {
        if self.maximize {
            -loss.to_f64()
        } else {
            loss.to_f64()
        }
    }

    /// torch's `_gather_flat_grad`: the group's gradients (zeros for a parameter without
    /// one), negated when maximizing.
    fn gather(&self, out: &mut [T]) {
        let flags = self.arena.grad_flags();
        let grads = self.arena.grads();
        for (&i, &at) in self.flat.params.iter().zip(&self.flat.starts) {
            let r = self.arena.infos()[i].range();
            let dst = &mut out[at..at + r.len()];
            if flags[i] {
                if self.maximize {
                    k::neg_into(self.simd, dst, &grads[r]);
                } else {
                    dst.copy_from_slice(&grads[r]);
                }
            } else {
                dst.fill(if self.maximize { -T::ZERO } else { T::ZERO });
            }
        }
    }

    /// `p.add_(d, alpha=t)` over the group's parameters, `d` flat. Elementwise, so cutting
    /// it at the runs changes no bit.
    fn add_to_params(&mut self, t: T, d: &[T]) {
        let values = self.arena.params_mut();
        for (e, at) in &self.flat.segs {
            k::axpy(self.simd, &mut values[e.clone()], t, &d[*at..*at + e.len()]);
        }
    }

    /// torch's `_directional_evaluate`: the loss and flat gradient at `x + t d`; the
    /// parameters are `x` again afterwards.
    fn directional(&mut self, x: &[T], t: T, d: &[T], g_out: &mut [T]) -> Result<f64> {
        let values = self.arena.params_mut();
        for (e, at) in &self.flat.segs {
            let f = *at..*at + e.len();
            k::axpy_into(self.simd, &mut values[e.clone()], &x[f.clone()], t, &d[f]);
        }
        let loss = self.call()?;
        let f = self.seen(loss);
        self.gather(g_out);
        self.flat.write(self.arena.params_mut(), x);
        Ok(f)
    }
}

/// A bracket of the line search (`len` 1 once a point satisfying the conditions is found).
#[derive(Clone, Copy)]
struct Bracket<T> {
    t: [Num<T>; 2],
    f: [f64; 2],
    g: [usize; 2],
    gtd: [Num<T>; 2],
    len: usize,
}

/// What the line search returns: loss, gradient slot, step, evaluations.
struct Found<T> {
    loss: f64,
    grad: usize,
    t: Num<T>,
    evals: u64,
}

fn eval_at<T: Float, F: FnMut(&mut Arena<T>) -> Result<T>>(
    ev: &mut Evaluator<'_, T, F>,
    work: &mut Work<T>,
    d: &[T],
    t: Num<T>,
    slot: usize,
) -> Result<(f64, Num<T>)> {
    let Work { grads, x_init } = work;
    let f = ev.directional(x_init, t.el(), d, &mut grads[slot])?;
    Ok((f, Ten(k::dot(ev.simd, &grads[slot], d))))
}

/// torch's `_strong_wolfe` (Nocedal & Wright, Algorithms 3.5 and 3.6): bracket a step
/// satisfying the strong Wolfe conditions, then zoom in on it by cubic interpolation.
/// Gradients live in `work.grads` slots; torch's clones are shared slots here, since no
/// gradient is modified after it is computed.
#[allow(clippy::too_many_arguments)]
fn strong_wolfe<T: Float, F: FnMut(&mut Arena<T>) -> Result<T>>(
    ev: &mut Evaluator<'_, T, F>,
    work: &mut Work<T>,
    d: &[T],
    mut t: Num<T>,
    f: f64,
    g: usize,
    gtd: T,
    tolerance_change: f64,
    max_ls: i64,
) -> Result<Found<T>> {
    let n = d.len();
    let gtd = Ten(gtd);
    let d_norm = Ten(k::abs_max(ev.simd, d));
    // f + c1 * t * gtd: the sufficient-decrease bound.
    let armijo = |t: Num<T>| Py(f).add(Py(C1).mul(t).mul(gtd));
    // -c2 * gtd: the curvature bound.
    let curvature = Py(-C2).mul(gtd);

    let mut g_new = work.slot(n, &[g]);
    let (mut f_new, mut gtd_new) = eval_at(ev, work, d, t, g_new)?;
    let mut ls_func_evals = 1u64;

    let (mut t_prev, mut f_prev, mut g_prev, mut gtd_prev) = (Py(0.0), f, g, gtd);
    let mut done = false;
    let mut ls_iter: i64 = 0;
    let mut bracket: Option<Bracket<T>> = None;
    while ls_iter < max_ls {
        if Py(f_new).gt(armijo(t)) || (ls_iter > 1 && f_new >= f_prev) {
            bracket = Some(Bracket {
                t: [t_prev, t],
                f: [f_prev, f_new],
                g: [g_prev, g_new],
                gtd: [gtd_prev, gtd_new],
                len: 2,
            });
            break;
        }
        if gtd_new.abs().le(curvature) {
            bracket = Some(Bracket {
                t: [t, t],
                f: [f_new, f_new],
                g: [g_new, g_new],
                gtd: [gtd_new, gtd_new],
                len: 1,
            });
            done = true;
            break;
        }
        if gtd_new.ge(Py(0.0)) {
            bracket = Some(Bracket {
                t: [t_prev, t],
                f: [f_prev, f_new],
                g: [g_prev, g_new],
                gtd: [gtd_prev, gtd_new],
                len: 2,
            });
            break;
        }
        // interpolate
        let min_step = t.add(Py(0.01).mul(t.sub(t_prev)));
        let max_step = t.mul(Py(10.0));
        let tmp = t;
        t = cubic_interpolate(
            t_prev,
            f_prev,
            gtd_prev,
            t,
            f_new,
            gtd_new,
            Some((min_step, max_step)),
        );
        // next step
        t_prev = tmp;
        f_prev = f_new;
        g_prev = g_new;
        gtd_prev = gtd_new;
        g_new = work.slot(n, &[g, g_prev]);
        (f_new, gtd_new) = eval_at(ev, work, d, t, g_new)?;
        ls_func_evals += 1;
        ls_iter += 1;
    }
    // reached max number of iterations?
    if ls_iter == max_ls {
        // torch leaves `bracket_gtd` as it was; the zoom below does not run.
        bracket = Some(Bracket {
            t: [Py(0.0), t],
            f: [f, f_new],
            g: [g, g_new],
            gtd: [gtd, gtd_new],
            len: 2,
        });
    }
    let Some(mut b) = bracket else {
        // Only a negative `max_ls` gets here, which validation rules out (torch raises
        // UnboundLocalError).
        return Err(Error::InvalidHyperparameter(
            "Invalid max_eval value: the strong Wolfe line search has no evaluation left".into(),
        ));
    };

    // zoom phase
    let mut insuf_progress = false;
    let order = |b: &Bracket<T>| {
        if b.f[0] <= b.f[b.len - 1] {
            (0, 1)
        } else {
            (1, 0)
        }
    };
    let (mut low, mut high) = order(&b);
    while !done && ls_iter < max_ls {
        // line-search bracket is so small
        if b.t[1]
            .sub(b.t[0])
            .abs()
            .mul(d_norm)
            .lt(Py(tolerance_change))
        {
            break;
        }
        // compute new trial value
        t = cubic_interpolate(b.t[0], b.f[0], b.gtd[0], b.t[1], b.f[1], b.gtd[1], None);
        // test that we are making sufficient progress
        let b_max = py_max(b.t[0], b.t[1]);
        let b_min = py_min(b.t[0], b.t[1]);
        let eps = Py(0.1).mul(b_max.sub(b_min));
        if py_min(b_max.sub(t), t.sub(b_min)).lt(eps) {
            // interpolation close to boundary
            if insuf_progress || t.ge(b_max) || t.le(b_min) {
                // evaluate at 0.1 away from boundary
                t = if t.sub(b_max).abs().lt(t.sub(b_min).abs()) {
                    b_max.sub(eps)
                } else {
                    b_min.add(eps)
                };
                insuf_progress = false;
            } else {
                insuf_progress = true;
            }
        } else {
            insuf_progress = false;
        }
        // Evaluate new point
        g_new = work.slot(n, &[g, b.g[0], b.g[1]]);
        (f_new, gtd_new) = eval_at(ev, work, d, t, g_new)?;
        ls_func_evals += 1;
        ls_iter += 1;

        if Py(f_new).gt(armijo(t)) || f_new >= b.f[low] {
            // Armijo condition not satisfied or not lower than lowest point
            b.t[high] = t;
            b.f[high] = f_new;
            b.g[high] = g_new;
            b.gtd[high] = gtd_new;
            (low, high) = order(&b);
        } else {
            if gtd_new.abs().le(curvature) {
                // Wolfe conditions satisfied
                done = true;
            } else if gtd_new.mul(b.t[high].sub(b.t[low])).ge(Py(0.0)) {
                // old high becomes new low
                b.t[high] = b.t[low];
                b.f[high] = b.f[low];
                b.g[high] = b.g[low];
                b.gtd[high] = b.gtd[low];
            }
            // new point becomes new low
            b.t[low] = t;
            b.f[low] = f_new;
            b.g[low] = g_new;
            b.gtd[low] = gtd_new;
        }
    }
    Ok(Found {
        loss: b.f[low],
        grad: b.g[low],
        t: b.t[low],
        evals: ls_func_evals,
    })
}

#[allow(clippy::too_many_arguments)]
/// `y = g - prev_flat_grad`, `s = d * t`, and the pair is stored when `y·s > 1e-10`.
fn update_history<T: Float>(
    simd: SimdLevel,
    history: &mut History<T>,
    scalars: &mut Scalars,
    d: &[T],
    prev_flat_grad: &[T],
    g: &[T],
    history_size: usize,
    transactional: bool,
) {
    let n = g.len();
    let c = history.take(n);
    let t = T::from_f64(scalars.t);
    let (ys, yy) = {
        let [y, s] = &mut history.slots[c];
        k::sub_into(simd, y, g, prev_flat_grad);
        k::scale_into(simd, s, d, t);
        (k::dot(simd, y, s), k::dot(simd, y, y))
    };
    if ys > T::from_f64(MIN_CURVATURE) {
        // shift history by one (limited-memory)
        while history.order.len() >= history_size {
            history.pop_oldest(transactional);
        }
        // store new direction/step
        history.order.push_back(c);
        history.ro.push_back(T::ONE / ys);
        // update scale of initial Hessian approximation
        scalars.h_diag = (ys / yy).to_f64();
    } else {
        history.free.push(c);
    }
}

/// The two-loop recursion: `d = -H g` with the L-BFGS inverse Hessian. Each axpy is fused
/// with the next dot product (same numbers, one pass fewer).
fn two_loop<T: Float>(
    simd: SimdLevel,
    h: &History<T>,
    al: &mut Option<Vec<Option<T>>>,
    d: &mut [T],
    h_diag: f64,
    g: &[T],
    history_size: usize,
) {
    let num_old = h.order.len();
    let al = al.get_or_insert_with(|| vec![None; history_size]);
    if al.len() < num_old {
        al.resize(num_old, None);
    }
    // q = flat_grad.neg()
    k::neg_into(simd, d, g);
    if num_old > 0 {
        let mut sq = k::dot(simd, h.pair(num_old - 1).1, d);
        for i in (0..num_old).rev() {
            // al[i] = old_stps[i].dot(q) * ro[i]; q.add_(old_dirs[i], alpha=-al[i])
            let a = sq * h.ro[i];
            al[i] = Some(a);
            let y = h.pair(i).0;
            if i > 0 {
                sq = k::axpy_dot(simd, d, -a, y, h.pair(i - 1).1);
            } else {
                k::axpy(simd, d, -a, y);
            }
        }
    }
    // d = r = torch.mul(q, H_diag)
    k::scale(simd, d, T::from_f64(h_diag));
    if num_old > 0 {
        let mut yr = k::dot(simd, h.pair(0).0, d);
        for (i, a) in al[..num_old].iter().enumerate() {
            // be_i = old_dirs[i].dot(r) * ro[i]; r.add_(old_stps[i], alpha=al[i] - be_i)
            let be = yr * h.ro[i];
            // Written by the first loop for every i < num_old.
            let a = a.unwrap_or(T::ZERO);
            let s = h.pair(i).1;
            if i + 1 < num_old {
                yr = k::axpy_dot(simd, d, a - be, s, h.pair(i + 1).0);
            } else {
                k::axpy(simd, d, a - be, s);
            }
        }
    }
}

/// L-BFGS (torch's `LBFGS`), optionally with a strong Wolfe line search.
///
/// Each [`Lbfgs::step`] runs up to `max_iter` iterations and calls the closure (which computes
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
/// are saved by [`Lbfgs::state_dict`].
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
/// minimizing `-f`. [`Lbfgs::step`] still returns the closure's own (un-negated) first loss.
/// torch 2.15 has the same keyword with the same meaning.
///
/// # Where it differs from torch, on purpose
/// - `line_search_fn` other than `"strong_wolfe"`, `history_size = 0`, and `max_eval = 0`
///   with the line search are rejected when the config is set; torch fails at the first step.
/// - Shrinking `history_size` below the number of stored pairs drops the oldest pairs at the
///   next update (torch compares with `==` and never trims again); growing it extends `al`
///   (torch raises `IndexError`).
/// - Where Python would raise `ZeroDivisionError` (cubic interpolation between two equal
///   Python-float steps), the line search continues with IEEE arithmetic.
/// - A closure error in [`Lbfgs::try_step`] undoes the whole step (see there).
///
/// ```
/// use optarena::{ArenaBuilder, Lbfgs, LbfgsConfig, ParamGroup};
///
/// // Minimize the Rosenbrock function from (-1.2, 1).
/// let mut b = ArenaBuilder::<f64>::new();
/// let x = b.param("x", &[2], &[-1.2, 1.0])?;
/// let mut arena = b.build();
/// let config = LbfgsConfig::default().with_line_search_fn(Some("strong_wolfe".into()));
/// let mut opt = Lbfgs::new(&arena, [ParamGroup::all()], config)?;
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
pub struct Lbfgs<T: Float> {
    arena_id: u64,
    layout: Vec<ParamInfo>,
    /// Where the group's parameters, the flat vector, lie in the arena.
    flat: Arc<Flat>,
    config: LbfgsConfig,
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

impl<T: Float> std::fmt::Debug for Lbfgs<T> {
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

impl<T: Float> Lbfgs<T> {
    /// Builds L-BFGS over one param group of `arena` (torch's constructor).
    ///
    /// `max_eval = None` becomes `max_iter * 5 // 4` of `defaults` before the group's
    /// overrides apply, as torch computes it. Errors: an invalid value (torch's messages), an
    /// empty list, and more than one group ("LBFGS doesn't support per-parameter options
    /// (parameter groups)").
    pub fn new(
        arena: &Arena<T>,
        groups: impl IntoIterator<Item = ParamGroup<T>>,
        mut defaults: LbfgsConfig,
    ) -> Result<Self> {
        defaults.validate()?;
        if defaults.max_eval.is_none() {
            defaults.max_eval = Some(default_max_eval(defaults.max_iter));
        }
        let groups: Vec<ParamGroup<T>> = groups.into_iter().collect();
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
        for (name, value) in groups[0].overrides() {
            config.set(name, value)?;
        }
        config.validate()?;
        let flat = Arc::new(Flat::new(arena, resolved.remove(0)));
        Ok(Lbfgs {
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

    /// Builder form of [`Lbfgs::set_simd_level`].
    pub fn with_simd_level(mut self, simd: SimdLevel) -> Self {
        self.simd = simd;
        self
    }

    /// The group's hyperparameters.
    pub fn config(&self) -> &LbfgsConfig {
        &self.config
    }

    /// Replaces the hyperparameters, after checking them.
    pub fn set_config(&mut self, config: LbfgsConfig) -> Result<()> {
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

    /// Sets the learning rate.
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

    /// [`Lbfgs::step`] with a closure that can fail. On a closure error the step returns
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

    fn param_refs(&self) -> Vec<ParamRef> {
        self.flat
            .params
            .iter()
            .enumerate()
            .map(|(j, &i)| {
                let info = &self.layout[i];
                ParamRef {
                    index: j,
                    name: info.name.clone(),
                    offset: info.offset,
                    shape: info.shape.clone(),
                }
            })
            .collect()
    }

    /// A serialisable snapshot: the group's hyperparameters and torch's whole LBFGS state
    /// (counters, direction, step, history, `H_diag`, previous gradient and loss, `al`).
    pub fn state_dict(&self) -> LbfgsStateDict<T> {
        let hyperparams = <LbfgsConfig as Hyperparams>::NAMES
            .iter()
            .map(|&n| {
                let v = self.config.get(n).expect("every listed name is gettable");
                (n.to_string(), v)
            })
            .collect();
        let sc = &self.scalars;
        let state = sc.present.then(|| {
            let started = sc.started;
            let h = &self.history;
            LbfgsState {
                func_evals: sc.func_evals,
                n_iter: sc.n_iter,
                d: started.then(|| self.d.to_vec()),
                t: started.then_some(sc.t),
                old_dirs: started
                    .then(|| (0..h.order.len()).map(|i| h.pair(i).0.to_vec()).collect()),
                old_stps: started
                    .then(|| (0..h.order.len()).map(|i| h.pair(i).1.to_vec()).collect()),
                ro: started.then(|| h.ro.iter().copied().collect()),
                h_diag: started.then_some(sc.h_diag),
                prev_flat_grad: started.then(|| self.prev_flat_grad.to_vec()),
                prev_loss: started.then_some(sc.prev_loss),
                al: self.al.clone(),
            }
        });
        LbfgsStateDict {
            format: STATE_DICT_FORMAT,
            optimizer: "LBFGS".into(),
            dtype: T::DTYPE.into(),
            param_groups: vec![GroupDict {
                hyperparams,
                params: self.param_refs(),
            }],
            state,
        }
    }

    /// [`Lbfgs::state_dict`] as JSON.
    pub fn state_dict_json(&self) -> Result<String> {
        Ok(serde_json::to_string(&self.state_dict())?)
    }

    /// [`Lbfgs::load_state_dict`] from JSON written by [`Lbfgs::state_dict_json`].
    ///
    /// Values saved in the other float type are read in that type and cast, as
    /// [`Lbfgs::load_state_dict`] does.
    pub fn load_state_dict_json(&mut self, json: &str, by: MatchBy) -> Result<()> {
        if crate::state::json_dtype(json)? == <f64 as Float>::DTYPE {
            let sd: LbfgsStateDict<f64> = serde_json::from_str(json)?;
            self.load_state_dict(&sd, by)
        } else {
            let sd: LbfgsStateDict<f32> = serde_json::from_str(json)?;
            self.load_state_dict(&sd, by)
        }
    }

    /// For each target parameter (group order): its segment in the saved flat vector and in
    /// ours, `(saved_start, our_start, len)`.
    fn segments(&self, saved: &[ParamRef], by: MatchBy) -> Result<Vec<(usize, usize, usize)>> {
        let bad = |m: String| Err(Error::StateDict(m));
        if saved.len() != self.flat.params.len() {
            return bad(format!(
                "group 0 has {} parameters in the saved state and {} in the optimizer",
                saved.len(),
                self.flat.params.len()
            ));
        }
        let mut starts = Vec::with_capacity(saved.len());
        let mut at = 0usize;
        for p in saved {
            starts.push(at);
            at = at.saturating_add(p.shape.iter().fold(1usize, |a, &d| a.saturating_mul(d)));
        }
        let mut used = vec![false; saved.len()];
        let mut segs = Vec::with_capacity(saved.len());
        for (j, (&i, &ours)) in self.flat.params.iter().zip(&self.flat.starts).enumerate() {
            let info = &self.layout[i];
            let si = match by {
                MatchBy::Position => j,
                MatchBy::Name => {
                    saved
                        .iter()
                        .position(|p| p.name == info.name)
                        .ok_or_else(|| {
                            Error::StateDict(format!(
                                "the saved group has no parameter named `{}`",
                                info.name
                            ))
                        })?
                }
            };
            if used[si] {
                return bad(format!(
                    "two parameters map to saved parameter `{}`",
                    saved[si].name
                ));
            }
            used[si] = true;
            if saved[si].shape != info.shape {
                return bad(format!(
                    "parameter `{}` has shape {:?} in the saved state and `{}` has shape {:?}",
                    saved[si].name, saved[si].shape, info.name, info.shape
                ));
            }
            segs.push((starts[si], ours, info.len));
        }
        Ok(segs)
    }

    /// Loads a snapshot: the saved hyperparameters replace the current ones and the whole
    /// LBFGS state is restored, so the run continues exactly (bit for bit) where it was saved.
    ///
    /// Checks the optimizer kind, dtype field, the single group, each parameter's shape, every
    /// vector's length, the history's consistency, and names what does not match; on any
    /// error nothing changes. With [`MatchBy::Name`] the flat vectors are rearranged to this
    /// arena's parameter order. A state saved in the other float type is converted.
    pub fn load_state_dict<U: Float>(
        &mut self,
        saved: &LbfgsStateDict<U>,
        by: MatchBy,
    ) -> Result<()> {
        let load = self.prepare_load(saved, by)?;
        self.commit_load(load);
        Ok(())
    }

    /// The identity of the arena this optimizer was built for.
    pub(crate) fn arena_identity(&self) -> u64 {
        self.arena_id
    }

    /// Swaps a load prepared by [`Lbfgs::prepare_load`] in. Cannot fail.
    pub(crate) fn commit_load(&mut self, load: LbfgsLoad<T>) {
        self.config = load.config;
        match load.state {
            None => self.reset(),
            Some(st) => {
                self.scalars = st.scalars;
                if st.scalars.started {
                    self.d = st.d;
                    self.prev_flat_grad = st.prev;
                }
                self.history = st.history;
                self.al = st.al;
            }
        }
    }

    /// Checks a saved state against this optimizer (see [`Lbfgs::load_state_dict`]) and
    /// converts it, changing nothing.
    pub(crate) fn prepare_load<U: Float>(
        &self,
        saved: &LbfgsStateDict<U>,
        by: MatchBy,
    ) -> Result<LbfgsLoad<T>> {
        let bad = |m: String| Err(Error::StateDict(m));
        if saved.format != STATE_DICT_FORMAT {
            return bad(format!(
                "format version {} is not supported (this build reads {STATE_DICT_FORMAT})",
                saved.format
            ));
        }
        if saved.optimizer != "LBFGS" {
            return bad(format!(
                "it was saved by the {} optimizer, this is LBFGS",
                saved.optimizer
            ));
        }
        if saved.dtype != U::DTYPE {
            return bad(format!(
                "its dtype field says {} but its values were read as {}",
                saved.dtype,
                U::DTYPE
            ));
        }
        if saved.param_groups.len() != 1 {
            return bad(format!(
                "it has {} parameter groups; LBFGS has exactly one",
                saved.param_groups.len()
            ));
        }
        let group = &saved.param_groups[0];
        let mut config = self.config.clone();
        for (name, value) in &group.hyperparams {
            config
                .set(name, value)
                .map_err(|e| Error::StateDict(format!("group 0: {e}")))?;
        }
        config
            .validate()
            .map_err(|e| Error::StateDict(format!("group 0: {e}")))?;
        let segs = self.segments(&group.params, by)?;
        let n = self.flat.len;

        let Some(st) = &saved.state else {
            return Ok(LbfgsLoad {
                config,
                state: None,
            });
        };
        let convert = |name: &str, v: &[U]| -> Result<AlignedBuf<T>> {
            if v.len() != n {
                return Err(Error::StateDict(format!(
                    "`{name}` has {} values, the parameters have {n}",
                    v.len()
                )));
            }
            let mut out = filled(n, T::ZERO);
            for &(from, to, len) in &segs {
                for (dst, src) in out[to..to + len].iter_mut().zip(&v[from..from + len]) {
                    *dst = T::from_f64(src.to_f64());
                }
            }
            Ok(out)
        };
        let present = [
            st.d.is_some(),
            st.t.is_some(),
            st.old_dirs.is_some(),
            st.old_stps.is_some(),
            st.ro.is_some(),
            st.h_diag.is_some(),
            st.prev_flat_grad.is_some(),
            st.prev_loss.is_some(),
        ];
        let started = present.iter().all(|&p| p);
        if !started && present.iter().any(|&p| p) {
            return bad(
                "the state has some of d, t, old_dirs, old_stps, ro, H_diag, prev_flat_grad, \
                 prev_loss but not all"
                    .into(),
            );
        }
        if st.n_iter > 0 && !started {
            return bad(format!(
                "n_iter is {} but the state has no direction or history",
                st.n_iter
            ));
        }
        let mut scalars = Scalars {
            present: true,
            func_evals: st.func_evals,
            n_iter: st.n_iter,
            started,
            ..Scalars::EMPTY
        };
        let mut d = filled(0, T::ZERO);
        let mut prev = filled(0, T::ZERO);
        let mut history = History::new();
        if let (
            Some(sd),
            Some(t),
            Some(dirs),
            Some(stps),
            Some(ro),
            Some(h_diag),
            Some(pg),
            Some(pl),
        ) = (
            &st.d,
            st.t,
            &st.old_dirs,
            &st.old_stps,
            &st.ro,
            st.h_diag,
            &st.prev_flat_grad,
            st.prev_loss,
        ) {
            if dirs.len() != stps.len() || dirs.len() != ro.len() {
                return bad(format!(
                    "old_dirs, old_stps and ro have {}, {} and {} entries; they must agree",
                    dirs.len(),
                    stps.len(),
                    ro.len()
                ));
            }
            if dirs.len() > config.history_size {
                return bad(format!(
                    "the history has {} pairs, more than history_size {}",
                    dirs.len(),
                    config.history_size
                ));
            }
            d = convert("d", sd)?;
            prev = convert("prev_flat_grad", pg)?;
            for (i, (y, s)) in dirs.iter().zip(stps).enumerate() {
                let y = convert(&format!("old_dirs[{i}]"), y)?;
                let s = convert(&format!("old_stps[{i}]"), s)?;
                history.slots.push([y, s]);
                history.order.push_back(i);
            }
            history.ro = ro.iter().map(|r| T::from_f64(r.to_f64())).collect();
            scalars.t = t;
            scalars.h_diag = h_diag;
            scalars.prev_loss = pl;
        }
        let al = st.al.as_ref().map(|v| {
            v.iter()
                .map(|a| a.map(|x| T::from_f64(x.to_f64())))
                .collect()
        });
        Ok(LbfgsLoad {
            config,
            state: Some(LbfgsLoadState {
                scalars,
                d,
                prev,
                history,
                al,
            }),
        })
    }
}

/// A checked, converted [`LbfgsStateDict`], waiting to be swapped in.
pub(crate) struct LbfgsLoad<T: Float> {
    config: LbfgsConfig,
    /// `None`: the saved optimizer had not stepped (the state is reset).
    state: Option<LbfgsLoadState<T>>,
}

struct LbfgsLoadState<T: Float> {
    scalars: Scalars,
    d: AlignedBuf<T>,
    prev: AlignedBuf<T>,
    history: History<T>,
    al: Option<Vec<Option<T>>>,
}

impl<T: Float> GroupHyperparams for Lbfgs<T> {
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

/// A serialisable snapshot of an [`Lbfgs`] optimizer, laid out like torch's
/// `LBFGS.state_dict()`: one param group and the state torch keeps under its first parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LbfgsStateDict<T> {
    /// [`STATE_DICT_FORMAT`] at the time of saving.
    pub format: u32,
    /// `"LBFGS"`.
    pub optimizer: String,
    /// `"float32"` or `"float64"`.
    pub dtype: String,
    /// The one param group: hyperparameters and parameters.
    pub param_groups: Vec<GroupDict>,
    /// torch's state; `None` before the first step.
    #[serde(default)]
    pub state: Option<LbfgsState<T>>,
}

/// torch's LBFGS state. Vectors are flat over the group's parameters in group order. The
/// fields from `d` to `prev_loss` appear together once an iteration has run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LbfgsState<T> {
    /// Closure evaluations over all steps.
    pub func_evals: u64,
    /// Iterations over all steps.
    pub n_iter: u64,
    /// The last search direction.
    #[serde(default)]
    pub d: Option<Vec<T>>,
    /// The last step length (a Python float or a one-element tensor in torch; its value).
    #[serde(default)]
    pub t: Option<f64>,
    /// Gradient differences `y` of the stored pairs, oldest first.
    #[serde(default)]
    pub old_dirs: Option<Vec<Vec<T>>>,
    /// Steps `s` of the stored pairs, oldest first.
    #[serde(default)]
    pub old_stps: Option<Vec<Vec<T>>>,
    /// `1 / (y·s)` of the stored pairs.
    #[serde(default)]
    pub ro: Option<Vec<T>>,
    /// Scale of the initial inverse Hessian, `y·s / y·y` of the newest pair (1 at first).
    #[serde(default, rename = "H_diag")]
    pub h_diag: Option<f64>,
    /// The gradient at the start of the last iteration.
    #[serde(default)]
    pub prev_flat_grad: Option<Vec<T>>,
    /// The loss at the start of the last iteration.
    #[serde(default)]
    pub prev_loss: Option<f64>,
    /// The two-loop recursion's `α` values (`None` where never written), `history_size` long;
    /// present once a second iteration has run.
    #[serde(default)]
    pub al: Option<Vec<Option<T>>>,
}
