//! A param group inside the optimizer: its config, its parameters' lazy state and its state
//! buffers.

use std::ops::Range;

use super::Algorithm;
use crate::arena::{filled, AlignedBuf};
use crate::buffer::Role;
use crate::float::Float;

/// One parameter's state inside the optimizer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct ParamState<S> {
    pub(super) step: u64,
    pub(super) scalars: S,
    /// How many of the algorithm's buffers hold live state for this parameter.
    pub(super) live_buffers: u8,
}

/// A param group inside the optimizer.
///
/// Its parameters are any set of arena positions, kept in ascending order; `runs` are their
/// maximal runs of consecutive positions. The state buffers hold the runs' elements back to
/// back, so a group of one run has exactly the arena's layout over its slice, and parameter
/// `j`'s state starts at `locals[j]` in every buffer.
pub(super) struct Group<T, A: Algorithm> {
    pub(super) config: A::Config,
    /// Arena positions of the group's parameters, ascending.
    pub(super) params: Vec<usize>,
    /// The maximal runs of consecutive positions in `params`, ascending.
    pub(super) runs: Vec<Range<usize>>,
    /// Where each parameter's elements start in the state buffers.
    pub(super) locals: Vec<usize>,
    /// Elements in the group: the length of each state buffer.
    pub(super) len: usize,
    /// One entry per parameter; `None` until it first has a gradient.
    pub(super) state: Vec<Option<ParamState<A::Scalars>>>,
    /// State buffers, each `len` long, named by `A::buffers(config)`. Empty under
    /// [`StatePrecision::Bf16`], which keeps them in `half_buffers` instead.
    pub(super) buffers: Vec<AlignedBuf<T>>,
    /// The state buffers under [`StatePrecision::Bf16`] (else empty).
    pub(super) half_buffers: Vec<AlignedBuf<half::bf16>>,
    /// Where each parameter's shaped state ([`Algorithm::aux_buffers`]) starts in `aux`, one
    /// entry per parameter and one for the end. All zero for algorithms without shaped state.
    pub(super) aux_offsets: Vec<usize>,
    /// Every parameter's shaped state, back to back; empty until the first state exists.
    pub(super) aux: AlignedBuf<T>,
}

impl<T: Float, A: Algorithm> Group<T, A> {
    /// Position of arena parameter `i` in the group, if the group holds it.
    pub(super) fn position(&self, i: usize) -> Option<usize> {
        self.params.binary_search(&i).ok()
    }

    /// Elements `range` of state buffer `k`, in `T` (bf16 state widened exactly).
    pub(super) fn buffer_values(&self, k: usize, range: Range<usize>) -> Vec<T> {
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
    pub(super) fn ensure_aux(&mut self) {
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
    pub(super) fn relayout_buffers(&mut self, old: &A::Config) {
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
