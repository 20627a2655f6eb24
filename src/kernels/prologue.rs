//! The first lines of every non-Adam update (SGD, Adagrad, RMSprop, Adadelta, Adamax, ASGD,
//! Rprop), as the Adam family shares [`super::moments`]: the effective gradient, in torch's
//! order,
//!
//! ```text
//! g ← g · s              (the step's gradient scale: 1/k for k accumulated micro-batches,
//!                         1/scale for a GradScaler step; exact when s = 1)
//! g ← −g                 (maximize)
//! g ← g + λ·θ            (weight decay as an L2 term, when λ ≠ 0)
//! ```
//!
//! Rprop has no weight decay and builds its prologue with `λ = 0`. The fused form
//! ([`Prologue::grad`]) and the reference ([`Prologue::reference`], torch's separate tensor
//! operations) do the same IEEE operations in the same order, so they agree bit for bit.

use super::passes;
use crate::float::{Float, Lane};

/// The scalars of the gradient prologue, computed once per run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Prologue<T> {
    grad_scale: T,
    maximize: bool,
    use_wd: bool,
    weight_decay: T,
}

impl<T: Float> Prologue<T> {
    /// The prologue for a gradient scale, `maximize` and an L2 `weight_decay` (0 for none).
    pub(crate) fn new(grad_scale: f64, maximize: bool, weight_decay: f64) -> Self {
        Prologue {
            grad_scale: T::from_f64(grad_scale),
            maximize,
            use_wd: weight_decay != 0.0,
            weight_decay: T::from_f64(weight_decay),
        }
    }

    /// The effective gradient of one lane group (`p` the parameter, `g` the raw gradient).
    #[inline(always)]
    pub(crate) fn grad<V: Lane<Elem = T>>(&self, p: V, g: V) -> V {
        let g = g * V::splat(self.grad_scale);
        let g = if self.maximize { -g } else { g };
        if self.use_wd {
            g + V::splat(self.weight_decay) * p
        } else {
            g
        }
    }

    /// The effective gradient of a whole tensor as torch's single-tensor code computes it:
    /// `grad * s`, `-grad` (maximize), `grad.add(param, alpha=weight_decay)`, one pass each.
    pub(crate) fn reference(&self, p: &[T], g: &[T]) -> Vec<T> {
        let mut grad = passes::effective_grad(g, self.maximize, self.grad_scale);
        if self.use_wd {
            passes::add_scaled(&mut grad, p, self.weight_decay);
        }
        grad
    }
}
