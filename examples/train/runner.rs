//! The training runs: options, the epoch loop, checkpoints and resume.

use std::fs;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use optarena::checkpoint::training::inspect_training;
use optarena::checkpoint::{TrainingCheckpoint, TrainingRestore};
use optarena::schedule::LrScheduler;
use optarena::{ClipNorm, Parallelism};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::{self, Dataset};
use crate::model::{Architecture, Mlp};
use crate::optimizers::{with_forward_weights, LrSchedule, OptKind, Precision, Stepper};
use crate::report;

/// Train a digits classifier with SGD+momentum, Adam, AdamW and RAdam from one initialisation,
/// plus a full-batch logistic regression; write a results table, curves, a plot and
/// checkpoints.
#[derive(Parser, Debug, Clone)]
#[command(name = "train")]
pub struct Args {
    /// Epochs of every run [default: 40, or 5 with --smoke].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Mini-batch size of the MLP runs.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Seed of the train/test split, the initialisation and the shuffling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Threads of the rayon pool the optimizer steps run on (results are bitwise the same for
    /// any count) [default: the number of cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Output directory: results, curves, plot, checkpoints.
    #[arg(long, default_value = "out")]
    pub out: PathBuf,
    /// Continue every run from its last checkpoint in `<out>/checkpoints`.
    #[arg(long)]
    pub resume: bool,
    /// Stop every run after this epoch, as if interrupted (its checkpoint is written); finish
    /// later with --resume.
    #[arg(long, value_name = "N")]
    pub stop_after_epoch: Option<usize>,
    /// A reduced, fast mode for CI: 5 epochs, fewer L-BFGS iterations.
    #[arg(long)]
    pub smoke: bool,
    /// Hidden layer widths of the MLP.
    #[arg(long, value_delimiter = ',', default_values_t = [256, 256])]
    pub hidden: Vec<usize>,
    /// L-BFGS `step(closure)` calls per epoch of the logistic regression (full batch).
    #[arg(long, default_value_t = 1)]
    pub full_batch_steps: usize,
    /// L-BFGS `max_iter`: iterations per `step(closure)` [default: 20, or 10 with --smoke].
    #[arg(long)]
    pub lbfgs_max_iter: Option<usize>,
    /// Precision modes: `f32` runs every optimizer; every other mode runs the MLP AdamW run
    /// again from the same initialisation in that mode (`mixed`: f32 master weights, bf16
    /// gradients and weight copy, `Optimizer::step_mixed`; `bf16-sr`: bf16 weights and moments
    /// only, stochastic rounding, `Optimizer::step_half`), shown next to its f32 twin.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Precision::F32, Precision::Mixed, Precision::Bf16Sr])]
    pub precision: Vec<Precision>,
}

/// Everything that determines a run's numbers; a checkpoint only resumes under the same.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Epochs of each run.
    pub epochs: usize,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Seed.
    pub seed: u64,
    /// Hidden widths of the MLP.
    pub hidden: Vec<usize>,
    /// L-BFGS `step(closure)` calls per epoch of the logistic regression.
    pub full_batch_steps: usize,
    /// L-BFGS iterations per `step(closure)` (`max_iter`).
    pub lbfgs_max_iter: usize,
}

impl Args {
    /// The settings these options stand for.
    pub fn settings(&self) -> Settings {
        Settings {
            epochs: self.epochs.unwrap_or(if self.smoke { 5 } else { 40 }),
            batch_size: self.batch_size,
            seed: self.seed,
            hidden: self.hidden.clone(),
            full_batch_steps: self.full_batch_steps,
            lbfgs_max_iter: self
                .lbfgs_max_iter
                .unwrap_or(if self.smoke { 10 } else { 20 }),
        }
    }
}

/// How a run goes through the data.
#[derive(Clone, Copy, Debug)]
pub enum Batching {
    /// Shuffled mini-batches of `--batch-size`, one pass per epoch.
    MiniBatch,
    /// The whole training set per step, `steps` steps per epoch.
    FullBatch {
        /// Steps per epoch.
        steps: usize,
    },
}

/// One run of the comparison.
#[derive(Clone, Debug)]
pub struct RunSpec {
    /// File-name-safe identifier (checkpoint name).
    pub id: &'static str,
    /// Name in the table and the plot legend.
    pub label: &'static str,
    /// The model.
    pub arch: Architecture,
    /// Data per step.
    pub batching: Batching,
    /// Optimizer and hyperparameters.
    pub opt: OptKind,
    /// Gradient clipping folded into the step.
    pub clip: Option<ClipNorm>,
    /// Learning-rate schedule, stepped per optimizer step.
    pub schedule: LrSchedule,
    /// L2 penalty `λ/2 · Σ W²` on the weights, added to the loss the optimizer minimizes
    /// (0: none).
    pub l2: f64,
    /// The precision it trains in.
    pub precision: Precision,
}

