//! The crate's main job: train a small MLP on a real data set (the UCI handwritten digits,
//! shipped in `examples/data`) with SGD+momentum, Adam, AdamW and RAdam from one
//! initialisation, plus a full-batch logistic regression by L-BFGS, and compare them; and
//! train the AdamW run again in mixed precision (`--precision f32,mixed`, the default: mode 2,
//! f32 master weights and state, bf16 gradients from the backward on the bf16 weight copy,
//! `Optimizer::step_mixed` writing the next copy), its test accuracy shown next to f32's.
//!
//! ```sh
//! cargo run --release --example train                # everything, well under a minute
//! cargo run --release --example train -- --smoke     # a few seconds, for CI
//! cargo run --release --example train -- --help
//! ```
//!
//! Writes to `--out` (default `out/`): `results.md` (the table also printed here),
//! `history.csv` (per-epoch curves), `training.svg` (loss and accuracy plot) and
//! `checkpoints/<run>.safetensors` (after every epoch, one call to optarena's
//! `TrainingCheckpoint::save`, atomic: parameters by name, optimizer and scheduler state, step
//! count, the mixed run's bf16 weight copy as BF16 tensors, and as metadata the shuffling RNG
//! and the curves so far). `--stop-after-epoch N`
//! interrupts every run after epoch N; `--resume` continues from the checkpoints (one
//! `TrainingRestore::load` each, all or nothing) and ends bit for bit where an uninterrupted
//! run ends, on any `--threads`.
//!
//! The model's forward and backward (ndarray/matrixmultiply) write the gradients straight into
//! the optarena arena. Each MLP step clips by global norm inside the fused update and runs on a
//! rayon pool of `--threads` threads (bitwise the same for any count); its learning rate comes
//! from optarena's schedulers, `SequentialLR` of a `LinearLR` warmup and a
//! `CosineAnnealingLR`, stepped after every optimizer step. The logistic regression
//! (L2-regularized as scikit-learn's default) takes one full-batch `LBFGS::step(closure)` per
//! epoch with the strong Wolfe line search.

mod data;
mod model;
mod optimizers;
mod report;
mod runner;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = runner::Args::parse();
    let t0 = std::time::Instant::now();
    match runner::run(&args) {
        Ok(summary) => {
            if !summary.stopped {
                let best = summary
                    .results
                    .iter()
                    .filter_map(|r| r.history.last().map(|h| (h.test_acc, r.spec.label)));
                if let Some((acc, label)) = best.max_by(|a, b| a.0.total_cmp(&b.0)) {
                    println!("best test accuracy: {:.2}% ({label})", 100.0 * acc);
                }
                for f in &summary.files {
                    println!("wrote {}", f.display());
                }
                println!("total time {:.1} s", t0.elapsed().as_secs_f64());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
