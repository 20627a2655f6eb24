//! The training example (`examples/train`) in smoke mode: the loss falls, every file is written,
//! the MLP runs follow the warmup + cosine schedule of optarena's schedulers and the logistic
//! regression runs L-BFGS, and a run interrupted after an epoch and resumed (on another thread
//! count) ends bit for bit where an uninterrupted run ends: parameters, optimizer state (L-BFGS's
//! history included), scheduler state and curves.
//!
//! The example's modules are compiled into this test (`#[path]`), so the test runs exactly the
//! code `cargo run --release --example train` runs, without a nested cargo.

#[path = "../examples/train/data.rs"]
mod data;
#[path = "../examples/train/model.rs"]
mod model;
#[path = "../examples/train/optimizers.rs"]
mod optimizers;
#[path = "../examples/train/report.rs"]
mod report;
#[path = "../examples/train/runner.rs"]
mod runner;

use std::path::Path;

use clap::Parser;
use optimizers::{LrSchedule, OptKind, Precision};
use runner::{checkpoint_path, Args, Checkpoint};
use serde_json::Value;

fn args(out: &Path, extra: &[&str]) -> Args {
    let mut argv = vec![
        "train",
        "--smoke",
        "--out",
        out.to_str().expect("utf-8 path"),
    ];
    argv.extend_from_slice(extra);
    Args::try_parse_from(argv).expect("valid options")
}

/// Run `spec`'s checkpoint in `out`, loaded (in one call, as `--resume` does) into a freshly
/// built run.
fn load(out: &Path, spec: &runner::RunSpec) -> Checkpoint {
    assert!(checkpoint_path(out, spec.id).exists(), "checkpoint written");
    runner::read_checkpoint(out, spec, &args(out, &[]).settings()).expect("checkpoint loads")
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).expect("valid JSON")
}

