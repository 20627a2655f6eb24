//! Adafactor: per-parameter kernels (factored for parameters with two or more dimensions,
//! unfactored for vectors and scalars) and their scalar references.
//!
//! Unlike the elementwise kernels, each call gets one whole parameter: the update is scaled by
//! the parameter's RMS and clipped by the update's RMS, and a factored parameter's second
//! moment is kept as row and column means. The elementwise work runs on [`Lane`] vectors; the
//! reductions run in the fixed order of torch's CPU kernels (AVX2 widths: 8 lanes of f32, 4 of
//! f64), so a step does not depend on the thread count and follows torch's rounding closely:
//!
//! - A 2-norm over contiguous memory (`param.norm(2)`, `update.norm(2)`, a row's
//!   `vector_norm(dim=-1)`) is torch's fast path: squares summed into one vector of lanes, the
//!   lanes folded left to right, then the remainder added one at a time with a fused
//!   multiply-add (as the compiler contracts torch's scalar loop) ([`sumsq_lastdim`]).
//! - A column's `vector_norm(dim=-2)` is torch's generic reduction: a sequential sum over the
//!   rows, per column (SIMD across columns keeps that order per lane). With one column the
//!   column is contiguous and torch takes the fast path above.
//! - `row_var.mean(dim=-2)` is torch's `sum` (its cascade sum, [`torch_sum`]) divided by the
//!   row count.
//!
//! Elementwise operations use no fused multiply-add, as in every kernel of this crate; torch's
//! vectorised `lerp` and `add(alpha=)` do, so single values may differ from torch by an ulp.

use super::{lerp, LerpWeight};
use crate::arch::{Simd, SimdLevel, WithSimd};
use crate::float::{Float, Lane};

/// Per-step scalars of Adafactor, computed once per parameter in f64 as torch does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdafactorCoeffs {
    /// Learning rate: the cap of the relative step size and the weight decay's scale.
    pub lr: f64,
    /// `step ** beta2_decay`: the weight of the new squared gradient (`1 − β̂₂`).
    pub one_minus_beta2: f64,
    /// `min(lr, 1 / sqrt(step))`: the relative step size `ρ`.
    pub rho: f64,
    /// `ε₁`, or `None` for the dtype's machine epsilon (`torch.finfo(dtype).eps`).
    pub eps1: Option<f64>,
    /// `ε₂`: the smallest parameter RMS the step is scaled by.
    pub eps2: f64,
    /// Clipping threshold `d` of the update's RMS.
    pub d: f64,
    /// Decoupled weight decay factor.
    pub weight_decay: f64,
    /// Ascend instead of descend.
    pub maximize: bool,
}

impl AdafactorCoeffs {
    /// The scalars of step number `step` (1-based), as torch's `_single_tensor_adafactor`
    /// computes them from the float step count.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        lr: f64,
        beta2_decay: f64,
        eps: (Option<f64>, f64),
        d: f64,
        weight_decay: f64,
        maximize: bool,
        step: u64,
    ) -> Self {
        let t = step as f64;
        AdafactorCoeffs {
            lr,
            one_minus_beta2: t.powf(beta2_decay),
            rho: py_min(lr, 1.0 / t.powf(0.5)),
            eps1: eps.0,
            eps2: eps.1,
            d,
            weight_decay,
            maximize,
        }
    }

    /// `ε₁` for element type `T`.
    pub fn eps1<T: Float>(&self) -> f64 {
        self.eps1.unwrap_or(T::EPSILON.to_f64())
    }

    /// `α = max(ε₂, RMS(θ)) · ρ` from the parameter's 2-norm (Python's `max`).
    pub fn alpha<T: Float>(&self, param_norm: T, numel: usize) -> f64 {
        py_max(self.eps2, param_norm.to_f64() / (numel as f64).powf(0.5)) * self.rho
    }

    /// `max(1, RMS(U) / d)` from the update's 2-norm (Python's `max`).
    pub fn denom<T: Float>(&self, update_norm: T, numel: usize) -> f64 {
        py_max(
            1.0,
            update_norm.to_f64() / ((numel as f64).powf(0.5) * self.d),
        )
    }
}

