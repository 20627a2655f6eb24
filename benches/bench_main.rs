//! Criterion benchmarks. Run with `cargo bench`; see README.md for how to read the report.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use optarena::{Adam, AdamConfig, ArenaBuilder, ParamGroup, Parallelism};

fn adam_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("adam_f32");
    for &n in &[4096usize, 65536, 1 << 20] {
        let mut b = ArenaBuilder::<f32>::new();
        b.param_with("w", &[n], |i| (i as f32 * 1e-3).sin()).unwrap();
        let mut arena = b.build();
        for (i, g) in arena.grads_mut().iter_mut().enumerate() {
            *g = (i as f32 * 7e-3).cos();
        }
        let mut opt = Adam::new(&arena, [ParamGroup::all()], AdamConfig::default())
            .unwrap()
            .with_parallelism(Parallelism::Sequential);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("seq", n), &n, |bch, _| {
            bch.iter(|| opt.step(&mut arena).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, adam_step);
criterion_main!(benches);