impl RunSpec {
    fn steps_per_epoch(&self, settings: &Settings, train_len: usize) -> usize {
        match self.batching {
            Batching::MiniBatch => train_len.div_ceil(settings.batch_size),
            Batching::FullBatch { steps } => steps,
        }
    }
}

/// The comparison: one MLP from one initialisation under four optimizers, each with clipping
/// and a warmup + cosine schedule stepped per mini-batch (optarena's `SequentialLR` of a
/// `LinearLR` and a `CosineAnnealingLR`), and multinomial logistic regression trained
/// full-batch by L-BFGS with the strong Wolfe line search.
///
/// Then, for every mode of `precision` besides f32, the MLP AdamW run again in that mode (same
/// initialisation, batches, schedule and clipping); without f32 in `precision`, only those.
pub fn runs(settings: &Settings, train_len: usize, precision: &[Precision]) -> Vec<RunSpec> {
    let mlp = Architecture::mlp(&settings.hidden);
    let total = (settings.epochs * train_len.div_ceil(settings.batch_size)) as u64;
    let cosine = |base: f64| LrSchedule::WarmupCosine {
        warmup: (total / 20).max(1),
        total,
        eta_min: base * 0.01,
    };
    let clip = Some(ClipNorm::l2(1.0));
    let run = |id, label, opt: OptKind| RunSpec {
        id,
        label,
        arch: mlp.clone(),
        batching: Batching::MiniBatch,
        opt,
        clip,
        schedule: cosine(opt.lr()),
        l2: 0.0,
        precision: Precision::F32,
    };
    let f32_runs = [
        run(
            "sgd",
            "MLP SGD+momentum",
            OptKind::SGDMomentum {
                lr: 0.05,
                momentum: 0.9,
                weight_decay: 5e-4,
            },
        ),
        run("adam", "MLP Adam", OptKind::Adam { lr: 2e-3 }),
        run(
            Precision::F32.adamw_id(),
            Precision::F32.adamw_label(),
            OptKind::AdamW {
                lr: 2e-3,
                weight_decay: 0.05,
            },
        ),
        run("radam", "MLP RAdam", OptKind::RAdam { lr: 2e-3 }),
        RunSpec {
            id: "logreg",
            label: "LogReg L-BFGS",
            arch: Architecture::logistic(),
            batching: Batching::FullBatch {
                steps: settings.full_batch_steps,
            },
            opt: OptKind::LBFGS {
                lr: 1.0,
                max_iter: settings.lbfgs_max_iter,
                history_size: 10,
            },
            clip: None,
            schedule: LrSchedule::Constant,
            // scikit-learn's LogisticRegression(C=1.0): λ = 1 / n on the mean loss. Without
            // it the training set is separable and the minimum lies at infinity.
            l2: 1.0 / train_len as f64,
            precision: Precision::F32,
        },
    ];
    let mut out = Vec::new();
    if precision.contains(&Precision::F32) {
        out.extend(f32_runs.iter().cloned());
    }
    let twin = f32_runs
        .iter()
        .find(|r| r.id == Precision::F32.adamw_id())
        .expect("the AdamW run");
    let mut seen = Vec::new();
    for &p in precision.iter().filter(|&&p| p != Precision::F32) {
        if seen.contains(&p) {
            continue;
        }
        seen.push(p);
        out.push(RunSpec {
            id: p.adamw_id(),
            label: p.adamw_label(),
            precision: p,
            ..twin.clone()
        });
    }
    out
}

/// One epoch's numbers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    /// 1-based epoch; 0 is the initial model, before any step.
    pub epoch: usize,
    /// Learning rate of the epoch's last step (of the first step for epoch 0).
    pub lr: f64,
    /// Mean of the mini-batch losses seen during the epoch (none for epoch 0).
    pub batch_loss: Option<f64>,
    /// Loss on the whole training set after the epoch.
    pub train_loss: f64,
    /// Accuracy on the training set after the epoch.
    pub train_acc: f64,
    /// Loss on the test set after the epoch.
    pub test_loss: f64,
    /// Accuracy on the test set after the epoch.
    pub test_acc: f64,
}

