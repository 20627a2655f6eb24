//! Work planning: lazy state init, step counts, and the cut of each group's runs into
//! work items of [`piece_len`] elements.

use super::{
    aux_ranges, Algorithm, KernelArgs, Optimizer, ParamState, MAX_AUX_BUFFERS, MAX_BUFFERS,
};
use crate::arena::{AlignedBuf, Arena, ParamInfo};
use crate::buffer::Role;
use crate::float::Float;
use crate::mixed::StatePrecision;
use crate::parallel::piece_len;

/// Consecutive parameters of a group whose state agrees, being collected into one run.
struct OpenRun<S> {
    /// First and last parameter (positions in the group).
    first: usize,
    last: usize,
    /// One past the run's last arena element.
    end: usize,
    /// The state every parameter of the run shares.
    state: ParamState<S>,
    /// Whether the run's buffers were created this step.
    fresh: bool,
}

/// Where a step's streams are: the parameters' first byte, the gradients' presence flags and
/// first byte, and a mixed step's parameter copy's first byte (null otherwise), each with its
/// element size (`T` for a plain step; half precision in mixed and half steps).
pub(super) struct MixedStreams<'a> {
    /// The parameters' first byte and element size: the arena's, or a half step's
    /// ([`Optimizer::step_half`]: bf16 parameters in a [`crate::mixed::HalfBuffer`]).
    pub(super) params: *mut u8,
    pub(super) param_size: usize,
    pub(super) has_grad: &'a [bool],
    pub(super) grads: *const u8,
    pub(super) grad_size: usize,
    pub(super) copy: *mut u8,
    pub(super) copy_size: usize,
}

/// A state buffer's initial value in bf16 (rounded to nearest even, as torch's `.to(bfloat16)`).
pub(super) fn bf16_init(init: f64) -> half::bf16 {
    <half::bf16 as crate::mixed::Storage>::from_f32(init as f32)
}

/// One piece of a step: raw pointers into disjoint ranges of the arena and the state buffers.
pub(super) struct WorkItem<T, C> {
    /// The piece's first parameter: a `T`, or a half-precision element in a half step.
    pub(super) params: *mut u8,
    /// The piece's first gradient: a `T`, or a half-precision element in a mixed step.
    pub(super) grads: *const u8,
    /// Each state buffer's first element: a `T`, or a bf16 under [`StatePrecision::Bf16`].
    pub(super) buffers: [*mut u8; MAX_BUFFERS],
    /// A mixed step's parameter copy (null otherwise).
    pub(super) copy: *mut u8,
    pub(super) n_buffers: usize,
    pub(super) len: usize,
    pub(super) args: KernelArgs<C>,
    /// Arena position of the piece's (first) parameter: the parameter whose shape a
    /// per-parameter kernel gets.
    pub(super) param: usize,
    /// Shaped state of that parameter (per-parameter algorithms only) and each one's length.
    pub(super) aux: [*mut T; MAX_AUX_BUFFERS],
    pub(super) aux_lens: [usize; MAX_AUX_BUFFERS],
    pub(super) n_aux: usize,
}

// SAFETY: a work item is only a set of pointers to ranges no other work item touches (groups
// hold disjoint sets of parameters, pieces are disjoint sub-ranges of a group's runs, and a
// group's runs occupy disjoint ranges of its state buffers); the step holds the
// `&mut` borrows those pointers came from until every item has run.
unsafe impl<T: Send, C: Send> Send for WorkItem<T, C> {}
// SAFETY: as above; an item is executed by exactly one thread.
unsafe impl<T: Send, C: Sync> Sync for WorkItem<T, C> {}

