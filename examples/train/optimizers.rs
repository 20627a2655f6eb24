//! The runs' optimizers behind one small interface, and their learning-rate schedules.
//!
//! [`Stepper::step`] takes a closure that zeroes the gradients, runs forward and backward and
//! returns the loss — torch's `optimizer.step(closure)` shape. First-order optimizers call it
//! once and then step; L-BFGS ([`optarena::LBFGS`]) calls it as often as its strong Wolfe line
//! search needs. The schedules are optarena's LR schedulers ([`optarena::schedule`]), which
//! act on either kind through [`GroupHyperparams`], as torch's act on `param_groups`.

use std::time::{Duration, Instant};

use half::bf16;
use optarena::checkpoint::TrainingOptimizer;
use optarena::mixed::{narrow, widen};
use optarena::schedule::{
    CosineAnnealingLR, CosineAnnealingLRConfig, LinearLR, LinearLRConfig, LrScheduler,
    SequentialLR, SequentialLRConfig,
};
use optarena::{
    Adam, AdamConfig, AdamW, AdamWConfig, Algorithm, Arena, ClipNorm, GroupHyperparams, HalfBuffer,
    LBFGSConfig, Optimizer, Parallelism, ParamGroup, ParamRounding, RAdam, RAdamConfig, SGDConfig,
    SimdLevel, StatePrecision, StepOptions, LBFGS, SGD,
};

use crate::model::Mlp;

/// An optimizer as a training checkpoint restores it, with a mixed-precision run's bf16 copy.
pub type TrainingParts<'a> = (
    &'a mut dyn TrainingOptimizer<f32>,
    Option<&'a mut HalfBuffer<bf16>>,
);

/// An optimizer as the training loop sees it.
pub trait Stepper {
    /// One optimization step. `closure` zeroes the gradients, computes the loss and writes the
    /// gradients into the arena; the optimizer calls it as often as it needs (once for
    /// first-order methods) and the loss of its first call is returned.
    fn step(
        &mut self,
        arena: &mut Arena<f32>,
        closure: &mut dyn FnMut(&mut Arena<f32>) -> f32,
    ) -> optarena::Result<f32>;

    /// The param groups' hyperparameters, which the LR scheduler reads and sets.
    fn groups(&mut self) -> &mut dyn GroupHyperparams;

    /// The optimizer state (`optimizer.state_dict()`) as JSON, for checkpoints.
    fn state_dict_json(&self) -> optarena::Result<String>;

    /// The optimizer as a training checkpoint holds it.
    fn training(&self) -> &dyn TrainingOptimizer<f32>;

    /// [`Stepper::training`], mutably (to load into), with the bf16 parameter copy of a
    /// mixed-precision run (restored from the same checkpoint).
    fn training_mut(&mut self) -> TrainingParts<'_>;

    /// The weights the forward pass uses when they are not the arena's f32 values: the bf16
    /// copy of [`Precision::Mixed`] (saved in the checkpoint too).
    fn forward_copy(&self) -> Option<&HalfBuffer<bf16>> {
        None
    }

    /// Time spent since the last call on this example's bf16 emulation inside `step` (the
    /// bf16 weights widened into the arena for the f32 forward and the master weights put
    /// back, the gradients rounded to bf16, mode 3's weights mirrored into the arena): work a
    /// real bf16 model would not do, left out of the optimizer's µs per step.
    fn take_emulation_time(&mut self) -> Duration {
        Duration::ZERO
    }

    /// Closure evaluations and iterations so far, for optimizers that count them (L-BFGS's
    /// `func_evals` and `n_iter`).
    fn evaluations(&self) -> Option<(u64, u64)> {
        None
    }
}

/// The precision a run trains in. Every mode starts from the same f32 initialisation.
///
/// A mode is a variant here, its [`Precision::adamw_id`] / [`Precision::adamw_label`] /
/// [`Precision::describe`], its state in [`FirstOrder`] (built in [`FirstOrder::new`]) and its
/// arm in [`FirstOrder`]'s `step`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// f32 parameters, gradients and state.
    F32,
    /// Mode 2 (ZeRO-Offload's pattern): f32 master weights and state; the forward and backward
    /// run on the bf16 copy of the weights and their gradients are rounded to bf16 (a bf16
    /// backward's output); `step_mixed` reads the bf16 gradients and writes the updated bf16
    /// copy in the same pass.
    Mixed,
    /// Mode 3 (torchao's `bf16_stochastic_round`): the weights exist only in bf16 (no master
    /// copy), the forward and backward run on them, the gradients are rounded to bf16, and
    /// `step_half` updates the bf16 weights with stochastic rounding (counter-based bits keyed
    /// by seed, step and element) and bf16 moments.
    #[value(name = "bf16-sr")]
    Bf16Sr,
}

