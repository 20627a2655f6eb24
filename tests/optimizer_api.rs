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
api_tests!(rmsprop, RMSpropAlgorithm, RMSpropConfig,
    [("lr", 0.01), ("centered", true), ("momentum", 0.9), ("weight_decay", 0.01)],
    group2: [("momentum", 0.0), ("alpha", 0.9)]);
api_tests!(rprop, RpropAlgorithm, RpropConfig,
    [("lr", 0.02), ("etas", (0.4, 1.3)), ("step_sizes", (1e-4, 0.5))],
    group2: [("lr", 0.001), ("maximize", true)]);
api_tests!(asgd, AsgdAlgorithm, AsgdConfig,
    [("lr", 0.05), ("t0", 2.0), ("lambd", 0.01), ("weight_decay", 0.01)],
    group2: [("t0", 1e6), ("alpha", 0.5)]);

// ---- Algorithm-specific API ----

/// ASGD's averaged parameters: a copy of the iterate while `mu` is 1, then the running mean of
/// the iterates from step `t0 + 2` on.
#[test]
fn asgd_averaged_is_the_running_mean_of_the_iterates() {
    let (mut arena, h) = build_arena::<f64>(&shapes(), 21, &[]);
    let config = AsgdConfig {
        lr: 0.05,
        t0: 3.0,
        ..Default::default()
    };
    let mut opt = Asgd::new(&arena, groups(&h, &[]), config.clone()).unwrap();
    assert!(
        opt.averaged(h[0]).is_none(),
        "no average before the first step"
    );
    assert!(opt.scalars(h[0]).is_none());
    let mut iterates: Vec<Vec<f64>> = Vec::new();
    for t in 1..=12u64 {
        write_grads(&mut arena, t, &[]);
        opt.step(&mut arena).unwrap();
        let theta = arena.value(h[3]).to_vec();
        iterates.push(theta.clone());
        let ax = opt.averaged(h[3]).unwrap();
        // Steps 1..=t0+1 use mu = 1: the average is the iterate itself.
        let first = (config.t0 as usize + 2).min(t as usize);
        let window = &iterates[first - 1..];
        for (k, &a) in ax.iter().enumerate() {
            let mean = window.iter().map(|v| v[k]).sum::<f64>() / window.len() as f64;
            // mu is a float32 value (1/3 is not exact), so the weights are off by ~1e-8.
            assert!(
                (a - mean).abs() <= 1e-6 * (1.0 + mean.abs()),
                "step {t}, element {k}: ax {a}, mean of the iterates {mean}"
            );
        }
        if t <= config.t0 as u64 + 1 {
            assert_eq!(ax, &theta[..], "step {t}: ax copies the iterate");
        }
        // The same buffer torch calls state["ax"].
        assert_eq!(Some(ax), opt.buffer(h[3], "ax"));
    }
    // eta and mu live in float32, as torch's 0-dim state tensors.
    let s = opt.scalars(h[3]).unwrap();
    assert_eq!(s.eta, s.eta as f32 as f64);
    assert_eq!(s.mu, (1.0f64 / (12.0 - 3.0)) as f32 as f64);
    assert!(s.eta < config.lr);
    let saved = opt.state_dict();
    assert_eq!(saved.state[0].scalars["eta"], s.eta);
    assert_eq!(saved.state[0].scalars["mu"], s.mu);
}

#[test]
fn asgd_eta_starts_at_lr_rounded_to_f32() {
    let (mut arena, h) = build_arena::<f64>(&shapes(), 22, &[]);
    // lambd = 0: eta stays at lr, read back from float32.
    let config = AsgdConfig {
        lr: 0.1,
        lambd: 0.0,
        ..Default::default()
    };
    let mut opt = Asgd::new(&arena, groups(&h, &[]), config).unwrap();
    let before = arena.value(h[1]).to_vec();
    write_grads(&mut arena, 1, &[]);
    let g = arena.grad(h[1]).unwrap().to_vec();
    opt.step(&mut arena).unwrap();
    let eta = 0.1f32 as f64;
    for ((&p, &p0), &g) in arena.value(h[1]).iter().zip(&before).zip(&g) {
        assert_eq!(p, p0 * 1.0 + (-eta) * g);
    }
    assert_eq!(opt.scalars(h[1]).unwrap().eta, eta);
}

