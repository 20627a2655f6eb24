//! Mixed-precision steps of an f32 optimizer: f32 master parameters and state, half-precision
//! gradients in, a half-precision parameter copy out, in one fused pass (see [`crate::mixed`]).
//!
//! A child module of `optimizer`, so it reaches the private fields without widening them.

use half::bf16;

use super::{Algorithm, MixedStreams, Optimizer, StepOptions, StepReport, WorkItem, MAX_BUFFERS};
use crate::arena::{Arena, Param};
use crate::clip::partial_half;
use crate::error::{Error, Result};
use crate::mixed::{HalfBuffer, MasterCopy, MixedPass, ParamStream, StatePrecision, Storage};
use crate::parallel::Exec;

impl<C: Copy> WorkItem<f32, C> {
    /// Runs `A`'s fused kernel on the item as a mixed-precision pass: the parameters through
    /// `params`, gradients in `G`, state in `M`; in the order of torch's fused CPU kernel
    /// ([`Algorithm::torch_fused_pass`]) when `torch_order`.
    ///
    /// # Safety
    /// As [`WorkItem::run`]; besides, the gradient pointer must point to `len` elements of `G`
    /// and each buffer pointer to `len` elements of `M`, none aliased by any other live
    /// reference or concurrently running item.
    pub(super) unsafe fn run_stream<A, PS, G, M>(&self, params: PS, torch_order: bool)
    where
        A: Algorithm<Coeffs = C>,
        PS: ParamStream,
        G: Storage,
        M: Storage,
    {
        // SAFETY: guaranteed by the caller (see above); gradients are only read.
        let grads = unsafe { std::slice::from_raw_parts(self.grads as *const G, self.len) };
        let mut bufs: [&mut [M]; MAX_BUFFERS] = Default::default();
        for (slot, &ptr) in bufs.iter_mut().zip(&self.buffers[..self.n_buffers]) {
            // SAFETY: as above; each buffer pointer covers `len` elements of `M`.
            *slot = unsafe { std::slice::from_raw_parts_mut(ptr as *mut M, self.len) };
        }
        let pass = MixedPass::new(self.args.simd, params, grads, &mut bufs[..self.n_buffers])
            .expect("the plan gives every slice the piece's length");
        if torch_order {
            A::torch_fused_pass(&self.args, pass);
        } else {
            A::fused_pass::<f32, _>(&self.args, pass);
        }
    }

    /// [`WorkItem::run_stream`] with f32 master parameters and their copy in `H` (mode 2).
    ///
    /// # Safety
    /// As [`WorkItem::run_stream`]; besides, the parameter pointer must point to `len` f32s
    /// and the copy pointer to `len` elements of `H`, not aliased either.
    unsafe fn run_mixed<A: Algorithm<Coeffs = C>, G: Storage, M: Storage, H: Storage>(
        &self,
        stream_copy: bool,
    ) {
        // SAFETY: guaranteed by the caller (see above).
        let params = unsafe { std::slice::from_raw_parts_mut(self.params as *mut f32, self.len) };
        // SAFETY: as above.
        let copy = unsafe { std::slice::from_raw_parts_mut(self.copy as *mut H, self.len) };
        let params = MasterCopy::new(params, copy)
            .expect("the plan gives the copy the piece's length")
            .streamed(stream_copy);
        // SAFETY: as above.
        unsafe { self.run_stream::<A, _, G, M>(params, false) }
    }
}

