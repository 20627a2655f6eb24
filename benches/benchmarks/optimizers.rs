//! Every optimizer, f32 at 4K, 64K, 1M and 32M elements (and f64 at 1M), sequential and
//! parallel, each beside the roofline kernel of its memory traffic, in the same dtype.

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use optarena::roofline::Roofline;
use optarena::{Float, Parallelism};

use super::setup::{arena, optimizer, OPTIMIZERS};

const SIZES: &[usize] = &[4 << 10, 64 << 10, 1 << 20, 32 << 20];

fn bench_one<T: Float>(c: &mut Criterion, name: &str, reads: usize, n: usize) {
    let mut group = c.benchmark_group(format!("step/{name}/{}", T::DTYPE));
    group.throughput(Throughput::Elements(n as u64));
    if n >= 1 << 20 {
        group.sample_size(10);
    }
    let mut a = arena::<T>(&[("w".to_string(), vec![n])]);
    for (mode, par) in [
        ("seq", Parallelism::Sequential),
        ("par", Parallelism::Global),
    ] {
        if reads == 0 && mode == "par" {
            continue; // L-BFGS always runs on the calling thread.
        }
        let mut opt = optimizer::<T>(name, &a, par.clone());
        opt.step(&mut a);
        group.bench_with_input(BenchmarkId::new(mode, n), &n, |b, _| {
            b.iter(|| opt.step(&mut a))
        });
        // The roofline kernel of the same traffic (none for L-BFGS, which is not elementwise).
        if let Some(mut roof) = Roofline::<T>::new(n, reads) {
            group.bench_with_input(
                BenchmarkId::new(format!("roofline_{mode}"), n),
                &n,
                |b, _| b.iter(|| roof.run(&par)),
            );
        }
    }
    group.finish();
}

fn optimizers(c: &mut Criterion) {
    let sizes: Vec<usize> = match std::env::var("OPTARENA_BENCH_MAX") {
        Ok(max) => SIZES
            .iter()
            .copied()
            .filter(|&n| n <= max.parse().unwrap_or(usize::MAX))
            .collect(),
        Err(_) => SIZES.to_vec(),
    };
    for &(name, reads, _) in OPTIMIZERS {
        for &n in &sizes {
            bench_one::<f32>(c, name, reads, n);
        }
        bench_one::<f64>(c, name, reads, 1 << 20);
    }
}

criterion_group!(benches, optimizers);
