//! SparseAdam: the fused row kernel and its reference (torch's `_single_tensor_sparse_adam`).
//!
//! Both run over one touched row at a time: `param`, `exp_avg` and `exp_avg_sq` are the row's
//! slices of the arena-shaped buffers, `grad` its coalesced gradient values.

use super::ElementOp;
use crate::arch::SimdLevel;
use crate::float::{Float, Lane};

/// Per-step scalars, computed once per parameter in f64 (Python floats) and rounded to `T`
/// where torch multiplies a tensor by them.
#[derive(Debug, Clone, Copy)]
pub struct SparseAdamCoeffs<T> {
    /// `1 − β₁`.
    pub one_minus_beta1: T,
    /// `1 − β₂`.
    pub one_minus_beta2: T,
    /// `eps`.
    pub eps: T,
    /// `−lr · √(1 − β₂ᵗ) / (1 − β₁ᵗ)`.
    pub neg_step_size: T,
    /// Negate the gradient (`maximize`).
    pub maximize: bool,
}

impl<T: Float> SparseAdamCoeffs<T> {
    /// The scalars of step `step` (1-based).
    pub fn new(lr: f64, betas: (f64, f64), eps: f64, maximize: bool, step: u64) -> Self {
        let t = step as f64;
        let bc1 = 1.0 - betas.0.powf(t);
        let bc2 = 1.0 - betas.1.powf(t);
        let step_size = lr * bc2.sqrt() / bc1;
        SparseAdamCoeffs {
            one_minus_beta1: T::from_f64(1.0 - betas.0),
            one_minus_beta2: T::from_f64(1.0 - betas.1),
            eps: T::from_f64(eps),
            neg_step_size: T::from_f64(-step_size),
            maximize,
        }
    }
}

impl<T: Float> ElementOp<T, 2> for SparseAdamCoeffs<T> {
    #[inline(always)]
    fn apply<V: Lane<Elem = T>>(&self, p: V, g: V, s: &mut [V; 2]) -> V {
        let g = if self.maximize {
            V::splat(T::ZERO) - g
        } else {
            g
        };
        let (old_m, old_v) = (s[0], s[1]);
        let um = (g - old_m) * V::splat(self.one_minus_beta1);
        let uv = (g * g - old_v) * V::splat(self.one_minus_beta2);
        s[0] = old_m + um;
        s[1] = old_v + uv;
        let numer = um + old_m;
        let denom = (uv + old_v).sqrt() + V::splat(self.eps);
        p + (numer / denom) * V::splat(self.neg_step_size)
    }
}

/// Fused update of one row, on lanes up to `simd`.
#[inline]
pub fn row_fused<T: Float>(
    simd: SimdLevel,
    c: &SparseAdamCoeffs<T>,
    param: &mut [T],
    grad: &[T],
    exp_avg: &mut [T],
    exp_avg_sq: &mut [T],
) {
    super::for_each_lane::<T, 2, _>(simd, c, param, grad, [exp_avg, exp_avg_sq]);
}

/// Reference update of one row: torch's tensor operations, one pass each.
pub fn row_reference<T: Float>(
    c: &SparseAdamCoeffs<T>,
    param: &mut [T],
    grad: &[T],
    exp_avg: &mut [T],
    exp_avg_sq: &mut [T],
) {
    // grad = -grad if maximize
    let g: Vec<T> = grad
        .iter()
        .map(|&x| if c.maximize { T::ZERO - x } else { x })
        .collect();
    // old_exp_avg_values = exp_avg.sparse_mask(grad)._values()
    let old_m = exp_avg.to_vec();
    let old_v = exp_avg_sq.to_vec();
    // exp_avg_update_values = grad_values.sub(old_exp_avg_values).mul_(1 - beta1)
    let mut um: Vec<T> = g.iter().zip(&old_m).map(|(&a, &b)| a - b).collect();
    um.iter_mut().for_each(|x| *x = *x * c.one_minus_beta1);
    // exp_avg.add_(make_sparse(exp_avg_update_values))
    exp_avg.iter_mut().zip(&um).for_each(|(m, &u)| *m = *m + u);
    // grad_values.pow(2).sub_(old_exp_avg_sq_values).mul_(1 - beta2)
    let mut uv: Vec<T> = g.iter().map(|&x| x * x).collect();
    uv.iter_mut().zip(&old_v).for_each(|(x, &o)| *x = *x - o);
    uv.iter_mut().for_each(|x| *x = *x * c.one_minus_beta2);
    exp_avg_sq
        .iter_mut()
        .zip(&uv)
        .for_each(|(v, &u)| *v = *v + u);
    // numer = exp_avg_update_values.add_(old_exp_avg_values)
    let numer: Vec<T> = um.iter().zip(&old_m).map(|(&u, &o)| u + o).collect();
    // denom = exp_avg_sq_update_values.add_(old).sqrt_().add_(eps)
    let denom: Vec<T> = uv
        .iter()
        .zip(&old_v)
        .map(|(&u, &o)| (u + o).sqrt() + c.eps)
        .collect();
    // param.add_(make_sparse(-step_size * numer.div_(denom)))
    for ((p, &n), &d) in param.iter_mut().zip(&numer).zip(&denom) {
        *p = *p + (n / d) * c.neg_step_size;
    }
}