/// Python's `max(a, b)`: `b` only if `b > a` (so a NaN `b` gives `a`).
fn py_max(a: f64, b: f64) -> f64 {
    if b > a {
        b
    } else {
        a
    }
}

/// Python's `min(a, b)`: `b` only if `b < a`.
fn py_min(a: f64, b: f64) -> f64 {
    if b < a {
        b
    } else {
        a
    }
}

/// True when a parameter of this shape keeps factored second moments (`grad.dim() > 1`).
pub fn is_factored(shape: &[usize]) -> bool {
    shape.len() >= 2
}

/// `(batch, rows, cols)` of a factored shape: the leading dimensions' product and the last two.
pub fn factored_dims(shape: &[usize]) -> (usize, usize, usize) {
    let k = shape.len();
    debug_assert!(k >= 2);
    (shape[..k - 2].iter().product(), shape[k - 2], shape[k - 1])
}

/// Lanes torch's AVX2 reductions use: as many as one [`Float::Vector`].
fn lanes<T: Float>() -> usize {
    T::LANES
}

/// Folds a vector's lanes left to right, as torch's `buffer[0] = buffer[0] + buffer[j]`.
#[inline(always)]
fn fold<T: Float, V: Lane<Elem = T>>(acc: V) -> T {
    let mut l = [T::ZERO; 8];
    acc.store(&mut l[..V::WIDTH]);
    let mut b = l[0];
    for &x in &l[1..V::WIDTH] {
        b = b + x;
    }
    b
}

/// Σ f(x)² over contiguous `x` in the order of torch's 2-norm fast path: one vector of
/// [`Float::LANES`] lanes, folded, then the remainder with a fused multiply-add. `fv` and `fs`
/// are the same map on a vector `V` (which must have [`Float::LANES`] lanes) and on a scalar.
#[inline(always)]
pub fn sumsq_lastdim<T: Float, V: Lane<Elem = T>>(
    x: &[T],
    fv: impl Fn(V) -> V,
    fs: impl Fn(T) -> T,
) -> T {
    assert_eq!(V::WIDTH, T::LANES, "torch's order has Float::LANES lanes");
    let w = V::WIDTH;
    let body = x.len() - x.len() % w;
    let mut acc = V::splat(T::ZERO);
    for c in x[..body].chunks_exact(w) {
        let v = fv(V::load(c));
        acc = acc + v * v;
    }
    let mut b = fold::<T, V>(acc);
    for &t in &x[body..] {
        let v = fs(t);
        b = v.mul_add(v, b);
    }
    b
}

/// torch's CPU `sum` of a contiguous run (its cascade sum with four interleaved partial sums
/// and four levels; over vectors of [`Float::LANES`] when there are at least that many
/// elements), in scalar arithmetic.
pub fn torch_sum<T: Float>(x: &[T]) -> T {
    let w = lanes::<T>();
    if x.len() >= w {
        let nvec = x.len() / w;
        let mut acc = [T::ZERO; 8];
        row_sum(nvec, |i, k| x[i * w + k], &mut acc[..w]);
        let mut fin = T::ZERO;
        for &t in &x[nvec * w..] {
            fin = fin + t;
        }
        for &l in &acc[..w] {
            fin = fin + l;
        }
        fin
    } else {
        let mut acc = [T::ZERO];
        row_sum(x.len(), |i, _| x[i], &mut acc);
        acc[0]
    }
}

/// ATen's `row_sum`: sums `size` items of `out.len()` lanes each (`load(i, lane)`) into `out`.
// Indexed loops, as in ATen's code this mirrors.
#[allow(clippy::needless_range_loop)]
fn row_sum<T: Float>(size: usize, load: impl Fn(usize, usize) -> T, out: &mut [T]) {
    const ILP: usize = 4;
    let width = out.len();
    let size_ilp = size / ILP;
    // multi_row_sum over a (size_ilp, ILP) view, each element `width` lanes.
    let mut partial = [[T::ZERO; 8]; ILP];
    multi_row_sum(
        size_ilp,
        |i, k, l| load(i * ILP + k, l),
        width,
        &mut partial,
    );
    for i in size_ilp * ILP..size {
        for (l, p) in partial[0][..width].iter_mut().enumerate() {
            *p = *p + load(i, l);
        }
    }
    for k in 1..ILP {
        for l in 0..width {
            partial[0][l] = partial[0][l] + partial[k][l];
        }
    }
    out.copy_from_slice(&partial[0][..width]);
}