impl<A: Algorithm> Optimizer<f32, A> {
    /// Chooses the precision of the state buffers: [`StatePrecision::Full`] (f32, the default)
    /// or [`StatePrecision::Bf16`] (DeepSpeed's `fp32_optimizer_states=False`: every state
    /// element is rounded to bf16, to nearest even, after each update, and widened exactly
    /// before the next).
    ///
    /// Only before the first step (no parameter has state), and bf16 only for algorithms with
    /// a mixed-precision kernel ([`Algorithm::MIXED_PRECISION`]). An optimizer with bf16 state
    /// steps only through [`Optimizer::step_mixed`] and [`Optimizer::step_half`].
    /// [`Optimizer::state_dict`] widens its
    /// state to f32 (exactly) and [`Optimizer::load_state_dict`] rounds f32/f64 state into
    /// it; binary checkpoints ([`crate::checkpoint`]) store it as `BF16` tensors, and load
    /// any float dtype into it, cast as torch casts ([`crate::checkpoint::dtype`]).
    pub fn set_state_precision(&mut self, precision: StatePrecision) -> Result<()> {
        if precision == self.state_precision {
            return Ok(());
        }
        if precision == StatePrecision::Bf16 && !A::MIXED_PRECISION {
            return Err(Error::MixedPrecision(format!(
                "{} has no mixed-precision kernel, so it cannot keep bf16 state",
                A::NAME
            )));
        }
        if self
            .groups
            .iter()
            .any(|g| g.state.iter().any(Option::is_some))
        {
            return Err(Error::MixedPrecision(format!(
                "the state precision of this {} optimizer can only be changed before its first \
                 step (some parameters already have state)",
                A::NAME
            )));
        }
        self.state_precision = precision;
        for g in &mut self.groups {
            g.buffers.clear();
            g.half_buffers.clear();
        }
        Ok(())
    }

    /// From how many elements (summed over the groups) [`Optimizer::step_mixed`] writes the
    /// half-precision copy with streaming (non-temporal) stores, which skip reading each copy
    /// line before writing it and leave the caches to the arrays the step reads; smaller
    /// steps store it ordinarily, so it is still cached for the forward pass that reads it.
    /// The default is [`crate::mixed::STREAM_COPY_MIN_ELEMS`]; `0` always streams, `usize::MAX` never does.
    /// Results are bitwise the same either way.
    pub fn set_stream_copy_threshold(&mut self, elems: usize) {
        self.stream_copy_threshold = elems;
    }

    /// The precision of the state buffers.
    pub fn state_precision(&self) -> StatePrecision {
        self.state_precision
    }

    /// State buffer `buffer` of `param` when the state is [`StatePrecision::Bf16`] (else, and
    /// before the parameter's first step, `None`).
    pub fn buffer_bf16(&self, param: Param<f32>, buffer: &str) -> Option<&[bf16]> {
        let i = param.index();
        let g = self.groups.iter().find(|g| g.params.contains(&i))?;
        let j = g.position(i)?;
        let st = g.state[j]?;
        let k = A::buffers(&g.config).iter().position(|&b| b == buffer)?;
        if k >= st.live_buffers as usize || g.half_buffers.is_empty() {
            return None;
        }
        let local = g.locals[j];
        Some(&g.half_buffers[k][local..local + self.layout[i].len])
    }

    /// One mixed-precision step (mode 2 of the ZeRO-Offload pattern): the gradients come from
    /// `grads`, a half-precision buffer laid out like the arena (only parameters whose slot is
    /// present step, as only those with a gradient do in [`Optimizer::step`]); the arena's f32
    /// parameters and the optimizer's state are updated as [`Optimizer::step_with_options`]
    /// would update them given the gradients widened to f32, bit for bit; and every updated
    /// parameter is also written to `copy`, rounded to nearest even, in the same pass over
    /// memory. Parameters that do not step keep their old `copy` values (build the copy with
    /// [`HalfBuffer::copy_of`] so that they hold the parameters' values).
    ///
    /// `options` as for f32 steps: `grad_scale` multiplies the widened gradients inside the
    /// kernel (a GradScaler's unscale), `skip_non_finite` checks the half gradients first and
    /// skips the whole step if one is NaN or infinite (torch's `found_inf`), and `clip`
    /// computes the total norm from the half gradients (the norm of their f32 widening, bit
    /// for bit) and folds the clip coefficient into the update.
    ///
    /// Errors (nothing changes): buffers of another arena, an algorithm without a
    /// mixed-precision kernel (Adafactor, Muon), and everything a plain step refuses.
    pub fn step_mixed<G: Storage, H: Storage>(
        &mut self,
        arena: &mut Arena<f32>,
        grads: &HalfBuffer<G>,
        copy: &mut HalfBuffer<H>,
        options: StepOptions,
    ) -> Result<StepReport> {
        self.check_arena(arena)?;
        if !A::MIXED_PRECISION {
            return Err(Error::MixedPrecision(format!(
                "{} has no mixed-precision kernel",
                A::NAME
            )));
        }
        if grads.arena_id() != arena.id() || copy.arena_id() != arena.id() {
            return Err(Error::ArenaMismatch(
                "a half-precision gradient or copy buffer was built for another arena".into(),
            ));
        }
        self.drive_step(
            options,
            options.skip_non_finite && self.half_grads_non_finite(grads),
            |opt, exec| opt.run_step_mixed(arena, grads, copy, options, exec),
        )
    }

