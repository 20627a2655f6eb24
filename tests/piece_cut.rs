//! A step cuts runs of 1M elements and more into longer pieces than short runs (see
//! `parallel::piece_len`); the cut must never change a bit. The same two parameters (1.2M
//! elements together) in one group form one run, cut into 32K-element pieces; in a group each,
//! two runs below 1M, cut into 16K-element pieces. Both layouts must give the same parameters
//! and state, bit for bit: the f32 step, mode 1 (bf16 parameters and state, rounding to
//! nearest) and mode 3 (stochastic rounding, whose bits are keyed by arena position, so a piece
//! at a wrong offset would show), on 1 and 3 threads. `AveragedModel`'s pass is cut the same
//! way and is checked against its one-pass reference.

mod common;

use std::sync::Arc;

use common::Rng;
use half::bf16;
use optarena::mixed::{HalfBuffer, ParamRounding};
use optarena::optim::*;
use optarena::{
    Arena, ArenaBuilder, Optimizer, Parallelism, Param, ParamGroup, StatePrecision, StepOptions,
};

const SIZES: [usize; 2] = [700_001, 500_003];

fn build() -> (Arena<f32>, Vec<Param<f32>>) {
    let mut rng = Rng(3);
    let mut b = ArenaBuilder::<f32>::new();
    let handles = SIZES
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let init: Vec<f32> = rng
                .vec::<f32>(n, 1.0)
                .into_iter()
                .map(|x| bf16::from_f32(x).to_f32())
                .collect();
            b.param(&format!("p{i}"), &[n], &init).unwrap()
        })
        .collect();
    (b.build(), handles)
}

/// One group holding both parameters (one run), or one group each (two runs).
fn groups(one_run: bool) -> Vec<ParamGroup<f32>> {
    if one_run {
        vec![ParamGroup::all()]
    } else {
        vec![ParamGroup::named(["p0"]), ParamGroup::named(["p1"])]
    }
}

fn optimizer(arena: &Arena<f32>, one_run: bool, threads: usize) -> Optimizer<f32, AdamWAlgorithm> {
    let mut opt = Optimizer::new(arena, groups(one_run), AdamWConfig::default()).unwrap();
    opt.set_parallelism(Parallelism::Pool(Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap(),
    )));
    opt.set_parallel_threshold(0);
    opt
}

fn bits<T: Copy + Into<f32>>(x: &[T]) -> Vec<u32> {
    x.iter().map(|&v| v.into().to_bits()).collect()
}

/// Parameters and state after three f32 steps.
fn f32_steps(one_run: bool, threads: usize) -> Vec<Vec<u32>> {
    let (mut arena, handles) = build();
    let mut opt = optimizer(&arena, one_run, threads);
    let mut rng = Rng(9);
    for _ in 0..3 {
        for &p in &handles {
            let g: Vec<f32> = rng.vec(arena.value(p).len(), 1.0);
            arena.set_grad(p, &g).unwrap();
        }
        opt.step(&mut arena).unwrap();
    }
    let mut out = vec![bits(arena.params())];
    for &p in &handles {
        for name in ["exp_avg", "exp_avg_sq"] {
            out.push(bits(opt.buffer(p, name).unwrap()));
        }
    }
    out
}

/// bf16 parameters after three `step_half` steps (bf16 state), and the state.
fn half_steps(one_run: bool, threads: usize, stochastic: bool) -> Vec<Vec<u32>> {
    let (arena, handles) = build();
    let mut opt = optimizer(&arena, one_run, threads);
    opt.set_state_precision(StatePrecision::Bf16).unwrap();
    let mut params = HalfBuffer::<bf16>::copy_of(&arena);
    let mut grads = HalfBuffer::<bf16>::gradients(&arena);
    let mut rng = Rng(21);
    for step in 0..3u64 {
        for &p in &handles {
            let g: Vec<f32> = rng.vec(arena.value(p).len(), 1.0);
            grads.set_from_f32(p, &g).unwrap();
        }
        let rounding = if stochastic {
            ParamRounding::Stochastic { seed: 5, step }
        } else {
            ParamRounding::Nearest
        };
        opt.step_half(&mut params, &grads, rounding, StepOptions::default())
            .unwrap();
    }
    let mut out = vec![bits(params.as_slice())];
    for &p in &handles {
        for name in ["exp_avg", "exp_avg_sq"] {
            out.push(bits(opt.buffer_bf16(p, name).unwrap()));
        }
    }
    out
}

#[test]
fn long_runs_cut_into_long_pieces_give_the_same_bits() {
    for threads in [1, 3] {
        assert_eq!(
            f32_steps(true, threads),
            f32_steps(false, threads),
            "f32, {threads} threads"
        );
        for stochastic in [false, true] {
            assert_eq!(
                half_steps(true, threads, stochastic),
                half_steps(false, threads, stochastic),
                "bf16, stochastic {stochastic}, {threads} threads"
            );
        }
    }
}

/// `AveragedModel` cuts its pass the same way: on 1.2M elements (32K-element pieces) and 3
/// threads, the fused pass equals the one-pass scalar reference, SWA and EMA, over three
/// updates.
#[test]
fn averaging_a_long_arena_in_long_pieces_matches_the_reference() {
    use optarena::AveragedModel;
    let (mut arena, handles) = build();
    let pool = Parallelism::Pool(Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap(),
    ));
    let mut fused = [
        AveragedModel::new(&arena).with_parallelism(pool.clone()),
        AveragedModel::ema(&arena, 0.9)
            .unwrap()
            .with_parallelism(pool),
    ];
    for m in &mut fused {
        m.set_parallel_threshold(0);
    }
    let mut reference = [
        AveragedModel::new(&arena),
        AveragedModel::ema(&arena, 0.9).unwrap(),
    ];
    let mut rng = Rng(13);
    for _ in 0..3 {
        for &p in &handles {
            let v: Vec<f32> = rng.vec(arena.value(p).len(), 1.0);
            arena.value_mut(p).copy_from_slice(&v);
        }
        for (f, r) in fused.iter_mut().zip(&mut reference) {
            f.update_parameters(&arena).unwrap();
            r.update_parameters_reference(&arena).unwrap();
            assert_eq!(bits(f.averaged()), bits(r.averaged()));
        }
    }
}