/// Time spent, summed over every process that worked on the run (not part of the bitwise
/// comparison).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Timing {
    /// Wall time of the epochs (training and evaluation), seconds.
    pub wall_s: f64,
    /// Time inside the optimizer step (clipping included, forward/backward excluded), ns.
    pub opt_ns: u128,
    /// Optimizer steps timed.
    pub opt_steps: u64,
}

/// A run's own state besides the model, optimizer and scheduler: the training checkpoint's
/// metadata `"run"`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunState {
    /// Format version of this record.
    pub format: u32,
    /// The run's id.
    pub run: String,
    /// The settings it was started with.
    pub settings: Settings,
    /// Completed epochs.
    pub epochs_done: usize,
    /// The shuffling RNG's exact state.
    pub rng: ChaCha8Rng,
    /// Per-epoch numbers so far.
    pub history: Vec<EpochStats>,
    /// Time spent so far.
    pub timing: Timing,
}

/// A run's checkpoint as read back into a freshly built run ([`read_checkpoint`]): what a
/// resume restores, in comparable form (`tests/train_example.rs` compares them).
#[allow(dead_code)]
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// Completed epochs.
    pub epochs_done: usize,
    /// Optimizer steps taken (the training checkpoint's step).
    pub global_step: u64,
    /// Parameter names, in arena order.
    pub param_names: Vec<String>,
    /// The whole arena's values as `f32::to_bits`.
    pub params: Vec<u32>,
    /// `optimizer.state_dict()` as JSON after the load (L-BFGS's whole state, history
    /// included, for the logistic regression).
    pub optimizer: String,
    /// `scheduler.state_dict()` as JSON after the load, for runs with a schedule.
    pub scheduler: Option<String>,
    /// The shuffling RNG's exact state.
    pub rng: ChaCha8Rng,
    /// Per-epoch numbers so far.
    pub history: Vec<EpochStats>,
    /// The bf16 weight copy of a mixed-precision run (restored from the checkpoint), as bits.
    pub copy: Option<Vec<u16>>,
}

const CHECKPOINT_FORMAT: u32 = 3;

/// Where run `id`'s checkpoint lives: one training checkpoint (safetensors) holding the
/// parameters, the optimizer, the scheduler and the run's state.
pub fn checkpoint_path(out: &Path, id: &str) -> PathBuf {
    out.join("checkpoints").join(format!("{id}.safetensors"))
}

/// Saves a run in one call, atomically (`TrainingCheckpoint::save`: a temporary file, fsync,
/// rename, fsync of the directory): the parameters by name, the optimizer ("optimizer"; L-BFGS
/// as its JSON state dict inside the file), the scheduler ("lr"), the optimizer step count and
/// the run's state (metadata "run").
fn save_run(
    path: &Path,
    arena: &optarena::Arena<f32>,
    opt: &dyn Stepper,
    sched: Option<&dyn LrScheduler>,
    global_step: u64,
    state: &RunState,
) -> Result<(), String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut ck = TrainingCheckpoint::new(arena)
        .optimizer("optimizer", opt.training())
        .step(global_step)
        .metadata(
            "run",
            serde_json::to_value(state).map_err(err("run state"))?,
        );
    if let Some(s) = sched {
        ck = ck.scheduler("lr", s);
    }
    // A mixed-precision run's bf16 weight copy, as BF16 tensors (`half.copy.<name>`).
    if let Some(copy) = opt.forward_copy() {
        ck = ck.half_buffer("copy", copy);
    }
    ck.save(path)
        .map_err(err(&format!("saving {}", path.display())))?;
    Ok(())
}

/// Reads a run's checkpoint (its metadata, checksums verified) and checks it is this run's,
/// with these settings, before anything is loaded.
fn read_run_state(path: &Path, id: &str, settings: &Settings) -> Result<RunState, String> {
    let info = inspect_training(path).map_err(err(&format!("checkpoint {}", path.display())))?;
    let run = info
        .meta
        .metadata
        .get("run")
        .cloned()
        .ok_or_else(|| "checkpoint has no run state".to_string())?;
    let state: RunState = serde_json::from_value(run).map_err(err("checkpoint run state"))?;
    if state.format != CHECKPOINT_FORMAT || state.run != id {
        return Err("checkpoint is of another format or run".into());
    }
    if state.settings != *settings {
        return Err(format!(
            "checkpoint was written with {:?}, these options give {:?}; use the same options \
             or another --out",
            state.settings, settings
        ));
    }
    Ok(state)
}

