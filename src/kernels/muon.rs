//! Muon: the per-parameter kernel (momentum, Newton–Schulz orthogonalisation, decoupled weight
//! decay, the shape-dependent learning rate) and its reference.
//!
//! Each call gets one whole 2-D parameter. The elementwise parts (the momentum `lerp`s, the
//! decay and the final `add`) run in torch's order; the Newton–Schulz iteration is matrix
//! products from `matrixmultiply` (through `ndarray`'s safe `general_mat_mul`, no hand-written
//! GEMM), single-threaded inside the call, with a blocking that depends only on the matrix
//! sizes, so a step is bitwise the same on any number of threads. matrixmultiply picks its
//! micro-kernel at run time (AVX-512F, else FMA/AVX2, ...; its `avx512` feature is turned on in
//! `Cargo.toml`), so the f32 sums' order, and the last bits, can differ between CPUs.
//!
//! # bf16, as torch does it
//! torch's `_zeropower_via_newtonschulz` casts the update to bf16 and runs every operation of
//! the iteration on bf16 tensors. On the CPU each of them computes in f32 and rounds its result
//! to bf16 once; [`NsPrecision::Bf16`] does the same: the matrix is rounded to bf16, its norm
//! (summed in f64) is rounded to bf16, the division and every product (`X Xᵀ`,
//! `b·A + c·A A`, `a·X + B X`, each accumulated in f32 by the GEMM, `alpha`/`beta` applied in
//! f32) are rounded to bf16 after they are computed. Only the order of the f32 sums differs
//! from torch's GEMM, which is why the parity fixtures compare directions and norms
//! (`SCHEMA.md`). [`NsPrecision::Full`] skips every rounding and runs the iteration in the
//! parameter's own type.
//!
//! # Memory
//! The iteration needs two copies of the (transposed to wide) matrix and two square
//! `min(rows, cols)²` matrices. They live in a per-thread scratch buffer that grows to the
//! largest parameter a thread has seen and is reused after that; `matrixmultiply` itself
//! allocates its packing buffer on each product (it takes no caller buffer), so unlike the
//! elementwise optimizers a Muon step does allocate: exactly one buffer per product, three per
//! iteration, and nothing else (counted in `tests/no_alloc.rs`).

use std::cell::RefCell;

use half::bf16;
use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2, LinalgScalar};
use serde::{Deserialize, Serialize};

use super::{lerp, LerpWeight};
use crate::float::Float;

/// The precision of Muon's Newton–Schulz iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NsPrecision {
    /// torch's: the matrix and the result of every operation rounded to bf16, products
    /// accumulated in f32 (the default).
    #[default]
    Bf16,
    /// No rounding: the iteration runs in the parameter's type (f32 or f64).
    Full,
}

impl NsPrecision {
    /// The name used for it as a hyperparameter value (`"bf16"`, `"full"`).
    pub fn name(self) -> &'static str {
        match self {
            NsPrecision::Bf16 => "bf16",
            NsPrecision::Full => "full",
        }
    }
}

/// torch's `adjust_lr_fn`: how the learning rate is scaled by the shape `[A, B]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdjustLr {
    /// `None` or `"original"` (Keller Jordan's): `√max(1, A/B)`.
    Original,
    /// `"match_rms_adamw"` (Moonshot's): `0.2·√max(A, B)`.
    MatchRmsAdamw,
    /// `"spectral_unclamped"` (Bernstein's): `√(A/B)`.
    SpectralUnclamped,
}

impl AdjustLr {
    /// The function torch's name `name` (`None` for its default) stands for, or `None` for a
    /// name torch does not know.
    pub fn from_name(name: Option<&str>) -> Option<Self> {
        match name {
            None | Some("original") => Some(AdjustLr::Original),
            Some("match_rms_adamw") => Some(AdjustLr::MatchRmsAdamw),
            Some("spectral_unclamped") => Some(AdjustLr::SpectralUnclamped),
            Some(_) => None,
        }
    }