#[test]
fn smoke_run_learns_writes_files_and_resumes_bitwise() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let full = tmp.path().join("full");
    let split = tmp.path().join("split");

    // 1. Uninterrupted.
    let summary = runner::run(&args(&full, &["--threads", "2"])).expect("smoke run");
    assert!(!summary.stopped);
    assert_eq!(
        summary.results.len(),
        7,
        "four MLP runs, logistic regression, and AdamW again in modes 2 and 3"
    );
    for r in &summary.results {
        let first = &r.history[0];
        let last = r.history.last().expect("history");
        assert_eq!(first.epoch, 0);
        assert_eq!(last.epoch, 5);
        assert!(
            last.train_loss < 0.5 * first.train_loss && last.test_loss < 0.5 * first.test_loss,
            "{}: loss did not fall: {first:?} -> {last:?}",
            r.spec.label
        );
        assert!(
            last.test_acc > 0.85,
            "{}: test accuracy {}",
            r.spec.label,
            last.test_acc
        );
        assert!(r.timing.opt_steps > 0 && r.timing.wall_s > 0.0);
    }
    // Every MLP run starts from the same initialisation.
    let e0: Vec<_> = summary.results[..4]
        .iter()
        .map(|r| {
            let h = &r.history[0];
            (h.train_loss, h.train_acc, h.test_loss, h.test_acc)
        })
        .collect();
    assert!(e0.windows(2).all(|w| w[0] == w[1]), "{e0:?}");

    // The MLP runs' lr comes from SequentialLR(LinearLR, CosineAnnealingLR), stepped per batch:
    // base/warmup before the first step, the peak after the warmup, near eta_min at the end.
    for r in &summary.results[..4] {
        let LrSchedule::WarmupCosine {
            warmup,
            total,
            eta_min,
        } = r.spec.schedule
        else {
            panic!("{}: no warmup + cosine schedule", r.spec.id);
        };
        let base = r.spec.opt.lr();
        let lrs: Vec<f64> = r.history.iter().map(|h| h.lr).collect();
        assert_eq!(
            lrs[0],
            base * (1.0 / warmup as f64),
            "{}: {lrs:?}",
            r.spec.id
        );
        assert!(lrs[1] > lrs[4] && lrs[4] > lrs[5], "{}: {lrs:?}", r.spec.id);
        assert!(lrs.iter().all(|&lr| lr <= base), "{}: {lrs:?}", r.spec.id);
        // The last step's lr is the cosine one step before its end.
        let t_max = (total - warmup) as f64;
        let last = eta_min
            + (base - eta_min) * (1.0 + (std::f64::consts::PI * (t_max - 1.0) / t_max).cos()) / 2.0;
        assert!(
            ((lrs[5] - last) / last).abs() < 1e-9,
            "{}: {} vs {last}",
            r.spec.id,
            lrs[5]
        );
        let ck = load(&full, &r.spec);
        let sched = json(ck.scheduler.as_deref().expect("scheduler state saved"));
        assert_eq!(sched["scheduler"], "SequentialLR");
        assert_eq!(sched["last_epoch"], ck.global_step);
        assert_eq!(sched["_schedulers"][0]["scheduler"], "LinearLR");
        assert_eq!(sched["_schedulers"][1]["scheduler"], "CosineAnnealingLR");
    }
    // The logistic regression: full-batch L-BFGS with the strong Wolfe line search, no
    // scheduler.
    let logreg = &summary.results[4];
    assert!(matches!(logreg.spec.opt, OptKind::LBFGS { .. }));
    assert!(logreg.history.iter().all(|h| h.lr == 1.0));
    let ck = load(&full, &logreg.spec);
    assert!(ck.scheduler.is_none());
    let lbfgs = json(&ck.optimizer);
    assert_eq!(lbfgs["optimizer"], "LBFGS");
    assert_eq!(
        lbfgs["param_groups"][0]["hyperparams"]["line_search_fn"],
        "strong_wolfe"
    );
    let (evals, iters) = logreg.evaluations.expect("L-BFGS counts evaluations");
    assert_eq!(lbfgs["state"]["func_evals"], evals);
    assert_eq!(lbfgs["state"]["n_iter"], iters);
    assert!(
        iters > 5 && evals >= iters,
        "{evals} evaluations, {iters} iterations"
    );

    for name in ["results.md", "history.csv", "training.svg"] {
        let path = full.join(name);
        assert!(summary.files.contains(&path), "{name} not reported");
        let text = std::fs::read_to_string(&path).expect(name);
        assert!(!text.is_empty(), "{name} is empty");
    }
    let svg = std::fs::read_to_string(full.join("training.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("MLP AdamW") && svg.contains("test accuracy"));
    let md = std::fs::read_to_string(full.join("results.md")).unwrap();
    for label in [
        "MLP SGD+momentum",
        "MLP Adam",
        "MLP AdamW",
        "MLP RAdam",
        "LogReg",
    ] {
        assert!(md.contains(label), "results.md lacks {label}");
    }
    let csv = std::fs::read_to_string(full.join("history.csv")).unwrap();
    assert_eq!(
        csv.lines().count(),
        1 + 7 * 6,
        "header + 7 runs x epochs 0..=5"
    );
    // Mode 2 (f32 master weights, bf16 gradients and weight copy) next to its f32 twin: the
    // same optimizer, schedule and initialisation, and nearly the same accuracy; its bf16
    // copy is in the checkpoint as BF16 tensors.
    let (adamw, mixed) = (&summary.results[2], &summary.results[5]);
    assert_eq!(adamw.spec.id, "adamw");
    assert_eq!(mixed.spec.id, "adamw-mixed");
    assert_eq!(mixed.spec.precision, Precision::Mixed);
    assert_eq!(mixed.spec.opt.describe(), adamw.spec.opt.describe());
    let (a, m) = (
        adamw.history.last().unwrap().test_acc,
        mixed.history.last().unwrap().test_acc,
    );
    assert!((a - m).abs() < 0.015, "f32 {a} vs mixed {m}");
    assert!(md.contains("MLP AdamW mixed bf16") && md.contains("mode 2"));
    let ck = load(&full, &mixed.spec);
    let copy = ck
        .copy
        .expect("the bf16 copy is restored from the checkpoint");
    let want: Vec<u16> = ck
        .params
        .iter()
        .map(|&b| half::bf16::from_f32(f32::from_bits(b)).to_bits())
        .collect();
    assert_eq!(copy, want, "the copy is the master weights rounded to bf16");
    let info =
        optarena::checkpoint::training::inspect_training(checkpoint_path(&full, "adamw-mixed"))
            .unwrap();
    assert!(info
        .tensors
        .iter()
        .any(|t| t.name == "half.copy.fc1.weight" && t.dtype == safetensors::Dtype::BF16));
    // Mode 3 (bf16 weights and moments, stochastic rounding, no master copy): it learns (checked
    // above for every run), its weights are the bf16 copy (the arena mirrors them exactly), and
    // its checkpoint holds them and the moments as BF16 tensors.
    let sr = &summary.results[6];
    assert_eq!(sr.spec.id, "adamw-bf16-sr");
    assert_eq!(sr.spec.precision, Precision::Bf16Sr);
    assert_eq!(sr.spec.opt.describe(), adamw.spec.opt.describe());
    assert!(md.contains("MLP AdamW bf16 SR") && md.contains("mode 3"));
    let ck = load(&full, &sr.spec);
    let copy = ck.copy.expect("the bf16 weights are in the checkpoint");
    let widened: Vec<u32> = copy.iter().map(|&b| (b as u32) << 16).collect();
    assert_eq!(
        widened, ck.params,
        "the arena mirrors the bf16 weights exactly"
    );
    let info =
        optarena::checkpoint::training::inspect_training(checkpoint_path(&full, "adamw-bf16-sr"))
            .unwrap();
    let bf16_tensors = info
        .tensors
        .iter()
        .filter(|t| t.dtype == safetensors::Dtype::BF16)
        .count();
    assert!(
        bf16_tensors > 2 * 4,
        "weights and both moments of every parameter in BF16, found {bf16_tensors}"
    );

    // 2. Interrupted after epoch 2: checkpoints, no report yet, no temporary files left.
    let stopped = runner::run(&args(
        &split,
        &["--stop-after-epoch", "2", "--threads", "3"],
    ))
    .expect("interrupted run");
    assert!(stopped.stopped);
    assert!(stopped.files.is_empty());
    assert!(!split.join("results.md").exists());
    for r in &summary.results {
        let ck = load(&split, &r.spec);
        assert_eq!(ck.epochs_done, 2);
        // Mid-schedule and mid-optimization: the resume below has real state to restore.
        if let Some(s) = &ck.scheduler {
            assert_eq!(json(s)["last_epoch"], ck.global_step);
        }
    }
    let lbfgs = json(&load(&split, &summary.results[4].spec).optimizer);
    let history = lbfgs["state"]["old_dirs"]
        .as_array()
        .expect("L-BFGS history saved");
    assert!(
        !history.is_empty(),
        "no correction pairs at the interruption"
    );
    assert!(lbfgs["state"]["d"].is_array() && lbfgs["state"]["prev_flat_grad"].is_array());
    let leftovers: Vec<_> = std::fs::read_dir(split.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.ends_with(".safetensors"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    // Resuming with other options is refused rather than silently diverging.
    let refused = runner::run(&args(&split, &["--resume", "--epochs", "6"]));
    assert!(refused.is_err());

    // 3. Resumed on one thread: bitwise the same end as the uninterrupted two-thread run.
    let resumed = runner::run(&args(&split, &["--resume", "--threads", "1"])).expect("resume");
    assert!(!resumed.stopped);
    for r in &summary.results {
        let a = load(&full, &r.spec);
        let b = load(&split, &r.spec);
        assert_eq!(a.epochs_done, 5);
        assert_eq!(b.epochs_done, 5);
        assert_eq!(a.global_step, b.global_step);
        assert_eq!(a.param_names, b.param_names);
        assert!(
            a.params == b.params,
            "{}: parameters differ after resume",
            r.spec.id
        );
        assert_eq!(a.optimizer, b.optimizer, "{}: optimizer state", r.spec.id);
        assert_eq!(a.scheduler, b.scheduler, "{}: scheduler state", r.spec.id);
        assert_eq!(
            serde_json::to_string(&a.rng).unwrap(),
            serde_json::to_string(&b.rng).unwrap()
        );
        assert_eq!(a.history, b.history, "{}: curves", r.spec.id);
        assert_eq!(a.copy, b.copy, "{}: bf16 copy", r.spec.id);
    }
    assert_eq!(
        std::fs::read_to_string(full.join("history.csv")).unwrap(),
        std::fs::read_to_string(split.join("history.csv")).unwrap()
    );
}