/// Turning RMSprop's momentum off mid-training keeps `square_avg` and `grad_avg` (torch then
/// just stops reading `momentum_buffer`): the same as loading the state without it.
#[test]
fn rmsprop_momentum_switched_off_keeps_the_other_buffers() {
    let config = RMSpropConfig {
        centered: true,
        momentum: 0.9,
        ..Default::default()
    };
    let (mut arena, h) = build_arena::<f32>(&shapes(), 31, &[]);
    let mut opt = RMSprop::new(&arena, groups(&h, &[]), config.clone()).unwrap();
    for t in 1..=3 {
        write_grads(&mut arena, t, &[]);
        opt.step(&mut arena).unwrap();
    }
    let grad_avg = opt.buffer(h[0], "grad_avg").unwrap().to_vec();
    let mut saved = opt.state_dict();
    let params = arena.params().to_vec();

    opt.set_hyper(0, "momentum", 0.0).unwrap();
    assert_eq!(opt.buffer(h[0], "grad_avg").unwrap(), &grad_avg[..]);
    assert!(opt.buffer(h[0], "momentum_buffer").is_none());
    assert!(
        opt.buffer(h[4], "momentum_buffer").is_some(),
        "group 1 unchanged"
    );
    for t in 4..=6 {
        write_grads(&mut arena, t, &[]);
        opt.step(&mut arena).unwrap();
    }

    // The same run through a checkpoint without the momentum buffers of group 0.
    for st in &mut saved.state {
        if st.index < 3 {
            st.buffers.remove("momentum_buffer");
        }
    }
    saved.param_groups[0]
        .hyperparams
        .insert("momentum".into(), optarena::HyperValue::Number(0.0));
    let (mut arena2, h2) = build_arena::<f32>(&shapes(), 31, &[]);
    arena2.params_mut().copy_from_slice(&params);
    let mut opt2 = RMSprop::new(&arena2, groups(&h2, &[]), config).unwrap();
    opt2.load_state_dict(&saved, MatchBy::Position).unwrap();
    for t in 4..=6 {
        write_grads(&mut arena2, t, &[]);
        opt2.step(&mut arena2).unwrap();
    }
    assert_eq!(snapshot(&arena), snapshot(&arena2));
    assert_eq!(opt.state_dict(), opt2.state_dict());
}

/// Turning momentum on for a centered RMSprop (torch: `KeyError`) starts `momentum_buffer` at
/// zero and keeps `grad_avg`, which sits after it: the same as loading a zero buffer.
#[test]
fn rmsprop_momentum_switched_on_keeps_grad_avg() {
    let config = RMSpropConfig {
        centered: true,
        ..Default::default()
    };
    let (mut arena, h) = build_arena::<f64>(&shapes(), 33, &[]);
    let mut opt = RMSprop::new(&arena, groups(&h, &[]), config.clone()).unwrap();
    for t in 1..=3 {
        write_grads(&mut arena, t, &[]);
        opt.step(&mut arena).unwrap();
    }
    let mut saved = opt.state_dict();
    let params = arena.params().to_vec();
    let grad_avg = opt.buffer(h[2], "grad_avg").unwrap().to_vec();
    opt.set_hyper(0, "momentum", 0.5).unwrap();
    assert_eq!(opt.buffer(h[2], "grad_avg").unwrap(), &grad_avg[..]);
    assert!(opt
        .buffer(h[2], "momentum_buffer")
        .unwrap()
        .iter()
        .all(|&x| x == 0.0));
    for t in 4..=6 {
        write_grads(&mut arena, t, &[]);
        opt.step(&mut arena).unwrap();
    }

    for st in &mut saved.state {
        if st.index < 3 {
            let n = st.buffers["square_avg"].len();
            st.buffers.insert("momentum_buffer".into(), vec![0.0; n]);
        }
    }
    saved.param_groups[0]
        .hyperparams
        .insert("momentum".into(), optarena::HyperValue::Number(0.5));
    let (mut arena2, h2) = build_arena::<f64>(&shapes(), 33, &[]);
    arena2.params_mut().copy_from_slice(&params);
    let mut opt2 = RMSprop::new(&arena2, groups(&h2, &[]), config).unwrap();
    opt2.load_state_dict(&saved, MatchBy::Position).unwrap();
    for t in 4..=6 {
        write_grads(&mut arena2, t, &[]);
        opt2.step(&mut arena2).unwrap();
    }
    assert_eq!(snapshot(&arena), snapshot(&arena2));
    assert_eq!(opt.state_dict(), opt2.state_dict());
}