impl<T: Float, C: Copy> WorkItem<T, C> {
    /// Runs `A`'s fused kernel (or its reference, when `reference`) on the item's slices;
    /// for a per-parameter algorithm, with the parameter's shape from `layout` and its shaped
    /// state.
    ///
    /// # Safety
    /// The pointers must be valid for `len` elements (each shaped state pointer for its
    /// length) and not aliased by any other live reference or concurrently running item.
    pub(super) unsafe fn run<A: Algorithm<Coeffs = C>>(
        &self,
        layout: &[ParamInfo],
        reference: bool,
    ) {
        // SAFETY: guaranteed by the caller (see above).
        let params = unsafe { std::slice::from_raw_parts_mut(self.params as *mut T, self.len) };
        // SAFETY: as above; grads are only read, and a plain step's point to `T`s.
        let grads = unsafe { std::slice::from_raw_parts(self.grads as *const T, self.len) };
        let mut bufs: [&mut [T]; MAX_BUFFERS] = Default::default();
        for (slot, &ptr) in bufs.iter_mut().zip(&self.buffers[..self.n_buffers]) {
            // SAFETY: as above; each buffer pointer covers `len` elements of its own buffer,
            // of type `T` in a plain step.
            *slot = unsafe { std::slice::from_raw_parts_mut(ptr as *mut T, self.len) };
        }
        let bufs = &mut bufs[..self.n_buffers];
        if !A::PER_PARAMETER {
            if reference {
                A::reference::<T>(&self.args, params, grads, bufs);
            } else {
                A::fused::<T>(&self.args, params, grads, bufs);
            }
            return;
        }
        let mut aux: [&mut [T]; MAX_AUX_BUFFERS] = Default::default();
        for ((slot, &ptr), &len) in aux.iter_mut().zip(&self.aux).zip(&self.aux_lens) {
            if !ptr.is_null() {
                // SAFETY: as above; each shaped state pointer covers its length, in a region
                // of the group's shaped state no other item touches.
                *slot = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
            }
        }
        let aux = &mut aux[..self.n_aux];
        let shape = &layout[self.param].shape;
        if reference {
            A::reference_param::<T>(&self.args, shape, params, grads, bufs, aux);
        } else {
            A::fused_param::<T>(&self.args, shape, params, grads, bufs, aux);
        }
    }
}

impl<T: Float, A: Algorithm> Optimizer<T, A> {
    /// Initialises state, advances step counts and fills `self.work`. Returns the number of
    /// elements to update.
    ///
    /// A run of the plan is a set of parameters of one group that are consecutive in the arena
    /// (so never crossing a gap between the group's runs) and whose state agrees; it is cut
    /// into [`piece_len`]-element pieces from its start. A group of one run is therefore cut
    /// exactly as a single slice is, and a parameter's update never depends on which other
    /// parameters share its group: the kernels are elementwise, so the piece boundaries do not
    /// change a bit.
    pub(super) fn plan(&mut self, arena: &mut Arena<T>, grad_scale: f64) -> usize {
        let (params, grads, has_grad) = arena.step_view();
        let streams = MixedStreams {
            params: params.as_mut_ptr() as *mut u8,
            param_size: std::mem::size_of::<T>(),
            has_grad,
            grads: grads.as_ptr() as *const u8,
            grad_size: std::mem::size_of::<T>(),
            copy: std::ptr::null_mut(),
            copy_size: 0,
        };
        self.plan_with(grad_scale, streams)
    }

