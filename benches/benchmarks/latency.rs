//! Step latency of a 16K-element adapter on one thread: criterion's estimate, plus the median
//! and p99 of individually timed steps, printed.

use std::time::Instant;

use criterion::{criterion_group, Criterion};
use optarena::Parallelism;

use super::setup::{arena, optimizer};

fn adapter(c: &mut Criterion) {
    let shapes = vec![
        ("adapter.down".to_string(), vec![64, 128]),
        ("adapter.up".to_string(), vec![128, 64]),
        ("adapter.bias".to_string(), vec![64]),
    ];
    let mut a = arena::<f32>(&shapes);
    for name in ["adamw", "sgd_momentum"] {
        let mut opt = optimizer::<f32>(name, &a, Parallelism::Sequential);
        opt.step(&mut a);
        let mut times: Vec<f64> = (0..20_000)
            .map(|_| {
                let t = Instant::now();
                opt.step(&mut a);
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        times.sort_by(f64::total_cmp);
        println!(
            "latency/adapter16k/{name}: median {:.2} µs, p99 {:.2} µs, max {:.2} µs over {} steps",
            times[times.len() / 2],
            times[times.len() * 99 / 100],
            times[times.len() - 1],
            times.len()
        );
        c.bench_function(&format!("latency/adapter16k/{name}"), |b| {
            b.iter(|| opt.step(&mut a))
        });
    }
}

criterion_group!(benches, adapter);
