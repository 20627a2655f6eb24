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
//! - `pool, idle, spin`: as `pool, idle`, but after every step each worker spins for
//!   `--spin-us` (polling `rayon::yield_now`, so it takes the next step at once if it comes
//!   in time) before it may sleep: the "spin before sleep" remedy, built from rayon's public
//!   API. Its price is CPU taken from the caller's own work, which the last column shows.
//!
//! Each cell is the median over the rounds of the step alone, except `loop µs/iter (inline →
//! spin)`: the whole iteration, the fixed busy work (calibrated to `--idle-us` on a quiet
//! thread) plus the step, inline against with spinning workers. A training loop is the idle
//! case, so the threshold is the smallest size where `pool, idle` beats `inline`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use optarena::{
    Adam, AdamConfig, Arena, ArenaBuilder, ClipNorm, Optimizer, Parallelism, ParamGroup, SGDConfig,
    SGD,
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
    /// How long each worker spins after a step in the `spin` column, in µs.
    #[arg(long, default_value_t = 2000)]
    spin_us: u64,
}

/// A fixed amount of work on the calling thread (a stand-in for a forward and backward pass):
/// `rounds` rounds of a dependent multiply chain.
fn busy(rounds: u64) {
    let mut x = 1u64;
    for _ in 0..rounds {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}

/// Rounds of [`busy`] that take `d` on this thread when nothing competes for the core.
fn calibrate(d: Duration) -> u64 {
    if d.is_zero() {
        return 0;
    }
    let probe = 1 << 20;
    let best = (0..5)
        .map(|_| {
            let t = Instant::now();
            busy(probe);
            t.elapsed()
        })
        .min()
        .unwrap_or(Duration::from_millis(1));
    (probe as f64 * d.as_secs_f64() / best.as_secs_f64().max(1e-9)) as u64
}

/// After each step: every worker of `pool` spins for `spin`, running any job that arrives
/// meanwhile (`yield_now`), before it may fall asleep.
fn spin_workers(pool: &rayon::ThreadPool, spin: Duration) {
    pool.spawn_broadcast(move |_| {
        let t = Instant::now();
        while t.elapsed() < spin {
            if rayon::yield_now() != Some(rayon::Yield::Executed) {
                std::hint::spin_loop();
            }
        }
    });
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

/// Median of `values`.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Median step time and median iteration time (busy work + step), in µs, over `steps` steps
/// with `idle_rounds` of [`busy`] work before each.
fn median_us(steps: usize, idle_rounds: u64, mut step: impl FnMut()) -> (f64, f64) {
    for _ in 0..10 {
        step();
    }
    let (step_times, iteration_times) = (0..steps)
        .map(|_| {
            let start = Instant::now();
            busy(idle_rounds);
            let t = Instant::now();
            step();
            let end = Instant::now();
            (
                (end - t).as_secs_f64() * 1e6,
                (end - start).as_secs_f64() * 1e6,
            )
        })
        .unzip();
    (median(step_times), median(iteration_times))
}

/// One row: inline, hot pool, idle pool, idle pool with spinning workers (step µs), then the
/// iteration µs inline and with spinning workers.
fn measure<A: optarena::Algorithm>(
    mut opt: Optimizer<f32, A>,
    arena: &mut Arena<f32>,
    pool: &Arc<rayon::ThreadPool>,
    idle_rounds: u64,
    args: &Args,
) -> [f64; 6] {
    let clip = ClipNorm::l2(1.0);
    let spin = Duration::from_micros(args.spin_us);
    let mut cell = |parallelism: Parallelism, idle_rounds: u64, spin: Option<Duration>| {
        opt.set_parallelism(parallelism);
        opt.set_parallel_threshold(0);
        median_us(args.steps, idle_rounds, || {
            opt.step_with_options(arena, optarena::StepOptions::new().clipped(clip))
                .expect("step");
            if let Some(spin) = spin {
                spin_workers(pool, spin);
            }
        })
    };
    let on_pool = Parallelism::Pool(pool.clone());
    let (inline, inline_iteration) = cell(Parallelism::Sequential, idle_rounds, None);
    let (hot, _) = cell(on_pool.clone(), 0, None);
    let (idle, _) = cell(on_pool.clone(), idle_rounds, None);
    let (spinning, spinning_iteration) = cell(on_pool, idle_rounds, Some(spin));
    [
        inline,
        hot,
        idle,
        spinning,
        inline_iteration,
        spinning_iteration,
    ]
}

fn row(name: &str, n: usize, [inline, hot, idle, spin, loop_inline, loop_spin]: [f64; 6]) {
    println!(
        "| {name} | {n} | {inline:.1} | {hot:.1} | {idle:.1} | {spin:.1} | {:.2} | {loop_inline:.0} → {loop_spin:.0} |",
        idle / inline
    );
}

fn main() {
    let args = Args::parse();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build()
        .expect("thread pool");
    let pool = Arc::new(pool);
    let idle_rounds = calibrate(Duration::from_micros(args.idle_us));
    println!(
        "clip + step, f32, median of {} steps; pool of {} threads; idle: {} µs of busy work \
         between steps; spin: {} µs",
        args.steps, args.threads, args.idle_us, args.spin_us
    );
    println!(
        "| optimizer | elements | inline µs | pool, hot µs | pool, idle µs | pool, idle, spin µs \
         | idle pool / inline | loop µs/iter (inline → spin) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for n in [16usize, 32, 64, 128, 256, 512, 1024, 2048, 4096].map(|k| k * 1024) {
        let mut a = arena(n);
        let adam = Adam::new(&a, [ParamGroup::all()], AdamConfig::default()).expect("Adam");
        row("Adam", n, measure(adam, &mut a, &pool, idle_rounds, &args));
        let mut a = arena(n);
        let config = SGDConfig::default().with_momentum(0.9);
        let sgd = SGD::new(&a, [ParamGroup::all()], config).expect("SGD");
        row(
            "SGD-momentum",
            n,
            measure(sgd, &mut a, &pool, idle_rounds, &args),
        );
    }
}
