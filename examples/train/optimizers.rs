//! The runs' optimizers behind one small interface, and the learning-rate schedule.
//!
//! [`Stepper::step`] takes a closure that zeroes the gradients, runs forward and backward and
//! returns the loss — torch's `optimizer.step(closure)` shape. First-order optimizers call it
//! once and then step; a quasi-Newton optimizer such as L-BFGS calls it as often as its line
//! search needs. That is what lets an L-BFGS run drop in: implement [`Stepper`] for it (its
//! `step(arena, closure)` has exactly this shape), add an [`OptKind`] variant and a row in
//! [`crate::runner::runs`].

use std::f64::consts::PI;

use optarena::{
    Adam, AdamConfig, AdamW, AdamWConfig, Algorithm, Arena, ClipNorm, MatchBy, Optimizer,
    Parallelism, ParamGroup, RAdam, RAdamConfig, Sgd, SgdConfig,
};

use crate::model::Mlp;

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

    /// Sets the learning rate of every param group (the schedule's output).
    fn set_lr(&mut self, lr: f64) -> optarena::Result<()>;

    /// The optimizer state (`optimizer.state_dict()`) as JSON, for checkpoints.
    fn state_dict_json(&self) -> optarena::Result<String>;

    /// Restores a state written by [`Stepper::state_dict_json`].
    fn load_state_dict_json(&mut self, json: &str) -> optarena::Result<()>;
}

/// Any elementwise optimizer of optarena (SGD, Adam, AdamW, RAdam, ...), with the gradient
/// clip folded into its step.
pub struct FirstOrder<A: Algorithm> {
    opt: Optimizer<f32, A>,
    clip: Option<ClipNorm>,
}

impl<A: Algorithm> Stepper for FirstOrder<A> {
    fn step(
        &mut self,
        arena: &mut Arena<f32>,
        closure: &mut dyn FnMut(&mut Arena<f32>) -> f32,
    ) -> optarena::Result<f32> {
        let loss = closure(arena);
        match self.clip {
            // clip_grad_norm_ + step, fused: the norm is taken over the optimizer's params and
            // the clip coefficient is folded into the update.
            Some(clip) => {
                self.opt.step_clipped(arena, clip)?;
            }
            None => self.opt.step(arena)?,
        }
        Ok(loss)
    }

    fn set_lr(&mut self, lr: f64) -> optarena::Result<()> {
        for g in 0..self.opt.num_groups() {
            self.opt.set_lr(g, lr)?;
        }
        Ok(())
    }

    fn state_dict_json(&self) -> optarena::Result<String> {
        self.opt.state_dict_json()
    }

    fn load_state_dict_json(&mut self, json: &str) -> optarena::Result<()> {
        self.opt.load_state_dict_json(json, MatchBy::Name)
    }
}

/// Which optimizer a run uses, with its hyperparameters.
#[derive(Clone, Copy, Debug)]
pub enum OptKind {
    /// `SGD(lr, momentum, nesterov=True, weight_decay on weights)`.
    SgdMomentum {
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
}

impl OptKind {
    /// The peak (base) learning rate.
    pub fn lr(&self) -> f64 {
        match *self {
            OptKind::SgdMomentum { lr, .. }
            | OptKind::Adam { lr }
            | OptKind::AdamW { lr, .. }
            | OptKind::RAdam { lr } => lr,
        }
    }

    /// A human-readable description, for the results table.
    pub fn describe(&self) -> String {
        match *self {
            OptKind::SgdMomentum {
                lr,
                momentum,
                weight_decay,
            } => format!("SGD lr={lr} momentum={momentum} nesterov wd={weight_decay}"),
            OptKind::Adam { lr } => format!("Adam lr={lr}"),
            OptKind::AdamW { lr, weight_decay } => format!("AdamW lr={lr} wd={weight_decay}"),
            OptKind::RAdam { lr } => format!("RAdam lr={lr}"),
        }
    }