/// Restores a freshly built run from its checkpoint in one call (`TrainingRestore::load`:
/// all or nothing; the parameters matched by name). Returns the optimizer step count.
fn load_run(
    path: &Path,
    arena: &mut optarena::Arena<f32>,
    opt: &mut dyn Stepper,
    sched: Option<&mut (dyn LrScheduler + 'static)>,
) -> Result<u64, String> {
    let (training, copy) = opt.training_mut();
    let mut restore = TrainingRestore::new(arena).optimizer("optimizer", training);
    if let Some(copy) = copy {
        restore = restore.half_buffer("copy", copy);
    }
    if let Some(s) = sched {
        restore = restore.scheduler("lr", s);
    }
    let loaded = restore.load(path).map_err(err("loading the checkpoint"))?;
    Ok(loaded.step)
}

/// Builds run `spec` as it starts: model, arena, optimizer, scheduler.
#[allow(clippy::type_complexity)]
fn build_run(
    spec: &RunSpec,
    settings: &Settings,
    parallelism: Parallelism,
) -> Result<
    (
        Mlp,
        optarena::Arena<f32>,
        Box<dyn Stepper>,
        Option<Box<dyn LrScheduler>>,
    ),
    String,
> {
    let ctx = |what: &str| format!("run {}: {what}", spec.id);
    let (model, arena) =
        Mlp::build(&spec.arch, &initial_params(&spec.arch, settings.seed)).map_err(err("model"))?;
    let mut opt = spec
        .opt
        .build(&model, &arena, spec.clip, parallelism, spec.precision)
        .map_err(err(&ctx("optimizer")))?;
    let sched = spec
        .schedule
        .build(opt.groups())
        .map_err(err(&ctx("scheduler")))?;
    Ok((model, arena, opt, sched))
}

/// Reads run `spec`'s checkpoint in `out` into a freshly built run, as `--resume` does, and
/// returns what it restored (for `tests/train_example.rs`).
#[allow(dead_code)]
pub fn read_checkpoint(
    out: &Path,
    spec: &RunSpec,
    settings: &Settings,
) -> Result<Checkpoint, String> {
    let path = checkpoint_path(out, spec.id);
    let state = read_run_state(&path, spec.id, settings)?;
    let (_, mut arena, mut opt, mut sched) = build_run(spec, settings, Parallelism::Sequential)?;
    let global_step = load_run(&path, &mut arena, &mut *opt, sched.as_deref_mut())?;
    Ok(Checkpoint {
        epochs_done: state.epochs_done,
        global_step,
        param_names: arena.infos().iter().map(|i| i.name.clone()).collect(),
        params: arena.params().iter().map(|v| v.to_bits()).collect(),
        optimizer: opt.state_dict_json().map_err(err("state_dict"))?,
        scheduler: sched
            .as_ref()
            .map(|s| s.state_dict_json())
            .transpose()
            .map_err(err("scheduler state_dict"))?,
        rng: state.rng,
        history: state.history,
        copy: opt
            .forward_copy()
            .map(|c| c.as_slice().iter().map(|x| x.to_bits()).collect()),
    })
}

/// A finished (or stopped) run.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// What ran.
    pub spec: RunSpec,
    /// Parameter count of its model.
    pub num_params: usize,
    /// Per-epoch numbers.
    pub history: Vec<EpochStats>,
    /// Time spent.
    pub timing: Timing,
    /// Closure evaluations and iterations, for L-BFGS.
    pub evaluations: Option<(u64, u64)>,
}

/// What [`run`] did.
pub struct Summary {
    /// Every run's result.
    pub results: Vec<RunResult>,
    /// True when `--stop-after-epoch` stopped the runs before their last epoch.
    pub stopped: bool,
    /// Files written (results, curves, plot), when not stopped.
    pub files: Vec<PathBuf>,
}

fn err<E: std::fmt::Display>(context: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{context}: {e}")
}