    /// torch's `_adjust_lr(lr, adjust_lr_fn, shape)` for a `rows × cols` parameter, in f64 as
    /// Python computes it.
    pub fn adjust(self, lr: f64, rows: usize, cols: usize) -> f64 {
        let (a, b) = (rows as f64, cols as f64);
        let ratio = match self {
            AdjustLr::Original => {
                let r = a / b;
                // Python's `max(1, A / B)`.
                if r > 1.0 {
                    r.sqrt()
                } else {
                    1.0
                }
            }
            AdjustLr::MatchRmsAdamw => 0.2 * a.max(b).sqrt(),
            AdjustLr::SpectralUnclamped => (a / b).sqrt(),
        };
        lr * ratio
    }
}

/// Per-step scalars of Muon: the group's hyperparameters, checked and parsed once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MuonCoeffs {
    /// Learning rate, before the shape adjustment.
    pub lr: f64,
    /// Decoupled weight decay: parameters are multiplied by `1 − lr·weight_decay`.
    pub weight_decay: f64,
    /// Momentum factor `μ`.
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// `(a, b, c)` of the quintic Newton–Schulz polynomial.
    pub ns_coefficients: (f64, f64, f64),
    /// Lower bound of the norm the matrix is divided by.
    pub eps: f64,
    /// Newton–Schulz iterations.
    pub ns_steps: usize,
    /// The learning-rate adjustment.
    pub adjust_lr: AdjustLr,
    /// The iteration's precision.
    pub precision: NsPrecision,
}

/// Rounds to the nearest bf16, ties to even (torch's `.to(torch.bfloat16)` of an f32).
#[inline(always)]
fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// A matrix operand: row-major `rows × cols`, or the transpose of a row-major `cols × rows`.
#[derive(Clone, Copy)]
struct Operand<'a, W> {
    data: &'a [W],
    rows: usize,
    cols: usize,
    transposed: bool,
}

impl<'a, W> Operand<'a, W> {
    fn plain(data: &'a [W], rows: usize, cols: usize) -> Self {
        Operand {
            data,
            rows,
            cols,
            transposed: false,
        }
    }

    fn view(self) -> ArrayView2<'a, W> {
        if self.transposed {
            ArrayView2::from_shape((self.cols, self.rows), self.data)
                .expect("operand length matches its shape")
                .reversed_axes()
        } else {
            ArrayView2::from_shape((self.rows, self.cols), self.data)
                .expect("operand length matches its shape")
        }
    }
}

/// `c ← alpha·(a b) + beta·c` in `E` (`beta = 0`: `c` is not read).
fn gemm_in<E: LinalgScalar>(alpha: E, a: Operand<'_, E>, b: Operand<'_, E>, beta: E, c: &mut [E]) {
    let mut cv = ArrayViewMut2::from_shape((a.rows, b.cols), c).expect("output matches shapes");
    general_mat_mul(alpha, &a.view(), &b.view(), beta, &mut cv);
}

/// `c ← alpha·(a b) + beta·c` for an element type `W` that is f32 or f64 (the GEMM of that
/// type; `alpha` and `beta` are rounded to it).
fn gemm<W: Float>(alpha: f64, a: Operand<'_, W>, b: Operand<'_, W>, beta: f64, c: &mut [W]) {
    fn cast<W: Float, E: bytemuck::Pod>(o: Operand<'_, W>) -> Operand<'_, E> {
        Operand {
            data: bytemuck::cast_slice(o.data),
            rows: o.rows,
            cols: o.cols,
            transposed: o.transposed,
        }
    }
    // `W` is exactly f32 or f64 (`Float` is sealed), so the casts below reinterpret a slice as
    // its own type.
    if W::DTYPE == f32::DTYPE {
        gemm_in::<f32>(
            alpha as f32,
            cast(a),
            cast(b),
            beta as f32,
            bytemuck::cast_slice_mut(c),
        );
    } else {
        gemm_in::<f64>(alpha, cast(a), cast(b), beta, bytemuck::cast_slice_mut(c));
    }
}

thread_local! {
    /// Per-thread scratch for the iteration, in 8-byte words (viewed as f32 or f64).
    static SCRATCH: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on a scratch slice of `len` elements of `W` (contents unspecified), reused
/// between calls on the same thread.
fn with_scratch<W: Float, R>(len: usize, f: impl FnOnce(&mut [W]) -> R) -> R {
    let words = (len * std::mem::size_of::<W>()).div_ceil(8);
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < words {
                v.resize(words, 0.0);
            }
            f(&mut bytemuck::cast_slice_mut::<f64, W>(&mut v[..words])[..len])
        }
        // Only if a kernel ever ran inside another on one thread: a buffer of its own.
        Err(_) => f(&mut vec![W::ZERO; len]),
    })
}