/// ATen's `multi_row_sum` with four rows: a cascade of four levels of partial sums.
// Indexed loops, as in ATen's code this mirrors.
#[allow(clippy::needless_range_loop)]
fn multi_row_sum<T: Float>(
    size: usize,
    load: impl Fn(usize, usize, usize) -> T,
    width: usize,
    out: &mut [[T; 8]; 4],
) {
    const LEVELS: usize = 4;
    const ROWS: usize = 4;
    let ceil_log2 = if size <= 2 {
        1
    } else {
        usize::BITS - (size - 1).leading_zeros()
    } as usize;
    let level_power = 4.max(ceil_log2 / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[T::ZERO; 8]; ROWS]; LEVELS];
    let mut i = 0;
    while i + level_step <= size {
        for _ in 0..level_step {
            for k in 0..ROWS {
                for l in 0..width {
                    acc[0][k][l] = acc[0][k][l] + load(i, k, l);
                }
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..ROWS {
                for l in 0..width {
                    acc[j][k][l] = acc[j][k][l] + acc[j - 1][k][l];
                    acc[j - 1][k][l] = T::ZERO;
                }
            }
            let mask = level_mask << (j * level_power);
            if i & mask != 0 {
                break;
            }
        }
    }
    while i < size {
        for k in 0..ROWS {
            for l in 0..width {
                acc[0][k][l] = acc[0][k][l] + load(i, k, l);
            }
        }
        i += 1;
    }
    for j in 1..LEVELS {
        for k in 0..ROWS {
            for l in 0..width {
                acc[0][k][l] = acc[0][k][l] + acc[j][k][l];
            }
        }
    }
    *out = acc[0];
}

/// The constants of one kernel call, in the element type.
struct Op<T> {
    grad_scale: T,
    maximize: bool,
    /// `lerp` weight `step ** beta2_decay`.
    w: LerpWeight<T>,
    eps1: T,
    eps1_sq: T,
    use_wd: bool,
    decay: T,
}

impl<T: Float> Op<T> {
    fn new(c: &AdafactorCoeffs, grad_scale: f64) -> Self {
        let w = T::from_f64(c.one_minus_beta2);
        let eps1 = c.eps1::<T>();
        Op {
            grad_scale: T::from_f64(grad_scale),
            maximize: c.maximize,
            w: LerpWeight::new(w),
            eps1: T::from_f64(eps1),
            eps1_sq: T::from_f64(eps1 * eps1),
            use_wd: c.weight_decay != 0.0,
            decay: T::from_f64(1.0 - c.lr * c.weight_decay),
        }
    }

    /// The gradient as the update sees it: scaled, negated when maximizing.
    #[inline(always)]
    fn grad<V: Lane<Elem = T>>(&self, g: V) -> V {
        let g = g * V::splat(self.grad_scale);
        if self.maximize {
            -g
        } else {
            g
        }
    }

    /// `U = G / sqrt(max(V̂, ε₁²))` (torch: `clamp_(min=eps1*eps1).rsqrt_().mul_(grad)`).
    #[inline(always)]
    fn update<V: Lane<Elem = T>>(&self, g: V, var_estimate: V) -> V {
        let v = var_estimate.maximum(V::splat(self.eps1_sq));
        V::splat(T::ONE) / v.sqrt() * g
    }

    /// `θ(1 − γλ) + step · U` (the decay only with weight decay).
    #[inline(always)]
    fn apply<V: Lane<Elem = T>>(&self, p: V, u: V, step: T) -> V {
        let p = if self.use_wd {
            p * V::splat(self.decay)
        } else {
            p
        };
        p + V::splat(step) * u
    }
}

/// The 2-norm of a contiguous run, in torch's order.
#[inline(always)]
fn norm<T: Float, V: Lane<Elem = T>>(x: &[T]) -> T {
    sumsq_lastdim::<T, V>(x, |v| v, |s| s).sqrt()
}

