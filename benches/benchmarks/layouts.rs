//! A realistic layout: GPT-2 small's 148 parameter tensors (124M parameters), one AdamW step.

use criterion::{criterion_group, Criterion, Throughput};
use optarena::Parallelism;

use super::setup::{arena, optimizer};

/// GPT-2 small's parameters: wte, wpe, 12 blocks, ln_f (148 tensors, 124,439,808 elements).
pub fn gpt2_small() -> Vec<(String, Vec<usize>)> {
    let mut v = vec![
        ("wte".to_string(), vec![50257, 768]),
        ("wpe".to_string(), vec![1024, 768]),
    ];
    for i in 0..12 {
        let p = |s: &str| format!("h.{i}.{s}");
        v.push((p("ln_1.weight"), vec![768]));
        v.push((p("ln_1.bias"), vec![768]));
        v.push((p("attn.c_attn.weight"), vec![768, 2304]));
        v.push((p("attn.c_attn.bias"), vec![2304]));
        v.push((p("attn.c_proj.weight"), vec![768, 768]));
        v.push((p("attn.c_proj.bias"), vec![768]));
        v.push((p("ln_2.weight"), vec![768]));
        v.push((p("ln_2.bias"), vec![768]));
        v.push((p("mlp.c_fc.weight"), vec![768, 3072]));
        v.push((p("mlp.c_fc.bias"), vec![3072]));
        v.push((p("mlp.c_proj.weight"), vec![3072, 768]));
        v.push((p("mlp.c_proj.bias"), vec![768]));
    }
    v.push(("ln_f.weight".to_string(), vec![768]));
    v.push(("ln_f.bias".to_string(), vec![768]));
    v
}

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
