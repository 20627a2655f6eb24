//! The train example's MLP trained data-parallel over MPI: every rank takes its slice of every
//! mini-batch, `DataParallel` averages the gradients, and every rank applies the same AdamW
//! step (warmup + cosine schedule, clip by the global norm). Rank 0 prints the results table.
//!
//! ```sh
//! cargo build --release --features mpi --example train_mpi
//! mpirun -np 2 target/release/examples/train_mpi            # add --oversubscribe for 3 on 2 cores
//! ```
//! As root, Open MPI also needs `OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1`.
//! Run it with `-np 1` for the single-process baseline: the same batches, schedule and
//! initialisation, so the accuracies are directly comparable.

#[path = "train/data.rs"]
mod data;
// The logistic model and the L2 penalty of the train example are not used here.
#[allow(dead_code)]
#[path = "train/model.rs"]
mod model;

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use optarena::distributed::{Communicator, DataParallel, MpiComm};
use optarena::schedule::{
    CosineAnnealingLR, CosineAnnealingLRConfig, LinearLR, LinearLRConfig, SequentialLR,
    SequentialLRConfig,
};
use optarena::{AdamW, AdamWConfig, ClipNorm, LrScheduler, ParamGroup, StepOptions};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use model::{Architecture, Mlp};

#[derive(Parser, Debug)]
#[command(about = "Data-parallel MLP training over MPI (run under mpirun)")]
struct Args {
    /// Passes over the training set.
    #[arg(long, default_value_t = 32)]
    epochs: usize,
    /// Global mini-batch size, split over the ranks.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Seed of the split, the initialisation and the shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Hidden layer widths.
    #[arg(long, value_delimiter = ',', default_values_t = [256, 256])]
    hidden: Vec<usize>,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let comm = MpiComm::init()?;
    let (rank, ranks) = (comm.rank(), comm.size());
    if args.epochs == 0 || args.batch_size < ranks {
        return Err(
            "--epochs must be positive and --batch-size at least the number of ranks".into(),
        );
    }
    // Every rank builds the same split, initialisation and shuffle stream.
    let all = data::load_digits()?;
    let mut split_rng = ChaCha8Rng::seed_from_u64(args.seed);
    split_rng.set_stream(0);
    let (train, test) = data::split(&all, 0.2, &mut split_rng);
    let arch = Architecture::mlp(&args.hidden);
    let mut init_rng = ChaCha8Rng::seed_from_u64(args.seed);
    init_rng.set_stream(1);
    let (mlp, mut arena) = Mlp::build(&arch, &arch.init(&mut init_rng))?;
    let mut shuffle = ChaCha8Rng::seed_from_u64(args.seed);
    shuffle.set_stream(2);

    // torch's recipe: decay on the weights, none on the biases.
    let mut opt = AdamW::<f32>::new(
        &arena,
        [
            ParamGroup::new(mlp.weights.clone()).with("weight_decay", 0.05),
            ParamGroup::new(mlp.biases.clone()).with("weight_decay", 0.0),
        ],
        AdamWConfig::default().with_lr(2e-3),
    )?;
    let steps_per_epoch = train.len().div_ceil(args.batch_size);
    let total = (args.epochs * steps_per_epoch) as i64;
    let warmup = (total / 20).max(1);
    let linear = LinearLR::new(
        &mut opt,
        LinearLRConfig::new()
            .with_start_factor(1.0 / warmup as f64)
            .with_end_factor(1.0)
            .with_total_iters(warmup),
    )?;
    let cosine = CosineAnnealingLR::new(
        &mut opt,
        CosineAnnealingLRConfig::new((total - warmup).max(1)).with_eta_min(2e-5),
    )?;
    let mut sched = SequentialLR::new(
        &mut opt,
        vec![Box::new(linear), Box::new(cosine)],
        SequentialLRConfig::new(vec![warmup]),
    )?;
    let mut dp = DataParallel::new(comm, &arena, &opt)?;
    let options = StepOptions {
        clip: Some(ClipNorm::l2(1.0)),
        ..StepOptions::default()
    };

    let mut ws = mlp.workspace(args.batch_size.max(256));
    let (mut opt_time, mut opt_steps) = (std::time::Duration::ZERO, 0u64);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let t0 = Instant::now();
    if rank == 0 {
        println!(
            "digits: {} train / {} test, {ranks} rank(s), global batch {}, {} epochs, AdamW + \
             warmup/cosine + clip 1.0",
            train.len(),
            test.len(),
            args.batch_size,
            args.epochs
        );
        println!("| epoch | lr | train loss | train acc | test loss | test acc |");
        println!("|---:|---:|---:|---:|---:|---:|");
    }
    for epoch in 1..=args.epochs {
        order.iter_mut().enumerate().for_each(|(i, o)| *o = i);
        order.shuffle(&mut shuffle);
        for batch in order.chunks(args.batch_size) {
            // This rank's contiguous slice of the global batch.
            let mine = &batch[rank * batch.len() / ranks..(rank + 1) * batch.len() / ranks];
            arena.zero_grad(true);
            if !mine.is_empty() {
                mlp.loss_and_grad(&mut arena, &train, mine, &mut ws);
            }
            let t = Instant::now();
            dp.step_with_options(&mut opt, &mut arena, options)?;
            opt_time += t.elapsed();
            opt_steps += 1;
            sched.step(&mut opt)?;
        }
        if rank == 0 && (epoch % 4 == 0 || epoch == args.epochs) {
            let (train_loss, train_acc) = mlp.evaluate(&arena, &train, &mut ws);
            let (test_loss, test_acc) = mlp.evaluate(&arena, &test, &mut ws);
            println!(
                "| {epoch} | {:.2e} | {train_loss:.4} | {:.2}% | {test_loss:.4} | {:.2}% |",
                opt.lr(0)?,
                100.0 * train_acc,
                100.0 * test_acc
            );
        }
    }
    if rank == 0 {
        // The train example's results table (its columns, one row).
        let (train_loss, train_acc) = mlp.evaluate(&arena, &train, &mut ws);
        let (test_loss, test_acc) = mlp.evaluate(&arena, &test, &mut ws);
        let label = format!("MLP AdamW, {ranks} rank(s)");
        println!();
        println!(
            "| run                    | params | train loss | train acc | test loss | test acc | wall s | opt µs/step |"
        );
        println!(
            "|------------------------|-------:|-----------:|----------:|----------:|---------:|-------:|------------:|"
        );
        println!(
            "| {label:<22} | {:>6} | {train_loss:>10.4} | {:>8.2}% | {test_loss:>9.4} | {:>7.2}% | {:>6.2} | {:>11.1} |",
            arena.len(),
            100.0 * train_acc,
            100.0 * test_acc,
            t0.elapsed().as_secs_f64(),
            opt_time.as_secs_f64() * 1e6 / opt_steps.max(1) as f64
        );
        println!(
            "rank 0 sends {} bytes per step (2 (N-1)/N of the gradients, plus presence flags)",
            dp.bytes_sent_per_step()
        );
    }
    Ok(())
}