    /// [`Optimizer::plan`] over `streams`: where the parameters, the gradients (and which
    /// parameters have one) and a mixed step's parameter copy are, and their element sizes.
    pub(super) fn plan_with(&mut self, grad_scale: f64, streams: MixedStreams<'_>) -> usize {
        let MixedStreams {
            params: params_ptr,
            param_size,
            has_grad,
            grads: grads_ptr,
            grad_size,
            copy: copy_ptr,
            copy_size,
        } = streams;
        let half_state = self.state_precision == StatePrecision::Bf16;
        let layout = &self.layout;
        let defaults = &self.defaults;
        let simd = self.simd;
        let mut total = 0;
        for group in &mut self.groups {
            let names = A::buffers(&group.config);
            let need = names.len();
            debug_assert!(need <= MAX_BUFFERS);
            let gl = group.len;
            let any_grad = group.params.iter().any(|&i| has_grad[i]);
            if any_grad {
                while !half_state && group.buffers.len() < need {
                    let k = group.buffers.len();
                    let init = T::from_f64(A::buffer_init_in(&group.config, defaults, k));
                    group
                        .buffers
                        .push(AlignedBuf::filled(Role::State(k), gl, init));
                }
                while half_state && group.half_buffers.len() < need {
                    let k = group.half_buffers.len();
                    let init = bf16_init(A::buffer_init_in(&group.config, defaults, k));
                    group
                        .half_buffers
                        .push(AlignedBuf::filled(Role::State(k), gl, init));
                }
                group.ensure_aux();
            }
            let mut run: Option<OpenRun<A::Scalars>> = None;
            let n = group.params.len();
            for j in 0..=n {
                // Decide what param j contributes (None = breaks the run).
                let next = if j < n && has_grad[group.params[j]] {
                    if group.state[j].is_none() {
                        // Shaped state starts at zero with the parameter's state (it may hold
                        // values from before a `load_state_dict` that dropped this state).
                        group.aux[group.aux_offsets[j]..group.aux_offsets[j + 1]].fill(T::ZERO);
                    }
                    let st = group.state[j].get_or_insert(ParamState {
                        step: 0,
                        scalars: A::init_scalars(&group.config),
                        live_buffers: 0,
                    });
                    let info = &layout[group.params[j]];
                    let local = group.locals[j];
                    let mut fresh = false;
                    while (st.live_buffers as usize) < need {
                        let k = st.live_buffers as usize;
                        let init = A::buffer_init_in(&group.config, defaults, k);
                        if half_state {
                            group.half_buffers[k][local..local + info.len].fill(bf16_init(init));
                        } else {
                            group.buffers[k][local..local + info.len].fill(T::from_f64(init));
                        }
                        st.live_buffers += 1;
                        fresh = true;
                    }
                    if A::TRACKS_STEP {
                        st.step += 1;
                    }
                    Some((j, *st, fresh))
                } else {
                    None
                };
                // Extend the current run or close it.
                if let (Some(open), Some((_, st, fresh))) = (&mut run, &next) {
                    // A per-parameter algorithm's runs are single parameters, and a run never
                    // spans a gap between the group's runs in the arena.
                    if !A::PER_PARAMETER
                        && group.params[j] == group.params[open.last] + 1
                        && open.state == *st
                        && open.fresh == *fresh
                    {
                        let info = &layout[group.params[j]];
                        open.last = j;
                        open.end = info.offset + info.len;
                        continue;
                    }
                }
                if let Some(OpenRun {
                    first,
                    last,
                    end,
                    state: mut st,
                    fresh,
                }) = run.take()
                {
                    let coeffs = A::prepare(&group.config, st.step, &mut st.scalars);
                    for s in group.state[first..=last].iter_mut().flatten() {
                        s.scalars = st.scalars;
                    }
                    let param = group.params[first];
                    let start = layout[param].offset;
                    // Where the run's elements start in the state buffers: the parameters of
                    // a run are consecutive in the arena and in the buffers alike.
                    let base = group.locals[first];
                    let args = KernelArgs {
                        coeffs,
                        fresh,
                        grad_scale,
                        simd,
                    };
                    let mut aux = [std::ptr::null_mut(); MAX_AUX_BUFFERS];
                    let mut aux_lens = [0; MAX_AUX_BUFFERS];
                    let mut n_aux = 0;
                    if A::PER_PARAMETER {
                        let shape = &layout[param].shape;
                        let ranges = aux_ranges::<A>(shape, group.aux_offsets[first]);
                        for (k, r) in ranges.enumerate() {
                            aux_lens[k] = r.len();
                            aux[k] = group.aux[r].as_mut_ptr();
                            n_aux = k + 1;
                        }
                    }
                    let mut at = start;
                    let piece = piece_len(end - start);
                    while at < end {
                        // A per-parameter kernel gets its parameter whole.
                        let len = if A::PER_PARAMETER {
                            end - at
                        } else {
                            piece.min(end - at)
                        };
                        let local = base + (at - start);
                        let mut buffers = [std::ptr::null_mut(); MAX_BUFFERS];
                        if half_state {
                            for (k, b) in group.half_buffers[..need].iter_mut().enumerate() {
                                buffers[k] = b[local..local + len].as_mut_ptr() as *mut u8;
                            }
                        } else {
                            for (k, b) in group.buffers[..need].iter_mut().enumerate() {
                                buffers[k] = b[local..local + len].as_mut_ptr() as *mut u8;
                            }
                        }
                        self.work.push(WorkItem {
                            // SAFETY: `at..at+len` lies inside the arena (it is part of a
                            // registered parameter's range), and the parameter buffer (the
                            // arena's, or a half step's) has the arena's length in elements
                            // of `param_size` bytes.
                            params: unsafe { params_ptr.add(at * param_size) },
                            // SAFETY: the gradient buffer (the arena's, or a mixed step's half
                            // buffer) has the arena's length in elements of `grad_size` bytes.
                            grads: unsafe { grads_ptr.add(at * grad_size) },
                            // SAFETY: as above for the copy, when there is one.
                            copy: if copy_ptr.is_null() {
                                copy_ptr
                            } else {
                                unsafe { copy_ptr.add(at * copy_size) }
                            },
                            buffers,
                            n_buffers: need,
                            len,
                            args,
                            param,
                            aux,
                            aux_lens,
                            n_aux,
                        });
                        total += len;
                        at += len;
                    }
                }
                if let Some((j, st, fresh)) = next {
                    let info = &layout[group.params[j]];
                    run = Some(OpenRun {
                        first: j,
                        last: j,
                        end: info.offset + info.len,
                        state: st,
                        fresh,
                    });
                }
            }
        }
        total
    }
}