    /// Builds the optimizer over `model`'s two param groups (weights, then biases without
    /// weight decay), running its steps on `parallelism`.
    pub fn build(
        &self,
        model: &Mlp,
        arena: &Arena<f32>,
        clip: Option<ClipNorm>,
        parallelism: Parallelism,
    ) -> optarena::Result<Box<dyn Stepper>> {
        let weights = || ParamGroup::new(model.weights.iter().copied());
        let biases = || ParamGroup::new(model.biases.iter().copied()).with("weight_decay", 0.0);
        Ok(match *self {
            OptKind::SgdMomentum {
                lr,
                momentum,
                weight_decay,
            } => boxed(
                Sgd::new(
                    arena,
                    [weights(), biases()],
                    SgdConfig {
                        lr,
                        momentum,
                        nesterov: true,
                        weight_decay,
                        ..Default::default()
                    },
                )?,
                clip,
                parallelism,
            ),
            OptKind::Adam { lr } => boxed(
                Adam::new(
                    arena,
                    [weights(), biases()],
                    AdamConfig {
                        lr,
                        ..Default::default()
                    },
                )?,
                clip,
                parallelism,
            ),
            OptKind::AdamW { lr, weight_decay } => boxed(
                AdamW::new(
                    arena,
                    [weights(), biases()],
                    AdamWConfig {
                        lr,
                        weight_decay,
                        ..Default::default()
                    },
                )?,
                clip,
                parallelism,
            ),
            OptKind::RAdam { lr } => boxed(
                RAdam::new(
                    arena,
                    [weights(), biases()],
                    RAdamConfig {
                        lr,
                        ..Default::default()
                    },
                )?,
                clip,
                parallelism,
            ),
        })
    }
}

fn boxed<A: Algorithm>(
    opt: Optimizer<f32, A>,
    clip: Option<ClipNorm>,
    parallelism: Parallelism,
) -> Box<dyn Stepper> {
    Box::new(FirstOrder {
        opt: opt.with_parallelism(parallelism),
        clip,
    })
}

/// The learning rate as a pure function of the global step count, so a resumed run needs only
/// the step count to be back on schedule.
///
/// Until optarena's LR schedulers land (they drive `GroupHyperparams`, as torch's drive
/// `param_groups`), this is computed here and applied with `set_lr` before every step. The
/// warmup + cosine shape equals torch's `SequentialLR([LinearLR(start_factor=1/warmup,
/// total_iters=warmup), CosineAnnealingLR(T_max=total−warmup, eta_min)], [warmup])` stepped
/// once per batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LrSchedule {
    /// The same rate throughout.
    Constant(f64),
    /// Linear warmup from `base/warmup` to `base` over `warmup` steps, then a half cosine down
    /// to `min_lr` at step `total`.
    WarmupCosine {
        /// Peak rate, reached after the warmup.
        base: f64,
        /// Warmup steps.
        warmup: u64,
        /// Total steps of the run.
        total: u64,
        /// Final rate.
        min_lr: f64,
    },
}

impl LrSchedule {
    /// The rate for step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        match *self {
            LrSchedule::Constant(lr) => lr,
            LrSchedule::WarmupCosine {
                base,
                warmup,
                total,
                min_lr,
            } => {
                if step < warmup {
                    base * (step + 1) as f64 / warmup as f64
                } else {
                    let span = total.saturating_sub(warmup).max(1) as f64;
                    let t = ((step - warmup) as f64 / span).min(1.0);
                    min_lr + (base - min_lr) * 0.5 * (1.0 + (PI * t).cos())
                }
            }
        }
    }

    /// A short description, for the results table.
    pub fn describe(&self) -> String {
        match *self {
            LrSchedule::Constant(_) => "constant".into(),
            LrSchedule::WarmupCosine { warmup, .. } => format!("warmup {warmup} + cosine"),
        }
    }
}
