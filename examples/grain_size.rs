//! Where a step starts to repay a hand-off to the thread pool: the measurement behind
//! `optarena::parallel::PARALLEL_THRESHOLD`.
//!
//! ```sh
//! cargo run --release --example grain_size              # 2 pool threads, 1 ms of idle work
//! cargo run --release --example grain_size -- --threads 4 --idle-us 500
//! ```
//!
//! For each arena size it times one clipped step (`clip_grad_norm_` folded in, as
//! `examples/train` steps) of Adam and SGD with momentum, f32, three ways:
//! - `inline`: on the calling thread (`Parallelism::Sequential`);
//! - `pool, hot`: on a rayon pool, steps back to back, so the workers are awake;
//! - `pool, idle`: on the same pool with `--idle-us` of busy work on the calling thread
//!   between two steps, as a forward and backward pass would do; the workers fall asleep and
//!   every step must wake them.
//!
//! Only the step is timed; each cell is the median over the rounds. A training loop is the
//! idle case, so the threshold is the smallest size where `pool, idle` beats `inline`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use optarena::{
    Adam, AdamConfig, Arena, ArenaBuilder, ClipNorm, Optimizer, Parallelism, ParamGroup, Sgd,
    SgdConfig,
};

#[derive(Parser)]
struct Args {
    /// Threads of the rayon pool.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Busy work on the calling thread between two steps, in µs, for the idle column.
    #[arg(long, default_value_t = 1000)]
    idle_us: u64,
    /// Timed steps per cell.
    #[arg(long, default_value_t = 200)]
    steps: usize,
}

/// Spins on the calling thread for `d` (a stand-in for a forward and backward pass).
fn busy(d: Duration) {
    let t = Instant::now();
    let mut x = 1u64;
    while t.elapsed() < d {
        for _ in 0..64 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

/// An arena of `n` parameters holding deterministic values of ordinary scale, and gradients.
fn arena(n: usize) -> Arena<f32> {
    let mut b = ArenaBuilder::<f32>::new();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
    };
    let values: Vec<f32> = (0..n).map(|_| next()).collect();
    b.param("w", &[n], &values).expect("valid parameter");
    let mut arena = b.build();
    for g in arena.grads_mut() {
        *g = next() * 1e-2;
    }
    arena
}

/// Median step time in µs of `step` over `steps` steps, with `idle` between them.
fn median_us(steps: usize, idle: Duration, mut step: impl FnMut()) -> f64 {
    for _ in 0..10 {
        step();
    }
    let mut times: Vec<f64> = (0..steps)
        .map(|_| {
            if !idle.is_zero() {
                busy(idle);
            }
            let t = Instant::now();
            step();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn measure<A: optarena::Algorithm>(
    mut opt: Optimizer<f32, A>,
    arena: &mut Arena<f32>,
    pool: &Parallelism,
    args: &Args,
) -> [f64; 3] {
    let clip = ClipNorm::l2(1.0);
    let idle = Duration::from_micros(args.idle_us);
    let mut cell = |parallelism: Parallelism, idle: Duration| {
        opt.set_parallelism(parallelism);
        opt.set_parallel_threshold(0);
        median_us(args.steps, idle, || {
            opt.step_clipped(arena, clip).expect("step");
        })
    };
    [
        cell(Parallelism::Sequential, idle),
        cell(pool.clone(), Duration::ZERO),
        cell(pool.clone(), idle),
    ]
}

fn main() {
    let args = Args::parse();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build()
        .expect("thread pool");
    let pool = Parallelism::Pool(Arc::new(pool));
    println!(
        "clip + step, f32, median of {} steps; pool of {} threads; idle: {} µs of busy work \
         between steps",
        args.steps, args.threads, args.idle_us
    );
    println!(
        "| optimizer | elements | inline µs | pool, hot µs | pool, idle µs | idle pool / inline |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for n in [16usize, 32, 64, 128, 256, 512, 1024, 2048, 4096].map(|k| k * 1024) {
        let mut a = arena(n);
        let adam = Adam::new(&a, [ParamGroup::all()], AdamConfig::default()).expect("Adam");
        let [inline, hot, idle] = measure(adam, &mut a, &pool, &args);
        println!(
            "| Adam | {n} | {inline:.1} | {hot:.1} | {idle:.1} | {:.2} |",
            idle / inline
        );
        let mut a = arena(n);
        let config = SgdConfig {
            momentum: 0.9,
            ..Default::default()
        };
        let sgd = Sgd::new(&a, [ParamGroup::all()], config).expect("SGD");
        let [inline, hot, idle] = measure(sgd, &mut a, &pool, &args);
        println!(
            "| SGD-momentum | {n} | {inline:.1} | {hot:.1} | {idle:.1} | {:.2} |",
            idle / inline
        );
    }
}
