//! The correction pairs `(y, s)`, their update, and the two-loop recursion.

use std::collections::VecDeque;

use super::{Scalars, MIN_CURVATURE};
use crate::arch::SimdLevel;
use crate::arena::{filled, AlignedBuf};
use crate::float::Float;
use crate::kernels::lbfgs as k;

/// The correction pairs: `old_dirs` (`y`) and `old_stps` (`s`) in buffers that are reused,
/// `ro = 1 / (y·s)`.
pub(super) struct History<T> {
    /// `[y, s]` buffers. A slot is in `order`, in `free`, or retired (evicted during a
    /// transactional step and kept until it commits).
    pub(super) slots: Vec<[AlignedBuf<T>; 2]>,
    /// Slots of the live pairs, oldest first.
    pub(super) order: VecDeque<usize>,
    /// `ro[i]` of `order[i]`.
    pub(super) ro: VecDeque<T>,
    pub(super) free: Vec<usize>,
    pub(super) retired: Vec<usize>,
}

impl<T: Float> History<T> {
    pub(super) fn new() -> Self {
        History {
            slots: Vec::new(),
            order: VecDeque::new(),
            ro: VecDeque::new(),
            free: Vec::new(),
            retired: Vec::new(),
        }
    }

    /// A slot to compute a candidate pair in (allocates only until the history is full).
    pub(super) fn take(&mut self, n: usize) -> usize {
        match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push([filled(n, T::ZERO), filled(n, T::ZERO)]);
                self.slots.len() - 1
            }
        }
    }

    pub(super) fn release(&mut self, slot: usize, transactional: bool) {
        if transactional {
            self.retired.push(slot);
        } else {
            self.free.push(slot);
        }
    }

    pub(super) fn pop_oldest(&mut self, transactional: bool) {
        if let Some(s) = self.order.pop_front() {
            self.ro.pop_front();
            self.release(s, transactional);
        }
    }

    pub(super) fn clear(&mut self, transactional: bool) {
        while !self.order.is_empty() {
            self.pop_oldest(transactional);
        }
    }

    /// Ends a transactional step that succeeded: retired slots become reusable.
    pub(super) fn commit(&mut self) {
        self.free.append(&mut self.retired);
    }

    /// After `order` was restored: every slot not in it is free.
    pub(super) fn rebuild_free(&mut self) {
        self.retired.clear();
        self.free.clear();
        for i in 0..self.slots.len() {
            if !self.order.contains(&i) {
                self.free.push(i);
            }
        }
    }

    pub(super) fn pair(&self, i: usize) -> (&[T], &[T]) {
        let [y, s] = &self.slots[self.order[i]];
        (y, s)
    }
}

/// Flat-gradient buffers and the line search's copy of the parameters.
pub(super) struct Work<T> {
    pub(super) grads: Vec<AlignedBuf<T>>,
    pub(super) x_init: AlignedBuf<T>,
}

impl<T: Float> Work<T> {
    /// A gradient buffer other than `exclude` (allocated on first need, then reused).
    pub(super) fn slot(&mut self, n: usize, exclude: &[usize]) -> usize {
        if let Some(i) = (0..self.grads.len()).find(|i| !exclude.contains(i)) {
            return i;
        }
        self.grads.push(filled(n, T::ZERO));
        self.grads.len() - 1
    }
}

#[allow(clippy::too_many_arguments)]
/// `y = g - prev_flat_grad`, `s = d * t`, and the pair is stored when `y·s > 1e-10`.
pub(super) fn update_history<T: Float>(
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
pub(super) fn two_loop<T: Float>(
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