/// torch's `_zeropower_via_newtonschulz` on the wide (`m ≤ n`) matrix `x` (`m × n`, row-major),
/// in place; `round` rounds to bf16 where torch's bf16 tensors do. `x2` (as long as `x`),
/// `gram` and `gu` (`m × m` each) are scratch.
#[allow(clippy::too_many_arguments)]
fn newton_schulz<W: Float>(
    c: &MuonCoeffs,
    round: bool,
    m: usize,
    n: usize,
    x: &mut [W],
    x2: &mut [W],
    gram: &mut [W],
    gu: &mut [W],
) {
    let r = |v: W| -> W {
        if round {
            W::from_f64(round_bf16(v.to_f64() as f32) as f64)
        } else {
            v
        }
    };
    // `X /= X.norm().clamp(min=eps)`: the norm is reduced in f64 in a fixed order, then
    // rounded to the tensor's type (and to bf16), as is `eps`.
    let sumsq: f64 = x.iter().map(|v| v.to_f64() * v.to_f64()).sum();
    let norm = r(W::from_f64(sumsq.sqrt()));
    let eps = if round {
        W::from_f64(round_bf16(c.eps as f32) as f64)
    } else {
        W::from_f64(c.eps)
    };
    // torch's clamp keeps NaN.
    let denom = if norm < eps { eps } else { norm };
    for v in x.iter_mut() {
        *v = r(*v / denom);
    }
    let (a, b, cc) = c.ns_coefficients;
    let (mut cur, mut next) = (x, x2);
    for _ in 0..c.ns_steps {
        // gram = X Xᵀ
        let xt = Operand {
            data: &*cur,
            rows: n,
            cols: m,
            transposed: true,
        };
        gemm(1.0, Operand::plain(cur, m, n), xt, 0.0, gram);
        gram.iter_mut().for_each(|v| *v = r(*v));
        // gram_update = addmm(gram, gram, gram, beta=b, alpha=c) = b·gram + c·gram gram
        gu.copy_from_slice(gram);
        let g = Operand::plain(&*gram, m, m);
        gemm(cc, g, g, b, gu);
        gu.iter_mut().for_each(|v| *v = r(*v));
        // X = addmm(X, gram_update, X, beta=a) = a·X + gram_update X
        next.copy_from_slice(cur);
        gemm(
            1.0,
            Operand::plain(&*gu, m, m),
            Operand::plain(&*cur, m, n),
            a,
            next,
        );
        next.iter_mut().for_each(|v| *v = r(*v));
        std::mem::swap(&mut cur, &mut next);
    }
    // After an odd number of iterations the result sits in `x2`.
    if c.ns_steps % 2 == 1 {
        next.copy_from_slice(cur);
    }
}