/// The seed of mode 3's stochastic rounding; the step number comes from the optimizer's state,
/// so a resumed run draws the same bits as an unbroken one.
const SR_SEED: u64 = 0x0A7E_5EED;

impl Precision {
    /// Id (checkpoint file name) of the MLP AdamW run in this mode.
    pub fn adamw_id(self) -> &'static str {
        match self {
            Precision::F32 => "adamw",
            Precision::Mixed => "adamw-mixed",
            Precision::Bf16Sr => "adamw-bf16-sr",
        }
    }

    /// Label (table, plot) of the MLP AdamW run in this mode.
    pub fn adamw_label(self) -> &'static str {
        match self {
            Precision::F32 => "MLP AdamW",
            Precision::Mixed => "MLP AdamW mixed bf16",
            Precision::Bf16Sr => "MLP AdamW bf16 SR",
        }
    }

    /// The mode in words, for results.md.
    pub fn describe(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Mixed => {
                "mode 2: f32 master weights and state, bf16 gradients (f32 backward on the \
                 bf16 weights, rounded to nearest even), bf16 weight copy written by the step \
                 (its opt µs/step is the step alone: the emulation's copies, the bf16 weights \
                 widened into the arena and the master weights put back, the gradients \
                 rounded, are left out, as a bf16 model would not make them)"
            }
            Precision::Bf16Sr => {
                "mode 3: bf16 weights and moments only (no f32 master copy), bf16 gradients (f32 \
                 backward on the bf16 weights, rounded to nearest even), stochastic rounding of \
                 the updated weights (`step_half`, `ParamRounding::Stochastic`); its opt µs/step \
                 is the step alone (rounding the gradients and widening the weights for the f32 \
                 forward are the emulation's, left out)"
            }
        }
    }
}

/// The state of a [`Precision::Mixed`] run besides the optimizer.
struct Mixed {
    /// The bf16 gradients a bf16 backward would write.
    grads: HalfBuffer<bf16>,
    /// The bf16 weights the forward pass reads; `step_mixed` writes it.
    copy: HalfBuffer<bf16>,
    /// The f32 master weights, set aside while the arena holds the bf16 weights for a
    /// forward and backward.
    master: Vec<f32>,
    /// Time spent on the emulation's copies since [`Stepper::take_emulation_time`] last took it.
    emulation: Duration,
    /// Mode 3: `copy` is the weights themselves, stepped by `step_half` with stochastic
    /// rounding (the arena then only mirrors them, widened, for the forward pass).
    stochastic: bool,
}

impl Mixed {
    /// Runs `f` with the arena's parameters replaced by the bf16 copy (widened, exact), then
    /// puts the f32 master weights back.
    /// The copies are timed into `copies`.
    fn on_copy<R>(
        copy: &HalfBuffer<bf16>,
        master: &mut Vec<f32>,
        arena: &mut Arena<f32>,
        copies: &mut Duration,
        f: impl FnOnce(&mut Arena<f32>) -> R,
    ) -> R {
        let t = Instant::now();
        master.clear();
        master.extend_from_slice(arena.params());
        widen(SimdLevel::Best, copy.as_slice(), arena.params_mut()).expect("the arena's length");
        *copies += t.elapsed();
        let r = f(arena);
        let t = Instant::now();
        arena.params_mut().copy_from_slice(master);
        *copies += t.elapsed();
        r
    }
}

/// Runs `f` on the weights the forward pass of `opt` uses: the arena's, or (a mixed run) its
/// bf16 copy widened into the arena for the call.
pub fn with_forward_weights<R>(
    opt: &dyn Stepper,
    arena: &mut Arena<f32>,
    f: impl FnOnce(&mut Arena<f32>) -> R,
) -> R {
    match opt.forward_copy() {
        Some(copy) => {
            let mut copies = Duration::ZERO;
            Mixed::on_copy(copy, &mut Vec::new(), arena, &mut copies, f)
        }
        None => f(arena),
    }
}