/// `(‖x‖₂)² / count`: torch's `vector_norm(...).square_().div_(count)`.
#[inline(always)]
fn mean_square<V: Lane>(sumsq: V, count: usize) -> V {
    let n = sumsq.sqrt();
    n * n / V::splat(<V::Elem as Float>::from_f64(count as f64))
}

/// Fused Adafactor for one whole parameter of shape `shape`: `aux` is `[row_var, col_var]`
/// for a factored shape ([`is_factored`]), `[variance]` otherwise. An empty parameter is left
/// as it is (torch divides by zero there).
///
/// # Panics
/// If `aux` does not hold the buffers the shape needs, with the lengths
/// [`crate::optim::AdafactorAlgorithm`] gives them (the optimizer always passes them so).
pub fn fused<T: Float>(
    simd: SimdLevel,
    c: &AdafactorCoeffs,
    grad_scale: f64,
    shape: &[usize],
    p: &mut [T],
    g: &[T],
    aux: &mut [&mut [T]],
) {
    simd.dispatch(Fused {
        c,
        grad_scale,
        shape,
        p,
        g,
        aux,
    })
}

/// [`fused`] as a kernel object: on the token's [`Float::LANES`]-wide lanes, the width of
/// torch's reduction order (AVX2's lanes at both the AVX2 and the AVX-512 level).
struct Fused<'a, 'b, T> {
    c: &'a AdafactorCoeffs,
    grad_scale: f64,
    shape: &'a [usize],
    p: &'a mut [T],
    g: &'a [T],
    aux: &'a mut [&'b mut [T]],
}

impl<T: Float> WithSimd for Fused<'_, '_, T> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        fused_with::<T, T::Narrow<S>>(
            self.c,
            self.grad_scale,
            self.shape,
            self.p,
            self.g,
            self.aux,
        )
    }
}

/// [`fused`] on vectors of type `V`, which must have [`Float::LANES`] lanes (the width of
/// torch's reduction order): `wide`'s [`Float::Vector`], or another instruction set's
/// vectors of the same width, with bitwise the same result.
#[inline(always)]
pub fn fused_with<T: Float, V: Lane<Elem = T>>(
    c: &AdafactorCoeffs,
    grad_scale: f64,
    shape: &[usize],
    p: &mut [T],
    g: &[T],
    aux: &mut [&mut [T]],
) {
    assert_eq!(V::WIDTH, T::LANES, "torch's order has Float::LANES lanes");
    if p.is_empty() {
        return;
    }
    let op = Op::<T>::new(c, grad_scale);
    match aux {
        [row_var, col_var] if is_factored(shape) => {
            fused_factored::<T, V>(&op, c, factored_dims(shape), p, g, row_var, col_var)
        }
        [variance] if !is_factored(shape) => fused_unfactored::<T, V>(&op, c, p, g, variance),
        _ => unreachable!("Adafactor keeps row_var and col_var, or variance"),
    }
}

#[inline(always)]
fn fused_unfactored<T: Float, V: Lane<Elem = T>>(
    op: &Op<T>,
    c: &AdafactorCoeffs,
    p: &mut [T],
    g: &[T],
    variance: &mut [T],
) {
    let n = p.len();
    assert!(g.len() == n && variance.len() == n);
    let alpha = c.alpha(norm::<T, V>(p), n);
    let w = V::WIDTH;
    let body = n - n % w;
    // variance.lerp_(grad * grad, w), and U's squares in the lanes of torch's norm.
    let (g_body, g_tail) = g.split_at(body);
    let (v_body, v_tail) = variance.split_at_mut(body);
    let mut acc = V::splat(T::ZERO);
    for (gc, vc) in g_body.chunks_exact(w).zip(v_body.chunks_exact_mut(w)) {
        let gv = op.grad(V::load(gc));
        let v = lerp(V::load(vc), gv * gv, &op.w);
        v.store(vc);
        let u = op.update(gv, v);
        acc = acc + u * u;
    }
    let mut sumsq = fold::<T, V>(acc);
    for (&gs, vs) in g_tail.iter().zip(v_tail.iter_mut()) {
        let gs = op.grad(gs);
        *vs = lerp(*vs, gs * gs, &op.w);
        let u = op.update(gs, *vs);
        sumsq = u.mul_add(u, sumsq);
    }
    let step = T::from_f64(-alpha / c.denom(sumsq.sqrt(), n));
    let (p_body, p_tail) = p.split_at_mut(body);
    for ((pc, gc), vc) in p_body
        .chunks_exact_mut(w)
        .zip(g_body.chunks_exact(w))
        .zip(v_body.chunks_exact(w))
    {
        let u = op.update(op.grad(V::load(gc)), V::load(vc));
        op.apply(V::load(pc), u, step).store(pc);
    }
    for ((ps, &gs), &vs) in p_tail.iter_mut().zip(g_tail).zip(v_tail.iter()) {
        let u = op.update(op.grad(gs), vs);
        *ps = op.apply(*ps, u, step);
    }
}

