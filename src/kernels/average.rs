//! [`AveragedModel`](crate::AveragedModel)'s update: SWA's equal running mean and EMA, fused
//! kernels (one pass over the averaged copy and the model's parameters) and references.
//!
//! The kernels are [`ElementOp`]s with no state buffer: the averaged copy stands in the
//! "parameter" slot (read and written) and the model's parameters in the "gradient" slot (only
//! read).

use super::{for_each_lane, lerp, passes, ElementOp, LerpWeight};
use crate::arch::SimdLevel;
use crate::float::{Float, Lane};

/// torch's `get_swa_avg_fn()` on CPU: `averaged + (param − averaged) / (n_averaged + 1)`,
/// the division by the 0-dim count tensor done in `T`.
#[derive(Debug, Clone, Copy)]
pub struct SwaMean<T> {
    count: T,
}

impl<T: Float> SwaMean<T> {
    /// The update after `n_averaged` models have been averaged.
    pub fn new(n_averaged: u64) -> Self {
        SwaMean {
            count: T::from_f64(n_averaged as f64 + 1.0),
        }
    }
}

impl<T: Float> ElementOp<T, 0> for SwaMean<T> {
    #[inline(always)]
    fn apply<V: Lane<Elem = T>>(&self, averaged: V, param: V, _: &mut [V; 0]) -> V {
        averaged + (param - averaged) / V::splat(self.count)
    }
}

/// torch's `get_ema_multi_avg_fn(decay)`: `averaged.lerp_(param, 1 − decay)`, with the weight
/// `1 − decay` computed in f64 (a Python float) and ATen's two lerp formulas.
#[derive(Debug, Clone, Copy)]
pub struct Ema<T> {
    weight: LerpWeight<T>,
}

impl<T: Float> Ema<T> {
    /// The update with `decay` (in `[0, 1]`).
    pub fn new(decay: f64) -> Self {
        Ema {
            weight: LerpWeight::new(T::from_f64(1.0 - decay)),
        }
    }
}

impl<T: Float> ElementOp<T, 0> for Ema<T> {
    #[inline(always)]
    fn apply<V: Lane<Elem = T>>(&self, averaged: V, param: V, _: &mut [V; 0]) -> V {
        lerp(averaged, param, &self.weight)
    }
}

/// The first update (`n_averaged == 0`): torch copies the parameters.
#[derive(Debug, Clone, Copy)]
pub struct CopyParams;

impl<T: Float> ElementOp<T, 0> for CopyParams {
    #[inline(always)]
    fn apply<V: Lane<Elem = T>>(&self, _averaged: V, param: V, _: &mut [V; 0]) -> V {
        param
    }
}

/// Fused SWA update of `averaged` from `params` (equal lengths), on lanes up to `simd`.
pub fn swa_fused<T: Float>(simd: SimdLevel, averaged: &mut [T], params: &[T], n_averaged: u64) {
    if n_averaged == 0 {
        for_each_lane::<T, 0, _>(simd, &CopyParams, averaged, params, []);
    } else {
        for_each_lane::<T, 0, _>(simd, &SwaMean::new(n_averaged), averaged, params, []);
    }
}

/// Fused EMA update of `averaged` from `params` (equal lengths), on lanes up to `simd`.
pub fn ema_fused<T: Float>(
    simd: SimdLevel,
    averaged: &mut [T],
    params: &[T],
    n_averaged: u64,
    decay: f64,
) {
    if n_averaged == 0 {
        for_each_lane::<T, 0, _>(simd, &CopyParams, averaged, params, []);
    } else {
        for_each_lane::<T, 0, _>(simd, &Ema::new(decay), averaged, params, []);
    }
}

/// Reference SWA update, torch's tensor operations one pass each: `copy_` on the first
/// update, then `diff = param − averaged`, `diff / (n_averaged + 1)`, `averaged + that`.
pub fn swa_reference<T: Float>(averaged: &mut [T], params: &[T], n_averaged: u64) {
    if n_averaged == 0 {
        averaged.copy_from_slice(params);
        return;
    }
    let count = T::from_f64(n_averaged as f64 + 1.0);
    let diff: Vec<T> = params
        .iter()
        .zip(&*averaged)
        .map(|(&p, &a)| p - a)
        .collect();
    let step: Vec<T> = diff.iter().map(|&d| d / count).collect();
    for (a, s) in averaged.iter_mut().zip(step) {
        *a = *a + s;
    }
}

/// Reference EMA update: `copy_` on the first update, then `lerp_(param, 1 − decay)`.
pub fn ema_reference<T: Float>(averaged: &mut [T], params: &[T], n_averaged: u64, decay: f64) {
    if n_averaged == 0 {
        averaged.copy_from_slice(params);
        return;
    }
    passes::lerp(averaged, params, T::from_f64(1.0 - decay));
}