/// The whole update of one `rows × cols` parameter after the momentum step, in work type `W`
/// (f32 for [`NsPrecision::Bf16`], the parameter's type for [`NsPrecision::Full`]).
/// `update(k)` is element `k` (row-major) of the momentum update.
#[allow(clippy::too_many_arguments)]
fn orthogonalise_and_apply<T: Float, W: Float>(
    c: &MuonCoeffs,
    round: bool,
    rows: usize,
    cols: usize,
    params: &mut [T],
    update: impl Fn(usize) -> T,
    reference: bool,
) {
    // torch transposes a tall matrix so the iteration works on `m × n`, `m ≤ n`.
    let tall = rows > cols;
    let (m, n) = if tall { (cols, rows) } else { (rows, cols) };
    let len = m * n;
    with_scratch::<W, _>(2 * len + 2 * m * m, |s| {
        let (x, rest) = s.split_at_mut(len);
        let (x2, rest) = rest.split_at_mut(len);
        let (gram, gu) = rest.split_at_mut(m * m);
        // `update.to(bfloat16)` (from f64: through f32, as c10's conversion does), transposed.
        let to_w = |v: T| -> W {
            if round {
                W::from_f64(round_bf16(v.to_f64() as f32) as f64)
            } else {
                W::from_f64(v.to_f64())
            }
        };
        for i in 0..rows {
            for j in 0..cols {
                let v = to_w(update(i * cols + j));
                if tall {
                    x[j * rows + i] = v;
                } else {
                    x[i * cols + j] = v;
                }
            }
        }
        newton_schulz(c, round, m, n, x, x2, gram, gu);
        let decay = T::from_f64(1.0 - c.lr * c.weight_decay);
        let alpha = T::from_f64(-c.adjust_lr.adjust(c.lr, rows, cols));
        let o = |i: usize, j: usize| -> T {
            let v = if tall {
                x[j * rows + i]
            } else {
                x[i * cols + j]
            };
            T::from_f64(v.to_f64())
        };
        if reference {
            // param.mul_(1 - lr * weight_decay); param.add_(update, alpha=-adjusted_lr)
            params.iter_mut().for_each(|p| *p = *p * decay);
            for i in 0..rows {
                for j in 0..cols {
                    let p = &mut params[i * cols + j];
                    *p = *p + alpha * o(i, j);
                }
            }
        } else {
            for i in 0..rows {
                for (j, p) in params[i * cols..(i + 1) * cols].iter_mut().enumerate() {
                    *p = *p * decay + alpha * o(i, j);
                }
            }
        }
    });
}

/// Muon's update of one whole 2-D parameter of shape `shape`: `momentum_buffer` is `buf`;
/// gradients are multiplied by `grad_scale` first. `reference` runs torch's operations one
/// pass at a time instead of fused; the two give the same bits.
///
/// # Panics
/// If `shape` is not 2-D or the slices do not match it (the optimizer checks both).
#[allow(clippy::too_many_arguments)]
pub fn step<T: Float>(
    c: &MuonCoeffs,
    grad_scale: f64,
    shape: &[usize],
    params: &mut [T],
    grads: &[T],
    buf: &mut [T],
    reference: bool,
) {
    let &[rows, cols] = shape else {
        panic!("Muon only supports 2D parameters, got shape {shape:?}");
    };
    assert!(
        params.len() == rows * cols && grads.len() == params.len() && buf.len() == params.len()
    );
    if params.is_empty() {
        return;
    }
    let scale = T::from_f64(grad_scale);
    let one_minus_momentum = T::from_f64(1.0 - c.momentum);
    let momentum = T::from_f64(c.momentum);
    macro_rules! finish {
        ($update:expr) => {
            match c.precision {
                NsPrecision::Bf16 => orthogonalise_and_apply::<T, f32>(
                    c, true, rows, cols, params, $update, reference,
                ),
                NsPrecision::Full => orthogonalise_and_apply::<T, T>(
                    c, false, rows, cols, params, $update, reference,
                ),
            }
        };
    }
    if reference {
        // buf.lerp_(grad, 1 - momentum); update = grad.lerp(buf, momentum) if nesterov else buf
        let mut g: Vec<T> = grads.iter().map(|&g| g * scale).collect();
        super::passes::lerp(buf, &g, one_minus_momentum);
        if c.nesterov {
            super::passes::lerp(&mut g, buf, momentum);
            finish!(|k| g[k])
        } else {
            let buf = &*buf;
            finish!(|k| buf[k])
        }
    } else {
        let w_buf = LerpWeight::new(one_minus_momentum);
        for (&g, b) in grads.iter().zip(buf.iter_mut()) {
            *b = lerp(*b, g * scale, &w_buf);
        }
        let buf = &*buf;
        if c.nesterov {
            let w = LerpWeight::new(momentum);
            finish!(|k| lerp(grads[k] * scale, buf[k], &w))
        } else {
            finish!(|k| buf[k])
        }
    }
}