    /// True when a present half gradient of any group's parameter is NaN or infinite.
    pub(super) fn half_grads_non_finite<G: Storage>(&self, grads: &HalfBuffer<G>) -> bool {
        let present = grads.present();
        let values = grads.as_slice();
        self.groups.iter().any(|g| {
            g.params
                .iter()
                .any(|&i| present[i] && G::any_non_finite(&values[self.layout[i].range()]))
        })
    }

    /// The numeric part of [`Optimizer::step_mixed`], as `run_step` is of a plain step.
    fn run_step_mixed<G: Storage, H: Storage>(
        &mut self,
        arena: &mut Arena<f32>,
        grads: &HalfBuffer<G>,
        copy: &mut HalfBuffer<H>,
        options: StepOptions,
        exec: Exec,
    ) -> Result<(f64, Option<f64>)> {
        let (grad_factor, total) = self.half_grad_factor(grads, options, exec)?;
        let streams = MixedStreams {
            params: arena.params_mut().as_mut_ptr() as *mut u8,
            param_size: std::mem::size_of::<f32>(),
            has_grad: grads.present(),
            grads: grads.as_slice().as_ptr() as *const u8,
            grad_size: std::mem::size_of::<G>(),
            copy: copy.as_mut_slice().as_mut_ptr() as *mut u8,
            copy_size: std::mem::size_of::<H>(),
        };
        self.plan_with(grad_factor, streams);
        let work = std::mem::take(&mut self.work);
        let half_state = self.state_precision == StatePrecision::Bf16;
        let elems: usize = self.groups.iter().map(|g| g.len).sum();
        let stream_copy = elems >= self.stream_copy_threshold;
        exec.for_each(&work, |item| {
            // SAFETY: `plan_with` built every item from disjoint ranges of the arena, the
            // state buffers (bf16 ones under `StatePrecision::Bf16`), `grads` (of `G`) and
            // `copy` (of `H`), and all of them stay borrowed here until every item has run.
            unsafe {
                if half_state {
                    item.run_mixed::<A, G, bf16, H>(stream_copy)
                } else {
                    item.run_mixed::<A, G, f32, H>(stream_copy)
                }
            }
        });
        self.work = work;
        self.work.clear();
        Ok((grad_factor, total))
    }

    /// The factor a half step multiplies the gradients by (the scale, times the clip
    /// coefficient when `options` clip) and the total norm when it clips: the norm is
    /// computed from the half gradients `grads` (the norm of their f32 widening, bit for bit).
    pub(super) fn half_grad_factor<G: Storage>(
        &mut self,
        grads: &HalfBuffer<G>,
        options: StepOptions,
        exec: Exec,
    ) -> Result<(f64, Option<f64>)> {
        let mut grad_factor = options.grad_scale;
        let mut total = None;
        if let Some(clip) = options.clip {
            let present = grads.present();
            let layout = &self.layout;
            let ranges = self
                .groups
                .iter()
                .flat_map(|g| g.params.iter().copied())
                .filter(|&i| present[i])
                .map(|i| layout[i].range());
            self.norm_scratch.plan_ranges(ranges, clip.norm_type);
            let values = grads.as_slice();
            let simd = self.simd;
            let norm = self
                .norm_scratch
                .reduce_with::<f32>(clip.norm_type, exec, |r| {
                    partial_half(&values[r], clip.norm_type, simd)
                })
                * options.grad_scale.abs();
            grad_factor *= clip.coefficient_for(norm)?;
            total = Some(norm);
        }
        Ok((grad_factor, total))
    }
}