/// A config change that drops a buffer leaves a consistent state dict (it used to index past
/// the buffer names).
#[test]
fn dropping_a_buffer_keeps_the_state_dict_consistent() {
    let (mut arena, h) = build_arena::<f32>(&shapes(), 32, &[]);
    let config = AdamConfig {
        amsgrad: true,
        ..Default::default()
    };
    let mut opt = Adam::new(&arena, groups(&h, &[]), config).unwrap();
    write_grads(&mut arena, 1, &[]);
    opt.step(&mut arena).unwrap();
    opt.set_hyper(0, "amsgrad", false).unwrap();
    let sd = opt.state_dict();
    assert!(sd
        .state
        .iter()
        .all(|s| !s.buffers.contains_key("max_exp_avg_sq") || s.index >= 3));
    // Switching it back on starts the buffer afresh, as on first use.
    opt.set_hyper(0, "amsgrad", true).unwrap();
    write_grads(&mut arena, 2, &[]);
    opt.step(&mut arena).unwrap();
    let v = opt.buffer(h[0], "exp_avg_sq").unwrap();
    assert_eq!(opt.buffer(h[0], "max_exp_avg_sq").unwrap(), v);
}

/// SGD's momentum switched on mid-training starts its buffer at the gradient, as torch's
/// `momentum_buffer is None` branch does.
#[test]
fn sgd_momentum_switched_on_starts_at_the_gradient() {
    let (mut arena, h) = build_arena::<f32>(&shapes(), 34, &[]);
    let mut opt = Sgd::new(&arena, groups(&h, &[]), SgdConfig::default()).unwrap();
    write_grads(&mut arena, 1, &[]);
    opt.step(&mut arena).unwrap();
    opt.set_hyper(0, "momentum", 0.9).unwrap();
    write_grads(&mut arena, 2, &[]);
    opt.step(&mut arena).unwrap();
    assert_eq!(
        opt.buffer(h[0], "momentum_buffer").unwrap(),
        arena.grad(h[0]).unwrap()
    );
}

#[test]
fn arena_and_state_buffers_are_64_byte_aligned() {
    let (mut arena, h) = build_arena::<f32>(&shapes(), 1, &[]);
    assert_eq!(arena.params().as_ptr() as usize % 64, 0);
    assert_eq!(arena.grads().as_ptr() as usize % 64, 0);
    let mut opt =
        Optimizer::<f32, AdamAlgorithm>::new(&arena, groups(&h, &[]), AdamConfig::default())
            .unwrap();
    write_grads(&mut arena, 1, &[]);
    opt.step(&mut arena).unwrap();
    // The first parameter of each group starts its group's state buffers.
    for g in [0, 3] {
        for name in ["exp_avg", "exp_avg_sq"] {
            let buf = opt.buffer(h[g], name).unwrap();
            assert_eq!(
                buf.as_ptr() as usize % 64,
                0,
                "{name} of group starting at p{g}"
            );
        }
    }
}