/// Any elementwise optimizer of optarena (SGD, Adam, AdamW, RAdam, ...), with the gradient
/// clip folded into its step, in any [`Precision`].
pub struct FirstOrder<A: Algorithm> {
    opt: Optimizer<f32, A>,
    clip: Option<ClipNorm>,
    mixed: Option<Mixed>,
}

impl<A: Algorithm> FirstOrder<A> {
    fn new(
        opt: Optimizer<f32, A>,
        clip: Option<ClipNorm>,
        arena: &Arena<f32>,
        p: Precision,
    ) -> Self {
        let mixed = match p {
            Precision::F32 => None,
            Precision::Mixed | Precision::Bf16Sr => Some(Mixed {
                grads: HalfBuffer::gradients(arena),
                copy: HalfBuffer::copy_of(arena),
                master: Vec::with_capacity(arena.len()),
                emulation: Duration::ZERO,
                stochastic: p == Precision::Bf16Sr,
            }),
        };
        let mut opt = opt;
        if p == Precision::Bf16Sr {
            // torchao keeps the moments in the parameters' dtype.
            opt.set_state_precision(StatePrecision::Bf16)
                .expect("AdamW has a mixed-precision kernel and no state yet");
        }
        FirstOrder { opt, clip, mixed }
    }
}

impl<A: Algorithm> Stepper for FirstOrder<A> {
    fn step(
        &mut self,
        arena: &mut Arena<f32>,
        closure: &mut dyn FnMut(&mut Arena<f32>) -> f32,
    ) -> optarena::Result<f32> {
        let Some(m) = &mut self.mixed else {
            let loss = closure(arena);
            match self.clip {
                // clip_grad_norm_ + step, fused: the norm is taken over the optimizer's params
                // and the clip coefficient is folded into the update.
                Some(clip) => {
                    self.opt
                        .step_with_options(arena, optarena::StepOptions::new().clipped(clip))?;
                }
                None => self.opt.step(arena)?,
            }
            return Ok(loss);
        };
        // Forward and backward on the bf16 weights; the gradients rounded to bf16.
        let loss = Mixed::on_copy(&m.copy, &mut m.master, arena, &mut m.emulation, |a| {
            closure(a)
        });
        let t = Instant::now();
        narrow(SimdLevel::Best, arena.grads(), m.grads.as_mut_slice())?;
        m.emulation += t.elapsed();
        // One pass: bf16 gradients in (clip norm computed on them), f32 master weights and
        // state updated, bf16 copy out.
        let options = StepOptions {
            clip: self.clip,
            ..StepOptions::default()
        };
        if m.stochastic {
            // Mode 3: the bf16 weights are the parameters; the step number keys the random
            // bits (the optimizer's own count, so a resumed run draws what an unbroken one does).
            let step = arena
                .handles()
                .filter_map(|p| self.opt.step_count(p))
                .max()
                .unwrap_or(0)
                + 1;
            let rounding = ParamRounding::Stochastic {
                seed: SR_SEED,
                step,
            };
            self.opt
                .step_half(&mut m.copy, &m.grads, rounding, options)?;
            // The arena mirrors the bf16 weights (widened, exact) for code that reads it.
            let t = Instant::now();
            widen(SimdLevel::Best, m.copy.as_slice(), arena.params_mut())?;
            m.emulation += t.elapsed();
        } else {
            self.opt.step_mixed(arena, &m.grads, &mut m.copy, options)?;
        }
        Ok(loss)
    }

    fn forward_copy(&self) -> Option<&HalfBuffer<bf16>> {
        self.mixed.as_ref().map(|m| &m.copy)
    }

    fn take_emulation_time(&mut self) -> Duration {
        self.mixed
            .as_mut()
            .map_or(Duration::ZERO, |m| std::mem::take(&mut m.emulation))
    }

    fn groups(&mut self) -> &mut dyn GroupHyperparams {
        &mut self.opt
    }

    fn state_dict_json(&self) -> optarena::Result<String> {
        self.opt.state_dict_json()
    }

    fn training(&self) -> &dyn TrainingOptimizer<f32> {
        &self.opt
    }

    fn training_mut(&mut self) -> TrainingParts<'_> {
        (&mut self.opt, self.mixed.as_mut().map(|m| &mut m.copy))
    }
}

/// L-BFGS over the model's parameters as one flat group (torch's `LBFGS` takes one group).
pub struct QuasiNewton {
    opt: LBFGS<f32>,
}

impl Stepper for QuasiNewton {
    fn step(
        &mut self,
        arena: &mut Arena<f32>,
        closure: &mut dyn FnMut(&mut Arena<f32>) -> f32,
    ) -> optarena::Result<f32> {
        self.opt.step(arena, closure)
    }

