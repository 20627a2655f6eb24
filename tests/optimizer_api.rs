//! The optimizer machinery, for every algorithm: thread-count determinism, save / load /
//! continue (by position and by name), gradient presence, and the checked step.

mod common;

use std::sync::Arc;

use common::{build_arena, write_grads};
use optarena::optim::*;
use optarena::{
    Algorithm, Arena, Float, Hyperparams, MatchBy, Optimizer, Parallelism, Param, ParamGroup,
    StateDict, StepOutcome,
};

/// Two groups: params 0..3 and 3..6, the largest over the parallel threshold.
fn shapes() -> Vec<Vec<usize>> {
    vec![
        vec![7, 5],
        vec![5],
        vec![300, 401],
        vec![33],
        vec![1],
        vec![129, 67],
    ]
}
const BLOCKS: [usize; 2] = [3, 3];

fn groups<T: Float>(
    handles: &[Param<T>],
    group2: &[(&str, optarena::HyperValue)],
) -> Vec<ParamGroup<T>> {
    let mut g2 = ParamGroup::new(handles[3..].iter().copied());
    for (k, v) in group2 {
        g2 = g2.with(k, v.clone());
    }
    vec![ParamGroup::new(handles[..3].iter().copied()), g2]
}

fn snapshot<T: Float>(arena: &Arena<T>) -> Vec<(String, Vec<u64>)> {
    let mut v: Vec<_> = arena
        .infos()
        .iter()
        .map(|i| {
            let bits = arena
                .value_by_name(&i.name)
                .unwrap()
                .iter()
                .map(|x| x.to_f64().to_bits())
                .collect();
            (i.name.clone(), bits)
        })
        .collect();
    v.sort();
    v
}

fn run<T: Float, A: Algorithm>(
    config: &A::Config,
    group2: &[(&str, optarena::HyperValue)],
    par: Parallelism,
    steps: u64,
) -> Vec<(String, Vec<u64>)> {
    let (mut arena, h) = build_arena::<T>(&shapes(), 11, &[]);
    let mut opt = Optimizer::<T, A>::new(&arena, groups(&h, group2), config.clone())
        .unwrap()
        .with_parallelism(par);
    for t in 1..=steps {
        // Parameter 4 misses its gradient on even steps: it must be skipped, not decayed.
        let skip: &[usize] = if t % 2 == 0 { &[4] } else { &[] };
        write_grads(&mut arena, t, skip);
        opt.step(&mut arena).unwrap();
    }
    snapshot(&arena)
}

fn pool(n: usize) -> Parallelism {
    Parallelism::Pool(Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap(),
    ))
}

fn determinism<T: Float, A: Algorithm>(config: A::Config, group2: &[(&str, optarena::HyperValue)]) {
    let seq = run::<T, A>(&config, group2, Parallelism::Sequential, 4);
    for n in [1, 2, 3, 5] {
        assert_eq!(
            seq,
            run::<T, A>(&config, group2, pool(n), 4),
            "{} with {n} threads",
            A::NAME
        );
    }
    assert_eq!(seq, run::<T, A>(&config, group2, Parallelism::Global, 4));
}

fn save_load_continue<T: Float, A: Algorithm>(
    config: A::Config,
    group2: &[(&str, optarena::HyperValue)],
) {
    let uninterrupted = run::<T, A>(&config, group2, Parallelism::Sequential, 7);
    for by in [MatchBy::Position, MatchBy::Name] {
        let (mut arena, h) = build_arena::<T>(&shapes(), 11, &[]);
        let mut opt = Optimizer::<T, A>::new(&arena, groups(&h, group2), config.clone()).unwrap();
        for t in 1..=4 {
            let skip: &[usize] = if t % 2 == 0 { &[4] } else { &[] };
            write_grads(&mut arena, t, skip);
            opt.step(&mut arena).unwrap();
        }
        let json = opt.state_dict_json().unwrap();
        let params: Vec<(String, Vec<T>)> = arena
            .infos()
            .iter()
            .map(|i| {
                (
                    i.name.clone(),
                    arena.value_by_name(&i.name).unwrap().to_vec(),
                )
            })
            .collect();
        drop(opt);
        drop(arena);
        // A fresh model: by name, registered in another order inside each group.
        let reverse: &[usize] = if by == MatchBy::Name { &BLOCKS } else { &[] };
        let (mut arena, h) = build_arena::<T>(&shapes(), 999, reverse);
        for (name, v) in &params {
            arena.value_by_name_mut(name).unwrap().copy_from_slice(v);
        }
        // Fresh optimizer with other hyperparameters: loading must restore the saved ones.
        let mut opt =
            Optimizer::<T, A>::new(&arena, groups(&h, &[]), A::Config::default()).unwrap();
        opt.load_state_dict_json(&json, by).unwrap();
        assert_eq!(opt.group_config(0).unwrap(), &config);
        for t in 5..=7 {
            let skip: &[usize] = if t % 2 == 0 { &[4] } else { &[] };
            write_grads(&mut arena, t, skip);
            opt.step(&mut arena).unwrap();
        }
        assert_eq!(
            snapshot(&arena),
            uninterrupted,
            "{} resumed by {by:?}",
            A::NAME
        );
        // And the state round-trips exactly.
        let again: StateDict<T> = serde_json::from_str(&opt.state_dict_json().unwrap()).unwrap();
        assert_eq!(again, opt.state_dict());
    }
}