/// Column vectors reduced together per pass over the rows: the accumulators stay in registers
/// or L1 while each row is read contiguously.
const COL_BLOCK: usize = 16;

#[inline(always)]
fn fused_factored<T: Float, V: Lane<Elem = T>>(
    op: &Op<T>,
    c: &AdafactorCoeffs,
    (nb, m, n): (usize, usize, usize),
    p: &mut [T],
    g: &[T],
    row_var: &mut [T],
    col_var: &mut [T],
) {
    let numel = p.len();
    assert!(numel == nb * m * n && g.len() == numel);
    assert!(row_var.len() == nb * m && col_var.len() == nb * n);
    let alpha = c.alpha(norm::<T, V>(p), numel);
    let w = V::WIDTH;
    // Row means: each row's norm is a contiguous reduction.
    for (rv, row) in row_var.iter_mut().zip(g.chunks_exact(n)) {
        let s = sumsq_lastdim::<T, V>(row, |v| op.grad(v), |s| op.grad(s));
        *rv = lerp(*rv, mean_square(s, n), &op.w);
    }
    // Column means.
    for (b, gb) in g.chunks_exact(m * n).enumerate() {
        let cv = &mut col_var[b * n..(b + 1) * n];
        if n == 1 {
            // One column: contiguous, torch's fast path.
            let s = sumsq_lastdim::<T, V>(gb, |v| op.grad(v), |s| op.grad(s));
            cv[0] = lerp(cv[0], mean_square(s, m), &op.w);
            continue;
        }
        // A sequential sum over the rows per column; lanes are columns.
        let n_body = n - n % w;
        let mut j0 = 0;
        while j0 < n_body {
            let nv = ((n_body - j0) / w).min(COL_BLOCK);
            let mut acc = [V::splat(T::ZERO); COL_BLOCK];
            for row in gb.chunks_exact(n) {
                let seg = &row[j0..j0 + nv * w];
                for (a, x) in acc[..nv].iter_mut().zip(seg.chunks_exact(w)) {
                    let v = op.grad(V::load(x));
                    *a = *a + v * v;
                }
            }
            for (a, cc) in acc[..nv]
                .iter()
                .zip(cv[j0..j0 + nv * w].chunks_exact_mut(w))
            {
                let old = V::load(cc);
                lerp(old, mean_square(*a, m), &op.w).store(cc);
            }
            j0 += nv * w;
        }
        let mut acc = [T::ZERO; 8];
        let tail = n - n_body;
        for row in gb.chunks_exact(n) {
            for (a, &x) in acc[..tail].iter_mut().zip(&row[n_body..]) {
                let v = op.grad(x);
                *a = *a + v * v;
            }
        }
        for (a, cc) in acc[..tail].iter().zip(&mut cv[n_body..]) {
            *cc = lerp(*cc, mean_square(*a, m), &op.w);
        }
    }
    let factors = Factors {
        m,
        n,
        row_var: &*row_var,
        col_var: &*col_var,
        eps1: op.eps1,
    };
    // ‖U‖ in torch's order: lanes over the flat parameter, folded, then the remainder.
    let mut sums = (V::splat(T::ZERO), T::ZERO, false);
    factors.visit::<V, _>(
        numel,
        &mut sums,
        |(acc, _, _), k, v| {
            let u = op.update(op.grad(V::load(&g[k..k + w])), v);
            *acc = *acc + u * u;
        },
        |(acc, sumsq, folded), k, v| {
            if !*folded {
                *sumsq = fold::<T, V>(*acc);
                *folded = true;
            }
            let u = op.update(op.grad(g[k]), v);
            *sumsq = u.mul_add(u, *sumsq);
        },
    );
    let sumsq = if sums.2 { sums.1 } else { fold::<T, V>(sums.0) };
    let step = T::from_f64(-alpha / c.denom(sumsq.sqrt(), numel));
    // The same U again, applied.
    factors.visit::<V, _>(
        numel,
        p,
        |p, k, v| {
            let pc = &mut p[k..k + w];
            let u = op.update(op.grad(V::load(&g[k..k + w])), v);
            op.apply(V::load(pc), u, step).store(pc);
        },
        |p, k, v| {
            let u = op.update(op.grad(g[k]), v);
            p[k] = op.apply(p[k], u, step);
        },
    );
}