/// Runs every run (or continues them with `--resume`), then writes the report.
pub fn run(args: &Args) -> Result<Summary, String> {
    let settings = args.settings();
    if [
        settings.epochs,
        settings.batch_size,
        settings.full_batch_steps,
        settings.lbfgs_max_iter,
    ]
    .contains(&0)
    {
        return Err(
            "--epochs, --batch-size, --full-batch-steps and --lbfgs-max-iter must be at least 1"
                .into(),
        );
    }
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(err("thread pool"))?;
    let parallelism = Parallelism::Pool(Arc::new(pool));

    let all = data::load_digits()?;
    let mut split_rng = ChaCha8Rng::seed_from_u64(settings.seed);
    split_rng.set_stream(0);
    let (train, test) = data::split(&all, 0.2, &mut split_rng);
    let interactive = std::io::stderr().is_terminal();
    println!(
        "digits: {} train / {} test images (8x8, 10 classes), seed {}, {} epochs, batch {}, \
         {} thread(s){}",
        train.len(),
        test.len(),
        settings.seed,
        settings.epochs,
        settings.batch_size,
        threads,
        if args.smoke { ", smoke mode" } else { "" }
    );

    let mut results = Vec::new();
    let mut stopped = false;
    if args.precision.is_empty() {
        return Err("--precision needs at least one mode".into());
    }
    for spec in runs(&settings, train.len(), &args.precision) {
        let (result, was_stopped) = train_one(
            &spec,
            &settings,
            args,
            &train,
            &test,
            parallelism.clone(),
            interactive,
        )?;
        stopped |= was_stopped;
        results.push(result);
    }
    let mut files = Vec::new();
    if stopped {
        println!(
            "stopped after epoch {} (--stop-after-epoch); continue with --resume",
            args.stop_after_epoch.unwrap_or(0)
        );
    } else {
        files = report::write_all(&args.out, &settings, &results)?;
    }
    Ok(Summary {
        results,
        stopped,
        files,
    })
}

/// The initial parameters of `arch`, the same for every run of that architecture.
fn initial_params(arch: &Architecture, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(1);
    arch.init(&mut rng)
}

/// The shuffling stream: every run starts from the same one, so every run sees the same batches.
fn shuffle_rng(seed: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(2);
    rng
}

