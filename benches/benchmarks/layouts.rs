//! A realistic layout: GPT-2 small's 148 parameter tensors (124M parameters), one AdamW step.

use criterion::{criterion_group, Criterion, Throughput};
use optarena::Parallelism;

use super::setup::{arena, optimizer};

pub use super::gpt2_layout::gpt2_small;

fn gpt2(c: &mut Criterion) {
    let shapes = gpt2_small();
    assert_eq!(shapes.len(), 148);
    let n: usize = shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert_eq!(n, 124_439_808);
    let mut a = arena::<f32>(&shapes);
    let mut group = c.benchmark_group("gpt2_small");
    group.sample_size(10);
    group.throughput(Throughput::Elements(n as u64));
    let mut opt = optimizer::<f32>("adamw", &a, Parallelism::Global);
    opt.step(&mut a);
    group.bench_function("adamw_par", |b| b.iter(|| opt.step(&mut a)));
    group.finish();
}

criterion_group!(benches, gpt2);