    fn groups(&mut self) -> &mut dyn GroupHyperparams {
        &mut self.opt
    }

    fn state_dict_json(&self) -> optarena::Result<String> {
        self.opt.state_dict_json()
    }

    fn training(&self) -> &dyn TrainingOptimizer<f32> {
        &self.opt
    }

    fn training_mut(&mut self) -> TrainingParts<'_> {
        (&mut self.opt, None)
    }

    fn evaluations(&self) -> Option<(u64, u64)> {
        Some((self.opt.func_evals(), self.opt.n_iter()))
    }
}

/// Which optimizer a run uses, with its hyperparameters.
#[derive(Clone, Copy, Debug)]
// `LBFGS` is torch's spelling, kept verbatim as the crate's types do (README's "Naming").
#[allow(clippy::upper_case_acronyms)]
pub enum OptKind {
    /// `SGD(lr, momentum, nesterov=True, weight_decay on weights)`.
    SGDMomentum {
        /// Peak learning rate.
        lr: f64,
        /// Momentum factor.
        momentum: f64,
        /// L2 penalty on the weights (not the biases).
        weight_decay: f64,
    },
    /// `Adam(lr)`.
    Adam {
        /// Peak learning rate.
        lr: f64,
    },
    /// `AdamW(lr, weight_decay on weights)`.
    AdamW {
        /// Peak learning rate.
        lr: f64,
        /// Decoupled weight decay of the weights (biases: 0).
        weight_decay: f64,
    },
    /// `RAdam(lr)`.
    RAdam {
        /// Peak learning rate.
        lr: f64,
    },
    /// `LBFGS(params, lr, max_iter, history_size, line_search_fn="strong_wolfe")`, over all
    /// parameters as one group.
    LBFGS {
        /// Step length tried first by the line search.
        lr: f64,
        /// Most iterations per `step(closure)`.
        max_iter: usize,
        /// Correction pairs kept.
        history_size: usize,
    },
}

impl OptKind {
    /// The peak (base) learning rate.
    pub fn lr(&self) -> f64 {
        match *self {
            OptKind::SGDMomentum { lr, .. }
            | OptKind::Adam { lr }
            | OptKind::AdamW { lr, .. }
            | OptKind::RAdam { lr }
            | OptKind::LBFGS { lr, .. } => lr,
        }
    }

    /// A human-readable description, for the results table.
    pub fn describe(&self) -> String {
        match *self {
            OptKind::SGDMomentum {
                lr,
                momentum,
                weight_decay,
            } => format!("SGD lr={lr} momentum={momentum} nesterov wd={weight_decay}"),
            OptKind::Adam { lr } => format!("Adam lr={lr}"),
            OptKind::AdamW { lr, weight_decay } => format!("AdamW lr={lr} wd={weight_decay}"),
            OptKind::RAdam { lr } => format!("RAdam lr={lr}"),
            OptKind::LBFGS {
                lr,
                max_iter,
                history_size,
            } => format!(
                "LBFGS lr={lr} max_iter={max_iter} history_size={history_size} strong_wolfe"
            ),
        }
    }

