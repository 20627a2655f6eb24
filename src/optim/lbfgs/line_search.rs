//! torch's strong Wolfe line search (`_strong_wolfe`, `_cubic_interpolate`) and the mixed
//! Python-float / 0-dim-tensor arithmetic it runs in.

use std::cmp::Ordering;
use std::sync::Arc;

use super::{Flat, Work, C1, C2};
use crate::arch::SimdLevel;
use crate::arena::Arena;
use crate::error::{Error, Result};
use crate::float::{Float, Lane};
use crate::kernels::lbfgs as k;

/// A scalar as torch's LBFGS code holds it: a Python float (`Py`, f64 arithmetic) or a
/// zero-dimensional tensor of the parameter dtype (`Ten`). Mixed arithmetic follows torch's
/// type promotion: the float is rounded to the tensor's dtype and the operation runs there,
/// and `float / tensor` is `tensor.reciprocal() * float` (`Tensor.__rtruediv__`). Comparisons
/// between the two happen in the tensor dtype. In f32 this decides every rounding of the line
/// search; in f64 the reciprocal still does.
#[derive(Debug, Clone, Copy)]
pub(super) enum Num<T> {
    Py(f64),
    Ten(T),
}

use Num::{Py, Ten};

impl<T: Float> Num<T> {
    /// The value in the tensor dtype (what `add_(x, alpha=t)` and `mul(t)` use).
    pub(super) fn el(self) -> T {
        match self {
            Py(x) => T::from_f64(x),
            Ten(x) => x,
        }
    }

    /// The exact value.
    pub(super) fn value(self) -> f64 {
        match self {
            Py(x) => x,
            Ten(x) => x.to_f64(),
        }
    }

    pub(super) fn add(self, o: Self) -> Self {
        match (self, o) {
            (Py(a), Py(b)) => Py(a + b),
            (a, b) => Ten(a.el() + b.el()),
        }
    }

    pub(super) fn sub(self, o: Self) -> Self {
        match (self, o) {
            (Py(a), Py(b)) => Py(a - b),
            (a, b) => Ten(a.el() - b.el()),
        }
    }

    pub(super) fn mul(self, o: Self) -> Self {
        match (self, o) {
            (Py(a), Py(b)) => Py(a * b),
            (a, b) => Ten(a.el() * b.el()),
        }
    }

    /// Python would raise `ZeroDivisionError` for a float divided by a float zero; this
    /// continues with IEEE infinities instead (the bracket is then degenerate and the line
    /// search ends on its own).
    pub(super) fn div(self, o: Self) -> Self {
        match (self, o) {
            (Py(a), Py(b)) => Py(a / b),
            (Py(a), Ten(b)) => Ten((T::ONE / b) * T::from_f64(a)),
            (a, b) => Ten(a.el() / b.el()),
        }
    }

    pub(super) fn abs(self) -> Self {
        match self {
            Py(x) => Py(x.abs()),
            Ten(x) => Ten(Lane::abs(x)),
        }
    }

    pub(super) fn sqrt(self) -> Self {
        match self {
            Py(x) => Py(x.sqrt()),
            Ten(x) => Ten(Lane::sqrt(x)),
        }
    }

    pub(super) fn cmp(self, o: Self) -> Option<Ordering> {
        match (self, o) {
            (Py(a), Py(b)) => a.partial_cmp(&b),
            (a, b) => a.el().partial_cmp(&b.el()),
        }
    }

    pub(super) fn lt(self, o: Self) -> bool {
        self.cmp(o) == Some(Ordering::Less)
    }

    pub(super) fn gt(self, o: Self) -> bool {
        self.cmp(o) == Some(Ordering::Greater)
    }

    pub(super) fn le(self, o: Self) -> bool {
        matches!(self.cmp(o), Some(Ordering::Less | Ordering::Equal))
    }

    pub(super) fn ge(self, o: Self) -> bool {
        matches!(self.cmp(o), Some(Ordering::Greater | Ordering::Equal))
    }
}

/// Python's `min(a, b)`: `b` only if `b < a`.
pub(super) fn py_min<T: Float>(a: Num<T>, b: Num<T>) -> Num<T> {
    if b.lt(a) {
        b
    } else {
        a
    }
}

/// Python's `max(a, b)`: `b` only if `b > a`.
pub(super) fn py_max<T: Float>(a: Num<T>, b: Num<T>) -> Num<T> {
    if b.gt(a) {
        b
    } else {
        a
    }
}

/// torch's `_cubic_interpolate`: the minimizer of the cubic through `(x1, f1)` and `(x2, f2)`
/// with slopes `g1`, `g2`, clamped to `bounds` (default: the interval between the points), or
/// the bounds' midpoint when the cubic has no minimizer.
pub(super) fn cubic_interpolate<T: Float>(
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

/// Calls the closure and reads the flat gradient.
pub(super) struct Evaluator<'a, T, F> {
    pub(super) arena: &'a mut Arena<T>,
    pub(super) closure: F,
    pub(super) arena_id: u64,
    pub(super) flat: Arc<Flat>,
    pub(super) maximize: bool,
    pub(super) simd: SimdLevel,
}

impl<T: Float, F: FnMut(&mut Arena<T>) -> Result<T>> Evaluator<'_, T, F> {
    pub(super) fn call(&mut self) -> Result<T> {
        let loss = (self.closure)(&mut *self.arena)?;
        if self.arena.id() != self.arena_id {
            return Err(Error::ArenaMismatch(
                "the LBFGS closure replaced the arena it was given".into(),
            ));
        }
        Ok(loss)
    }

    /// The loss as L-BFGS sees it (`float(loss)`, negated when maximizing).
    pub(super) fn seen(&self, loss: T) -> f64 {
        if self.maximize {
            -loss.to_f64()
        } else {
            loss.to_f64()
        }
    }

    /// torch's `_gather_flat_grad`: the group's gradients (zeros for a parameter without
    /// one), negated when maximizing.
    pub(super) fn gather(&self, out: &mut [T]) {
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
    pub(super) fn add_to_params(&mut self, t: T, d: &[T]) {
        let values = self.arena.params_mut();
        for (e, at) in &self.flat.segs {
            k::axpy(self.simd, &mut values[e.clone()], t, &d[*at..*at + e.len()]);
        }
    }

    /// torch's `_directional_evaluate`: the loss and flat gradient at `x + t d`; the
    /// parameters are `x` again afterwards.
    pub(super) fn directional(&mut self, x: &[T], t: T, d: &[T], g_out: &mut [T]) -> Result<f64> {
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
pub(super) struct Bracket<T> {
    pub(super) t: [Num<T>; 2],
    pub(super) f: [f64; 2],
    pub(super) g: [usize; 2],
    pub(super) gtd: [Num<T>; 2],
    pub(super) len: usize,
}

/// What the line search returns: loss, gradient slot, step, evaluations.
pub(super) struct Found<T> {
    pub(super) loss: f64,
    pub(super) grad: usize,
    pub(super) t: Num<T>,
    pub(super) evals: u64,
}

pub(super) fn eval_at<T: Float, F: FnMut(&mut Arena<T>) -> Result<T>>(
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
pub(super) fn strong_wolfe<T: Float, F: FnMut(&mut Arena<T>) -> Result<T>>(
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