/// Trains one run from scratch or from its checkpoint. Returns its result and whether it was
/// stopped early.
fn train_one(
    spec: &RunSpec,
    settings: &Settings,
    args: &Args,
    train: &Dataset,
    test: &Dataset,
    parallelism: Parallelism,
    interactive: bool,
) -> Result<(RunResult, bool), String> {
    let ctx = |what: &str| format!("run {}: {what}", spec.id);
    let (model, mut arena, mut opt, mut sched) = build_run(spec, settings, parallelism)?;
    let mut rng = shuffle_rng(settings.seed);
    let mut history = Vec::new();
    let mut timing = Timing::default();
    let mut global_step = 0u64;
    let mut start_epoch = 0usize;

    let ckpt_path = checkpoint_path(&args.out, spec.id);
    if args.resume && ckpt_path.exists() {
        // Checked first (this run, these settings), then restored in one call.
        let state = read_run_state(&ckpt_path, spec.id, settings).map_err(|e| ctx(&e))?;
        global_step = load_run(&ckpt_path, &mut arena, &mut *opt, sched.as_deref_mut())
            .map_err(|e| ctx(&e))?;
        rng = state.rng;
        history = state.history;
        timing = state.timing;
        start_epoch = state.epochs_done;
    }

    let steps_per_epoch = spec.steps_per_epoch(settings, train.len());
    let batch_rows = match spec.batching {
        Batching::MiniBatch => settings.batch_size,
        Batching::FullBatch { .. } => train.len(),
    };
    let mut ws = model.workspace(batch_rows.max(256));
    let total_steps = (settings.epochs * steps_per_epoch) as u64;
    let bar = ProgressBar::new(total_steps).with_prefix(spec.label);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>24} [{bar:30.cyan/blue}] {pos:>5}/{len} steps {msg} ({elapsed})",
        )
        .map_err(err("progress style"))?
        .progress_chars("=> "),
    );
    bar.set_position(global_step);
    if start_epoch > 0 {
        let line = format!(
            "{:>24}: resumed after epoch {start_epoch} (step {global_step})",
            spec.label
        );
        if interactive {
            bar.println(line);
        } else {
            println!("{line}");
        }
    }

    if history.is_empty() {
        // Epoch 0: the initial model, the same for every run of an architecture (in its
        // precision: a mixed run evaluates its bf16 weights).
        let ((train_loss, train_acc), (test_loss, test_acc)) =
            with_forward_weights(&*opt, &mut arena, |a| {
                (
                    model.evaluate(a, train, &mut ws),
                    model.evaluate(a, test, &mut ws),
                )
            });
        history.push(EpochStats {
            epoch: 0,
            lr: opt.groups().lr(0).map_err(err(&ctx("lr")))?,
            batch_loss: None,
            train_loss,
            train_acc,
            test_loss,
            test_acc,
        });
    }
    let log_every = settings.epochs.div_ceil(8).max(1);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut stopped = false;
    for epoch in start_epoch..settings.epochs {
        if args.stop_after_epoch.is_some_and(|n| epoch >= n) {
            stopped = true;
            break;
        }
        let t0 = Instant::now();
        let mut opt_time = Duration::ZERO;
        let mut loss_sum = 0.0f64;
        let mut lr = 0.0;
        // This epoch's order of the samples: a fresh permutation from the run's stream (whose
        // state is in the checkpoint), so a resumed run shuffles exactly as an unbroken one.
        order.iter_mut().enumerate().for_each(|(i, o)| *o = i);
        if let Batching::MiniBatch = spec.batching {
            order.shuffle(&mut rng);
        }
        let batches: Box<dyn Iterator<Item = &[usize]>> = match spec.batching {
            Batching::MiniBatch => Box::new(order.chunks(settings.batch_size)),
            Batching::FullBatch { steps } => Box::new(std::iter::repeat_n(&order[..], steps)),
        };
        for batch in batches {
            lr = opt.groups().lr(0).map_err(err(&ctx("lr")))?;
            let mut closure_time = Duration::ZERO;
            let mut closure = |arena: &mut optarena::Arena<f32>| {
                let t = Instant::now();
                arena.zero_grad(true);
                let mut loss = model.loss_and_grad(arena, train, batch, &mut ws);
                if spec.l2 > 0.0 {
                    loss += model.add_l2_penalty(arena, spec.l2 as f32);
                }
                closure_time += t.elapsed();
                loss
            };
            let t = Instant::now();
            let loss = opt
                .step(&mut arena, &mut closure)
                .map_err(err(&ctx("step")))?;
            opt_time += t
                .elapsed()
                .saturating_sub(closure_time + opt.take_emulation_time());
            // torch's order: optimizer.step(), then scheduler.step(), once per batch.
            if let Some(s) = &mut sched {
                s.step(opt.groups()).map_err(err(&ctx("scheduler step")))?;
            }
            loss_sum += f64::from(loss);
            global_step += 1;
            bar.inc(1);
        }
        let ((train_loss, train_acc), (test_loss, test_acc)) =
            with_forward_weights(&*opt, &mut arena, |a| {
                (
                    model.evaluate(a, train, &mut ws),
                    model.evaluate(a, test, &mut ws),
                )
            });
        let stats = EpochStats {
            epoch: epoch + 1,
            lr,
            batch_loss: Some(loss_sum / steps_per_epoch as f64),
            train_loss,
            train_acc,
            test_loss,
            test_acc,
        };
        timing.wall_s += t0.elapsed().as_secs_f64();
        timing.opt_ns += opt_time.as_nanos();
        timing.opt_steps += steps_per_epoch as u64;
        let msg = format!(
            "epoch {:>3}/{}  train loss {:.4}  test loss {:.4}  test acc {:.2}%",
            stats.epoch,
            settings.epochs,
            train_loss,
            test_loss,
            100.0 * test_acc
        );
        bar.set_message(msg.clone());
        if !interactive && (stats.epoch.is_multiple_of(log_every) || stats.epoch == settings.epochs)
        {
            println!("{:>24}: {msg}", spec.label);
        }
        history.push(stats);

        let state = RunState {
            format: CHECKPOINT_FORMAT,
            run: spec.id.to_string(),
            settings: settings.clone(),
            epochs_done: epoch + 1,
            rng: rng.clone(),
            history: history.clone(),
            timing: timing.clone(),
        };
        save_run(
            &ckpt_path,
            &arena,
            &*opt,
            sched.as_deref(),
            global_step,
            &state,
        )
        .map_err(|e| ctx(&e))?;
    }
    bar.finish_and_clear();
    let result = RunResult {
        spec: spec.clone(),
        num_params: spec.arch.num_params(),
        history,
        timing,
        evaluations: opt.evaluations(),
    };
    if let Some(last) = result.history.last() {
        println!(
            "{:>24}: {} epochs  train loss {:.4}  test loss {:.4}  test acc {:.2}%  {:.1} s{}",
            spec.label,
            last.epoch,
            last.train_loss,
            last.test_loss,
            100.0 * last.test_acc,
            result.timing.wall_s,
            if stopped { "  (stopped)" } else { "" }
        );
    }
    Ok((result, stopped))
}
