//! Steps as a training loop sees them, Adam and SGD-momentum in f32 at 16K, 85K (the digits
//! MLP of `examples/train`) and 1M elements, sequential and on the global pool:
//!
//! - `realistic_grads/<optimizer>/f32/<seq|par>_<random|realistic>/<n>`: back-to-back steps
//!   on the usual synthetic gradients and on [`realistic::gradients`], whose tail of tiny values
//!   drives Adam's `exp_avg_sq` into subnormal numbers.
//! - `idle_pool/<optimizer>/f32/<seq|par>/<n>`: about 1 ms of busy work on the calling thread
//!   before every step, as forward and backward, so the pool's threads fall asleep between
//!   steps; only the step is timed (`iter_custom`).

use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion, SamplingMode, Throughput};
use optarena::Parallelism;

use super::realistic;
use super::setup::{arena, optimizer};

/// 16K, the digits MLP's 85,002 parameters (64→256→256→10), 1M.
const SIZES: &[usize] = &[16 << 10, 85_002, 1 << 20];

const OPTIMIZERS: &[&str] = &["adam", "sgd_momentum"];

/// The calling thread's work between two steps in `idle_pool`.
const IDLE: Duration = Duration::from_millis(1);

fn modes() -> [(&'static str, Parallelism); 2] {
    [
        ("seq", Parallelism::Sequential),
        ("par", Parallelism::Global),
    ]
}

fn realistic_grads(c: &mut Criterion) {
    for &name in OPTIMIZERS {
        let mut group = c.benchmark_group(format!("realistic_grads/{name}/f32"));
        for &n in SIZES {
            group.throughput(Throughput::Elements(n as u64));
            for grads in ["random", "realistic"] {
                let mut a = arena::<f32>(&[("w".to_string(), vec![n])]);
                if grads == "realistic" {
                    let values = realistic::gradients(n, realistic::GRADIENT_SEED);
                    for (g, v) in a.grads_mut().iter_mut().zip(values) {
                        *g = v as f32;
                    }
                }
                for (mode, par) in modes() {
                    let mut opt = optimizer::<f32>(name, &a, par);
                    opt.step(&mut a);
                    group.bench_with_input(
                        BenchmarkId::new(format!("{mode}_{grads}"), n),
                        &n,
                        |b, _| b.iter(|| opt.step(&mut a)),
                    );
                }
            }
        }
        group.finish();
    }
}

fn idle_pool(c: &mut Criterion) {
    for &name in OPTIMIZERS {
        let mut group = c.benchmark_group(format!("idle_pool/{name}/f32"));
        // Criterion plans its iterations from the timed part alone, and each iteration also
        // spends IDLE untimed: short warm-up and measurement budgets keep the wall time to a
        // few seconds per benchmark (about 10,000 iterations for a 5 µs step).
        group.sampling_mode(SamplingMode::Flat);
        group.sample_size(10);
        group.warm_up_time(Duration::from_millis(20));
        group.measurement_time(Duration::from_millis(50));
        for &n in SIZES {
            group.throughput(Throughput::Elements(n as u64));
            let mut a = arena::<f32>(&[("w".to_string(), vec![n])]);
            for (mode, par) in modes() {
                let mut opt = optimizer::<f32>(name, &a, par);
                opt.step(&mut a);
                group.bench_with_input(BenchmarkId::new(mode, n), &n, |b, _| {
                    b.iter_custom(|iters| {
                        let mut timed = Duration::ZERO;
                        for _ in 0..iters {
                            realistic::busy_work(IDLE);
                            let t = Instant::now();
                            opt.step(&mut a);
                            timed += t.elapsed();
                        }
                        timed
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, realistic_grads, idle_pool);
