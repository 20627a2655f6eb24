//! Half-precision steps without master weights: the parameters themselves are bf16 (or f16),
//! updated in f32 lanes and rounded back, to nearest (mode 1, torch's fused step on bf16
//! parameters) or stochastically (mode 3, torchao's `bf16_stochastic_round`). See
//! [`crate::mixed`].
//!
//! A child module of `optimizer`, so it reaches the private fields without widening them.

use std::any::TypeId;

use half::bf16;

use super::{Algorithm, MixedStreams, Optimizer, StepOptions, StepReport};
use crate::error::{Error, Result};
use crate::mixed::{HalfBuffer, Nearest, ParamRounding, StatePrecision, Stochastic, Storage};
use crate::parallel::Exec;

impl<A: Algorithm> Optimizer<f32, A> {
    /// One step of half-precision parameters with no f32 copy of them anywhere (modes 1 and
    /// 3 of [`crate::mixed`]): `params` holds the parameters in `P` (bf16 or f16) and
    /// `grads` their gradients in `G`, both laid out like the arena the optimizer was built
    /// for (`HalfBuffer::copy_of(&arena)`, `HalfBuffer::gradients(&arena)`; the f32 arena is
    /// only needed to build them and the optimizer, and can be dropped afterwards). Only
    /// parameters whose gradient slot is present step.
    ///
    /// Each element is widened to f32 (exactly), updated in f32 in the order of torch's fused
    /// CPU kernel ([`Algorithm::torch_fused_pass`]: for SGD, Adam, AdamW and Adagrad with the
    /// multiply-adds torch's compiled kernel fuses, [`crate::kernels::torch_fused`]; for the
    /// others, which torch has no fused kernel for, the op of [`Optimizer::step`]), and stored
    /// back in `P` with `rounding`:
    /// - [`ParamRounding::Nearest`] with bf16 parameters, gradients and state
    ///   ([`Optimizer::set_state_precision`]`(`[`StatePrecision::Bf16`]`)`) is torch's
    ///   `fused=True` step on bf16 parameters (`tests/bf16_fused.rs` compares it with torch's
    ///   trajectories: SGD, Adam, AdamW, Adagrad, ...);
    /// - [`ParamRounding::Stochastic`] (bf16 parameters only) rounds up or down at random
    ///   with the probabilities that make the rounding unbiased, from counter-based bits, so
    ///   the result does not depend on the thread count or SIMD level. State may be bf16
    ///   (rounded to nearest, torchao's default of state in the parameters' dtype) or f32
    ///   ([`StatePrecision::Full`]).
    ///
    /// `options` as for [`Optimizer::step_mixed`]: `grad_scale` multiplies the widened
    /// gradients, `skip_non_finite` checks the half gradients first and skips the whole step
    /// if one is NaN or infinite, `clip` computes the total norm from the half gradients.
    ///
    /// Errors (nothing changes): buffers of another arena, stochastic rounding of parameters
    /// that are not bf16, an algorithm without a mixed-precision kernel (Adafactor, Muon),
    /// and everything a plain step refuses.
    pub fn step_half<P: Storage, G: Storage>(
        &mut self,
        params: &mut HalfBuffer<P>,
        grads: &HalfBuffer<G>,
        rounding: ParamRounding,
        options: StepOptions,
    ) -> Result<StepReport> {
        if !A::MIXED_PRECISION {
            return Err(Error::MixedPrecision(format!(
                "{} has no mixed-precision kernel",
                A::NAME
            )));
        }
        if params.arena_id() != self.arena_id || grads.arena_id() != self.arena_id {
            return Err(Error::ArenaMismatch(format!(
                "a half-precision parameter or gradient buffer was built for another arena \
                 than this {} optimizer's",
                A::NAME
            )));
        }
        if matches!(rounding, ParamRounding::Stochastic { .. })
            && TypeId::of::<P>() != TypeId::of::<bf16>()
        {
            return Err(Error::MixedPrecision(format!(
                "stochastic rounding is for bfloat16 parameters, not {}",
                P::DTYPE
            )));
        }
        self.drive_step(
            options,
            options.skip_non_finite && self.half_grads_non_finite(grads),
            |opt, exec| opt.run_step_half(params, grads, rounding, options, exec),
        )
    }

    /// The numeric part of [`Optimizer::step_half`].
    fn run_step_half<P: Storage, G: Storage>(
        &mut self,
        params: &mut HalfBuffer<P>,
        grads: &HalfBuffer<G>,
        rounding: ParamRounding,
        options: StepOptions,
        exec: Exec,
    ) -> Result<(f64, Option<f64>)> {
        let (grad_factor, total) = self.half_grad_factor(grads, options, exec)?;
        let values = params.values_mut();
        let base = values.as_mut_ptr();
        let streams = MixedStreams {
            params: base as *mut u8,
            param_size: std::mem::size_of::<P>(),
            has_grad: grads.present(),
            grads: grads.as_slice().as_ptr() as *const u8,
            grad_size: std::mem::size_of::<G>(),
            copy: std::ptr::null_mut(),
            copy_size: 0,
        };
        self.plan_with(grad_factor, streams);
        let work = std::mem::take(&mut self.work);
        let half_state = self.state_precision == StatePrecision::Bf16;
        let base = base as usize;
        exec.for_each(&work, |item| {
            // Arena position of the piece's first element: the random bits of stochastic
            // rounding are keyed by it, whichever thread runs the piece.
            let at = (item.params as usize - base) / std::mem::size_of::<P>();
            // SAFETY: `plan_with` built every item from disjoint ranges of `params` (of `P`),
            // `grads` (of `G`) and the state buffers (bf16 ones under
            // `StatePrecision::Bf16`), all borrowed here until every item has run; each
            // parameter pointer covers `len` elements of `P`.
            unsafe {
                let p = std::slice::from_raw_parts_mut(item.params as *mut P, item.len);
                match rounding {
                    ParamRounding::Nearest if half_state => {
                        item.run_stream::<A, _, G, bf16>(Nearest::new(p), true)
                    }
                    ParamRounding::Nearest => {
                        item.run_stream::<A, _, G, f32>(Nearest::new(p), true)
                    }
                    ParamRounding::Stochastic { seed, step } => {
                        // `P` is bf16 (checked by `step_half`), so this is the same slice.
                        let p =
                            std::slice::from_raw_parts_mut(p.as_mut_ptr() as *mut bf16, p.len());
                        let s = Stochastic::new(p, seed, step, at as u64);
                        if half_state {
                            item.run_stream::<A, _, G, bf16>(s, true)
                        } else {
                            item.run_stream::<A, _, G, f32>(s, true)
                        }
                    }
                }
            }
        });
        self.work = work;
        self.work.clear();
        Ok((grad_factor, total))
    }
}