fn non_finite_step_changes_nothing<T: Float, A: Algorithm>(config: A::Config) {
    let (mut arena, h) = build_arena::<T>(&shapes(), 3, &[]);
    let mut opt = Optimizer::<T, A>::new(&arena, groups(&h, &[]), config).unwrap();
    write_grads(&mut arena, 1, &[]);
    opt.step(&mut arena).unwrap();
    let before_params = snapshot(&arena);
    let before_state = opt.state_dict();
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        write_grads(&mut arena, 2, &[]);
        arena.grad_mut(h[2])[1234] = T::from_f64(bad);
        assert_eq!(
            opt.step_checked(&mut arena).unwrap(),
            StepOutcome::SkippedNonFinite
        );
        assert_eq!(snapshot(&arena), before_params);
        assert_eq!(opt.state_dict(), before_state);
        assert_eq!(opt.find_non_finite_grad(&arena), Some("p2"));
    }
    write_grads(&mut arena, 2, &[]);
    assert_eq!(opt.step_checked(&mut arena).unwrap(), StepOutcome::Applied);
    assert_ne!(snapshot(&arena), before_params);
}

fn missing_grad_is_skipped<T: Float, A: Algorithm>(config: A::Config) {
    let (mut arena, h) = build_arena::<T>(&shapes(), 5, &[]);
    let mut opt = Optimizer::<T, A>::new(&arena, groups(&h, &[]), config).unwrap();
    let p1_before = arena.value(h[1]).to_vec();
    for t in 1..=3 {
        write_grads(&mut arena, t, &[1]);
        opt.step(&mut arena).unwrap();
    }
    // torch: no state, no step count, no weight decay for a parameter whose grad is None.
    assert_eq!(arena.value(h[1]), &p1_before[..]);
    assert_eq!(opt.step_count(h[1]), None);
    assert!(opt.state_dict().state.iter().all(|s| s.index != 1));
    if A::TRACKS_STEP {
        assert_eq!(opt.step_count(h[0]), Some(3));
    }
}

macro_rules! api_tests {
    ($modname:ident, $alg:ty, $cfg:ty, [$(($k:literal, $v:expr)),* $(,)?], group2: [$(($k2:literal, $v2:expr)),* $(,)?]) => {
        mod $modname {
            use super::*;
            #[allow(unused_imports)]
            use optarena::HyperValue::*;
            fn config() -> $cfg {
                #[allow(unused_mut)]
                let mut c = <$cfg>::default();
                $( c.set($k, &$v.into()).unwrap(); )*
                c
            }
            fn group2() -> Vec<(&'static str, optarena::HyperValue)> {
                vec![$(($k2, $v2.into())),*]
            }
            #[test] fn thread_count_determinism_f32() { determinism::<f32, $alg>(config(), &group2()); }
            #[test] fn thread_count_determinism_f64() { determinism::<f64, $alg>(config(), &group2()); }
            #[test] fn save_load_continue_f32() { save_load_continue::<f32, $alg>(config(), &group2()); }
            #[test] fn save_load_continue_f64() { save_load_continue::<f64, $alg>(config(), &group2()); }
            #[test] fn non_finite_step_changes_nothing_f32() { non_finite_step_changes_nothing::<f32, $alg>(config()); }
            #[test] fn missing_grad_is_skipped_f32() { missing_grad_is_skipped::<f32, $alg>(config()); }
        }
    };
}

api_tests!(sgd, SgdAlgorithm, SgdConfig,
    [("lr", 0.01), ("momentum", 0.9), ("weight_decay", 0.01), ("nesterov", true)],
    group2: [("lr", 0.003), ("weight_decay", 0.0)]);
api_tests!(adam, AdamAlgorithm, AdamConfig,
    [("lr", 0.01), ("amsgrad", true), ("weight_decay", 0.01)],
    group2: [("lr", 0.003), ("betas", (0.8, 0.99))]);
api_tests!(adamw, AdamWAlgorithm, AdamWConfig,
    [("lr", 0.01)],
    group2: [("weight_decay", 0.2)]);
api_tests!(radam, RAdamAlgorithm, RAdamConfig,
    [("lr", 0.01), ("weight_decay", 0.01), ("decoupled_weight_decay", true)],
    group2: [("eps", 1e-6)]);
api_tests!(nadam, NAdamAlgorithm, NAdamConfig,
    [("lr", 0.01), ("weight_decay", 0.01), ("momentum_decay", 0.006)],
    group2: [("decoupled_weight_decay", true), ("weight_decay", 0.05)]);
api_tests!(adamax, AdamaxAlgorithm, AdamaxConfig,
    [("lr", 0.01), ("weight_decay", 0.01)],
    group2: [("betas", (0.8, 0.99)), ("maximize", true)]);
api_tests!(adagrad, AdagradAlgorithm, AdagradConfig,
    [("lr", 0.05), ("lr_decay", 0.1), ("initial_accumulator_value", 0.1)],
    group2: [("weight_decay", 0.02), ("eps", 1e-6)]);
api_tests!(adadelta, AdadeltaAlgorithm, AdadeltaConfig,
    [("lr", 0.5), ("rho", 0.8), ("weight_decay", 0.01)],
    group2: [("eps", 1e-4), ("maximize", true)]);