/// The factored second moment of one parameter: `V̂[b, i, j] = R[b, i] · C[b, j] /
/// max(mean_i R[b, i], ε₁)`.
struct Factors<'a, T> {
    m: usize,
    n: usize,
    row_var: &'a [T],
    col_var: &'a [T],
    eps1: T,
}

impl<T: Float> Factors<'_, T> {
    /// `row_var.mean(dim=-2).clamp_(min=eps1)` of batch `b`.
    fn row_mean(&self, b: usize) -> T {
        let r = &self.row_var[b * self.m..(b + 1) * self.m];
        (torch_sum(r) / T::from_f64(self.m as f64)).maximum(self.eps1)
    }

    /// Calls `body(state, k, V̂[k..k + LANES])` for each full vector of the flat parameter
    /// from the start, then `tail(state, k, V̂[k])` for the remaining elements, in order.
    fn visit<V: Lane<Elem = T>, S: ?Sized>(
        &self,
        len: usize,
        state: &mut S,
        mut body: impl FnMut(&mut S, usize, V),
        mut tail: impl FnMut(&mut S, usize, T),
    ) {
        let (m, n) = (self.m, self.n);
        let w = V::WIDTH;
        let body_len = len - len % w;
        // Position of flat element k: batch b, row i (within the batch), column j.
        let (mut b, mut i, mut j) = (0usize, 0usize, 0usize);
        let mut cached = (usize::MAX, T::ZERO);
        let mut row_mean = |b: usize| {
            if cached.0 != b {
                cached = (b, self.row_mean(b));
            }
            cached.1
        };
        let advance = |b: &mut usize, i: &mut usize, j: &mut usize| {
            *j += 1;
            if *j == n {
                *j = 0;
                *i += 1;
                if *i == m {
                    *i = 0;
                    *b += 1;
                }
            }
        };
        let mut k = 0;
        while k < body_len {
            let v = if j + w <= n {
                // Within one row: one row factor, contiguous column factors.
                let r = V::splat(self.row_var[b * m + i]);
                let c = V::load(&self.col_var[b * n + j..b * n + j + w]);
                let rm = V::splat(row_mean(b));
                j += w;
                if j == n {
                    j = 0;
                    i += 1;
                    if i == m {
                        i = 0;
                        b += 1;
                    }
                }
                r * c / rm
            } else {
                // Across a row end: gather each lane's factors.
                let (mut r, mut c, mut rm) = ([T::ZERO; 8], [T::ZERO; 8], [T::ZERO; 8]);
                for l in 0..w {
                    r[l] = self.row_var[b * m + i];
                    c[l] = self.col_var[b * n + j];
                    rm[l] = row_mean(b);
                    advance(&mut b, &mut i, &mut j);
                }
                V::load(&r[..w]) * V::load(&c[..w]) / V::load(&rm[..w])
            };
            body(state, k, v);
            k += w;
        }
        while k < len {
            let v = self.row_var[b * m + i] * self.col_var[b * n + j] / row_mean(b);
            tail(state, k, v);
            advance(&mut b, &mut i, &mut j);
            k += 1;
        }
    }
}