    /// Builds the optimizer over `model`'s two param groups (weights, then biases without
    /// weight decay), running its steps on `parallelism`. L-BFGS takes every parameter as one
    /// group and runs on the calling thread.
    pub fn build(
        &self,
        model: &Mlp,
        arena: &Arena<f32>,
        clip: Option<ClipNorm>,
        parallelism: Parallelism,
        precision: Precision,
    ) -> optarena::Result<Box<dyn Stepper>> {
        let weights = || ParamGroup::new(model.weights.iter().copied());
        let biases = || ParamGroup::new(model.biases.iter().copied()).with("weight_decay", 0.0);
        Ok(match *self {
            OptKind::SGDMomentum {
                lr,
                momentum,
                weight_decay,
            } => boxed(
                SGD::new(
                    arena,
                    [weights(), biases()],
                    SGDConfig::default()
                        .with_lr(lr)
                        .with_momentum(momentum)
                        .with_nesterov(true)
                        .with_weight_decay(weight_decay),
                )?,
                clip,
                parallelism,
                arena,
                precision,
            ),
            OptKind::Adam { lr } => boxed(
                Adam::new(
                    arena,
                    [weights(), biases()],
                    AdamConfig::default().with_lr(lr),
                )?,
                clip,
                parallelism,
                arena,
                precision,
            ),
            OptKind::AdamW { lr, weight_decay } => boxed(
                AdamW::new(
                    arena,
                    [weights(), biases()],
                    AdamWConfig::default()
                        .with_lr(lr)
                        .with_weight_decay(weight_decay),
                )?,
                clip,
                parallelism,
                arena,
                precision,
            ),
            OptKind::RAdam { lr } => boxed(
                RAdam::new(
                    arena,
                    [weights(), biases()],
                    RAdamConfig::default().with_lr(lr),
                )?,
                clip,
                parallelism,
                arena,
                precision,
            ),
            OptKind::LBFGS {
                lr,
                max_iter,
                history_size,
            } => {
                if precision != Precision::F32 {
                    return Err(optarena::Error::InvalidHyperparameter(
                        "L-BFGS runs in f32 only (it has no mixed-precision step)".into(),
                    ));
                }
                if clip.is_some() {
                    return Err(optarena::Error::InvalidHyperparameter(
                        "L-BFGS takes no gradient clipping: its line search needs the true \
                         gradient"
                            .into(),
                    ));
                }
                Box::new(QuasiNewton {
                    opt: LBFGS::new(
                        arena,
                        [ParamGroup::all()],
                        LBFGSConfig::default()
                            .with_lr(lr)
                            .with_max_iter(max_iter)
                            .with_history_size(history_size)
                            .with_line_search_fn(optarena::LineSearch::StrongWolfe),
                    )?,
                })
            }
        })
    }
}

fn boxed<A: Algorithm>(
    opt: Optimizer<f32, A>,
    clip: Option<ClipNorm>,
    parallelism: Parallelism,
    arena: &Arena<f32>,
    precision: Precision,
) -> Box<dyn Stepper> {
    Box::new(FirstOrder::new(
        opt.with_parallelism(parallelism),
        clip,
        arena,
        precision,
    ))
}

/// A run's learning-rate schedule, stepped once per optimizer step (per mini-batch).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LrSchedule {
    /// No scheduler: the optimizer's own `lr` throughout.
    Constant,
    /// torch's warmup + cosine recipe,
    /// `SequentialLR([LinearLR(start_factor=1/warmup, total_iters=warmup),
    /// CosineAnnealingLR(T_max=total−warmup, eta_min)], milestones=[warmup])`: the lr rises
    /// linearly from `base/warmup` to the optimizer's `lr` over `warmup` steps, then follows
    /// half a cosine down to `eta_min` at step `total`.
    WarmupCosine {
        /// Warmup steps (the milestone).
        warmup: u64,
        /// Total steps of the run.
        total: u64,
        /// Final rate.
        eta_min: f64,
    },
}

impl LrSchedule {
    /// Builds the scheduler on `opt` (torch's constructors: each sets the first lr), or `None`
    /// for [`LrSchedule::Constant`].
    pub fn build(
        &self,
        opt: &mut dyn GroupHyperparams,
    ) -> optarena::Result<Option<Box<dyn LrScheduler>>> {
        let LrSchedule::WarmupCosine {
            warmup,
            total,
            eta_min,
        } = *self
        else {
            return Ok(None);
        };
        let steps = |n: u64| {
            i64::try_from(n).map_err(|_| {
                optarena::Error::InvalidHyperparameter(format!("{n} steps is too many"))
            })
        };
        let warmup = steps(warmup.max(1))?;
        let t_max = steps(total)?.saturating_sub(warmup).max(1);
        let linear = LinearLR::new(
            opt,
            LinearLRConfig::new()
                .with_start_factor(1.0 / warmup as f64)
                .with_end_factor(1.0)
                .with_total_iters(warmup),
        )?;
        let cosine = CosineAnnealingLR::new(
            opt,
            CosineAnnealingLRConfig::new(t_max).with_eta_min(eta_min),
        )?;
        let seq = SequentialLR::new(
            opt,
            vec![Box::new(linear), Box::new(cosine)],
            SequentialLRConfig::new(vec![warmup]),
        )?;
        Ok(Some(Box::new(seq)))
    }

    /// A short description, for the results table.
    pub fn describe(&self) -> String {
        match *self {
            LrSchedule::Constant => "constant".into(),
            LrSchedule::WarmupCosine { warmup, .. } => {
                format!("SequentialLR(LinearLR warmup {warmup} steps, CosineAnnealingLR)")
            }
        }
    }
}