/// The scalar reference: torch's `_single_tensor_adafactor` for one parameter, one pass per
/// tensor operation, with the same reduction orders written out in scalars.
///
/// # Panics
/// As [`fused`].
pub fn reference<T: Float>(
    c: &AdafactorCoeffs,
    grad_scale: f64,
    shape: &[usize],
    p: &mut [T],
    g: &[T],
    aux: &mut [&mut [T]],
) {
    if p.is_empty() {
        return;
    }
    let numel = p.len();
    let w = T::from_f64(c.one_minus_beta2);
    let eps1 = c.eps1::<T>();
    let grad = super::passes::effective_grad(g, c.maximize, T::from_f64(grad_scale));
    let alpha = c.alpha(norm_ref(p), numel);
    if c.weight_decay != 0.0 {
        super::passes::mul(p, T::from_f64(1.0 - c.lr * c.weight_decay));
    }
    let mut var_estimate: Vec<T> = match aux {
        [row_var, col_var] if is_factored(shape) => {
            let (nb, m, n) = factored_dims(shape);
            // vector_norm(grad, dim=-1).square_().div_(n)
            let row_mean: Vec<T> = grad
                .chunks_exact(n)
                .map(|row| norm_ref(row))
                .map(|x| x * x)
                .map(|x| x / T::from_f64(n as f64))
                .collect();
            super::passes::lerp(row_var, &row_mean, w);
            // vector_norm(grad, dim=-2).square_().div_(m)
            let mut col_norm = vec![T::ZERO; nb * n];
            for b in 0..nb {
                let gb = &grad[b * m * n..(b + 1) * m * n];
                if n == 1 {
                    col_norm[b] = norm_ref(gb);
                    continue;
                }
                for jj in 0..n {
                    let mut s = T::ZERO;
                    for ii in 0..m {
                        let x = gb[ii * n + jj];
                        s = s + x * x;
                    }
                    col_norm[b * n + jj] = s.sqrt();
                }
            }
            let col_mean: Vec<T> = col_norm
                .iter()
                .map(|&x| x * x)
                .map(|x| x / T::from_f64(m as f64))
                .collect();
            super::passes::lerp(col_var, &col_mean, w);
            // row_var @ col_var
            let mut v = vec![T::ZERO; numel];
            for b in 0..nb {
                for ii in 0..m {
                    for jj in 0..n {
                        v[(b * m + ii) * n + jj] = row_var[b * m + ii] * col_var[b * n + jj];
                    }
                }
            }
            // .div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
            let rm: Vec<T> = (0..nb)
                .map(|b| torch_sum(&row_var[b * m..(b + 1) * m]) / T::from_f64(m as f64))
                .map(|x| Lane::maximum(x, T::from_f64(eps1)))
                .collect();
            for (k, x) in v.iter_mut().enumerate() {
                *x = *x / rm[k / (m * n)];
            }
            v
        }
        [variance] if !is_factored(shape) => {
            let grad_squared: Vec<T> = grad.iter().map(|&x| x * x).collect();
            super::passes::lerp(variance, &grad_squared, w);
            variance.to_vec()
        }
        _ => unreachable!("Adafactor keeps row_var and col_var, or variance"),
    };
    // update = var_estimate.clamp_(min=eps1 * eps1).rsqrt_().mul_(grad)
    let eps1_sq = T::from_f64(eps1 * eps1);
    for x in var_estimate.iter_mut() {
        *x = Lane::maximum(*x, eps1_sq);
    }
    for x in var_estimate.iter_mut() {
        *x = T::ONE / Lane::sqrt(*x);
    }
    let mut update = var_estimate;
    for (u, &gr) in update.iter_mut().zip(&grad) {
        *u = *u * gr;
    }
    let denom = c.denom(norm_ref(&update), numel);
    super::passes::add_scaled(p, &update, T::from_f64(-alpha / denom));
}

/// The 2-norm in torch's fast-path order, in scalars: `LANES` running sums, folded left to
/// right, then the remainder with a fused multiply-add.
fn norm_ref<T: Float>(x: &[T]) -> T {
    let w = lanes::<T>();
    let body = x.len() - x.len() % w;
    let mut acc = [T::ZERO; 8];
    for chunk in x[..body].chunks_exact(w) {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = *a + v * v;
        }
    }
    let mut s = acc[0];
    for &a in &acc[1..w] {
        s = s + a;
    }
    for &v in &x[body..] {
        s = v.mul_add(v, s);
    }
    Lane::sqrt(s)
}
